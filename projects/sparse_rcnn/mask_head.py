"""QueryInst's dynamic mask head (Fang et al., "Instances as Queries", ICCV 2021): instance masks
from the queries of Sparse R-CNN's (or Dynamic Sparse R-CNN's) iterative stages.

Every stage has a mask branch beside its box branch (mmdetection's ``DynamicMaskHead`` and
``SparseRoIHead``; docs/queryinst.md lists the facts and where they come from):

* RoIAlign 14 x 14 (sampling ratio 2) of the stage's boxes on P2-P5;
* the dynamic mask interaction (:class:`DynamicMaskConv`): the stage's self-attention output (the
  query that the box branch's dynamic interaction reads, see
  :class:`sparse_rcnn.head.DynamicStage`) generates two 1x1 convolutions (C -> D -> C, each
  followed by LayerNorm and ReLU) that are applied at the S x S positions of its own RoI feature;
  no projection and no residual: the result, reshaped to (C, S, S), replaces the RoI feature;
* num_conv x (3x3 convolution, norm, ReLU), a 2x2 stride-2 deconvolution + ReLU (2S x 2S) and a
  1x1 convolution to one mask logit map per class (class-specific masks).

The mask branch never feeds back into the query. Training (``SetCriterion`` with a mask
predictor): every stage's mask head is trained on that stage's matched positives ("parallel
supervision"), its RoIs are the stage's refined boxes (detached), its targets the GT masks cropped
and resized to 2S x 2S by those boxes (:func:`mask_targets`), its loss the Dice loss
(:func:`dice_loss`). Inference (``SparseRCNN``): the last stage's mask head on the final
detections, the mask of the predicted class.
"""

from typing import Dict, List, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ConvTranspose2d, ShapeSpec, get_norm
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import BitMasks, Boxes, PolygonMasks
from torch import nn

from .head import build_roi_pooler
from .poolers import PreparedFeatures

__all__ = [
    "DICE_EPS",
    "DynamicMaskConv",
    "DynamicMaskHead",
    "QueryInstMaskHead",
    "dice_loss",
    "mask_targets",
]

# Added to each of the two sums of squares of the Dice denominator (mmdetection's DiceLoss with
# eps=1e-5, as its QueryInst configs set it).
DICE_EPS = 1e-5


