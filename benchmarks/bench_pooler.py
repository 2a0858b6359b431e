"""CPU benchmark of FastROIPooler vs Detectron2's ROIPooler (ROIAlignV2, 7x7, sampling ratio 2).

Measurements (one JSON object per line on stdout, also appended to --out):

1. ``pooler_fwd_bwd`` / ``pooler_fwd``: one pooler call (forward + backward with a random
   upstream gradient laid out as the Sparse R-CNN head produces it, or forward only under
   ``no_grad``) at the small training config (8 images of 128 px, 50 boxes each, C = 128,
   p2-p5) and at an 800x1333 config (2 images padded to 800x1344, 100 or 300 boxes each,
   C = 256).
2. ``pooler_6_stages``: six pooler calls on the same features (one per head stage, different
   boxes) and one backward: stock, fast, and fast with the features laid out once
   (``FastROIPooler.prepare``); ``pooler_6_stages_fwd``: the same, forward only under
   ``no_grad`` (inference) at the 800x1333 shape with 100 boxes per image.
3. ``train_step``: forward + backward of a small Sparse R-CNN (configs/sparse_rcnn_tiny_cpu.yaml
   with ResNet-18, FPN/hidden 128, 50 proposals, 8 images of 128 px, 3 random GT boxes each),
   with ``model.head.box_pooler`` swapped: stock, fast, and fast + prepare (the head calling
   ``box_pooler.prepare(features)`` once before its stages, emulated by wrapping its forward).

Implementations are interleaved (round robin) in every repeat; min/median/max are over the
repeats after warm-up. ``*_speedup`` records give median(stock) / median(impl).

Usage:
    python benchmarks/bench_pooler.py [--quick] [--threads 2] [--skip-big] [--skip-step]
"""

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Dict

import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes, Instances

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "projects"))

import common  # noqa: E402  (benchmarks/common.py)
from common import Recorder, time_interleaved  # noqa: E402
from sparse_rcnn.poolers import FastROIPooler  # noqa: E402

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
RESOLUTION, SAMPLING_RATIO, POOLER_TYPE = 7, 2, "ROIAlignV2"
CPU = torch.device("cpu")

STEP_OPTS = [
    "MODEL.RESNETS.DEPTH", 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.RESNETS.STEM_OUT_CHANNELS", 64,
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.FPN.OUT_CHANNELS", 128,
    "MODEL.SPARSE_RCNN.HIDDEN_DIM", 128,
    "MODEL.SPARSE_RCNN.NHEADS", 8,
    "MODEL.SPARSE_RCNN.DIM_FEEDFORWARD", 512,
    "MODEL.SPARSE_RCNN.DIM_DYNAMIC", 32,
    "MODEL.SPARSE_RCNN.NUM_PROPOSALS", 50,
]  # fmt: skip


def report(rec: Recorder, benchmark: str, config: Dict, times, warmup: int) -> None:
    """One record per implementation (seconds in ``times``), and speed-ups over "stock"."""
    for impl, values in times.items():
        rec.emit(
            {
                "benchmark": benchmark,
                "impl": impl,
                "config": config,
                "warmup": warmup,
                "repeats": len(values),
                **common.stats_ms(values),
            }
        )
    if "stock" in times:
        base = statistics.median(times["stock"])
        for impl, values in times.items():
            if impl != "stock":
                rec.emit(
                    {
                        "benchmark": benchmark + "_speedup",
                        "impl": impl,
                        "baseline": "stock",
                        "config": config,
                        "speedup_median": round(base / statistics.median(values), 3),
                        "speedup_min": round(min(times["stock"]) / min(values), 3),
                    }
                )


