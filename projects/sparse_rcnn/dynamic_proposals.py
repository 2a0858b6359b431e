"""Dynamic proposal generation (DPG) of Dynamic Sparse R-CNN (Hong et al., CVPR 2022, section 3.3).

N_e "experts", each a set of N_p learnable proposal boxes and proposal features, are mixed per
image and per proposal with weights that an expert-weight network G computes from P2-P5 (eq. 3).
Selected by ``MODEL.SPARSE_RCNN.PROPOSAL_GENERATOR: "DynamicProposalGenerator"``; plain Sparse
R-CNN keeps :class:`~sparse_rcnn.proposals.LearnableProposals` and its checkpoint keys.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.events import get_event_storage
from torch import nn

from .head import pooled_feature_names
from .proposals import SPARSE_RCNN_PROPOSAL_REGISTRY, initial_proposal_boxes, scale_proposal_boxes
from .tracing import is_tracing

__all__ = ["DynamicProposalGenerator", "annealed_temperature"]


def annealed_temperature(
    iteration: int, tau_start: float = 30.0, tau_end: float = 1.0, anneal_iters: int = 73300
) -> float:
    """Softmax temperature at a training iteration, linear from ``tau_start`` to ``tau_end``.

    As in dynamic convolution (Chen et al., CVPR 2020): tau goes linearly from 30 to 1 over the
    first ``anneal_iters`` iterations and stays at ``tau_end`` afterwards.
    """
    if anneal_iters <= 0:
        return tau_end
    progress = min(max(iteration, 0) / anneal_iters, 1.0)
    return tau_start + (tau_end - tau_start) * progress


def _xavier_uniform_depthwise_(conv: nn.Conv2d) -> None:
    # Xavier with the fans of a depth-wise kernel (each output sees one 3x3 input window, fan_in =
    # fan_out = 9); PyTorch's fan_out would count every channel and make the kernels vanish.
    fan = conv.kernel_size[0] * conv.kernel_size[1]
    bound = math.sqrt(6.0 / (2 * fan))
    nn.init.uniform_(conv.weight, -bound, bound)
    nn.init.zeros_(conv.bias)


@SPARSE_RCNN_PROPOSAL_REGISTRY.register()
class DynamicProposalGenerator(nn.Module):
    """Per-image proposal boxes and features as expert mixtures (paper eq. 3, figure 3).

    Expert-weight network G (figure 3 (b), "staircase"): a depth-wise 3x3 stride-2 convolution
    (padding 1) on P2, concatenated with P3, a depth-wise 3x3 stride-2 convolution on the 2C
    channels, concatenated with P4, again, concatenated with P5 (4C channels); bilinearly
    interpolated to 30 x 30, the 4C channels fused by summation, flattened (900), FC 900 -> 1500,
    ReLU, FC 1500 -> N_e x N_p, softmax over the experts with temperature tau. Without the
    staircase (table 2 row 2) every level is interpolated to 30 x 30 directly, concatenated and
    fused by summation in the same way, so that only the convolutions differ.

    Choices the paper leaves open: ReLU between the FCs (as dynamic convolution's attention
    branch), padding 1 (so the stride-2 output matches the next level's size; where it does not,
    e.g. unpadded inputs, it is resized bilinearly), bilinear interpolation with
    ``align_corners=False`` and no antialiasing, biases in the depth-wise convolutions and no
    normalisation or activation after them; Xavier-uniform weights and zero biases for the new
    layers (the paper's "Xavier initialization ... to newly added layers"). Summation and
    interpolation are linear and commute, so channels are summed before interpolating.

    Every expert's boxes start as ``box_init`` (:func:`initial_proposal_boxes`, drawn per expert, so
    the deterministic inits give identical experts that diverge in training because each image
    weights their gradients differently; "random" gives distinct ones); its features start as
    N(0, 1), like ``nn.Embedding``. Boxes are mixed in normalised (cx, cy, w, h), equivalent to
    mixing xyxy (the conversion is linear).

    Temperature: annealed from ``tau_start`` to ``tau_end`` by the training iteration read from
    Detectron2's event storage (``get_event_storage().iter``), so a resumed run continues the
    schedule; ``tau_end`` in eval mode and when there is no event storage (outside a trainer).
    """

    @configurable
    def __init__(
        self,
        *,
        num_proposals: int,
        hidden_dim: int,
        in_channels: Sequence[int],
        num_experts: int = 4,
        box_init: str = "image",
        staircase: bool = True,
        grid_size: int = 30,
        fc_dim: int = 1500,
        tau_start: float = 30.0,
        tau_end: float = 1.0,
        tau_anneal_iters: int = 73300,
    ):
        """
        Args:
            num_proposals: N_p, proposals per expert (and per image).
            hidden_dim: C, the width of a proposal feature.
            in_channels: channels of every pooled level, P2 first.
            num_experts: N_e.
            box_init: initial boxes of every expert, see :func:`initial_proposal_boxes`.
            staircase: use the staircase aggregation (True) or direct interpolation (False).
            grid_size: side of the fused map (30: a 900-d input to the first FC).
            fc_dim: width of the first FC layer (1500).
            tau_start, tau_end, tau_anneal_iters: the temperature schedule, see
                :func:`annealed_temperature`.
        """
        super().__init__()
        if num_experts < 1 or num_proposals < 1 or grid_size < 1 or len(in_channels) < 1:
            raise ValueError(
                "DynamicProposalGenerator needs num_experts, num_proposals, grid_size >= 1 and at "
                f"least one level; got {num_experts}, {num_proposals}, {grid_size}, "
                f"{list(in_channels)}"
            )
        if tau_start <= 0 or tau_end <= 0:
            raise ValueError(f"DPG temperatures must be > 0, got {tau_start} and {tau_end}")
        self.num_proposals = num_proposals
        self.num_experts = num_experts
        self.staircase = staircase
        self.grid_size = grid_size
        self.tau_start = tau_start
        self.tau_end = tau_end
        self.tau_anneal_iters = tau_anneal_iters

        # The experts: (N_e, N_p, 4) normalised cxcywh boxes and (N_e, N_p, C) features.
        boxes = [initial_proposal_boxes(num_proposals, box_init) for _ in range(num_experts)]
        self.expert_boxes = nn.Parameter(torch.stack(boxes))
        self.expert_features = nn.Parameter(torch.randn(num_experts, num_proposals, hidden_dim))

        # Expert-weight network G. stairs[l] is the depth-wise conv on the concatenation of
        # levels 0 ... l (sum of their channels), applied before concatenating level l + 1.
        self.stairs = nn.ModuleList()
        if staircase:
            channels = 0
            for c in in_channels[:-1]:
                channels += c
                conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels)
                _xavier_uniform_depthwise_(conv)
                self.stairs.append(conv)
        self.fc1 = nn.Linear(grid_size * grid_size, fc_dim)
        self.fc2 = nn.Linear(fc_dim, num_experts * num_proposals)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    @classmethod
    def from_config(cls, cfg, input_shape):
        c = cfg.MODEL.SPARSE_RCNN
        in_features = pooled_feature_names(cfg, input_shape)
        return {
            "num_proposals": c.NUM_PROPOSALS,
            "hidden_dim": c.HIDDEN_DIM,
            "in_channels": [input_shape[f].channels for f in in_features],
            "num_experts": c.DPG.NUM_EXPERTS,
            "box_init": c.PROPOSAL_BOX_INIT,
            "staircase": c.DPG.STAIRCASE,
            "grid_size": c.DPG.GRID_SIZE,
            "fc_dim": c.DPG.FC_DIM,
            "tau_start": c.DPG.TAU_START,
            "tau_end": c.DPG.TAU_END,
            "tau_anneal_iters": c.DPG.TAU_ANNEAL_ITERS,
        }

    def temperature(self) -> float:
        """tau for this forward: annealed by the event storage's iteration while training."""
        if not self.training:
            return self.tau_end
        try:
            storage = get_event_storage()
        except AssertionError:  # no EventStorage: not inside a training loop
            return self.tau_end
        return annealed_temperature(
            storage.iter, self.tau_start, self.tau_end, self.tau_anneal_iters
        )

    def fused_map(self, features: List[torch.Tensor]) -> torch.Tensor:
        """The (B, G*G) input of the first FC: levels aggregated, resized and channel-summed."""
        size = (self.grid_size, self.grid_size)
        if self.staircase:
            x = features[0]
            for conv, level in zip(self.stairs, features[1:]):
                x = conv(x)
                # While tracing, always resize (to the same size it is the identity, exactly):
                # a Python test of the traced sizes would freeze the export size into the graph.
                if is_tracing() or x.shape[-2:] != level.shape[-2:]:
                    x = F.interpolate(
                        x, size=level.shape[-2:], mode="bilinear", align_corners=False
                    )
                x = torch.cat([x, level], dim=1)
            # Summing the channels, then interpolating == interpolating the (4C, 30, 30) map, then
            # summing (both are linear); this is cheaper.
            fused = F.interpolate(
                x.sum(dim=1, keepdim=True), size=size, mode="bilinear", align_corners=False
            )
        else:
            fused = sum(
                F.interpolate(
                    level.sum(dim=1, keepdim=True), size=size, mode="bilinear", align_corners=False
                )
                for level in features
            )
        return fused.flatten(1)

    def expert_weights(
        self, features: List[torch.Tensor], tau: Optional[float] = None
    ) -> torch.Tensor:
        """W = G(F): softmax over the experts of every proposal.

        Args:
            features: the pooled levels (B, C_l, H_l, W_l), P2 first.
            tau: softmax temperature; :meth:`temperature` if None.

        Returns:
            (B, N_e, N_p), summing to 1 over the experts.
        """
        if len(features) != len(self.stairs) + 1 and self.staircase:
            raise ValueError(
                f"DynamicProposalGenerator was built for {len(self.stairs) + 1} levels, got "
                f"{len(features)}"
            )
        tau = self.temperature() if tau is None else tau
        x = self.fused_map(features)
        logits = self.fc2(F.relu(self.fc1(x))).view(-1, self.num_experts, self.num_proposals)
        return F.softmax(logits.float() / tau, dim=1)

    def forward(
        self, features: List[torch.Tensor], image_whwh: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            features: the pooled levels (B, C, H_l, W_l), P2 first.
            image_whwh: (B, 4) unpadded (w, h, w, h) of every image.

        Returns:
            boxes: (B, N_p, 4) xyxy pixels; features: (B, N_p, C).
        """
        weights = self.expert_weights(features).to(self.expert_features.dtype)
        # Eq. 3: P_o = sum_i P_i * W_i, per proposal, for the boxes and the features.
        boxes = torch.einsum("ben,end->bnd", weights, self.expert_boxes)
        proposal_features = torch.einsum("ben,enc->bnc", weights, self.expert_features)
        return scale_proposal_boxes(boxes, image_whwh), proposal_features
