"""Training-step time of Sparse R-CNN, split into backbone, head, matching, loss, backward and
optimizer, and its peak memory.

Measurements (one JSON object per line on stdout, also appended to --out):

1. ``train_step``: one full training step on a fixed batch: ``model(batch)`` (training mode),
   the sum of the losses, ``backward()``, and the optimizer step (``sparse_rcnn.solver``: AdamW
   with full-model gradient clipping, as train_net.py builds it) and ``zero_grad``. The parts are
   timed inside the step by wrappers around ``model.backbone.forward``, ``model.head.forward`` and
   ``model.criterion.matcher.forward`` and around ``model.criterion.forward`` (``loss`` = the
   criterion minus the matcher calls inside it), with ``time.perf_counter`` (and
   ``torch.cuda.synchronize`` on a GPU); ``backward`` is one block; ``other`` = the step minus the
   parts (pre-processing, proposals, target preparation, summing the losses). Every part has
   min/median/max over the repeats, and ``match_loss_share`` = (matching + loss) / step (medians).
   The last warm-up step gives the peak memory (CPU RSS, and ``max_memory_allocated`` on CUDA).
   Cases:

   * ``r50_100pro`` / ``r50_300pro``: configs/sparse_rcnn_R_50_FPN_{100pro_3x,300pro_crop_3x}.yaml
     with random weights, 2 images of 512x640 (reduced from 800x1333 for a CPU; ``--r50-size``),
     20 GT boxes per image, 80 classes.
   * ``quick_cpu_fast`` / ``quick_cpu_detectron2``: configs/sparse_rcnn_quick_cpu.yaml with the
     paper's 6 stages (``common.SMALL_MODEL_OPTS``; the config trains 3) (a batch as
     in its training: SOLVER.IMS_PER_BATCH = 4 images of 128 px, 3 GT boxes each) with
     ``MODEL.SPARSE_RCNN.POOLER_IMPL fast`` (default) and ``detectron2`` (Detectron2's stock
     ROIPooler), run round robin.

2. ``train_step_speedup``: median step time with the stock ROIPooler / with FastROIPooler on the
   quick CPU config; issue target: at least 1.5x on CPU (``target_pass``).

``--amp`` runs the forward under ``torch.autocast`` (float16 with a GradScaler on CUDA, bfloat16
on CPU) and records ``"amp"``; ``--device cuda`` (or auto on a GPU machine) runs on the GPU.

Usage:
    python benchmarks/bench_train.py [--quick] [--threads 2] [--device auto|cpu|cuda] [--amp]
        [--cases r50_100pro r50_300pro quick_cpu] [--r50-size 512 640]
"""

import argparse
import contextlib
import gc
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

import common
from common import PartTimer, Recorder

R50_CONFIGS = {
    "r50_100pro": "sparse_rcnn_R_50_FPN_100pro_3x.yaml",
    "r50_300pro": "sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml",
}
QUICK_CONFIG = common.SMALL_MODEL_CONFIG
PARTS = ("backbone", "head", "matching", "loss", "backward", "optimizer", "other")
TARGET_SPEEDUP = 1.5  # CPU training at least 1.5x faster than with Detectron2's ROIPooler


