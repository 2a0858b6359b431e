"""CrowdHuman: the official evaluation protocol (hand-worked cases and a brute-force reference
written from the protocol's description), the odgt loader, the evaluator across processes, and
end to end: train_net.py trains the 500-proposal CrowdHuman config (scaled down for CPU) on a
generated crowded set and --eval-only reports AP, mMR and Recall."""

import json
import math
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, detection_utils
from detectron2.engine import default_argument_parser
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm

from conftest import CONFIG_DIR, REPO_ROOT, TINY_CONFIG, make_cfg
from sparse_rcnn import SparseRCNNDatasetMapper
from sparse_rcnn.crowdhuman import load_crowdhuman_odgt, register_crowdhuman
from sparse_rcnn.crowdhuman_evaluation import (
    MR_FPPI_REFERENCE,
    CrowdHumanEvaluator,
    clip_boxes_to_image,
    crowdhuman_metrics,
    jaccard_index,
    jaccard_index_counts,
    match_image,
)
from sparse_rcnn.evaluation import PerStageEvaluator, build_sparse_rcnn_evaluator

CROWDHUMAN_CONFIG = CONFIG_DIR / "sparse_rcnn_R_50_FPN_500pro_crowdhuman.yaml"


# ---------------------------------------------------------------------------------------------
# A brute-force reference, written from the protocol (crowdhuman_evaluation's docstring) with
# plain Python loops over every detection and every ground-truth box.


def reference_metrics(images, thr=0.5):
    def clip(b, h, w):
        return [min(max(b[0], 0), w - 1), min(max(b[1], 0), h - 1), max(min(b[2], w), 0),
                max(min(b[3], h), 0)]  # fmt: skip

    def inter(a, b):
        iw = min(a[2], b[2]) - max(a[0], b[0])
        ih = min(a[3], b[3]) - max(a[1], b[1])
        return max(0.0, iw) * max(0.0, ih)

    def area(a):
        return (a[2] - a[0]) * (a[3] - a[1])

    pooled, num_gt = [], 0
    for image in images:
        h, w = image["height"], image["width"]
        gts = [(clip(list(map(float, b)), h, w), bool(ig))
               for b, ig in zip(image["gt_boxes"], image["gt_ignore"])]  # fmt: skip
        gts = [g for g in gts if not g[1]] + [g for g in gts if g[1]]  # people first
        num_gt += sum(not ig for _, ig in gts)
        dts = [(clip(list(map(float, b)), h, w), float(s))
               for b, s in zip(image["dt_boxes"], image["dt_scores"])]  # fmt: skip
        dts = sorted(dts, key=lambda d: d[1], reverse=True)
        matched = [False] * len(gts)
        for box, score in dts:
            best, best_j = thr, -1
            for j, (g, ig) in enumerate(gts):
                if ig or matched[j]:
                    continue
                iou = inter(box, g) / (area(box) + area(g) - inter(box, g) + 1e-6)
                if iou > best:
                    best, best_j = iou, j
            if best_j >= 0:
                matched[best_j] = True
                pooled.append((score, 1))
                continue
            if any(ig and inter(box, g) / (area(box) + 1e-6) > thr for g, ig in gts):
                continue  # absorbed by an ignore region
            pooled.append((score, 0))
    pooled.sort(key=lambda p: p[0], reverse=True)
    tp = fp = 0
    points = []  # (recall, precision, fppi)
    for _, label in pooled:
        tp, fp = tp + label, fp + (1 - label)
        points.append((tp / num_gt, tp / (tp + fp), fp / len(images)))
    ap = sum((points[i][0] - points[i - 1][0]) * (points[i][1] + points[i - 1][1]) / 2
             for i in range(1, len(points)))  # fmt: skip
    logs = []
    for ref in MR_FPPI_REFERENCE:
        k = next((i for i, p in enumerate(points) if p[2] >= ref), len(points) - 1)
        miss = 1 - points[k][0]
        logs.append(math.log(miss) if miss > 0 else -math.inf)
    return {"AP": ap, "mMR": math.exp(sum(logs) / len(logs)), "Recall": points[-1][0]}


def image(gt=(), ignore=None, dt=(), scores=(), height=100, width=100):
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    ignore = np.zeros(len(gt), bool) if ignore is None else np.asarray(ignore, bool)
    return {"gt_boxes": gt, "gt_ignore": ignore, "dt_boxes": np.asarray(dt, float).reshape(-1, 4),
            "dt_scores": np.asarray(scores, float), "height": height, "width": width}  # fmt: skip


def people(n, y=10):
    """n disjoint 8x20 boxes in a row."""
    return [[10 * i, y, 10 * i + 8, y + 20] for i in range(n)]


def check(images, ap, mmr, recall):
    got = crowdhuman_metrics(images)
    assert got["AP"] == pytest.approx(ap, abs=1e-12)
    assert got["mMR"] == pytest.approx(mmr, abs=1e-12)
    assert got["Recall"] == pytest.approx(recall, abs=1e-12)
    ref = reference_metrics(images)
    assert [got[k] for k in ("AP", "mMR", "Recall")] == pytest.approx(
        [ref[k] for k in ("AP", "mMR", "Recall")], abs=1e-12
    )


# ---------------------------------------------------------------------------------------------
# Hand-worked metric cases.


def test_perfect_detector():
    # Trapezoids from the first point: the area below recall 1/G is not counted, so AP is
    # (G - 1) / G (the official code's value; 99.999% on CrowdHuman val's ~99k people).
    gt_a, gt_b = people(3), people(5, y=50)
    images = [image(gt_a, dt=gt_a, scores=[0.9, 0.8, 0.7]), image(gt_b, dt=gt_b, scores=[0.6] * 5)]
    check(images, ap=7 / 8, mmr=0.0, recall=1.0)