class DynamicMaskConv(nn.Module):
    """Dynamic mask interaction: each query generates the kernels of two 1x1 convolutions
    (C -> D -> C) applied to its own RoI feature, each followed by LayerNorm and ReLU.

    The box branch's :class:`sparse_rcnn.head.DynamicConv` without its last part: no flatten and
    projection to one C vector; the output keeps the S x S positions.
    """

    def __init__(self, hidden_dim: int, dim_dynamic: int):
        """
        Args:
            hidden_dim: C, the width of the queries and of the RoI features.
            dim_dynamic: D, the inner width of the generated convolutions.
        """
        super().__init__()
        self.hidden_dim = hidden_dim
        self.dim_dynamic = dim_dynamic
        self.num_params = hidden_dim * dim_dynamic
        self.dynamic_layer = nn.Linear(hidden_dim, 2 * self.num_params)
        self.norm1 = nn.LayerNorm(dim_dynamic)
        self.norm2 = nn.LayerNorm(hidden_dim)

    def forward(self, queries: torch.Tensor, roi_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            queries: (R, C), one per RoI.
            roi_features: (R, P, C), P positions (S*S, row-major).

        Returns:
            (R, P, C).
        """
        param1, param2 = self.dynamic_layer(queries).split(self.num_params, dim=1)
        param1 = param1.view(-1, self.hidden_dim, self.dim_dynamic)
        param2 = param2.view(-1, self.dim_dynamic, self.hidden_dim)
        features = F.relu(self.norm1(torch.bmm(roi_features, param1)))
        return F.relu(self.norm2(torch.bmm(features, param2)))


class DynamicMaskHead(nn.Module):
    """The mask branch of one stage: dynamic mask interaction, convolutions, deconvolution,
    class-specific mask logits. Layer names follow Detectron2's ``MaskRCNNConvUpsampleHead``
    (``mask_fcn{k}``, ``deconv``, ``predictor``)."""

    def __init__(
        self,
        *,
        num_classes: int,
        hidden_dim: int,
        dim_dynamic: int,
        num_conv: int,
        conv_dim: int,
        norm: str,
    ):
        """
        Args:
            num_classes: K, one mask logit map per class.
            hidden_dim: C, the width of the queries and of the pooled features.
            dim_dynamic: D of :class:`DynamicMaskConv`.
            num_conv: number of 3x3 convolutions.
            conv_dim: their output channels (and the deconvolution's).
            norm: normalisation after each 3x3 convolution, a name of Detectron2's ``get_norm``
                ("BN", "SyncBN", "GN", ...; "" for none, the convolutions then have biases).
        """
        super().__init__()
        self.inst_interact = DynamicMaskConv(hidden_dim, dim_dynamic)
        self.conv_norm_relus = []
        in_channels = hidden_dim
        for k in range(num_conv):
            conv = Conv2d(
                in_channels,
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=not norm,
                norm=get_norm(norm, conv_dim),
                activation=nn.ReLU(),
            )
            self.add_module(f"mask_fcn{k + 1}", conv)
            self.conv_norm_relus.append(conv)
            in_channels = conv_dim
        self.deconv = ConvTranspose2d(in_channels, conv_dim, kernel_size=2, stride=2)
        self.predictor = Conv2d(conv_dim, num_classes, kernel_size=1)
        # mmdetection's DynamicMaskHead.init_weights: Xavier-uniform for every weight matrix and
        # kernel, the logits' bias 0 (the other biases keep PyTorch's default).
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.predictor.bias, 0.0)

    def forward(self, roi_features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """
        Args:
            roi_features: (R, C, S, S) pooled features.
            queries: (R, C), the attention features of the RoIs' proposals.

        Returns:
            (R, K, 2S, 2S) mask logits.
        """
        num_rois, channels, height, width = roi_features.shape
        x = self.inst_interact(queries, roi_features.flatten(2).transpose(1, 2))  # (R, S*S, C)
        # (R, S*S, C) -> (R, C, S, S) as a channels-last view (no copy); convolutions take either.
        x = x.view(num_rois, height, width, channels).permute(0, 3, 1, 2)
        for layer in self.conv_norm_relus:
            x = layer(x)
        x = F.relu(self.deconv(x))
        return self.predictor(x)


class QueryInstMaskHead(nn.Module):
    """QueryInst's mask branches: one :class:`DynamicMaskHead` per stage of the box head and one
    RoI pooler shared by all of them."""

    @configurable
    def __init__(
        self,
        *,
        mask_pooler: ROIPooler,
        num_stages: int,
        num_classes: int,
        hidden_dim: int = 256,
        dim_dynamic: int = 64,
        num_conv: int = 4,
        conv_dim: int = 256,
        norm: str = "BN",
    ):
        """
        Args:
            mask_pooler: pools S x S RoI features (QueryInst: 14 x 14, sampling ratio 2); masks
                are 2S x 2S. The same pooler class as the box head's (both read the features laid
                out once by ``prepare``).
            num_stages: one mask head per stage of the box head.
            num_classes: K.
            hidden_dim, dim_dynamic, num_conv, conv_dim, norm: see :class:`DynamicMaskHead`
                (QueryInst: 256, 64, 4, 256, "BN").
        """
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"QueryInstMaskHead needs num_stages >= 1, got {num_stages}")
        self.mask_pooler = mask_pooler
        self.num_stages = num_stages
        self.num_classes = num_classes
        self.head_series = nn.ModuleList(
            DynamicMaskHead(
                num_classes=num_classes,
                hidden_dim=hidden_dim,
                dim_dynamic=dim_dynamic,
                num_conv=num_conv,
                conv_dim=conv_dim,
                norm=norm,
            )
            for _ in range(num_stages)
        )

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        c = cfg.MODEL.SPARSE_RCNN
        return {
            "mask_pooler": build_roi_pooler(
                cfg, input_shape, c.MASK_POOLER_RESOLUTION, c.MASK_POOLER_SAMPLING_RATIO
            ),
            "num_stages": c.NUM_STAGES,
            "num_classes": c.NUM_CLASSES,
            "hidden_dim": c.HIDDEN_DIM,
            "dim_dynamic": c.DIM_DYNAMIC,
            "num_conv": c.MASK_NUM_CONV,
            "conv_dim": c.MASK_CONV_DIM,
            "norm": c.MASK_NORM,
        }

    @property
    def mask_size(self) -> int:
        """M = 2S, the side of the predicted masks (QueryInst: 28)."""
        return 2 * self.mask_pooler.output_size[0]

    def prepare(self, features: List[torch.Tensor]) -> Union[List[torch.Tensor], PreparedFeatures]:
        """The feature maps laid out once for the poolers (``FastROIPooler.prepare``), or the
        list itself where the pooler has no ``prepare`` (Detectron2's ROIPooler)."""
        prepare = getattr(self.mask_pooler, "prepare", None)
        return features if prepare is None else prepare(features)

    def forward(
        self,
        features: Union[List[torch.Tensor], PreparedFeatures],
        boxes: List[torch.Tensor],
        queries: torch.Tensor,
        stage: int,
    ) -> torch.Tensor:
        """Mask logits of the given boxes with one stage's mask head.

        Args:
            features: the pooled levels (B, C, Hl, Wl), or their :meth:`prepare` d form.
            boxes: B tensors (R_i, 4), xyxy pixels of the input images.
            queries: (R, C), R = sum of R_i, the attention features of the boxes' proposals, in
                the order of the concatenated ``boxes``.
            stage: 0-based index of the stage whose mask head to use.

        Returns:
            (R, K, M, M) mask logits. With R = 0 and gradients enabled the empty tensor is still
            connected to every parameter of the stage's head, so that a loss computed from it
            gives them zero gradients (and DistributedDataParallel sees every gradient) without
            running the layers on an empty batch.
        """
        head = self.head_series[stage]
        num_rois = sum(len(b) for b in boxes)
        if queries.shape[0] != num_rois:
            raise ValueError(f"Got {num_rois} boxes but {queries.shape[0]} queries")
        if num_rois == 0:
            size = self.mask_size
            logits = queries.new_zeros((0, self.num_classes, size, size))
            if torch.is_grad_enabled():
                logits = logits + 0.0 * sum(p.sum() for p in head.parameters())
            return logits
        roi_features = self.mask_pooler(features, [Boxes(b) for b in boxes])
        return head(roi_features.to(queries.dtype), queries)


def dice_loss(probs: torch.Tensor, targets: torch.Tensor, eps: float = DICE_EPS) -> torch.Tensor:
    """Dice loss in its V-Net form, per mask: 1 - 2 sum(p t) / (sum(p^2) + eps + sum(t^2) + eps).

    Args:
        probs: (P, ...) predicted probabilities.
        targets: (P, ...) binary (or soft) targets, same shape.
        eps: added to each of the two sums of squares.

    Returns:
        (P,) losses: 0 for a perfect binary mask (up to eps), 1 for disjoint masks.
    """
    if probs.shape != targets.shape:
        raise ValueError(
            f"dice_loss: probs {tuple(probs.shape)} and targets {tuple(targets.shape)} differ"
        )
    probs = probs.flatten(1)
    targets = targets.flatten(1).to(probs.dtype)
    intersection = (probs * targets).sum(1)
    denominator = (probs * probs).sum(1) + eps + (targets * targets).sum(1) + eps
    return 1.0 - 2.0 * intersection / denominator


def mask_targets(
    gt_masks: Union[PolygonMasks, BitMasks], boxes: torch.Tensor, mask_size: int
) -> torch.Tensor:
    """The GT masks cropped by the boxes and resized to ``mask_size`` x ``mask_size``
    (Detectron2's ``crop_and_resize``: polygons are rasterised in the box's frame, bitmasks are
    RoIAligned (aligned) and thresholded at 0.5), as Mask R-CNN's and QueryInst's targets.

    Args:
        gt_masks: P masks, one per box (the matched GT of each positive).
        boxes: (P, 4) xyxy pixels.
        mask_size: M.

    Returns:
        (P, M, M) float32 of 0s and 1s, on the boxes' device.
    """
    if len(gt_masks) != len(boxes):
        raise ValueError(f"mask_targets: {len(gt_masks)} masks but {len(boxes)} boxes")
    if len(boxes) == 0:
        return boxes.new_zeros((0, mask_size, mask_size), dtype=torch.float32)
    cropped = gt_masks.crop_and_resize(boxes.detach().float(), mask_size)
    return cropped.to(device=boxes.device, dtype=torch.float32)