class InstrumentedStep:
    """One training step of a Sparse R-CNN model with per-part timing (see the module doc)."""

    def __init__(self, cfg, device: torch.device, amp: bool = False, seed: int = 0):
        from sparse_rcnn.solver import build_optimizer

        self.cfg = cfg
        self.device = device
        self.model = common.build_model(cfg, seed).train()
        self.optimizer = build_optimizer(cfg, self.model)
        self.timer = PartTimer(device)
        self.timer.wrap(self.model.backbone, "backbone")
        self.timer.wrap(self.model.head, "head")
        criterion = self.model.criterion
        self.timer.wrap(criterion, "criterion")
        self.timer.wrap(criterion.matcher, "matching")
        if getattr(criterion, "one_to_one_matcher", None) is not None:
            self.timer.wrap(criterion.one_to_one_matcher, "matching")
        self.amp_dtype = None
        self.scaler = None
        if amp:
            self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
            if device.type == "cuda":
                self.scaler = torch.cuda.amp.GradScaler()
        self.parts: Dict[str, List[float]] = {p: [] for p in PARTS}
        self.steps: List[float] = []

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def run(self, batch: List[Dict], record: bool = True) -> None:
        self.timer.enabled = record
        self.timer.reset()
        common.synchronize(self.device)
        start = time.perf_counter()
        with self._autocast():
            losses = self.model(batch)
        loss = sum(losses.values())
        with self.timer("backward"):
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        with self.timer("optimizer"):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        common.synchronize(self.device)
        total = time.perf_counter() - start
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError("the training loss is not finite")
        if not record:
            return
        parts = self.timer.reset()
        matching = parts.get("matching", 0.0)
        values = {
            "backbone": parts.get("backbone", 0.0),
            "head": parts.get("head", 0.0),
            "matching": matching,
            "loss": parts.get("criterion", 0.0) - matching,
            "backward": parts.get("backward", 0.0),
            "optimizer": parts.get("optimizer", 0.0),
        }
        values["other"] = total - sum(values.values())
        for name, value in values.items():
            self.parts[name].append(value)
        self.steps.append(total)

    def summary(self) -> Dict:
        """min/median/max of the step and of every part (ms), and the shares of the step."""
        step_median = statistics.median(self.steps)
        out = {"step": common.stats_ms(self.steps), "parts": {}, "share_of_step": {}}
        for name in PARTS:
            out["parts"][name] = common.stats_ms(self.parts[name])
            out["share_of_step"][name] = round(statistics.median(self.parts[name]) / step_median, 4)
        match_loss = statistics.median(
            [m + l for m, l in zip(self.parts["matching"], self.parts["loss"])]
        )
        out["match_loss_median_ms"] = round(match_loss * 1e3, 3)
        out["match_loss_share"] = round(match_loss / step_median, 4)
        return out

    def record_fields(self) -> Dict:
        """The fields of a step record: parameters, repeats, step and part times, shares."""
        summary = self.summary()
        return {
            "parameters": self.parameters,
            "repeats": len(self.steps),
            **summary["step"],
            "parts_ms": summary["parts"],
            "share_of_step": summary["share_of_step"],
            "match_loss_median_ms": summary["match_loss_median_ms"],
            "match_loss_share": summary["match_loss_share"],
        }

    def reset_stats(self) -> None:
        self.parts = {p: [] for p in PARTS}
        self.steps = []


def run_round_robin(
    steps: Dict[str, InstrumentedStep], batch: List[Dict], warmup: int, repeats: int
) -> Dict[str, Dict]:
    """Warm-up and timed steps of every model, round robin; returns the peak memory of each
    model's last warm-up step (an extra untimed step if ``warmup`` is 0)."""
    fns = {name: (lambda s=step: s.run(batch, record=False)) for name, step in steps.items()}
    memory: Dict[str, Dict] = {}
    common.time_interleaved(fns, warmup, 0, next(iter(steps.values())).device, memory)
    for step in steps.values():
        step.reset_stats()
    for _ in range(repeats):
        for step in steps.values():
            step.run(batch)
    return memory


def emit_step(
    rec: Recorder,
    name: str,
    step: InstrumentedStep,
    batch: List[Dict],
    config: str,
    extra: Dict,
    warmup: int,
    memory: Dict,
    benchmark: str = "train_step",
) -> Dict:
    h, w = batch[0]["image"].shape[-2:]
    return rec.emit(
        {
            "benchmark": benchmark,
            "case": name,
            "config": config,
            "images": len(batch),
            "image_hw": [int(h), int(w)],
            "gt_per_image": [len(x["instances"]) for x in batch],
            "amp": str(step.amp_dtype).replace("torch.", "") if step.amp_dtype else None,
            **extra,
            "warmup": warmup,
            **step.record_fields(),
            **memory,
        }
    )


def bench_r50(rec, device, args, warmup, repeats) -> None:
    height, width = args.r50_size
    for case in [c for c in args.cases if c in R50_CONFIGS]:
        opts: Sequence = []
        cfg = common.make_cfg(R50_CONFIGS[case], opts, device)
        step = InstrumentedStep(cfg, device, amp=args.amp)
        batch = common.make_batch(args.r50_images, height, width, args.r50_gt, 80, seed=1)
        rec.begin()
        memory = run_round_robin({case: step}, batch, warmup, repeats)
        emit_step(
            rec,
            case,
            step,
            batch,
            common.config_text(R50_CONFIGS[case], opts),
            {"proposals": cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS, "pooler_impl": "fast"},
            warmup,
            memory[case],
        )
        step.timer.unwrap_all()
        del step
        gc.collect()
        common.release_free_memory()


