"""Training-step time of Sparse R-CNN, split into backbone, head, matching, loss, backward and
optimizer, and its peak memory.

Records (``benchmarks/results/train.jsonl``):

1. ``train_step``: one step on a fixed batch: ``model(batch)`` in training mode, the sum of the
   losses, ``backward()``, the optimizer step (``sparse_rcnn.solver``: AdamW with full-model
   gradient clipping, as train_net.py builds it) and ``zero_grad``. The parts are timed inside the
   step by wrappers around the forwards of ``model.backbone``, ``model.head``, the matcher(s) and
   ``model.criterion`` (``loss`` = criterion minus matching); ``other`` = step minus the parts.
   Cases: ``r50_100pro`` / ``r50_300pro`` (configs/sparse_rcnn_R_50_FPN_{100pro_3x,
   300pro_crop_3x}.yaml, random weights, 2 images of 512x640 on a CPU, 800x1216 on a GPU, 20 GT
   boxes each, 80 classes) and ``quick_cpu_fast`` / ``quick_cpu_detectron2`` (the quick CPU config
   with the paper's 6 stages, its training batch: 4 images of 128 px, 3 GT boxes each, with
   ``POOLER_IMPL`` fast and Detectron2's ROIPooler).
2. ``train_step_speedup``: median step with Detectron2's ROIPooler / with FastROIPooler on the
   quick CPU config; target: at least 1.5x on a CPU (``target_pass``).

``--amp`` runs the forward under ``torch.autocast`` (float16 with a GradScaler on CUDA, bfloat16
on a CPU).

Usage:
    python benchmarks/bench_train.py [--quick] [--threads 2] [--device auto|cpu|cuda] [--amp]
        [--cases r50_100pro r50_300pro quick_cpu]
"""

import argparse
import contextlib
import statistics
from typing import Dict

import torch

import common

R50_CONFIGS = {
    "r50_100pro": "sparse_rcnn_R_50_FPN_100pro_3x.yaml",
    "r50_300pro": "sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml",
}
PARTS = ("backbone", "head", "matching", "loss", "backward", "optimizer")
TARGET_SPEEDUP = 1.5  # CPU training at least 1.5x faster than with Detectron2's ROIPooler


class InstrumentedStep:
    """A callable training step of the model of ``cfg`` that times its parts (module doc)."""

    def __init__(self, cfg, device: torch.device, batch, amp: bool = False):
        from sparse_rcnn.solver import build_optimizer

        self.model = common.build_model(cfg).train()
        self.optimizer = build_optimizer(cfg, self.model)
        self.batch, self.device = batch, device
        self.timer = common.PartTimer(device)
        criterion = self.model.criterion
        for module, name in [(self.model.backbone, "backbone"), (self.model.head, "head"),
                             (criterion, "criterion"), (criterion.matcher, "matching"),
                             (getattr(criterion, "one_to_one_matcher", None), "matching")]:  # fmt: skip
            if module is not None:
                self.timer.wrap(module, name)
        self.amp_dtype = (
            (torch.float16 if device.type == "cuda" else torch.bfloat16) if amp else None
        )
        self.scaler = torch.cuda.amp.GradScaler() if amp and device.type == "cuda" else None
        self.parts = []

    def __call__(self) -> None:
        calls = self.timer.calls
        calls.clear()
        autocast = torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else None
        with autocast or contextlib.nullcontext():
            loss = sum(self.model(self.batch).values())
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError("the training loss is not finite")
        with self.timer("backward"):
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        with self.timer("optimizer"):
            self.scaler.step(self.optimizer) if self.scaler else self.optimizer.step()
            if self.scaler:
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        part = {name: sum(calls[name]) for name in ("backbone", "head", "matching", "backward",
                                                    "optimizer")}  # fmt: skip
        part["loss"] = sum(calls["criterion"]) - part["matching"]
        self.parts.append(part)

    def record(self, measurement, memory) -> Dict:
        """Step statistics, the parts' medians and shares over the timed runs, peak memory."""
        parts = self.parts[-common.timed_runs(measurement) :]
        median = {p: statistics.median(x[p] for x in parts) for p in PARTS}
        median["other"] = measurement.median - sum(median.values())
        share = {p: round(v / measurement.median, 4) for p, v in median.items()}
        return {
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None,
            **common.stats_ms(measurement),
            "parts_median_ms": {p: round(v * 1e3, 3) for p, v in median.items()},
            "share_of_step": share,
            "match_loss_share": round(share["matching"] + share["loss"], 4),
            **memory,
        }


