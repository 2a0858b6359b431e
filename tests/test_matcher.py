"""HungarianMatcher: optimality against exhaustive search, cost terms against plain-math formulas."""

import itertools
import math

import pytest
import torch

from sparse_rcnn.matcher import HungarianMatcher

ALPHA, GAMMA = 0.25, 2.0
WEIGHTS = dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)


def make_matcher(**weights):
    w = dict(WEIGHTS, **weights)
    return HungarianMatcher(alpha=ALPHA, gamma=GAMMA, **w)


# ---------------------------------------------------------------------------------------------
# Independent reference implementation (plain Python floats)
# ---------------------------------------------------------------------------------------------
def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def ref_class_cost(logit):
    p = _sigmoid(logit)
    pos = ALPHA * (1 - p) ** GAMMA * (-math.log(p + 1e-8))
    neg = (1 - ALPHA) * p**GAMMA * (-math.log(1 - p + 1e-8))
    return pos - neg


def ref_l1(box, gt, whwh):
    return sum(abs(b / s - g / s) for b, g, s in zip(box, gt, whwh))


def ref_giou(a, b):
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = area_a + area_b - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (enclosing - union) / enclosing


def ref_cost_matrix(logits, boxes, target, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0):
    logits, boxes = logits.double().tolist(), boxes.double().tolist()
    labels = target["labels"].tolist()
    gts = target["boxes"].double().tolist()
    whwh = target["image_whwh"].double().tolist()
    cost = [[0.0] * len(labels) for _ in logits]
    for i in range(len(logits)):
        for j in range(len(labels)):
            cost[i][j] = (
                cost_class * ref_class_cost(logits[i][labels[j]])
                + cost_bbox * ref_l1(boxes[i], gts[j], whwh)
                - cost_giou * ref_giou(boxes[i], gts[j])
            )
    return cost


def brute_force_min_cost(cost, n, m):
    """Minimum total cost over all injective assignments (the smaller side fully matched)."""
    best = math.inf
    if m <= n:
        for preds in itertools.permutations(range(n), m):
            best = min(best, sum(cost[p][g] for g, p in enumerate(preds)))
    else:
        for gts in itertools.permutations(range(m), n):
            best = min(best, sum(cost[p][g] for p, g in enumerate(gts)))
    return best


# ---------------------------------------------------------------------------------------------
# Random problem generation
# ---------------------------------------------------------------------------------------------
def random_boxes(n, w, h, gen):
    x1 = torch.rand(n, generator=gen) * w * 0.7
    y1 = torch.rand(n, generator=gen) * h * 0.7
    bw = 1 + torch.rand(n, generator=gen) * w * 0.5
    bh = 1 + torch.rand(n, generator=gen) * h * 0.5
    return torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1)


def random_case(n, m, k=4, w=80.0, h=60.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=gen) * 2
    boxes = random_boxes(n, w, h, gen)
    target = {
        "labels": torch.randint(0, k, (m,), generator=gen, dtype=torch.int64),
        "boxes": random_boxes(m, w, h, gen),
        "image_whwh": torch.tensor([w, h, w, h]),
    }
    return logits, boxes, target


