"""Set prediction loss of Sparse R-CNN (paper eq. 1) with deep supervision.

Criteria are registered in ``SPARSE_RCNN_CRITERION_REGISTRY`` and chosen by
``cfg.MODEL.SPARSE_RCNN.CRITERION_NAME``.
"""

import contextlib
from typing import Callable, Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.structures import BitMasks, Instances
from detectron2.utils import comm
from detectron2.utils.registry import Registry
from fvcore.nn import sigmoid_focal_loss
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from .mask_head import dice_loss, mask_targets
from .matcher import SPARSE_RCNN_MATCHER_REGISTRY, MatchIndices, build_matcher

SPARSE_RCNN_CRITERION_REGISTRY = Registry("SPARSE_RCNN_CRITERION")
SPARSE_RCNN_CRITERION_REGISTRY.__doc__ = """
Registry for the losses of Sparse R-CNN, selected by ``cfg.MODEL.SPARSE_RCNN.CRITERION_NAME`` and
built as ``obj(cfg)``.
"""

LOSS_NORMALIZERS = ("num_gt", "num_positives")


# A mask predictor, called by SetCriterion for every supervised stage as
# ``mask_predictor(boxes, queries, stage)``: boxes, B tensors (P_i, 4) of the stage's positives
# (detached xyxy pixels); queries (P, C) their attention features; returns (P, K, M, M) mask logits
# (sparse_rcnn.mask_head.QueryInstMaskHead bound to the image features).
MaskPredictor = Callable[[List[torch.Tensor], torch.Tensor, int], torch.Tensor]


def prepare_targets(gt_instances: List[Instances], device: torch.device) -> List[Dict]:
    """Per image: "labels" (M,) int64, "boxes" (M, 4) xyxy pixels, "image_whwh" (4,) float, and
    "masks" (the ``gt_masks``: PolygonMasks, or BitMasks moved to ``device``) where the instances
    have them.

    ``image_whwh`` is the unpadded (w, h, w, h) of the input image, which the L1 terms divide by.
    """
    targets = []
    for instances in gt_instances:
        h, w = instances.image_size
        target = {
            "labels": instances.gt_classes.to(device=device, dtype=torch.int64),
            "boxes": instances.gt_boxes.tensor.to(device=device, dtype=torch.float32),
            "image_whwh": torch.tensor([w, h, w, h], dtype=torch.float32, device=device),
        }
        if instances.has("gt_masks"):
            masks = instances.gt_masks
            target["masks"] = masks.to(device) if isinstance(masks, BitMasks) else masks
        targets.append(target)
    return targets


def loss_names(stage: int) -> Dict[str, str]:
    """Loss-dict keys of a stage (0-based index -> names with the 1-based stage number)."""
    return {term: f"loss_{term}_stage{stage + 1}" for term in ("cls", "l1", "giou")}


def mask_loss_name(stage: int) -> str:
    """Loss-dict key of a stage's mask loss (QueryInst)."""
    return f"loss_mask_stage{stage + 1}"


