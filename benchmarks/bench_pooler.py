"""CPU benchmark of FastROIPooler vs Detectron2's ROIPooler (ROIAlignV2, 7x7, sampling ratio 2).

Records (``benchmarks/results/pooler.jsonl``): ``pooler_fwd_bwd`` / ``pooler_fwd``: one call
(forward + backward with an upstream gradient in the head's layout, or forward under ``no_grad``)
at the small training shape (8 images of 128 px, 50 boxes each, C = 128, P2-P5) and at 800x1333
(2 images padded to 800x1344, 100 or 300 boxes, C = 256); ``pooler_6_stages`` (small, forward +
backward) / ``pooler_6_stages_fwd`` (800x1333, 100 boxes): six calls on the same features, one per
head stage, the fast pooler laying them out once (``prepare``) as the head does; ``*_speedup``:
median(stock) / median(fast). The training step with either pooler: ``bench_train.py``.

``--onnx-ops``: instead, each level of an exported graph's pooling (``pooler_onnx_level``): the
P2-P5 maps of an 800x1216 image (C = 256, one image) and 300 boxes of the sizes that the level
assignment puts on the level (:func:`level_boxes`), forward, five ways: ONNX Runtime's
``RoiAlign`` (what the exported graph runs); ``Gather`` + ``MatMul`` on the channels-last matrix
with FastROIPooler's sparse entries (computed outside the graph, :class:`_GatherRows`); the same
samples as a 14x14 ``RoiAlign`` with one sample per bin and a 2x2 ``AveragePool``; ONNX
``GridSample`` (bilinear, border padding, channel-parallel) at the same 14x14 points and a 2x2
``AveragePool``; and eager ``FastROIPooler`` on its prepared matrix (what eager inference runs).
``pooler_onnx_level_check``: the largest differences of the others from ``RoiAlign``. See
README "Export and deployment".

Usage:
    python benchmarks/bench_pooler.py [--quick] [--threads 2] [--skip-big] [--min-run-time 2]
    python benchmarks/bench_pooler.py --onnx-ops [--threads 2]
"""

import argparse
import math
import os
import tempfile

import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

import common
from sparse_rcnn.poolers import FastROIPooler

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
POOLER = dict(output_size=7, scales=SCALES, sampling_ratio=2, pooler_type="ROIAlignV2")


def random_boxes(num: int, height: int, width: int, gen: torch.Generator) -> Boxes:
    """Uniform centres in the image, sides of 5%..100% of the image (xyxy)."""
    centre = torch.rand(num, 2, generator=gen) * torch.tensor([width, height])
    size = (torch.rand(num, 2, generator=gen) * 0.95 + 0.05) * torch.tensor([width, height])
    return Boxes(torch.cat([centre - size / 2, centre + size / 2], dim=1))


def bench(rec, args, shape, images, height, width, channels, boxes, stages, train):
    gen = torch.Generator().manual_seed(0)
    sizes = [(math.ceil(height * s), math.ceil(width * s)) for s in SCALES]
    feats = [
        torch.randn(images, channels, *hw, generator=gen).requires_grad_(train) for hw in sizes
    ]
    boxes_per_stage = [
        [random_boxes(boxes, height, width, gen) for _ in range(images)] for _ in range(stages)
    ]
    # The head consumes pooled.flatten(2).transpose(1, 2) (R, 49, C): its gradient arrives in that
    # (channels-last) memory layout.
    grads = [
        torch.randn(images * boxes, 49, channels, generator=gen)
        .transpose(1, 2)
        .unflatten(2, (7, 7))
        for _ in range(stages)
    ]

    def run(pooler, prepare):
        def fn():
            with torch.set_grad_enabled(train):
                x = pooler.prepare(feats) if prepare else feats
                outs = [pooler(x, b) for b in boxes_per_stage]
                if train:
                    torch.autograd.grad(outs, feats, grads)

        return fn

    fns = {"stock": run(ROIPooler(**POOLER), False), "fast": run(FastROIPooler(**POOLER), True)}
    config = dict(shape=shape, images=images, image_hw=[height, width], channels=channels)
    config.update(boxes_per_image=boxes, stages=stages, pooler=["ROIAlignV2", 7, 2])
    name = {1: "pooler_fwd_bwd" if train else "pooler_fwd"}.get(stages, "pooler_6_stages")
    name += "" if train or stages == 1 else "_fwd"
    rec.begin()
    results = common.measure(fns, args, torch.device("cpu"), memory=False)
    for impl, (m, _) in results.items():
        rec.emit(name, impl=impl, config=config, **common.stats_ms(m))
    speedup = round(results["stock"][0].median / results["fast"][0].median, 3)
    rec.emit(
        name + "_speedup", impl="fast", baseline="stock", config=config, speedup_median=speedup
    )