def test_perfect_detector_ap_approaches_one():
    gt = people(1000)
    got = crowdhuman_metrics([image(gt, dt=gt, scores=np.linspace(1, 0.1, 1000), width=10000)])
    assert got["AP"] == pytest.approx(0.999) and got["mMR"] == 0.0 and got["Recall"] == 1.0


def test_one_miss():
    gt = people(4)
    # points (1/4, 1), (2/4, 1), (3/4, 1); FPPI stays 0 so every FPPI point takes the last miss rate
    check([image(gt, dt=gt[:3], scores=[0.9, 0.8, 0.7])], ap=0.5, mmr=0.25, recall=0.75)


def test_false_positive_at_high_score():
    gt = people(4)
    fp = [[50, 60, 58, 80]]
    images = [image(gt, dt=fp + gt, scores=[0.95, 0.9, 0.8, 0.7, 0.6])]
    # points (0, 0), (1/4, 1/2), (2/4, 2/3), (3/4, 3/4), (1, 4/5); FPPI 1 from the first point on,
    # so every FPPI point takes miss rate 1
    ap = (1 / 4) * ((0 + 1 / 2) + (1 / 2 + 2 / 3) + (2 / 3 + 3 / 4) + (3 / 4 + 4 / 5)) / 2
    check(images, ap=ap, mmr=1.0, recall=1.0)


def test_miss_rate_at_fppi_points():
    a, b = people(2), people(2, y=50)
    fp1, fp2 = [70, 0, 78, 8], [80, 80, 88, 90]
    images = [
        image(a, dt=[a[0], fp1, a[1]], scores=[0.9, 0.8, 0.7]),
        image(b, dt=[b[0], fp2], scores=[0.6, 0.5]),
    ]
    # TP .9, FP .8, TP .7, TP .6, FP .5 over 4 people and 2 images:
    # recall 1/4 1/4 2/4 3/4 3/4, precision 1 1/2 2/3 3/4 3/5, FPPI 0 .5 .5 .5 1
    ap = (1 / 4) * (1 / 2 + 2 / 3) / 2 + (1 / 4) * (2 / 3 + 3 / 4) / 2
    # FPPI points 0.01 ... 0.3162 (7) first reached at FPPI .5 (miss .75), 0.5623 and 1 at FPPI 1
    mmr = math.exp((7 * math.log(0.75) + 2 * math.log(0.25)) / 9)
    check(images, ap=ap, mmr=mmr, recall=0.75)
    assert ap == pytest.approx(31 / 96)


def test_false_positive_in_ignore_region_not_counted():
    gt = people(4)
    region = [60, 50, 100, 100]  # a "mask" region
    inside = [[62, 52, 70, 70], [75, 60, 95, 95]]  # IoA 1, tiny IoU: both absorbed by the region
    half_out = [[50, 50, 70, 60]]  # half of it inside the region: IoA 0.5, not above: a FP
    base = image(gt + [region], ignore=[0, 0, 0, 0, 1], dt=gt, scores=[0.9, 0.8, 0.7, 0.6])
    with_inside = image(gt + [region], ignore=[0, 0, 0, 0, 1], dt=inside + gt,
                        scores=[0.99, 0.98, 0.9, 0.8, 0.7, 0.6])  # fmt: skip
    assert crowdhuman_metrics([with_inside]) == crowdhuman_metrics([base])
    check([with_inside], ap=3 / 4, mmr=0.0, recall=1.0)
    assert crowdhuman_metrics([with_inside])["num_ignore"] == 1
    # the same detections with the region not ignored are false positives
    as_fp = image(gt, dt=half_out + gt, scores=[0.99, 0.9, 0.8, 0.7, 0.6])
    with_half = image(gt + [region], ignore=[0, 0, 0, 0, 1], dt=half_out + gt,
                      scores=[0.99, 0.9, 0.8, 0.7, 0.6])  # fmt: skip
    assert crowdhuman_metrics([with_half])["AP"] == crowdhuman_metrics([as_fp])["AP"] < 3 / 4


def test_ignore_region_only_when_no_person_matches():
    person, region = [10, 10, 30, 50], [0, 0, 60, 60]
    # the detection matches the person (IoU 1): a true positive although it also lies in the region
    scores, tp = match_image([person], [0.9], [region, person], [True, False])
    assert tp.tolist() == [True]
    # a second detection on the same person: no person left, inside the region: absorbed
    scores, tp = match_image([person, person], [0.9, 0.8], [region, person], [True, False])
    assert tp.tolist() == [True] and scores.tolist() == [0.9]


def test_duplicate_detections():
    a, b = people(1), people(1, y=50)
    dup = [[0.5, 10, 8.5, 30]]  # IoU 0.88 with the same person
    scores, tp = match_image(a + dup, [0.9, 0.7], a, [False])
    assert tp.tolist() == [True, False]
    # points (1/2, 1) [.9 TP], (1, 1) [.8 TP], (1, 2/3) [.7 duplicate: FP]; FPPI .5 at the end
    images = [image(a, dt=a + dup, scores=[0.9, 0.7]), image(b, dt=b, scores=[0.8])]
    check(images, ap=0.5, mmr=0.0, recall=1.0)


def test_greedy_matching_by_score_takes_largest_iou():
    g1, g2 = [0, 0, 10, 20], [4, 0, 14, 20]
    d_high = [3, 0, 13, 20]  # IoU 7/13 with g1, 9/11 with g2
    d_low = [6, 0, 16, 20]  # IoU 4/16 with g1, 8/12 with g2
    scores, tp = match_image([d_low, d_high], [0.5, 0.9], [g1, g2], [False, False])
    # d_high takes g2 (its largest IoU), not g1 (the first above 0.5); d_low is then left
    # with g1 (IoU 0.25): a false positive
    assert scores.tolist() == [0.9, 0.5] and tp.tolist() == [True, False]


