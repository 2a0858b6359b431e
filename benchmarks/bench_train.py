"""Training-step time of Sparse R-CNN split into backbone, head, matching, loss, backward and
optimizer (wrappers around the forwards of ``model.backbone``, ``model.head``, ``model.criterion``
and its matcher(s); ``loss`` = criterion minus matching; ``other`` = step minus the parts), and
its peak memory. A step: ``model(batch)``, ``backward()`` of the summed losses, the optimizer step
(``sparse_rcnn.solver``, as train_net.py builds it), ``zero_grad``.

Records (``benchmarks/results/train.jsonl``): ``train_step`` for ``r50_100pro`` / ``r50_300pro``
(the R-50 100/300-proposal configs, random weights, 2 images of 512x640 on a CPU, 800x1216 on a
GPU, 20 GT boxes each) and ``quick_cpu_fast`` / ``quick_cpu_detectron2`` (the quick CPU config with
the paper's 6 stages on its training batch, 4 images of 128 px with 3 GT boxes, with FastROIPooler
and with Detectron2's ROIPooler); ``train_step_speedup``: ROIPooler step / FastROIPooler step,
target at least 1.5x on a CPU. ``--amp``: autocast (fp16 + GradScaler on CUDA, bf16 on a CPU).

Usage:
    python benchmarks/bench_train.py [--quick] [--threads 2] [--device auto|cpu|cuda] [--amp]
        [--cases r50_100pro r50_300pro quick_cpu] [--min-run-time 15]
"""

import argparse
from typing import Dict

import torch

import common

R50_CONFIGS = {
    "r50_100pro": "sparse_rcnn_R_50_FPN_100pro_3x.yaml",
    "r50_300pro": "sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml",
}
TARGET_SPEEDUP = 1.5  # CPU training at least 1.5x faster than with Detectron2's ROIPooler


class InstrumentedStep:
    """A callable training step of the model of ``cfg`` that times its parts (module doc)."""

    def __init__(self, cfg, device: torch.device, batch, amp: bool = False):
        from sparse_rcnn.solver import build_optimizer

        self.model = common.build_model(cfg).train()
        self.optimizer = build_optimizer(cfg, self.model)
        self.batch, self.device, self.parts = batch, device, []
        self.timer = common.PartTimer(device)
        criterion = self.model.criterion
        self.timer.wrap(self.model.backbone, "backbone")
        self.timer.wrap(self.model.head, "head")
        self.timer.wrap(criterion, "criterion")
        for matcher in (criterion.matcher, getattr(criterion, "one_to_one_matcher", None)):
            if matcher is not None:
                self.timer.wrap(matcher, "matching")
        self.amp_dtype = None
        if amp:
            self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.cuda.amp.GradScaler(enabled=amp and device.type == "cuda")

    def __call__(self) -> None:
        amp = self.amp_dtype is not None
        with torch.autocast(self.device.type, self.amp_dtype, enabled=amp):
            loss = sum(self.model(self.batch).values())
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError("the training loss is not finite")
        with self.timer("backward"):
            self.scaler.scale(loss).backward()
        with self.timer("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        part = self.timer.take()
        part["loss"] = part.pop("criterion") - part["matching"]
        self.parts.append(part)

    def record(self, m, memory) -> Dict:
        """Step statistics, the parts' medians and shares over the timed runs, peak memory."""
        parts = common.part_medians_ms(self.parts, m)
        parts["other"] = round(m.median * 1e3 - sum(parts.values()), 3)
        share = {k: round(v / (m.median * 1e3), 4) for k, v in parts.items()}
        amp = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None
        record = dict(parameters=sum(p.numel() for p in self.model.parameters()), amp=amp)
        record.update(common.stats_ms(m), parts_median_ms=parts, share_of_step=share, **memory)
        return dict(record, match_loss_share=round(share["matching"] + share["loss"], 4))


def bench_r50(rec, args, device) -> None:
    height, width = (384, 512) if args.quick else (512, 640)
    if device.type == "cuda":
        height, width = 800, 1216
    batch = common.make_batch(2, height, width, 20, 80, seed=1)
    for case in [c for c in args.cases if c in R50_CONFIGS]:
        cfg = common.make_cfg(R50_CONFIGS[case], (), device)
        step = InstrumentedStep(cfg, device, batch, args.amp)
        rec.begin()
        ((m, memory),) = common.measure({case: step}, args, device).values()
        record = dict(case=case, config=common.config_text(R50_CONFIGS[case]), images=2)
        record.update(image_hw=[height, width], gt_per_image=20)
        record["proposals"] = cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS
        rec.emit("train_step", **record, **step.record(m, memory))
        del step


def bench_quick_cpu(rec, args, device) -> None:
    steps, configs = {}, {}
    for impl in ("fast", "detectron2"):
        opts = common.SMALL_MODEL_OPTS + ["MODEL.SPARSE_RCNN.POOLER_IMPL", impl]
        cfg = common.make_cfg(common.SMALL_MODEL_CONFIG, opts, device)
        # Its training batch: IMS_PER_BATCH images of 128 px, 3 GT boxes each (0-4 in the data).
        size, images = cfg.INPUT.MIN_SIZE_TEST, cfg.SOLVER.IMS_PER_BATCH
        batch = common.make_batch(images, size, size, 3, cfg.MODEL.SPARSE_RCNN.NUM_CLASSES, seed=2)
        steps[impl] = InstrumentedStep(cfg, device, batch, args.amp)
        configs[impl] = common.config_text(common.SMALL_MODEL_CONFIG, opts)
    rec.begin()
    results = common.measure(steps, args, device)
    point = dict(images=images, image_hw=[size, size], gt_per_image=3)
    point["proposals"] = cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS
    for impl, (m, memory) in results.items():
        record = steps[impl].record(m, memory)
        rec.emit("train_step", case=f"quick_cpu_{impl}", config=configs[impl], **point, **record)
    speedup = round(results["detectron2"][0].median / results["fast"][0].median, 3)
    record = dict(case="quick_cpu", impl="fast", baseline="detectron2", amp=args.amp, **point)
    record.update(config=configs["fast"] + " vs POOLER_IMPL detectron2", speedup_median=speedup)
    if device.type == "cpu" and not args.amp:
        record["target"] = f"CPU training step >= {TARGET_SPEEDUP}x faster than with ROIPooler"
        record["target_pass"] = speedup >= TARGET_SPEEDUP
    rec.emit("train_step_speedup", **record)


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
