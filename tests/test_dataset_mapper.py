"""SparseRCNNDatasetMapper: flip / resize / crop keep boxes aligned, bad annotations are dropped."""

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image

from conftest import make_cfg
from sparse_rcnn.dataset_mapper import SparseRCNNDatasetMapper, build_sparse_rcnn_augmentation

H, W = 120, 160
# One pure-colour rectangle per class: class c is drawn in RGB channel c only.
RECTS = {0: (10, 15, 50, 60), 1: (70, 20, 110, 50), 2: (30, 75, 140, 110)}


def _anno(box, category_id, mode=BoxMode.XYXY_ABS):
    return {"bbox": list(box), "bbox_mode": mode, "category_id": category_id, "iscrowd": 0}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    image = np.zeros((H, W, 3), np.uint8)
    for c, (x0, y0, x1, y1) in RECTS.items():
        image[y0:y1, x0:x1, c] = 255
    path = tmp_path_factory.mktemp("mapper") / "rects.png"
    Image.fromarray(image).save(path)
    return str(path)


def _dataset_dict(image_file, annotations=None):
    if annotations is None:
        annotations = [_anno(box, c) for c, box in RECTS.items()]
    return {
        "file_name": image_file,
        "height": H,
        "width": W,
        "image_id": 0,
        "annotations": annotations,
    }


def _crop_cfg(enabled=True, opts=()):
    return make_cfg(opts=["INPUT.CROP.ENABLED", enabled, *opts])


def _has(transforms, kind):
    return any(isinstance(t, kind) for t in transforms.transforms)


def _check_aligned(out, tol=1.0):
    """Each instance's box matches the extent of its colour's pixels; visible colours have boxes.

    The annotations have integer boxes: Detectron2 alone would truncate them after every transform
    (up to 2 px off here); the mapper converts them to float.
    """
    image = out["image"].numpy()
    boxes = out["instances"].gt_boxes.tensor.numpy()
    classes = out["instances"].gt_classes.tolist()
    assert len(set(classes)) == len(classes)
    for c in range(3):
        mask = image[c] > 127
        if c not in classes:
            assert mask.sum() < 9, f"class {c} visible ({mask.sum()} px) but its box was dropped"
            continue
        x0, y0, x1, y1 = boxes[classes.index(c)]
        if min(x1 - x0, y1 - y0) < 3:
            continue  # a sliver: too thin for a pixel comparison
        ys, xs = np.nonzero(mask)
        extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert np.abs(extent - boxes[classes.index(c)]).max() <= tol, (c, extent, boxes)


def test_augmentation_structure():
    augs = build_sparse_rcnn_augmentation(_crop_cfg(), is_train=True)
    assert [type(a) for a in augs] == [T.RandomFlip, T.RandomApply, T.ResizeShortestEdge]
    assert augs[1].prob == 0.5
    resize, crop = augs[1].aug.augs
    assert isinstance(resize, T.ResizeShortestEdge) and isinstance(crop, T.RandomCrop)
    # The function's default is the config's INPUT.CROP.RESIZE_SIZES (the tiny config's here).
    assert tuple(resize.short_edge_length) == (96, 112, 128) and resize.is_range is False
    explicit = build_sparse_rcnn_augmentation(_crop_cfg(), True, crop_resize_sizes=(200, 300))
    assert tuple(explicit[1].aug.augs[0].short_edge_length) == (200, 300)
    assert crop.crop_type == "absolute_range" and tuple(crop.crop_size) == (64, 96)
    assert tuple(augs[2].short_edge_length) == (96, 128) and augs[2].max_size == 160
    no_crop = build_sparse_rcnn_augmentation(_crop_cfg(False), is_train=True)
    assert [type(a) for a in no_crop] == [T.RandomFlip, T.ResizeShortestEdge]
    test = build_sparse_rcnn_augmentation(_crop_cfg(), is_train=False)
    assert [type(a) for a in test] == [T.ResizeShortestEdge]
    assert tuple(test[0].short_edge_length) == (128, 128) and test[0].max_size == 160
    mapper = SparseRCNNDatasetMapper(_crop_cfg(), is_train=True, crop_resize_sizes=(120, 140))
    assert tuple(mapper.augmentations.augs[1].aug.augs[0].short_edge_length) == (120, 140)
    cfg = _crop_cfg()
    cfg.INPUT.CROP.RESIZE_SIZES = (96, 112)  # honoured if the config defines the key
    mapper = SparseRCNNDatasetMapper(cfg, is_train=True)
    assert tuple(mapper.augmentations.augs[1].aug.augs[0].short_edge_length) == (96, 112)