def level_boxes(
    num: int, height: int, width: int, level: int, gen: torch.Generator
) -> torch.Tensor:
    """Boxes that Detectron2's level assignment (224 px at P4) puts on ``level`` (0 = P2): square
    before clipping, side uniform in the level's range [56 * 2^level, 112 * 2^level) px (P2 from
    16 px), uniform centres, clipped to the image (so that all stay on it)."""
    low, high = (16.0 if level == 0 else 56.0 * 2**level), 112.0 * 2**level
    side = low + torch.rand(num, 1, generator=gen) * (high - low)
    centre = torch.rand(num, 2, generator=gen) * torch.tensor([width, height])
    boxes = Boxes(torch.cat([centre - side / 2, centre + side / 2], dim=1))
    boxes.clip((height, width))
    return boxes.tensor


class _GatherRows(torch.nn.Module):
    """RoIAlign as ONNX ``Gather`` + ``MatMul``: FastROIPooler's sparse entries (computed outside
    the graph) applied to the channels-last matrix, the embedding bag of its CPU path written with
    standard operators (every gathered sample is written before the weighted sum)."""

    def forward(self, matrix, cols, weights):
        rows = matrix[cols.flatten()].view(cols.shape[0], cols.shape[1], matrix.shape[1])
        return torch.matmul(weights.unsqueeze(1), rows)


