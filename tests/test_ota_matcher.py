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
    cap_units,
    dynamic_k_estimate,
    ensure_every_gt_matched,
    focal_background_cost,
    ota_units,
    sinkhorn,
    unit_increase_offset,
)
from sparse_rcnn.ota import _sinkhorn_log, _sinkhorn_scaling


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
        sinkhorn_eps=0.05,
        sinkhorn_iters=300,
    )
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
    # k* = k - 0.5 (T - t), t = 1 ... 6: the half units are subtracted from the real-valued k and
    # rounded down once (then >= 1).
    assert [unit_increase_offset(s, 6) for s in range(6)] == [2.5, 2.0, 1.5, 1.0, 0.5, 0.0]

    def per_stage(k):
        k = torch.tensor([k])
        return [int(ota_units(k, 300, offset=unit_increase_offset(s, 6))) for s in range(6)]

    assert per_stage(4.6) == [2, 2, 3, 3, 4, 4]  # dynamic k, OTA's k = 4 at the last stage
    assert per_stage(6.0) == [3, 4, 4, 5, 5, 6]
    assert per_stage(3.0) == [1, 1, 1, 2, 2, 3]  # fixed k = 3
    assert per_stage(2.0) == [1, 1, 1, 1, 1, 2]
    assert per_stage(1.0) == [1] * 6
    with pytest.raises(ValueError):
        unit_increase_offset(6, 6)
    # The matcher applies it by stage index; fixed k = 3.
    matcher = OTAMatcher(fixed_k=3, num_stages=6)
    pred, gt = torch.tensor([[0.0, 0, 10, 10]] * 20), torch.tensor([[0.0, 0, 10, 10]])
    assert [int(matcher.units(pred, gt, s)) for s in range(6)] == [1, 1, 1, 2, 2, 3]
    matcher = OTAMatcher(fixed_k=3, unit_increasing=False)
    assert [int(matcher.units(pred, gt, s)) for s in range(6)] == [3] * 6


def test_cap_units_hand_worked():
    # n = 10 -> at most 8 positives.
    assert ota_units(torch.tensor([5.0, 3.0]), 10).tolist() == [5, 3]  # 8: unchanged
    assert ota_units(torch.tensor([4.0, 4.0, 4.0]), 10).tolist() == [2, 2, 2]  # s in [1/2, 3/4)
    assert ota_units(torch.tensor([6.0, 5.0]), 10).tolist() == [4, 4]  # s = 4/5
    assert ota_units(torch.tensor([3.0] * 9), 10).tolist() == [1] * 9  # m >= 8: one unit each
    # The clamp at 1 counts: with k = [1] * 7 + [20] and 16 allowed, s = 16 / 27 would give 18.
    assert cap_units(torch.tensor([1] * 7 + [20]), 16).tolist() == [1] * 7 + [9]
    # n = 300 (the paper's proposals): budget 240.
    units = ota_units(torch.full((40,), 7.0), 300)
    assert units.tolist() == [6] * 40 and int(units.sum()) <= 240


@pytest.mark.parametrize("seed", range(20))
def test_cap_units_uses_the_largest_common_factor(seed):
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(1, 8, (1,), generator=g))
    units = torch.randint(1, 9, (m,), generator=g)
    budget = int(torch.randint(m, int(units.sum()) + 2, (1,), generator=g))
    capped = cap_units(units, budget)
    assert int(capped.sum()) <= budget and (capped >= 1).all() and (capped <= units).all()

    def scaled(s):
        return [max(1, int(Fraction(int(k)) * s)) for k in units]

    # Same as some common factor, and no factor in (0, 1] fits the budget with more units.
    factors = [Fraction(j, int(k)) for k in units for j in range(1, int(k) + 1)]
    fitting = [f for f in factors if sum(scaled(f)) <= budget]
    assert capped.tolist() == (scaled(max(fitting)) if fitting else [1] * m)


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
    # Exactly sum(k*) positives and k*_i per GT for a small eps; approximately for the default.
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
                assert int((counts - units).abs().max()) <= tolerance
                assert abs(len(pred_idx) - int(units.sum())) <= tolerance * m
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
