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
import os
from typing import List, Optional

import cv2
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

from .builtin_datasets import prepare_builtin_dataset
from .config import add_sparse_rcnn_config

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def setup_cfg(config_file: str, opts: List[str], confidence_threshold: float):
    cfg = get_cfg()
    add_sparse_rcnn_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
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
    predictor: DefaultPredictor, path: str, metadata, max_detections: Optional[int] = None
):
    """Run the predictor on one image file; return (instances, BGR image with boxes drawn).

    Only the ``max_detections`` highest-scoring detections are kept, if given.
    """
    image_bgr = read_image(path, format="BGR")
    instances = predictor(image_bgr)["instances"].to("cpu")
    if max_detections is not None:
        instances = instances[instances.scores.argsort(descending=True)[:max_detections]]
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
    cfg = setup_cfg(args.config_file, args.opts, args.confidence_threshold)
    if args.onnx:
        from .onnx_predictor import ONNXRuntimePredictor

        predictor = ONNXRuntimePredictor(args.onnx, cfg)
    else:
        predictor = DefaultPredictor(cfg)
    dataset = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
    metadata = MetadataCatalog.get(dataset)
    if args.dataset:
        prepare_builtin_dataset(args.dataset)
        records = DatasetCatalog.get(args.dataset)[: args.num_images]
        paths = [r["file_name"] for r in records]
        metadata = MetadataCatalog.get(args.dataset)
    else:
        paths = expand_inputs(args.input)
    if not paths:
        raise SystemExit(f"No images found in {args.input or args.dataset}")
    os.makedirs(args.output, exist_ok=True)
    for path in paths:
        instances, drawn = draw_predictions(predictor, path, metadata, args.max_detections)
        out_path = os.path.join(args.output, os.path.basename(path))
        cv2.imwrite(out_path, drawn)
        print(f"{path}: {len(instances)} detections -> {out_path}")


if __name__ == "__main__":
    main()
