"""ONNX Runtime vs eager PyTorch: Sparse R-CNN R-50-FPN, 300 proposals, one 800x1216 image, CPU.

Exports configs/sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml (random weights, seed 0) with
``sparse_rcnn.export.export_onnx`` (or takes ``--onnx FILE``, exported from the same seed) and
times, in ``--rounds`` (3) alternating blocks of ``--min-run-time`` / rounds seconds each
(``torch.utils.benchmark``'s ``blocked_autorange``, see common.py), on the same random image with
the same number of threads:

* ``eager``: ``model.inference([{"image": image}], do_postprocess=False)`` under
  ``torch.no_grad()`` (what ``DefaultPredictor`` runs, without its resize);
* ``onnxruntime``: the exported graph in an ``InferenceSession`` (CPU provider, all graph
  optimisations, ``intra_op_num_threads`` = ``--threads``).

It checks that the detections are identical (same number, order and classes, scores within 1e-4,
boxes within 0.01 px: the 1e-3 px of the tests is 1e-6 of the ~1000-px coordinates here, about
8 float32 ulps, and 6 stages at 300 proposals measured 1.7e-3 px) and prints one JSON record with
min/median/max of each over all rounds, the speed-up of every round (eager median / ONNX Runtime
median of that round) and their median (``speedup_onnxruntime_vs_eager``), the target (>= 1.7x)
and the load average. As in the tests
(tests/test_export.py), the random model's box-delta layers are scaled by ``--delta-scale``
(0.1) so that its boxes stay on the image as a trained model's do (the same operations run).

``--split N`` then times N more runs of each, one runtime after the other (never interleaved: each
runtime's idle threads spin for a while after a run and slow the other one down), split into the
backbone (the ``backbone`` module / the graph's nodes under ``/backbone``), the head (``head`` /
``/head``) and the rest (normalisation, padding, layout reorders), the ONNX Runtime parts from its
profiler's node times with the head's five costliest operator types, in a second record
(``export_time_split``).

``--box-init`` (``image``, the config's) sets the random model's initial proposal boxes
(``MODEL.SPARSE_RCNN.PROPOSAL_BOX_INIT``): whole-image boxes pool from P5 only, ``random`` ones
(sides about half the image) mostly from P4-P5, ``grid`` ones (17x18 cells) from P2, as a trained
model's small boxes do; ONNX Runtime's ``RoiAlign`` costs most on P2 (``bench_pooler.py
--onnx-ops``). The first stage's RoIs per level are in the record.

Usage:
    python benchmarks/bench_export.py [--threads 2] [--min-run-time 20] [--onnx out/r50_300.onnx]
        [--split 5] [--box-init image]
"""

import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

import common

CONFIG = "sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml"
TARGET_SPEEDUP = 1.7


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--delta-scale", type=float, default=0.1)
    parser.add_argument("--onnx", default=None, help="an exported graph of the same model")
    parser.add_argument("--split", type=int, default=0, help="runs of the backbone/head split")
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks of each runtime")
    parser.add_argument(
        "--box-init",
        default="image",
        choices=["image", "random", "grid"],
        help="MODEL.SPARSE_RCNN.PROPOSAL_BOX_INIT: which pyramid levels the RoIs pool from",
    )
    args, device, rec = common.parse_args(parser, "export.jsonl", min_run_time=20.0)
    if device.type != "cpu":
        raise SystemExit("bench_export.py compares CPU runtimes: run it with --device cpu")

    import onnxruntime as ort

    from sparse_rcnn.export import _max_difference, export_onnx, inference_func

    rec.env["onnxruntime"] = ort.__version__
    opts = (
        [] if args.box_init == "image" else ["MODEL.SPARSE_RCNN.PROPOSAL_BOX_INIT", args.box_init]
    )
    cfg = common.make_cfg(CONFIG, opts)
    model = common.build_model(cfg, seed=0).eval()
    common.scale_box_deltas(model, args.delta_scale)
    image = common.make_batch(1, args.height, args.width, None, 80)[0]["image"]

    path = args.onnx
    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix="bench_export_"), "model.onnx")
        export_onnx(model, image, path)
    session = make_session(ort, path, args.threads)
    feed = {"image": image.numpy()}

    outputs = {}

    def eager():
        with torch.no_grad():
            outputs["eager"] = inference_func(model, image)

    def onnxruntime():
        outputs["onnxruntime"] = session.run(["boxes", "scores", "classes"], feed)

    fns = {"eager": eager, "onnxruntime": onnxruntime}
    rec.begin()
    # Alternating blocks: the machine's speed drifts over minutes, and a ratio of two blocks
    # measured minutes apart would carry that drift.
    block_args = argparse.Namespace(
        **{**vars(args), "min_run_time": args.min_run_time / args.rounds}
    )
    rounds = [common.measure(fns, block_args, device, memory=False) for _ in range(args.rounds)]
    diff = _max_difference(outputs["eager"], outputs["onnxruntime"])
    stats = {
        name: common.times_stats_ms([t for r in rounds for t in r[name][0].times]) for name in fns
    }
    per_round = [r["eager"][0].median / r["onnxruntime"][0].median for r in rounds]
    speedup = statistics.median(per_round)
    rec.emit(
        "export_onnxruntime_vs_eager",
        **{
            "config": common.config_text(CONFIG, opts),
            "input": [3, args.height, args.width],
            "delta_scale": args.delta_scale,
            "stage1_rois_per_level": stage1_levels(model, args.height, args.width),
            "min_run_time_s": args.min_run_time,
            "rounds": args.rounds,
            **{f"{name}_{k}": v for name, s in stats.items() for k, v in s.items()},
            "speedup_per_round": [round(r, 3) for r in per_round],
            "speedup_onnxruntime_vs_eager": round(speedup, 3),
            "detections": int(len(np.asarray(outputs["eager"][1]))),
            "max_score_diff": None if diff is None else diff[0],
            "max_box_diff_px": None if diff is None else diff[1],
            "identical_detections": diff is not None and diff[0] <= 1e-4 and diff[1] <= 1e-2,
            "target": f"onnxruntime >= {TARGET_SPEEDUP}x eager",
            "target_speedup": TARGET_SPEEDUP,
            "target_pass": speedup >= TARGET_SPEEDUP,
        },
    )
    if args.split:
        rec.begin()
        record = {"config": common.config_text(CONFIG, opts), "input": [3, args.height, args.width]}
        record.update(runs=args.split, **eager_split(model, image, args.split))
        record.update(onnxruntime_split(ort, path, feed, args.threads, args.split))
        rec.emit("export_time_split", **record)


