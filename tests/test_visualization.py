"""Pictures of a trained model (sparse_rcnn.visualization) and the report that draws them."""

import json

import cv2
import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, BoxMode, Instances

from sparse_rcnn import report
from sparse_rcnn.visualization import (
    _color,
    draw_boxes,
    draw_prediction_beside_ground_truth,
    ground_truth_masks,
    plot_ap_per_stage,
    plot_training_curves,
    stage_ap,
)

CLASSES = ("rectangle", "ellipse", "triangle")


def test_draw_boxes_upscales_and_keeps_labels_off_the_object():
    image = np.full((32, 48, 3), 255, dtype=np.uint8)
    boxes = np.array([[10.0, 12.0, 30.0, 28.0]])
    drawn = draw_boxes(image, boxes, [1], CLASSES, [0.87], scale=4.0)
    assert drawn.shape == (128, 192, 3)
    color = np.array(_color(1))
    # The box outline lies at the scaled corners.
    assert (drawn[48, 40:120] == color).all(axis=-1).mean() > 0.9  # top edge y = 12 * 4
    # The label (filled in the class colour) sits above the box, not inside it.
    above = drawn[30:47, 40:80]
    inside = drawn[52:108, 44:116]
    assert (above == color).all(axis=-1).mean() > 0.3
    assert (inside == 255).all()


def test_label_moves_below_top_edge_when_no_room_above():
    image = np.full((32, 32, 3), 255, dtype=np.uint8)
    drawn = draw_boxes(image, np.array([[0.0, 0.0, 16.0, 16.0]]), [0], CLASSES, None, scale=4.0)
    color = np.array(_color(0))
    # Nothing fits above y = 0: the label is drawn under the box's bottom edge (y = 64).
    assert (drawn[66:80, 0:40] == color).all(axis=-1).mean() > 0.3
    assert (drawn[8:56, 8:56] == 255).all()


