"""How matching, the loss and the training step scale with the number of proposals N and of GT
boxes per image M, for HungarianMatcher and OTAMatcher (Dynamic Sparse R-CNN's DLA).

Records (``benchmarks/results/matching.jsonl``): ``criterion``: the set criterion of the R-50
300-proposal config alone (6 stages, 80 classes; forward + loss backward, split into matching, loss
and backward) on synthetic stage outputs of 2 images of 800x1216 (jittered copies of the GT boxes,
so OTA's dynamic k is realistic), N in {100, 300, 500} x M in {1, 10, 20, 100, 300};
``match_step``: a training step of the quick CPU config with 6 stages (``bench_train``; 2 images of
128 px), N in {100, 300, 500} at M = 20 and M in {1, 10, 20, 100, 300} at N = 300;
``ota_over_hungarian``: the step ratio at every point; ``match_targets`` at N = 300, M = 20:
matching + loss at most 5% of a step (per matcher) and OTA step at most 1.10x the Hungarian step.

Usage:
    python benchmarks/bench_matching.py [--quick] [--threads 2] [--device auto|cpu|cuda]
        [--skip-criterion] [--skip-step] [--min-run-time 3]
"""

import argparse

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
        boxes = torch.stack(boxes)
        stages.append({"pred_logits": logits, "pred_boxes": boxes})
    stages = [{k: v.to(device).requires_grad_() for k, v in s.items()} for s in stages]
    return stages, [{k: v.to(device) for k, v in t.items()} for t in prepare_targets(gt, device)]


def bench_criterion(rec, args, device, grid) -> None:
    from sparse_rcnn.criterion import build_criterion

    for num_proposals, num_gt in grid:
        stages, targets = synthetic_stage_outputs(num_proposals, num_gt, device)
        leaves = [t for s in stages for t in s.values()]
        fns, parts, configs = {}, {}, {}
        for matcher in MATCHERS:
            opts = ["MODEL.SPARSE_RCNN.MATCHER_NAME", matcher]
            configs[matcher] = common.config_text(CRITERION_CONFIG, opts)
            criterion = build_criterion(common.make_cfg(CRITERION_CONFIG, opts, device)).to(device)
            timer, parts[matcher] = common.PartTimer(device), []
            timer.wrap(criterion, "criterion")
            timer.wrap(criterion.matcher, "matching")

            def fn(criterion=criterion, timer=timer, parts=parts[matcher]):
                losses = criterion(stages, targets)
                with timer("backward"):
                    torch.autograd.grad(sum(losses.values()), leaves)
                part = timer.take()
                part["loss"] = part.pop("criterion") - part["matching"]
                parts.append(part)

            fns[matcher] = fn
        rec.begin()
        point = dict(proposals=num_proposals, gt_per_image=num_gt, images=2, image_hw=[800, 1216])
        for matcher, (m, memory) in common.measure(fns, args, device).items():
            medians = common.part_medians_ms(parts[matcher], m)
            record = dict(matcher=matcher, config=configs[matcher], **point, stages=6)
            record.update(common.stats_ms(m), parts_median_ms=medians, **memory)
            rec.emit("criterion", **record)


def bench_steps(rec, args, device, points) -> None:
    for num_proposals, num_gt in points:
        steps, configs = {}, {}
        batch = common.make_batch(2, 128, 128, num_gt, 3, seed=3)
        for matcher in MATCHERS:
            opts = common.SMALL_MODEL_OPTS + ["MODEL.SPARSE_RCNN.NUM_PROPOSALS", num_proposals]
            opts += ["MODEL.SPARSE_RCNN.MATCHER_NAME", matcher]
            cfg = common.make_cfg(common.SMALL_MODEL_CONFIG, opts, device)
            steps[matcher] = InstrumentedStep(cfg, device, batch)
            configs[matcher] = common.config_text(common.SMALL_MODEL_CONFIG, opts)
        rec.begin()
        results = common.measure(steps, args, device)
        point = dict(proposals=num_proposals, gt_per_image=num_gt, images=2, image_hw=[128, 128])
        shares = {}
        for matcher, (m, memory) in results.items():
            record = steps[matcher].record(m, memory)
            shares[matcher] = record["match_loss_share"]
            rec.emit("match_step", matcher=matcher, config=configs[matcher], **point, **record)
        ratio = round(results["OTAMatcher"][0].median / results["HungarianMatcher"][0].median, 4)
        both = configs["OTAMatcher"] + " vs MATCHER_NAME HungarianMatcher"
        rec.emit("ota_over_hungarian", config=both, **point, ratio_median=ratio)
        if (num_proposals, num_gt) != TARGET_POINT:
            continue
        for matcher, share in shares.items():
            target = f"matching + loss <= {TARGET_MATCH_LOSS_SHARE:.0%} of a training step at "
            record = dict(target=target + "300 proposals and 20 GT per image", matcher=matcher)
            record.update(config=configs[matcher], **point, match_loss_share=share)
            rec.emit("match_targets", **record, target_pass=share <= TARGET_MATCH_LOSS_SHARE)
        target = f"OTAMatcher step <= {TARGET_OTA_RATIO}x the HungarianMatcher step"
        record = dict(target=target, config=both, **point, ratio_median=ratio)
        rec.emit("match_targets", **record, target_pass=ratio <= TARGET_OTA_RATIO)


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