def test_image_without_people():
    a = people(3)
    empty_fp = [[20, 20, 40, 60]]
    images = [
        image(a, dt=a[:2], scores=[0.9, 0.8]),
        image([], dt=empty_fp, scores=[0.85]),  # no gtboxes: its detection is a false positive
        image([]),  # no people, no detections: still counts for FPPI
        image([]),
    ]
    # TP .9, FP .85, TP .8: recall 1/3 1/3 2/3, precision 1 1/2 2/3, FPPI 0 1/4 1/4
    ap = (1 / 3) * (1 / 2 + 2 / 3) / 2
    # FPPI points up to 0.1778 (6) reached at 1/4 (miss 2/3); 0.3162, 0.5623, 1 never: last (1/3)
    mmr = math.exp((6 * math.log(2 / 3) + 3 * math.log(1 / 3)) / 9)
    check(images, ap=ap, mmr=mmr, recall=2 / 3)
    assert crowdhuman_metrics(images)["num_images"] == 4


def test_clipping_to_the_image():
    boxes = clip_boxes_to_image([[-5, -5, 120, 130], [120, 10, 130, 20]], height=100, width=100)
    assert boxes.tolist() == [[0, 0, 100, 100], [99, 10, 100, 20]]
    # a full-body box reaching out of the image matches the detection of its visible part
    gt, dt = [[-60, 10, 40, 90]], [[0, 10, 40, 90]]  # IoU 0.4 unclipped, 1 clipped
    check([image(gt, dt=dt, scores=[0.9])], ap=0.0, mmr=0.0, recall=1.0)


def test_degenerate_inputs():
    assert math.isnan(crowdhuman_metrics([image([], dt=people(2), scores=[0.9, 0.8])])["AP"])
    none = crowdhuman_metrics([image(people(2))])
    assert (none["AP"], none["mMR"], none["Recall"]) == (0.0, 1.0, 0.0)


def test_against_brute_force_reference_on_crowded_images():
    rng = np.random.default_rng(0)
    images = []
    for _ in range(6):
        h, w = int(rng.integers(60, 120)), int(rng.integers(60, 120))
        n_gt, n_dt = int(rng.integers(0, 40)), int(rng.integers(0, 120))
        # integer coordinates and coarse scores make ties in IoU and score frequent
        xy = rng.integers(-10, 100, (n_gt, 2))
        gt = np.concatenate([xy, xy + rng.integers(4, 40, (n_gt, 2))], 1)
        ignore = rng.random(n_gt) < 0.15
        picks = rng.integers(0, max(n_gt, 1), n_dt)
        jitter = rng.integers(-4, 5, (n_dt, 4))
        random_xy = rng.integers(-10, 100, (n_dt, 2))
        random_dt = np.concatenate([random_xy, random_xy + rng.integers(2, 40, (n_dt, 2))], 1)
        near_gt = gt[picks] + jitter if n_gt else random_dt
        dt = np.where(rng.random((n_dt, 1)) < 0.7, near_gt, random_dt).astype(float)
        dt[:, 2:] = np.maximum(dt[:, 2:], dt[:, :2] + 1)
        scores = np.round(rng.random(n_dt), 1)
        images.append(image(gt, ignore, dt, scores, height=h, width=w))
    got = crowdhuman_metrics(images)
    ref = reference_metrics(images)
    assert got["num_gt"] > 50 and got["num_ignore"] > 0
    for key in ("AP", "mMR", "Recall"):
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    assert 0 < got["AP"] < 1 and 0 < got["mMR"] < 1


# ---------------------------------------------------------------------------------------------
# JI: hand-worked cases and a brute-force reference written from crowdhuman_evaluation's
# docstring (every one-to-one matching enumerated; plain loops over boxes).

EPS = 1e-6


def reference_ji(images, thr=0.5):
    """(lowest, highest) JI over the choices of a maximum matching in every image (equal unless an
    unmatched box lies in an ignore region), and the largest k of every image at threshold 0."""

    def clip(b, h, w):
        return [min(max(b[0], 0), w - 1), min(max(b[1], 0), h - 1), max(min(b[2], w), 0),
                max(min(b[3], h), 0)]  # fmt: skip

    def inter(a, b):
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
            0.0, min(a[3], b[3]) - max(a[1], b[1])
        )

    def area(a):
        return (a[2] - a[0]) * (a[3] - a[1])

    def matchings(edges, num_dt, taken=(), start=0):
        """Every set of disjoint (dt, gt) pairs of ``edges``, dt in increasing order."""
        yield ()
        for i in range(start, num_dt):
            for j in edges[i]:
                if j not in taken:
                    for rest in matchings(edges, num_dt, taken + (j,), i + 1):
                        yield ((i, j),) + rest

    lows, highs, ks = [], [], []
    for t in [0.1 * i for i in range(10)]:
        low = high = 0.0
        counted = 0
        for image in images:
            h, w = image["height"], image["width"]
            gts = [clip(list(map(float, b)), h, w) for b in image["gt_boxes"]]
            people = [g for g, ig in zip(gts, image["gt_ignore"]) if not ig]
            regions = [g for g, ig in zip(gts, image["gt_ignore"]) if ig]
            dts = [clip(list(map(float, b)), h, w)
                   for b, s in zip(image["dt_boxes"], image["dt_scores"]) if s > t]  # fmt: skip
            edges = [[j for j, g in enumerate(people)
                      if inter(d, g) / max(area(d) + area(g) - inter(d, g), EPS) >= thr]
                     for d in dts]  # fmt: skip
            every = list(matchings(edges, len(dts)))
            k = max(len(m) for m in every)
            if t == 0:
                ks.append(k)

            def in_region(box):
                return any(inter(box, r) / max(area(box), EPS) > thr for r in regions)

            ratios = []
            for m in every:
                if len(m) < k:
                    continue
                matched_dt, matched_gt = {i for i, _ in m}, {j for _, j in m}
                n = len(dts) - sum(in_region(d) for i, d in enumerate(dts) if i not in matched_dt)
                g = len(people) - sum(
                    in_region(p) for j, p in enumerate(people) if j not in matched_gt
                )
                ratios.append(k / (g + n - k + EPS))
                counted_here = g > 0 or n > 0
            low, high = low + min(ratios), high + max(ratios)
            counted += counted_here
        lows.append(low / counted if counted else math.nan)
        highs.append(high / counted if counted else math.nan)
    return np.nanmax(lows), np.nanmax(highs), ks