def test_prediction_beside_ground_truth_layout():
    image = np.zeros((16, 20, 3), dtype=np.uint8)
    instances = Instances((16, 20))
    instances.pred_boxes = Boxes(torch.tensor([[2.0, 2.0, 10.0, 10.0]]))
    instances.pred_classes = torch.tensor([2])
    instances.scores = torch.tensor([0.5])
    record = {
        "annotations": [
            {"bbox": [1, 1, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
            {"bbox": [0, 0, 20, 16], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1, "iscrowd": 1},
        ]
    }
    drawn = draw_prediction_beside_ground_truth(image, instances, record, CLASSES, scale=4.0)
    # Two 80-px panels, an 8-px gap, a 24-px title bar above the 64-px images.
    assert drawn.shape == (88, 80 + 8 + 80, 3)
    alone = draw_prediction_beside_ground_truth(image, instances, None, CLASSES, scale=4.0)
    np.testing.assert_array_equal(alone, drawn[:, 88:])


def _write_metrics(path, records):
    with open(path / "metrics.json", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _training_records(iterations=(19, 39, 59), stages=3):
    records = []
    for i in iterations:
        record = {"iteration": i, "total_loss": 10.0 / (i + 1)}
        for t in range(1, stages + 1):
            for term in ("cls", "l1", "giou"):
                record[f"loss_{term}_stage{t}"] = 1.0 / (i + t)
        records.append(record)
    return records


def test_training_curves_png(tmp_path):
    path = plot_training_curves(_training_records(), str(tmp_path / "curves.png"))
    picture = cv2.imread(path)
    assert picture is not None and picture.shape[0] > 100 and picture.shape[1] > 400
    with pytest.raises(ValueError, match="no training records"):
        plot_training_curves([{"iteration": 5, "bbox/AP": 1.0}], str(tmp_path / "x.png"))


def test_stage_ap_and_its_picture(tmp_path):
    record = {"bbox/AP": 3.0, "bbox_stage2/AP": 2.0, "bbox_stage1/AP": 1.0, "bbox_stage1/AP50": 4}
    assert stage_ap(record) == {1: 1.0, 2: 2.0}
    assert cv2.imread(plot_ap_per_stage(record, str(tmp_path / "ap.png"))) is not None
    with pytest.raises(ValueError, match="EVAL_PER_STAGE"):
        plot_ap_per_stage({"bbox/AP": 3.0}, str(tmp_path / "none.png"))


def test_report_prints_ap_and_where_the_pictures_are(tmp_path, capsys):
    evaluation = {"iteration": 59, "bbox/AP": 12.5, "bbox/AP50": 30.0, "bbox/AP-ellipse": 7.0}
    evaluation.update({f"bbox_stage{t}/AP": float(t) for t in (1, 2, 3)})
    _write_metrics(tmp_path, _training_records() + [evaluation])
    (tmp_path / "vis").mkdir()
    report.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "12.5" in out and "AP-ellipse" in out
    assert "stage 1 1.0, stage 2 2.0, stage 3 3.0" in out
    for name in ("training_curves.png", "ap_per_stage.png"):
        assert str(tmp_path / name) in out
        assert (tmp_path / name).is_file()
    assert f"{tmp_path}/vis/" in out


def test_report_without_evaluation_says_so(tmp_path):
    _write_metrics(tmp_path, _training_records())
    with pytest.raises(SystemExit, match="No COCO evaluation"):
        report.main([str(tmp_path)])


def test_labels_of_the_same_box_do_not_cover_each_other():
    from sparse_rcnn.visualization import place_label

    # Two detections of one object (the same box): the second label goes above the first.
    box, label = (40, 60, 120, 100), (50, 14)
    first = place_label(box, label, [], (200, 200))
    assert first == (40, 60 - 14 - 2)
    placed = [(first[0], first[1], first[0] + 50, first[1] + 14)]
    second = place_label(box, label, placed, (200, 200))
    assert second == (40, first[1] - 15)
    # No room above: below the box, then further down.
    top_box = (0, 0, 60, 40)
    low = place_label(top_box, label, [], (200, 200))
    assert low == (0, 42)
    lower = place_label(top_box, label, [(0, 42, 50, 56)], (200, 200))
    assert lower == (0, 57)
    # A label that would leave the canvas on the right is moved left onto it.
    assert place_label((190, 60, 199, 80), label, [], (200, 200))[0] == 150


def test_masks_are_filled_in_the_class_colour():
    image = np.full((32, 48, 3), 255, dtype=np.uint8)
    boxes = np.array([[10.0, 12.0, 30.0, 28.0]])
    mask = np.zeros((1, 32, 48), dtype=bool)
    mask[0, 16:24, 14:26] = True
    plain = draw_boxes(image, boxes, [1], CLASSES, [0.9], scale=4.0)
    drawn = draw_boxes(image, boxes, [1], CLASSES, [0.9], scale=4.0, masks=mask)
    color = np.array(_color(1))
    inside = drawn[70:90, 62:98].astype(int)  # well inside the mask (rows 64-96, cols 56-104)
    np.testing.assert_array_equal(inside, ((255 + color) / 2).astype(int) + 0 * inside)
    # Outside the mask nothing changed except the outline.
    assert (drawn[52:60, 44:116] == plain[52:60, 44:116]).all()
    with pytest.raises(ValueError, match="masks must be"):
        draw_boxes(image, boxes, [1], CLASSES, None, 4.0, masks=np.zeros((1, 16, 16), bool))


def test_ground_truth_masks_from_polygons_and_rle():
    import pycocotools.mask as mask_util

    bitmap = np.zeros((16, 20), np.uint8)
    bitmap[2:6, 3:9] = 1
    rle = mask_util.encode(np.asfortranarray(bitmap))
    record = {
        "annotations": [
            {"bbox": [3, 2, 6, 4], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
             "segmentation": [[3, 2, 9, 2, 9, 6, 3, 6]]},
            {"bbox": [3, 2, 6, 4], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1,
             "segmentation": {"size": [16, 20], "counts": rle["counts"].decode()}},
            {"bbox": [0, 0, 20, 16], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1, "iscrowd": 1},
        ]
    }  # fmt: skip
    masks = ground_truth_masks(record, 16, 20)
    assert masks.shape == (2, 16, 20)
    np.testing.assert_array_equal(masks[0], bitmap.astype(bool))
    np.testing.assert_array_equal(masks[1], bitmap.astype(bool))
    del record["annotations"][0]["segmentation"]
    assert ground_truth_masks(record, 16, 20) is None


def test_prediction_beside_ground_truth_draws_masks_on_both_panels():
    image = np.zeros((16, 20, 3), dtype=np.uint8)
    instances = Instances((16, 20))
    instances.pred_boxes = Boxes(torch.tensor([[2.0, 2.0, 10.0, 10.0]]))
    instances.pred_classes = torch.tensor([2])
    instances.scores = torch.tensor([0.5])
    instances.pred_masks = torch.zeros(1, 16, 20, dtype=torch.bool)
    instances.pred_masks[0, 4:8, 4:8] = True
    record = {
        "annotations": [
            {"bbox": [1, 1, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
             "segmentation": [[12, 10, 18, 10, 18, 14, 12, 14]]},
        ]
    }  # fmt: skip
    drawn = draw_prediction_beside_ground_truth(image, instances, record, CLASSES, scale=4.0)
    truth, predicted = drawn[24:, :80], drawn[24:, 88:]
    predicted_fill = (np.array(_color(2)) / 2).astype(np.uint8)
    truth_fill = (np.array(_color(0)) / 2).astype(np.uint8)
    assert (predicted[20:28, 20:28] == predicted_fill).all()
    assert (truth[44:52, 52:68] == truth_fill).all()
    # Each panel has its own masks only.
    assert not (predicted == truth_fill).all(axis=-1).any()
    assert not (truth == predicted_fill).all(axis=-1).any()