def random_boxes(num: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Boxes with uniform centres in the image and sides of 5%..100% of the image (xyxy)."""
    centre = torch.rand(num, 2, generator=gen) * torch.tensor([width, height])
    size = (torch.rand(num, 2, generator=gen) * 0.95 + 0.05) * torch.tensor([width, height])
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def make_pooler_inputs(images: int, height: int, width: int, channels: int, boxes: int, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = [
        torch.randn(images, channels, math.ceil(height * s), math.ceil(width * s), generator=gen)
        for s in SCALES
    ]
    box_lists = [Boxes(random_boxes(boxes, height, width, gen)) for _ in range(images)]
    return feats, box_lists, gen


def head_layout_grad(num_rois: int, channels: int, gen: torch.Generator) -> torch.Tensor:
    # The head consumes pooled.flatten(2).transpose(1, 2) (R, S*S, C); its gradient arrives in
    # that (channels-last) memory layout.
    grad = torch.randn(num_rois, RESOLUTION * RESOLUTION, channels, generator=gen)
    return grad.transpose(1, 2).view(num_rois, channels, RESOLUTION, RESOLUTION)


def bench_single_call(rec, name, images, height, width, channels, boxes, warmup, repeats):
    feats, box_lists, gen = make_pooler_inputs(images, height, width, channels, boxes)
    feats = [f.requires_grad_() for f in feats]
    grad = head_layout_grad(images * boxes, channels, gen)
    poolers = {
        "stock": ROIPooler(RESOLUTION, SCALES, SAMPLING_RATIO, POOLER_TYPE),
        "fast": FastROIPooler(RESOLUTION, SCALES, SAMPLING_RATIO, POOLER_TYPE),
    }

    def fwd_bwd(pooler):
        def run():
            out = pooler(feats, box_lists)
            torch.autograd.grad(out, feats, grad)

        return run

    def fwd(pooler):
        def run():
            with torch.no_grad():
                pooler(feats, box_lists)

        return run

    config = {
        "shape": name,
        "images": images,
        "image_hw": [height, width],
        "channels": channels,
        "boxes_per_image": boxes,
        "feature_hw": [list(f.shape[2:]) for f in feats],
        "pooler": [POOLER_TYPE, RESOLUTION, SAMPLING_RATIO],
    }
    times = time_interleaved({k: fwd_bwd(p) for k, p in poolers.items()}, warmup, repeats, CPU)
    report(rec, "pooler_fwd_bwd", config, times, warmup)
    times = time_interleaved({k: fwd(p) for k, p in poolers.items()}, warmup, repeats, CPU)
    report(rec, "pooler_fwd", config, times, warmup)


def bench_six_stages(rec, name, images, height, width, channels, boxes, train, warmup, reps):
    """Six pooler calls on the same features (the head's stages) + one backward if ``train``."""
    feats, _, gen = make_pooler_inputs(images, height, width, channels, boxes)
    feats = [f.requires_grad_(train) for f in feats]
    stage_boxes = [
        [Boxes(random_boxes(boxes, height, width, gen)) for _ in range(images)] for _ in range(6)
    ]
    grads = [head_layout_grad(images * boxes, channels, gen) for _ in range(6)]
    stock = ROIPooler(RESOLUTION, SCALES, SAMPLING_RATIO, POOLER_TYPE)
    fast = FastROIPooler(RESOLUTION, SCALES, SAMPLING_RATIO, POOLER_TYPE)

    def run(pooler, prepare):
        def fn():
            with torch.set_grad_enabled(train):
                x = pooler.prepare(feats) if prepare else feats
                outs = [pooler(x, b) for b in stage_boxes]
                if train:
                    torch.autograd.grad(outs, feats, grads)

        return fn

    fns = {"stock": run(stock, False), "fast": run(fast, False), "fast_prepare": run(fast, True)}
    config = {
        "shape": name,
        "images": images,
        "image_hw": [height, width],
        "channels": channels,
        "boxes_per_image": boxes,
        "stages": 6,
        "mode": "forward+backward" if train else "forward (no_grad)",
        "pooler": [POOLER_TYPE, RESOLUTION, SAMPLING_RATIO],
    }
    benchmark = "pooler_6_stages" + ("" if train else "_fwd")
    report(rec, benchmark, config, time_interleaved(fns, warmup, reps, CPU), warmup)


def build_step_model():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from sparse_rcnn import add_sparse_rcnn_config

    cfg = get_cfg()
    add_sparse_rcnn_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "sparse_rcnn_tiny_cpu.yaml"))
    cfg.merge_from_list(list(STEP_OPTS))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    return model


def step_inputs(images: int = 8, size: int = 128, gt_per_image: int = 3, num_classes: int = 3):
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(images):
        instances = Instances((size, size))
        xy = torch.rand(gt_per_image, 2, generator=gen) * size * 0.75
        wh = torch.rand(gt_per_image, 2, generator=gen) * size * 0.45 + 8
        instances.gt_boxes = Boxes(torch.cat([xy, (xy + wh).clamp(max=size)], dim=1))
        instances.gt_classes = torch.randint(0, num_classes, (gt_per_image,), generator=gen)
        image = torch.rand(3, size, size, generator=gen) * 255
        inputs.append({"image": image, "instances": instances})
    return inputs


def bench_train_step(rec, warmup, repeats):
    model = build_step_model()
    head = model.head
    stock = head.box_pooler
    fast = FastROIPooler(
        stock.output_size,
        SCALES,
        stock.level_poolers[0].sampling_ratio,
        POOLER_TYPE,
        canonical_box_size=stock.canonical_box_size,
        canonical_level=stock.canonical_level,
    )
    inputs = step_inputs()
    head_forward = type(head).forward

    def prepared_forward(features, *args, **kwargs):
        return head_forward(head, head.box_pooler.prepare(features), *args, **kwargs)

    def step(pooler, prepare):
        def fn():
            head.box_pooler = pooler
            if prepare:
                head.forward = prepared_forward
            try:
                losses = model(inputs)
                sum(losses.values()).backward()
            finally:
                head.__dict__.pop("forward", None)
            model.zero_grad(set_to_none=True)

        return fn

    fns = {"stock": step(stock, False), "fast": step(fast, False), "fast_prepare": step(fast, True)}
    config = {
        "model": "sparse_rcnn_tiny_cpu.yaml + " + " ".join(str(o) for o in STEP_OPTS),
        "images": 8,
        "image_hw": [128, 128],
        "gt_per_image": 3,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    report(rec, "train_step", config, time_interleaved(fns, warmup, repeats, CPU), warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--skip-big", action="store_true", help="skip the 800x1333 shapes")
    parser.add_argument("--skip-step", action="store_true", help="skip the training step")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "pooler.jsonl"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    rec = Recorder(args.out, common.environment(args.threads, CPU), {"quick": args.quick})
    small_reps, big_reps, step_reps = (3, 2, 2) if args.quick else (10, 3, 5)

    bench_single_call(rec, "small", 8, 128, 128, 128, 50, 2, small_reps)
    bench_six_stages(rec, "small", 8, 128, 128, 128, 50, True, 1, small_reps // 2 + 1)
    if not args.skip_big:
        for boxes in (100, 300):
            bench_single_call(rec, "800x1333", 2, 800, 1344, 256, boxes, 1, big_reps)
        bench_six_stages(rec, "800x1333", 2, 800, 1344, 256, 100, False, 1, big_reps)
    if not args.skip_step:
        bench_train_step(rec, 1, step_reps)


if __name__ == "__main__":
    main()