def check_ji(images, expected, threshold):
    ji, at = jaccard_index(images)
    assert ji == pytest.approx(expected, abs=1e-12) and at == pytest.approx(threshold)
    low, high, _ = reference_ji(images)
    assert low == high == pytest.approx(ji, abs=1e-12)
    assert crowdhuman_metrics(images)["JI"] == ji


def test_ji_perfect_detector():
    # k = m = n in every image: k / (k + 1e-6); image b's scores (0.6) fall out above 0.6.
    gt_a, gt_b = people(3), people(5, y=50)
    images = [image(gt_a, dt=gt_a, scores=[0.9, 0.8, 0.7]), image(gt_b, dt=gt_b, scores=[0.6] * 5)]
    check_ji(images, (3 / (3 + EPS) + 5 / (5 + EPS)) / 2, threshold=0.0)


def test_ji_one_miss():
    gt = people(4)
    # k 3, m 4, n 3: 3 / (4 + 3 - 3)
    check_ji([image(gt, dt=gt[:3], scores=[0.9, 0.8, 0.7])], 3 / (4 + EPS), threshold=0.0)


def test_ji_false_positive_and_the_best_score_threshold():
    gt, fp = people(4), [[50, 60, 58, 80]]
    # A confident false positive: k 4, m 4, n 5 at every threshold below the people's scores.
    confident = image(gt, dt=fp + gt, scores=[0.95, 0.9, 0.9, 0.9, 0.9])
    check_ji([confident], 4 / (4 + 5 - 4 + EPS), threshold=0.0)
    # A weak one: counted at threshold 0 (4 / 5), not above 0.1 (4 / 4): the best is 0.1's.
    weak = image(gt, dt=fp + gt, scores=[0.05, 0.9, 0.9, 0.9, 0.9])
    check_ji([weak], 4 / (4 + EPS), threshold=0.1)
    # The AP protocol has no threshold: the weak false positive comes last and costs nothing.
    assert (
        crowdhuman_metrics([weak])["AP"]
        == crowdhuman_metrics([image(gt, dt=gt, scores=[0.9] * 4)])["AP"]
    )


def test_ji_ignore_regions():
    gt, region = people(4), [60, 50, 100, 100]
    inside = [[62, 52, 70, 70], [75, 60, 95, 95]]  # IoA 1 with the region: not counted
    half_out = [[50, 50, 70, 60]]  # IoA 0.5, not above: a detection that counts
    hidden = [[64, 56, 72, 76]]  # a person inside the region (IoA 1)
    ignore = [0, 0, 0, 0, 1]
    with_inside = image(gt + [region], ignore, dt=inside + gt, scores=[0.9] * 6)
    check_ji([with_inside], 4 / (4 + EPS), threshold=0.0)  # k 4, m 4, n 6 - 2
    with_half = image(gt + [region], ignore, dt=half_out + gt, scores=[0.9] * 5)
    check_ji([with_half], 4 / (4 + 5 - 4 + EPS), threshold=0.0)
    # The person in the region: missed, it does not count (m 5 - 1); found, it matches.
    missed = image(gt + [region] + hidden, ignore + [0], dt=gt, scores=[0.9] * 4)
    check_ji([missed], 4 / (4 + EPS), threshold=0.0)
    found = image(gt + [region] + hidden, ignore + [0], dt=gt + hidden, scores=[0.9] * 5)
    check_ji([found], 5 / (5 + EPS), threshold=0.0)
    assert jaccard_index_counts(inside + gt, gt + [region] + hidden, ignore + [0]) == (4, 4, 4)


def test_ji_takes_the_most_pairs_and_iou_from_one_half():
    # The greedy AP matching (test_greedy_matching_by_score_takes_largest_iou) pairs d_high with
    # g2 and leaves d_low; the maximum matching pairs d_high-g1 (IoU 7/13) and d_low-g2 (8/12).
    g1, g2, d_high, d_low = [0, 0, 10, 20], [4, 0, 14, 20], [3, 0, 13, 20], [6, 0, 16, 20]
    greedy = crowdhuman_metrics([image([g1, g2], dt=[d_high, d_low], scores=[0.9, 0.5])])
    assert greedy["Recall"] == 0.5
    check_ji([image([g1, g2], dt=[d_high, d_low], scores=[0.9, 0.5])], 2 / (2 + EPS), 0.0)
    # IoU exactly 0.5 (100 / 200) matches for JI (">=") but not for AP (">").
    half = image([[0, 0, 10, 10]], dt=[[0, 0, 10, 20]], scores=[0.9])
    check_ji([half], 1 / (1 + EPS), threshold=0.0)
    assert crowdhuman_metrics([half])["Recall"] == 0.0


