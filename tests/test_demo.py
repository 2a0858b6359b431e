"""The demo's ``--confidence-threshold auto``: the F1-optimal threshold against ground truth,
hand-worked, and its fallback; the class names of the labels; the drawing scale."""

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.structures import Boxes, BoxMode, Instances

from conftest import make_cfg
from sparse_rcnn import builtin_datasets
from sparse_rcnn.demo import (
    FALLBACK_THRESHOLD,
    auto_threshold,
    class_names,
    drawing_scale,
    f1_optimal_threshold,
    render,
)


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


def test_auto_without_any_ground_truth_falls_back_to_detectron2_default(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dataset was generated")

    # The config's test set (the built-in one) is neither generated nor read.
    monkeypatch.setattr(builtin_datasets, "ensure_generated", refuse)
    threshold, source = auto_threshold([predictions([A], [0], [0.9])], [None])
    assert threshold == FALLBACK_THRESHOLD and "no ground truth" in source
    # Images with ground truth among others: only theirs counts (one TP at 0.6: threshold 0.3).
    labelled = predictions([A], [0], [0.6])
    unlabelled = predictions([B], [0], [0.95])
    threshold, source = auto_threshold([unlabelled, labelled], [None, GT_AB])
    assert abs(threshold - 0.3) < 1e-6 and "of the 1 images" in source


@pytest.fixture
def bare_dataset():
    """A registered dataset without class names (no thing_classes, no json)."""
    DatasetCatalog.register("demo_bare", lambda: [])
    yield "demo_bare"
    DatasetCatalog.remove("demo_bare")
    MetadataCatalog.remove("demo_bare")


def test_class_names_come_from_the_training_set_before_the_test_set(bare_dataset):
    # The test set has no names (Detectron2 would label every box "0"): the training set's.
    cfg = make_cfg(opts=["DATASETS.TEST", f"('{bare_dataset}',)"])
    assert class_names(cfg) == (
        ["rectangle", "ellipse", "triangle"],
        "dataset synthetic_shapes_train",
    )
    # --dataset comes first; a training set without names gives way to the test set.
    MetadataCatalog.get(bare_dataset).thing_classes = ["a", "b", "c"]
    assert class_names(cfg, bare_dataset) == (["a", "b", "c"], f"dataset {bare_dataset}")
    cfg = make_cfg(
        opts=["DATASETS.TRAIN", "('demo_unknown',)", "DATASETS.TEST", f"('{bare_dataset}',)"]
    )
    assert class_names(cfg)[0] == ["a", "b", "c"]


def test_class_names_none_without_names_or_of_another_count(bare_dataset):
    cfg = make_cfg(
        opts=["DATASETS.TRAIN", "('demo_unknown',)", "DATASETS.TEST", f"('{bare_dataset}',)"]
    )
    names, why = class_names(cfg)
    assert names is None and "demo_unknown, demo_bare" in why
    # Names of a dataset with another class count than the model's would mislabel: none.
    names, why = class_names(make_cfg(opts=["MODEL.SPARSE_RCNN.NUM_CLASSES", "2"]))
    assert names is None and "has 3 classes but the model 2" in why


def test_small_images_are_drawn_upscaled_to_512_px_and_large_ones_as_they_are():
    assert drawing_scale(np.zeros((128, 96, 3))) == 4.0
    assert drawing_scale(np.zeros((600, 800, 3))) == 1.0
    image = np.zeros((128, 64, 3), dtype=np.uint8)
    _, drawn = render(image, predictions([A], [0], [0.9], size=(128, 64)), Metadata())
    assert drawn.shape == (512, 256, 3)
