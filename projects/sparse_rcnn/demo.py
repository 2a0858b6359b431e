"""Run a trained Sparse R-CNN on images and draw its detections, like Detectron2's demo.

    python -m sparse_rcnn.demo --config-file configs/dynamic_sparse_rcnn_dla_only_quick_cpu.yaml \
        --input img1.png img2.png (or a folder) --output out_dir \
        --opts MODEL.WEIGHTS output/demo_cpu/model_final.pth

``--dataset synthetic_shapes_val --num-images 8`` takes the images of a registered dataset instead
of ``--input`` and draws their ground truth beside the predictions. Your own COCO-format set is
registered on the command line (``sparse_rcnn.custom_datasets``)::

    python -m sparse_rcnn.demo --config-file output/trees/config.yaml \
        --register-coco trees_val trees/val.json trees/images --dataset trees_val \
        --output vis/ --opts MODEL.WEIGHTS output/trees/model_final.pth

The boxes are labelled with the class names of ``--dataset``, else of the training set the model
learned (the config's ``DATASETS.TRAIN``: its metadata or COCO json), else of the config's test
set; without any, with class ids and a warning that says how to name them. Images smaller than
512 px are drawn upscaled, so that the labels can be read.

The default ``--confidence-threshold auto`` suits the model shown: a short-schedule model trained
from scratch scores its correct detections far below Detectron2's fixed 0.5 (the main job's
model: about 0.3), a COCO model above it. ``auto`` is the score threshold at which the detections
of the drawn images best match their ground truth (highest F1 at IoU 0.5, same class, each ground
truth box matched once, as COCO matches); images without ground truth (``--input``) get
Detectron2's fixed 0.5. The chosen value and where it came from are logged. Nothing is generated
or read besides the images drawn (and the class names).

``--onnx model.onnx`` runs an exported graph with ONNX Runtime instead of the
PyTorch model (``python -m sparse_rcnn.export``).
"""

import argparse
import glob
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.visualizer import Visualizer

from .builtin_datasets import prepare_builtin_dataset
from .config_loader import config_reader, load_config
from .custom_datasets import (
    add_register_coco_argument,
    check_registered,
    config_num_classes,
    dataset_class_names,
    opts_with_dataset_num_classes,
    register_from_args,
    test_dataset_names,
    train_dataset_names,
)
from .runtime import setup_package_logger
from .visualization import draw_prediction_beside_ground_truth, ground_truth

# Named, not __name__: run as `python -m sparse_rcnn.demo` the module is "__main__".
logger = logging.getLogger("sparse_rcnn.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
AUTO = "auto"
# ``auto`` without any ground truth to choose by: Detectron2's demo default.
FALLBACK_THRESHOLD = 0.5
# Images are drawn upscaled to at least this many pixels on their longer side.
MIN_DRAWN_SIZE = 512


def setup_cfg(config_file: str, opts: List[str], confidence_threshold: float):
    """The config (yaml with ``KEY VALUE`` options, or a ``.py`` LazyConfig with ``key=value``
    overrides: ``sparse_rcnn.config_loader``), its device checked, with the score threshold."""
    cfg = load_config(config_file, opts)
    run = config_reader(cfg)
    run.check_device(command="demo.py")
    run.set_score_threshold(confidence_threshold)
    run.freeze()
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


def drawing_scale(image: np.ndarray) -> float:
    """The upscaling of an (H, W, ...) image's drawing: to :data:`MIN_DRAWN_SIZE` px on its longer
    side, never down (a 128-px image is drawn 4x, labels stay the font's size)."""
    return max(1.0, MIN_DRAWN_SIZE / max(image.shape[:2]))


def render(
    image_bgr, instances, metadata, max_detections=None, confidence_threshold=None, record=None
):
    """Select detections as :func:`draw_predictions` does; return them and the drawn image
    (upscaled by :func:`drawing_scale`; Detectron2's ``Visualizer`` without a ``record``)."""
    if confidence_threshold is not None:
        instances = instances[instances.scores > confidence_threshold]
    if max_detections is not None:
        instances = instances[instances.scores.argsort(descending=True)[:max_detections]]
    scale = drawing_scale(image_bgr)
    if record is not None:
        classes = metadata.get("thing_classes", [])
        drawn = draw_prediction_beside_ground_truth(image_bgr, instances, record, classes, scale)
        return instances, drawn
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata, scale=scale)
    drawn = visualizer.draw_instance_predictions(instances).get_image()[:, :, ::-1]
    return instances, drawn


