"""The CrowdHuman evaluation protocol (AP, mMR and Recall at IoU 0.5) used for the Sparse R-CNN
paper's table 11, as the official evaluation code (``crowdhumantools``, taken from cvpods) computes
it, the Jaccard index (JI) of the CrowdHuman toolkit as mmdetection's ``CrowdHumanMetric``
computes it, and :class:`CrowdHumanEvaluator`, a Detectron2 ``DatasetEvaluator`` that applies them.

Do not score CrowdHuman with COCO AP: ``COCOEvaluator`` keeps at most 100 detections per image
while CrowdHuman images hold more people, and it knows neither ignore regions by IoA nor mMR.

The protocol (``crowdhuman_metrics``), step by step as the official code does it:

1. Per image, detections and ground truth are clipped to the image: x0 to [0, W - 1], y0 to
   [0, H - 1], x1 to [0, W], y1 to [0, H].
2. Per image, detections in descending score each take the not yet matched, non-ignored ground
   truth box with the largest IoU, if that IoU is above the threshold (true positive; ties: the
   first in annotation order); else, if the intersection with an ignore region divided by the
   detection's own area is above the threshold, the detection is dropped (neither true nor
   false positive; several detections may fall in one region); else it is a false positive.
   IoU = inter / (area_d + area_g - inter + 1e-6), IoA = inter / (area_d + 1e-6), no +1 on sides.
3. The kept detections of all images are pooled and sorted by descending score (stable: ties
   keep image order, then the image's own order).
4. AP: the trapezoid rule over the successive (recall, precision) points of that list, from its
   first point (so the area below the first point's recall is not counted: a perfect detector on
   G boxes scores (G - 1) / G, not 1). Recall: at the end of the list. mMR: the geometric mean of
   the miss rates at FPPI 10^-2 ... 10^0 (9 points evenly spaced in log), each taken at the
   first point of the list whose FPPI (false positives / images) reaches it, else at the last.

Where the official code crashes we define: no non-ignored ground truth at all gives NaN metrics;
no kept detection at all gives AP 0, Recall 0, mMR 1; an image without any gtbox counts as an
image without people (its detections are false positives).

JI (``jaccard_index``; not in the official Sparse R-CNN code, which reports AP, mMR and Recall),
as mmdetection's ``CrowdHumanMetric.eval_ji`` (from the CrowdDet toolkit) computes it:

1. Boxes are clipped as in step 1. For each score threshold t in 0.0, 0.1, ..., 0.9, per image,
   the detections with a score above t are matched one to one with the non-ignored ground truth:
   a maximum bipartite matching (the most pairs; scipy's ``maximum_bipartite_matching``, as
   mmdetection) over the pairs with IoU >= 0.5 (IoU = inter / max(union, 1e-6); note ">=" here,
   ">" in AP). k = the number of matched pairs.
2. Unmatched detections whose IoA with an ignore region (inter / own area) is above 0.5 are not
   counted: n = detections - those; likewise m = non-ignored ground truth - the unmatched ones
   inside an ignore region.
3. The image's ratio is k / (m + n - k + 1e-6); the score of t is the mean ratio over the images
   with m > 0 or n > 0 (the others do not count). JI is the best score over the thresholds.

mmdetection computes the overlaps in float32, we in float64 (they can differ only for an IoU or
IoA within float32 rounding of 0.5). Which of several maximum matchings is taken can change n
and m when an unmatched box lies in an ignore region; scipy's choice is the same as mmdetection's.
No image with m > 0 or n > 0 at any threshold gives JI NaN.
"""

import itertools
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

__all__ = [
    "MR_FPPI_REFERENCE",
    "JI_SCORE_THRESHOLDS",
    "clip_boxes_to_image",
    "match_image",
    "jaccard_index_counts",
    "jaccard_index",
    "crowdhuman_metrics",
    "CrowdHumanEvaluator",
    "is_crowdhuman_dataset",
]

logger = logging.getLogger(__name__)

# FPPI points of the log-average miss rate (Caltech "reasonable", 10^-2 to 10^0), as the official
# code lists them.
MR_FPPI_REFERENCE = (0.0100, 0.0178, 0.03160, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.000)
# Score thresholds of JI, computed as mmdetection does (0.1 * i).
JI_SCORE_THRESHOLDS = tuple(0.1 * i for i in range(10))
_EPS = 1e-6


