"""A trained model and its exported ONNX graph, image by image: ``DefaultPredictor`` against
``ONNXRuntimePredictor`` on the first images of a dataset.

The check of the export issue's "done when": ``python -m sparse_rcnn.export`` writes a model that
the ONNX predictor runs with the same detections as ``DefaultPredictor``. Both predictors take the
same BGR image (``cv2.imread``) and return ``Instances`` at the original size; per image the
detections must agree in number, order and classes (detections whose scores differ by less than
1e-5 may come in either order, as in ``sparse_rcnn.export.verify``), scores within 1e-4 and boxes
within 1e-3 px (the export issue's tolerances, as in tests/test_export.py); the record gives the
largest score and box differences over all images, the images that differ, and each predictor's
median time per image (same threads).

Usage (the quick model, trained by ``python train_net.py --config-file
configs/sparse_rcnn_quick_cpu.yaml``, exported by the command in docs/deployment.md):
    python benchmarks/compare_predictors.py --config-file configs/sparse_rcnn_quick_cpu.yaml \\
        --onnx out/model.onnx --num-images 40 MODEL.WEIGHTS output/quick_cpu/model_final.pth
"""

import argparse
import statistics
import time

import cv2
import torch

import common

SCORE_TOL, BOX_TOL_PX = 1e-4, 1e-3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config-file", required=True, help="the yaml config the model was trained with"
    )
    parser.add_argument("--onnx", required=True, help="the graph written by sparse_rcnn.export")
    parser.add_argument("--dataset", default="synthetic_shapes_val")
    parser.add_argument("--num-images", type=int, default=40)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config options (MODEL.WEIGHTS ...)")
    args, device, rec = common.parse_args(parser, "export_trained.jsonl", min_run_time=0.0)

    from detectron2.data import DatasetCatalog

    from sparse_rcnn.builtin_datasets import prepare_builtin_dataset
    from sparse_rcnn.config import get_sparse_rcnn_cfg
    from sparse_rcnn.export import _max_difference
    from sparse_rcnn.onnx_predictor import ONNXRuntimePredictor
    from sparse_rcnn.predictor import SparseRCNNPredictor  # DefaultPredictor, loading weights-only

    cfg = get_sparse_rcnn_cfg(args.config_file, [*args.opts, "MODEL.DEVICE", str(device)])
    prepare_builtin_dataset(args.dataset)
    records = DatasetCatalog.get(args.dataset)[: args.num_images]
    eager = SparseRCNNPredictor(cfg)
    exported = ONNXRuntimePredictor(args.onnx, num_threads=args.threads)

    def detections(instances):
        instances = instances.to("cpu")
        return instances.pred_boxes.tensor, instances.scores, instances.pred_classes

    rec.begin()
    times = {"eager": [], "onnxruntime": []}
    differing, total, score_diff, box_diff = [], 0, 0.0, 0.0
    for record in records:
        image = cv2.imread(record["file_name"])
        outputs = {}
        for name, predictor in (("eager", eager), ("onnxruntime", exported)):
            start = time.perf_counter()
            with torch.no_grad():
                outputs[name] = detections(predictor(image)["instances"])
            times[name].append(time.perf_counter() - start)
        diff = _max_difference(outputs["eager"], outputs["onnxruntime"])
        total += len(outputs["eager"][1])
        if diff is not None:
            score_diff, box_diff = max(score_diff, diff[0]), max(box_diff, diff[1])
        if diff is None or diff[0] > SCORE_TOL or diff[1] > BOX_TOL_PX:
            differing.append(record["file_name"])
    rec.emit(
        "export_trained_predictors",
        config=" ".join([args.config_file, *args.opts]),
        onnx=args.onnx,
        dataset=args.dataset,
        images=len(records),
        detections=total,
        images_with_different_detections=differing,
        max_score_diff=score_diff,
        max_box_diff_px=box_diff,
        tolerances={"score": SCORE_TOL, "box_px": BOX_TOL_PX},
        same_detections=not differing,
        eager_median_ms=round(1000 * statistics.median(times["eager"]), 2),
        onnxruntime_median_ms=round(1000 * statistics.median(times["onnxruntime"]), 2),
    )
    if differing:
        raise SystemExit(f"{len(differing)} images with different detections: {differing[:5]}")


if __name__ == "__main__":
    main()