def _true_positives(
    instances: Instances, gt_boxes: np.ndarray, gt_classes: List[int], iou_threshold: float
) -> torch.Tensor:
    """(D,) bool: detection d (in descending score order) matches a not yet matched ground-truth
    box (``gt_boxes`` (G, 4) XYXY_ABS, ``gt_classes`` G ids) of its class with IoU >=
    ``iou_threshold`` (greedy by score, as COCO matches)."""
    order = instances.scores.argsort(descending=True)
    hit = torch.zeros(len(order), dtype=torch.bool)
    if not gt_classes or not len(order):
        return hit
    gt_classes = torch.tensor(gt_classes)
    iou = pairwise_iou(instances.pred_boxes[order], Boxes(torch.from_numpy(gt_boxes)))  # (D, G)
    iou[instances.pred_classes[order][:, None] != gt_classes[None, :]] = -1.0
    for d in range(len(order)):
        best, g = iou[d].max(0)
        if best >= iou_threshold:
            hit[d] = True
            iou[:, g] = -1.0  # matched once
    return hit


def f1_optimal_threshold(
    predictions: Sequence[Instances], records: Sequence[Dict], iou_threshold: float = 0.5
) -> Optional[float]:
    """The score threshold whose kept detections best match the ground truth of ``records``.

    Over all images together, detections above the threshold are counted as true positives when
    they match a ground-truth box (see :func:`_true_positives`); the threshold maximises
    F1 = 2 TP / (kept + ground truth). It lies halfway between the lowest kept score and the next
    lower one (or at half the lowest kept score), so that ``scores > threshold`` keeps exactly
    the chosen detections.

    Args:
        predictions: one Instances per image (pred_boxes, pred_classes, scores), in the pixels
            of its record's annotations.
        records: the images' Detectron2 dataset dicts ("annotations").
        iou_threshold: IoU at which a detection matches.

    Returns:
        The threshold, or None when there is no ground truth or no detection.
    """
    scores, hits, num_gt = [], [], 0
    for instances, record in zip(predictions, records):
        gt_boxes, gt_classes = ground_truth(record)
        num_gt += len(gt_classes)
        scores.append(instances.scores.sort(descending=True).values)
        hits.append(_true_positives(instances, gt_boxes, gt_classes, iou_threshold))
    scores, hits = torch.cat(scores), torch.cat(hits)
    if num_gt == 0 or not len(scores):
        return None
    order = scores.argsort(descending=True, stable=True)
    scores, hits = scores[order], hits[order]
    kept = torch.arange(1, len(scores) + 1)
    f1 = 2 * hits.cumsum(0) / (kept + num_gt)
    k = int(f1.argmax())  # the first of equal maxima: the fewest detections
    lower = scores[k + 1] if k + 1 < len(scores) else torch.tensor(0.0)
    return float((scores[k] + lower) / 2)


def auto_threshold(
    predictions: List[Instances], records: List[Optional[Dict]]
) -> Tuple[float, str]:
    """``--confidence-threshold auto`` (module doc): the threshold for the drawn images and where
    it came from: their ground truth (``records``, None for an image without), else
    :data:`FALLBACK_THRESHOLD`. Nothing else is read."""
    labelled = [(p, r) for p, r in zip(predictions, records) if r is not None]
    threshold = f1_optimal_threshold(*zip(*labelled)) if labelled else None
    if threshold is None:
        why = (
            "no box in the drawn images' ground truth, or no detection"
            if labelled
            else "the drawn images have no ground truth"
        )
        return FALLBACK_THRESHOLD, (
            f"{why}: Detectron2's demo default; --dataset NAME (with --register-coco for your own "
            "COCO json) chooses it from the ground truth"
        )
    return threshold, f"highest F1 at IoU 0.5 on the ground truth of the {len(labelled)} images"


def class_names(cfg, dataset: Optional[str] = None) -> Tuple[Optional[List[str]], str]:
    """The names of the model's classes for the labels, and where they came from: those of
    ``dataset`` (``--dataset``), else of the config's first training set (the classes the model
    learned), else of its first test set (:func:`sparse_rcnn.custom_datasets.dataset_class_names`:
    metadata or COCO json; nothing is generated). ``(None, why)`` when none is known, or when
    their number is not the model's class count."""
    candidates = [dataset] if dataset else []
    candidates += train_dataset_names(cfg)[:1] + test_dataset_names(cfg)[:1]
    for name in candidates:
        names = dataset_class_names(name)
        if names is None:
            continue
        if len(names) != config_num_classes(cfg):
            return None, (
                f"dataset {name} has {len(names)} classes but the model {config_num_classes(cfg)}"
            )
        return names, f"dataset {name}"
    tried = ", ".join(candidates) or "none in the config"
    return None, f"no registered dataset with class names among {tried}"


