"""ONNX Runtime vs eager PyTorch: Sparse R-CNN R-50-FPN, 300 proposals, one 800x1216 image, CPU.

Exports configs/sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml (random weights, seed 0, box deltas scaled
by ``--delta-scale`` as in tests/test_export.py) with ``sparse_rcnn.export.export_onnx`` (or takes
``--onnx FILE`` exported from the same seed) and times ``eager`` (``inference_func`` under
``no_grad``: what ``DefaultPredictor`` runs, without its resize) against ``onnxruntime`` (the
graph in an ``InferenceSession`` set up as ``ONNXRuntimePredictor`` does) on the same image with
the same threads, in ``--rounds`` alternating blocks (the machine's speed drifts over minutes).
One record: each runtime's statistics, the speed-up of every round and their median against the
target (>= 1.7x), and whether the detections are identical (same number, order and classes,
scores within 1e-4, boxes within 0.01 px: 1e-3 px of the tests is ~8 float32 ulps at ~1000 px).

``--box-init`` sets the random model's initial proposal boxes: ``image`` (the config's) pools all
RoIs from P5, ``grid`` (17x18 cells) from P2 as a trained model's small boxes do; the record gives
the first stage's RoIs per level. Results: docs/deployment.md and docs/benchmarks.md.

Usage:
    python benchmarks/bench_export.py [--threads 2] [--min-run-time 20] [--onnx out/r50_300.onnx]
        [--box-init image|random|grid] [--rounds 3]
"""

import argparse
import os
import statistics
import tempfile

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


def make_session(ort, path: str, threads: int):
    """An InferenceSession as ``ONNXRuntimePredictor`` makes it (CPU, all graph optimisations,
    ``threads`` intra-op threads, sequential)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


if __name__ == "__main__":
    main()
