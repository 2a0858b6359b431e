"""How matching, the loss and the training step scale with the number of proposals and of GT
objects per image, for HungarianMatcher and OTAMatcher (Dynamic Sparse R-CNN's DLA).

Measurements (one JSON object per line on stdout, also appended to --out):

1. ``criterion``: the set criterion alone (``SetCriterion`` of configs/sparse_rcnn_R_50_FPN_
   300pro_crop_3x.yaml: 6 stages with deep supervision, 80 classes) on synthetic stage outputs of
   2 images of 800x1216: proposals N in {100, 300, 500} x GT boxes per image M in {1, 10, 20,
   100, 300} (crowded scenes), ``MODEL.SPARSE_RCNN.MATCHER_NAME`` HungarianMatcher and
   OTAMatcher. Timed: the matcher calls (6 per criterion call), the loss (criterion minus
   matcher) and the loss backward to the stage outputs. The predicted boxes are jittered copies
   of the GT boxes (cycled), the logits random, so OTA's dynamic k is realistic (several IoUs
   above 0.5 per GT).
2. ``match_step``: a whole training step of a small model (configs/sparse_rcnn_quick_cpu.yaml
   with the paper's 6 stages, ``common.SMALL_MODEL_OPTS``, 2 images of 128 px, its training size) with ``NUM_PROPOSALS`` N and M GT boxes per image,
   both matchers run round robin, split as in bench_train.py (backbone, head, matching, loss,
   backward, optimizer); N in {100, 300, 500} at M = 20 and M in {1, 10, 20, 100, 300} at
   N = 300. Peak memory of a step (RSS) per point.
3. ``match_targets``: the issue targets at N = 300 proposals, M = 20 GT per image on the small
   model's step: "matching + loss at most 5% of a training step" (per matcher) and "OTAMatcher
   step at most 1.10x the HungarianMatcher step" (``ratio``, ``target_pass``).
   ``ota_over_hungarian`` records give the step ratio at every point.

Usage:
    python benchmarks/bench_matching.py [--quick] [--threads 2] [--device auto|cpu|cuda]
        [--skip-criterion] [--skip-step]
"""

import argparse
import gc
import statistics
from typing import Dict

import torch

import common
from bench_train import InstrumentedStep, run_round_robin
from common import PartTimer, Recorder

MATCHERS = ("HungarianMatcher", "OTAMatcher")
CRITERION_CONFIG = "sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml"
STEP_CONFIG = common.SMALL_MODEL_CONFIG
STEP_IMAGES = 2  # 128 px images (the quick CPU config trains on 4; 2 keeps 500 proposals quick)
TARGET_POINT = (300, 20)  # proposals, GT per image
TARGET_MATCH_LOSS_SHARE = 0.05
TARGET_OTA_RATIO = 1.10


def synthetic_stage_outputs(
    images: int, height: int, width: int, num_proposals: int, num_gt: int, classes: int, seed=0
):
    """6 stages of (logits, boxes) leaves that require grad, and the targets of the images."""
    from sparse_rcnn.criterion import prepare_targets

    gen = torch.Generator().manual_seed(seed)
    gt_instances = [
        common.random_instances(height, width, num_gt, classes, gen) for _ in range(images)
    ]
    targets = prepare_targets(gt_instances, torch.device("cpu"))
    stages = []
    for _ in range(6):
        logits = torch.randn(images, num_proposals, classes, generator=gen) - 2.0
        boxes = []
        for inst in gt_instances:
            gt = inst.gt_boxes.tensor[torch.arange(num_proposals) % num_gt]
            size = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
            jitter = (torch.rand(num_proposals, 4, generator=gen) - 0.5) * 0.4 * size
            boxes.append(gt + jitter)
        stages.append(
            {
                "pred_logits": logits.requires_grad_(),
                "pred_boxes": torch.stack(boxes).requires_grad_(),
            }
        )
    return stages, targets


def bench_criterion(rec, device, grid, warmup, repeats) -> None:
    from sparse_rcnn.criterion import build_criterion

    height, width, images, classes = 800, 1216, 2, 80
    for num_proposals, num_gt in grid:
        stages, targets = synthetic_stage_outputs(
            images, height, width, num_proposals, num_gt, classes
        )
        stages = [{k: v.to(device).detach().requires_grad_() for k, v in s.items()} for s in stages]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        rec.begin()
        criteria, timers, fns = {}, {}, {}
        for matcher in MATCHERS:
            opts = ["MODEL.SPARSE_RCNN.MATCHER_NAME", matcher]
            cfg = common.make_cfg(CRITERION_CONFIG, opts, device)
            criterion = build_criterion(cfg).to(device)
            timer = PartTimer(device)
            timer.wrap(criterion, "criterion")
            timer.wrap(criterion.matcher, "matching")
            criteria[matcher], timers[matcher] = criterion, timer

            def fn(criterion=criterion, timer=timer):
                losses = criterion(stages, targets)
                with timer("backward"):
                    sum(losses.values()).backward()
                for s in stages:
                    for t in s.values():
                        t.grad = None

            fns[matcher] = fn
        for timer in timers.values():
            timer.enabled = False
        memory: Dict[str, Dict] = {}
        common.time_interleaved(fns, warmup, 0, device, memory)
        parts = {m: {"matching": [], "loss": [], "backward": []} for m in MATCHERS}
        totals = {m: [] for m in MATCHERS}
        for timer in timers.values():
            timer.enabled = True
        for _ in range(repeats):
            for matcher, fn in fns.items():
                timers[matcher].reset()
                times = common.time_interleaved({matcher: fn}, 0, 1, device)[matcher]
                t = timers[matcher].reset()
                parts[matcher]["matching"].append(t["matching"])
                parts[matcher]["loss"].append(t["criterion"] - t["matching"])
                parts[matcher]["backward"].append(t["backward"])
                totals[matcher].append(times[0])
        for matcher in MATCHERS:
            rec.emit(
                {
                    "benchmark": "criterion",
                    "matcher": matcher,
                    "config": common.config_text(
                        CRITERION_CONFIG, ["MODEL.SPARSE_RCNN.MATCHER_NAME", matcher]
                    ),
                    "proposals": num_proposals,
                    "gt_per_image": num_gt,
                    "images": images,
                    "image_hw": [height, width],
                    "classes": classes,
                    "stages": 6,
                    "timed": "criterion forward (6 stages) + loss backward",
                    "warmup": warmup,
                    "repeats": repeats,
                    **common.stats_ms(totals[matcher]),
                    "parts_ms": {k: common.stats_ms(v) for k, v in parts[matcher].items()},
                    **memory[matcher],
                }
            )


