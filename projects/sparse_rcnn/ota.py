"""Dynamic label assignment of Dynamic Sparse R-CNN (DLA, Hong et al. 2022, section 3.2).

:class:`OTAMatcher` is the many-to-one assignment by optimal transport (OTA, Ge et al. 2021):
every GT supplies k* units (dynamic k, the unit increasing strategy of eq. 2, the 80% cap), the
background supplies the rest, every prediction demands one; :func:`sinkhorn` solves the entropic
transport problem, and the plan is read as OTA reads it. With more GTs than predictions it falls
back to the :class:`~sparse_rcnn.matcher.HungarianMatcher`. Registered in
``SPARSE_RCNN_MATCHER_REGISTRY`` as ``"OTAMatcher"``.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.structures import Boxes, pairwise_iou
from torch import nn

from .matcher import SPARSE_RCNN_MATCHER_REGISTRY, HungarianMatcher, MatchIndices

OTA_BACKGROUND_COSTS = ("full_focal", "neg_focal")


def focal_background_cost(
    logits: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss of predicting "no object": sum over classes of FL(p_k, negative).

    Args:
        logits: (N, K) class logits.

    Returns:
        (N,) sum_k (1 - alpha) p_k^gamma (-log(1 - p_k)), with the same epsilon as
        :func:`~sparse_rcnn.matcher.focal_class_cost`.
    """
    prob = logits.float().sigmoid()
    return ((1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())).sum(dim=-1)


