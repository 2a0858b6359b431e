"""Inference latency of Sparse R-CNN R-50-FPN: the whole model, the backbone alone, the head.

Records (``benchmarks/results/inference.jsonl``):

1. ``inference``: ``model(batched_inputs)`` under ``torch.inference_mode()`` for
   configs/sparse_rcnn_R_50_FPN_100pro_3x.yaml and configs/sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml
   (random weights), random 800x1216 images (800x1333-class, nothing padded), batch 1 and 4; and
   ``backbone``: ``model.backbone(images)`` on the same normalised batch (the floor any head can
   reach). Per image latency, images/s, the head's mean time (a wrapper around
   ``model.head.forward``) and the peak memory of one run.
2. ``inference_head_overhead``: model / backbone (medians) per config and batch, the head's share,
   and the target "the whole model at most 1.25x the backbone alone at 300 proposals on a CPU"
   (``target_pass``).

The two models have the same backbone architecture and seed, hence the same backbone weights.

Usage:
    python benchmarks/bench_inference.py [--quick] [--threads 2] [--device auto|cpu|cuda]
        [--batch-sizes 1 4] [--height 800 --width 1216]
"""

import argparse
import statistics

import torch

import common

CONFIGS = {
    100: "sparse_rcnn_R_50_FPN_100pro_3x.yaml",
    300: "sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml",
}
TARGET_RATIO = 1.25  # the whole model at most 1.25x the backbone alone at 300 proposals on CPU


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--proposals", type=int, nargs="+", default=[100, 300], choices=[100, 300])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    args, device, rec = common.parse_args(parser, "inference.jsonl", min_run_time=9.0)
    models = {p: common.build_model(common.make_cfg(CONFIGS[p], (), device)).eval()
              for p in args.proposals}  # fmt: skip
    any_model = next(iter(models.values()))
    timer = common.PartTimer(device)
    for p, model in models.items():
        timer.wrap(model.head, f"head_{p}")

    for batch in args.batch_sizes or ([1] if args.quick else [1, 4]):
        inputs = common.make_batch(batch, args.height, args.width, None, 80, seed=batch)
        with torch.inference_mode():
            images = any_model.preprocess_image(inputs)[0].tensor
        fns = {"backbone": lambda: any_model.backbone(images)}
        fns.update({f"model_{p}pro": (lambda m=m: m(inputs)) for p, m in models.items()})
        rec.begin()
        with torch.inference_mode():
            results = common.measure(fns, args, device)
        base = {"images": batch, "image_hw": [args.height, args.width],
                "padded_hw": list(images.shape[-2:]), "mode": "torch.inference_mode()"}  # fmt: skip
        for impl, (m, memory) in results.items():
            p = int(impl[6:-3]) if impl != "backbone" else None
            config = common.config_text(CONFIGS[p or args.proposals[0]])
            record = {"benchmark": "inference", "impl": impl, "proposals": p, **base,
                      "config": config if p else "backbone of " + config, **common.stats_ms(m),
                      "median_ms_per_image": round(m.median * 1e3 / batch, 3),
                      "images_per_s": round(batch / m.median, 3), **memory}  # fmt: skip
            if p:
                head = timer.calls[f"head_{p}"][-common.timed_runs(m) :]
                record["head_ms_mean"] = round(statistics.mean(head) * 1e3, 3)
            rec.emit(record)

        backbone = results["backbone"][0].median
        for p in models:
            model = results[f"model_{p}pro"][0].median
            record = {"benchmark": "inference_head_overhead", "proposals": p, **base,
                      "config": common.config_text(CONFIGS[p]),
                      "model_median_ms": round(model * 1e3, 3),
                      "backbone_median_ms": round(backbone * 1e3, 3),
                      "head_share_of_model": round((model - backbone) / model, 4),
                      "model_over_backbone": round(model / backbone, 4)}  # fmt: skip
            if p == 300 and device.type == "cpu":
                record["target"] = f"model <= {TARGET_RATIO}x backbone at 300 proposals on CPU"
                record["target_pass"] = model / backbone <= TARGET_RATIO
            rec.emit(record)


if __name__ == "__main__":
    main()
