"""The generator of the ``synthetic_shapes`` images: small detection scenes for smoke tests and
CPU training.

Images show 0-4 filled rectangles, ellipses and triangles (COCO category ids 1, 2, 3; Detectron2's
loader maps them to the contiguous classes 0, 1, 2) of varied sizes (about 15%-60% of the image
side), aspect ratios, rotations and colours, on textured backgrounds (smooth noise, gradients,
soft stripes) with pixel noise. Every box is the tight box of its shape's pixels, clipped to the
image; like COCO, an occluded object keeps the box of its full shape, and a shape is only placed
where at least half of every object (itself included) stays visible. The split's json also gives
every object's instance mask, the pixels of it that stay visible, as COCO RLE ("segmentation";
load it with ``INPUT.MASK_FORMAT "bitmask"``).

``generate_sample`` draws one image; ``generate_split`` writes a split's PNG files and returns its
COCO json dict (about 2000 128x128 images per 10 s). Where the files go, their caching and the
dataset registration are in ``builtin_datasets``.
"""

import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import pycocotools.mask as mask_util

__all__ = [
    "SYNTHETIC_SHAPES_CLASSES",
    "generate_sample",
    "generate_split",
    "mask_to_rle",
    "split_params",
]

SYNTHETIC_SHAPES_CLASSES = ("rectangle", "ellipse", "triangle")
# Bump when the drawing or the json changes: cached splits written by an older generator are
# regenerated. 3: the json has instance masks ("segmentation"); images and boxes as in 2.
GENERATOR_VERSION = 3
DEFAULT_IMAGE_SIZE = 128
DEFAULT_SEED = 0
DEFAULT_MAX_OBJECTS = 4
DEFAULT_EMPTY_PROB = 0.1

ImageSize = Union[int, Tuple[int, int]]


