"""Inference latency of Sparse R-CNN R-50-FPN: the whole model, the backbone alone, the head.

Measurements (one JSON object per line on stdout, also appended to --out):

1. ``inference``: ``model(batched_inputs)`` under ``torch.inference_mode()`` for
   configs/sparse_rcnn_R_50_FPN_100pro_3x.yaml (100 proposals) and
   configs/sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml (300 proposals), random weights
   (MODEL.WEIGHTS ""), random 800x1216 images (800x1333-class: the short side of COCO testing,
   the long side a multiple of 32 so that nothing is padded), batch sizes 1 and 4; and
   ``model.backbone(images)`` (ResNet-50-FPN alone on the same normalised batch: the floor any
   head can reach). Latency of the batch and per image, images/s. The model's head time is
   measured inside the same runs (a wrapper around ``model.head.forward``); the last warm-up run
   gives the peak memory (RSS on CPU, ``max_memory_allocated`` on CUDA).
2. ``inference_head_overhead``: per config and batch size, model / backbone (median ratio), the
   head's share ((model - backbone) / model), and the issue target "the whole model at most 1.25x
   the backbone alone at 300 proposals on CPU" (``target_pass``).

The backbone and both models run round robin in every repeat (the two models have the same
backbone architecture and seed, hence the same backbone weights); min/median/max are over the
repeats after warm-up (on a CPU: a memory-measurement run and 1 warm-up, then 5 repeats at batch 1
(3 with --quick) and 2 at batch 4, about 3 minutes in all; --repeats sets them).

Usage:
    python benchmarks/bench_inference.py [--quick] [--threads 2] [--device auto|cpu|cuda]
        [--batch-sizes 1 4] [--height 800 --width 1216]
"""

import argparse
import statistics

import torch

import common
from common import PartTimer, Recorder

CONFIGS = {
    100: "sparse_rcnn_R_50_FPN_100pro_3x.yaml",
    300: "sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml",
}
TARGET_RATIO = 1.25  # the whole model at most 1.25x the backbone alone at 300 proposals on CPU


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_args(parser, "inference.jsonl")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--proposals", type=int, nargs="+", default=[100, 300], choices=[100, 300])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    on_gpu = device.type == "cuda"
    batch_sizes = args.batch_sizes or ([1] if args.quick else [1, 4])
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    default_repeats = (5 if args.quick else 20) if on_gpu else (3 if args.quick else 5)
    rec = Recorder(args.out, common.environment(args.threads, device), {"quick": args.quick})
    common.warn_if_busy()

    models = {}
    for proposals in args.proposals:
        cfg = common.make_cfg(CONFIGS[proposals], device=device)
        models[proposals] = common.build_model(cfg).eval()
    any_model = next(iter(models.values()))
    params = {p: sum(t.numel() for t in m.parameters()) for p, m in models.items()}
    timers = {p: PartTimer(device) for p in models}
    for p, model in models.items():
        timers[p].wrap(model.head, "head")

    for batch in batch_sizes:
        # On a CPU a batch of 4 takes about 10 s per run: 2 repeats keep the default run short.
        repeats = args.repeats or (default_repeats if on_gpu or batch < 4 else 2)
        inputs = common.make_batch(batch, args.height, args.width, None, 80, seed=batch)
        with torch.inference_mode():
            images, _ = any_model.preprocess_image(inputs)
            images = images.tensor
        padded_hw = list(images.shape[-2:])

        def run_model(model):
            def fn():
                with torch.inference_mode():
                    model(inputs)

            return fn

        def run_backbone():
            with torch.inference_mode():
                any_model.backbone(images)

        rec.begin()
        fns = {"backbone": run_backbone}
        fns.update({f"model_{p}pro": run_model(m) for p, m in models.items()})
        # Warm-up (the last warm-up run of each also gives its peak memory) without head timing.
        for timer in timers.values():
            timer.enabled = False
        memory = {}
        common.time_interleaved(fns, warmup, 0, device, memory)
        for timer in timers.values():
            timer.enabled = True
            timer.reset()
        times = common.time_interleaved(fns, 0, repeats, device)
        head_times = {p: timers[p].reset().get("head", 0.0) / repeats for p in models}

        base = {
            "images": batch,
            "image_hw": [args.height, args.width],
            "padded_hw": padded_hw,
            "mode": "torch.inference_mode()",
            "warmup": warmup,
            "repeats": repeats,
        }
        for impl, values in times.items():
            proposals = int(impl.split("_")[1][:-3]) if impl.startswith("model") else None
            config = (
                common.config_text(CONFIGS[proposals], [])
                if proposals
                else "backbone of " + common.config_text(CONFIGS[args.proposals[0]], [])
            )
            median = statistics.median(values)
            record = {
                "benchmark": "inference",
                "impl": impl,
                "config": config,
                "proposals": proposals,
                **base,
                **common.stats_ms(values),
                "median_ms_per_image": round(median * 1e3 / batch, 3),
                "images_per_s": round(batch / median, 3),
                **memory[impl],
            }
            if proposals:
                record["head_ms_mean"] = round(head_times[proposals] * 1e3, 3)
                record["parameters"] = params[proposals]
            rec.emit(record)

        backbone = statistics.median(times["backbone"])
        for proposals in models:
            model_median = statistics.median(times[f"model_{proposals}pro"])
            ratio = model_median / backbone
            record = {
                "benchmark": "inference_head_overhead",
                "config": common.config_text(CONFIGS[proposals], []),
                "proposals": proposals,
                **base,
                "model_median_ms": round(model_median * 1e3, 3),
                "backbone_median_ms": round(backbone * 1e3, 3),
                "head_ms_mean_instrumented": round(head_times[proposals] * 1e3, 3),
                "model_minus_backbone_ms": round((model_median - backbone) * 1e3, 3),
                "head_share_of_model": round((model_median - backbone) / model_median, 4),
                "model_over_backbone": round(ratio, 4),
                "model_over_backbone_min": round(
                    min(times[f"model_{proposals}pro"]) / min(times["backbone"]), 4
                ),
            }
            if proposals == 300 and device.type == "cpu":
                record["target"] = f"model <= {TARGET_RATIO}x backbone at 300 proposals on CPU"
                record["target_pass"] = ratio <= TARGET_RATIO
            rec.emit(record)


if __name__ == "__main__":
    main()
