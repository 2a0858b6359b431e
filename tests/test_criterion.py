"""SetCriterion: loss values against hand computations in plain math, normaliser, deep supervision."""

import itertools
import math

import pytest
import torch

from sparse_rcnn.criterion import SetCriterion
from sparse_rcnn.matcher import HungarianMatcher

ALPHA, GAMMA = 0.25, 2.0
W_CLS, W_L1, W_GIOU = 2.0, 5.0, 2.0


def make_criterion(num_classes, deep_supervision=True):
    matcher = HungarianMatcher(
        cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=ALPHA, gamma=GAMMA
    )
    return SetCriterion(
        matcher=matcher,
        num_classes=num_classes,
        class_weight=W_CLS,
        l1_weight=W_L1,
        giou_weight=W_GIOU,
        alpha=ALPHA,
        gamma=GAMMA,
        deep_supervision=deep_supervision,
    )


def target(labels, boxes, w, h):
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "image_whwh": torch.tensor([w, h, w, h], dtype=torch.float32),
    }


# ---------------------------------------------------------------------------------------------
# Plain-math reference
# ---------------------------------------------------------------------------------------------
def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def focal(logit, positive):
    p = sigmoid(logit)
    if positive:
        return ALPHA * (1 - p) ** GAMMA * -math.log(p)
    return (1 - ALPHA) * p**GAMMA * -math.log(1 - p)


def giou(a, b):
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    union = area_a + area_b - inter
    encl = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (encl - union) / encl


def l1(a, b, w, h):
    s = (w, h, w, h)
    return sum(abs(x / si - y / si) for x, y, si in zip(a, b, s))


def match_cost(logits_row, box, label, gt, w, h):
    p = sigmoid(logits_row[label])
    cls = ALPHA * (1 - p) ** GAMMA * -math.log(p + 1e-8) - (1 - ALPHA) * p**GAMMA * -math.log(
        1 - p + 1e-8
    )
    return 2.0 * cls + 5.0 * l1(box, gt, w, h) - 2.0 * giou(box, gt)


def hand_losses(logits, boxes, labels, gts, w, h, pairs, normalizer):
    """Weighted loss terms for given (prediction, GT) pairs, in plain Python."""
    positives = {(p, labels[g]) for p, g in pairs}
    cls = sum(
        focal(logits[i][k], (i, k) in positives)
        for i in range(len(logits))
        for k in range(len(logits[0]))
    )
    l1_sum = sum(l1(boxes[p], gts[g], w, h) for p, g in pairs)
    giou_sum = sum(1 - giou(boxes[p], gts[g]) for p, g in pairs)
    return {
        "cls": W_CLS * cls / normalizer,
        "l1": W_L1 * l1_sum / normalizer,
        "giou": W_GIOU * giou_sum / normalizer,
    }


def best_pairs(logits, boxes, labels, gts, w, h):
    """Optimal one-to-one assignment by exhaustive search."""
    n, m = len(boxes), len(gts)
    best, best_pairs_ = math.inf, None
    if m <= n:
        candidates = [list(zip(perm, range(m))) for perm in itertools.permutations(range(n), m)]
    else:
        candidates = [list(zip(range(n), perm)) for perm in itertools.permutations(range(m), n)]
    for pairs in candidates:
        c = sum(match_cost(logits[p], boxes[p], labels[g], gts[g], w, h) for p, g in pairs)
        if c < best:
            best, best_pairs_ = c, pairs
    return best_pairs_


def assert_stage(losses, stage, expected, rel=1e-5):
    for term in ("cls", "l1", "giou"):
        assert float(losses[f"loss_{term}_stage{stage}"]) == pytest.approx(
            expected[term], rel=rel, abs=1e-7
        ), term


# ---------------------------------------------------------------------------------------------
# A hand-worked example: 1 image (100 x 50), 2 predictions, 2 classes, 1 GT of class 1
# ---------------------------------------------------------------------------------------------
W, H = 100.0, 50.0
LOGITS = [[-1.0, 0.5], [0.3, -2.0]]
BOXES = [[12.0, 8.0, 48.0, 44.0], [60.0, 5.0, 90.0, 45.0]]
GT = [10.0, 10.0, 50.0, 40.0]