def _threshold(text: str):
    return text if text == AUTO else float(text)


def get_parser():
    parser = argparse.ArgumentParser(description="Sparse R-CNN demo")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--input", nargs="+", help="image files, globs or folders")
    inputs.add_argument("--dataset", help="a registered dataset whose first images to draw")
    parser.add_argument("--num-images", type=int, default=8, help="images taken from --dataset")
    parser.add_argument("--output", required=True, help="folder for the drawn images")
    parser.add_argument(
        "--confidence-threshold",
        type=_threshold,
        default=AUTO,
        help="minimum score of the drawn detections, or 'auto' (default): the threshold with the "
        "highest F1 against ground truth (the module doc says which images)",
    )
    parser.add_argument("--max-detections", type=int, default=None, help="draw at most this many")
    parser.add_argument(
        "--onnx",
        metavar="FILE",
        help="run this exported ONNX graph with ONNX Runtime instead of the PyTorch model "
        "(python -m sparse_rcnn.export); the config gives the dataset and the preprocessing",
    )
    add_register_coco_argument(parser)
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config options: KEY VALUE pairs for a yaml config, key=value for a .py LazyConfig",
    )
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_package_logger()
    register_from_args(args)
    if args.dataset:
        check_registered(args.dataset, "--dataset")  # before the model: an error naming the fix
    args.opts = opts_with_dataset_num_classes(args.config_file, args.opts)
    # The model keeps every detection; the threshold is applied here (the same detections, as
    # top-k, threshold and NMS commute for the kept ones), so that the demo can report the highest
    # score when nothing passes it.
    cfg = setup_cfg(args.config_file, args.opts, 0.0)
    run = config_reader(cfg)
    if args.onnx:
        from .onnx_predictor import ONNXRuntimePredictor

        # A LazyConfig's preprocessing is the one the file's metadata records (export wrote it
        # from that config).
        predictor = ONNXRuntimePredictor(args.onnx, None if run.lazy else cfg)
    else:
        if not run.weights:
            logger.warning(
                f"{run.keys['weights']} is empty: the model is untrained (random weights) and its "
                f"detections mean nothing. Add --opts {run.option('weights', 'path/to/model.pth')}"
                " (e.g. output/demo_cpu/model_final.pth after `make demo`)."
            )
        # SparseRCNNPredictor: weights-only; weights that do not fit the model are an error.
        predictor = run.build_predictor()
    records = {}
    if args.dataset:
        prepare_builtin_dataset(args.dataset)  # the built-in one asked for: generated if needed
        records = {r["file_name"]: r for r in DatasetCatalog.get(args.dataset)[: args.num_images]}
        paths = list(records)
    else:
        paths = expand_inputs(args.input)
    names, names_source = class_names(cfg, args.dataset)
    if names is None:
        logger.warning(
            f"The boxes are labelled with class ids: {names_source}. Register the training set "
            "(--register-coco NAME JSON IMAGE_ROOT) and name it in the config's DATASETS.TRAIN "
            "to label them with its class names."
        )
    else:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        logger.info(f"Class names from {names_source}: {shown}")
    metadata = Metadata(name="sparse_rcnn.demo", thing_classes=names or [])
    if not paths:
        raise SystemExit(f"No images found in {args.input or args.dataset}")
    os.makedirs(args.output, exist_ok=True)
    images = [read_image(path, format="BGR") for path in paths]
    predictions = [predictor(image)["instances"].to("cpu") for image in images]
    threshold = args.confidence_threshold
    if threshold == AUTO:
        threshold, source = auto_threshold(predictions, [records.get(p) for p in paths])
        logger.info(f"--confidence-threshold auto: {threshold:.3f} ({source})")
    total, highest = 0, float("-inf")
    for path, image_bgr, everything in zip(paths, images, predictions):
        if len(everything):
            highest = max(highest, everything.scores.max().item())
        instances, drawn = render(
            image_bgr, everything, metadata, args.max_detections, threshold, records.get(path)
        )
        total += len(instances)
        out_path = os.path.join(args.output, os.path.basename(path))
        cv2.imwrite(out_path, drawn)
        print(f"{path}: {len(instances)} detections -> {out_path}")
    if total == 0:
        seen = f"the highest score was {highest:.3f}" if highest > float("-inf") else "none at all"
        logger.warning(
            f"No detection scored above --confidence-threshold {threshold:g} in "
            f"{len(paths)} image(s) ({seen}): lower --confidence-threshold"
            + (f" or give trained weights ({run.keys['weights']})." if not run.weights else ".")
        )
    return total


if __name__ == "__main__":
    main()