def _hw(image_size: ImageSize) -> Tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def _render_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured (H, W, 3) float32 background in [0, 255]: smooth noise, gradient or stripes."""
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= max(h - 1, 1)
    xx /= max(w - 1, 1)
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    if kind == 0:  # smooth random noise
        k = int(rng.integers(2, 7))
        small = rng.uniform(0, 255, size=(k, k, 3)).astype(np.float32)
        bg = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    else:
        theta = rng.uniform(0, np.pi)
        t = xx * np.cos(theta) + yy * np.sin(theta)
        if kind == 1:  # linear gradient between two colours
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        else:  # soft stripes of random orientation, period and phase, at reduced contrast
            cycles = rng.uniform(2.0, 8.0)
            t = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * t + rng.uniform(0, 2 * np.pi))
            c1 = c0 + 0.5 * (c1 - c0)
        bg = c0 * (1.0 - t[..., None]) + c1 * t[..., None]
    # Low-amplitude smooth noise on top of every kind.
    k = int(rng.integers(3, 9))
    overlay = cv2.resize(rng.normal(0, 12, size=(k, k, 3)).astype(np.float32), (w, h))
    return np.clip(bg + overlay, 0, 255).astype(np.float32)


def _unit_polygon(rng: np.random.Generator, category: str) -> np.ndarray:
    """(K, 2) vertices of a shape of the class around the origin, before stretch and rotation."""
    if category == "rectangle":
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if category == "ellipse":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return 0.5 * np.stack([np.cos(t), np.sin(t)], axis=1)
    if category == "triangle":
        # Vertex angles near 120 degrees apart and radii in [0.6, 1]: no slivers.
        angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3
        angles = angles + rng.uniform(-0.45, 0.45, size=3)
        radii = rng.uniform(0.6, 1.0, size=3)
        return radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    raise ValueError(f"Unknown shape class {category!r}")


def _sample_polygon(
    rng: np.random.Generator, category: str, h: int, w: int
) -> Optional[np.ndarray]:
    """A placed (K, 2) polygon in continuous pixel coordinates, or None if too small."""
    side = min(h, w)
    pts = _unit_polygon(rng, category)
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3)))  # width / height before rotation
    pts = pts * np.array([np.sqrt(aspect), 1 / np.sqrt(aspect)])
    # Rectangles are axis-aligned half of the time; ellipses and triangles any way round.
    angle = 0.0 if category == "rectangle" and rng.random() < 0.5 else rng.uniform(0, np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = pts @ rot.T
    # Long side of the box: log-uniform in [15%, 60%] of the image side (19-77 px at 128 px: small
    # and medium COCO objects that a from-scratch model on CPU learns within minutes).
    long_side = side * np.exp(rng.uniform(np.log(0.15), np.log(0.6)))
    extent = pts.max(0) - pts.min(0)
    pts = (pts - pts.min(0)) * (long_side / extent.max())
    ew, eh = pts.max(0)
    if min(ew, eh) < max(3.0, 0.03 * side):
        return None
    # At most a quarter of the box may leave the image on each side (truncated objects).
    x0 = rng.uniform(-0.25 * ew, w - 0.75 * ew)
    y0 = rng.uniform(-0.25 * eh, h - 0.75 * eh)
    return pts + np.array([x0, y0])


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _rasterize(pts: np.ndarray, h: int, w: int) -> np.ndarray:
    """Boolean (H, W) mask of the pixels whose centres (x + 0.5, y + 0.5) the polygon covers."""
    mask = np.zeros((h, w), dtype=np.uint8)
    # OpenCV puts pixel x's centre at x; ours is at x + 0.5. 4 fractional bits of precision.
    fixed = np.round((pts - 0.5) * 16).astype(np.int32)
    cv2.fillPoly(mask, [fixed], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _mask_box(mask: np.ndarray) -> List[float]:
    """Tight XYWH_ABS box of a non-empty mask: pixel x covers [x, x + 1)."""
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    x0, x1, y0, y1 = int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random RGB colour at least ~80 (L2) away from ``under``, the mean colour it covers."""
    best, best_dist = None, -1.0
    for _ in range(10):
        colour = rng.uniform(0, 255, size=3)
        dist = float(np.linalg.norm(colour - under))
        if dist >= 80:
            return colour
        if dist > best_dist:
            best, best_dist = colour, dist
    # Fall back to pushing the best candidate away from the covered colour.
    direction = best - under
    norm = float(np.linalg.norm(direction))
    direction = direction / norm if norm > 1e-6 else np.array([1.0, 1.0, 1.0]) / np.sqrt(3)
    candidate = under + 120 * direction
    if np.any(candidate < 0) or np.any(candidate > 255):
        candidate = 255.0 - under  # the complement is >= 80 away unless under is mid-grey
        if np.linalg.norm(candidate - under) < 80:
            candidate = np.where(under < 128, 255.0, 0.0)
    return np.clip(candidate, 0, 255)


