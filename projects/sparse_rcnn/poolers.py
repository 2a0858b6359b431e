"""A faster multi-level RoIAlign pooler for CPU training.

:class:`FastROIPooler` is a drop-in replacement for Detectron2's :class:`ROIPooler` (same
constructor, same level assignment, same output order and values) whose CPU path expresses
RoIAlign as a sparse linear map of the feature maps:

* All levels are laid out once as one channels-last matrix ``F`` of shape (P, C), one row per
  feature-map position, P = sum over levels of B * H_l * W_l.
* Every output position (RoI r, bin (ph, pw)) is a weighted sum of K = 4 * sr * sr rows of ``F``
  (sr x sr bilinear samples, 4 neighbours each, weights divided by sr * sr): an embedding bag.
  The forward is ``F.embedding_bag(cols, F, per_sample_weights=weights, mode="sum")``.
* The backward w.r.t. ``F`` is the transposed map. Its entries are grouped by feature position
  with one sort of the column indices and the result is again an embedding bag, now over the
  upstream gradient (multi-threaded, no atomics). torchvision's CPU RoIAlign backward instead
  recomputes the bilinear weights for every channel, scatters single values and zero-fills a
  full-size gradient per level and call.
* The sparse entries (int32 column + weight per entry, 4 * sr * sr per bin) are kept for the
  backward: 2.5 MB for 400 RoIs of 7x7 bins with sr = 2.

The sample positions and weights reproduce torchvision's CPU kernel: the box is scaled (and
shifted by -0.5 for ``ROIAlignV2``), samples lie at ``start + ph * bin + (iy + 0.5) * bin / sr``,
samples with ``y < -1`` or ``y > H`` (or ``x`` likewise) contribute 0, coordinates are clamped to
>= 0 and at the last row/column both neighbours are the last one; the sum is divided by sr * sr.

CUDA tensors, dtypes other than float32/float64, and tracing/scripting use the stock
:class:`ROIPooler` path (torchvision's CUDA kernel is fast; float16 on CPU is rare). Only
``ROIAlign``/``ROIAlignV2`` with a fixed ``sampling_ratio > 0`` are supported; other settings raise
``ValueError``.

As in torchvision, the pooled features carry no gradient to the boxes.
"""

from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.modeling.poolers import (
    ROIPooler,
    assign_boxes_to_levels,
)
from detectron2.structures import Boxes

from .tracing import is_fx_symbolic_tracing, is_tracing

__all__ = ["FastROIPooler", "PreparedFeatures"]

_FAST_DTYPES = (torch.float32, torch.float64)


@dataclass
class PreparedFeatures:
    """Feature maps of all levels laid out as one channels-last matrix, see
    :meth:`FastROIPooler.prepare`.

    Attributes:
        matrix: (P, C) rows ordered by (level, image, y, x), P = sum_l B * H_l * W_l.
        level_shapes: (H_l, W_l) of every level.
        level_offsets: first row of every level in ``matrix``.
        batch_size: B.
    """

    matrix: torch.Tensor
    level_shapes: List[Tuple[int, int]]
    level_offsets: List[int]
    batch_size: int

    def __len__(self) -> int:
        return len(self.level_shapes)


