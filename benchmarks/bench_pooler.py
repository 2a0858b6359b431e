"""CPU benchmark of FastROIPooler vs Detectron2's ROIPooler (ROIAlignV2, 7x7, sampling ratio 2).

Records (``benchmarks/results/pooler.jsonl``):

1. ``pooler_fwd_bwd`` / ``pooler_fwd``: one pooler call (forward + backward with a random upstream
   gradient laid out as the head produces it, or forward only under ``no_grad``) at the small
   training shape (8 images of 128 px, 50 boxes each, C = 128, P2-P5) and at 800x1333 (2 images
   padded to 800x1344, 100 or 300 boxes each, C = 256).
2. ``pooler_6_stages`` (forward + backward, small shape) / ``pooler_6_stages_fwd`` (800x1333, 100
   boxes): six pooler calls on the same features, one per head stage; the fast pooler lays the
   features out once (``FastROIPooler.prepare``), as the head does.

``*_speedup`` records give median(stock) / median(fast). The training step with either pooler is
``bench_train.py`` (``quick_cpu_*``).

Usage:
    python benchmarks/bench_pooler.py [--quick] [--threads 2] [--skip-big]
"""

import argparse
import math

import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

import common
from sparse_rcnn.poolers import FastROIPooler

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
NAMES = {(False, True): "pooler_fwd_bwd", (False, False): "pooler_fwd",
         (True, True): "pooler_6_stages", (True, False): "pooler_6_stages_fwd"}  # fmt: skip
POOLER = dict(output_size=7, scales=SCALES, sampling_ratio=2, pooler_type="ROIAlignV2")


def random_boxes(num: int, height: int, width: int, gen: torch.Generator) -> Boxes:
    """Uniform centres in the image, sides of 5%..100% of the image (xyxy)."""
    centre = torch.rand(num, 2, generator=gen) * torch.tensor([width, height])
    size = (torch.rand(num, 2, generator=gen) * 0.95 + 0.05) * torch.tensor([width, height])
    return Boxes(torch.cat([centre - size / 2, centre + size / 2], dim=1))


def head_layout_grad(num_rois: int, channels: int, gen: torch.Generator) -> torch.Tensor:
    # The head consumes pooled.flatten(2).transpose(1, 2) (R, 49, C): its gradient arrives in that
    # (channels-last) memory layout.
    return (
        torch.randn(num_rois, 49, channels, generator=gen).transpose(1, 2).view(-1, channels, 7, 7)
    )


def bench(rec, args, name, images, height, width, channels, boxes, stages, train):
    gen = torch.Generator().manual_seed(0)
    feats = [
        torch.randn(
            images, channels, math.ceil(height * s), math.ceil(width * s), generator=gen
        ).requires_grad_(train)
        for s in SCALES
    ]
    stage_boxes = [[random_boxes(boxes, height, width, gen) for _ in range(images)]
                   for _ in range(stages)]  # fmt: skip
    grads = [head_layout_grad(images * boxes, channels, gen) for _ in range(stages)]
    fast = FastROIPooler(**POOLER)

    def run(pooler, prepare):
        def fn():
            with torch.set_grad_enabled(train):
                x = pooler.prepare(feats) if prepare else feats
                outs = [pooler(x, b) for b in stage_boxes]
                if train:
                    torch.autograd.grad(outs, feats, grads)

        return fn

    fns = {"stock": run(ROIPooler(**POOLER), False), "fast": run(fast, stages > 1)}
    config = {"shape": name, "images": images, "image_hw": [height, width], "channels": channels,
              "boxes_per_image": boxes, "stages": stages, "pooler": ["ROIAlignV2", 7, 2]}  # fmt: skip
    benchmark = NAMES[stages > 1, train]
    rec.begin()
    results = common.measure(fns, args, torch.device("cpu"), memory=False)
    for impl, (m, _) in results.items():
        rec.emit({"benchmark": benchmark, "impl": impl, "config": config, **common.stats_ms(m)})
    speedup = results["stock"][0].median / results["fast"][0].median
    rec.emit({"benchmark": benchmark + "_speedup", "impl": "fast", "baseline": "stock",
              "config": config, "speedup_median": round(speedup, 3)})  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-big", action="store_true", help="skip the 800x1333 shapes")
    args, _, rec = common.parse_args(parser, "pooler.jsonl", min_run_time=2.0)
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
