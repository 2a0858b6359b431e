"""How matching, the loss and the training step scale with the number of proposals and of GT
objects per image, for HungarianMatcher and OTAMatcher (Dynamic Sparse R-CNN's DLA).

Records (``benchmarks/results/matching.jsonl``):

1. ``criterion``: the set criterion alone (of configs/sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml:
   6 stages with deep supervision, 80 classes) forward + loss backward, on synthetic stage
   outputs of 2 images of 800x1216: proposals N in {100, 300, 500} x GT boxes per image M in
   {1, 10, 20, 100, 300}, both matchers; parts: the 6 matcher calls, the loss (criterion minus
   matcher) and the backward. Predicted boxes are jittered copies of the GT boxes, so OTA's
   dynamic k is realistic.
2. ``match_step``: a training step of the quick CPU config with the paper's 6 stages
   (``bench_train.InstrumentedStep``, 2 images of 128 px) with N proposals and M GT boxes per
   image, both matchers: N in {100, 300, 500} at M = 20 and M in {1, 10, 20, 100, 300} at N = 300.
   ``ota_over_hungarian``: the step ratio at every point.
3. ``match_targets`` at N = 300, M = 20: "matching + loss at most 5% of a training step" (per
   matcher) and "OTAMatcher step at most 1.10x the HungarianMatcher step" (``target_pass``).

Usage:
    python benchmarks/bench_matching.py [--quick] [--threads 2] [--device auto|cpu|cuda]
        [--skip-criterion] [--skip-step]
"""

import argparse
import statistics

import torch

import common
from bench_train import InstrumentedStep

MATCHERS = ("HungarianMatcher", "OTAMatcher")
CRITERION_CONFIG = "sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml"
TARGET_POINT = (300, 20)  # proposals, GT per image
TARGET_MATCH_LOSS_SHARE = 0.05
TARGET_OTA_RATIO = 1.10


def synthetic_stage_outputs(num_proposals, num_gt, device, images=2, hw=(800, 1216), classes=80):
    """6 stages of (logits, boxes) leaves that require grad, and the targets of the images."""
    from sparse_rcnn.criterion import prepare_targets

    gen = torch.Generator().manual_seed(0)
    gt = [common.random_instances(*hw, num_gt, classes, gen) for _ in range(images)]
    stages = []
    for _ in range(6):
        boxes = []
        for inst in gt:
            box = inst.gt_boxes.tensor[torch.arange(num_proposals) % num_gt]
            size = (box[:, 2:] - box[:, :2]).repeat(1, 2)
            boxes.append(box + (torch.rand(num_proposals, 4, generator=gen) - 0.5) * 0.4 * size)
        logits = torch.randn(images, num_proposals, classes, generator=gen) - 2.0
        stages.append({"pred_logits": logits.to(device).requires_grad_(),
                       "pred_boxes": torch.stack(boxes).to(device).requires_grad_()})  # fmt: skip
    return stages, [{k: v.to(device) for k, v in t.items()} for t in prepare_targets(gt, device)]


def bench_criterion(rec, args, device, grid) -> None:
    from sparse_rcnn.criterion import build_criterion

    for num_proposals, num_gt in grid:
        stages, targets = synthetic_stage_outputs(num_proposals, num_gt, device)
        fns, timers = {}, {}
        for matcher in MATCHERS:
            opts = ["MODEL.SPARSE_RCNN.MATCHER_NAME", matcher]
            criterion = build_criterion(common.make_cfg(CRITERION_CONFIG, opts, device)).to(device)
            timer = timers[matcher] = common.PartTimer(device)
            timer.wrap(criterion, "criterion")
            timer.wrap(criterion.matcher, "matching")

            def fn(criterion=criterion, timer=timer):
                losses = criterion(stages, targets)
                with timer("backward"):
                    torch.autograd.grad(
                        sum(losses.values()), [t for s in stages for t in s.values()]
                    )

            fns[matcher] = fn
        rec.begin()
        for matcher, (m, memory) in common.measure(fns, args, device).items():
            calls, n = timers[matcher].calls, common.timed_runs(m)
            k = len(calls["matching"]) // len(
                calls["criterion"]
            )  # matcher calls per criterion call
            matching = [
                sum(calls["matching"][i * k : (i + 1) * k]) for i in range(len(calls["criterion"]))
            ]
            parts = {"matching": matching, "loss": [c - x for c, x in zip(calls["criterion"], matching)],
                     "backward": calls["backward"]}  # fmt: skip
            rec.emit({"benchmark": "criterion", "matcher": matcher, "proposals": num_proposals,
                      "gt_per_image": num_gt, "images": 2, "image_hw": [800, 1216], "stages": 6,
                      "config": common.config_text(CRITERION_CONFIG, ["MODEL.SPARSE_RCNN.MATCHER_NAME", matcher]),
                      **common.stats_ms(m), **memory,
                      "parts_median_ms": {k: round(statistics.median(v[-n:]) * 1e3, 3)
                                          for k, v in parts.items()}})  # fmt: skip