# Why a hand-written logsumexp: only the log form of Sinkhorn uses it, and that form runs only where
# the scaling form cannot, i.e. where a supplier's costs span more than 500 eps. Then almost all
# of the log-kernel's entries lie far below -87.3, where float32 exp() underflows (the smallest
# normal float32 is exp(-87.34)), and the CPU's vectorised exp is 10-25x slower on such arguments;
# torch.set_flush_denormal(True) does not help (docs/benchmarks.md, "OTA's logsumexp"). Sinkhorn
# calls it 100 times per stage (50 iterations), so it stays (a test checks it is bit-identical to
# torch.logsumexp).
_EXP_FLOOR = -87.3
_NEGLIGIBLE = 1e-37


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.logsumexp(x, dim)``, computed as torch computes it (subtract the max where it is
    finite, exp, sum, log, add the max back), except that exp terms below 1e-37 are replaced by 0:
    their arguments are clamped to -87.3 first, so that exp() never produces a subnormal number.

    The result is the same, bit for bit: a row with a finite max contains the term exp(0) = 1, so
    its float32 sum is at least 1, and terms below 1e-37 (at most a few thousand of them) are
    absorbed by any partial sum they meet that is larger than about 1e-27, hence never reach it
    (half a float32 unit of 1 is 6e-8). Rows of -inf still give -inf; +inf and NaN propagate.
    """
    # torch: maxes[maxes.abs() == inf] = 0 (here in one op; NaN stays NaN).
    maxes = torch.amax(x, dim=dim, keepdim=True).nan_to_num_(nan=math.nan, posinf=0.0, neginf=0.0)
    terms = torch.threshold_((x - maxes).clamp_(min=_EXP_FLOOR).exp_(), _NEGLIGIBLE, 0.0)
    return terms.sum(dim=dim).log_().add_(maxes.squeeze(dim))


def _float32_plan(plan: torch.Tensor) -> torch.Tensor:
    """The plan in float32, its entries below float32's smallest normal number (1.2e-38) set to
    0: a trained model's plans hold such entries (hundreds per step of the Dynamic quick model,
    docs/benchmarks.md), and subnormal floats make every CPU operation that reads them slow. No
    assignment can depend on them (the plan is read by a row-rescaled argmax; an entry that small is
    28 orders of magnitude below the supply of a unit)."""
    return torch.threshold(plan, torch.finfo(torch.float32).tiny, 0.0).float()


def sinkhorn(
    cost: torch.Tensor,
    supply: torch.Tensor,
    demand: Optional[torch.Tensor] = None,
    *,
    eps: float = 0.1,
    num_iters: int = 50,
) -> torch.Tensor:
    """Entropy-regularised optimal transport plan by Sinkhorn-Knopp iterations.

    Solves min_pi sum_ij C_ij pi_ij - eps H(pi) s.t. sum_j pi_ij = supply_i, sum_i pi_ij = demand_j
    (paper eq. 1 with OTA's entropic regularisation). Suppliers with zero supply get an all-zero
    row. The last update is the column one: the column sums are exact, the row sums converge with
    the number of iterations. Supplies and demands must have equal totals.

    Two equivalent ways compute it: the scaling form (u = mu / K v, v = nu / K^T u with the kernel
    K = exp(-C / eps), in float64: two small matrix products per iteration, about 2x faster on a
    CPU than the log form's element-wise exp and log, docs/benchmarks.md) whenever its kernel and
    scalings are representable, and otherwise (very small ``eps`` or extreme costs) the log form,
    whose logsumexp updates cannot overflow. Both start from u = v = 1 and do the same updates, so
    they give the same plan up to rounding.

    Args:
        cost: (..., S, N) transport cost from each supplier to each demander.
        supply: (..., S) non-negative supplies.
        demand: (..., N) positive demands; ones (each demander wants one unit) if None.
        eps: entropic regularisation (OTA: 0.1).
        num_iters: Sinkhorn iterations (OTA: 50).

    Returns:
        (..., S, N) float32 transport plan pi.
    """
    plan = _sinkhorn_scaling(cost, supply, demand, eps, num_iters)
    if plan is None:
        plan = _sinkhorn_log(cost, supply, demand, eps, num_iters)
    return plan


# The scaling form is used when every kernel entry of a supplier, relative to its largest, is at
# least exp(-_MAX_KERNEL_RANGE): far from float64's exp underflow (exp(-708)).
_MAX_KERNEL_RANGE = 500.0


def _sinkhorn_scaling(
    cost: torch.Tensor,
    supply: torch.Tensor,
    demand: Optional[torch.Tensor],
    eps: float,
    num_iters: int,
) -> Optional[torch.Tensor]:
    """:func:`sinkhorn` in the scaling form, in float64; None where it is not representable."""
    cost = cost.double()
    # Subtracting a constant from a supplier's costs scales its u only: the plan is unchanged.
    # Afterwards every row of the kernel has a largest entry of 1.
    shifted = cost - cost.amin(dim=-1, keepdim=True)
    if not torch.isfinite(shifted).all() or float(shifted.max()) > _MAX_KERNEL_RANGE * eps:
        return None
    kernel = torch.exp(shifted / -eps)  # (..., S, N)
    kernel_t = kernel.transpose(-1, -2)
    mu = supply.double().unsqueeze(-1)  # (..., S, 1)
    if demand is None:
        nu = torch.ones(cost.shape[:-2] + (cost.shape[-1], 1), dtype=cost.dtype, device=cost.device)
    else:
        nu = demand.double().unsqueeze(-1)  # (..., N, 1)
    v = torch.ones_like(nu)
    for _ in range(num_iters):
        u = mu / torch.matmul(kernel, v)
        v = nu / torch.matmul(kernel_t, u)
    # Underflow or overflow of a scaling would show as 0 (where the marginal is positive), inf
    # or NaN: then the log form computes the plan instead.
    if not (
        torch.isfinite(u).all()
        and torch.isfinite(v).all()
        and bool(((u > 0) | (mu == 0)).all())
        and bool((v > 0).all())
    ):
        return None
    return _float32_plan(u * kernel * v.transpose(-1, -2))


def _sinkhorn_log(
    cost: torch.Tensor,
    supply: torch.Tensor,
    demand: Optional[torch.Tensor],
    eps: float,
    num_iters: int,
) -> torch.Tensor:
    """:func:`sinkhorn` in the log form (logsumexp updates of log u and log v), in float32."""
    cost = cost.float()
    log_kernel = -cost / eps
    log_mu = supply.float().log()  # -inf for suppliers with nothing to give
    if demand is None:
        log_nu = torch.zeros(cost.shape[:-2] + cost.shape[-1:], device=cost.device)
    else:
        log_nu = demand.float().log()
    log_u = torch.zeros_like(log_mu)
    log_v = torch.zeros_like(log_nu)
    for _ in range(num_iters):
        # u_i = mu_i / sum_j K_ij v_j and v_j = nu_j / sum_i K_ij u_i, in log space.
        log_u = log_mu - _logsumexp(log_kernel + log_v.unsqueeze(-2), dim=-1)
        log_v = log_nu - _logsumexp(log_kernel + log_u.unsqueeze(-1), dim=-2)
    return _float32_plan(torch.exp(log_u.unsqueeze(-1) + log_kernel + log_v.unsqueeze(-2)))


def dynamic_k_estimate(ious: torch.Tensor, q: int) -> torch.Tensor:
    """The sum OTA's dynamic k is made from: per GT, the sum of its q largest IoUs.

    Args:
        ious: (M, N) IoU of every GT with every prediction.
        q: number of IoUs summed (min(q, N) if there are fewer predictions).

    Returns:
        (M,) float, not yet converted to an integer (see :func:`ota_units`).
    """
    q = min(q, ious.shape[1])
    if q == 0:
        return ious.new_zeros(ious.shape[0])
    return ious.topk(q, dim=1).values.sum(dim=1)


def unit_increase_offset(stage: int, num_stages: int, unit_step: float = 0.5) -> float:
    """What eq. 2 subtracts at a stage: unit_step * (T - t) with t = stage + 1 (1-based stage)."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage index {stage} is outside 0 ... {num_stages - 1}")
    return unit_step * (num_stages - (stage + 1))


def cap_units(units: torch.Tensor, budget: float) -> torch.Tensor:
    """The 80% cap: scale all units by one common factor so that their sum is at most ``budget``.

    The paper: if m x k > 80% N_p, "we will reduce k by a same scaling factor for each GT to ensure
    at least 20% negative assignments". The units are supplies of the transport problem, which may
    be fractional, so this is a plain rescale, k_i' = k_i x budget / sum_j k_j, with no rounding
    and no lower bound: with more GTs than the budget every GT supplies less than one unit (the
    matcher still gives every GT a prediction, see :func:`ensure_every_gt_matched`).

    Args:
        units: (M,) float units, each > 0.
        budget: the largest allowed total, 0.8 N in the paper.

    Returns:
        (M,) float units, proportional to the input, summing to min(sum(units), budget).
    """
    total = float(units.sum())
    if total <= budget:
        return units
    return units * (budget / total)


def ota_units(
    k_estimate: torch.Tensor,
    num_preds: int,
    *,
    offset: float = 0.0,
    max_positive_fraction: float = 0.8,
) -> torch.Tensor:
    """Units (supplies) of the GTs in the paper's order: integer k, eq. 2, then the 80% cap.

    1. k = max(1, int(k_estimate)): the paper sums the top-q IoUs "and converts it to an integer",
       OTA's code as ``clamp(topk_ious.sum(1).int(), min=1)`` (a fixed k is already an integer).
    2. k* = max(1, k - offset) with offset = 0.5 (T - t) (eq. 2; 0 without the unit increasing
       strategy). k* is not rounded: Sinkhorn takes fractional supplies, so k = 4 at T - t = 1 is
       a supply of 3.5 (the plan then gives the GT 3 or 4 predictions, as its transport decides).
       The paper does not say what eq. 2 gives for k <= 0.5 (T - t) (k <= 3 at the first of six
       stages); we keep one unit, as OTA keeps k >= 1, so every GT still supplies one prediction.
    3. The cap (:func:`cap_units`) with budget fraction x N, on the units actually used.

    Args:
        k_estimate: (M,) float, the sum of top-q IoUs (:func:`dynamic_k_estimate`) or a fixed k.
        num_preds: N.
        offset: value subtracted by the unit increasing strategy.
        max_positive_fraction: at most this fraction of N positive assignments (paper: 0.8).

    Returns:
        (M,) float64 units.
    """
    k = torch.floor(k_estimate.double()).clamp(min=1)  # int() of a non-negative sum is its floor
    units = (k - offset).clamp(min=1)
    return cap_units(units, max_positive_fraction * num_preds)


def assign_by_plan(plan: torch.Tensor) -> torch.Tensor:
    """OTA's rounding of a transport plan: each supplier's row is divided by that row's maximum,
    then every prediction goes to the supplier with the largest value.

    OTA's reference (``pi = pi / pi.max(dim=1)``, then ``pi.max(dim=0)``, background row included)
    does this so that a GT whose units are spread thinly over many predictions still wins the
    predictions it transports most to. A row of zeros (a supplier with no supply) stays zero.

    Args:
        plan: (S, N) transport plan, suppliers (GTs, then the background) by predictions.

    Returns:
        (N,) int64 supplier index of every prediction.
    """
    row_max = plan.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(plan.dtype).tiny)
    return (plan / row_max).argmax(dim=-2)