def bench_quick_cpu(rec, device, args, warmup, repeats) -> None:
    steps, configs = {}, {}
    for impl in ("fast", "detectron2"):
        opts = common.SMALL_MODEL_OPTS + ["MODEL.SPARSE_RCNN.POOLER_IMPL", impl]
        cfg = common.make_cfg(QUICK_CONFIG, opts, device)
        steps[f"quick_cpu_{impl}"] = InstrumentedStep(cfg, device, amp=args.amp)
        configs[f"quick_cpu_{impl}"] = common.config_text(QUICK_CONFIG, opts)
    # Its training batch: SOLVER.IMS_PER_BATCH images of the test size (128 px), 3 GT boxes each
    # (the built-in dataset has 0-4 objects per image).
    cfg = next(iter(steps.values())).cfg
    images, size = cfg.SOLVER.IMS_PER_BATCH, cfg.INPUT.MIN_SIZE_TEST
    num_classes = cfg.MODEL.SPARSE_RCNN.NUM_CLASSES
    batch = common.make_batch(images, size, size, 3, num_classes, seed=2)
    rec.begin()
    memory = run_round_robin(steps, batch, warmup, repeats)
    for name, step in steps.items():
        emit_step(
            rec,
            name,
            step,
            batch,
            configs[name],
            {"proposals": cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS, "pooler_impl": name.split("_")[-1]},
            warmup,
            memory[name],
        )
    fast, stock = steps["quick_cpu_fast"], steps["quick_cpu_detectron2"]
    speedup = statistics.median(stock.steps) / statistics.median(fast.steps)
    record = {
        "benchmark": "train_step_speedup",
        "case": "quick_cpu",
        "impl": "fast",
        "baseline": "detectron2",
        "config": configs["quick_cpu_fast"] + " vs POOLER_IMPL detectron2",
        "images": images,
        "image_hw": [size, size],
        "amp": str(fast.amp_dtype).replace("torch.", "") if fast.amp_dtype else None,
        "warmup": warmup,
        "repeats": len(fast.steps),
        "fast_median_ms": round(statistics.median(fast.steps) * 1e3, 3),
        "detectron2_median_ms": round(statistics.median(stock.steps) * 1e3, 3),
        "speedup_median": round(speedup, 3),
        "speedup_min": round(min(stock.steps) / min(fast.steps), 3),
    }
    if device.type == "cpu" and fast.amp_dtype is None:
        record["target"] = f"CPU training step >= {TARGET_SPEEDUP}x faster than with ROIPooler"
        record["target_pass"] = speedup >= TARGET_SPEEDUP
    rec.emit(record)


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.common_args(parser, "train.jsonl")
    parser.add_argument("--amp", action="store_true", help="torch.autocast (fp16 CUDA, bf16 CPU)")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["r50_100pro", "r50_300pro", "quick_cpu"],
        choices=["r50_100pro", "r50_300pro", "quick_cpu"],
    )
    parser.add_argument("--r50-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--r50-images", type=int, default=2)
    parser.add_argument("--r50-gt", type=int, default=20, help="GT boxes per image (R-50 cases)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    on_gpu = device.type == "cuda"
    if args.r50_size is None:
        # 800x1216 (800x1333-class) on a GPU; reduced on a CPU (and further with --quick).
        args.r50_size = [800, 1216] if on_gpu else ([384, 512] if args.quick else [512, 640])
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    repeats = args.repeats or ((5 if args.quick else 20) if on_gpu else (2 if args.quick else 3))
    if args.quick and not on_gpu and args.cases == parser.get_default("cases"):
        args.cases = ["r50_300pro", "quick_cpu"]
    rec = Recorder(args.out, common.environment(args.threads, device), {"quick": args.quick})
    common.warn_if_busy()
    bench_r50(rec, device, args, warmup, repeats)
    if "quick_cpu" in args.cases:
        quick_repeats = args.repeats or (repeats if on_gpu else (3 if args.quick else 5))
        bench_quick_cpu(rec, device, args, warmup, quick_repeats)


if __name__ == "__main__":
    main()
