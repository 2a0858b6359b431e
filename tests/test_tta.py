"""Test-time augmentation (sparse_rcnn.test_time_augmentation): soft box voting on hand-worked
boxes, the per-scale box-size filter, mapping flipped and resized copies back (a model stub with
known detections), batching, parity with the plain model, DefaultPredictor, Dynamic Sparse R-CNN
and train_net.py --eval-only with TEST.AUG.ENABLED."""

import json
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor, default_argument_parser
from detectron2.structures import Boxes, Instances, pairwise_iou
from torch import nn

from conftest import REPO_ROOT, TINY_CONFIG, build_tiny_model, make_cfg
from sparse_rcnn import register_synthetic_shapes
from sparse_rcnn.test_time_augmentation import (
    OFFICIAL_MIN_SIZES,
    OFFICIAL_SCALE_RANGES,
    SparseRCNNWithTTA,
    box_voting,
    filter_boxes_by_size,
)

sys.path.insert(0, str(REPO_ROOT))
import train_net  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Soft box voting, worked by hand
# ---------------------------------------------------------------------------------------------
def hand_made_detections():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # A, class 0, 0.9: the top box
            [0.0, 0.0, 10.0, 12.0],  # B, class 0, 0.6: IoU with A 100/120 = 0.833 -> A's group
            [0.0, 0.0, 10.0, 11.0],  # E, class 0, 0.3: IoU with A 100/110 = 0.909 -> A's group
            [0.0, 0.0, 10.0, 16.0],  # F, class 0, 0.5: IoU with A 100/160 = 0.625 -> alone
            [0.0, 0.0, 10.0, 10.0],  # C, class 1, 0.8: the same box as A, another class
            [50.0, 50.0, 60.0, 60.0],  # D, class 0, 0.35: no overlap -> alone
        ]
    )
    scores = torch.tensor([0.9, 0.6, 0.3, 0.5, 0.8, 0.35])
    classes = torch.tensor([0, 0, 0, 0, 1, 0])
    return boxes, scores, classes


def test_soft_voting_hand_worked():
    boxes, scores, classes = hand_made_detections()
    out_boxes, out_scores, out_classes = box_voting(boxes, scores, classes, 0.65, 0.05)
    # A's group {A, B, E}: y2 = (0.9 * 10 + 0.6 * 12 + 0.3 * 11) / 1.8 = 19.5 / 1.8, score 0.9.
    # Soft copies: A 0.9 * (1 - 1) = 0 (gone), B 0.6 * (1 - 5/6) = 0.1 (kept),
    # E 0.3 * (1 - 10/11) = 0.0273 < 0.05 (gone). F (IoU 0.75 with B, but B has left the pool),
    # C (another class) and D stay as they are.
    expected = [
        ([0.0, 0.0, 10.0, 19.5 / 1.8], 0.9, 0),  # merged A, B, E
        ([0.0, 0.0, 10.0, 10.0], 0.8, 1),  # C
        ([0.0, 0.0, 10.0, 16.0], 0.5, 0),  # F
        ([50.0, 50.0, 60.0, 60.0], 0.35, 0),  # D
        ([0.0, 0.0, 10.0, 12.0], 0.1, 0),  # B's soft copy
    ]
    torch.testing.assert_close(out_boxes, torch.tensor([e[0] for e in expected]))
    torch.testing.assert_close(out_scores, torch.tensor([e[1] for e in expected]))
    assert out_classes.tolist() == [e[2] for e in expected]


def test_plain_voting_has_no_soft_copies():
    boxes, scores, classes = hand_made_detections()
    out_boxes, out_scores, out_classes = box_voting(boxes, scores, classes, 0.65, None)
    torch.testing.assert_close(out_scores, torch.tensor([0.9, 0.8, 0.5, 0.35]))
    torch.testing.assert_close(out_boxes[0], torch.tensor([0.0, 0.0, 10.0, 19.5 / 1.8]))
    assert out_classes.tolist() == [0, 1, 0, 0]


