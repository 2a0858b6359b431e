#!/usr/bin/env python
"""What each part of Dynamic Sparse R-CNN buys on the built-in dataset, with the quick schedule.

`make demo-compare` runs it. Every variant trains the quick model and schedule
(configs/sparse_rcnn_quick_cpu.yaml: 1300 iterations of batch 4 on synthetic_shapes_train) with
``train_net.py`` in a subprocess, then is evaluated on synthetic_shapes_val with COCOEvaluator
twice, without and with class-aware NMS at IoU 0.7. One JSON record per (variant, seed) is
printed and appended to ``--out``:

    python tools/ablate_dynamic.py                    # every variant, seed 40244023
    python tools/ablate_dynamic.py --variants sparse dynamic --seeds 1
    python tools/ablate_dynamic.py --late-steps 40    # + step time late in training
    python tools/ablate_dynamic.py --variants sparse dla_two_losses --max-iter 700 \
        --opts MODEL.SPARSE_RCNN.NUM_STAGES 6 MODEL.SPARSE_RCNN.PROPOSAL_BOX_INIT image \
        --tag _700it_6stages_image                    # another setting

Variants (``--variants``): ``sparse`` (Sparse R-CNN), ``dla`` (+ OTA with dynamic k and the unit
increasing strategy, one loss), ``dla_two_losses`` (+ the one-to-one loss), ``dpg`` (+ dynamic
proposals only), ``dynamic`` (both: configs/dynamic_sparse_rcnn_quick_cpu.yaml).

``--late-steps N`` also times N training steps from each trained checkpoint (the late phase of
training, where subnormal floats appeared in the Dynamic Sparse R-CNN path), with the CPU's
flush-to-zero off and on, and finds the subnormal values (tools/subnormals.py): which operations
of a step write them, and how many the weights, gradients and AdamW state hold. Results:
docs/dynamic_sparse_rcnn.md and docs/benchmarks.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparse_rcnn.config import get_sparse_rcnn_cfg
from subnormals import subnormal_counts, subnormal_sources

REPO = Path(__file__).resolve().parent.parent
SPARSE = "configs/sparse_rcnn_quick_cpu.yaml"
DYNAMIC = "configs/dynamic_sparse_rcnn_quick_cpu.yaml"
DLA_OPTS = [
    "MODEL.SPARSE_RCNN.MATCHER_NAME", "OTAMatcher",
    "MODEL.SPARSE_RCNN.LOSS_NORMALIZE_BY", "num_positives",
]  # fmt: skip
VARIANTS = {
    # name: (config, extra opts). NMS at test time is chosen at evaluation, not here.
    "sparse": (SPARSE, []),
    "dla": (SPARSE, DLA_OPTS + ["MODEL.SPARSE_RCNN.TWO_LOSSES", "False"]),
    "dla_two_losses": (SPARSE, DLA_OPTS + ["MODEL.SPARSE_RCNN.TWO_LOSSES", "True"]),
    "dpg": (DYNAMIC, [
        "MODEL.SPARSE_RCNN.MATCHER_NAME", "HungarianMatcher",
        "MODEL.SPARSE_RCNN.LOSS_NORMALIZE_BY", "num_gt",
        "MODEL.SPARSE_RCNN.TWO_LOSSES", "False",
    ]),
    "dynamic": (DYNAMIC, []),
}  # fmt: skip
DEFAULT_SEED = 40244023  # configs/Base-SparseRCNN.yaml


def evaluate(cfg, weights, nms: bool) -> dict:
    """COCO box AP of ``weights`` on cfg.DATASETS.TEST[0], with or without NMS 0.7."""
    from detectron2.evaluation import inference_on_dataset
    from detectron2.modeling import build_model

    from sparse_rcnn.checkpoint import InferenceCheckpointer
    from sparse_rcnn.data_loaders import build_sparse_rcnn_test_loader
    from sparse_rcnn.evaluation import build_sparse_rcnn_evaluator

    cfg = cfg.clone()
    cfg.MODEL.SPARSE_RCNN.NMS_ENABLED = nms
    cfg.MODEL.SPARSE_RCNN.NMS_THRESH_TEST = 0.7
    cfg.MODEL.SPARSE_RCNN.EVAL_PER_STAGE = False
    model = build_model(cfg).eval()
    InferenceCheckpointer(model).load(weights)
    dataset = cfg.DATASETS.TEST[0]
    folder = os.path.join(cfg.OUTPUT_DIR, f"eval_nms{int(nms)}")
    results = inference_on_dataset(
        model,
        build_sparse_rcnn_test_loader(cfg, dataset),
        build_sparse_rcnn_evaluator(cfg, dataset, folder),
    )
    return {k: round(results["bbox"][k], 2) for k in ("AP", "AP50", "AP75")}


def step_times(output_dir: str) -> dict:
    """Median logged step time over the first and last 300 iterations (metrics.json "time")."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f if '"time"' in line]
    times = [(r["iteration"], r["time"]) for r in records if "time" in r]
    if not times:
        return {}
    last = times[-1][0]
    early = [t for it, t in times if 100 <= it < 400]
    late = [t for it, t in times if it > last - 300]
    return {
        "step_s_early": round(statistics.median(early), 4) if early else None,
        "step_s_late": round(statistics.median(late), 4) if late else None,
    }


