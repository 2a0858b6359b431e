"""Run a trained Sparse R-CNN on images and draw its detections, like Detectron2's demo.

    python -m sparse_rcnn.demo --config-file configs/sparse_rcnn_quick_cpu.yaml \
        --input img1.png img2.png (or a folder) --output out_dir \
        --confidence-threshold 0.3 --opts MODEL.WEIGHTS output/quick_cpu/model_final.pth

``--dataset synthetic_shapes_val --num-images 8`` takes the images of a registered dataset instead
of ``--input``. ``--onnx model.onnx`` runs an exported graph with ONNX Runtime instead of the
PyTorch model (``python -m sparse_rcnn.export``).
"""

import argparse
import glob
import logging
import os
from typing import List, Optional

import cv2
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

from .builtin_datasets import prepare_builtin_dataset
from .checks import check_device, check_weights_file, explain_checkpoint_errors
from .config import get_sparse_rcnn_cfg
from .engine import setup_package_logger
from .visualization import draw_prediction_beside_ground_truth

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

def setup_cfg(config_file: str, opts: List[str], confidence_threshold: float):
    cfg = get_sparse_rcnn_cfg(config_file, opts)
    check_device(cfg, command="demo.py")
    cfg.MODEL.SPARSE_RCNN.SCORE_THRESH_TEST = confidence_threshold
    cfg.freeze()
    return cfg

def expand_inputs(inputs: List[str]) -> List[str]:
    """Files as given; folders expanded to the images they contain (sorted)."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(
                p
                for p in glob.glob(os.path.join(item, "*"))
                if p.lower().endswith(IMAGE_EXTENSIONS)
            )
        else:
            paths += sorted(glob.glob(os.path.expanduser(item))) or [item]
    return paths

def draw_predictions(
    predictor: DefaultPredictor,
    path: str,
    metadata,
    max_detections: Optional[int] = None,
    confidence_threshold: Optional[float] = None,
    record: Optional[dict] = None,
):
    """Run the predictor on one image file; return (instances, BGR image with boxes drawn).

    Only detections scoring above ``confidence_threshold`` (if given) are kept, and of those the
    ``max_detections`` highest-scoring ones (if given). With the image's dataset ``record``, the
    ground truth is drawn beside the predictions, both upscaled to read
    (:func:`sparse_rcnn.visualization.draw_prediction_beside_ground_truth`).
    """
    image_bgr = read_image(path, format="BGR")
    instances = predictor(image_bgr)["instances"].to("cpu")
    return render(image_bgr, instances, metadata, max_detections, confidence_threshold, record)

def render(
    image_bgr, instances, metadata, max_detections=None, confidence_threshold=None, record=None
):
    """Select detections as :func:`draw_predictions` does; return them and the drawn image."""
    if confidence_threshold is not None:
        instances = instances[instances.scores > confidence_threshold]
    if max_detections is not None:
        instances = instances[instances.scores.argsort(descending=True)[:max_detections]]
    if record is not None:
        scale = max(1.0, 512.0 / max(image_bgr.shape[:2]))
        classes = metadata.get("thing_classes", [])
        drawn = draw_prediction_beside_ground_truth(image_bgr, instances, record, classes, scale)
        return instances, drawn
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata)
    drawn = visualizer.draw_instance_predictions(instances).get_image()[:, :, ::-1]
    return instances, drawn

def get_parser():
    parser = argparse.ArgumentParser(description="Sparse R-CNN demo")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--input", nargs="+", help="image files, globs or folders")
    inputs.add_argument("--dataset", help="a registered dataset whose first images to draw")
    parser.add_argument("--num-images", type=int, default=8, help="images taken from --dataset")
    parser.add_argument("--output", required=True, help="folder for the drawn images")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--max-detections", type=int, default=None, help="draw at most this many")
    parser.add_argument(
        "--onnx",
        metavar="FILE",
        help="run this exported ONNX graph with ONNX Runtime instead of the PyTorch model "
        "(python -m sparse_rcnn.export); the config gives the dataset and the preprocessing",
    )
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="KEY VALUE pairs")
    return parser

def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_package_logger()
    # The model keeps every detection; the threshold is applied here (the same detections, as
    # top-k, threshold and NMS commute for the kept ones), so that the demo can report the highest
    # score when nothing passes it.
    cfg = setup_cfg(args.config_file, args.opts, 0.0)
    if args.onnx:
        from .onnx_predictor import ONNXRuntimePredictor

        predictor = ONNXRuntimePredictor(args.onnx, cfg)
    else:
        if not cfg.MODEL.WEIGHTS:
            logger.warning(
                "MODEL.WEIGHTS is empty: the model is untrained (random weights) and its "
                "detections mean nothing. Add --opts MODEL.WEIGHTS path/to/model_final.pth (e.g. "
                "output/quick_cpu/model_final.pth after `make demo`)."
            )
        check_weights_file(cfg.MODEL.WEIGHTS)
        with explain_checkpoint_errors(cfg.MODEL.WEIGHTS):
            predictor = DefaultPredictor(cfg)
    dataset = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
    metadata = MetadataCatalog.get(dataset)
    records = {}
    if args.dataset:
        prepare_builtin_dataset(args.dataset)
        records = {r["file_name"]: r for r in DatasetCatalog.get(args.dataset)[: args.num_images]}
        paths = list(records)
        metadata = MetadataCatalog.get(args.dataset)
    else:
        paths = expand_inputs(args.input)
    if not paths:
        raise SystemExit(f"No images found in {args.input or args.dataset}")
    os.makedirs(args.output, exist_ok=True)
    total, highest = 0, float("-inf")
    for path in paths:
        image_bgr = read_image(path, format="BGR")
        everything = predictor(image_bgr)["instances"].to("cpu")
        if len(everything):
            highest = max(highest, everything.scores.max().item())
        instances, drawn = render(
            image_bgr,
            everything,
            metadata,
            args.max_detections,
            args.confidence_threshold,
            records.get(path),
        )
        total += len(instances)
        out_path = os.path.join(args.output, os.path.basename(path))
        cv2.imwrite(out_path, drawn)
        print(f"{path}: {len(instances)} detections -> {out_path}")
    if total == 0:
        seen = f"the highest score was {highest:.3f}" if highest > float("-inf") else "none at all"
        logger.warning(
            f"No detection scored above --confidence-threshold {args.confidence_threshold} in "
            f"{len(paths)} image(s) ({seen}): lower --confidence-threshold"
            + (" or give trained weights (MODEL.WEIGHTS)." if not cfg.MODEL.WEIGHTS else ".")
        )
    return total

if __name__ == "__main__":
    main()