def test_voting_two_boxes_and_classes_never_merge():
    # Two boxes of one class: weighted mean, higher score, plus the lower box's soft copy.
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [2.0, 0.0, 22.0, 20.0]])  # IoU 360/440 = 9/11
    out_boxes, out_scores, _ = box_voting(boxes, torch.tensor([0.6, 0.9]), torch.tensor([2, 2]))
    # (0.9 * [2, 0, 22, 20] + 0.6 * [0, 0, 20, 20]) / 1.5 = [1.2, 0, 21.2, 20]
    torch.testing.assert_close(out_boxes, torch.tensor([[1.2, 0, 21.2, 20], [0, 0, 20, 20]]))
    torch.testing.assert_close(out_scores, torch.tensor([0.9, 0.6 * 2 / 11]))
    # The same two boxes in two classes are two lone boxes: unchanged.
    out_boxes, out_scores, out_classes = box_voting(
        boxes, torch.tensor([0.6, 0.9]), torch.tensor([0, 1])
    )
    torch.testing.assert_close(out_boxes, boxes.flip(0))
    torch.testing.assert_close(out_scores, torch.tensor([0.9, 0.6]))
    assert out_classes.tolist() == [1, 0]


def reference_voting(boxes, scores, classes, iou_threshold, soft_min_score):
    """The issue's description, step by step: take the best remaining box, its same-class group
    with IoU >= threshold, the weighted mean, the soft copies; a lone box as it is."""
    remaining = list(scores.argsort(descending=True).tolist())
    out = []
    while remaining:
        top = remaining[0]
        group = [
            j
            for j in remaining
            if classes[j] == classes[top]
            and pairwise_iou(Boxes(boxes[[top]]), Boxes(boxes[[j]])).item() >= iou_threshold
        ]
        remaining = [j for j in remaining if j not in group]
        if len(group) == 1:
            out.append((boxes[top], scores[top], classes[top]))
            continue
        w = scores[group]
        out.append(((w[:, None] * boxes[group]).sum(0) / w.sum(), w.max(), classes[top]))
        for j in group:
            iou = pairwise_iou(Boxes(boxes[[top]]), Boxes(boxes[[j]])).item()
            if scores[j] * (1 - iou) >= soft_min_score:
                out.append((boxes[j], scores[j] * (1 - iou), classes[j]))
    out.sort(key=lambda d: -float(d[1]))
    return (
        torch.stack([d[0] for d in out]),
        torch.stack([d[1] for d in out]),
        [int(d[2]) for d in out],
    )


def test_voting_matches_the_step_by_step_reference():
    # Clusters of jittered copies of 12 boxes (as TTA copies of the same objects), 3 classes.
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(12, 2, generator=gen) * 100
    base = torch.cat([base, base + 10 + torch.rand(12, 2, generator=gen) * 40], 1)
    boxes = base.repeat(8, 1) + torch.randn(96, 4, generator=gen) * 3
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    scores = torch.rand(96, generator=gen)
    classes = torch.randint(0, 3, (96,), generator=gen)
    expected = reference_voting(boxes, scores, classes, 0.65, 0.05)
    out_boxes, out_scores, out_classes = box_voting(boxes, scores, classes, 0.65, 0.05)
    # The case is not trivial: there are voted boxes and kept input boxes (lone or soft copies).
    voted = ~(out_boxes[:, None] == boxes[None]).all(-1).any(1)
    assert voted.any() and (~voted).any()
    torch.testing.assert_close(out_scores, expected[1])
    torch.testing.assert_close(out_boxes, expected[0])
    assert out_classes.tolist() == expected[2]