def bench_r50(rec, args, device) -> None:
    height, width = (
        (800, 1216) if device.type == "cuda" else (384, 512) if args.quick else (512, 640)
    )
    batch = common.make_batch(2, height, width, 20, 80, seed=1)
    for case in [c for c in args.cases if c in R50_CONFIGS]:
        cfg = common.make_cfg(R50_CONFIGS[case], (), device)
        step = InstrumentedStep(cfg, device, batch, args.amp)
        rec.begin()
        ((m, memory),) = common.measure({case: step}, args, device).values()
        rec.emit({"benchmark": "train_step", "case": case, "config": common.config_text(
            R50_CONFIGS[case]), "images": 2, "image_hw": [height, width], "gt_per_image": 20,
            "proposals": cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS, **step.record(m, memory)})  # fmt: skip
        del step


def bench_quick_cpu(rec, args, device) -> None:
    steps, medians = {}, {}
    for impl in ("fast", "detectron2"):
        opts = common.SMALL_MODEL_OPTS + ["MODEL.SPARSE_RCNN.POOLER_IMPL", impl]
        cfg = common.make_cfg(common.SMALL_MODEL_CONFIG, opts, device)
        # Its training batch: IMS_PER_BATCH images of 128 px, 3 GT boxes each (0-4 in the data).
        size, images = cfg.INPUT.MIN_SIZE_TEST, cfg.SOLVER.IMS_PER_BATCH
        batch = common.make_batch(images, size, size, 3, cfg.MODEL.SPARSE_RCNN.NUM_CLASSES, seed=2)
        steps[impl] = (InstrumentedStep(cfg, device, batch, args.amp), opts)
    rec.begin()
    results = common.measure({impl: step for impl, (step, _) in steps.items()}, args, device)
    for impl, (m, memory) in results.items():
        step, opts = steps[impl]
        medians[impl] = m.median
        rec.emit({"benchmark": "train_step", "case": f"quick_cpu_{impl}",
                  "config": common.config_text(common.SMALL_MODEL_CONFIG, opts), "images": images,
                  "image_hw": [size, size], "gt_per_image": 3, "pooler_impl": impl,
                  "proposals": cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS, **step.record(m, memory)})  # fmt: skip
    speedup = medians["detectron2"] / medians["fast"]
    record = {"benchmark": "train_step_speedup", "case": "quick_cpu", "impl": "fast",
              "baseline": "detectron2", "amp": args.amp, "images": images,
              "config": common.config_text(common.SMALL_MODEL_CONFIG, steps["fast"][1])
              + " vs POOLER_IMPL detectron2", "speedup_median": round(speedup, 3)}  # fmt: skip
    if device.type == "cpu" and not args.amp:
        record["target"] = f"CPU training step >= {TARGET_SPEEDUP}x faster than with ROIPooler"
        record["target_pass"] = speedup >= TARGET_SPEEDUP
    rec.emit(record)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--amp", action="store_true", help="torch.autocast (fp16 CUDA, bf16 CPU)")
    cases = ["r50_100pro", "r50_300pro", "quick_cpu"]
    parser.add_argument("--cases", nargs="+", default=cases, choices=cases)
    args, device, rec = common.parse_args(parser, "train.jsonl", min_run_time=15.0)
    if args.quick and args.cases == cases:
        args.cases = ["r50_300pro", "quick_cpu"]
    bench_r50(rec, args, device)
    if "quick_cpu" in args.cases:
        bench_quick_cpu(rec, args, device)


if __name__ == "__main__":
    main()
