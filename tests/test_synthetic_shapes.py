"""The synthetic_shapes generator: determinism, tight boxes, occlusion, distributions."""

import numpy as np

from sparse_rcnn.synthetic_shapes import generate_sample


def test_generate_sample_is_deterministic():
    a = generate_sample(np.random.default_rng(7), 96)
    b = generate_sample(np.random.default_rng(7), 96)
    c = generate_sample(np.random.default_rng(8), 96)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])


def test_box_is_tight_on_flat_background():
    for seed in range(60):
        rng = np.random.default_rng(seed)
        image, annos = generate_sample(
            rng, (80, 96), num_objects=1, background=(0, 0, 0), noise=False
        )
        if not annos:
            continue
        fg = image.any(axis=2)
        ys, xs = np.nonzero(fg)
        x, y, w, h = annos[0]["bbox"]
        expected = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert np.abs(np.array([x, y, x + w, y + h]) - expected).max() <= 1, seed


def test_occlusion_keeps_half_visible_and_full_boxes():
    for seed in range(40):
        rng = np.random.default_rng(seed)
        image, annos, full, visible = generate_sample(
            rng, 64, num_objects=4, noise=False, return_masks=True
        )
        for anno, full_mask, vis_mask in zip(annos, full, visible):
            assert vis_mask.sum() >= 0.5 * full_mask.sum()
            assert not (vis_mask & ~full_mask).any()
            ys, xs = np.nonzero(full_mask)
            x, y, w, h = anno["bbox"]
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_class_and_count_distributions():
    counts, classes = [], []
    for index in range(200):
        _, annos = generate_sample(np.random.default_rng([0, index]), 64, noise=False)
        counts.append(len(annos))
        classes += [a["category_id"] for a in annos]
    counts = np.array(counts)
    assert 0.03 < (counts == 0).mean() < 0.3  # some images are empty
    assert counts.max() <= 4 and (counts >= 3).mean() > 0.2
    hist = np.bincount(classes, minlength=4)[1:]
    assert hist.min() > 0.2 * len(classes)  # every class, roughly balanced


def test_object_sizes_vary():
    sides = []
    for index in range(100):
        _, annos = generate_sample(np.random.default_rng([1, index]), 128, noise=False)
        sides += [max(a["bbox"][2], a["bbox"][3]) / 128 for a in annos]
    sides = np.array(sides)
    # Long sides are drawn from 15%-60% of the image; truncation at the border makes some smaller.
    assert sides.min() < 0.2 and sides.max() > 0.45
    assert 0.05 <= np.median(sides) <= 0.4


def test_split_json_has_the_visible_masks_and_the_same_images_and_boxes(tmp_path):
    """The json's RLE masks are the visible pixels of every object; the images, boxes, areas and
    classes are those of generate_sample without masks (the masks draw nothing from the rng)."""
    import zlib

    import cv2
    import pycocotools.mask as mask_util

    from sparse_rcnn.synthetic_shapes import generate_split

    coco = generate_split(tmp_path, "val", 12, (48, 64), seed=5)
    by_image = {}
    for anno in coco["annotations"]:
        by_image.setdefault(anno["image_id"], []).append(anno)
    assert sum(len(v) for v in by_image.values()) >= 12
    for index, info in enumerate(coco["images"]):
        rng_args = [5, zlib.crc32(b"val"), index]
        image, annos = generate_sample(np.random.default_rng(rng_args), (48, 64))
        written = cv2.imread(str(tmp_path / info["file_name"]))[:, :, ::-1]
        assert np.array_equal(written, image)
        ours = by_image.get(info["id"], [])
        strip = ("id", "image_id", "segmentation")
        assert [{k: v for k, v in a.items() if k not in strip} for a in ours] == annos
        _, _, full, visible = generate_sample(
            np.random.default_rng(rng_args), (48, 64), return_masks=True
        )
        for anno, full_mask, visible_mask in zip(ours, full, visible):
            segm = anno["segmentation"]
            assert segm["size"] == [48, 64] and isinstance(segm["counts"], str)
            decoded = mask_util.decode({"size": segm["size"], "counts": segm["counts"].encode()})
            assert np.array_equal(decoded.astype(bool), visible_mask)
            assert decoded.sum() >= 0.5 * full_mask.sum()  # at least half of it is visible
            # The visible pixels lie inside the object's box.
            x, y, w, h = anno["bbox"]
            ys, xs = np.nonzero(decoded)
            assert xs.min() >= x and ys.min() >= y and xs.max() < x + w and ys.max() < y + h