def generate_sample(
    rng: np.random.Generator,
    image_size: ImageSize = DEFAULT_IMAGE_SIZE,
    *,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    empty_prob: float = DEFAULT_EMPTY_PROB,
    num_objects: Optional[int] = None,
    background: Optional[Sequence[float]] = None,
    noise: bool = True,
    return_masks: bool = False,
):
    """Draw one image and its annotations.

    Args:
        rng: the only source of randomness.
        image_size: S (square) or (H, W).
        max_objects: the number of objects is 0 with probability ``empty_prob``, else uniform in
            [1, max_objects]. Objects that cannot be placed (visibility) are skipped.
        num_objects: if given, try to place exactly this many objects instead.
        background: an RGB colour for a flat background instead of a textured one.
        noise: add Gaussian pixel noise (sigma uniform in [0, 6]) to the whole image.
        return_masks: also return the (H, W) bool masks of every full shape and of its pixels
            that stay visible.

    Returns:
        image: (H, W, 3) uint8 RGB.
        annotations: COCO-style dicts with "category_id" (1-3), "bbox" (XYWH_ABS, the tight
            box of the full shape's pixels), "area" (the full shape's pixel count) and
            "iscrowd" (0).
        full_masks, visible_masks: lists of (H, W) bool masks, only with ``return_masks``.
    """
    h, w = _hw(image_size)
    if background is None:
        canvas = _render_background(rng, h, w)
    else:
        canvas = np.empty((h, w, 3), np.float32)
        canvas[:] = np.asarray(background, dtype=np.float32)
    if num_objects is None:
        num_objects = 0 if rng.random() < empty_prob else int(rng.integers(1, max_objects + 1))

    annotations, full_masks, visible_masks = [], [], []
    for _ in range(num_objects):
        category_index = int(rng.integers(len(SYNTHETIC_SHAPES_CLASSES)))
        category = SYNTHETIC_SHAPES_CLASSES[category_index]
        for _attempt in range(20):
            pts = _sample_polygon(rng, category, h, w)
            if pts is None:
                continue
            mask = _rasterize(pts, h, w)
            area = int(mask.sum())
            # At least half of the shape inside the image, and of every earlier object visible.
            if area < 4 or area < 0.5 * _polygon_area(pts):
                continue
            if any(
                (vis & ~mask).sum() < 0.5 * full.sum()
                for vis, full in zip(visible_masks, full_masks)
            ):
                continue
            box = _mask_box(mask)
            if box[2] < 2 or box[3] < 2:
                continue
            colour = _contrasting_colour(rng, canvas[mask].mean(0))
            canvas[mask] = colour
            visible_masks = [vis & ~mask for vis in visible_masks]
            visible_masks.append(mask.copy())
            full_masks.append(mask)
            annotations.append(
                {
                    "category_id": category_index + 1,
                    "bbox": box,
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
            break
    if noise:
        sigma = rng.uniform(0, 6)
        canvas += rng.normal(0, sigma, size=canvas.shape).astype(np.float32)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    if return_masks:
        return image, annotations, full_masks, visible_masks
    return image, annotations


def mask_to_rle(mask: np.ndarray) -> Dict:
    """COCO compressed RLE of an (H, W) bool mask, json-ready: {"size": [H, W], "counts": str}."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def split_params(split, num_images, image_size, seed, max_objects, empty_prob) -> Dict:
    """The parameters that define a split's files (recorded in its json's ``info``)."""
    h, w = _hw(image_size)
    return {
        "generator_version": GENERATOR_VERSION,
        "split": split,
        "num_images": int(num_images),
        "height": h,
        "width": w,
        "seed": int(seed),
        "max_objects": int(max_objects),
        "empty_prob": float(empty_prob),
    }


def generate_split(
    image_dir: Union[str, Path],
    split: str,
    num_images: int,
    image_size: ImageSize = DEFAULT_IMAGE_SIZE,
    seed: int = DEFAULT_SEED,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    empty_prob: float = DEFAULT_EMPTY_PROB,
) -> Dict:
    """Write the images of a split as PNG files into ``image_dir``; return its COCO json dict.

    Image ``i`` depends only on ``(seed, split, i)`` and the drawing parameters, so a split of
    more images starts with the images of a smaller one. Every annotation has the keys of
    :func:`generate_sample`'s and "segmentation", the RLE of the object's visible pixels.
    """
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    h, w = _hw(image_size)
    split_key = zlib.crc32(split.encode())
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([int(seed), split_key, index])
        image, annos, _, visible_masks = generate_sample(
            rng, (h, w), max_objects=max_objects, empty_prob=empty_prob, return_masks=True
        )
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        if not cv2.imwrite(
            str(image_dir / file_name), image[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1]
        ):
            raise OSError(f"Could not write {image_dir / file_name}")
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for anno, visible in zip(annos, visible_masks):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    **anno,
                    "segmentation": mask_to_rle(visible),
                }
            )
    return {
        "info": {
            "description": "Synthetic shapes (sparse_rcnn.synthetic_shapes)",
            "params": split_params(split, num_images, (h, w), seed, max_objects, empty_prob),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SYNTHETIC_SHAPES_CLASSES)
        ],
    }
