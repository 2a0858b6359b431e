"""The demo's ``--confidence-threshold auto``: the F1-optimal threshold against ground truth,
hand-worked, and its fallbacks."""

import torch
from detectron2.config import get_cfg
from detectron2.structures import Boxes, BoxMode, Instances

from sparse_rcnn.demo import FALLBACK_THRESHOLD, auto_threshold, f1_optimal_threshold, render


def predictions(boxes, classes, scores, size=(64, 64)):
    instances = Instances(size)
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.pred_classes = torch.tensor(classes)
    instances.scores = torch.tensor(scores)
    return instances


def record(boxes_xywh, classes):
    annotations = [
        {"bbox": b, "bbox_mode": BoxMode.XYWH_ABS, "category_id": c}
        for b, c in zip(boxes_xywh, classes)
    ]
    return {"annotations": annotations}


A, B, FAR = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]
GT_AB = record([[0, 0, 10, 10], [20, 20, 10, 10]], [0, 0])


def test_first_of_equal_f1_maxima_keeps_the_fewest_detections():
    # In score order: TP (A), duplicate of A (FP: A is matched once), B with the wrong class (FP),
    # B (TP), FAR (FP). With 2 GT boxes, F1 = 2 TP / (kept + 2): 2/3, 2/4, 2/5, 4/6, 4/7.
    # The maximum 2/3 is reached first at one kept detection: threshold halfway 0.9 -> 0.8.
    p = predictions([A, A, B, B, FAR], [0, 0, 1, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.2])
    assert abs(f1_optimal_threshold([p], [GT_AB]) - 0.85) < 1e-6


def test_threshold_below_the_lowest_score_keeps_everything():
    # FP, TP, TP: F1 = 0/3, 2/4, 4/5 -> all three kept, threshold half the lowest score 0.4.
    p = predictions([FAR, A, B], [0, 0, 0], [0.9, 0.5, 0.4])
    threshold = f1_optimal_threshold([p], [GT_AB])
    assert abs(threshold - 0.2) < 1e-6
    kept, _ = render(torch.zeros(64, 64, 3, dtype=torch.uint8).numpy(), p, {}, None, threshold)
    assert len(kept) == 3


def test_images_are_pooled_and_iou_decides_a_match():
    # Image 1: a box of IoU 25/175 < 0.5 with its GT: FP at 0.6. Image 2: a TP at 0.3.
    # Pooled in score order: FP (0.6), TP (0.3); 2 GT: F1 0/3, 2/4 -> both kept, threshold 0.15.
    shifted = [5, 5, 15, 15]
    first = predictions([shifted], [0], [0.6])
    second = predictions([A], [0], [0.3])
    gt = record([[0, 0, 10, 10]], [0])
    assert abs(f1_optimal_threshold([first, second], [gt, gt]) - 0.15) < 1e-6
    # A box of IoU 0.81 (9x9 of 10x10) matches.
    near = predictions([[0, 0, 9, 9]], [0], [0.6])
    assert abs(f1_optimal_threshold([near], [gt]) - 0.3) < 1e-6


def test_no_ground_truth_or_no_detection_gives_none():
    p = predictions([A], [0], [0.9])
    assert f1_optimal_threshold([p], [record([], [])]) is None
    assert f1_optimal_threshold([predictions([], [], [])], [GT_AB]) is None


def test_auto_without_any_ground_truth_falls_back_to_detectron2_default():
    cfg = get_cfg()
    cfg.DATASETS.TEST = ("a_dataset_that_is_not_registered",)
    threshold, source = auto_threshold(None, [predictions([A], [0], [0.9])], [None], cfg, 8)
    assert threshold == FALLBACK_THRESHOLD and "no ground truth" in source
