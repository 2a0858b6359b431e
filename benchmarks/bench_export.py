"""ONNX Runtime vs eager PyTorch: Sparse R-CNN R-50-FPN, 300 proposals, one 800x1216 image, CPU.

Exports configs/sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml (random weights, seed 0) with
``sparse_rcnn.export.export_onnx`` (or takes ``--onnx FILE``, exported from the same seed) and
times, one after another (``torch.utils.benchmark``'s ``blocked_autorange``, see common.py), on the
same random image with the same number of threads:

* ``eager``: ``model.inference([{"image": image}], do_postprocess=False)`` under
  ``torch.no_grad()`` (what ``DefaultPredictor`` runs, without its resize);
* ``onnxruntime``: the exported graph in an ``InferenceSession`` (CPU provider, all graph
  optimisations, ``intra_op_num_threads`` = ``--threads``).

It checks that the detections are identical (same number, order and classes, scores within 1e-4,
boxes within 0.01 px: the 1e-3 px of the tests is 1e-6 of the ~1000-px coordinates here, about
8 float32 ulps, and 6 stages at 300 proposals measured 1.7e-3 px) and prints one JSON record with min/median/max of each, the speed-up
(eager median / ONNX Runtime median), the target (>= 1.7x) and the load average. As in the tests
(tests/test_export.py), the random model's box-delta layers are scaled by ``--delta-scale``
(0.1) so that its boxes stay on the image as a trained model's do (the same operations run).

Usage:
    python benchmarks/bench_export.py [--threads 2] [--min-run-time 20] [--onnx out/r50_300.onnx]
"""

import argparse
import os
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
    args, device, rec = common.parse_args(parser, "export.jsonl", min_run_time=20.0)
    if device.type != "cpu":
        raise SystemExit("bench_export.py compares CPU runtimes: run it with --device cpu")

    import onnxruntime as ort

    from sparse_rcnn.export import _max_difference, export_onnx, inference_func

    rec.env["onnxruntime"] = ort.__version__
    cfg = common.make_cfg(CONFIG)
    model = common.build_model(cfg, seed=0).eval()
    with torch.no_grad():
        for stage in model.head.head_series:
            stage.bboxes_delta.weight.mul_(args.delta_scale)
            stage.bboxes_delta.bias.mul_(args.delta_scale)
    image = common.make_batch(1, args.height, args.width, None, 80)[0]["image"]

    path = args.onnx
    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix="bench_export_"), "model.onnx")
        export_onnx(model, image, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"image": image.numpy()}

    outputs = {}

    def eager():
        with torch.no_grad():
            outputs["eager"] = inference_func(model, image)

    def onnxruntime():
        outputs["onnxruntime"] = session.run(["boxes", "scores", "classes"], feed)

    fns = {"eager": eager, "onnxruntime": onnxruntime}
    rec.begin()
    measured = common.measure(fns, args, device, memory=False)
    diff = _max_difference(outputs["eager"], outputs["onnxruntime"])
    stats = {name: common.stats_ms(m) for name, (m, _) in measured.items()}
    speedup = stats["eager"]["median_ms"] / stats["onnxruntime"]["median_ms"]
    rec.emit(
        "export_onnxruntime_vs_eager",
        **{
            "config": common.config_text(CONFIG, []),
            "input": [3, args.height, args.width],
            "delta_scale": args.delta_scale,
            "min_run_time_s": args.min_run_time,
            **{f"{name}_{k}": v for name, s in stats.items() for k, v in s.items()},
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


if __name__ == "__main__":
    main()
