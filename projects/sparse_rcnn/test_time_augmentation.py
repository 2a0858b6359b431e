"""Test-time augmentation (TTA) for Sparse R-CNN, as the official implementation does it.

Every image is resized to several short sides, each copy also flipped horizontally (Detectron2's
:class:`~detectron2.modeling.DatasetMapperTTA`); the model detects in every copy
(``SparseRCNN.inference(..., do_postprocess=False)``, several copies per forward pass); at each
scale a box-size filter keeps only the boxes whose size suits that scale; the boxes go back to the
original image through the inverse of each copy's transforms, and are merged by class-aware soft
box voting (the official code's "cvpods TTA") or by class-aware NMS.

Detectron2's own ``GeneralizedRCNNWithTTA`` accepts only ``GeneralizedRCNN`` models and merges by
NMS; this module is modelled on it (same inputs and outputs, same ``DatasetMapperTTA``) and works
for every model with Sparse R-CNN's ``inference(batched_inputs, do_postprocess=False)``, Dynamic
Sparse R-CNN included.
"""

import contextlib
import copy
import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data.detection_utils import read_image
from detectron2.layers import batched_nms
from detectron2.modeling import DatasetMapperTTA
from detectron2.structures import Boxes, Instances
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "SparseRCNNWithTTA",
    "box_voting",
    "filter_boxes_by_size",
    "OFFICIAL_MIN_SIZES",
    "OFFICIAL_SCALE_RANGES",
]

logger = logging.getLogger(__name__)

MERGE_METHODS = ("soft_vote", "vote", "nms")
# The official scales (short sides; 800, the single-scale test size, last) and, per scale, the
# range of sqrt(box area) kept there (sparsercnn/config.py of PeizeSun/SparseR-CNN): large scales
# keep only small boxes, small scales only large ones.
OFFICIAL_MIN_SIZES = (400, 500, 600, 640, 700, 900, 1000, 1100, 1200, 1300, 1400, 1800, 800)
OFFICIAL_SCALE_RANGES = (
    (96, 10000), (96, 10000), (64, 10000), (64, 10000), (64, 10000), (0, 10000), (0, 10000),
    (0, 256), (0, 256), (0, 192), (0, 192), (0, 96), (0, 10000),
)  # fmt: skip


def filter_boxes_by_size(boxes: torch.Tensor, min_size: float, max_size: float) -> torch.Tensor:
    """Which boxes have ``min_size < sqrt(area) < max_size`` (the official per-scale filter).

    Both bounds are strict, as in the official code (``w * h > min ** 2 and w * h < max ** 2``),
    so a box of zero area never passes, even with ``min_size`` 0.

    Args:
        boxes: (N, 4) xyxy.
        min_size, max_size: bounds of sqrt(area), in the boxes' pixels.

    Returns:
        (N,) bool mask of the boxes to keep.
    """
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return (area > min_size * min_size) & (area < max_size * max_size)