def test_ji_counts_only_images_with_people_or_detections():
    a = people(2)
    # Images without people and detections do not count; an image of false positives counts 0.
    check_ji([image(a, dt=a, scores=[0.9, 0.9]), image([]), image([])], 2 / (2 + EPS), 0.0)
    only_fp = image([], dt=[[20, 20, 40, 60]], scores=[0.95])
    check_ji([image(a, dt=a, scores=[0.9, 0.9]), image([]), only_fp], 1 / (2 + EPS), 0.0)
    assert math.isnan(jaccard_index([image([]), image([])])[0])


def test_ji_choice_among_maximum_matchings():
    # d1 and d2 both match the person; d2 lies in the ignore region (IoA 480/800), d1 not (IoA
    # 400/800, not above 0.5). Matched with d1, d2 is absorbed: n 1, ratio 1; matched with d2, d1
    # counts: n 2, ratio 1/2. Both are maximum matchings; JI takes scipy's (as mmdetection).
    person, region = [10, 10, 30, 50], [10, 30, 30, 60]
    d1, d2 = [10, 10, 30, 50], [10, 14, 30, 54]
    images = [image([person, region], [0, 1], dt=[d1, d2], scores=[0.9, 0.9])]
    low, high, _ = reference_ji(images)
    assert (low, high) == (pytest.approx(1 / (2 + EPS)), pytest.approx(1 / (1 + EPS)))
    assert jaccard_index(images)[0] in (low, high)


def test_ji_against_brute_force_reference():
    rng = np.random.default_rng(1)
    images = []
    for _ in range(40):
        h, w = int(rng.integers(40, 80)), int(rng.integers(40, 80))
        n_gt, n_dt = int(rng.integers(0, 6)), int(rng.integers(0, 8))
        xy = rng.integers(-5, 60, (n_gt, 2))
        gt = np.concatenate([xy, xy + rng.integers(6, 30, (n_gt, 2))], 1)
        ignore = rng.random(n_gt) < 0.2
        picks = rng.integers(0, max(n_gt, 1), n_dt)
        random_xy = rng.integers(-5, 60, (n_dt, 2))
        random_dt = np.concatenate([random_xy, random_xy + rng.integers(3, 30, (n_dt, 2))], 1)
        near_gt = gt[picks] + rng.integers(-3, 4, (n_dt, 4)) if n_gt else random_dt
        dt = np.where(rng.random((n_dt, 1)) < 0.85, near_gt, random_dt).astype(float)
        dt[:, 2:] = np.maximum(dt[:, 2:], dt[:, :2] + 1)
        images.append(image(gt, ignore, dt, np.round(rng.random(n_dt), 1), height=h, width=w))
    ji, _ = jaccard_index(images)
    low, high, ks = reference_ji(images)
    assert low <= ji + 1e-12 and ji <= high + 1e-12
    # The case is not trivial: the greedy matching of AP pairs fewer boxes in some image, and in
    # some image the choice among maximum matchings changes n (a box left in an ignore region).
    greedy = []
    for im in images:
        dt = clip_boxes_to_image(im["dt_boxes"], im["height"], im["width"])
        gt = clip_boxes_to_image(im["gt_boxes"], im["height"], im["width"])
        greedy.append(int(match_image(dt, im["dt_scores"], gt, im["gt_ignore"])[1].sum()))
    assert any(g < k for g, k in zip(greedy, ks)) and low < high
    assert 0 < ji < 1
    # The most pairs, image by image (all detections: threshold 0).
    for im, k in zip(images, ks):
        dt = clip_boxes_to_image(im["dt_boxes"], im["height"], im["width"])
        gt = clip_boxes_to_image(im["gt_boxes"], im["height"], im["width"])
        assert jaccard_index_counts(dt[im["dt_scores"] > 0], gt, im["gt_ignore"])[0] == k


# ---------------------------------------------------------------------------------------------
# The odgt loader.