def clip_boxes_to_image(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """The official evaluation's clipping of (N, 4) xyxy boxes: x0 to [0, W - 1], y0 to
    [0, H - 1], x1 to [0, W], y1 to [0, H]. Returns a new float64 array."""
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    boxes[:, 0] = np.minimum(np.maximum(boxes[:, 0], 0), width - 1)
    boxes[:, 1] = np.minimum(np.maximum(boxes[:, 1], 0), height - 1)
    boxes[:, 2] = np.maximum(np.minimum(boxes[:, 2], width), 0)
    boxes[:, 3] = np.maximum(np.minimum(boxes[:, 3], height), 0)
    return boxes


def _intersections(dt: np.ndarray, gt: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(D, G) intersection areas, (D, 1) detection areas, (1, G) ground-truth areas."""
    iw = np.minimum(dt[:, None, 2], gt[None, :, 2]) - np.maximum(dt[:, None, 0], gt[None, :, 0])
    ih = np.minimum(dt[:, None, 3], gt[None, :, 3]) - np.maximum(dt[:, None, 1], gt[None, :, 1])
    inter = np.maximum(0, iw) * np.maximum(0, ih)
    dt_area = ((dt[:, 2] - dt[:, 0]) * (dt[:, 3] - dt[:, 1]))[:, None]
    gt_area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[None, :]
    return inter, dt_area, gt_area


def match_image(
    dt_boxes: np.ndarray,
    dt_scores: np.ndarray,
    gt_boxes: np.ndarray,
    gt_ignore: np.ndarray,
    iou_threshold: float = 0.5,
) -> Tuple[np.ndarray, np.ndarray]:
    """Match one image's detections to its ground truth (step 2 of the module docstring).

    Args:
        dt_boxes: (D, 4) xyxy, already clipped; dt_scores: (D,).
        gt_boxes: (G, 4) xyxy, already clipped; gt_ignore: (G,) bool, True for ignore regions.
        iou_threshold: IoU (and IoA for ignore regions) a match must exceed.

    Returns:
        scores (K,) and is_tp (K,) bool of the detections that count (true or false positives),
        in descending score (stable); detections absorbed by an ignore region are left out.
    """
    dt_boxes = np.asarray(dt_boxes, dtype=np.float64).reshape(-1, 4)
    dt_scores = np.asarray(dt_scores, dtype=np.float64).reshape(-1)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_ignore = np.asarray(gt_ignore, dtype=bool).reshape(-1)
    order = np.argsort(-dt_scores, kind="stable")
    dt_boxes, dt_scores = dt_boxes[order], dt_scores[order]

    positives, ignores = gt_boxes[~gt_ignore], gt_boxes[gt_ignore]
    inter, dt_area, gt_area = _intersections(dt_boxes, positives)
    iou = inter / (dt_area + gt_area - inter + _EPS)  # (D, P)
    inter_ign, dt_area_ign, _ = _intersections(dt_boxes, ignores)
    in_ignore = (inter_ign / (dt_area_ign + _EPS) > iou_threshold).any(axis=1)  # (D,)

    # 1 true positive, 0 false positive, -1 absorbed by an ignore region.
    labels = np.where(in_ignore, -1, 0)
    candidates = np.flatnonzero((iou > iou_threshold).any(axis=1))
    matched = np.zeros(len(positives), dtype=bool)
    for i in candidates:  # only detections that overlap some positive enough can match one
        overlaps = np.where(matched, -np.inf, iou[i])
        j = int(np.argmax(overlaps))  # the first of equal maxima, as the official strict ">"
        if overlaps[j] > iou_threshold:
            matched[j] = True
            labels[i] = 1
    keep = labels >= 0
    return dt_scores[keep], labels[keep] == 1


def _overlap(a: np.ndarray, b: np.ndarray, over_union: bool) -> np.ndarray:
    """(A, B) IoU (``over_union``) or IoA (intersection over the area of ``a``'s box), with the
    denominator at least 1e-6, as mmdetection's ``bbox_overlaps``."""
    inter, area_a, area_b = _intersections(a, b)
    denominator = area_a + area_b - inter if over_union else np.broadcast_to(area_a, inter.shape)
    return inter / np.maximum(denominator, _EPS)


class _JIImage:
    """One image's overlaps for JI, computed once for every score threshold: which (detection,
    person) pairs may match and which boxes lie in an ignore region."""

    def __init__(self, dt_boxes, dt_scores, gt_boxes, gt_ignore, iou_threshold: float):
        dt_boxes = np.asarray(dt_boxes, dtype=np.float64).reshape(-1, 4)
        gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
        gt_ignore = np.asarray(gt_ignore, dtype=bool).reshape(-1)
        people, regions = gt_boxes[~gt_ignore], gt_boxes[gt_ignore]
        self.scores = np.asarray(dt_scores, dtype=np.float64).reshape(-1)
        # (D, P) edges: IoU >= the threshold (mmdetection zeroes the IoUs below it).
        self.edges = _overlap(dt_boxes, people, over_union=True) >= iou_threshold
        self.dt_in_region = self._in_regions(dt_boxes, regions, iou_threshold)
        self.gt_in_region = self._in_regions(people, regions, iou_threshold)

    @staticmethod
    def _in_regions(boxes: np.ndarray, regions: np.ndarray, iou_threshold: float) -> np.ndarray:
        if len(boxes) == 0 or len(regions) == 0:
            return np.zeros(len(boxes), dtype=bool)
        return _overlap(boxes, regions, over_union=False).max(axis=1) > iou_threshold

    def counts(self, score_threshold: Optional[float] = None) -> Tuple[int, int, int]:
        """(k, m, n) with the detections above ``score_threshold`` (None: all)."""
        keep = slice(None) if score_threshold is None else self.scores > score_threshold
        edges, dt_in_region = self.edges[keep], self.dt_in_region[keep]
        dt_matched = np.zeros(len(edges), dtype=bool)
        gt_matched = np.zeros(edges.shape[1], dtype=bool)
        if edges.any():
            match = maximum_bipartite_matching(csr_matrix(edges), perm_type="column")  # (D,)
            dt_matched = match >= 0
            gt_matched[match[dt_matched]] = True
        k = int(dt_matched.sum())
        m = len(gt_matched) - int((self.gt_in_region & ~gt_matched).sum())
        n = len(dt_matched) - int((dt_in_region & ~dt_matched).sum())
        return k, m, n


def jaccard_index_counts(
    dt_boxes: np.ndarray, gt_boxes: np.ndarray, gt_ignore: np.ndarray, iou_threshold: float = 0.5
) -> Tuple[int, int, int]:
    """(k, m, n) of one image for JI (steps 1-2 of the module docstring).

    Args:
        dt_boxes: (D, 4) xyxy, already clipped and above the score threshold.
        gt_boxes: (G, 4) xyxy, already clipped; gt_ignore: (G,) bool, True for ignore regions.
        iou_threshold: a pair matches from this IoU on; ignore regions absorb above this IoA.

    Returns:
        k matched pairs, m people and n detections that count (those inside an ignore region
        and left unmatched excluded).
    """
    scores = np.zeros(len(np.asarray(dt_boxes).reshape(-1, 4)))
    return _JIImage(dt_boxes, scores, gt_boxes, gt_ignore, iou_threshold).counts()


def jaccard_index(
    images: Sequence[Dict[str, np.ndarray]],
    iou_threshold: float = 0.5,
    score_thresholds: Sequence[float] = JI_SCORE_THRESHOLDS,
) -> Tuple[float, float]:
    """JI of the CrowdHuman toolkit as mmdetection computes it (the module docstring).

    Args:
        images: as for :func:`crowdhuman_metrics`.
        iou_threshold: 0.5 in the protocol.
        score_thresholds: the detections above each are scored; the best is reported.

    Returns:
        (JI as a fraction in [0, 1], the score threshold that gave it); NaN, NaN if no image has
        people or detections at any threshold.
    """
    prepared = [
        _JIImage(
            clip_boxes_to_image(image["dt_boxes"], image["height"], image["width"]),
            image["dt_scores"],
            clip_boxes_to_image(image["gt_boxes"], image["height"], image["width"]),
            image["gt_ignore"],
            iou_threshold,
        )
        for image in images
    ]
    best, best_threshold = float("nan"), float("nan")
    for threshold in score_thresholds:
        total, counted = 0.0, 0
        for image in prepared:
            k, m, n = image.counts(threshold)
            total += k / (m + n - k + _EPS)
            counted += int(m > 0 or n > 0)
        if counted and (math.isnan(best) or total / counted > best):  # the first best
            best, best_threshold = total / counted, float(threshold)
    return best, best_threshold


def crowdhuman_metrics(
    images: Sequence[Dict[str, np.ndarray]], iou_threshold: float = 0.5
) -> Dict[str, float]:
    """AP, mMR and Recall (fractions in [0, 1]) of the official CrowdHuman evaluation.

    Args:
        images: one dict per image of the dataset (images without detections included: they
            count for FPPI and their people are misses), each with "gt_boxes" (G, 4) xyxy,
            "gt_ignore" (G,) bool, "dt_boxes" (D, 4) xyxy, "dt_scores" (D,), "height", "width".
            Boxes are clipped here.
        iou_threshold: 0.5 in the protocol.

    Returns:
        {"AP", "mMR", "Recall", "JI", "JI_score_thresh" (the threshold of the best JI),
        "num_images", "num_gt" (non-ignored), "num_ignore"}.
    """
    scores, is_tp = [], []
    num_gt = num_ignore = 0
    for image in images:
        height, width = image["height"], image["width"]
        gt_ignore = np.asarray(image["gt_ignore"], dtype=bool).reshape(-1)
        num_ignore += int(gt_ignore.sum())
        num_gt += int((~gt_ignore).sum())
        s, tp = match_image(
            clip_boxes_to_image(image["dt_boxes"], height, width),
            image["dt_scores"],
            clip_boxes_to_image(image["gt_boxes"], height, width),
            gt_ignore,
            iou_threshold,
        )
        scores.append(s)
        is_tp.append(tp)
    num_images = len(images)
    ji, ji_threshold = jaccard_index(images, iou_threshold)
    result = {
        "JI": ji,
        "JI_score_thresh": ji_threshold,
        "num_images": num_images,
        "num_gt": num_gt,
        "num_ignore": num_ignore,
    }
    if num_gt == 0:
        logger.warning("CrowdHuman evaluation: no non-ignored ground truth: metrics are NaN")
        return {"AP": float("nan"), "mMR": float("nan"), "Recall": float("nan"), **result}
    scores = np.concatenate(scores) if scores else np.zeros(0)
    is_tp = np.concatenate(is_tp) if is_tp else np.zeros(0, dtype=bool)
    if len(scores) == 0:
        return {"AP": 0.0, "mMR": 1.0, "Recall": 0.0, **result}
    order = np.argsort(-scores, kind="stable")
    is_tp = is_tp[order]
    tp = np.cumsum(is_tp, dtype=np.float64)
    fp = np.cumsum(~is_tp, dtype=np.float64)
    recall = tp / num_gt
    precision = tp / (tp + fp)
    ap = float(np.sum((recall[1:] - recall[:-1]) * (precision[1:] + precision[:-1]) / 2))

    fppi = fp / num_images
    miss_rate = 1.0 - recall
    reached = fppi[None, :] >= np.asarray(MR_FPPI_REFERENCE)[:, None]  # (9, K)
    index = np.where(reached.any(axis=1), reached.argmax(axis=1), len(fppi) - 1)
    with np.errstate(divide="ignore"):
        mmr = float(np.exp(np.log(miss_rate[index]).mean()))
    return {"AP": ap, "mMR": mmr, "Recall": float(recall[-1]), **result}


def is_crowdhuman_dataset(dataset_name: str) -> bool:
    """Whether the dataset's metadata asks for this protocol (``evaluator_type == "crowdhuman"``,
    as ``crowdhuman_train``/``_val`` and every ``register_crowdhuman`` dataset have)."""
    return MetadataCatalog.get(dataset_name).get("evaluator_type") == "crowdhuman"


def _ground_truth(dataset_dict: dict) -> Tuple[np.ndarray, np.ndarray]:
    """(G, 4) xyxy boxes and (G,) ignore flags (``iscrowd``) of a Detectron2 dataset dict."""
    annos = dataset_dict.get("annotations", [])
    boxes = [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]
    ignore = [bool(a.get("iscrowd", 0)) for a in annos]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(ignore, dtype=bool)


class CrowdHumanEvaluator(DatasetEvaluator):
    """AP, mMR and Recall at IoU 0.5 of the official CrowdHuman evaluation and the toolkit's JI,
    in percent, as ``{"crowdhuman": {"AP", "mMR", "Recall", "JI"}}``; every detection of every
    image is kept (no cap at 100 per image).

    The ground truth comes from the dataset dicts (``DatasetCatalog.get(dataset_name)``):
    annotations with ``iscrowd`` are ignore regions. Every image of the dataset counts, as in the
    official code (an image without predictions has no detections). Across processes the
    predictions are gathered on the main process (``comm.gather``), which computes the metrics;
    the others return {}. With ``output_dir`` the detections are also written in the odgt result
    format (``crowdhuman_results.odgt``: one line per image, ``{"ID", "height", "width",
    "dtboxes": [{"box": [x, y, w, h], "score", "tag": 1}]}``), which the official script reads.
    """

    def __init__(
        self,
        dataset_name: str,
        *,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        iou_threshold: float = 0.5,
    ):
        """
        Args:
            dataset_name: a registered dataset whose dicts have "image_id", "height", "width"
                and "annotations".
            output_dir: where to write ``crowdhuman_results.odgt``; None writes nothing.
            distributed: gather predictions from all processes before evaluating.
            iou_threshold: 0.5 in the protocol.
        """
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._iou_threshold = iou_threshold
        self._predictions: List[dict] = []

    def reset(self):
        self._predictions = []

    def process(self, inputs: List[Dict], outputs: List[Dict]):
        """
        Args:
            inputs: the model's inputs, with "image_id", "height", "width".
            outputs: the model's outputs, with "instances" (pred_boxes xyxy in the original
                image's pixels, scores).
        """
        for inp, out in zip(inputs, outputs):
            instances = out["instances"].to("cpu")
            self._predictions.append(
                {
                    "image_id": inp["image_id"],
                    "height": int(inp["height"]),
                    "width": int(inp["width"]),
                    "boxes": instances.pred_boxes.tensor.numpy().astype(np.float32),
                    "scores": instances.scores.numpy().astype(np.float32),
                }
            )

    def evaluate(self):
        predictions = self._predictions
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        by_id = {}
        for p in predictions:
            if p["image_id"] in by_id:
                raise ValueError(f"CrowdHumanEvaluator: image {p['image_id']!r} predicted twice")
            by_id[p["image_id"]] = p
        dataset_dicts = DatasetCatalog.get(self._dataset_name)
        known = {d["image_id"] for d in dataset_dicts}
        unknown = [i for i in by_id if i not in known]
        if unknown:
            raise ValueError(
                f"CrowdHumanEvaluator: {len(unknown)} predicted image(s) are not in "
                f"{self._dataset_name!r}, e.g. {unknown[0]!r}"
            )
        missing = len(known) - len(by_id)
        if missing:
            logger.warning(
                f"{missing} of {len(known)} images of {self._dataset_name} have no predictions; "
                "they count as images without detections (as in the official evaluation)"
            )
        images = []
        empty = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32)}
        for d in dataset_dicts:
            gt_boxes, gt_ignore = _ground_truth(d)
            p = by_id.get(d["image_id"], empty)
            images.append(
                {
                    "gt_boxes": gt_boxes,
                    "gt_ignore": gt_ignore,
                    "dt_boxes": p["boxes"],
                    "dt_scores": p["scores"],
                    "height": d["height"],
                    "width": d["width"],
                }
            )
        if self._output_dir:
            self._write_odgt(
                [by_id[d["image_id"]] for d in dataset_dicts if d["image_id"] in by_id]
            )
        metrics = crowdhuman_metrics(images, self._iou_threshold)
        results = {k: 100.0 * metrics[k] for k in ("AP", "mMR", "Recall", "JI")}
        logger.info(
            f"CrowdHuman evaluation of {self._dataset_name} ({metrics['num_images']} images, "
            f"{metrics['num_gt']} people, {metrics['num_ignore']} ignore regions, IoU "
            f"{self._iou_threshold}): AP {results['AP']:.2f}, mMR {results['mMR']:.2f}, "
            f"Recall {results['Recall']:.2f}, JI {results['JI']:.2f} (at scores above "
            f"{metrics['JI_score_thresh']:.1f}) (in %; mMR: lower is better)"
        )
        return OrderedDict(crowdhuman=results)

    def _write_odgt(self, predictions: List[dict]) -> None:
        PathManager.mkdirs(self._output_dir)
        path = os.path.join(self._output_dir, "crowdhuman_results.odgt")
        with PathManager.open(path, "w") as f:
            for p in predictions:
                xywh = BoxMode.convert(
                    p["boxes"].astype(np.float64), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS
                )
                record = {
                    "ID": p["image_id"],
                    "height": p["height"],
                    "width": p["width"],
                    "dtboxes": [
                        {"box": box, "score": score, "tag": 1}
                        for box, score in zip(
                            xywh.tolist(), p["scores"].astype(np.float64).tolist()
                        )
                    ],
                }
                f.write(json.dumps(record) + "\n")
        logger.info(f"Wrote the detections in odgt result format to {path}")