def _voting_groups(boxes: np.ndarray, iou_threshold: float) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Greedy groups of boxes sorted by decreasing score: the first remaining box (the top) and
    every remaining box with IoU >= ``iou_threshold`` to it, until none remain.

    Returns:
        per group: (indices of its members, top first; their IoU with the top box, the top's 1).
    """
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1) * (y2 - y1)
    remaining = np.arange(len(boxes))
    groups = []
    while remaining.size > 0:
        top = remaining[0]
        width = np.minimum(x2[top], x2[remaining]) - np.maximum(x1[top], x1[remaining])
        height = np.minimum(y2[top], y2[remaining]) - np.maximum(y1[top], y1[remaining])
        inter = np.clip(width, 0, None) * np.clip(height, 0, None)
        union = area[top] + area[remaining] - inter
        # 0 where the boxes do not intersect (as detectron2.structures.pairwise_iou)
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=inter > 0)
        iou[0] = 1.0  # the top box is in its own group, also when its area is 0
        member = iou >= iou_threshold
        groups.append((remaining[member], iou[member]))
        remaining = remaining[~member]
    return groups


def box_voting(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    iou_threshold: float = 0.65,
    soft_min_score: Optional[float] = 0.05,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-aware (soft) box voting, as the official Sparse R-CNN TTA ("cvpods style").

    Repeatedly take the highest-scoring remaining box (the top box) and its group: the remaining
    boxes of the same class with IoU >= ``iou_threshold`` to it (the top box included). The group
    leaves the pool and becomes one box, the score-weighted mean of its boxes, with the group's
    highest score. Soft voting (``soft_min_score`` not None) also keeps every member with its score
    multiplied by (1 - its IoU with the top box) where that is still >= ``soft_min_score`` (the top
    box itself gets 0 and goes); these soft copies do not vote again. A lone box (a group of one) is
    kept as it is. Groups never mix classes.

    Choices where the official code is silent: the top box always belongs to its own group (the
    official IoU is 0/0 for a box of zero area, which drops it); ties in score keep input order
    (stable sort); if a group's scores sum to 0, its boxes get equal weights.

    Args:
        boxes: (N, 4) xyxy; scores: (N,); classes: (N,) integer labels.
        iou_threshold: IoU with the top box from which a box joins its group (official 0.65).
        soft_min_score: lowest score of a soft copy that is kept (official 0.05); None: plain
            voting without soft copies.

    Returns:
        boxes (M, 4), scores (M,), classes (M,), sorted by decreasing score.
    """
    if not (boxes.dim() == 2 and boxes.shape[1] == 4 and len(scores) == len(classes) == len(boxes)):
        raise ValueError(
            f"box_voting expects boxes (N, 4), scores (N,) and classes (N,); got "
            f"{tuple(boxes.shape)}, {tuple(scores.shape)} and {tuple(classes.shape)}"
        )
    if len(boxes) == 0:
        return boxes[:0], scores[:0], classes[:0]
    # Sort by (class, decreasing score); the groups are found class by class on the CPU.
    order = scores.sort(descending=True, stable=True).indices
    order = order[classes[order].sort(stable=True).indices]
    boxes, scores, classes = boxes[order], scores[order], classes[order]
    boxes_np = boxes.detach().cpu().numpy()
    bounds = np.cumsum([0] + torch.unique_consecutive(classes, return_counts=True)[1].tolist())
    members, member_iou, group_of = [], [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        for index, iou in _voting_groups(boxes_np[start:end], iou_threshold):
            members.append(index + start)
            member_iou.append(iou)
            group_of.append(np.full(len(index), len(group_of)))
    device = boxes.device
    members = torch.as_tensor(np.concatenate(members), device=device)
    member_iou = torch.as_tensor(np.concatenate(member_iou), device=device, dtype=scores.dtype)
    group_of = torch.as_tensor(np.concatenate(group_of), device=device)
    num_groups = int(group_of[-1]) + 1
    tops = members[torch.cat([group_of.new_ones(1), group_of[1:] != group_of[:-1]]).bool()]

    # One box per group: the score-weighted mean of its members (a lone box stays as it is), with
    # the top box's score (the group's highest) and class.
    weights = scores[members]
    sizes = torch.bincount(group_of, minlength=num_groups)
    total = scores.new_zeros(num_groups).index_add_(0, group_of, weights)
    weights = torch.where(total[group_of] > 0, weights, torch.ones_like(weights))
    total = torch.where(total > 0, total, sizes.to(total.dtype))
    merged = boxes.new_zeros(num_groups, 4).index_add_(
        0, group_of, weights[:, None] * boxes[members]
    )
    merged = torch.where((sizes > 1)[:, None], merged / total[:, None], boxes[tops])
    out_boxes, out_scores, out_classes = [merged], [scores[tops]], [classes[tops]]
    if soft_min_score is not None:
        soft_scores = scores[members] * (1 - member_iou)
        soft = (sizes[group_of] > 1) & (soft_scores >= soft_min_score)
        out_boxes.append(boxes[members[soft]])
        out_scores.append(soft_scores[soft])
        out_classes.append(classes[members[soft]])
    out_boxes, out_scores, out_classes = map(torch.cat, (out_boxes, out_scores, out_classes))
    order = out_scores.sort(descending=True, stable=True).indices
    return out_boxes[order], out_scores[order], out_classes[order]


class SparseRCNNWithTTA(nn.Module):
    """A Sparse R-CNN (or Dynamic Sparse R-CNN) with test-time augmentation.

    Called like the model at inference: a list of dicts with "image" (C, H, W) in the model's input
    format (or "file_name") and optional "height"/"width" of the output; returns one
    {"instances": Instances with pred_boxes, scores, pred_classes} per image, in the
    "height" x "width" frame, boxes clipped to it, sorted by score. Inference only: the wrapped
    model must be in eval mode.

    ``SparseRCNNWithTTA(cfg, model)`` takes every setting from ``cfg.TEST.AUG`` (the official
    defaults, see ``sparse_rcnn/config.py``).
    """

    @configurable
    def __init__(
        self,
        *,
        model: nn.Module,
        min_sizes: Sequence[int] = OFFICIAL_MIN_SIZES,
        max_size: int = 4000,
        flip: bool = True,
        scale_ranges: Optional[Sequence[Tuple[float, float]]] = OFFICIAL_SCALE_RANGES,
        merge: str = "soft_vote",
        vote_thresh: float = 0.65,
        soft_vote_min_score: float = 0.05,
        nms_thresh: float = 0.5,
        max_detections: int = 100,
        batch_size: int = 2,
        input_format: str = "RGB",
        tta_mapper: Optional[Callable[[Dict], List[Dict]]] = None,
    ):
        """
        Args:
            model: a model with ``inference(batched_inputs, do_postprocess=False)`` that returns
                one Instances per input in the input image's frame (``SparseRCNN``); a
                DistributedDataParallel wrapper is removed.
            min_sizes: short sides of the augmented copies (official: 13 scales, 800 last).
            max_size: longest side of a copy (``ResizeShortestEdge``'s max_size).
            flip: also run every scale horizontally flipped.
            scale_ranges: one (min, max) of sqrt(box area) per entry of ``min_sizes``, in pixels
                of that copy: at that scale only boxes with min < sqrt(area) < max are kept (see
                :func:`filter_boxes_by_size`). Default: the official ranges, which fit only the
                official ``min_sizes``. None: no filter.
            merge: "soft_vote" (official), "vote" (voting without the soft copies) or "nms"
                (class-aware NMS at ``nms_thresh``).
            vote_thresh: IoU from which boxes vote together (official 0.65).
            soft_vote_min_score: lowest score of a kept soft copy (official 0.05).
            nms_thresh: IoU of the "nms" merge.
            max_detections: detections kept per image after merging (official: NUM_PROPOSALS;
                from a config: TEST.DETECTIONS_PER_IMAGE, 0 meaning NUM_PROPOSALS). Every copy
                gives the model's top NUM_PROPOSALS whatever this is (:func:`_every_proposal`), so
                that it changes how many merged detections are kept, not which.
            batch_size: augmented copies per forward pass. Copies come as (scale 1, scale 1
                flipped, scale 2, ...), so 2 runs each scale with its flip, two images of the
                same size, without padding one to the other.
            input_format: channel order of images read from "file_name" (cfg.INPUT.FORMAT).
            tta_mapper: dataset dict -> list of augmented dicts, each with "transforms" (from the
                original image to the copy). Default: ``DatasetMapperTTA(min_sizes, max_size,
                flip)``. With ``scale_ranges``, a custom mapper must return the copies grouped by
                scale, as many per scale, in the order of ``scale_ranges``.
        """
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not callable(getattr(model, "inference", None)):
            raise TypeError(
                "SparseRCNNWithTTA needs a model with inference(batched_inputs, "
                f"do_postprocess=False) (SparseRCNN); got {type(model).__name__}"
            )
        if merge not in MERGE_METHODS:
            raise ValueError(f"TEST.AUG.MERGE must be one of {MERGE_METHODS}, got {merge!r}")
        if int(batch_size) < 1:
            raise ValueError(f"TEST.AUG.BATCH_SIZE must be >= 1, got {batch_size}")
        if len(min_sizes) == 0:
            raise ValueError("TEST.AUG.MIN_SIZES is empty: give at least one short side")
        for name, value in (("VOTE_THRESH", vote_thresh), ("NMS_THRESH", nms_thresh)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"TEST.AUG.{name} is an IoU in (0, 1], got {value}")
        if scale_ranges is not None:
            scale_ranges = [tuple(float(v) for v in r) for r in scale_ranges]
            bad = [r for r in scale_ranges if len(r) != 2 or r[0] > r[1]]
            if bad:
                raise ValueError(
                    f"TEST.AUG.SCALE_RANGES must be (min, max) pairs with min <= max; got {bad}"
                )
            if tta_mapper is None and len(scale_ranges) != len(min_sizes):
                raise ValueError(
                    f"TEST.AUG.SCALE_RANGES has {len(scale_ranges)} ranges but TEST.AUG.MIN_SIZES "
                    f"{len(min_sizes)} scales: give one range per scale, or set "
                    "TEST.AUG.SCALE_FILTER False"
                )
        if getattr(getattr(model, "module", model), "mask_head", None) is not None:
            raise ValueError(
                "Test-time augmentation merges boxes only: a model with masks (MODEL.MASK_ON, "
                "QueryInst) would lose them. Evaluate it without TTA (TEST.AUG.ENABLED False / "
                "tta.enabled=False)."
            )
        self.model = model
        self.scale_ranges = scale_ranges
        self.merge = merge
        self.vote_thresh = float(vote_thresh)
        self.soft_vote_min_score = float(soft_vote_min_score)
        self.nms_thresh = float(nms_thresh)
        self.max_detections = int(max_detections)
        self.batch_size = int(batch_size)
        self.input_format = input_format
        if tta_mapper is None:
            tta_mapper = DatasetMapperTTA(min_sizes=list(min_sizes), max_size=max_size, flip=flip)
        self.tta_mapper = tta_mapper

    @classmethod
    def from_config(cls, cfg, model, tta_mapper=None, batch_size=None):
        aug = cfg.TEST.AUG
        return {
            "model": model,
            "min_sizes": tuple(aug.MIN_SIZES),
            "max_size": aug.MAX_SIZE,
            "flip": aug.FLIP,
            "scale_ranges": tuple(aug.SCALE_RANGES) if aug.SCALE_FILTER else None,
            "merge": aug.MERGE,
            "vote_thresh": aug.VOTE_THRESH,
            "soft_vote_min_score": aug.SOFT_VOTE_MIN_SCORE,
            "nms_thresh": aug.NMS_THRESH,
            "max_detections": (
                cfg.TEST.DETECTIONS_PER_IMAGE or cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS
            ),
            "batch_size": aug.BATCH_SIZE if batch_size is None else batch_size,
            "input_format": cfg.INPUT.FORMAT,
            "tta_mapper": tta_mapper,
        }

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        """Same inputs and outputs as ``SparseRCNN.forward`` at inference (see the class)."""
        if self.model.training:
            raise RuntimeError(
                "SparseRCNNWithTTA runs inference only: call .eval() on it (or the model) first"
            )
        with torch.no_grad():
            return [self._inference_one_image(self._maybe_read_image(x)) for x in batched_inputs]

    def _maybe_read_image(self, dataset_dict: Dict) -> Dict:
        ret = copy.copy(dataset_dict)
        if "image" not in ret:
            image = read_image(ret.pop("file_name"), self.input_format)
            ret["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if "height" not in ret or "width" not in ret:
            ret["height"], ret["width"] = ret["image"].shape[1:3]
        return ret

    def _inference_one_image(self, input: Dict) -> Dict[str, Instances]:
        orig_shape = (int(input["height"]), int(input["width"]))
        augmented_inputs = self.tta_mapper(input)
        tfms = [x.pop("transforms") for x in augmented_inputs]
        boxes, scores, classes = self._get_augmented_boxes(augmented_inputs, tfms)
        return {"instances": self._merge_detections(boxes, scores, classes, orig_shape)}

    def _batch_inference(self, batched_inputs: List[Dict]) -> List[Instances]:
        """The model's detections in every input, ``batch_size`` inputs per forward pass; each
        Instances in its input image's frame."""
        outputs = []
        with _every_proposal(self.model):
            for start in range(0, len(batched_inputs), self.batch_size):
                chunk = batched_inputs[start : start + self.batch_size]
                outputs.extend(self.model.inference(chunk, do_postprocess=False))
        return outputs

    def _get_augmented_boxes(
        self, augmented_inputs: List[Dict], tfms: List
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        """Detect in every copy, filter by box size at its scale, map back to the original image.

        Returns:
            per copy: boxes (n_i, 4) xyxy in the original image, scores (n_i,), classes (n_i,).
        """
        outputs = self._batch_inference(augmented_inputs)
        copies_per_scale = 1
        if self.scale_ranges is not None:
            copies_per_scale, rest = divmod(len(outputs), len(self.scale_ranges))
            if rest or copies_per_scale == 0:
                raise ValueError(
                    f"The TTA mapper made {len(outputs)} copies, which cannot be split evenly over "
                    f"the {len(self.scale_ranges)} entries of TEST.AUG.SCALE_RANGES"
                )
        all_boxes, all_scores, all_classes = [], [], []
        for index, (output, tfm) in enumerate(zip(outputs, tfms)):
            boxes, scores, classes = output.pred_boxes.tensor, output.scores, output.pred_classes
            if self.scale_ranges is not None:
                keep = filter_boxes_by_size(boxes, *self.scale_ranges[index // copies_per_scale])
                boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
            original = tfm.inverse().apply_box(boxes.detach().cpu().numpy())
            all_boxes.append(torch.as_tensor(original, dtype=boxes.dtype, device=boxes.device))
            all_scores.append(scores)
            all_classes.append(classes)
        return all_boxes, all_scores, all_classes

    def _merge_detections(
        self,
        boxes: List[torch.Tensor],
        scores: List[torch.Tensor],
        classes: List[torch.Tensor],
        shape_hw: Tuple[int, int],
    ) -> Instances:
        """Merge the copies' detections: (soft) voting or NMS, then clip to the image, drop boxes
        empty after clipping (as ``detector_postprocess`` does for the plain model) and keep the
        ``max_detections`` best."""
        boxes, scores, classes = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
        if self.merge == "nms":
            keep = batched_nms(boxes, scores, classes, self.nms_thresh)  # sorted by score
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        else:
            soft = self.soft_vote_min_score if self.merge == "soft_vote" else None
            boxes, scores, classes = box_voting(boxes, scores, classes, self.vote_thresh, soft)
        result_boxes = Boxes(boxes)
        result_boxes.clip(shape_hw)
        keep = result_boxes.nonempty().nonzero().squeeze(1)[: self.max_detections]
        result = Instances(shape_hw)
        result.pred_boxes = result_boxes[keep]
        result.scores = scores[keep]
        result.pred_classes = classes[keep].long()
        return result


@contextlib.contextmanager
def _every_proposal(model: nn.Module):
    """The model's official count of detections per copy (its top NUM_PROPOSALS: a
    ``detections_per_image`` of 0) while TTA runs it, restored afterwards; the merged detections
    are cut at ``max_detections`` instead. A model without the attribute is left as it is."""
    count = getattr(model, "detections_per_image", None)
    if count is None:
        yield
        return
    model.detections_per_image = 0
    try:
        yield
    finally:
        model.detections_per_image = count
