"""Inference latency of Sparse R-CNN R-50-FPN: the whole model, the backbone alone, the head.

Records (``benchmarks/results/inference.jsonl``): ``inference``: ``model(batched_inputs)`` under
``torch.inference_mode()`` for the R-50 100- and 300-proposal configs (random weights; both have
the same backbone weights) on random 800x1216 images (800x1333-class, nothing padded), batch 1 and
4, with the head's mean time and the peak memory of one run; and ``model.backbone(images)`` on the
same batch (the floor any head can reach). ``inference_head_overhead``: model / backbone (medians)
and the head's share; target: the model at most 1.25x the backbone at 300 proposals on a CPU.

Usage:
    python benchmarks/bench_inference.py [--quick] [--threads 2] [--device auto|cpu|cuda]
        [--batch-sizes 1 4] [--height 800 --width 1216] [--min-run-time 9]
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
    models = {
        p: common.build_model(common.make_cfg(CONFIGS[p], (), device)) for p in args.proposals
    }
    timer = common.PartTimer(device)
    heads = {p: [] for p in models}
    for p, model in models.items():
        model.eval()
        timer.wrap(model.head, "head")
    any_model = next(iter(models.values()))

    def run_model(p):
        def fn():
            models[p](inputs)
            heads[p].append(timer.take()["head"])

        return fn

    for batch in args.batch_sizes or ([1] if args.quick else [1, 4]):
        inputs = common.make_batch(batch, args.height, args.width, None, 80, seed=batch)
        with torch.inference_mode():
            images = any_model.preprocess_image(inputs)[0].tensor
        fns = {"backbone": lambda: any_model.backbone(images)}
        fns.update({f"model_{p}pro": run_model(p) for p in models})
        rec.begin()
        with torch.inference_mode():
            results = common.measure(fns, args, device)
        point = dict(images=batch, image_hw=[args.height, args.width], mode="inference_mode")
        point["padded_hw"] = list(images.shape[-2:])
        backbone = results["backbone"][0].median
        for p in [None, *models]:
            m, memory = results[f"model_{p}pro" if p else "backbone"]
            config = common.config_text(CONFIGS[p or args.proposals[0]])
            record = dict(proposals=p, **point, **common.stats_ms(m), **memory)
            record.update(median_ms_per_image=round(m.median * 1e3 / batch, 3))
            if p is None:
                rec.emit("inference", impl="backbone", config="backbone of " + config, **record)
                continue
            head = heads[p][-common.timed_runs(m) :]
            record["head_ms_mean"] = round(statistics.mean(head) * 1e3, 3)
            rec.emit("inference", impl=f"model_{p}pro", config=config, **record)
            ratio = m.median / backbone
            record = dict(config=config, proposals=p, **point, model_over_backbone=round(ratio, 4))
            record.update(model_median_ms=round(m.median * 1e3, 3))
            record.update(backbone_median_ms=round(backbone * 1e3, 3))
            record["head_share_of_model"] = round(1 - 1 / ratio, 4)
            if p == 300 and device.type == "cpu":
                record["target"] = f"model <= {TARGET_RATIO}x backbone at 300 proposals on CPU"
                record["target_pass"] = ratio <= TARGET_RATIO
            rec.emit("inference_head_overhead", **record)


if __name__ == "__main__":
    main()
