"""Pictures of a trained model: detections (with their masks, for QueryInst) beside the ground
truth, training curves, AP per stage.

Used by the demo (``python -m sparse_rcnn.demo --dataset ...``) and by ``python -m sparse_rcnn.report``.
The built-in dataset's images are 128 px, so detections are drawn on an upscaled copy, with the
labels written above each box (never over the object) on a filled background.
"""

import json
import os
import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from detectron2.structures import BoxMode, Instances

__all__ = [
    "draw_boxes",
    "ground_truth_masks",
    "draw_prediction_beside_ground_truth",
    "read_metrics",
    "plot_training_curves",
    "plot_ap_per_stage",
]

# BGR colours, one per class (tab10), cycled for more classes.
_COLORS = [
    (180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
    (75, 86, 140), (194, 119, 227), (127, 127, 127), (34, 189, 188), (207, 190, 23),
]  # fmt: skip


def _color(class_id: int) -> Tuple[int, int, int]:
    return _COLORS[class_id % len(_COLORS)]


def _overlaps(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_label(
    box: Tuple[int, int, int, int],
    label_size: Tuple[int, int],
    placed: Sequence[Tuple[int, int, int, int]],
    canvas_size: Tuple[int, int],
) -> Tuple[int, int]:
    """Top-left corner of a box's label: just above the box, else just below it (no room above),
    moved further out (up, or down below the box) past the labels already ``placed`` so that no
    two labels cover each other (two detections of one object have the same box); on the canvas.

    Args:
        box: x0, y0, x1, y1 on the canvas.
        label_size: label width and height.
        placed: x0, y0, x1, y1 of the labels drawn so far.
        canvas_size: canvas width and height.
    """
    (x0, y0, _, y1), (width, height) = box, label_size
    left = int(np.clip(x0, 0, max(canvas_size[0] - width, 0)))
    step = height + 1
    candidates = list(range(y0 - height - 2, -1, -step))  # above the box, going up
    candidates += list(range(y1 + 2, canvas_size[1] - height + 1, step))  # below, going down
    candidates.append(max(min(y1 + 2, canvas_size[1] - height), 0))  # the bottom row
    for top in candidates:
        if not any(_overlaps((left, top, left + width, top + height), p) for p in placed):
            return left, top
    # Every row is taken (a crowded image): the first choice, as without other labels.
    return left, candidates[0]


def draw_boxes(
    image_bgr: np.ndarray,
    boxes: np.ndarray,
    classes: Sequence[int],
    class_names: Sequence[str],
    scores: Optional[Sequence[float]] = None,
    scale: float = 4.0,
    masks: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Draw boxes (and instance masks) on an upscaled copy of the image, each label above its box.

    Args:
        image_bgr: (H, W, 3) uint8.
        boxes: (R, 4) xyxy in pixels of ``image_bgr``.
        classes: R class ids; class_names: a name per class id.
        scores: R scores, written after the name, or None (ground truth).
        scale: upscaling factor of the drawing (the 128-px images read well at 4).
        masks: (R, H, W) bool instance masks, filled half-transparent in the class colour with
            their outline, or None.

    Returns:
        (round(H * scale), round(W * scale), 3) uint8 BGR.
    """
    height, width = image_bgr.shape[:2]
    size = (int(round(width * scale)), int(round(height * scale)))
    canvas = cv2.resize(image_bgr, size, interpolation=cv2.INTER_LINEAR)
    if masks is not None:
        if len(masks) != len(boxes) or tuple(masks.shape[1:]) != (height, width):
            raise ValueError(
                f"masks must be ({len(boxes)}, {height}, {width}) like the boxes and the image, "
                f"got {tuple(masks.shape)}"
            )
        for mask, class_id in zip(np.asarray(masks, dtype=np.uint8), classes):
            big = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST).astype(bool)
            color = np.array(_color(int(class_id)), dtype=np.float32)
            canvas[big] = (0.5 * canvas[big] + 0.5 * color).astype(np.uint8)
            contours, _ = cv2.findContours(
                big.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
            )
            cv2.drawContours(canvas, contours, -1, _color(int(class_id)), 1)
    font, font_scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1
    placed: List[Tuple[int, int, int, int]] = []
    for index, (box, class_id) in enumerate(zip(np.asarray(boxes, dtype=np.float64), classes)):
        x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
        color = _color(int(class_id))
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, 2)
        name = class_names[int(class_id)] if int(class_id) < len(class_names) else str(class_id)
        label = name if scores is None else f"{name} {float(scores[index]):.2f}"
        (text_w, text_h), baseline = cv2.getTextSize(label, font, font_scale, thickness)
        left, top = place_label((x0, y0, x1, y1), (text_w, text_h + baseline), placed, size)
        placed.append((left, top, left + text_w, top + text_h + baseline))
        cv2.rectangle(canvas, (left, top), (left + text_w, top + text_h + baseline), color, -1)
        cv2.putText(
            canvas, label, (left, top + text_h), font, font_scale, (255, 255, 255), thickness,
            cv2.LINE_AA,
        )  # fmt: skip
    return canvas


def ground_truth(record: Dict) -> Tuple[np.ndarray, List[int]]:
    """(G, 4) XYXY_ABS boxes and the G category ids of the annotations of a Detectron2 dataset
    dict that are not crowd regions (registered COCO-json datasets already hold contiguous ids).
    """
    annotations = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
    return np.array(boxes, dtype=np.float32).reshape(-1, 4), [a["category_id"] for a in annotations]


def _segmentation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a COCO "segmentation": polygons, RLE (compressed or not) or a mask."""
    import pycocotools.mask as mask_util

    if isinstance(segmentation, np.ndarray):
        return segmentation.astype(bool)
    if isinstance(segmentation, list):  # polygons
        rles = mask_util.frPyObjects([list(map(float, p)) for p in segmentation], height, width)
        return mask_util.decode(mask_util.merge(rles)).astype(bool)
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        segmentation = mask_util.frPyObjects(segmentation, *segmentation["size"])
    return mask_util.decode(segmentation).astype(bool)


def ground_truth_masks(record: Dict, height: int, width: int) -> Optional[np.ndarray]:
    """(G, H, W) bool masks of the annotations that :func:`ground_truth` draws, in its order, or
    None if one of them has no "segmentation"."""
    annotations = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    if not all("segmentation" in a for a in annotations):
        return None
    masks = [_segmentation_mask(a["segmentation"], height, width) for a in annotations]
    return np.array(masks, dtype=bool).reshape(-1, height, width)


def _titled(image: np.ndarray, title: str) -> np.ndarray:
    bar = np.full((24, image.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(bar, title, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, image], axis=0)


def draw_prediction_beside_ground_truth(
    image_bgr: np.ndarray,
    instances: Instances,
    record: Optional[Dict],
    class_names: Sequence[str],
    scale: float = 4.0,
) -> np.ndarray:
    """The ground truth (left, if ``record`` has annotations) beside the predictions (right), with
    the instance masks where the predictions have ``pred_masks`` (QueryInst) and the annotations
    have "segmentation".

    Args:
        image_bgr: (H, W, 3) uint8, the image the predictions are in.
        instances: predictions with pred_boxes, pred_classes and scores (and optionally
            pred_masks (R, H, W)), in image pixels.
        record: the image's Detectron2 dataset dict (its "annotations"), or None.
        class_names: the metadata's ``thing_classes``.
        scale: upscaling factor.
    """
    height, width = image_bgr.shape[:2]
    masks = instances.pred_masks.numpy() if instances.has("pred_masks") else None
    predicted = draw_boxes(
        image_bgr,
        instances.pred_boxes.tensor.numpy(),
        instances.pred_classes.tolist(),
        class_names,
        instances.scores.tolist(),
        scale,
        masks,
    )
    panels = [_titled(predicted, f"prediction ({len(instances)})")]
    if record is not None and "annotations" in record:
        boxes, classes = ground_truth(record)
        truth_masks = ground_truth_masks(record, height, width) if masks is not None else None
        truth = draw_boxes(image_bgr, boxes, classes, class_names, None, scale, truth_masks)
        gap = np.full((predicted.shape[0] + 24, 8, 3), 255, dtype=np.uint8)
        panels = [_titled(truth, f"ground truth ({len(classes)})"), gap] + panels
    return np.concatenate(panels, axis=1)


def read_metrics(output_dir: str) -> List[Dict]:
    """The records of ``{output_dir}/metrics.json`` (one JSON object a line), in order."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No metrics.json in {output_dir}: is it a training output dir?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(records: List[Dict], path: str) -> str:
    """Total loss and every stage's classification, L1 and GIoU losses over the iterations.

    Returns the path of the written PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage_losses = defaultdict(dict)  # (term, stage) -> {iteration: value}
    total = {}
    for record in records:
        if "total_loss" not in record:
            continue
        total[record["iteration"]] = record["total_loss"]
        for key, value in record.items():
            match = re.fullmatch(r"loss_(cls|l1|giou)_stage(\d+)", key)
            if match:
                stage_losses[(match.group(1), int(match.group(2)))][record["iteration"]] = value
    if not total:
        raise ValueError("metrics.json has no training records (total_loss)")
    terms = ("cls", "l1", "giou")
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].plot(list(total), list(total.values()), color="black")
    axes[0].set_title("total loss")
    stages = sorted({stage for _, stage in stage_losses})
    cmap = plt.get_cmap("viridis", max(len(stages), 2))
    for ax, term in zip(axes[1:], terms):
        for i, stage in enumerate(stages):
            curve = stage_losses.get((term, stage), {})
            ax.plot(list(curve), list(curve.values()), color=cmap(i), label=f"stage {stage}")
        ax.set_title(f"loss_{term} per stage")
    axes[-1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stage_ap(record: Dict) -> Dict[int, float]:
    """``bbox_stage{t}/AP`` of an evaluation record (``EVAL_PER_STAGE``), stage -> AP."""
    result = {}
    for key, value in record.items():
        match = re.fullmatch(r"bbox_stage(\d+)/AP", key)
        if match:
            result[int(match.group(1))] = value
    return dict(sorted(result.items()))


def plot_ap_per_stage(record: Dict, path: str) -> str:
    """COCO AP, AP50 and AP75 of every stage (Sparse R-CNN fig. 5, Dynamic Sparse R-CNN fig. 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(stage_ap(record))
    if not stages:
        raise ValueError(
            "the evaluation has no per-stage AP: train or evaluate with "
            "MODEL.SPARSE_RCNN.EVAL_PER_STAGE True"
        )
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for metric, marker in (("AP", "o"), ("AP50", "s"), ("AP75", "^")):
        values = [record.get(f"bbox_stage{t}/{metric}", float("nan")) for t in stages]
        ax.plot(stages, values, marker=marker, label=metric)
    ax.set_xticks(stages)
    ax.set_xlabel("stage")
    ax.set_ylabel("COCO box AP")
    ax.set_title("AP per stage")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