def _channels_last_concat(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, C, H_l, W_l) maps -> one (sum_l B*H_l*W_l, C) matrix, with a single copy."""
    channels = features[0].shape[1]
    sizes = [t.shape[0] * t.shape[2] * t.shape[3] for t in features]
    out = features[0].new_empty((sum(sizes), channels))
    start = 0
    for t, size in zip(features, sizes):
        out[start : start + size].view(t.shape[0], t.shape[2], t.shape[3], channels).copy_(
            t.permute(0, 2, 3, 1)
        )
        start += size
    return out


class _ChannelsLastConcat(torch.autograd.Function):
    """:func:`_channels_last_concat` whose backward returns channels-last views of the incoming
    gradient (no copy)."""

    @staticmethod
    def forward(ctx, *features: torch.Tensor) -> torch.Tensor:
        ctx.shapes = [tuple(t.shape) for t in features]
        return _channels_last_concat(features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads = []
        start = 0
        for b, c, h, w in ctx.shapes:
            size = b * h * w
            grads.append(grad[start : start + size].view(b, h, w, c).permute(0, 3, 1, 2))
            start += size
        return tuple(grads)


def _transposed_embedding_bag(
    cols: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor, num_rows: int
) -> torch.Tensor:
    """``W^T @ grad`` for the sparse (M, P) matrix W with K entries per row.

    The entries are grouped by column (feature row) with one sort; every feature row is then an
    embedding bag (weighted sum) of the gradient rows of the bins that sample it.

    Args:
        cols: (M, K) column of every entry (int32 or int64).
        weights: (M, K) value of every entry.
        grad: (M, C).
        num_rows: P.

    Returns:
        (P, C).
    """
    entries_per_row = cols.shape[1]
    flat = cols.reshape(-1)
    _, order = torch.sort(flat, stable=True)
    # After sorting, entry e belongs to bin order[e] // K.
    if entries_per_row & (entries_per_row - 1) == 0:
        rows = torch.bitwise_right_shift(order, entries_per_row.bit_length() - 1)
    else:
        rows = torch.div(order, entries_per_row, rounding_mode="floor")
    offsets = flat.new_zeros(num_rows + 1)
    torch.cumsum(torch.bincount(flat, minlength=num_rows), 0, out=offsets[1:])
    return F.embedding_bag(
        rows.to(flat.dtype),
        grad,
        offsets,
        mode="sum",
        per_sample_weights=weights.reshape(-1)[order],
        include_last_offset=True,
    )


class _SparseRoIAlign(torch.autograd.Function):
    """pooled = W @ features for a constant sparse W (one embedding bag per bin)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor):
        ctx.save_for_backward(cols, weights)
        ctx.num_rows = features.shape[0]
        return F.embedding_bag(cols, features.detach(), mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_features = None
        if ctx.needs_input_grad[0]:
            cols, weights = ctx.saved_tensors
            grad_features = _transposed_embedding_bag(
                cols, weights, grad.contiguous(), ctx.num_rows
            )
        return grad_features, None, None


def _bilinear_taps(
    start: torch.Tensor, bin_size: torch.Tensor, size: torch.Tensor, bins: int, samples: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """1-D bilinear taps of RoIAlign along one axis, as torchvision's CPU kernel computes them.

    Args:
        start: (R,) RoI start coordinate in feature-map pixels (after scale and offset).
        bin_size: (R,) RoI size / bins.
        size: (R,) feature-map size (H or W) along this axis, same dtype as ``start``.
        bins: S, output bins along this axis.
        samples: sr, samples per bin along this axis.

    Returns:
        index (R, S, 2 * sr) int64 and weight (R, S, 2 * sr): the low and high neighbour of
        every sample, ordered (sample, neighbour). Weights are 0 for samples outside
        [-1, size]; at the last row/column both neighbours are the last one (high weight 0).
    """
    dtype, device = start.dtype, start.device
    grid = torch.arange(bins, dtype=dtype, device=device).view(1, bins, 1)
    offset = (torch.arange(samples, dtype=dtype, device=device) + 0.5).view(1, 1, samples)
    start, bin_size, size = (t.view(-1, 1, 1) for t in (start, bin_size, size))
    # Same operation order as torchvision: start + ph * bin + (i + .5) * bin / sr.
    coord = (start + grid * bin_size) + offset * bin_size / samples
    valid = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0.0)
    low = coord.floor()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coord), coord - low)
    weight = torch.stack([1.0 - frac, frac], dim=-1)
    weight = torch.where(valid.unsqueeze(-1), weight, torch.zeros_like(weight))
    index = torch.stack([low, high], dim=-1).to(torch.int64)
    return index.flatten(2), weight.flatten(2)