def test_voting_lone_zero_area_and_empty():
    box = torch.tensor([[5.0, 5.0, 5.0, 9.0]])  # zero area: still its own (lone) group
    out = box_voting(box, torch.tensor([0.4]), torch.tensor([1]))
    assert torch.equal(out[0], box) and out[1].tolist() == [pytest.approx(0.4)]
    out = box_voting(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert [len(t) for t in out] == [0, 0, 0]
    with pytest.raises(ValueError, match="box_voting expects boxes"):
        box_voting(torch.zeros(3, 5), torch.zeros(3), torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# The box-size filter
# ---------------------------------------------------------------------------------------------
def test_size_filter_keeps_exactly_the_boxes_in_range():
    sides = [5.0, 10.0, 12.0, 19.0, 20.0, 25.0]  # squares; 10 and 20 lie on the (strict) bounds
    boxes = torch.tensor([[3.0, 4.0, 3.0 + s, 4.0 + s] for s in sides])
    boxes = torch.cat([boxes, torch.tensor([[0.0, 0.0, 10.0, 22.5], [0.0, 0.0, 100.0, 1.0]])])
    # The two rectangles: sqrt(10 * 22.5) = 15 (inside), sqrt(100) = 10 (on the bound).
    keep = filter_boxes_by_size(boxes, 10, 20)
    assert keep.tolist() == [False, False, True, True, False, False, True, False]
    # [0, 10000] keeps every box of positive area, never a box of zero area.
    degenerate = torch.tensor([[1.0, 1.0, 1.0, 5.0], [0.0, 0.0, 2.0, 2.0]])
    assert filter_boxes_by_size(degenerate, 0, 10000).tolist() == [False, True]


# ---------------------------------------------------------------------------------------------
# A model stub with known detections
# ---------------------------------------------------------------------------------------------
class BrightBoxDetector(nn.Module):
    """Detects the box of the pixels brighter than 127 (class 1, score 0.9), plus the boxes given
    in ``extra`` (copy pixels, class 2), as SparseRCNN.inference(do_postprocess=False) returns
    them: in the copy's frame. Records the size of every batch."""

    def __init__(self, extra=()):
        super().__init__()
        self.extra = torch.tensor(extra, dtype=torch.float32).reshape(-1, 4)
        self.batch_sizes = []

    def inference(self, batched_inputs, detected_instances=None, do_postprocess=True):
        assert detected_instances is None and not do_postprocess
        self.batch_sizes.append(len(batched_inputs))
        results = []
        for x in batched_inputs:
            image = x["image"]
            ys, xs = torch.nonzero(image[0] > 127, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]).float()
            boxes = torch.cat([box, self.extra])
            result = Instances(tuple(image.shape[1:]))
            result.pred_boxes = Boxes(boxes)
            result.scores = torch.tensor([0.9] + [0.5] * len(self.extra))
            result.pred_classes = torch.tensor([1] + [2] * len(self.extra))
            results.append(result)
        return results


def image_with_bright_box(h, w, box):
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 255
    return image


def test_flipped_and_resized_copies_map_back_to_the_original_frame():
    # An off-centre box: a flipped copy that was not mapped back would give x 60-90, not 10-40.
    box = [10, 5, 40, 25]
    stub = BrightBoxDetector()
    tta = SparseRCNNWithTTA(
        model=stub, min_sizes=(30, 60, 90), max_size=1000, scale_ranges=None, batch_size=4
    ).eval()
    inputs = {"image": image_with_bright_box(60, 100, box), "height": 60, "width": 100}
    augmented = tta.tta_mapper(inputs)
    tfms = [a.pop("transforms") for a in augmented]
    # Copies: (30, flipped 30, 60, flipped 60, 90, flipped 90); in the copy, a flipped one's
    # box lies mirrored.
    assert [tuple(a["image"].shape[1:]) for a in augmented] == [(30, 50)] * 2 + [(60, 100)] * 2 + [
        (90, 150)
    ] * 2
    flipped_box = stub.inference([augmented[3]], do_postprocess=False)[0].pred_boxes.tensor
    torch.testing.assert_close(flipped_box, torch.tensor([[60.0, 5.0, 90.0, 25.0]]))
    boxes, scores, classes = tta._get_augmented_boxes(augmented, tfms)
    assert stub.batch_sizes[-2:] == [4, 2]  # 6 copies, 4 per forward pass
    for copy_boxes, min_size in zip(boxes, (30, 30, 60, 60, 90, 90)):
        # Resizing blurs the edges by at most a pixel of the copy.
        tolerance = 1.0 * 60 / min_size
        torch.testing.assert_close(copy_boxes, torch.tensor([box]).float(), atol=tolerance, rtol=0)
    # The merged result: the voted box, in the original frame.
    result = tta([inputs])[0]["instances"]
    assert result.image_size == (60, 100)
    torch.testing.assert_close(
        result.pred_boxes.tensor[0], torch.tensor(box).float(), atol=1, rtol=0
    )
    assert result.scores[0].item() == pytest.approx(0.9) and result.pred_classes[0].item() == 1


def test_input_resized_by_the_test_mapper_maps_to_the_requested_size():
    # The test loader resized a 60 x 100 image to 120 x 200: the boxes come back in 60 x 100.
    tta = SparseRCNNWithTTA(
        model=BrightBoxDetector(), min_sizes=(120,), max_size=1000, flip=True, scale_ranges=None
    ).eval()
    inputs = {
        "image": image_with_bright_box(120, 200, [20, 10, 80, 50]),
        "height": 60,
        "width": 100,
    }
    result = tta([inputs])[0]["instances"]
    assert result.image_size == (60, 100)
    torch.testing.assert_close(result.pred_boxes.tensor, torch.tensor([[10.0, 5.0, 40.0, 25.0]]))


def test_scale_filter_keeps_each_scales_boxes_in_range():
    # Every copy also "detects" squares of 8, 30 and 60 pixels of the copy (class 2).
    extra = [[0, 0, 8, 8], [0, 0, 30, 30], [0, 0, 60, 60]]
    stub = BrightBoxDetector(extra)
    tta = SparseRCNNWithTTA(
        model=stub, min_sizes=(60, 120), max_size=1000, flip=True, scale_ranges=[(20, 100), (0, 20)]
    ).eval()
    inputs = {"image": image_with_bright_box(60, 100, [10, 5, 40, 25]), "height": 60, "width": 100}
    augmented = tta.tta_mapper(inputs)
    tfms = [a.pop("transforms") for a in augmented]
    boxes, _, classes = tta._get_augmented_boxes(augmented, tfms)
    sides = [sorted((b[:, 3] - b[:, 1]).tolist()) for b in boxes]
    # Scale 60 (copies 0, 1: the original size) keeps 20 < side < 100: the 20 x 30 bright box,
    # the 30 and the 60; scale 120 (twice the size) keeps side < 20: only the 8 (4 in the
    # original); its 40 x 60 bright box goes.
    assert sides == [[20.0, 30.0, 60.0]] * 2 + [[4.0]] * 2
    assert [c.tolist() for c in classes[2:]] == [[2], [2]]
    result = tta([inputs])[0]["instances"]
    assert sorted(result.scores.tolist(), reverse=True) == result.scores.tolist()


def test_nms_merge_is_class_aware_and_bounded():
    # Class-2 boxes on the class-1 box, near the middle: mapped back from the flipped copy they
    # still overlap the others.
    stub = BrightBoxDetector([[35, 5, 65, 25], [36, 5, 65, 25]])
    tta = SparseRCNNWithTTA(
        model=stub, min_sizes=(60,), flip=True, scale_ranges=None, merge="nms", max_detections=10
    ).eval()
    inputs = {"image": image_with_bright_box(60, 100, [35, 5, 65, 25]), "height": 60, "width": 100}
    result = tta([inputs])[0]["instances"]
    # 2 copies x 3 boxes, all with IoU > 0.9: one box survives per class.
    assert sorted(result.pred_classes.tolist()) == [1, 2]
    tta.max_detections = 1
    assert tta([inputs])[0]["instances"].pred_classes.tolist() == [1]


class TopKDetector(nn.Module):
    """Three class-0 detections per copy, cut at its own ``detections_per_image`` (0: all), as
    SparseRCNN's top-k: A [10, 10, 40, 40] 0.9, B [10, 10, 40, 44] 0.6 (IoU with A 900/1020),
    C [10, 10, 42, 40] 0.3 (IoU with A 900/960)."""

    def __init__(self, detections_per_image):
        super().__init__()
        self.detections_per_image = detections_per_image

    def inference(self, batched_inputs, detected_instances=None, do_postprocess=True):
        results = []
        for x in batched_inputs:
            count = self.detections_per_image or 3
            result = Instances(tuple(x["image"].shape[1:]))
            boxes = [[10.0, 10.0, 40.0, 40.0], [10.0, 10.0, 40.0, 44.0], [10.0, 10.0, 42.0, 40.0]]
            result.pred_boxes = Boxes(torch.tensor(boxes[:count]))
            result.scores = torch.tensor([0.9, 0.6, 0.3][:count])
            result.pred_classes = torch.zeros(count, dtype=torch.long)
            results.append(result)
        return results


def test_every_copy_gives_all_its_detections_whatever_the_final_count():
    # One identity copy. With all three detections, A, B and C vote: one box, the score-weighted
    # mean, score 0.9; B's soft copy 0.6 * (1 - 900/1020) = 0.0706 stays (>= 0.05), C's
    # 0.3 * (1 - 900/960) = 0.019 goes. Keeping one merged detection keeps the voted box, not A.
    voted = [
        10.0,
        10.0,
        (0.9 * 40 + 0.6 * 40 + 0.3 * 42) / 1.8,
        (0.9 * 40 + 0.6 * 44 + 0.3 * 40) / 1.8,
    ]
    inputs = [{"image": torch.zeros(3, 60, 100, dtype=torch.uint8), "height": 60, "width": 100}]
    kwargs = dict(min_sizes=(60,), flip=False, scale_ranges=None)
    for model_count in (0, 1):
        stub = TopKDetector(model_count)
        full = SparseRCNNWithTTA(model=stub, max_detections=20, **kwargs).eval()(inputs)
        one = SparseRCNNWithTTA(model=stub, max_detections=1, **kwargs).eval()(inputs)
        full, one = full[0]["instances"], one[0]["instances"]
        torch.testing.assert_close(full.scores, torch.tensor([0.9, 0.6 * (1 - 900 / 1020)]))
        torch.testing.assert_close(full.pred_boxes.tensor[0], torch.tensor(voted))
        torch.testing.assert_close(one.pred_boxes.tensor, full.pred_boxes.tensor[:1])
        assert stub.detections_per_image == model_count  # restored after the run


def test_bad_settings_raise_clear_errors():
    stub = BrightBoxDetector()
    with pytest.raises(ValueError, match="one range per scale"):
        SparseRCNNWithTTA(model=stub, min_sizes=(100, 200))  # the 13 official ranges
    with pytest.raises(ValueError, match="TEST.AUG.MERGE"):
        SparseRCNNWithTTA(model=stub, merge="wbf")
    with pytest.raises(ValueError, match="min <= max"):
        SparseRCNNWithTTA(model=stub, min_sizes=(100,), scale_ranges=[(50, 10)])
    with pytest.raises(TypeError, match="inference"):
        SparseRCNNWithTTA(model=nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="eval"):
        SparseRCNNWithTTA(model=stub.train(), scale_ranges=None, min_sizes=(60,))([{}])


# The TTA settings of the official code (PeizeSun/SparseR-CNN, sparsercnn/config.py), written out
# here rather than read from the package under test.
PAPER_MIN_SIZES = (400, 500, 600, 640, 700, 900, 1000, 1100, 1200, 1300, 1400, 1800, 800)
PAPER_SCALE_RANGES = [
    (96, 10000), (96, 10000), (64, 10000), (64, 10000), (64, 10000), (0, 10000), (0, 10000),
    (0, 256), (0, 256), (0, 192), (0, 192), (0, 96), (0, 10000),
]  # fmt: skip


def test_config_defaults_are_the_official_ones():
    cfg = make_cfg()
    aug = cfg.TEST.AUG
    assert tuple(aug.MIN_SIZES) == PAPER_MIN_SIZES == OFFICIAL_MIN_SIZES
    assert [tuple(r) for r in aug.SCALE_RANGES] == PAPER_SCALE_RANGES
    assert list(OFFICIAL_SCALE_RANGES) == PAPER_SCALE_RANGES
    assert (aug.ENABLED, aug.MAX_SIZE, aug.FLIP, aug.SCALE_FILTER) == (False, 4000, True, True)
    assert (aug.MERGE, aug.VOTE_THRESH, aug.SOFT_VOTE_MIN_SCORE) == ("soft_vote", 0.65, 0.05)
    tta = SparseRCNNWithTTA(cfg, BrightBoxDetector())
    assert tta.max_detections == cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS
    assert tta.tta_mapper.min_sizes == list(OFFICIAL_MIN_SIZES) and tta.tta_mapper.flip


# ---------------------------------------------------------------------------------------------
# The real (tiny) model
# ---------------------------------------------------------------------------------------------
def random_image(h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_model(seed=0).eval()


def test_one_identity_copy_equals_the_plain_model(tiny_model):
    # One copy at the input's own size, no flip, NMS at IoU 1 (removes nothing): TTA = the model.
    inputs = [{"image": random_image(64, 96), "height": 64, "width": 96}]
    tta = SparseRCNNWithTTA(
        model=tiny_model, min_sizes=(64,), flip=False, scale_ranges=None, merge="nms",
        nms_thresh=1.0, max_detections=20,
    ).eval()  # fmt: skip
    with torch.no_grad():
        plain = tiny_model(inputs)[0]["instances"]
    result = tta(inputs)[0]["instances"]
    torch.testing.assert_close(result.pred_boxes.tensor, plain.pred_boxes.tensor)
    torch.testing.assert_close(result.scores, plain.scores)
    assert torch.equal(result.pred_classes, plain.pred_classes)


def test_batched_copies_give_the_same_result():
    # Float64, as test_detector.py::test_batching_invariance: the backbone's rounding differs
    # between batch sizes and six stages of random weights amplify it.
    model = build_tiny_model(seed=0).double().eval()
    inputs = [{"image": random_image(64, 96, seed=1), "height": 64, "width": 96}]
    kwargs = dict(model=model, min_sizes=(48, 80), scale_ranges=None, max_detections=20)
    one = SparseRCNNWithTTA(batch_size=1, **kwargs).eval()(inputs)[0]["instances"]
    two = SparseRCNNWithTTA(batch_size=2, **kwargs).eval()(inputs)[0]["instances"]
    assert len(one) > 0
    # Float64 rounding (2e-16 relative), amplified by the six stages, stays far below 1e-9 (the
    # same runs in float32 differ by about 3e-2 px and 2e-5 in the scores).
    torch.testing.assert_close(two.pred_boxes.tensor, one.pred_boxes.tensor, atol=1e-9, rtol=0)
    torch.testing.assert_close(two.scores, one.scores, atol=1e-9, rtol=0)
    assert torch.equal(two.pred_classes, one.pred_classes)


def test_detections_per_image_cuts_the_merged_detections_and_nothing_else():
    # TEST.DETECTIONS_PER_IMAGE keeps the best merged detections; every copy still contributes its
    # top NUM_PROPOSALS (official), so the result is a prefix of the default one.
    opts = ["TEST.AUG.MIN_SIZES", "(48, 80)", "TEST.AUG.SCALE_FILTER", "False"]
    inputs = [{"image": random_image(64, 96, seed=3), "height": 64, "width": 96}]
    default = SparseRCNNWithTTA(make_cfg(opts=opts), build_tiny_model(seed=0).eval())
    assert default.max_detections == 20  # 0: NUM_PROPOSALS
    expected = default(inputs)[0]["instances"]
    model = build_tiny_model(["TEST.DETECTIONS_PER_IMAGE", 3], seed=0).eval()
    tta = SparseRCNNWithTTA(make_cfg(opts=opts + ["TEST.DETECTIONS_PER_IMAGE", "3"]), model)
    assert tta.max_detections == 3
    result = tta(inputs)[0]["instances"]
    assert len(expected) > 3 and len(result) == 3
    assert torch.equal(result.scores, expected.scores[:3])
    assert torch.equal(result.pred_classes, expected.pred_classes[:3])
    assert torch.equal(result.pred_boxes.tensor, expected.pred_boxes.tensor[:3])
    assert model.detections_per_image == 3  # the model's own setting is back
    with torch.no_grad():
        assert len(model(inputs)[0]["instances"]) <= 3


def test_default_predictor_with_tta():
    cfg = make_cfg(opts=["TEST.AUG.MIN_SIZES", "(48, 96)", "TEST.AUG.SCALE_FILTER", "False"])
    predictor = DefaultPredictor(cfg)  # resizes to INPUT.MIN_SIZE_TEST, BGR -> RGB, float image
    predictor.model = SparseRCNNWithTTA(cfg, predictor.model)
    image = (np.random.RandomState(0).rand(80, 120, 3) * 255).astype(np.uint8)  # BGR
    instances = predictor(image)["instances"]
    assert instances.image_size == (80, 120)
    assert len(instances) <= cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS
    boxes = instances.pred_boxes.tensor
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 120).all() and (boxes[:, 3] <= 80).all()
    assert instances.scores.tolist() == sorted(instances.scores.tolist(), reverse=True)
    # With known detections: the predictor's image (128 x 192) goes through two scales and their
    # flips, and the box comes back in the frame of the image given to the predictor.
    predictor.model = SparseRCNNWithTTA(cfg, BrightBoxDetector()).eval()
    image = np.zeros((80, 120, 3), np.uint8)
    image[10:50, 30:60] = 255
    instances = predictor(image)["instances"]
    torch.testing.assert_close(
        instances.pred_boxes.tensor[0], torch.tensor([30.0, 10.0, 60.0, 50.0]), atol=1.5, rtol=0
    )


DYNAMIC_OPTS = [
    "MODEL.SPARSE_RCNN.MATCHER_NAME", "OTAMatcher",
    "MODEL.SPARSE_RCNN.PROPOSAL_GENERATOR", "DynamicProposalGenerator",
    "MODEL.SPARSE_RCNN.NMS_ENABLED", "True",
]  # fmt: skip


def test_dynamic_sparse_rcnn_with_tta():
    model = build_tiny_model(DYNAMIC_OPTS).eval()
    inputs = [{"image": random_image(64, 96, seed=2), "height": 64, "width": 96}]
    # One identity copy merged by NMS at the model's own IoU (0.7): the model's detections.
    tta = SparseRCNNWithTTA(
        model=model, min_sizes=(64,), flip=False, scale_ranges=None, merge="nms",
        nms_thresh=0.7, max_detections=20,
    ).eval()  # fmt: skip
    with torch.no_grad():
        plain = model(inputs)[0]["instances"]
    torch.testing.assert_close(tta(inputs)[0]["instances"].scores, plain.scores)
    # Two scales, flipped, soft voting.
    tta = SparseRCNNWithTTA(model=model, min_sizes=(48, 80), scale_ranges=None, max_detections=20)
    result = tta.eval()(inputs)[0]["instances"]
    boxes = result.pred_boxes.tensor
    assert 0 < len(result) <= 20 and result.image_size == (64, 96)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all()


# ---------------------------------------------------------------------------------------------
# train_net.py --eval-only TEST.AUG.ENABLED True
# ---------------------------------------------------------------------------------------------
PREFIX = "tta_shapes"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    names = register_synthetic_shapes(
        root, splits={"train": 4, "val": 4}, image_size=96, prefix=PREFIX
    )
    yield root
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def tta_opts(output_dir):
    return [
        "OUTPUT_DIR", str(output_dir),
        "DATASETS.TRAIN", f"('{PREFIX}_train',)",
        "DATASETS.TEST", f"('{PREFIX}_val',)",
        "SEED", "3",
        "TEST.AUG.ENABLED", "True",
        "TEST.AUG.MIN_SIZES", "(64, 128)",
        "TEST.AUG.SCALE_RANGES", "((16, 1000), (0, 64))",
    ]  # fmt: skip


def test_train_net_trains_and_evaluates_with_tta(datasets, tmp_path, monkeypatch):
    # Training ends with Detectron2's EvalHook, then the TTA one (as tools/train_net.py); --eval-only
    # on the final weights reports the same TTA metrics, plus the plain and per-stage ones.
    torch.set_num_threads(1)
    recorded = []
    original = train_net.Trainer.test_with_TTA.__func__

    def recording(cls, cfg, model):
        recorded.append(original(cls, cfg, model))
        return recorded[-1]

    monkeypatch.setattr(train_net.Trainer, "test_with_TTA", classmethod(recording))
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    argv = ["--config-file", str(TINY_CONFIG), *tta_opts(train_dir), "SOLVER.MAX_ITER", "2"]
    train_net.main(default_argument_parser().parse_args(argv))
    assert len(recorded) == 1 and set(recorded[0]) == {"bbox_TTA"}
    for folder in ("inference", "inference_TTA"):
        assert (train_dir / folder / f"{PREFIX}_val" / "coco_instances_results.json").exists()
    with open(train_dir / "metrics.json") as f:
        logged = {k: v for line in f for k, v in json.loads(line).items() if k.startswith("bbox")}

    argv = ["--config-file", str(TINY_CONFIG), "--eval-only", *tta_opts(eval_dir)]
    argv += ["MODEL.WEIGHTS", str(train_dir / "model_final.pth")]
    results = train_net.main(default_argument_parser().parse_args(argv + [
        "MODEL.SPARSE_RCNN.EVAL_PER_STAGE", "True"]))  # fmt: skip
    assert set(results) == {"bbox", "bbox_TTA"} | {f"bbox_stage{t}" for t in range(1, 7)}
    assert set(results["bbox_TTA"]) >= {"AP", "AP50", "AP75"}
    assert 0.0 <= results["bbox_TTA"]["AP"] <= 100.0
    # The same weights: the evaluations at the end of training gave the same metrics.
    assert results["bbox_TTA"] == pytest.approx(recorded[0]["bbox_TTA"], nan_ok=True)
    assert {k: v for k, v in logged.items() if k.startswith("bbox/")} == pytest.approx(
        {f"bbox/{k}": v for k, v in results["bbox"].items()}, nan_ok=True
    )
    with open(eval_dir / "inference_TTA" / f"{PREFIX}_val" / "coco_instances_results.json") as f:
        detections = json.load(f)
    sizes = {r["image_id"]: (r["height"], r["width"]) for r in DatasetCatalog.get(f"{PREFIX}_val")}
    assert len({d["image_id"] for d in detections}) == 4
    assert max(np.bincount([d["image_id"] for d in detections])) <= 20  # NUM_PROPOSALS
    for d in detections:
        x, y, w, h = d["bbox"]
        height, width = sizes[d["image_id"]]
        assert x >= 0 and y >= 0 and w > 0 and h > 0
        assert x + w <= width + 1e-3 and y + h <= height + 1e-3
