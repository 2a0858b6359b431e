"""CPU benchmark of FastROIPooler vs Detectron2's ROIPooler (ROIAlignV2, 7x7, sampling ratio 2).

Records (``benchmarks/results/pooler.jsonl``): ``pooler_fwd_bwd`` / ``pooler_fwd``: one call
(forward + backward with an upstream gradient in the head's layout, or forward under ``no_grad``)
at the small training shape (8 images of 128 px, 50 boxes each, C = 128, P2-P5) and at 800x1333
(2 images padded to 800x1344, 100 or 300 boxes, C = 256); ``pooler_6_stages`` (small, forward +
backward) / ``pooler_6_stages_fwd`` (800x1333, 100 boxes): six calls on the same features, one per
head stage, the fast pooler laying them out once (``prepare``) as the head does; ``*_speedup``:
median(stock) / median(fast). The training step with either pooler: ``bench_train.py``.

Usage:
    python benchmarks/bench_pooler.py [--quick] [--threads 2] [--skip-big] [--min-run-time 2]
"""

import argparse
import math

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