def match_one(matcher, logits, boxes, target):
    ((pred_idx, gt_idx),) = matcher(logits[None], boxes[None], [target], 0)
    return pred_idx, gt_idx


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_optimal_against_exhaustive_search(seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    n = int(torch.randint(1, 7, (1,), generator=gen))
    m = int(torch.randint(1, n + 1, (1,), generator=gen))
    logits, boxes, target = random_case(n, m, seed=seed)
    matcher = make_matcher()
    pred_idx, gt_idx = match_one(matcher, logits, boxes, target)

    assert pred_idx.dtype == torch.int64 and gt_idx.dtype == torch.int64
    # Every GT matched exactly once, each prediction at most once.
    assert len(pred_idx) == m and len(gt_idx) == m
    assert sorted(gt_idx.tolist()) == list(range(m))
    assert len(set(pred_idx.tolist())) == m
    assert all(0 <= p < n for p in pred_idx.tolist())

    cost = ref_cost_matrix(logits, boxes, target)
    total = sum(cost[p][g] for p, g in zip(pred_idx.tolist(), gt_idx.tolist()))
    assert total == pytest.approx(brute_force_min_cost(cost, n, m), abs=1e-4)


@pytest.mark.parametrize("n,m", [(2, 5), (3, 4), (1, 3), (4, 6)])
def test_more_gt_than_predictions(n, m):
    logits, boxes, target = random_case(n, m, seed=10 * n + m)
    pred_idx, gt_idx = match_one(make_matcher(), logits, boxes, target)
    # Every prediction is matched exactly once: N pairs, distinct GT boxes.
    assert sorted(pred_idx.tolist()) == list(range(n))
    assert len(gt_idx) == n and len(set(gt_idx.tolist())) == n
    assert all(0 <= g < m for g in gt_idx.tolist())
    cost = ref_cost_matrix(logits, boxes, target)
    total = sum(cost[p][g] for p, g in zip(pred_idx.tolist(), gt_idx.tolist()))
    assert total == pytest.approx(brute_force_min_cost(cost, n, m), abs=1e-4)


def test_zero_gt_gives_empty_indices():
    logits, boxes, _ = random_case(5, 1)
    target = {
        "labels": torch.zeros(0, dtype=torch.int64),
        "boxes": torch.zeros(0, 4),
        "image_whwh": torch.tensor([80.0, 60.0, 80.0, 60.0]),
    }
    other_logits, other_boxes, other_target = random_case(5, 2, seed=3)
    indices = make_matcher()(
        torch.stack([logits, other_logits]),
        torch.stack([boxes, other_boxes]),
        [target, other_target],
    )
    assert len(indices) == 2
    pred_idx, gt_idx = indices[0]
    assert pred_idx.numel() == 0 and gt_idx.numel() == 0
    assert pred_idx.dtype == torch.int64 and gt_idx.dtype == torch.int64
    assert len(indices[1][0]) == 2  # the other image is still matched


def test_obvious_assignment():
    # Three predictions that each sit on one GT box (in a shuffled order) with its class confident.
    gts = torch.tensor([[0.0, 0.0, 20.0, 20.0], [40.0, 10.0, 70.0, 50.0], [10.0, 30.0, 30.0, 55.0]])
    labels = torch.tensor([1, 0, 2])
    order = [2, 0, 1]  # prediction i sits on GT order[i]
    boxes = gts[order] + torch.tensor([0.5, -0.5, 0.5, 0.5])
    logits = torch.full((3, 3), -4.0)
    for i, g in enumerate(order):
        logits[i, labels[g]] = 4.0
    target = {"labels": labels, "boxes": gts, "image_whwh": torch.tensor([80.0, 60.0, 80.0, 60.0])}
    pred_idx, gt_idx = match_one(make_matcher(), logits, boxes, target)
    assert dict(zip(pred_idx.tolist(), gt_idx.tolist())) == {0: 2, 1: 0, 2: 1}


def _single_term_cost(logits, boxes, target, **weights):
    matcher = HungarianMatcher(alpha=ALPHA, gamma=GAMMA, **weights)
    cost, giou = matcher.cost_matrix(logits, boxes, target)
    return cost.double(), giou.double()


def test_class_cost_term_matches_focal_formula():
    logits, boxes, target = random_case(5, 4, k=3, seed=7)
    cost, _ = _single_term_cost(logits, boxes, target, cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)
    labels = target["labels"].tolist()
    for i in range(5):
        for j in range(4):
            expected = ref_class_cost(float(logits[i, labels[j]]))
            assert float(cost[i, j]) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_class_cost_hand_values():
    # logit 0 -> p = 0.5: 0.25 * 0.25 * ln 2 - 0.75 * 0.25 * ln 2 = -0.125 ln 2.
    # logit ln 3 -> p = 0.75: 0.25 * 0.0625 * (-ln 0.75) - 0.75 * 0.5625 * (-ln 0.25).
    logits = torch.tensor([[0.0, math.log(3.0)]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    target = {
        "labels": torch.tensor([0, 1]),
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]]),
        "image_whwh": torch.tensor([10.0, 10.0, 10.0, 10.0]),
    }
    cost, _ = _single_term_cost(logits, boxes, target, cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)
    assert float(cost[0, 0]) == pytest.approx(-0.125 * math.log(2.0), rel=1e-5)
    expected = 0.25 * 0.0625 * -math.log(0.75) - 0.75 * 0.5625 * -math.log(0.25)
    assert float(cost[0, 1]) == pytest.approx(expected, rel=1e-5)