@SPARSE_RCNN_CRITERION_REGISTRY.register()
class SetCriterion(nn.Module):
    """Sigmoid focal loss on all predictions, L1 and GIoU on matched pairs, per stage.

    Every term is summed and divided by the number of GT boxes in the batch, averaged over all
    processes and clamped to >= 1, then multiplied by its weight (class 2, L1 5, GIoU 2). The L1
    term compares box corners divided by the image's width and height.

    For many-to-one matchers (Dynamic Sparse R-CNN's ``OTAMatcher``) two options: the normaliser
    may be each stage's number of matched pairs instead (``normalize_by="num_positives"``), and a
    one-to-one matcher may add a second, Hungarian loss per stage (``one_to_one_matcher``, the
    "two losses" of Dynamic Sparse R-CNN table 3). Neither is used by Sparse R-CNN.

    With a mask predictor (QueryInst, ``forward(..., mask_predictor)``) every supervised stage also
    gets a Dice loss on the masks of its matched positives (the matcher's assignment: Hungarian or
    OTA; not the one-to-one loss's), divided by that stage's number of positives averaged over
    processes (clamped to >= 1), times ``mask_weight``.
    """

    @configurable
    def __init__(
        self,
        *,
        matcher: nn.Module,
        num_classes: int,
        class_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        deep_supervision: bool = True,
        normalize_by: str = "num_gt",
        one_to_one_matcher: Optional[nn.Module] = None,
        mask_weight: float = 8.0,
    ):
        """
        Args:
            matcher: called as ``matcher(pred_logits, pred_boxes, targets, stage)``.
            num_classes: K.
            class_weight, l1_weight, giou_weight: loss weights.
            alpha, gamma: focal-loss parameters.
            deep_supervision: loss on every stage (True) or on the last only.
            normalize_by: "num_gt": every stage's terms are divided by the number of GT boxes
                (Sparse R-CNN, official). "num_positives": by the number of matched pairs of that
                stage (with a many-to-one matcher it differs from the number of GT boxes and from
                stage to stage). Either count is averaged over processes and clamped to >= 1.
            one_to_one_matcher: if given (Dynamic Sparse R-CNN's "two losses"), every stage also
                gets the same three terms with this matcher's (one-to-one) assignment, normalised
                by the number of GT boxes, as ``loss_{cls,l1,giou}_stage{t}_o2o``, weight 1.
            mask_weight: weight of the Dice mask loss (QueryInst: 8), used with a mask predictor.
        """
        super().__init__()
        if normalize_by not in LOSS_NORMALIZERS:
            raise ValueError(
                f"MODEL.SPARSE_RCNN.LOSS_NORMALIZE_BY must be one of {LOSS_NORMALIZERS}, "
                f"got {normalize_by!r}"
            )
        self.matcher = matcher
        self.num_classes = num_classes
        self.weights = {"cls": class_weight, "l1": l1_weight, "giou": giou_weight}
        self.alpha = alpha
        self.gamma = gamma
        self.deep_supervision = deep_supervision
        self.normalize_by = normalize_by
        self.one_to_one_matcher = one_to_one_matcher
        self.mask_weight = mask_weight
        # Set by every forward: where the predictions were first non-finite, or None.
        self.non_finite: Optional[str] = None

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.SPARSE_RCNN
        one_to_one_matcher = None
        if c.TWO_LOSSES:
            if c.MATCHER_NAME == "HungarianMatcher":
                raise ValueError(
                    "MODEL.SPARSE_RCNN.TWO_LOSSES adds a one-to-one Hungarian loss to a "
                    "many-to-one matcher's loss; it needs MATCHER_NAME other than HungarianMatcher."
                )
            one_to_one_matcher = SPARSE_RCNN_MATCHER_REGISTRY.get("HungarianMatcher")(cfg)
        return {
            "matcher": build_matcher(cfg),
            "num_classes": c.NUM_CLASSES,
            "class_weight": c.CLASS_WEIGHT,
            "l1_weight": c.L1_WEIGHT,
            "giou_weight": c.GIOU_WEIGHT,
            "alpha": c.ALPHA,
            "gamma": c.GAMMA,
            "deep_supervision": c.DEEP_SUPERVISION,
            "normalize_by": c.LOSS_NORMALIZE_BY,
            "one_to_one_matcher": one_to_one_matcher,
            "mask_weight": c.MASK_WEIGHT,
        }

    @staticmethod
    def average_over_processes(count: float, device: torch.device) -> float:
        """``count`` summed over all processes, divided by the world size, clamped to >= 1."""
        total = torch.as_tensor([float(count)], dtype=torch.float32, device=device)
        world_size = comm.get_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(total)
        return torch.clamp(total / world_size, min=1).item()

    def stage_losses(
        self,
        pred_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        targets: List[Dict],
        indices: List[MatchIndices],
        normalizer: float,
    ) -> Dict[str, torch.Tensor]:
        """Weighted, normalised loss terms of one stage ("cls", "l1", "giou").

        Args:
            pred_logits: (B, N, K); pred_boxes: (B, N, 4) xyxy pixels.
            targets: see :func:`prepare_targets`; indices: the matcher's output.
            normalizer: the loss normaliser (number of GT boxes or of matched pairs, averaged over
                processes, see ``normalize_by``).
        """
        pred_logits, pred_boxes = pred_logits.float(), pred_boxes.float()
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])

        # Focal loss over all predictions and classes; matched predictions are positives.
        one_hot = torch.zeros_like(pred_logits)
        matched_classes = torch.cat([t["labels"][gt] for t, (_, gt) in zip(targets, indices)])
        one_hot[batch_idx, src_idx, matched_classes] = 1.0
        loss_cls = sigmoid_focal_loss(
            pred_logits, one_hot, alpha=self.alpha, gamma=self.gamma, reduction="sum"
        )

        # L1 on corners divided by the image size, and GIoU, on matched pairs.
        src_boxes = pred_boxes[batch_idx, src_idx]
        gt_boxes = torch.cat([t["boxes"][gt] for t, (_, gt) in zip(targets, indices)])
        whwh = torch.cat(
            [t["image_whwh"].expand(len(gt), 4) for t, (_, gt) in zip(targets, indices)]
        )
        loss_l1 = (src_boxes / whwh - gt_boxes / whwh).abs().sum()
        loss_giou = generalized_box_iou_loss(src_boxes, gt_boxes, reduction="sum")
        raw = {"cls": loss_cls, "l1": loss_l1, "giou": loss_giou}
        return {term: self.weights[term] * value / normalizer for term, value in raw.items()}

    def stage_mask_loss(
        self,
        out: Dict[str, torch.Tensor],
        targets: List[Dict],
        indices: List[MatchIndices],
        mask_predictor: MaskPredictor,
        stage: int,
    ) -> torch.Tensor:
        """The weighted, normalised Dice loss of one stage's masks on its matched positives.

        Args:
            out: the stage's "pred_boxes" (B, N, 4) and "attn_features" (B, N, C).
            targets: see :func:`prepare_targets` (with "masks" where an image has objects).
            indices: the matcher's output for this stage.
            mask_predictor: see :data:`MaskPredictor`.
            stage: 0-based stage index.
        """
        device = out["pred_boxes"].device
        # Every process calls this once per stage, so the all-reduces stay in step.
        normalizer = self.average_over_processes(sum(len(src) for src, _ in indices), device)
        # RoIs: the stage's refined boxes of its positives, detached (no gradient to the boxes).
        boxes = [out["pred_boxes"][i, src].detach().float() for i, (src, _) in enumerate(indices)]
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        queries = out["attn_features"][batch_idx, src_idx].float()
        logits = mask_predictor(boxes, queries, stage)  # (P, K, M, M)
        if logits.shape[0] == 0:
            # No positive in the batch: a zero loss that still reaches every mask parameter.
            return logits.float().sum() * 0.0
        mask_size = logits.shape[-1]
        gt = []
        for image, (target, (_, gt_idx), image_boxes) in enumerate(zip(targets, indices, boxes)):
            if len(gt_idx) == 0:
                continue
            if "masks" not in target:
                raise ValueError(
                    f"Image {image} of the batch has objects but no instance masks (gt_masks), "
                    "which the mask head (MODEL.MASK_ON) trains on: use a dataset with "
                    "'segmentation' annotations, or set MODEL.MASK_ON False."
                )
            gt.append(mask_targets(target["masks"][gt_idx], image_boxes, mask_size))
        labels = torch.cat([t["labels"][gt_idx] for t, (_, gt_idx) in zip(targets, indices)])
        # The predicted mask of each positive's GT class, against its cropped GT mask.
        probs = logits.float()[torch.arange(len(labels), device=logits.device), labels].sigmoid()
        loss = dice_loss(probs, torch.cat(gt)).sum()
        return self.mask_weight * loss / normalizer

    def forward(
        self,
        stage_outputs: List[Dict[str, torch.Tensor]],
        targets: List[Dict],
        mask_predictor: Optional[MaskPredictor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            stage_outputs: per stage, "pred_logits" (B, N, K) and "pred_boxes" (B, N, 4); with a
                ``mask_predictor`` also "attn_features" (B, N, C).
            targets: see :func:`prepare_targets`.
            mask_predictor: if given (QueryInst), every supervised stage also gets its mask loss
                (see :data:`MaskPredictor`).

        Returns:
            ``loss_{cls,l1,giou}_stage{t}`` (t = 1 ... T), already weighted; with a
            ``one_to_one_matcher`` also ``loss_{cls,l1,giou}_stage{t}_o2o``; with a
            ``mask_predictor`` also ``loss_mask_stage{t}``.
        """
        device = stage_outputs[-1]["pred_boxes"].device
        # Under AMP (SOLVER.AMP.ENABLED) the head's outputs may be fp16/bf16: matching and losses
        # run in fp32 outside the autocast region (stage_losses and the matchers cast to float;
        # the mask head then runs in fp32 too).
        with _autocast_disabled(device):
            return self._losses(stage_outputs, targets, device, mask_predictor)

    def _losses(self, stage_outputs, targets, device, mask_predictor) -> Dict[str, torch.Tensor]:
        # Non-finite predictions (a diverging run) are reported where they first appear and
        # replaced before matching, so the matcher and the losses never see NaN; the trainer
        # skips the step (sparse_rcnn.trainer.NonFiniteSkippingTrainer reads ``non_finite``).
        self.non_finite = first_non_finite_stage(stage_outputs)
        if self.non_finite is not None:
            stage_outputs = [replace_non_finite(out, targets) for out in stage_outputs]
        normalizer = self.average_over_processes(sum(len(t["labels"]) for t in targets), device)
        num_stages = len(stage_outputs)
        stages = range(num_stages) if self.deep_supervision else [num_stages - 1]
        losses = {}
        for stage in stages:
            out = stage_outputs[stage]
            indices = self.matcher(out["pred_logits"], out["pred_boxes"], targets, stage)
            stage_normalizer = normalizer
            if self.normalize_by == "num_positives":
                # Every process calls this once per stage, so the all-reduces stay in step.
                num_positives = sum(len(src) for src, _ in indices)
                stage_normalizer = self.average_over_processes(num_positives, device)
            terms = self.stage_losses(
                out["pred_logits"], out["pred_boxes"], targets, indices, stage_normalizer
            )
            names = loss_names(stage)
            losses.update({names[term]: value for term, value in terms.items()})
            if mask_predictor is not None:
                losses[mask_loss_name(stage)] = self.stage_mask_loss(
                    out, targets, indices, mask_predictor, stage
                )
            if self.one_to_one_matcher is not None:
                indices = self.one_to_one_matcher(
                    out["pred_logits"], out["pred_boxes"], targets, stage
                )
                terms = self.stage_losses(
                    out["pred_logits"], out["pred_boxes"], targets, indices, normalizer
                )
                losses.update({names[term] + "_o2o": value for term, value in terms.items()})
        return losses


def first_non_finite_stage(stage_outputs: List[Dict[str, torch.Tensor]]) -> Optional[str]:
    """Where non-finite values first appear among the stages' predictions, e.g.
    "stage 3 pred_boxes (12 of 80 values)", or None if all are finite."""
    keys = ("pred_logits", "pred_boxes")
    all_finite = torch.stack([torch.isfinite(o[k]).all() for o in stage_outputs for k in keys])
    if bool(all_finite.all()):  # one device sync per step
        return None
    for stage, out in enumerate(stage_outputs):
        bad = []
        for key in keys:
            finite = torch.isfinite(out[key])
            if not bool(finite.all()):
                bad.append(f"{key} ({int((~finite).sum())} of {finite.numel()} values)")
        if bad:
            return f"stage {stage + 1} " + " and ".join(bad)
    return None


def replace_non_finite(out: Dict[str, torch.Tensor], targets: List[Dict]) -> Dict:
    """The stage's predictions with non-finite logits set to 0 and every box that has a
    non-finite coordinate set to the whole image (gradients reach only the finite values)."""
    logits, boxes = out["pred_logits"], out["pred_boxes"]
    whole_image = torch.stack([t["image_whwh"] for t in targets]).to(boxes)  # (B, 4)
    whole_image = torch.cat([torch.zeros_like(whole_image[:, :2]), whole_image[:, 2:]], dim=1)
    box_ok = torch.isfinite(boxes).all(dim=-1, keepdim=True)
    return {
        **out,
        "pred_logits": torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits)),
        "pred_boxes": torch.where(box_ok, boxes, whole_image[:, None, :].expand_as(boxes)),
    }


def _autocast_disabled(device: torch.device):
    """A context that leaves any autocast region on ``device`` (no-op where autocast is n/a)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def build_criterion(cfg) -> nn.Module:
    return SPARSE_RCNN_CRITERION_REGISTRY.get(cfg.MODEL.SPARSE_RCNN.CRITERION_NAME)(cfg)