def stage1_levels(model, height: int, width: int) -> dict:
    """How many of the first stage's RoIs (the initial proposal boxes on a ``height`` x ``width``
    image) each pyramid level pools, by Detectron2's level assignment (canonical 224 px at P4).
    Sparse R-CNN's boxes move little from stage to stage in this random model (scaled deltas)."""
    from detectron2.modeling.poolers import assign_boxes_to_levels
    from detectron2.structures import Boxes

    from sparse_rcnn.proposals import scale_proposal_boxes

    whwh = torch.tensor([[width, height, width, height]], dtype=torch.float32)
    boxes = scale_proposal_boxes(model.proposal_generator.init_proposal_boxes.weight, whwh)[0]
    levels = assign_boxes_to_levels([Boxes(boxes.detach())], 2, 5, 224, 4)
    return {f"p{k + 2}": int((levels == k).sum()) for k in range(4)}


def make_session(ort, path: str, threads: int, profile_prefix: str = ""):
    """An InferenceSession as ``ONNXRuntimePredictor`` makes it (CPU, all graph optimisations,
    ``threads`` intra-op threads, sequential), profiling its runs when ``profile_prefix`` is set."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def eager_split(model, image: torch.Tensor, runs: int) -> dict:
    """Medians over ``runs`` eager inferences (after one warm-up) of the whole, of the backbone and
    head forwards and of the rest of each run (``other``: normalisation, padding, top-k), in ms."""
    from sparse_rcnn.export import inference_func

    timer = common.PartTimer(torch.device("cpu"))
    timer.wrap(model.backbone, "backbone")
    timer.wrap(model.head, "head")
    per_run = []
    with torch.no_grad():
        for _ in range(runs + 1):
            start = time.perf_counter()
            inference_func(model, image)
            parts = {"total": time.perf_counter() - start, **timer.take()}
            parts["other"] = parts["total"] - parts["backbone"] - parts["head"]
            per_run.append(parts)
    return _medians_ms("eager", per_run[1:])


def onnxruntime_split(ort, path: str, feed: dict, threads: int, runs: int) -> dict:
    """The same for ``runs`` profiled ONNX Runtime runs (after one warm-up): each run's wall time
    and the summed kernel times of its backbone, head and other nodes (node names carry the module
    path: "/backbone/...", "/head/..."), with the head's five costliest operator types."""
    prefix = os.path.join(tempfile.mkdtemp(prefix="bench_export_profile_"), "ort")
    session = make_session(ort, path, threads, profile_prefix=prefix)
    for _ in range(runs + 1):
        session.run(None, feed)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"]
    per_run = [collections.defaultdict(float, total=(end - ts) / 1e6) for ts, end in spans]
    head_ops = [collections.defaultdict(float) for _ in spans]
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        run = next(i for i, (ts, end) in enumerate(spans) if ts <= event["ts"] <= end)
        name, seconds = event["name"], event["dur"] / 1e6
        part = "backbone" if "/backbone" in name else "head" if "/head" in name else "other"
        per_run[run][part] += seconds
        if part == "head":
            head_ops[run][event["args"].get("op_name", "?")] += seconds
    out = _medians_ms("onnxruntime", per_run[1:])
    ops = {op: statistics.median(r[op] for r in head_ops[1:]) * 1e3 for op in head_ops[-1]}
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:5]
    out["onnxruntime_head_top_ops_ms"] = {op: round(ms, 1) for op, ms in top}
    return out


def _medians_ms(runtime: str, per_run) -> dict:
    names = ("total", "backbone", "head", "other")
    return {
        f"{runtime}_{n}_ms": round(statistics.median(r[n] for r in per_run) * 1e3, 1) for n in names
    }


if __name__ == "__main__":
    main()
