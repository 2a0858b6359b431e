"""The dynamic instance interactive head of Sparse R-CNN (paper section 3.3, figures 3 and 4).

Parameter names follow the official implementation (``head_series.{t}.self_attn``,
``inst_interact.dynamic_layer``, ``cls_module.{i}``, ...), so that its checkpoints load unchanged.
"""

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from detectron2.utils.registry import Registry
from torch import nn

from .poolers import FastROIPooler, PreparedFeatures
from .tracing import is_tracing

SPARSE_RCNN_HEAD_REGISTRY = Registry("SPARSE_RCNN_HEAD")
SPARSE_RCNN_HEAD_REGISTRY.__doc__ = """
Registry for the iterative heads of Sparse R-CNN, selected by ``cfg.MODEL.SPARSE_RCNN.HEAD_NAME``.
Each is built as ``obj(cfg, input_shape)`` where ``input_shape`` is the backbone's output shape.
"""

# dw and dh are clamped to log(100000 / 16) before exp(), as in Detectron2 and the official code.
_DEFAULT_SCALE_CLAMP = math.log(100000.0 / 16)


def pooled_feature_names(cfg, input_shape: Dict[str, ShapeSpec]) -> List[str]:
    """``MODEL.ROI_HEADS.IN_FEATURES``, checked against the backbone's outputs."""
    in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(
            f"MODEL.ROI_HEADS.IN_FEATURES {missing} are not outputs of the backbone "
            f"({sorted(input_shape)})"
        )
    return in_features


POOLER_IMPLS = {"fast": FastROIPooler, "detectron2": ROIPooler}


def build_roi_pooler(
    cfg,
    input_shape: Dict[str, ShapeSpec],
    output_size: int,
    sampling_ratio: int,
) -> ROIPooler:
    """The RoI pooler of ``MODEL.SPARSE_RCNN.POOLER_IMPL`` on ``MODEL.ROI_HEADS.IN_FEATURES``, with
    ``MODEL.ROI_BOX_HEAD.POOLER_TYPE`` (the box and the mask poolers share impl and type)."""
    in_features = pooled_feature_names(cfg, input_shape)
    impl = cfg.MODEL.SPARSE_RCNN.POOLER_IMPL
    if impl not in POOLER_IMPLS:
        raise ValueError(
            f"MODEL.SPARSE_RCNN.POOLER_IMPL must be one of {sorted(POOLER_IMPLS)}, got {impl!r}"
        )
    return POOLER_IMPLS[impl](
        output_size=output_size,
        scales=tuple(1.0 / input_shape[f].stride for f in in_features),
        sampling_ratio=sampling_ratio,
        pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
    )


def _activation(name: str):
    """The FFN activation: relu (the paper's) or gelu.

    ``glu`` is rejected: it halves the width (DIM_FEEDFORWARD -> DIM_FEEDFORWARD / 2), so the
    FFN's second linear layer (DIM_FEEDFORWARD -> HIDDEN_DIM) could not take its output. The
    official code (DETR's ``_get_activation_fn``) lists it and crashes at the first forward.
    """
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name == "glu":
        raise ValueError(
            "MODEL.SPARSE_RCNN.ACTIVATION 'glu' is not supported: GLU halves the FFN width, so "
            "the FFN's second layer (DIM_FEEDFORWARD -> HIDDEN_DIM) cannot take its output; "
            "use 'relu' (the paper's) or 'gelu'"
        )
    raise ValueError(f"MODEL.SPARSE_RCNN.ACTIVATION must be 'relu' or 'gelu', got {name!r}")