def test_output_fields(image_file):
    np.random.seed(0)
    mapper = SparseRCNNDatasetMapper(_crop_cfg(), is_train=True)
    out = mapper(_dataset_dict(image_file))
    image, instances = out["image"], out["instances"]
    assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3
    assert (out["height"], out["width"]) == (H, W)
    assert isinstance(instances, Instances)
    assert instances.image_size == tuple(image.shape[1:])
    assert isinstance(instances.gt_boxes, Boxes) and instances.gt_classes.dtype == torch.int64
    assert "annotations" not in out


@pytest.mark.parametrize("crop_resize_sizes", [(400, 500, 600), (120, 160)])
def test_boxes_follow_flip_resize_and_crop(image_file, crop_resize_sizes):
    mapper = SparseRCNNDatasetMapper(
        _crop_cfg(), is_train=True, crop_resize_sizes=crop_resize_sizes
    )
    np.random.seed(1)
    for _ in range(25):
        out = mapper(_dataset_dict(image_file))
        _check_aligned(out)
        h, w = out["image"].shape[1:]
        assert min(h, w) in (96, 128) or max(h, w) == 160


def test_flip_without_crop(image_file):
    mapper = SparseRCNNDatasetMapper(_crop_cfg(False), is_train=True)
    np.random.seed(2)
    lefts = set()
    for _ in range(12):
        out = mapper(_dataset_dict(image_file))
        _check_aligned(out)
        assert len(out["instances"]) == 3
        h, w = out["image"].shape[1:]
        assert abs(w / h - W / H) < 0.02  # no crop: the aspect ratio is kept
        # Red rectangle on the left (unflipped) or on the right (flipped).
        x0 = out["instances"].gt_boxes.tensor[out["instances"].gt_classes == 0][0, 0].item()
        lefts.add(x0 < w / 2)
    assert lefts == {True, False}


def test_half_of_the_samples_are_cropped():
    mapper = SparseRCNNDatasetMapper(_crop_cfg(), is_train=True)
    image = np.zeros((H, W, 3), np.uint8)
    np.random.seed(3)
    cropped = 0
    num = 300
    for _ in range(num):
        transforms = mapper.augmentations(T.AugInput(image))
        cropped += _has(transforms, T.CropTransform)
    assert 0.38 < cropped / num < 0.62
    mapper = SparseRCNNDatasetMapper(_crop_cfg(False), is_train=True)
    for _ in range(50):
        assert not _has(mapper.augmentations(T.AugInput(image)), T.CropTransform)


def test_cropped_out_boxes_are_dropped(image_file):
    mapper = SparseRCNNDatasetMapper(
        is_train=True, augmentations=[T.CropTransform(0, 0, 60, 60)], image_format="RGB"
    )
    out = mapper(_dataset_dict(image_file))
    assert out["image"].shape == (3, 60, 60)
    assert out["instances"].gt_classes.tolist() == [0]
    assert out["instances"].gt_boxes.tensor.tolist() == [list(map(float, RECTS[0]))]

    # The only box is cropped away: an empty Instances, still returned.
    out = mapper(_dataset_dict(image_file, [_anno(RECTS[1], 1)]))
    assert out is not None and isinstance(out["instances"], Instances)
    assert len(out["instances"]) == 0 and out["instances"].image_size == (60, 60)
    assert out["instances"].gt_boxes.tensor.shape == (0, 4)

    # Partially cropped boxes are clipped to the crop.
    mapper = SparseRCNNDatasetMapper(
        is_train=True, augmentations=[T.CropTransform(20, 20, 100, 80)], image_format="RGB"
    )
    out = mapper(_dataset_dict(image_file))
    assert out["instances"].gt_classes.tolist() == [0, 1, 2]
    expected = [[0, 0, 30, 40], [50, 0, 90, 30], [10, 55, 100, 80]]
    assert out["instances"].gt_boxes.tensor.tolist() == expected
    _check_aligned(out, tol=0)