def write_jpg(path, height, width, seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def write_odgt(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def person(fbox, ignore=None, tag="person", **extra_keys):
    box = {"tag": tag, "fbox": fbox, "vbox": fbox, "hbox": [fbox[0], fbox[1], 4, 4], **extra_keys}
    if ignore is not None:
        box["extra"] = {"box_id": 0, "ignore": ignore}
    return box


@pytest.fixture
def small_odgt(tmp_path):
    root = tmp_path / "crowdhuman"
    write_jpg(root / "Images" / "273271,c9db000d5146c15.jpg", 48, 64)
    write_jpg(root / "Images" / "b.jpg", 40, 30, seed=1)
    records = [
        {
            "ID": "273271,c9db000d5146c15",
            "gtboxes": [
                person([4, 5, 10, 20], ignore=0),
                person([-10, 30, 25, 40], ignore=0),  # reaches out of the image (left, bottom)
                person([30, 2, 8, 8], ignore=1),  # an ignored person
                person([40, 10, 20, 30], tag="mask", ignore=1),  # a crowd / reflection region
                person([50, 0, 20, 10]),  # no "extra": a person
            ],
        },
        {"ID": "b", "gtboxes": []},
    ]
    write_odgt(root / "annotation_val.odgt", records)
    return root


def test_odgt_loader(small_odgt):
    dicts = load_crowdhuman_odgt(small_odgt / "annotation_val.odgt", small_odgt / "Images")
    assert [d["image_id"] for d in dicts] == ["273271,c9db000d5146c15", "b"]
    first, second = dicts
    assert first["file_name"] == str(small_odgt / "Images" / "273271,c9db000d5146c15.jpg")
    assert (first["height"], first["width"]) == (48, 64)
    assert (second["height"], second["width"]) == (40, 30)
    annos = first["annotations"]
    assert [a["bbox"] for a in annos] == [[4, 5, 10, 20], [-10, 30, 25, 40], [30, 2, 8, 8],
                                          [40, 10, 20, 30], [50, 0, 20, 10]]  # fmt: skip
    assert [a["iscrowd"] for a in annos] == [0, 0, 1, 1, 0]
    assert {a["category_id"] for a in annos} == {0} and annos[0]["hbox"] == [4, 5, 4, 4]
    assert second["annotations"] == []


def test_training_targets_exclude_ignore_regions_and_are_clipped(small_odgt):
    dicts = load_crowdhuman_odgt(small_odgt / "annotation_val.odgt", small_odgt / "Images")
    cfg = make_cfg(TINY_CONFIG, ["INPUT.RANDOM_FLIP", "none", "INPUT.MIN_SIZE_TRAIN", "(48,)",
                                 "INPUT.MAX_SIZE_TRAIN", "64"])  # fmt: skip
    out = SparseRCNNDatasetMapper(cfg, is_train=True)(dicts[0])
    boxes = out["instances"].gt_boxes.tensor
    assert out["image"].shape[1:] == (48, 64)  # no resize: boxes in the original pixels
    # 3 people (the ignored person and the mask region are not targets), clipped to the image
    assert boxes.tolist() == [[4, 5, 14, 25], [0, 30, 15, 48], [50, 0, 64, 10]]


def test_image_size_follows_exif_orientation(tmp_path):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the decoded image is 64 high, 48 wide
    (tmp_path / "Images").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "Images" / "r.jpg", exif=exif)
    write_odgt(tmp_path / "a.odgt", [{"ID": "r", "gtboxes": [person([1, 1, 5, 5])]}])
    (d,) = load_crowdhuman_odgt(tmp_path / "a.odgt", tmp_path / "Images")
    assert (d["height"], d["width"]) == (64, 48)
    detection_utils.check_image_size(d, detection_utils.read_image(d["file_name"]))


def test_malformed_lines_name_file_and_line(small_odgt):
    path = small_odgt / "bad.odgt"
    path.write_text('{"ID": "b", "gtboxes": []}\n\n{"ID": "b", "gtboxes": [}\n')
    with pytest.raises(ValueError, match=r"bad\.odgt:3: not valid JSON"):
        load_crowdhuman_odgt(path, small_odgt / "Images")
    write_odgt(path, [{"ID": "b", "gtboxes": []}, {"ID": "b", "gtboxes": [person([1, 2, 3])]}])
    with pytest.raises(ValueError, match=r"bad\.odgt:2, gtboxes\[0\]: 'fbox' must be \[x, y, w"):
        load_crowdhuman_odgt(path, small_odgt / "Images")
    write_odgt(path, [{"gtboxes": []}])
    with pytest.raises(ValueError, match=r"bad\.odgt:1: missing or empty 'ID'"):
        load_crowdhuman_odgt(path, small_odgt / "Images")
    write_odgt(path, [{"ID": "b", "gtboxes": []}, {"ID": "c"}, {"ID": "b", "gtboxes": []}])
    with pytest.raises(ValueError, match=r"bad\.odgt:3: image ID 'b' already annotated on line 1"):
        load_crowdhuman_odgt(path, small_odgt / "Images")


def test_missing_dataset_names_detectron2_datasets_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert MetadataCatalog.get("crowdhuman_val").evaluator_type == "crowdhuman"
    with pytest.raises(FileNotFoundError) as e:
        DatasetCatalog.get("crowdhuman_val")  # registered at import, resolved when loaded
    message = str(e.value)
    assert str(tmp_path / "crowdhuman" / "annotation_val.odgt") in message
    assert "DETECTRON2_DATASETS" in message and "Images/{ID}.jpg" in message
    # annotations present, images missing
    write_odgt(tmp_path / "crowdhuman" / "annotation_val.odgt", [{"ID": "x", "gtboxes": []}])
    with pytest.raises(FileNotFoundError, match=r"image folder holding x\.jpg"):
        DatasetCatalog.get("crowdhuman_val")


def test_registered_layouts(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    root = tmp_path / "crowdhuman"
    write_jpg(root / "CrowdHuman_val" / "v.jpg", 20, 30)  # the official converter's layout
    write_jpg(root / "Images" / "t.jpg", 10, 10)  # the release's: all images in Images/
    write_odgt(root / "annotation_val.odgt", [{"ID": "v", "gtboxes": []}])
    write_odgt(root / "annotation_train.odgt", [{"ID": "t", "gtboxes": []}])
    (val,), (train,) = DatasetCatalog.get("crowdhuman_val"), DatasetCatalog.get("crowdhuman_train")
    assert val["file_name"] == str(root / "CrowdHuman_val" / "v.jpg")
    assert train["file_name"] == str(root / "Images" / "t.jpg")


# ---------------------------------------------------------------------------------------------
# A generated crowded set: more people per image than COCOEvaluator's 100 detections.

E2E = "crowdhuman_e2e"


def generate_crowded_split(root, split, num_images, seed):
    """128x128 images of overlapping "people" (filled rectangles, later ones in front) on a
    jittered grid, 60-130 per image (the first image more than 100), some reaching out of the
    image, plus two "mask" regions and a few ignored people. Returns the odgt path."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(num_images):
        num_people = 130 if index == 0 else int(rng.integers(60, 130))
        canvas = np.full((128, 128, 3), rng.integers(0, 80), dtype=np.uint8)
        cells = rng.permutation(13 * 11)[:num_people]
        gtboxes = []
        for cell in cells:
            w, h = int(rng.integers(8, 14)), int(rng.integers(18, 30))
            x = int(cell % 13) * 10 - 4 + int(rng.integers(-3, 4))
            y = int(cell // 13) * 12 - 6 + int(rng.integers(-3, 4))
            colour = rng.integers(90, 255, 3).tolist()
            cv2.rectangle(canvas, (x, y), (x + w - 1, y + h - 1), colour, thickness=-1)
            cv2.circle(canvas, (x + w // 2, y + 3), 2, (0, 0, 0), thickness=-1)  # a "head"
            ignore = int(rng.random() < 0.03)
            gtboxes.append(person([x, y, w, h], ignore=ignore))
        for _ in range(2):
            x, y = rng.integers(0, 100, 2).tolist()
            gtboxes.append(person([x, y, 24, 24], tag="mask", ignore=1))
        image_id = f"{split}_{index:03d},{seed:x}"
        cv2.imwrite(str(root / "Images" / f"{image_id}.jpg"), canvas)
        records.append({"ID": image_id, "gtboxes": gtboxes})
    path = root / f"annotation_{split}.odgt"
    write_odgt(path, records)
    return path


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    root = tmp_path_factory.mktemp("crowdhuman")
    (root / "Images").mkdir()
    paths = {
        "train": generate_crowded_split(root, "train", 4, seed=1),
        "val": generate_crowded_split(root, "val", 2, seed=2),
    }
    for split, path in paths.items():
        register_crowdhuman(f"{E2E}_{split}", path, root / "Images")
    yield root
    for split in paths:
        DatasetCatalog.remove(f"{E2E}_{split}")
        MetadataCatalog.remove(f"{E2E}_{split}")


# The model sizes of the tiny CPU config; everything else (500 proposals, 1 class, the solver,
# the test-time detections) comes from the CrowdHuman config.
TINY_KEYS = (
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "MODEL.FPN.OUT_CHANNELS", "MODEL.SPARSE_RCNN.HIDDEN_DIM",
    "MODEL.SPARSE_RCNN.NHEADS", "MODEL.SPARSE_RCNN.DIM_FEEDFORWARD",
    "MODEL.SPARSE_RCNN.DIM_DYNAMIC", "INPUT.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TRAIN",
    "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST", "DATALOADER.NUM_WORKERS",
)  # fmt: skip


def cpu_opts(output_dir):
    tiny = make_cfg(TINY_CONFIG)
    opts = []
    for key in TINY_KEYS:
        value = tiny
        for part in key.split("."):
            value = getattr(value, part)
        opts += [key, str(value)]
    return opts + [
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(output_dir),
        "DATASETS.TRAIN", f"('{E2E}_train',)", "DATASETS.TEST", f"('{E2E}_val',)",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.0001", "SOLVER.MAX_ITER", "2",
        "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "100",
        "TEST.EVAL_PERIOD", "0", "SEED", "1",
    ]  # fmt: skip


def run_train_net(argv):
    sys.path.insert(0, str(REPO_ROOT))
    import train_net

    torch.set_num_threads(1)
    return train_net.main(default_argument_parser().parse_args(argv))


def test_crowdhuman_config():
    cfg = make_cfg(CROWDHUMAN_CONFIG)
    assert cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS == 500 and cfg.MODEL.SPARSE_RCNN.NUM_CLASSES == 1
    assert cfg.DATASETS.TRAIN == ("crowdhuman_train",) and cfg.DATASETS.TEST == ("crowdhuman_val",)
    # 50 epochs of 15000 images at 16 per step, LR / 10 after 40 epochs
    assert cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.SOLVER.MAX_ITER * 16 == 50 * 15000 and cfg.SOLVER.STEPS == (40 * 15000 // 16,)
    assert min(cfg.INPUT.MIN_SIZE_TRAIN) == 640 and max(cfg.INPUT.MIN_SIZE_TRAIN) == 800
    assert cfg.INPUT.MAX_SIZE_TRAIN == 1500 and cfg.INPUT.MIN_SIZE_TEST == 800
    assert not cfg.INPUT.CROP.ENABLED
    assert cfg.TEST.DETECTIONS_PER_IMAGE >= cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS
    evaluator = build_sparse_rcnn_evaluator(cfg, "crowdhuman_val", output_folder="unused")
    assert isinstance(evaluator, CrowdHumanEvaluator)
    # per-stage evaluation uses the CrowdHuman protocol too
    cfg.MODEL.SPARSE_RCNN.EVAL_PER_STAGE = True
    per_stage = build_sparse_rcnn_evaluator(cfg, "crowdhuman_val", output_folder="unused")
    assert isinstance(per_stage, PerStageEvaluator)
    evaluators = [per_stage.main_evaluator, *per_stage.stage_evaluators]
    assert len(evaluators) == 7 and all(isinstance(e, CrowdHumanEvaluator) for e in evaluators)


def gt_images(dataset_name):
    out = {}
    for d in DatasetCatalog.get(dataset_name):
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                  a["bbox"][1] + a["bbox"][3]] for a in d["annotations"]]  # fmt: skip
        ignore = [a["iscrowd"] for a in d["annotations"]]
        out[d["image_id"]] = image(boxes, ignore, height=d["height"], width=d["width"])
    return out


def test_train_and_eval_only_report_crowdhuman_metrics(crowded, tmp_path):
    opts = cpu_opts(tmp_path)
    run_train_net(["--config-file", str(CROWDHUMAN_CONFIG), *opts])
    # the evaluation at the end of training (EvalHook) went to metrics.json
    logged = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    trained = {k: v for r in logged for k, v in r.items() if k.startswith("crowdhuman/")}
    weights = str(tmp_path / "model_final.pth")
    evaluated = run_train_net(
        ["--config-file", str(CROWDHUMAN_CONFIG), "--eval-only", *opts, "MODEL.WEIGHTS", weights]
    )
    assert set(evaluated) == {"crowdhuman"}
    metrics = evaluated["crowdhuman"]
    assert set(metrics) == {"AP", "mMR", "Recall", "JI"}
    # the same weights give the same metrics
    assert trained == pytest.approx({f"crowdhuman/{k}": v for k, v in metrics.items()})
    assert all(0 <= metrics[k] <= 100 for k in ("AP", "mMR", "Recall", "JI"))

    # Every detection was kept: 500 proposals, more than 100 per image (no COCO-style cap)
    gts = gt_images(f"{E2E}_val")
    assert max(int((~g["gt_ignore"]).sum()) for g in gts.values()) > 100
    results = tmp_path / "inference" / f"{E2E}_val" / "crowdhuman_results.odgt"
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["ID"] for r in records] == list(gts)
    for r in records:
        assert 100 < len(r["dtboxes"]) <= 500
        assert (r["height"], r["width"]) == (128, 128) and all(b["tag"] == 1 for b in r["dtboxes"])
    # The written odgt results, scored by the brute-force reference, give the reported metrics
    for r in records:
        gts[r["ID"]]["dt_boxes"] = np.array([[x, y, x + w, y + h] for x, y, w, h in
                                             (b["box"] for b in r["dtboxes"])])  # fmt: skip
        gts[r["ID"]]["dt_scores"] = np.array([b["score"] for b in r["dtboxes"]])
    ref = reference_metrics(list(gts.values()))
    for key in ("AP", "mMR", "Recall"):
        assert metrics[key] == pytest.approx(100 * ref[key], abs=1e-6), key
    # JI of the written results (too many boxes for reference_ji's enumeration of matchings)
    assert metrics["JI"] == pytest.approx(100 * jaccard_index(list(gts.values()))[0], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Across processes: the evaluator gathers every process's predictions on the main process. Two
# ranks are simulated in one process (Detectron2's comm.gather itself is Detectron2's to test).


def fake_predictions(dataset_name):
    """Deterministic detections per image: jittered ground truth plus random boxes."""
    generator = torch.Generator().manual_seed(0)
    inputs, outputs = [], []
    for d in DatasetCatalog.get(dataset_name):
        gt = torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32)
        gt[:, 2:] += gt[:, :2]
        noisy = gt + torch.randn(gt.shape, generator=generator) * 2
        xy = torch.rand(40, 2, generator=generator) * 110
        boxes = torch.cat([noisy, torch.cat([xy, xy + 15], dim=1)])
        instances = Instances((d["height"], d["width"]))
        instances.pred_boxes = Boxes(boxes)
        instances.scores = torch.rand(len(boxes), generator=generator)
        instances.pred_classes = torch.zeros(len(boxes), dtype=torch.long)
        inputs.append({"image_id": d["image_id"], "height": d["height"], "width": d["width"]})
        outputs.append({"instances": instances})
    return inputs, outputs


def test_evaluator_across_processes(crowded, monkeypatch):
    name = f"{E2E}_val"
    inputs, outputs = fake_predictions(name)
    single = CrowdHumanEvaluator(name)
    single.process(inputs, outputs)
    expected = single.evaluate()  # world size 1

    sent = []
    monkeypatch.setattr(comm, "synchronize", lambda: None)
    # rank 1: hands its predictions to the main process and reports nothing
    monkeypatch.setattr(comm, "gather", lambda data, dst=0: sent.append(data) or [])
    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    rank1 = CrowdHumanEvaluator(name)
    rank1.process(inputs[1::2], outputs[1::2])
    assert rank1.evaluate() == {} and len(sent) == 1
    # rank 0 (main): its own predictions and rank 1's, images interleaved across the two
    monkeypatch.setattr(comm, "gather", lambda data, dst=0: [data, sent[0]])
    monkeypatch.setattr(comm, "is_main_process", lambda: True)
    rank0 = CrowdHumanEvaluator(name)
    rank0.process(inputs[::2], outputs[::2])
    assert rank0.evaluate() == expected and 0 < expected["crowdhuman"]["AP"] < 100
    # without the gather, one process that saw half of the images scores the rest as missed
    half = CrowdHumanEvaluator(name, distributed=False)
    half.process(inputs[::2], outputs[::2])
    assert half.evaluate()["crowdhuman"]["Recall"] < expected["crowdhuman"]["Recall"]
    # the same image from two processes is an error, not a double count
    monkeypatch.setattr(comm, "gather", lambda data, dst=0: [data, data])
    with pytest.raises(ValueError, match="predicted twice"):
        rank0.evaluate()


def _evaluate_half(root, result_path):
    """One of two gloo processes: registers the generated val split (a spawned process starts
    with empty catalogs), evaluates every other image and saves what ``evaluate`` returned."""
    register_crowdhuman(f"{E2E}_val", root / "annotation_val.odgt", root / "Images")
    inputs, outputs = fake_predictions(f"{E2E}_val")
    rank = comm.get_rank()
    evaluator = CrowdHumanEvaluator(f"{E2E}_val")
    evaluator.process(inputs[rank::2], outputs[rank::2])
    torch.save(evaluator.evaluate(), f"{result_path}.{rank}")


def test_evaluator_in_two_gloo_processes(crowded, tmp_path):
    """Detectron2's launch with two CPU processes: the main process gathers both halves and
    reports the one-process metrics; the other reports nothing."""
    from detectron2.engine import launch

    single = CrowdHumanEvaluator(f"{E2E}_val")
    single.process(*fake_predictions(f"{E2E}_val"))
    expected = single.evaluate()
    path = str(tmp_path / "result")
    launch(_evaluate_half, 2, dist_url="auto", args=(crowded, path))
    assert torch.load(f"{path}.1") == {}
    assert torch.load(f"{path}.0") == expected and 0 < expected["crowdhuman"]["JI"] < 100