def _linear_norm_relu_tower(dim: int, num_layers: int) -> nn.Sequential:
    """``num_layers`` x (Linear without bias, LayerNorm, ReLU), as the official cls/reg modules."""
    layers = []
    for _ in range(num_layers):
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class DynamicConv(nn.Module):
    """Dynamic instance interaction (paper figure 4).

    Each proposal feature generates the kernels of two 1x1 convolutions (C -> D -> C) that are
    applied to its own RoI feature; the result is flattened and projected back to C.
    """

    def __init__(self, hidden_dim: int, dim_dynamic: int, num_dynamic: int, pooler_resolution: int):
        super().__init__()
        if num_dynamic != 2:
            raise ValueError(
                f"MODEL.SPARSE_RCNN.NUM_DYNAMIC must be 2 (C->D->C), got {num_dynamic}"
            )
        self.hidden_dim = hidden_dim
        self.dim_dynamic = dim_dynamic
        self.num_params = hidden_dim * dim_dynamic
        self.dynamic_layer = nn.Linear(hidden_dim, num_dynamic * self.num_params)
        self.norm1 = nn.LayerNorm(dim_dynamic)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.out_layer = nn.Linear(hidden_dim * pooler_resolution**2, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(
        self,
        proposal_features: torch.Tensor,
        roi_features: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            proposal_features: (R, C), one per RoI.
            roi_features: (R, S*S, C), spatial positions in row-major order.

        Returns:
            (R, C) object features.
        """
        if is_tracing():
            # The exported graph computes the two kernels with one GEMM each on the halves of
            # the weight (constants): no Split copying the (R, 2 * C * D) output in the runtime.
            weights = self.dynamic_layer.weight.split(self.num_params)
            biases = self.dynamic_layer.bias.split(self.num_params)
            param1, param2 = (F.linear(proposal_features, w, b) for w, b in zip(weights, biases))
        else:
            parameters = self.dynamic_layer(proposal_features)
            # split (not two slices): its backward concatenates the two gradients instead of
            # zero-filling a full (R, 2 * C * D) buffer per slice.
            param1, param2 = parameters.split(self.num_params, dim=1)
        param1 = param1.view(-1, self.hidden_dim, self.dim_dynamic)
        param2 = param2.view(-1, self.dim_dynamic, self.hidden_dim)
        # Without autograd nothing keeps the LayerNorm outputs: apply the ReLUs in place (not
        # while tracing: in-place ops slow the ONNX exporter's passes down, by about 15%).
        inplace = not torch.is_grad_enabled() and not is_tracing()
        features = F.relu(self.norm1(torch.bmm(roi_features, param1)), inplace=inplace)
        features = F.relu(self.norm2(torch.bmm(features, param2)), inplace=inplace)
        # Flatten position-major, channel-minor: the official out_layer weights expect this order.
        features = self.out_layer(features.flatten(1))
        return F.relu(self.norm3(features), inplace=inplace)


class DynamicStage(nn.Module):
    """One iterative stage: self-attention, dynamic instance interaction, FFN, cls and reg towers.

    The official implementation calls this ``RCNNHead``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        hidden_dim: int,
        nheads: int,
        dim_feedforward: int,
        dropout: float,
        activation: str,
        num_cls: int,
        num_reg: int,
        num_dynamic: int,
        dim_dynamic: int,
        pooler_resolution: int,
        box2box_transform: Box2BoxTransform,
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.self_attn = nn.MultiheadAttention(
            hidden_dim, nheads, dropout=dropout, batch_first=True
        )
        self.inst_interact = DynamicConv(hidden_dim, dim_dynamic, num_dynamic, pooler_resolution)
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.cls_module = _linear_norm_relu_tower(hidden_dim, num_cls)
        self.reg_module = _linear_norm_relu_tower(hidden_dim, num_reg)
        self.class_logits = nn.Linear(hidden_dim, num_classes)
        self.bboxes_delta = nn.Linear(hidden_dim, 4)
        self.box2box_transform = box2box_transform

    def forward(
        self,
        features: Union[List[torch.Tensor], PreparedFeatures],
        boxes: torch.Tensor,
        proposal_features: torch.Tensor,
        pooler: ROIPooler,
        compute_logits: bool = True,
        return_attention_features: bool = False,
    ) -> Tuple[Optional[torch.Tensor], ...]:
        """
        Args:
            features: feature maps (B, C, Hl, Wl) of the pooled levels, or the pooler's
                ``prepare(features)``.
            boxes: (B, N, 4) xyxy pixel boxes of this stage's input.
            proposal_features: (B, N, C).
            pooler: the RoI pooler shared by all stages.
            compute_logits: False skips the classification tower (inference of early stages).
            return_attention_features: also return the self-attention output (after the residual
                and LayerNorm, the query of the dynamic instance interaction), which QueryInst's
                mask branch reads.

        Returns:
            class_logits (B, N, K) or None, pred_boxes (B, N, 4), object features (B, N, C), and
            with ``return_attention_features`` the attention features (B, N, C).
        """
        num_images, num_boxes = boxes.shape[:2]
        roi_features = pooler(features, [Boxes(b) for b in boxes])  # (B*N, C, S, S)
        roi_features = roi_features.flatten(2).transpose(1, 2)  # (B*N, S*S, C)

        # Self-attention between the proposals of each image (+ residual, LayerNorm).
        attended = self.self_attn(
            proposal_features, proposal_features, proposal_features, need_weights=False
        )[0]
        proposal_features = self.norm1(proposal_features + self.dropout1(attended))

        attention_features = proposal_features

        # Dynamic instance interaction with each proposal's own RoI feature (+ residual, LayerNorm).
        proposal_features = proposal_features.reshape(num_images * num_boxes, self.hidden_dim)
        interacted = self.inst_interact(proposal_features, roi_features)
        obj_features = self.norm2(proposal_features + self.dropout2(interacted))

        # FFN (+ residual, LayerNorm).
        ffn = self.linear2(self.dropout(self.activation(self.linear1(obj_features))))
        obj_features = self.norm3(obj_features + self.dropout3(ffn))

        class_logits = None
        if compute_logits:
            class_logits = self.class_logits(self.cls_module(obj_features))
            class_logits = class_logits.view(num_images, num_boxes, -1)
        deltas = self.bboxes_delta(self.reg_module(obj_features))
        pred_boxes = self.box2box_transform.apply_deltas(deltas, boxes.reshape(-1, 4))
        outputs = (
            class_logits,
            pred_boxes.view(num_images, num_boxes, 4),
            obj_features.view(num_images, num_boxes, self.hidden_dim),
        )
        if return_attention_features:
            outputs += (attention_features,)
        return outputs


@SPARSE_RCNN_HEAD_REGISTRY.register()
class DynamicHead(nn.Module):
    """Sparse R-CNN's iterative head: ``num_stages`` :class:`DynamicStage` s in series.

    The boxes predicted by a stage are the next stage's proposal boxes, detached (the paper blocks
    gradients at the boxes between stages; the first stage's input boxes are not detached so the
    learnable proposal boxes get gradients). The object features are the next stage's proposal
    features, not detached.
    """

    @configurable
    def __init__(
        self,
        *,
        box_pooler: ROIPooler,
        num_classes: int,
        hidden_dim: int = 256,
        num_stages: int = 6,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "relu",
        num_cls: int = 1,
        num_reg: int = 3,
        num_dynamic: int = 2,
        dim_dynamic: int = 64,
        prior_prob: float = 0.01,
        bbox_reg_weights: Tuple[float, float, float, float] = (2.0, 2.0, 1.0, 1.0),
        scale_clamp: float = _DEFAULT_SCALE_CLAMP,
    ):
        """
        Args:
            box_pooler: pools S x S RoI features (S = its output size) from the feature maps.
            num_classes: K foreground classes (sigmoid classification).
            hidden_dim: C, width of proposal features; also the channel count of the features.
            num_stages: number of iterative stages.
            nheads, dim_feedforward, dropout, activation: self-attention and FFN settings.
            num_cls, num_reg: layers of the classification and regression towers.
            num_dynamic, dim_dynamic: the dynamic instance interaction (2 convs, C -> D -> C).
            prior_prob: focal-loss prior; every stage's class-logit bias is -log((1 - p) / p).
            bbox_reg_weights, scale_clamp: box-delta decoding (Box2BoxTransform).
        """
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"MODEL.SPARSE_RCNN.NUM_STAGES must be >= 1, got {num_stages}")
        if hidden_dim % nheads != 0:
            raise ValueError(
                f"MODEL.SPARSE_RCNN.HIDDEN_DIM ({hidden_dim}) must be divisible by NHEADS ({nheads})"
            )
        self.box_pooler = box_pooler
        self.num_classes = num_classes
        self.num_stages = num_stages
        pooler_resolution = box_pooler.output_size[0]
        box2box_transform = Box2BoxTransform(weights=bbox_reg_weights, scale_clamp=scale_clamp)
        self.head_series = nn.ModuleList(
            DynamicStage(
                num_classes=num_classes,
                hidden_dim=hidden_dim,
                nheads=nheads,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
                activation=activation,
                num_cls=num_cls,
                num_reg=num_reg,
                num_dynamic=num_dynamic,
                dim_dynamic=dim_dynamic,
                pooler_resolution=pooler_resolution,
                box2box_transform=box2box_transform,
            )
            for _ in range(num_stages)
        )
        self._reset_parameters(prior_prob)

    def _reset_parameters(self, prior_prob: float) -> None:
        # Xavier-uniform for every weight matrix (as the official code), then the focal-loss prior
        # on the class-logit biases only. The official code sets *every* parameter whose last
        # dimension equals num_classes to the prior; we do not copy that quirk.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        bias_value = -math.log((1 - prior_prob) / prior_prob)
        for stage in self.head_series:
            nn.init.constant_(stage.class_logits.bias, bias_value)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = pooled_feature_names(cfg, input_shape)
        channels = {input_shape[f].channels for f in in_features}
        hidden_dim = cfg.MODEL.SPARSE_RCNN.HIDDEN_DIM
        if channels != {hidden_dim}:
            raise ValueError(
                f"The pooled features have {sorted(channels)} channels but "
                f"MODEL.SPARSE_RCNN.HIDDEN_DIM is {hidden_dim}; set MODEL.FPN.OUT_CHANNELS to match."
            )
        box_pooler = build_roi_pooler(
            cfg,
            input_shape,
            cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
            cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
        )
        c = cfg.MODEL.SPARSE_RCNN
        return {
            "box_pooler": box_pooler,
            "num_classes": c.NUM_CLASSES,
            "hidden_dim": hidden_dim,
            "num_stages": c.NUM_STAGES,
            "nheads": c.NHEADS,
            "dim_feedforward": c.DIM_FEEDFORWARD,
            "dropout": c.DROPOUT,
            "activation": c.ACTIVATION,
            "num_cls": c.NUM_CLS,
            "num_reg": c.NUM_REG,
            "num_dynamic": c.NUM_DYNAMIC,
            "dim_dynamic": c.DIM_DYNAMIC,
            "prior_prob": c.PRIOR_PROB,
            "bbox_reg_weights": tuple(c.BBOX_REG_WEIGHTS),
        }

    def forward(
        self,
        features: List[torch.Tensor],
        proposal_boxes: torch.Tensor,
        proposal_features: torch.Tensor,
        stages_with_logits: Optional[List[int]] = None,
        with_attention_features: bool = False,
    ) -> List[Dict[str, torch.Tensor]]:
        """
        Args:
            features: the pooled feature maps, in the order of the pooler's scales, or the box
                pooler's ``prepare(features)``.
            proposal_boxes: (B, N, 4) xyxy pixels of the unpadded images.
            proposal_features: (B, N, C).
            stages_with_logits: indices of the stages whose class logits are needed (all if None);
                inference asks only for the last.
            with_attention_features: also return every stage's self-attention output (the query
                of QueryInst's mask branch, :mod:`sparse_rcnn.mask_head`).

        Returns:
            One dict per stage with "pred_logits" (B, N, K) (absent where not asked for),
            "pred_boxes" (B, N, 4) and, with ``with_attention_features``, "attn_features"
            (B, N, C).
        """
        outputs = []
        boxes = proposal_boxes
        # FastROIPooler lays the maps out once for all stages; Detectron2's ROIPooler has no prepare.
        prepare = getattr(self.box_pooler, "prepare", None)
        if prepare is not None:
            features = prepare(features)
        for index, stage in enumerate(self.head_series):
            need_logits = stages_with_logits is None or index in stages_with_logits
            logits, pred_boxes, proposal_features, *attention = stage(
                features,
                boxes,
                proposal_features,
                self.box_pooler,
                need_logits,
                return_attention_features=with_attention_features,
            )
            output = {"pred_boxes": pred_boxes}
            if logits is not None:
                output["pred_logits"] = logits
            if with_attention_features:
                output["attn_features"] = attention[0]
            outputs.append(output)
            boxes = pred_boxes.detach()  # gradients are blocked at the boxes between stages
            if self.training:  # a diverging step: keep non-finite boxes out of the RoI pooler
                boxes = torch.nan_to_num(boxes, nan=0.0, posinf=0.0, neginf=0.0)
        return outputs


def build_sparse_rcnn_head(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    return SPARSE_RCNN_HEAD_REGISTRY.get(cfg.MODEL.SPARSE_RCNN.HEAD_NAME)(cfg, input_shape)