def bench_steps(rec, device, points, warmup, repeats) -> None:
    for num_proposals, num_gt in points:
        steps, configs = {}, {}
        for matcher in MATCHERS:
            opts = common.SMALL_MODEL_OPTS + [
                "MODEL.SPARSE_RCNN.NUM_PROPOSALS", num_proposals,
                "MODEL.SPARSE_RCNN.MATCHER_NAME", matcher,
            ]  # fmt: skip
            cfg = common.make_cfg(STEP_CONFIG, opts, device)
            steps[matcher] = InstrumentedStep(cfg, device)
            configs[matcher] = common.config_text(STEP_CONFIG, opts)
        batch = common.make_batch(STEP_IMAGES, 128, 128, num_gt, 3, seed=3)
        rec.begin()
        memory = run_round_robin(steps, batch, warmup, repeats)
        for matcher, step in steps.items():
            rec.emit(
                {
                    "benchmark": "match_step",
                    "matcher": matcher,
                    "config": configs[matcher],
                    "proposals": num_proposals,
                    "gt_per_image": num_gt,
                    "images": STEP_IMAGES,
                    "image_hw": [128, 128],
                    "warmup": warmup,
                    **step.record_fields(),
                    **memory[matcher],
                }
            )
        hung, ota = steps["HungarianMatcher"], steps["OTAMatcher"]
        ratio = statistics.median(ota.steps) / statistics.median(hung.steps)
        rec.emit(
            {
                "benchmark": "ota_over_hungarian",
                "config": configs["OTAMatcher"] + " vs MATCHER_NAME HungarianMatcher",
                "proposals": num_proposals,
                "gt_per_image": num_gt,
                "images": STEP_IMAGES,
                "image_hw": [128, 128],
                "warmup": warmup,
                "repeats": len(ota.steps),
                "hungarian_median_ms": round(statistics.median(hung.steps) * 1e3, 3),
                "ota_median_ms": round(statistics.median(ota.steps) * 1e3, 3),
                "ratio_median": round(ratio, 4),
                "ratio_min": round(min(ota.steps) / min(hung.steps), 4),
                "matching_median_ms": {
                    m: steps[m].summary()["parts"]["matching"]["median_ms"] for m in MATCHERS
                },
            }
        )
        if (num_proposals, num_gt) == TARGET_POINT:
            for matcher in MATCHERS:
                share = steps[matcher].summary()["match_loss_share"]
                rec.emit(
                    {
                        "benchmark": "match_targets",
                        "target": f"matching + loss <= {TARGET_MATCH_LOSS_SHARE:.0%} of a "
                        "training step at 300 proposals and 20 GT per image",
                        "matcher": matcher,
                        "config": configs[matcher],
                        "images": STEP_IMAGES,
                        "image_hw": [128, 128],
                        "match_loss_share": share,
                        "target_pass": share <= TARGET_MATCH_LOSS_SHARE,
                    }
                )
            rec.emit(
                {
                    "benchmark": "match_targets",
                    "target": f"OTAMatcher step <= {TARGET_OTA_RATIO}x the HungarianMatcher step",
                    "config": configs["OTAMatcher"] + " vs MATCHER_NAME HungarianMatcher",
                    "images": STEP_IMAGES,
                    "image_hw": [128, 128],
                    "ratio_median": round(ratio, 4),
                    "target_pass": ratio <= TARGET_OTA_RATIO,
                }
            )
        # Free this point's models before the next one (their memory would inflate its RSS).
        for step in steps.values():
            step.timer.unwrap_all()
        del steps, step, hung, ota
        gc.collect()
        common.release_free_memory()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_args(parser, "matching.jsonl")
    parser.add_argument("--skip-criterion", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats or (2 if args.quick else 3)
    rec = Recorder(args.out, common.environment(args.threads, device), {"quick": args.quick})
    common.warn_if_busy()

    if args.quick:
        grid = [(n, m) for n in (100, 300) for m in (1, 20, 300)]
        points = [TARGET_POINT]
    else:
        grid = [(n, m) for n in (100, 300, 500) for m in (1, 10, 20, 100, 300)]
        points = [(100, 20), (300, 20), (500, 20), (300, 1), (300, 10), (300, 100), (300, 300)]
    if not args.skip_criterion:
        bench_criterion(rec, device, grid, warmup, repeats)
    if not args.skip_step:
        bench_steps(rec, device, points, warmup, repeats)


if __name__ == "__main__":
    main()
