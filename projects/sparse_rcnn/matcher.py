"""Label assignment between predictions and ground truth: the Hungarian matcher and the registry.

:class:`HungarianMatcher` is Sparse R-CNN's one-to-one bipartite matching (paper eq. 1 as matching
cost); :func:`focal_class_cost` and :func:`pairwise_match_cost` are the costs it shares with
Dynamic Sparse R-CNN's many-to-one :class:`~sparse_rcnn.ota.OTAMatcher` (``ota.py``: optimal
transport with dynamic k and the unit increasing strategy, Hong et al. 2022, section 3.2).
Matchers are registered in ``SPARSE_RCNN_MATCHER_REGISTRY`` and chosen by
``cfg.MODEL.SPARSE_RCNN.MATCHER_NAME``. A matcher is called once per stage as
``matcher(pred_logits, pred_boxes, targets, stage)`` and returns, per image, a pair of int64 index
tensors (prediction indices, GT indices).
"""

from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou

SPARSE_RCNN_MATCHER_REGISTRY = Registry("SPARSE_RCNN_MATCHER")
SPARSE_RCNN_MATCHER_REGISTRY.__doc__ = """
Registry for the label assigners of Sparse R-CNN, selected by ``cfg.MODEL.SPARSE_RCNN.MATCHER_NAME``
and built as ``obj(cfg)``.
"""

MatchIndices = Tuple[torch.Tensor, torch.Tensor]


def focal_class_cost(
    logits: torch.Tensor, gt_classes: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal-loss-style classification cost (the official matcher's).

    cost = FL(p, positive) - FL(p, negative) for the probability p of each GT's class.

    Args:
        logits: (N, K) class logits of the predictions.
        gt_classes: (M,) int64 classes of the GT boxes.

    Returns:
        (N, M) cost.
    """
    prob = logits.sigmoid()[:, gt_classes]
    neg_cost = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
    pos_cost = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    return pos_cost - neg_cost


def pairwise_match_cost(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    target: Dict[str, torch.Tensor],
    *,
    cost_class: float,
    cost_bbox: float,
    cost_giou: float,
    alpha: float,
    gamma: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The matching cost between every prediction and every GT box of one image.

    Args:
        logits: (N, K) class logits.
        boxes: (N, 4) predicted xyxy pixel boxes.
        target: "labels" (M,), "boxes" (M, 4) xyxy pixels, "image_whwh" (4,) unpadded (w, h, w, h).
        cost_class, cost_bbox, cost_giou: weights of the three terms.
        alpha, gamma: focal parameters of the class cost.

    Returns:
        cost (N, M): w_L1 * L1 + w_cls * focal class cost - w_giou * GIoU, where L1 is taken on box
        corners divided by the image's width and height (as the official code; the paper's text
        says centre and size); and the GIoU matrix (N, M), which OTA reuses.
    """
    logits, boxes = logits.float(), boxes.float()
    gt_boxes = target["boxes"].float()
    whwh = target["image_whwh"]
    class_cost = focal_class_cost(logits, target["labels"], alpha, gamma)
    l1_cost = torch.cdist(boxes / whwh, gt_boxes / whwh, p=1)
    giou = generalized_box_iou(boxes, gt_boxes)
    cost = cost_bbox * l1_cost + cost_class * class_cost + cost_giou * -giou
    return cost, giou


@SPARSE_RCNN_MATCHER_REGISTRY.register()
class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising the total matching cost (scipy's Hungarian solver).

    Each image's cost matrix is computed on its own (the official code builds a batch-squared
    matrix and keeps only its diagonal blocks). With more GT boxes than predictions, every
    prediction is matched and the remaining GT boxes stay unmatched.
    """

    @configurable
    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        self.cost_weights = dict(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou)
        self.alpha = alpha
        self.gamma = gamma

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.SPARSE_RCNN
        return {
            "cost_class": c.CLASS_WEIGHT,
            "cost_bbox": c.L1_WEIGHT,
            "cost_giou": c.GIOU_WEIGHT,
            "alpha": c.ALPHA,
            "gamma": c.GAMMA,
        }

    def cost_matrix(
        self, logits: torch.Tensor, boxes: torch.Tensor, target: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, M) matching cost and (N, M) GIoU of one image; see :func:`pairwise_match_cost`."""
        return pairwise_match_cost(
            logits, boxes, target, alpha=self.alpha, gamma=self.gamma, **self.cost_weights
        )

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
            targets: per image, see :func:`pairwise_match_cost`.
            stage: index of the stage (unused by the Hungarian matcher).

        Returns:
            Per image (prediction indices, GT indices), int64 on the predictions' device.
        """
        indices = []
        for logits, boxes, target in zip(pred_logits, pred_boxes, targets):
            if len(target["labels"]) == 0:
                empty = torch.empty(0, dtype=torch.int64, device=logits.device)
                indices.append((empty, empty))
                continue
            cost, _ = self.cost_matrix(logits, boxes, target)
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    "HungarianMatcher: the matching cost has NaN or Inf entries; the predictions "
                    "have diverged (try a lower SOLVER.BASE_LR or check the input boxes)."
                )
            pred_idx, gt_idx = linear_sum_assignment(cost.cpu().numpy())
            indices.append(
                (
                    torch.as_tensor(pred_idx, dtype=torch.int64, device=logits.device),
                    torch.as_tensor(gt_idx, dtype=torch.int64, device=logits.device),
                )
            )
        return indices


def build_matcher(cfg) -> nn.Module:
    """The matcher named by ``cfg.MODEL.SPARSE_RCNN.MATCHER_NAME`` (importing the package registers
    both :class:`HungarianMatcher` and :class:`~sparse_rcnn.ota.OTAMatcher`)."""
    return SPARSE_RCNN_MATCHER_REGISTRY.get(cfg.MODEL.SPARSE_RCNN.MATCHER_NAME)(cfg)