class FastROIPooler(ROIPooler):
    """:class:`ROIPooler` with a fast CPU RoIAlign (forward and backward), see the module doc.

    Same constructor and ``forward(x, box_lists)`` as :class:`ROIPooler`. On CPU with float32 or
    float64 features the output is a (R, C, S, S) tensor in channels-last memory layout (strides
    of ``torch.channels_last``, i.e. (R, S, S, C) in memory): ``flatten(2).transpose(1, 2)`` gives
    a contiguous (R, S*S, C) without a copy. Use ``.contiguous()`` where NCHW memory is needed.

    Every call with a list of maps first copies all of them into one channels-last matrix.
    Callers that pool the same maps several times (the head's stages) should do that once with
    :meth:`prepare` and pass the result instead of the list: on large maps with few boxes the
    copy costs more than the stock forward (about 4x for 800x1333 inputs with 100 boxes each; a
    prepared call costs a third of the stock one: docs/benchmarks.md, "RoI pooling").
    """

    def __init__(
        self,
        output_size,
        scales,
        sampling_ratio,
        pooler_type,
        canonical_box_size=224,
        canonical_level=4,
    ):
        """
        Args:
            output_size (int or (int, int)): S, the pooled size.
            scales (list[float]): 1 / stride of every level, a pyramid as for ROIPooler.
            sampling_ratio (int): samples per bin along each axis; must be > 0 (the adaptive
                ``0`` of RoIAlign is not supported).
            pooler_type (str): "ROIAlignV2" (aligned) or "ROIAlign" (legacy, not aligned).
            canonical_box_size, canonical_level: level assignment, as in ROIPooler.
        """
        if pooler_type not in ("ROIAlign", "ROIAlignV2"):
            raise ValueError(
                f"FastROIPooler supports pooler_type 'ROIAlignV2' and 'ROIAlign', got "
                f"{pooler_type!r}; use detectron2's ROIPooler for it."
            )
        if int(sampling_ratio) != sampling_ratio or sampling_ratio <= 0:
            raise ValueError(
                f"FastROIPooler needs a fixed sampling_ratio > 0, got {sampling_ratio} (adaptive "
                "sampling is not supported); use detectron2's ROIPooler for it."
            )
        super().__init__(
            output_size,
            scales,
            sampling_ratio,
            pooler_type,
            canonical_box_size=canonical_box_size,
            canonical_level=canonical_level,
        )
        self.scales = tuple(float(s) for s in scales)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = pooler_type == "ROIAlignV2"

    def _use_fast_path(self, x: Sequence[torch.Tensor]) -> bool:
        if torch.jit.is_scripting() or is_tracing() or is_fx_symbolic_tracing():
            return False
        return all(t.device.type == "cpu" and t.dtype in _FAST_DTYPES for t in x)

    def prepare(self, x: List[torch.Tensor]) -> Union[PreparedFeatures, List[torch.Tensor]]:
        """Lays out the feature maps once for several :meth:`forward` calls (one copy).

        Args:
            x: feature maps (B, C, H_l, W_l), one per level.

        Returns:
            A :class:`PreparedFeatures` to pass to :meth:`forward` instead of ``x``, or ``x``
            itself where the stock path is used (CUDA, other dtypes, tracing). Gradients flow
            from every forward that uses it back to ``x``.
        """
        if isinstance(x, PreparedFeatures) or not self._use_fast_path(x):
            return x
        if not isinstance(x, (list, tuple)) or len(x) != len(self.level_poolers):
            raise ValueError(
                f"Expected a list of {len(self.level_poolers)} feature maps, got "
                f"{len(x) if isinstance(x, (list, tuple)) else type(x)}"
            )
        batch, channels = x[0].shape[:2]
        for t in x:
            if t.dim() != 4 or t.shape[0] != batch or t.shape[1] != channels:
                raise ValueError(
                    "Feature maps must be (B, C, H, W) with the same B and C, got "
                    f"{[tuple(t.shape) for t in x]}"
                )
        shapes = [(int(t.shape[2]), int(t.shape[3])) for t in x]
        if torch.is_grad_enabled() and any(t.requires_grad for t in x):
            matrix = _ChannelsLastConcat.apply(*x)
        else:
            matrix = _channels_last_concat(x)
        offsets, start = [], 0
        for h, w in shapes:
            offsets.append(start)
            start += batch * h * w
        return PreparedFeatures(matrix, shapes, offsets, int(batch))

    def forward(
        self, x: Union[List[torch.Tensor], PreparedFeatures], box_lists: List[Boxes]
    ) -> torch.Tensor:
        """
        Args:
            x: feature maps (B, C, H_l, W_l) in the order of ``scales``, or their
                :meth:`prepare` d form.
            box_lists: B :class:`Boxes` in input-image pixels (xyxy).

        Returns:
            (R, C, S, S) pooled features, R = total number of boxes, in the order of the
            concatenated ``box_lists``. On the fast path its memory is channels-last.
        """
        if not isinstance(x, PreparedFeatures):
            if is_tracing():
                return self._forward_traceable(x, box_lists)
            if not self._use_fast_path(x):
                return super().forward(x, box_lists)
            x = self.prepare(x)
        if not isinstance(box_lists, list):
            raise TypeError("Arguments to pooler must be lists")
        if len(box_lists) != x.batch_size:
            raise ValueError(
                f"The feature maps have batch size {x.batch_size} but box_lists has "
                f"{len(box_lists)} entries"
            )
        matrix = x.matrix
        channels = matrix.shape[1]
        out_h, out_w = self.output_size
        num_boxes = [len(b) for b in box_lists]
        total = sum(num_boxes)
        if total == 0:
            return matrix.new_zeros((0, channels, out_h, out_w))

        cols, weights = self._sampling_entries(x, box_lists, num_boxes)
        if torch.is_grad_enabled() and matrix.requires_grad:
            pooled = _SparseRoIAlign.apply(matrix, cols, weights)
        else:
            pooled = F.embedding_bag(cols, matrix, mode="sum", per_sample_weights=weights)
        return pooled.view(total, out_h, out_w, channels).permute(0, 3, 1, 2)

    def _forward_traceable(self, x: List[torch.Tensor], box_lists: List[Boxes]) -> torch.Tensor:
        """ROIPooler's forward for tracing: the same values in the same order, without its
        ``index_put_`` of every level's RoIs into a zero tensor (4 ONNX ScatterND per call, each
        writing the whole output): the levels' RoIs are pooled, concatenated and put back in
        input order with one gather by the inverse permutation.
        """
        pooler_fmt_boxes = _pooler_format_boxes(box_lists)
        if len(self.level_poolers) == 1:
            return self.level_poolers[0](x[0], pooler_fmt_boxes)
        levels = assign_boxes_to_levels(
            box_lists, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        order, pooled = [], []
        for level, pooler in enumerate(self.level_poolers):
            inds = torch.nonzero(levels == level).squeeze(1)
            order.append(inds)
            pooled.append(pooler(x[level], pooler_fmt_boxes[inds]))
        return torch.cat(pooled)[torch.argsort(torch.cat(order))]

    def _sampling_entries(
        self, x: PreparedFeatures, box_lists: List[Boxes], num_boxes: List[int]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The sparse RoIAlign matrix: R boxes, S x S bins, sr x sr samples of 4 neighbours.

        Returns:
            cols (R*S*S, 4*sr*sr): matrix rows of the neighbours of every bin's samples, ordered
            (iy, y neighbour, ix, x neighbour); weights (R*S*S, 4*sr*sr): their bilinear weights
            divided by sr * sr.
        """
        matrix = x.matrix
        device, dtype = matrix.device, matrix.dtype
        total = sum(num_boxes)
        out_h, out_w = self.output_size
        sr = self.sampling_ratio
        boxes = torch.cat([b.tensor for b in box_lists]).detach().to(device=device, dtype=dtype)
        if len(x) == 1:
            levels = torch.zeros(total, dtype=torch.int64, device=device)
        else:
            levels = assign_boxes_to_levels(
                box_lists,
                self.min_level,
                self.max_level,
                self.canonical_box_size,
                self.canonical_level,
            ).to(device)
        image = torch.repeat_interleave(
            torch.arange(len(box_lists), device=device),
            torch.as_tensor(num_boxes, device=device),
        )
        heights = torch.tensor([h for h, _ in x.level_shapes], device=device)[levels]
        widths = torch.tensor([w for _, w in x.level_shapes], device=device)[levels]
        # First matrix row of each box's image in its level.
        image_start = torch.tensor(x.level_offsets, device=device)[levels] + image * (
            heights * widths
        )
        scale = torch.tensor(self.scales, dtype=dtype, device=device)[levels]

        scaled = boxes * scale[:, None] - (0.5 if self.aligned else 0.0)
        start_x, start_y = scaled[:, 0], scaled[:, 1]
        roi_w, roi_h = scaled[:, 2] - start_x, scaled[:, 3] - start_y
        if not self.aligned:
            roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
        y_index, y_weight = _bilinear_taps(start_y, roi_h / out_h, heights.to(dtype), out_h, sr)
        x_index, x_weight = _bilinear_taps(start_x, roi_w / out_w, widths.to(dtype), out_w, sr)

        # Separable: entry (ph, pw, y tap, x tap) = row of the y tap + column of the x tap,
        # weight = y weight * x weight. Broadcasting over (R, S, S, 2sr, 2sr).
        taps = 2 * sr
        num_entries = total * out_h * out_w * taps * taps
        small = max(matrix.shape[0], num_entries) < 2**31
        index_dtype = torch.int32 if small else torch.int64
        y_rows = (image_start.view(-1, 1, 1) + y_index * widths.view(-1, 1, 1)).to(index_dtype)
        cols = y_rows.view(total, out_h, 1, taps, 1) + x_index.to(index_dtype).view(
            total, 1, out_w, 1, taps
        )
        weights = (y_weight / (sr * sr)).view(total, out_h, 1, taps, 1) * x_weight.view(
            total, 1, out_w, 1, taps
        )
        num_bins = total * out_h * out_w
        return cols.view(num_bins, -1), weights.view(num_bins, -1)


def _pooler_format_boxes(box_lists: List[Boxes]) -> torch.Tensor:
    """Detectron2's ``convert_boxes_to_pooler_format`` (R, 5) rows (image index, x0, y0, x1, y1),
    with the image indices filled per image instead of by ``repeat_interleave``, whose output size
    ``torch.export`` cannot know (the ONNX exporter then fails on its ``sym_numel``).

    Args:
        box_lists: B :class:`Boxes`, one per image.
    """
    boxes = torch.cat([b.tensor for b in box_lists])
    indices = [
        torch.full((len(b), 1), float(i), dtype=boxes.dtype, device=boxes.device)
        for i, b in enumerate(box_lists)
    ]
    return torch.cat([torch.cat(indices), boxes], dim=1)