def bench_steps(rec, args, device, points) -> None:
    for num_proposals, num_gt in points:
        steps, configs = {}, {}
        batch = common.make_batch(2, 128, 128, num_gt, 3, seed=3)
        for matcher in MATCHERS:
            opts = common.SMALL_MODEL_OPTS + ["MODEL.SPARSE_RCNN.NUM_PROPOSALS", num_proposals,
                                              "MODEL.SPARSE_RCNN.MATCHER_NAME", matcher]  # fmt: skip
            cfg = common.make_cfg(common.SMALL_MODEL_CONFIG, opts, device)
            steps[matcher] = InstrumentedStep(cfg, device, batch)
            configs[matcher] = common.config_text(common.SMALL_MODEL_CONFIG, opts)
        rec.begin()
        results = common.measure(steps, args, device)
        point = {"proposals": num_proposals, "gt_per_image": num_gt, "images": 2,
                 "image_hw": [128, 128]}  # fmt: skip
        shares = {}
        for matcher, (m, memory) in results.items():
            record = rec.emit({"benchmark": "match_step", "matcher": matcher,
                               "config": configs[matcher], **point,
                               **steps[matcher].record(m, memory)})  # fmt: skip
            shares[matcher] = record["match_loss_share"]
        ratio = results["OTAMatcher"][0].median / results["HungarianMatcher"][0].median
        rec.emit({"benchmark": "ota_over_hungarian", "config": configs["OTAMatcher"]
                  + " vs MATCHER_NAME HungarianMatcher", **point, "ratio_median": round(ratio, 4)})  # fmt: skip
        if (num_proposals, num_gt) != TARGET_POINT:
            continue
        for matcher in MATCHERS:
            rec.emit({"benchmark": "match_targets", "matcher": matcher, "config": configs[matcher],
                      "target": f"matching + loss <= {TARGET_MATCH_LOSS_SHARE:.0%} of a training "
                      "step at 300 proposals and 20 GT per image", **point,
                      "match_loss_share": shares[matcher],
                      "target_pass": shares[matcher] <= TARGET_MATCH_LOSS_SHARE})  # fmt: skip
        rec.emit({"benchmark": "match_targets", "config": configs["OTAMatcher"]
                  + " vs MATCHER_NAME HungarianMatcher", **point, "ratio_median": round(ratio, 4),
                  "target": f"OTAMatcher step <= {TARGET_OTA_RATIO}x the HungarianMatcher step",
                  "target_pass": ratio <= TARGET_OTA_RATIO})  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-criterion", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    args, device, rec = common.parse_args(parser, "matching.jsonl", min_run_time=3.0)
    if args.quick:
        grid = [(n, m) for n in (100, 300) for m in (1, 20, 300)]
        points = [TARGET_POINT]
    else:
        grid = [(n, m) for n in (100, 300, 500) for m in (1, 10, 20, 100, 300)]
        points = [(100, 20), (300, 20), (500, 20), (300, 1), (300, 10), (300, 100), (300, 300)]
    if not args.skip_criterion:
        bench_criterion(rec, args, device, grid)
    if not args.skip_step:
        bench_steps(rec, args, device, points)


if __name__ == "__main__":
    main()