def test_hand_worked_example():
    crit = make_criterion(num_classes=2, deep_supervision=False)
    out = [{"pred_logits": torch.tensor([LOGITS]), "pred_boxes": torch.tensor([BOXES])}]
    losses = crit(out, [target([1], [GT], W, H)])
    assert set(losses) == {"loss_cls_stage1", "loss_l1_stage1", "loss_giou_stage1"}

    # Prediction 0 overlaps the GT, prediction 1 does not: the matching picks prediction 0.
    assert match_cost(LOGITS[0], BOXES[0], 1, GT, W, H) < match_cost(
        LOGITS[1], BOXES[1], 1, GT, W, H
    )

    # Focal loss: (0, class 1) is the only positive.
    p = [[sigmoid(x) for x in row] for row in LOGITS]
    cls = (
        0.75 * p[0][0] ** 2 * -math.log(1 - p[0][0])
        + 0.25 * (1 - p[0][1]) ** 2 * -math.log(p[0][1])
        + 0.75 * p[1][0] ** 2 * -math.log(1 - p[1][0])
        + 0.75 * p[1][1] ** 2 * -math.log(1 - p[1][1])
    )
    # L1 on corners divided by (100, 50, 100, 50): |12-10|/100 + |8-10|/50 + |48-50|/100 + |44-40|/50.
    l1_value = 2 / 100 + 2 / 50 + 2 / 100 + 4 / 50
    # GIoU: pred area 36*36 = 1296, GT area 40*30 = 1200, intersection (12..48)x(10..40) = 36*30.
    inter = 36.0 * 30.0
    union = 1296.0 + 1200.0 - inter
    enclosing = (50.0 - 10.0) * (44.0 - 8.0)
    giou_value = inter / union - (enclosing - union) / enclosing
    expected = {"cls": 2 * cls, "l1": 5 * l1_value, "giou": 2 * (1 - giou_value)}
    assert_stage(losses, 1, expected)
    # The same numbers via the generic reference.
    assert_stage(losses, 1, hand_losses(LOGITS, BOXES, [1], [GT], W, H, [(0, 0)], 1.0))


def test_normaliser_is_number_of_gt_boxes():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, generator=gen)
    boxes = torch.tensor(
        [
            [
                [5.0, 5.0, 30.0, 30.0],
                [20.0, 10.0, 60.0, 40.0],
                [0.0, 0.0, 80.0, 60.0],
                [50, 30, 70, 55],
            ],
            [
                [1.0, 2.0, 10.0, 12.0],
                [30.0, 20.0, 50.0, 45.0],
                [5.0, 30.0, 25.0, 55.0],
                [0, 0, 40, 40],
            ],
        ]
    )
    t0 = target([2], [[8.0, 6.0, 28.0, 33.0]], 80.0, 60.0)
    t1 = target([0, 1], [[28.0, 22.0, 52.0, 44.0], [3.0, 28.0, 24.0, 57.0]], 80.0, 60.0)
    crit = make_criterion(num_classes=3, deep_supervision=False)

    both = crit([{"pred_logits": logits, "pred_boxes": boxes}], [t0, t1])
    alone0 = crit([{"pred_logits": logits[:1], "pred_boxes": boxes[:1]}], [t0])
    alone1 = crit([{"pred_logits": logits[1:], "pred_boxes": boxes[1:]}], [t1])
    for key in both:
        # batch loss * 3 GT = image-0 loss * 1 GT + image-1 loss * 2 GT
        assert float(both[key]) * 3 == pytest.approx(
            float(alone0[key]) * 1 + float(alone1[key]) * 2, rel=1e-5
        ), key

    # Independently: every term against plain math with the normaliser 3.
    lg, bx = logits.tolist(), boxes.tolist()
    pairs0 = best_pairs(lg[0], bx[0], [2], t0["boxes"].tolist(), 80.0, 60.0)
    pairs1 = best_pairs(lg[1], bx[1], [0, 1], t1["boxes"].tolist(), 80.0, 60.0)
    h0 = hand_losses(lg[0], bx[0], [2], t0["boxes"].tolist(), 80.0, 60.0, pairs0, 3.0)
    h1 = hand_losses(lg[1], bx[1], [0, 1], t1["boxes"].tolist(), 80.0, 60.0, pairs1, 3.0)
    assert_stage(both, 1, {k: h0[k] + h1[k] for k in h0})