def test_l1_cost_term_on_normalised_corners():
    # Image 100 x 50: L1 = |dx1|/100 + |dy1|/50 + |dx2|/100 + |dy2|/50.
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    target = {
        "labels": torch.tensor([0, 0]),
        "boxes": torch.tensor([[20.0, 0.0, 40.0, 45.0], [10.0, 5.0, 30.0, 25.0]]),
        "image_whwh": torch.tensor([100.0, 50.0, 100.0, 50.0]),
    }
    logits = torch.zeros(1, 1)
    cost, _ = _single_term_cost(logits, boxes, target, cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    assert float(cost[0, 0]) == pytest.approx(10 / 100 + 5 / 50 + 10 / 100 + 20 / 50, rel=1e-6)
    assert float(cost[0, 1]) == pytest.approx(0.0, abs=1e-7)
    # And the weight scales it linearly.
    cost5, _ = _single_term_cost(
        logits, boxes, target, cost_class=0.0, cost_bbox=5.0, cost_giou=0.0
    )
    assert float(cost5[0, 0]) == pytest.approx(5 * 0.7, rel=1e-6)


def test_giou_cost_term_hand_values():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    target = {
        "labels": torch.tensor([0, 0, 0]),
        # overlapping: inter 1, union 7, enclosing 9 -> 1/7 - 2/9
        # disjoint (3,0,4,1): inter 0, union 5, enclosing (0,0,4,2) = 8 -> -3/8
        # identical -> 1
        "boxes": torch.tensor([[1.0, 1.0, 3.0, 3.0], [3.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 2.0]]),
        "image_whwh": torch.tensor([10.0, 10.0, 10.0, 10.0]),
    }
    logits = torch.zeros(1, 1)
    cost, giou = _single_term_cost(
        logits, boxes, target, cost_class=0.0, cost_bbox=0.0, cost_giou=1.0
    )
    expected_giou = [1 / 7 - 2 / 9, 0.0 - (8 - 5) / 8, 1.0]
    for j, g in enumerate(expected_giou):
        assert float(giou[0, j]) == pytest.approx(g, rel=1e-6, abs=1e-7)
        assert float(cost[0, j]) == pytest.approx(-g, rel=1e-6, abs=1e-7)


def test_full_cost_matrix_against_reference():
    logits, boxes, target = random_case(6, 5, k=5, seed=11)
    cost, _ = _single_term_cost(logits, boxes, target, **WEIGHTS)
    ref = torch.tensor(ref_cost_matrix(logits, boxes, target), dtype=torch.float64)
    torch.testing.assert_close(cost, ref, rtol=1e-5, atol=1e-5)


def test_per_image_independence():
    l0, b0, t0 = random_case(6, 3, seed=21)
    l1, b1, t1 = random_case(6, 5, seed=22)
    t1["image_whwh"] = torch.tensor([120.0, 90.0, 120.0, 90.0])
    matcher = make_matcher()
    alone = matcher(l0[None], b0[None], [t0])[0]
    batch = matcher(torch.stack([l0, l1]), torch.stack([b0, b1]), [t0, t1])
    alone1 = matcher(l1[None], b1[None], [t1])[0]
    for a, b in zip(alone, batch[0]):
        assert torch.equal(a, b)
    for a, b in zip(alone1, batch[1]):
        assert torch.equal(a, b)


def test_non_finite_cost_raises():
    logits, boxes, target = random_case(3, 2, seed=5)
    boxes[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        make_matcher()(logits[None], boxes[None], [target])