def _onnx_session(nodes, inputs, threads: int):
    """A session of the graph of ``nodes`` with ``inputs`` [(name, shape)] and output "pooled"."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "pool",
        [
            helper.make_tensor_value_info(
                name, TensorProto.INT64 if name == "batch" else TensorProto.FLOAT, shape
            )
            for name, shape in inputs
        ],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _session(model.SerializeToString(), threads)


def _session(model, threads: int):
    """An ONNX Runtime session (CPU, ``threads`` intra-op threads) of a file or serialised model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def bench_onnx_ops(rec, args, level: int, boxes: int = 300, channels: int = 256):
    """One pyramid level of an 800x1216 image pooled five ways (see the module doc)."""
    from onnx import TensorProto, helper

    height, width, scale = 800, 1216, SCALES[level]
    h, w = math.ceil(height * scale), math.ceil(width * scale)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, channels, h, w, generator=gen)
    box_tensor = level_boxes(boxes, height, width, level, gen)

    def roi_align_node(output: str, size: int, samples: int):
        return helper.make_node(
            "RoiAlign",
            ["features", "rois", "batch"],
            [output],
            output_height=size,
            output_width=size,
            sampling_ratio=samples,
            spatial_scale=scale,
            coordinate_transformation_mode="half_pixel",  # aligned=True (ROIAlignV2)
        )

    roi_inputs = [("features", [1, channels, h, w]), ("rois", [boxes, 4]), ("batch", [boxes])]
    roi_align = _onnx_session([roi_align_node("pooled", 7, 2)], roi_inputs, args.threads)
    # The same samples as a 14x14 RoiAlign with one sample per bin, averaged 2x2.
    average = helper.make_node(
        "AveragePool", ["s"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]
    )
    roi_align_14 = _onnx_session([roi_align_node("s", 14, 1), average], roi_inputs, args.threads)
    # ROIAlignV2's sample points: bin centres of a 14x14 grid on the box, in feature pixels
    # (half-pixel offset), normalised for GridSample's align_corners=1.
    x1, y1, x2, y2 = (box_tensor[:, i] * scale - 0.5 for i in range(4))
    t = (torch.arange(14) + 0.5) / 14
    xs = (x1[:, None] + t * (x2 - x1)[:, None]) * 2 / (w - 1) - 1
    ys = (y1[:, None] + t * (y2 - y1)[:, None]) * 2 / (h - 1) - 1
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), -1)
    grid = grid.reshape(1, boxes * 14, 14, 2)
    shape = helper.make_tensor("shape", TensorProto.INT64, [4], [channels, boxes, 14, 14])
    grid_sample = _onnx_session(
        [
            helper.make_node(
                "GridSample", ["features", "grid"], ["s"], align_corners=1, padding_mode="border"
            ),
            helper.make_node("Constant", [], ["shape"], value=shape),
            helper.make_node("Reshape", ["s", "shape"], ["s2"]),
            helper.make_node(
                "AveragePool", ["s2"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]
            ),
        ],
        [("features", [1, channels, h, w]), ("grid", [1, boxes * 14, 14, 2])],
        args.threads,
    )
    feed_ra = {
        "features": feats.numpy(),
        "rois": box_tensor.numpy(),
        "batch": torch.zeros(boxes, dtype=torch.int64).numpy(),
    }
    feed_gs = {"features": feats.numpy(), "grid": grid.numpy()}
    # Boxes inside the image: GridSample's border padding then equals RoIAlign's clamping.
    reference = torch.from_numpy(roi_align.run(None, feed_ra)[0])
    via_14 = torch.from_numpy(roi_align_14.run(None, feed_ra)[0])
    via_grid = torch.from_numpy(grid_sample.run(None, feed_gs)[0]).transpose(0, 1)
    fast = FastROIPooler(output_size=7, scales=[scale], sampling_ratio=2, pooler_type="ROIAlignV2")
    prepared = fast.prepare([feats])
    gather_path = os.path.join(tempfile.mkdtemp(prefix="bench_pooler_"), "gather.onnx")
    cols, weights = fast._sampling_entries(prepared, [Boxes(box_tensor)], [boxes])
    cols = cols.long()
    torch.onnx.export(
        _GatherRows(),
        (prepared.matrix, cols, weights),
        gather_path,
        input_names=["matrix", "cols", "weights"],
        output_names=["pooled"],
        dynamic_axes={"matrix": {0: "p"}, "cols": {0: "bins"}, "weights": {0: "bins"}},
        opset_version=17,
    )
    gather = _session(gather_path, args.threads)
    feed_gather = {
        "matrix": prepared.matrix.numpy(),
        "cols": cols.numpy(),
        "weights": weights.numpy(),
    }
    via_gather = torch.from_numpy(gather.run(None, feed_gather)[0]).view(boxes, 7, 7, channels)
    via_gather = via_gather.permute(0, 3, 1, 2)
    with torch.no_grad():
        fast_diff = (fast(prepared, [Boxes(box_tensor)]) - reference).abs().max().item()

    def run_fast():
        with torch.no_grad():
            fast(prepared, [Boxes(box_tensor)])

    fns = {
        "onnxruntime_RoiAlign": lambda: roi_align.run(None, feed_ra),
        "onnxruntime_Gather_MatMul": lambda: gather.run(None, feed_gather),
        "onnxruntime_RoiAlign14_AveragePool": lambda: roi_align_14.run(None, feed_ra),
        "onnxruntime_GridSample_AveragePool": lambda: grid_sample.run(None, feed_gs),
        "eager_FastROIPooler_prepared": run_fast,
    }
    sides = (box_tensor[:, 2:] - box_tensor[:, :2]).prod(1).sqrt()
    config = dict(level=f"p{level + 2}", feature_hw=[h, w], channels=channels, boxes=boxes)
    config["box_sqrt_area_px"] = [round(sides.min().item()), round(sides.max().item())]
    rec.begin()
    results = common.measure(fns, args, torch.device("cpu"), memory=False)
    for impl, (m, _) in results.items():
        rec.emit("pooler_onnx_level", impl=impl, config=config, **common.stats_ms(m))
    rec.emit(
        "pooler_onnx_level_check",
        config=config,
        max_diff_gather_matmul_vs_roialign=(via_gather - reference).abs().max().item(),
        max_diff_roialign14_vs_roialign=(via_14 - reference).abs().max().item(),
        max_diff_gridsample_vs_roialign=(via_grid - reference).abs().max().item(),
        max_diff_fast_vs_roialign=fast_diff,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-big", action="store_true", help="skip the 800x1333 shapes")
    parser.add_argument("--onnx-ops", action="store_true", help="the exported graph's pooling")
    args, _, rec = common.parse_args(parser, "pooler.jsonl", min_run_time=2.0)
    if args.onnx_ops:
        for level in range(4):
            bench_onnx_ops(rec, args, level)
        return
    for train in (True, False):
        bench(rec, args, "small", 8, 128, 128, 128, 50, 1, train)
    bench(rec, args, "small", 8, 128, 128, 128, 50, 6, True)
    if not args.skip_big:
        for boxes in (100, 300):
            for train in (True, False):
                bench(rec, args, "800x1333", 2, 800, 1344, 256, boxes, 1, train)
        bench(rec, args, "800x1333", 2, 800, 1344, 256, 100, 6, False)


if __name__ == "__main__":
    main()
