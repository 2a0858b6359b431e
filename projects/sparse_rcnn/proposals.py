"""Proposal generators: where the stage-1 proposal boxes and proposal features come from.

A proposal generator maps the backbone features of a batch to per-image proposal boxes (absolute
xyxy pixels of each unpadded image) and proposal features. Sparse R-CNN learns one fixed set
(:class:`LearnableProposals`); Dynamic Sparse R-CNN mixes several learned sets per image
(``sparse_rcnn.dynamic_proposals``).
"""

import math
from typing import Dict, Tuple

import torch
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from torch import nn
from torchvision.ops import box_convert

SPARSE_RCNN_PROPOSAL_REGISTRY = Registry("SPARSE_RCNN_PROPOSAL")
SPARSE_RCNN_PROPOSAL_REGISTRY.__doc__ = """
Registry for the proposal generators of Sparse R-CNN, selected by
``cfg.MODEL.SPARSE_RCNN.PROPOSAL_GENERATOR``. Each is built as ``obj(cfg, input_shape)`` and
called as ``obj(features, image_whwh) -> (boxes (B, N, 4), features (B, N, C))``.
"""

PROPOSAL_BOX_INITS = ("image", "center", "grid", "random")


def initial_proposal_boxes(num_proposals: int, init: str = "image") -> torch.Tensor:
    """Initial proposal boxes in normalised (cx, cy, w, h), one of the variants of paper table 6.

    Args:
        num_proposals: N.
        init: "image" (every box is the whole image), "center" (all at the centre, 0.1 of the image
            size), "grid" (a regular grid, G-CNN style: rows = floor(sqrt(N)), cols = ceil(N / rows),
            cells filled row by row, each box one cell) or "random" (centres ~ N(0.5, 0.2), sizes
            ~ |N(0.5, 0.2)|, clamped to [0.05, 1]; the paper gives no parameters, we chose these
            so that boxes lie mostly inside the image).

    Returns:
        Tensor (N, 4).
    """
    if init == "image":
        return torch.tensor([0.5, 0.5, 1.0, 1.0]).repeat(num_proposals, 1)
    if init == "center":
        return torch.tensor([0.5, 0.5, 0.1, 0.1]).repeat(num_proposals, 1)
    if init == "grid":
        rows = max(int(math.floor(math.sqrt(num_proposals))), 1)
        cols = int(math.ceil(num_proposals / rows))
        index = torch.arange(num_proposals)
        row, col = index // cols, index % cols
        rows_used = int(math.ceil(num_proposals / cols))
        cx = (col.float() + 0.5) / cols
        cy = (row.float() + 0.5) / rows_used
        w = torch.full((num_proposals,), 1.0 / cols)
        h = torch.full((num_proposals,), 1.0 / rows_used)
        return torch.stack([cx, cy, w, h], dim=1)
    if init == "random":
        centers = (torch.randn(num_proposals, 2) * 0.2 + 0.5).clamp(0.0, 1.0)
        sizes = (torch.randn(num_proposals, 2) * 0.2 + 0.5).abs().clamp(0.05, 1.0)
        return torch.cat([centers, sizes], dim=1)
    raise ValueError(
        f"MODEL.SPARSE_RCNN.PROPOSAL_BOX_INIT must be one of {PROPOSAL_BOX_INITS}, got {init!r}"
    )


def scale_proposal_boxes(boxes_cxcywh: torch.Tensor, image_whwh: torch.Tensor) -> torch.Tensor:
    """Normalised (cx, cy, w, h) proposal boxes -> absolute xyxy boxes of every image.

    Args:
        boxes_cxcywh: (N, 4) shared by all images, or (B, N, 4) per image.
        image_whwh: (B, 4) unpadded (w, h, w, h) of every image.

    Returns:
        (B, N, 4) xyxy pixels.
    """
    boxes_xyxy = box_convert(boxes_cxcywh, in_fmt="cxcywh", out_fmt="xyxy")
    if boxes_xyxy.dim() == 2:
        boxes_xyxy = boxes_xyxy[None]
    return boxes_xyxy * image_whwh[:, None, :]


@SPARSE_RCNN_PROPOSAL_REGISTRY.register()
class LearnableProposals(nn.Module):
    """N learnable proposal boxes and N learnable proposal features, shared by all images.

    Parameter names follow the official implementation (``init_proposal_boxes.weight``,
    ``init_proposal_features.weight``) as embeddings, so that official checkpoints map onto them.
    """

    @configurable
    def __init__(self, *, num_proposals: int, hidden_dim: int, box_init: str = "image"):
        """
        Args:
            num_proposals: N.
            hidden_dim: C, the width of a proposal feature.
            box_init: see :func:`initial_proposal_boxes`.
        """
        super().__init__()
        self.num_proposals = num_proposals
        self.init_proposal_features = nn.Embedding(num_proposals, hidden_dim)
        self.init_proposal_boxes = nn.Embedding(num_proposals, 4)
        with torch.no_grad():
            self.init_proposal_boxes.weight.copy_(initial_proposal_boxes(num_proposals, box_init))

    @classmethod
    def from_config(cls, cfg, input_shape=None):
        return {
            "num_proposals": cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS,
            "hidden_dim": cfg.MODEL.SPARSE_RCNN.HIDDEN_DIM,
            "box_init": cfg.MODEL.SPARSE_RCNN.PROPOSAL_BOX_INIT,
        }

    def forward(
        self, features: Dict[str, torch.Tensor], image_whwh: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            features: backbone features (unused: the proposals do not depend on the image).
            image_whwh: (B, 4) unpadded (w, h, w, h) of every image.

        Returns:
            boxes: (B, N, 4) xyxy pixels; features: (B, N, C).
        """
        boxes = scale_proposal_boxes(self.init_proposal_boxes.weight, image_whwh)
        proposal_features = self.init_proposal_features.weight[None].expand(len(image_whwh), -1, -1)
        return boxes, proposal_features


def build_proposal_generator(cfg, input_shape) -> nn.Module:
    name = cfg.MODEL.SPARSE_RCNN.PROPOSAL_GENERATOR
    return SPARSE_RCNN_PROPOSAL_REGISTRY.get(name)(cfg, input_shape)
