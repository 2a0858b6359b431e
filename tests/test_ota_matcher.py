"""Dynamic label assignment of Dynamic Sparse R-CNN: Sinkhorn, dynamic k, OTAMatcher, criterion."""

import itertools
from fractions import Fraction

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from conftest import make_cfg
from sparse_rcnn.criterion import SetCriterion, build_criterion
from sparse_rcnn.matcher import HungarianMatcher, build_matcher
from sparse_rcnn.ota import (
    OTAMatcher,
    _logsumexp,
    _sinkhorn_log,
    _sinkhorn_scaling,
    assign_by_plan,
    cap_units,
    dynamic_k_estimate,
    ensure_every_gt_matched,
    focal_background_cost,
    ota_units,
    sinkhorn,
    unit_increase_offset,
)


def random_inputs(num_images, num_preds, num_gts, num_classes=3, seed=0, clustered=False):
    """Random logits, xyxy boxes in a 128 x 128 image and targets (``num_gts`` per image)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_images, num_preds, num_classes, generator=g)
    boxes, targets = [], []
    for m in num_gts:
        xy = torch.rand(m, 2, generator=g) * 80
        gt = torch.cat([xy, xy + torch.rand(m, 2, generator=g) * 40 + 8], dim=1)
        if clustered and m > 0:  # predictions jittered around the GTs: high IoUs, large k
            pred = gt[torch.randint(0, m, (num_preds,), generator=g)]
            pred = pred + torch.randn(num_preds, 4, generator=g) * 2
            pred = torch.cat([pred[:, :2], torch.maximum(pred[:, 2:], pred[:, :2] + 1)], dim=1)
        else:
            xy = torch.rand(num_preds, 2, generator=g) * 80
            pred = torch.cat([xy, xy + torch.rand(num_preds, 2, generator=g) * 40 + 8], dim=1)
        boxes.append(pred)
        targets.append(
            {
                "labels": torch.randint(0, num_classes, (m,), generator=g),
                "boxes": gt,
                "image_whwh": torch.tensor([128.0, 128.0, 128.0, 128.0]),
            }
        )
    return logits, torch.stack(boxes), targets


def check_matching(pred_idx, gt_idx, num_preds, num_gt):
    assert pred_idx.dtype == torch.int64 and gt_idx.dtype == torch.int64
    assert len(pred_idx) == len(gt_idx)
    assert len(torch.unique(pred_idx)) == len(pred_idx), "a prediction got two GTs"
    assert torch.all(pred_idx[1:] > pred_idx[:-1]), "sorted by prediction index"
    if len(pred_idx):
        assert 0 <= int(pred_idx.min()) and int(pred_idx.max()) < num_preds
        assert 0 <= int(gt_idx.min()) and int(gt_idx.max()) < num_gt


# ---- Sinkhorn ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "supply",
    [
        [2.0, 3.0, 1.0, 4.0],  # 3 GTs + background, n = 10
        [10.0],  # m = 0: the background supplies everything
        [2.0, 2.0, 2.0, 2.0, 2.0, 0.0],  # m = n / 2 units each, the background gets nothing
        [10 / 13] * 13,  # m = 13 > n = 10 suppliers (fractional supplies)
    ],
)
def test_sinkhorn_marginals(supply):
    supply = torch.tensor(supply)
    cost = torch.rand(len(supply), 10, generator=torch.Generator().manual_seed(0))
    plan = sinkhorn(cost, supply, eps=0.1, num_iters=300)
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(dim=0), torch.ones(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(dim=1), supply, atol=1e-4, rtol=0)
    assert torch.all(plan[supply == 0] == 0)


def test_sinkhorn_batched_padding_and_no_overflow():
    # Two images with 2 and 0 GTs, padded to 2 GT rows + background; huge costs and a tiny eps.
    cost = torch.rand(2, 3, 6, generator=torch.Generator().manual_seed(1)) * 1e4
    supply = torch.tensor([[2.0, 1.0, 3.0], [0.0, 0.0, 6.0]])
    plan = sinkhorn(cost, supply, eps=1e-3, num_iters=100)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(dim=1), torch.ones(2, 6), atol=1e-4, rtol=0)
    assert torch.all(plan[1, :2] == 0)
    torch.testing.assert_close(plan[1, 2], torch.ones(6))
    # Each image's plan equals the plan of that image alone.
    alone = sinkhorn(cost[0], supply[0], eps=1e-3, num_iters=100)
    torch.testing.assert_close(plan[0], alone)


def test_sinkhorn_column_constant_does_not_change_the_plan():
    # "full_focal" computes the positive and background costs relative to the background loss:
    # a constant added to a whole column (all suppliers of one prediction) leaves the plan as is.
    g = torch.Generator().manual_seed(2)
    cost, shift = torch.rand(4, 9, generator=g), torch.rand(9, generator=g) * 3
    supply = torch.tensor([2.0, 1.0, 3.0, 3.0])
    torch.testing.assert_close(
        sinkhorn(cost, supply, num_iters=100), sinkhorn(cost + shift, supply, num_iters=100)
    )


@pytest.mark.parametrize("eps, cost_scale", [(0.1, 1.0), (0.1, 30.0), (0.05, 10.0), (1.0, 5.0)])
def test_sinkhorn_scaling_and_log_forms_agree(eps, cost_scale):
    # Batched images with zero-supply padding rows, OTA-like supplies (GT units + background).
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(3, 5, 40, generator=g) * cost_scale
    supply = torch.tensor(
        [[3.0, 2.0, 1.0, 4.0, 30.0], [5.0, 0.0, 0.0, 0.0, 35.0], [1.0, 1.0, 2.0, 0.0, 36.0]]
    )
    fast = _sinkhorn_scaling(cost, supply, None, eps, 50)
    assert fast is not None, "the OTA default range must take the scaling form"
    assert fast.dtype == torch.float32
    reference = _sinkhorn_log(cost.double(), supply.double(), None, eps, 50)
    torch.testing.assert_close(fast, reference.float(), atol=1e-5, rtol=1e-4)
    assert torch.all(fast[supply == 0] == 0)
    torch.testing.assert_close(sinkhorn(cost, supply, eps=eps), fast)


def test_sinkhorn_falls_back_to_the_log_form_outside_float64_range():
    # Costs spanning 1e4 / 1e-3 = 1e7 in the exponent: the kernel is not representable.
    g = torch.Generator().manual_seed(4)
    cost = torch.rand(3, 6, generator=g) * 1e4
    supply = torch.tensor([2.0, 1.0, 3.0])
    assert _sinkhorn_scaling(cost, supply, None, 1e-3, 20) is None
    torch.testing.assert_close(
        sinkhorn(cost, supply, eps=1e-3, num_iters=20), _sinkhorn_log(cost, supply, None, 1e-3, 20)
    )
    # Non-finite costs also take the log form (which propagates them as it always did).
    assert _sinkhorn_scaling(torch.full((2, 3), float("inf")), supply[:2], None, 0.1, 5) is None


def test_logsumexp_is_torch_logsumexp_bit_for_bit():
    # The log form's logsumexp skips exp() of arguments far below -87.3 (see the comment at it).
    g = torch.Generator().manual_seed(5)
    x = torch.cat(
        [
            -torch.rand(4, 300, generator=g) * 4000,  # costs 0-40 at eps 0.01
            -87.0 - torch.rand(4, 300, generator=g) * 17,  # subnormal exp() results
            torch.randn(4, 300, generator=g) * 30,
        ]
    )
    x[0, :7] = 0.0  # ties at the max
    special = torch.randn(4, 300, generator=g)
    special[0] = float("-inf")  # a supplier with no supply
    special[1, 3] = float("inf")
    special[2, 5] = float("nan")
    special[3, :] = -1e30
    for t in (x, special):
        for dim in (0, 1):
            torch.testing.assert_close(
                _logsumexp(t.clone(), dim), torch.logsumexp(t, dim), rtol=0, atol=0, equal_nan=True
            )


def brute_force_assignment(cost):
    """Optimal injective GT -> prediction map of a (M, N) cost by enumeration, and the gap to the
    second best total."""
    m, n = cost.shape
    totals = sorted(
        (sum(float(cost[i, p[i]]) for i in range(m)), p)
        for p in itertools.permutations(range(n), m)
    )
    return totals[0][1], totals[1][0] - totals[0][0]


@pytest.mark.parametrize("m, n", [(3, 6), (4, 4), (2, 7)])
def test_sinkhorn_with_unit_supplies_is_the_hungarian_assignment(m, n):
    # Every k = 1, background cost 0 (no preference), small eps: argmax of the plan is the optimal
    # one-to-one assignment (checked by enumeration and against scipy's Hungarian solver).
    checked = 0
    for seed in range(8):
        cost = torch.rand(m, n, generator=torch.Generator().manual_seed(seed))
        best, gap = brute_force_assignment(cost)
        rows, cols = linear_sum_assignment(cost.numpy())
        assert tuple(cols[rows.argsort()]) == best
        if gap < 0.02:  # optimum not unique enough for an entropic solver
            continue
        supply = torch.tensor([1.0] * m + [n - m])
        plan = sinkhorn(torch.cat([cost, torch.zeros(1, n)]), supply, eps=0.005, num_iters=2000)
        owner = plan.argmax(dim=0)
        assert tuple(int(torch.nonzero(owner == i)) for i in range(m)) == best
        assert int((owner == m).sum()) == n - m
        checked += 1
    assert checked >= 5


def test_ota_matcher_with_k1_equals_hungarian_matcher():
    hungarian = HungarianMatcher()
    ota = OTAMatcher(
        fixed_k=1,
        unit_increasing=False,
        max_positive_fraction=1.0,
        sinkhorn_eps=0.01,
        sinkhorn_iters=1000,
    )
    # A small eps: OTA's row-rescaled rounding of a diffuse plan gives a GT more predictions.
    for seed in range(6):
        logits, boxes, targets = random_inputs(2, 7, [3, 4], seed=seed)
        expected = hungarian(logits, boxes, targets)
        for (p1, g1), (p2, g2) in zip(ota(logits, boxes, targets), expected):
            assert torch.equal(p1, p2) and torch.equal(g1, g2)


# ---- Units: dynamic k, unit increasing, cap ----------------------------------------------------


def test_dynamic_k_hand_worked():
    ious = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.1, 0.0],  # top-3 sum 2.4 -> 2
            [0.2, 0.1, 0.3, 0.05, 0.0],  # 0.6 -> at least 1
            [0.95, 0.9, 0.9, 0.9, 0.85],  # 2.75 -> 2 (floor, as OTA's int())
        ]
    )
    torch.testing.assert_close(dynamic_k_estimate(ious, 3), torch.tensor([2.4, 0.6, 2.75]))
    assert ota_units(dynamic_k_estimate(ious, 3), 100).tolist() == [2, 1, 2]
    # q larger than the number of predictions sums them all: 2.5, 0.65, 4.5
    assert ota_units(dynamic_k_estimate(ious, 8), 100).tolist() == [2, 1, 4]
    assert dynamic_k_estimate(torch.zeros(2, 0), 8).tolist() == [0.0, 0.0]


def test_unit_increasing_every_stage_of_six():
    # The paper's order: k = max(1, int(k_real)), then eq. 2 k* = k - 0.5 (T - t), t = 1 ... 6,
    # not rounded, and at least 1.
    assert [unit_increase_offset(s, 6) for s in range(6)] == [2.5, 2.0, 1.5, 1.0, 0.5, 0.0]

    def per_stage(k):
        k = torch.tensor([k])
        return [float(ota_units(k, 300, offset=unit_increase_offset(s, 6))) for s in range(6)]

    assert per_stage(4.6) == [1.5, 2.0, 2.5, 3.0, 3.5, 4.0]  # k = 4; 3.5 at T - t = 1
    assert per_stage(7.9) == [4.5, 5.0, 5.5, 6.0, 6.5, 7.0]  # k = 7
    assert per_stage(6.0) == [3.5, 4.0, 4.5, 5.0, 5.5, 6.0]
    assert per_stage(3.0) == [1.0, 1.0, 1.5, 2.0, 2.5, 3.0]  # fixed k = 3; 0.5 -> 1 at t = 1
    assert per_stage(2.0) == [1.0, 1.0, 1.0, 1.0, 1.5, 2.0]
    assert per_stage(1.0) == [1.0] * 6
    assert per_stage(0.6) == [1.0] * 6  # k = max(1, int(0.6)) = 1
    with pytest.raises(ValueError):
        unit_increase_offset(6, 6)
    # The matcher applies it by stage index; fixed k = 3.
    matcher = OTAMatcher(fixed_k=3, num_stages=6)
    pred, gt = torch.tensor([[0.0, 0, 10, 10]] * 20), torch.tensor([[0.0, 0, 10, 10]])
    assert [float(matcher.units(pred, gt, s)) for s in range(6)] == [1, 1, 1.5, 2, 2.5, 3]
    matcher = OTAMatcher(fixed_k=3, unit_increasing=False)
    assert [float(matcher.units(pred, gt, s)) for s in range(6)] == [3] * 6


def assert_units(units, expected):
    """Units equal to exact fractions (float64 rounding aside)."""
    expected = torch.tensor([float(Fraction(e)) for e in expected], dtype=torch.float64)
    torch.testing.assert_close(units, expected, rtol=1e-12, atol=0)


def test_cap_units_hand_worked():
    # n = 10 -> at most 8 positives, a plain rescale by 8 / sum.
    assert_units(ota_units(torch.tensor([5.0, 3.0]), 10), [5, 3])  # 8: unchanged
    assert_units(ota_units(torch.tensor([4.0, 4.0, 4.0]), 10), [Fraction(8, 3)] * 3)
    assert_units(ota_units(torch.tensor([6.0, 5.0]), 10), [Fraction(48, 11), Fraction(40, 11)])
    assert_units(ota_units(torch.tensor([3.0] * 9), 10), [Fraction(8, 9)] * 9)  # below one each
    # n = 300 (the paper's proposals): budget 240.
    assert_units(ota_units(torch.full((40,), 7.0), 300), [6] * 40)
    # Every stage of T = 6 with n = 10: k_real (4.6, 4.2, 3.9) -> k = (4, 4, 3), eq. 2, then cap.
    k_real = torch.tensor([4.6, 4.2, 3.9])
    expected = [
        [Fraction(3, 2), Fraction(3, 2), 1],  # 0.5 -> 1; sum 4
        [2, 2, 1],
        [Fraction(5, 2), Fraction(5, 2), Fraction(3, 2)],  # 6.5
        [3, 3, 2],  # exactly 8: not capped
        [Fraction(56, 19), Fraction(56, 19), Fraction(40, 19)],  # (3.5, 3.5, 2.5) x 8 / 9.5
        [Fraction(32, 11), Fraction(32, 11), Fraction(24, 11)],  # (4, 4, 3) x 8 / 11
    ]
    for stage in range(6):
        units = ota_units(k_real, 10, offset=unit_increase_offset(stage, 6))
        assert_units(units, expected[stage])
    # n = 20 (budget 16): nothing is capped, the last two stages keep eq. 2's units.
    assert_units(ota_units(k_real, 20, offset=0.5), [3.5, 3.5, 2.5])
    assert_units(ota_units(k_real, 20), [4, 4, 3])


@pytest.mark.parametrize("seed", range(3))
def test_cap_units_is_one_common_factor(seed):
    g = torch.Generator().manual_seed(seed)
    units = 1 + torch.rand(int(torch.randint(1, 30, (1,), generator=g)), generator=g).double() * 7
    for budget in (0.5 * float(units.sum()), float(units.sum()), 2.0 * float(units.sum()), 3.7):
        capped = cap_units(units, budget)
        torch.testing.assert_close(capped.sum(), units.sum().clamp(max=budget), rtol=1e-12, atol=0)
        ratio = capped / units
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-12, atol=0)
        assert (capped <= units).all()


def test_assign_by_plan_rescales_each_supplier_row():
    # OTA's rounding: GT 0 spreads its unit over predictions 0-2 (row max 0.45), the background
    # (supply 2) takes most of predictions 0 and 1 in plain numbers. Divided by the row maxima
    # (0.45, 0.9, 0.8), predictions 0 and 1 go to GT 0; the plain argmax gives them to the
    # background, and the repair of the then unmatched GT 0 gives it prediction 0 only.
    plan = torch.tensor(
        [
            [0.45, 0.45, 0.10, 0.00],  # GT 0, supply 1
            [0.00, 0.00, 0.10, 0.90],  # GT 1, supply 1
            [0.55, 0.55, 0.80, 0.10],  # background, supply 2
        ]
    )
    assert assign_by_plan(plan).tolist() == [0, 0, 2, 1]
    assert plan.argmax(dim=0).tolist() == [2, 2, 2, 1]
    assert ensure_every_gt_matched(plan.argmax(dim=0), plan, 2).tolist() == [0, 2, 2, 1]
    # A supplier with nothing to give (a zero row) never wins and gives no NaN.
    zero_bg = torch.cat([plan[:2], torch.zeros(1, 4)])
    assert assign_by_plan(zero_bg).tolist() == [0, 0, 0, 1]


def test_ota_matcher_reads_the_plan_as_ota(monkeypatch):
    import sparse_rcnn.ota as ota

    plan = torch.tensor(
        [[0.45, 0.45, 0.10, 0.00], [0.00, 0.00, 0.10, 0.90], [0.55, 0.55, 0.80, 0.10]]
    )
    seen = {}

    def fake_sinkhorn(cost, supply, **kwargs):
        seen["shape"] = tuple(cost.shape)
        return plan[None]

    monkeypatch.setattr(ota, "sinkhorn", fake_sinkhorn)
    logits, boxes, targets = random_inputs(1, 4, [2], seed=9)
    ((pred_idx, gt_idx),) = OTAMatcher(max_positive_fraction=1.0)(logits, boxes, targets, 5)
    assert seen["shape"] == (1, 3, 4)
    assert pred_idx.tolist() == [0, 1, 3] and gt_idx.tolist() == [0, 0, 1]


def test_ensure_every_gt_matched():
    # 3 GTs, 5 predictions; argmax gave GT 0 three predictions, GT 2 none; background one.
    owner = torch.tensor([0, 0, 0, 1, 3])
    plan = torch.tensor(
        [
            [0.5, 0.3, 0.4, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.6, 0.1],
            [0.4, 0.1, 0.2, 0.3, 0.3],  # best is prediction 0 (of GT 0, which can spare it)
            [0.1, 0.6, 0.4, 0.1, 0.6],
        ]
    )
    assert ensure_every_gt_matched(owner.clone(), plan, 3).tolist() == [2, 0, 0, 1, 3]
    # Prediction 3 (best for GT 2) cannot be taken from GT 1, its only one.
    plan[2] = torch.tensor([0.0, 0.1, 0.0, 0.9, 0.2])
    assert ensure_every_gt_matched(owner.clone(), plan, 3).tolist() == [0, 0, 0, 1, 2]


# ---- OTAMatcher end to end --------------------------------------------------------------------


@pytest.mark.parametrize("clustered", [False, True])
def test_ota_matcher_random_boxes(clustered):
    num_preds, num_gts, num_stages = 40, [6, 0, 3], 6
    logits, boxes, targets = random_inputs(3, num_preds, num_gts, seed=3, clustered=clustered)
    # Every GT gets floor(k*_i) or ceil(k*_i) predictions for a small eps (k* may be fractional);
    # within ``tolerance`` of that for the default.
    for eps, iters, tolerance in [(0.01, 1000, 0), (0.1, 50, 2)]:
        matcher = OTAMatcher(num_stages=num_stages, sinkhorn_eps=eps, sinkhorn_iters=iters)
        for stage in range(num_stages):
            indices = matcher(logits, boxes, targets, stage)
            assert len(indices) == 3
            for (pred_idx, gt_idx), target, b in zip(indices, targets, range(3)):
                m = len(target["labels"])
                check_matching(pred_idx, gt_idx, num_preds, m)
                if m == 0:
                    assert len(pred_idx) == 0
                    continue
                units = matcher.units(boxes[b], target["boxes"], stage)
                counts = torch.bincount(gt_idx, minlength=m)
                assert (counts >= 1).all(), "every GT gets a prediction"
                low, high = units.floor() - tolerance, units.ceil() + tolerance
                assert ((counts >= low) & (counts <= high)).all()
                assert float(low.sum()) <= len(pred_idx) <= float(high.sum())
    if clustered:  # the last stage of the clustered case gives several units
        assert int(matcher.units(boxes[0], targets[0]["boxes"], 5).max()) >= 3


def test_ota_matcher_many_gts():
    # m = n: one unit each, no background: every prediction positive, a GT each.
    logits, boxes, targets = random_inputs(1, 6, [6], seed=4)
    pred_idx, gt_idx = OTAMatcher()(logits, boxes, targets, 5)[0]
    assert pred_idx.tolist() == list(range(6)) and sorted(gt_idx.tolist()) == list(range(6))
    # 0.8 n < m < n: one unit each, the background supplies n - m.
    logits, boxes, targets = random_inputs(1, 10, [9], seed=4)
    pred_idx, gt_idx = OTAMatcher()(logits, boxes, targets, 5)[0]
    assert len(pred_idx) == 9 and sorted(gt_idx.tolist()) == list(range(9))
    # m > n: the Hungarian fallback (every prediction positive, n distinct GTs).
    logits, boxes, targets = random_inputs(2, 4, [7, 2], seed=5)
    ota = OTAMatcher()(logits, boxes, targets, 0)
    hungarian = HungarianMatcher()(logits, boxes, targets)
    assert torch.equal(ota[0][0], hungarian[0][0]) and torch.equal(ota[0][1], hungarian[0][1])
    check_matching(*ota[0], 4, 7)
    assert len(ota[0][0]) == 4 and len(torch.unique(ota[0][1])) == 4
    check_matching(*ota[1], 4, 2)
    assert sorted(set(ota[1][1].tolist())) == [0, 1]


def test_ota_matcher_background_costs():
    logits, boxes, targets = random_inputs(1, 12, [3], seed=6)
    full = OTAMatcher(background_cost="full_focal")
    positive, background = full.costs(logits[0], boxes[0], targets[0])
    assert positive.shape == (3, 12) and torch.all(background == 0)
    neg = OTAMatcher(background_cost="neg_focal")
    positive2, background2 = neg.costs(logits[0], boxes[0], targets[0])
    torch.testing.assert_close(positive2, positive)
    prob = logits[0].sigmoid()
    expected = 2.0 * (0.75 * prob**2 * -(1 - prob).log()).sum(dim=1)
    torch.testing.assert_close(background2, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(focal_background_cost(logits[0]), expected / 2, atol=1e-5, rtol=0)
    for matcher in (full, neg):
        check_matching(*matcher(logits, boxes, targets, 0)[0], 12, 3)
    with pytest.raises(ValueError):
        OTAMatcher(background_cost="bce")
    with pytest.raises(ValueError):
        OTAMatcher(max_positive_fraction=1.5)


def test_ota_matcher_rejects_non_finite_costs():
    logits, boxes, targets = random_inputs(1, 5, [2], seed=7)
    logits[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        OTAMatcher()(logits, boxes, targets, 0)


def test_ota_matcher_from_config():
    cfg = make_cfg(
        opts=[
            "MODEL.SPARSE_RCNN.MATCHER_NAME",
            "OTAMatcher",
            "MODEL.SPARSE_RCNN.OTA.TOP_Q",
            "5",
            "MODEL.SPARSE_RCNN.NUM_STAGES",
            "4",
        ]
    )
    matcher = build_matcher(cfg)
    assert isinstance(matcher, OTAMatcher)
    assert (matcher.top_q, matcher.num_stages, matcher.sinkhorn_eps) == (5, 4, 0.1)
    assert (matcher.sinkhorn_iters, matcher.max_positive_fraction) == (50, 0.8)
    assert matcher.cost_weights == {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0}


# ---- Criterion with OTA -----------------------------------------------------------------------


def stage_outputs_for(num_stages=3, seed=8):
    logits, boxes, targets = random_inputs(2, 30, [5, 2], seed=seed, clustered=True)
    outputs = []
    for t in range(num_stages):
        jitter = torch.randn(boxes.shape, generator=torch.Generator().manual_seed(t))
        outputs.append(
            {
                "pred_logits": (logits + 0.1 * t).requires_grad_(),
                "pred_boxes": (boxes + jitter).requires_grad_(),
            }
        )
    return outputs, targets


def make_criterion(**kwargs):
    matcher = OTAMatcher(num_stages=3, fixed_k=3)
    return SetCriterion(matcher=matcher, num_classes=3, **kwargs)


def test_criterion_with_ota_normalises_by_positives():
    outputs, targets = stage_outputs_for()
    by_gt = make_criterion()(outputs, targets)
    by_pos = make_criterion(normalize_by="num_positives")(outputs, targets)
    assert set(by_gt) == set(by_pos) and len(by_gt) == 9
    assert all(torch.isfinite(v) for v in by_pos.values())
    matcher = OTAMatcher(num_stages=3, fixed_k=3)
    for t in range(3):
        out = outputs[t]
        indices = matcher(out["pred_logits"], out["pred_boxes"], targets, t)
        num_pos = sum(len(p) for p, _ in indices)
        assert num_pos > 7  # many-to-one: more positives than the 7 GTs
        for term in ("cls", "l1", "giou"):
            key = f"loss_{term}_stage{t + 1}"
            torch.testing.assert_close(by_pos[key] * num_pos, by_gt[key] * 7)
    sum(by_pos.values()).backward()
    assert all(torch.isfinite(o["pred_boxes"].grad).all() for o in outputs)
    with pytest.raises(ValueError):
        make_criterion(normalize_by="num_images")


def test_criterion_two_losses_adds_the_hungarian_loss():
    # "Two losses": the OTA terms are unchanged and every stage gets *_o2o terms equal to the plain
    # Sparse R-CNN (Hungarian, normalised by the number of GTs) loss of that stage.
    outputs, targets = stage_outputs_for()
    one = make_criterion(normalize_by="num_positives")(outputs, targets)
    two = make_criterion(normalize_by="num_positives", one_to_one_matcher=HungarianMatcher())(
        outputs, targets
    )
    plain = SetCriterion(matcher=HungarianMatcher(), num_classes=3)(outputs, targets)
    assert set(two) == set(one) | {k + "_o2o" for k in plain}
    for key in one:
        torch.testing.assert_close(two[key], one[key])
    for key in plain:
        torch.testing.assert_close(two[key + "_o2o"], plain[key])
    assert all(torch.isfinite(v) for v in two.values())


def test_criterion_from_config_two_losses():
    opts = ["MODEL.SPARSE_RCNN.TWO_LOSSES", "True"]
    with pytest.raises(ValueError):
        build_criterion(make_cfg(opts=opts))  # a Hungarian matcher twice makes no sense
    opts += ["MODEL.SPARSE_RCNN.MATCHER_NAME", "OTAMatcher"]
    opts += ["MODEL.SPARSE_RCNN.LOSS_NORMALIZE_BY", "num_positives"]
    criterion = build_criterion(make_cfg(opts=opts))
    assert isinstance(criterion.matcher, OTAMatcher)
    assert isinstance(criterion.one_to_one_matcher, HungarianMatcher)
    assert criterion.normalize_by == "num_positives"
    plain = build_criterion(make_cfg())
    assert plain.one_to_one_matcher is None and plain.normalize_by == "num_gt"


@pytest.mark.parametrize("form", ["scaling", "log"])
def test_sinkhorn_plan_has_no_subnormal_entries(form):
    # Cost gaps of 10 at eps 0.1 give plan entries of 5e-46 and 2.7e-42: below float32's smallest
    # normal number. They become exact zeros; every other entry is the float64 plan's.
    cost = torch.tensor([[0.0, 10.0, 0.0], [10.0, 0.0, 0.0]], dtype=torch.float64)
    supply = torch.tensor([1.0, 2.0], dtype=torch.float64)
    run = _sinkhorn_scaling if form == "scaling" else _sinkhorn_log
    plan = run(cost, supply, None, 0.1, 50)
    tiny = torch.finfo(torch.float32).tiny
    assert plan.dtype == torch.float32
    assert not ((plan != 0) & (plan.abs() < tiny)).any()
    # The same iterations by hand in float64 (u = mu / K v, v = nu / K^T u, from u = v = 1).
    kernel, u, v = torch.exp(-cost / 0.1), torch.ones(2, dtype=torch.float64), torch.ones(3)
    v = v.double()
    for _ in range(50):
        u = supply / (kernel @ v)
        v = 1.0 / (kernel.T @ u)
    reference = u[:, None] * kernel * v[None, :]
    small = reference < tiny
    assert small.sum() == 2 and (plan[small] == 0).all()
    torch.testing.assert_close(plan[~small].double(), reference[~small], rtol=1e-5, atol=0)