def test_image_without_annotations():
    logits = torch.tensor([LOGITS], requires_grad=True)
    boxes = torch.tensor([BOXES], requires_grad=True)
    crit = make_criterion(num_classes=2, deep_supervision=False)
    empty = target([], [], W, H)
    losses = crit([{"pred_logits": logits, "pred_boxes": boxes}], [empty])
    for value in losses.values():
        assert torch.isfinite(value)
    # Normaliser clamped to 1; every prediction is a negative for every class.
    neg = sum(focal(x, False) for row in LOGITS for x in row)
    assert float(losses["loss_cls_stage1"]) == pytest.approx(2 * neg, rel=1e-5)
    assert float(losses["loss_l1_stage1"]) == 0.0
    assert float(losses["loss_giou_stage1"]) == 0.0
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert boxes.grad is None or (torch.isfinite(boxes.grad).all() and (boxes.grad == 0).all())


def test_batch_with_an_empty_image():
    logits = torch.tensor([LOGITS, LOGITS])
    boxes = torch.tensor([BOXES, BOXES])
    crit = make_criterion(num_classes=2, deep_supervision=False)
    losses = crit(
        [{"pred_logits": logits, "pred_boxes": boxes}],
        [target([1], [GT], W, H), target([], [], W, H)],
    )
    h = hand_losses(LOGITS, BOXES, [1], [GT], W, H, [(0, 0)], 1.0)
    neg = sum(focal(x, False) for row in LOGITS for x in row)
    assert_stage(losses, 1, {"cls": h["cls"] + W_CLS * neg, "l1": h["l1"], "giou": h["giou"]})


def test_more_gt_than_predictions():
    gts = [[10.0, 10.0, 50.0, 40.0], [55.0, 0.0, 95.0, 48.0], [0.0, 20.0, 30.0, 50.0]]
    labels = [1, 0, 1]
    logits = torch.tensor([LOGITS], requires_grad=True)
    boxes = torch.tensor([BOXES], requires_grad=True)
    crit = make_criterion(num_classes=2, deep_supervision=False)
    losses = crit([{"pred_logits": logits, "pred_boxes": boxes}], [target(labels, gts, W, H)])
    pairs = best_pairs(LOGITS, BOXES, labels, gts, W, H)
    assert len(pairs) == 2
    assert_stage(losses, 1, hand_losses(LOGITS, BOXES, labels, gts, W, H, pairs, 3.0))
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(boxes.grad).all()
    assert (boxes.grad.abs().sum(-1) > 0).all()  # both predictions are matched


def _three_stages(seed=0):
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(3):
        xy = torch.rand(1, 4, 2, generator=gen) * 40
        wh = 5 + torch.rand(1, 4, 2, generator=gen) * 40
        outs.append(
            {
                "pred_logits": torch.randn(1, 4, 3, generator=gen),
                "pred_boxes": torch.cat([xy, xy + wh], -1),
            }
        )
    t = target([0, 2], [[5.0, 5.0, 30.0, 40.0], [30.0, 10.0, 70.0, 50.0]], 80.0, 60.0)
    return outs, t


def test_deep_supervision_keys_and_values():
    outs, t = _three_stages()
    with_ds = make_criterion(3, deep_supervision=True)(outs, [t])
    assert set(with_ds) == {f"loss_{k}_stage{s}" for k in ("cls", "l1", "giou") for s in (1, 2, 3)}
    single = make_criterion(3, deep_supervision=False)
    for s in range(3):
        alone = single([outs[s]], [t])
        for k in ("cls", "l1", "giou"):
            assert float(with_ds[f"loss_{k}_stage{s + 1}"]) == pytest.approx(
                float(alone[f"loss_{k}_stage1"]), rel=1e-6
            )
    # Stages get different losses (their predictions differ).
    assert float(with_ds["loss_cls_stage1"]) != float(with_ds["loss_cls_stage2"])


def test_without_deep_supervision_only_last_stage():
    outs, t = _three_stages()
    losses = make_criterion(3, deep_supervision=False)(outs, [t])
    assert set(losses) == {"loss_cls_stage3", "loss_l1_stage3", "loss_giou_stage3"}
    full = make_criterion(3, deep_supervision=True)(outs, [t])
    for key, value in losses.items():
        assert float(value) == pytest.approx(float(full[key]), rel=1e-6)
    # And equal to the plain-math value of the last stage.
    lg, bx = outs[2]["pred_logits"][0].tolist(), outs[2]["pred_boxes"][0].tolist()
    labels, gts = t["labels"].tolist(), t["boxes"].tolist()
    pairs = best_pairs(lg, bx, labels, gts, 80.0, 60.0)
    assert_stage(losses, 3, hand_losses(lg, bx, labels, gts, 80.0, 60.0, pairs, 2.0))