def late_steps(cfg, weights, steps: int) -> dict:
    """Time ``steps`` training steps from a trained checkpoint, flush-to-zero off then on."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from sparse_rcnn.checkpoint import SafeDetectionCheckpointer
    from sparse_rcnn.data_loaders import build_sparse_rcnn_train_loader
    from sparse_rcnn.solver import build_optimizer

    record = {}
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        SafeDetectionCheckpointer(model).load(weights)
        optimizer = build_optimizer(cfg, model)
        loader = iter(build_sparse_rcnn_train_loader(cfg))
        times = []
        with EventStorage(cfg.SOLVER.MAX_ITER):
            for _ in range(steps):
                batch = next(loader)
                start = time.perf_counter()
                loss = sum(model(batch).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                times.append(time.perf_counter() - start)
        key = "flush" if flush else "no_flush"
        record[f"late_step_s_{key}"] = round(statistics.median(times[steps // 4 :]), 4)
        if not flush:
            with EventStorage(cfg.SOLVER.MAX_ITER):
                record["subnormal_sources"] = subnormal_sources(model, optimizer, next(loader))
            grads = [(f"grad:{n}", p.grad) for n, p in model.named_parameters()]
            states = [
                (f"adam:{n}:{k}", v)
                for n, p in model.named_parameters()
                for k, v in optimizer.state.get(p, {}).items()
                if torch.is_tensor(v)
            ]
            record["subnormal_counts"] = subnormal_counts(
                list(model.named_parameters()) + grads + states
            )
    torch.set_flush_denormal(False)
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[DEFAULT_SEED])
    parser.add_argument("--max-iter", type=int, default=None, help="default: the config's (1300)")
    parser.add_argument("--late-steps", type=int, default=0)
    parser.add_argument("--output-root", default="output/ablation")
    parser.add_argument("--out", default="benchmarks/results/ablation.jsonl")
    parser.add_argument("--skip-train", action="store_true", help="reuse finished runs")
    parser.add_argument(
        "--opts",
        nargs="+",
        default=[],
        help="config KEY VALUE pairs added to every variant (another setting: e.g. "
        "MODEL.SPARSE_RCNN.NUM_STAGES 6 MODEL.SPARSE_RCNN.PROPOSAL_BOX_INIT image)",
    )
    parser.add_argument("--tag", default="", help="suffix of the runs' folders (with --opts)")
    parser.add_argument(
        "--table", action="store_true", help="print the table of the records in --out and exit"
    )
    args = parser.parse_args()
    os.chdir(REPO)
    if args.table:
        print_table(latest_records(args.out))
        return
    records = []
    for seed in args.seeds:
        for name in args.variants:
            config, opts = VARIANTS[name]
            output_dir = os.path.join(args.output_root, f"{name}_seed{seed}{args.tag}")
            opts = opts + args.opts
            opts += ["SEED", str(seed), "OUTPUT_DIR", output_dir, "TEST.EVAL_PERIOD", "0"]
            if args.max_iter:
                opts += ["SOLVER.MAX_ITER", str(args.max_iter)]
            weights = os.path.join(output_dir, "model_final.pth")
            load_before = os.getloadavg()
            start = time.time()
            reused = args.skip_train and os.path.isfile(weights)
            if not reused:
                command = [sys.executable, "train_net.py", "--config-file", config] + opts
                subprocess.run(command, check=True)
            train_s = None if reused else round(time.time() - start, 1)
            cfg = get_sparse_rcnn_cfg(REPO / config, opts)
            record = {
                "bench": "ablate_dynamic",
                "variant": name,
                "seed": seed,
                "setting": args.tag.lstrip("_") or "main job",
                "config": config,
                "opts": opts,
                "max_iter": cfg.SOLVER.MAX_ITER,
                "train_wall_s": train_s,  # None: a finished run reused (--skip-train)
                **step_times(output_dir),
                "ap_no_nms": evaluate(cfg, weights, nms=False),
                "ap_nms_0.7": evaluate(cfg, weights, nms=True),
                "threads": torch.get_num_threads(),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "date": time.strftime("%Y-%m-%d %H:%M"),
            }
            if args.late_steps:
                record.update(late_steps(cfg, weights, args.late_steps))
            records.append(record)
            line = json.dumps(record)
            print(line, flush=True)
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "a") as f:
                f.write(line + "\n")
    print_table(records)


def latest_records(path: str) -> list:
    """The records of ``path``, the last one of every run folder (a rerun replaces a run)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    by_run = {}
    for r in records:
        by_run[r["opts"][r["opts"].index("OUTPUT_DIR") + 1]] = r
    return list(by_run.values())


def print_table(records) -> None:
    """The records side by side: COCO box AP without / with NMS 0.7, and the step time."""
    from tabulate import tabulate

    rows = [
        [
            r["variant"],
            r.get("setting", "main job"),
            r["max_iter"],
            r["seed"],
            r["ap_no_nms"]["AP"],
            r["ap_no_nms"]["AP50"],
            r["ap_nms_0.7"]["AP"],
            r["ap_nms_0.7"]["AP50"],
            r.get("step_s_early"),
            r.get("step_s_late"),
            r["threads"],
            r["train_wall_s"],
        ]
        for r in records
    ]
    headers = ["variant", "setting", "iterations", "seed", "AP", "AP50", "AP (NMS)"]
    headers += ["AP50 (NMS)", "early step s", "late step s", "threads", "train s"]
    floatfmt = ("", "", "", "", ".1f", ".1f", ".1f", ".1f", ".3f", ".3f", "", ".0f")
    print(tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=floatfmt))


if __name__ == "__main__":
    main()