def ensure_every_gt_matched(owner: torch.Tensor, plan: torch.Tensor, num_gt: int) -> torch.Tensor:
    """Give every GT without a prediction the prediction it transports most to, among those that
    can be spared (background ones, or ones of a GT that keeps at least one).

    Rounding an entropic plan (:func:`assign_by_plan`) may leave a GT with no prediction; with
    N >= M there is always a prediction to spare. The loop runs over the unmatched GTs only
    (usually none).

    Args:
        owner: (N,) int64 supplier of every prediction (``num_gt`` = background).
        plan: (S, N) transport plan, rows 0 ... num_gt - 1 are the GTs.
        num_gt: M.

    Returns:
        (N,) int64 owners, every GT owning at least one prediction.
    """
    counts = torch.bincount(owner, minlength=plan.shape[0])[:num_gt]
    for gt in torch.nonzero(counts == 0).flatten().tolist():
        spare = (owner >= num_gt) | (counts[owner.clamp(max=num_gt - 1)] >= 2)
        scores = torch.where(spare, plan[gt], torch.full_like(plan[gt], -1.0))
        pred = int(scores.argmax())
        if owner[pred] < num_gt:
            counts[owner[pred]] -= 1
        owner[pred] = gt
        counts[gt] = 1
    return owner


@SPARSE_RCNN_MATCHER_REGISTRY.register()
class OTAMatcher(nn.Module):
    """Many-to-one label assignment by optimal transport (Dynamic Sparse R-CNN's DLA, eq. 1-2).

    Each of the M GTs supplies k*_i units and the background N - sum(k*_i); each of the N
    predictions demands one. Positive cost = class cost + alpha x regression cost, the matching
    cost of a :class:`~sparse_rcnn.matcher.HungarianMatcher` whose L1 and GIoU weights are scaled
    by alpha; the background cost is the focal loss of "no object" (see ``background_cost``). The
    entropic plan is found by :func:`sinkhorn` (batched over the images) and read as OTA reads it
    (:func:`assign_by_plan`); background means unmatched.

    Units (:func:`ota_units`), in the paper's order: k = max(1, int(sum of the top-q IoUs of GT i))
    (OTA's dynamic k) or a fixed k; the unit increasing strategy gives k* = max(1, k - 0.5 (T - t))
    at stage t, fractional; at most 80% of the predictions are positive (:func:`cap_units`, a
    plain rescale).

    What holds for every image: each prediction has at most one GT; with N >= M every GT has at
    least one prediction (:func:`ensure_every_gt_matched` repairs the argmax rounding when needed);
    GT i gets about k*_i predictions (floor or ceil of it for a small ``eps`` and enough
    iterations). With M > N the optimal transport has no feasible plan with a unit per GT, so
    the matcher falls back to the one-to-one Hungarian matcher on the positive cost: every
    prediction is positive, N GTs are matched (the background gets 0).
    """

    @configurable
    def __init__(
        self,
        *,
        num_stages: int = 6,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        reg_weight: float = 1.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        top_q: int = 8,
        fixed_k: int = 0,
        unit_increasing: bool = True,
        unit_step: float = 0.5,
        max_positive_fraction: float = 0.8,
        background_cost: str = "full_focal",
        sinkhorn_eps: float = 0.1,
        sinkhorn_iters: int = 50,
    ):
        """
        Args:
            num_stages: T, the number of iterative stages (for the unit increasing strategy).
            cost_class, cost_bbox, cost_giou: weights of the focal class, L1 and GIoU terms (the
                Hungarian matcher's).
            reg_weight: alpha of eq. 1, multiplies the regression terms (L1 and GIoU). The paper
                gives no value; 1.0 makes the positive cost the Hungarian matching cost.
            alpha, gamma: focal parameters.
            top_q: q, the number of IoUs summed per GT by dynamic k (paper: 8).
            fixed_k: if > 0, every GT supplies this many units instead of the dynamic k (paper
                table 3, "fixed k").
            unit_increasing: k* = max(1, k - ``unit_step`` x (T - t)) at stage t (eq. 2), on the
                integer k, not rounded (:func:`ota_units`).
            unit_step: the 0.5 of eq. 2.
            max_positive_fraction: at most this fraction of the predictions is positive (0.8);
                larger units are scaled down by one common factor (:func:`cap_units`).
            background_cost: "full_focal": positive cost = full focal loss of the one-hot GT
                class over all K outputs + alpha x reg, background cost = full focal loss of the
                all-zero target; both share sum_k FL(p_k, negative), which cancels (every column
                of the plan sums to one), so it is computed as the Hungarian cost vs 0.
                "neg_focal": the Hungarian cost as positive cost vs the focal loss of "no object"
                (:func:`focal_background_cost`) as background cost, a literal reading of eq. 1
                that counts the negative terms of the GT class twice.
            sinkhorn_eps, sinkhorn_iters: entropic regularisation and iterations (OTA: 0.1, 50).
        """
        super().__init__()
        if background_cost not in OTA_BACKGROUND_COSTS:
            raise ValueError(
                f"MODEL.SPARSE_RCNN.OTA.BG_COST must be one of {OTA_BACKGROUND_COSTS}, "
                f"got {background_cost!r}"
            )
        if not 0.0 < max_positive_fraction <= 1.0:
            raise ValueError(
                "MODEL.SPARSE_RCNN.OTA.MAX_POSITIVE_FRACTION must be in (0, 1], got "
                f"{max_positive_fraction}"
            )
        if num_stages < 1 or top_q < 1 or fixed_k < 0 or sinkhorn_eps <= 0 or sinkhorn_iters < 1:
            raise ValueError(
                "OTAMatcher needs num_stages >= 1, top_q >= 1, fixed_k >= 0, sinkhorn_eps > 0 and "
                f"sinkhorn_iters >= 1; got {num_stages}, {top_q}, {fixed_k}, {sinkhorn_eps}, "
                f"{sinkhorn_iters}"
            )
        # Positive cost = w_cls x class cost + alpha x (w_L1 x L1 - w_giou x GIoU)   (eq. 1): the
        # matching cost of a Hungarian matcher with the regression weights scaled by alpha, which
        # also gives the one-to-one fallback for images with more GTs than predictions.
        self.hungarian = HungarianMatcher(
            cost_class=cost_class,
            cost_bbox=reg_weight * cost_bbox,
            cost_giou=reg_weight * cost_giou,
            alpha=alpha,
            gamma=gamma,
        )
        self.cost_weights = self.hungarian.cost_weights
        self.cost_class = cost_class
        self.alpha = alpha
        self.gamma = gamma
        self.num_stages = num_stages
        self.top_q = top_q
        self.fixed_k = fixed_k
        self.unit_increasing = unit_increasing
        self.unit_step = unit_step
        self.max_positive_fraction = max_positive_fraction
        self.background_cost = background_cost
        self.sinkhorn_eps = sinkhorn_eps
        self.sinkhorn_iters = sinkhorn_iters

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.SPARSE_RCNN
        return {
            "num_stages": c.NUM_STAGES,
            "cost_class": c.CLASS_WEIGHT,
            "cost_bbox": c.L1_WEIGHT,
            "cost_giou": c.GIOU_WEIGHT,
            "reg_weight": c.OTA.REG_WEIGHT,
            "alpha": c.ALPHA,
            "gamma": c.GAMMA,
            "top_q": c.OTA.TOP_Q,
            "fixed_k": c.OTA.FIXED_K,
            "unit_increasing": c.OTA.UNIT_INCREASING,
            "unit_step": c.OTA.UNIT_STEP,
            "max_positive_fraction": c.OTA.MAX_POSITIVE_FRACTION,
            "background_cost": c.OTA.BG_COST,
            "sinkhorn_eps": c.OTA.SINKHORN_EPS,
            "sinkhorn_iters": c.OTA.SINKHORN_ITERS,
        }

    def units(self, pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, stage: int) -> torch.Tensor:
        """(M,) float64 units k* of the GTs of one image at a 0-based ``stage`` (:func:`ota_units`).

        Args:
            pred_boxes: (N, 4) xyxy; gt_boxes: (M, 4) xyxy.
        """
        if self.fixed_k > 0:
            estimate = gt_boxes.new_full((len(gt_boxes),), float(self.fixed_k))
        else:
            ious = pairwise_iou(Boxes(gt_boxes.float()), Boxes(pred_boxes.float()))  # (M, N)
            estimate = dynamic_k_estimate(ious, self.top_q)
        offset = 0.0
        if self.unit_increasing:
            offset = unit_increase_offset(stage, self.num_stages, self.unit_step)
        return ota_units(
            estimate,
            len(pred_boxes),
            offset=offset,
            max_positive_fraction=self.max_positive_fraction,
        )

    def costs(
        self, logits: torch.Tensor, boxes: torch.Tensor, target: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Positive cost (M, N) and background cost (N,) of one image (eq. 1)."""
        positive, _ = self.hungarian.cost_matrix(logits, boxes, target)
        if self.background_cost == "full_focal":
            background = positive.new_zeros(len(logits))
        else:
            background = self.cost_class * focal_background_cost(logits, self.alpha, self.gamma)
        return positive.t(), background

    @torch.no_grad()
    def forward(
        self,
        pred_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        targets: List[Dict[str, torch.Tensor]],
        stage: int = 0,
    ) -> List[MatchIndices]:
        """
        Args:
            pred_logits: (B, N, K).
            pred_boxes: (B, N, 4) xyxy pixels.
            targets: per image, see :func:`~sparse_rcnn.matcher.pairwise_match_cost`.
            stage: 0-based index of the stage (the unit increasing strategy uses t = stage + 1).

        Returns:
            Per image (prediction indices, GT indices), int64 on the predictions' device, sorted by
            prediction index; a GT index may repeat, a prediction index may not.
        """
        device = pred_logits.device
        num_images, num_preds = pred_logits.shape[:2]
        empty = torch.empty(0, dtype=torch.int64, device=device)
        indices: List[Optional[MatchIndices]] = [None] * num_images
        ot_images, ot_costs, ot_supplies = [], [], []
        for b, (logits, boxes, target) in enumerate(zip(pred_logits, pred_boxes, targets)):
            num_gt = len(target["labels"])
            if num_gt == 0 or num_preds == 0:
                indices[b] = (empty, empty)
                continue
            if num_gt > num_preds:
                # No plan gives each GT a unit: the one-to-one Hungarian matching on the positive
                # cost (every prediction positive, no background).
                indices[b] = self.hungarian(logits[None], boxes[None], [target])[0]
                continue
            positive, background = self.costs(logits, boxes, target)
            if not (torch.isfinite(positive).all() and torch.isfinite(background).all()):
                raise FloatingPointError(
                    "OTAMatcher: the matching cost has NaN or Inf entries; the predictions have "
                    "diverged (try a lower SOLVER.BASE_LR or check the input boxes)."
                )
            units = self.units(boxes, target["boxes"], stage).to(positive.dtype)
            supply = torch.cat([units, units.new_tensor([num_preds]) - units.sum().reshape(1)])
            ot_images.append(b)
            ot_costs.append(torch.cat([positive, background[None]], dim=0))  # (M + 1, N)
            ot_supplies.append(supply.clamp(min=0))
        if ot_images:
            # Batch the images: pad every image's suppliers to the largest M, the background row
            # last; padded rows supply nothing, so they get an all-zero row of the plan.
            max_gt = max(len(c) - 1 for c in ot_costs)
            cost = torch.zeros(len(ot_images), max_gt + 1, num_preds, device=device)
            supply = torch.zeros(len(ot_images), max_gt + 1, device=device)
            for i, (c, s) in enumerate(zip(ot_costs, ot_supplies)):
                num_gt = len(c) - 1
                cost[i, :num_gt], cost[i, -1] = c[:num_gt], c[-1]
                supply[i, :num_gt], supply[i, -1] = s[:num_gt], s[-1]
            plans = sinkhorn(cost, supply, eps=self.sinkhorn_eps, num_iters=self.sinkhorn_iters)
            for i, b in enumerate(ot_images):
                num_gt = len(ot_costs[i]) - 1
                plan = torch.cat([plans[i, :num_gt], plans[i, -1:]], dim=0)  # (M + 1, N)
                owner = assign_by_plan(plan)
                owner = ensure_every_gt_matched(owner, plan, num_gt)
                pred_idx = torch.nonzero(owner < num_gt).flatten()
                indices[b] = (pred_idx, owner[pred_idx])
        return indices