def test_bad_annotations_are_dropped(image_file):
    mapper = SparseRCNNDatasetMapper(_crop_cfg(False), is_train=True)
    annotations = [
        _anno((10, 15, 40, 45), 0, BoxMode.XYWH_ABS),  # the only valid one
        _anno((10, 10, 0, 20), 1, BoxMode.XYWH_ABS),  # zero width
        _anno((500, 500, 10, 10), 2, BoxMode.XYWH_ABS),  # outside the image
        _anno((50, 50, 40, 80), 1),  # XYXY with x1 < x0
        _anno((float("nan"), 0, 10, 10), 2, BoxMode.XYWH_ABS),
        {"bbox": [1, 2, 3], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
        {"bbox": [1, 2, 3, 4], "category_id": 0},  # no bbox_mode
        {"bbox": [10, 10, 20, 20], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1, "iscrowd": 1},
    ]
    np.random.seed(4)
    out = mapper(_dataset_dict(image_file, annotations))
    assert out["instances"].gt_classes.tolist() == [0]
    ys, xs = np.nonzero(out["image"][0].numpy() > 127)  # the red rectangle, RECTS[0]
    extent = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    assert (out["instances"].gt_boxes.tensor - extent).abs().max() <= 2


def test_image_without_annotations_keeps_empty_instances(image_file):
    mapper = SparseRCNNDatasetMapper(_crop_cfg(), is_train=True)
    np.random.seed(5)
    for annotations in ([], None):
        d = _dataset_dict(image_file, [])
        if annotations is None:
            del d["annotations"]
        out = mapper(d)
        assert len(out["instances"]) == 0
        assert out["instances"].image_size == tuple(out["image"].shape[1:])


@pytest.mark.parametrize("min_size_test, expected", [(128, (120, 160)), (96, (96, 128))])
def test_inference(image_file, min_size_test, expected):
    cfg = _crop_cfg(opts=["INPUT.MIN_SIZE_TEST", min_size_test])
    mapper = SparseRCNNDatasetMapper(cfg, is_train=False)
    np.random.seed(6)
    out = mapper(_dataset_dict(image_file))
    assert tuple(out["image"].shape) == (3, *expected)
    assert expected == T.ResizeShortestEdge.get_output_shape(H, W, min_size_test, 160)
    assert "instances" not in out and "annotations" not in out
    assert (out["height"], out["width"]) == (H, W)


def test_unreadable_image_is_skipped_in_training_not_fatal(image_file, tmp_path):
    from detectron2.data.common import MapDataset

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = _dataset_dict(image_file, [_anno([10, 10, 40, 40], 0)])
    bad = {**good, "file_name": str(broken)}
    mapper = SparseRCNNDatasetMapper(_crop_cfg(False), is_train=True)
    assert mapper(dict(bad)) is None
    # Detectron2's MapDataset (used by the train loader) then draws another sample.
    dataset = MapDataset([bad, good], mapper)
    assert dataset[0]["instances"].gt_boxes.tensor.shape == (1, 4)
    # At inference a bad file is an error the caller must see.
    with pytest.raises(OSError):
        SparseRCNNDatasetMapper(_crop_cfg(False), is_train=False)(dict(bad))


# ---- Instance masks (MODEL.MASK_ON): polygons and RLE through flip, resize and crop ----


def _mask_annotations(kind):
    """The rectangles of RECTS with a "segmentation": a polygon or a COCO RLE of their pixels."""
    import pycocotools.mask as mask_util

    annotations = []
    for c, (x0, y0, x1, y1) in RECTS.items():
        anno = _anno((x0, y0, x1, y1), c)
        if kind == "polygon":
            anno["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        else:
            bitmap = np.zeros((H, W), np.uint8)
            bitmap[y0:y1, x0:x1] = 1
            rle = mask_util.encode(np.asfortranarray(bitmap))
            anno["segmentation"] = {"size": [H, W], "counts": rle["counts"].decode()}
        annotations.append(anno)
    return annotations


@pytest.mark.parametrize("kind, mask_format", [("polygon", "polygon"), ("rle", "bitmask")])
def test_masks_follow_flip_resize_and_crop(image_file, kind, mask_format):
    cfg = _crop_cfg(opts=["MODEL.MASK_ON", "True", "INPUT.MASK_FORMAT", mask_format])
    mapper = SparseRCNNDatasetMapper(cfg, is_train=True, crop_resize_sizes=(120, 160))
    assert mapper.use_instance_mask and mapper.recompute_boxes  # Detectron2's crop behaviour
    np.random.seed(7)
    crops = 0
    for _ in range(20):
        out = mapper(_dataset_dict(image_file, _mask_annotations(kind)))
        instances = out["instances"]
        image = out["image"].numpy()
        masks = instances.gt_masks
        assert type(masks).__name__ == ("PolygonMasks" if kind == "polygon" else "BitMasks")
        h, w = image.shape[1:]
        crops += abs(w / h - W / H) > 0.02  # only the crop changes the aspect ratio
        bitmaps = masks.tensor if mask_format == "bitmask" else _rasterize(masks, h, w)
        assert bitmaps.shape == (len(instances), h, w)
        for mask, c, box in zip(bitmaps, instances.gt_classes.tolist(), instances.gt_boxes.tensor):
            colour = torch.from_numpy(image[c] > 127)
            # Boxes are recomputed from the masks (the crop cuts the masks too).
            ys, xs = torch.nonzero(mask, as_tuple=True)
            extent = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            # (exactly the bitmask's pixels; a polygon's own extent, within a pixel of its raster)
            assert (box - extent).abs().max() <= (0 if mask_format == "bitmask" else 1), c
            # The mask is the object's pixels; resampling differs on its outline only.
            outline = 2 * (extent[2] - extent[0] + extent[3] - extent[1]) + 4
            assert (mask ^ colour).sum() <= outline, c
            assert (mask & colour).sum() >= 0.5 * colour.sum(), c
    assert crops > 0


def _rasterize(polygon_masks, h, w):
    from detectron2.structures import polygons_to_bitmask

    return torch.stack(
        [torch.from_numpy(polygons_to_bitmask(p, h, w)) for p in polygon_masks.polygons]
    )


def test_masks_cropped_by_a_fixed_crop(image_file):
    """A fixed crop: every mask is its rectangle cut by the crop, exactly."""
    for kind, mask_format in (("polygon", "polygon"), ("rle", "bitmask")):
        mapper = SparseRCNNDatasetMapper(
            is_train=True,
            augmentations=[T.CropTransform(20, 20, 100, 80)],
            image_format="RGB",
            use_instance_mask=True,
            instance_mask_format=mask_format,
            recompute_boxes=True,
        )
        out = mapper(_dataset_dict(image_file, _mask_annotations(kind)))
        masks = out["instances"].gt_masks
        bitmaps = masks.tensor if mask_format == "bitmask" else _rasterize(masks, 80, 100)
        expected_boxes = [[0, 0, 30, 40], [50, 0, 90, 30], [10, 55, 100, 80]]
        for mask, (x0, y0, x1, y1) in zip(bitmaps, expected_boxes):
            expected = torch.zeros(80, 100, dtype=torch.bool)
            expected[y0:y1, x0:x1] = True
            assert torch.equal(mask, expected), kind
        assert out["instances"].gt_boxes.tensor.tolist() == expected_boxes


def test_without_mask_on_segmentation_is_dropped(image_file):
    mapper = SparseRCNNDatasetMapper(_crop_cfg(), is_train=True)
    np.random.seed(8)
    out = mapper(_dataset_dict(image_file, _mask_annotations("polygon")))
    assert not out["instances"].has("gt_masks")
    assert set(out["instances"].get_fields()) == {"gt_boxes", "gt_classes"}
