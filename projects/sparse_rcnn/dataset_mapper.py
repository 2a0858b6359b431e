"""The training augmentation of Sparse R-CNN (paper section 4 and the official
``SparseRCNNDatasetMapper``).

Training: random horizontal flip; then, with ``INPUT.CROP.ENABLED``, in half of the samples a
resize of the short side to one of ``INPUT.CROP.RESIZE_SIZES`` followed by a random crop of
``INPUT.CROP.TYPE`` / ``INPUT.CROP.SIZE``; then always a multi-scale resize of the short side to
one of ``INPUT.MIN_SIZE_TRAIN`` (long side at most ``INPUT.MAX_SIZE_TRAIN``). Inference: resize
to ``INPUT.MIN_SIZE_TEST`` / ``INPUT.MAX_SIZE_TEST``.
"""

import collections
import logging
import math
from typing import List, Optional, Sequence

from detectron2.config import configurable
from detectron2.data import DatasetMapper, transforms as T
from detectron2.structures import BoxMode

from .config import CROP_RESIZE_SIZES

__all__ = [
    "SparseRCNNDatasetMapper",
    "build_sparse_rcnn_augmentation",
    "sparse_rcnn_train_augmentation",
]

logger = logging.getLogger(__name__)

# The training mapper logs one summary of the annotations it dropped after this many images.
REPORT_DROPPED_AFTER = 500


def build_sparse_rcnn_augmentation(
    cfg,
    is_train: bool,
    crop_resize_sizes: Optional[Sequence[int]] = None,
    crop_prob: float = 0.5,
) -> List[T.Augmentation]:
    """The augmentations of Sparse R-CNN, from a yacs config.

    Args:
        cfg: a Detectron2 config (``INPUT.*``).
        is_train: training (flip, optional resize + crop, multi-scale resize) or inference
            (single-scale resize).
        crop_resize_sizes: short sides the image is resized to (one at random) before the crop;
            default ``cfg.INPUT.CROP.RESIZE_SIZES`` (its default, in ``config.py``, is the
            official 400, 500, 600).
        crop_prob: probability of the resize + crop, when ``INPUT.CROP.ENABLED``.

    Returns:
        Augmentations, applied in order (see :func:`sparse_rcnn_train_augmentation`).
    """
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    crop = cfg.INPUT.CROP
    return sparse_rcnn_train_augmentation(
        min_size=cfg.INPUT.MIN_SIZE_TRAIN,
        max_size=cfg.INPUT.MAX_SIZE_TRAIN,
        sample_style=cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
        random_flip=cfg.INPUT.RANDOM_FLIP,
        crop_type=crop.TYPE if crop.ENABLED else None,
        crop_size=crop.SIZE,
        crop_resize_sizes=crop.RESIZE_SIZES if crop_resize_sizes is None else crop_resize_sizes,
        crop_prob=crop_prob,
    )


def sparse_rcnn_train_augmentation(
    *,
    min_size: Sequence[int] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
    max_size: int = 1333,
    sample_style: str = "choice",
    random_flip: str = "horizontal",
    crop_type: Optional[str] = None,
    crop_size: Sequence[float] = (384, 600),
    crop_resize_sizes: Sequence[int] = CROP_RESIZE_SIZES,
    crop_prob: float = 0.5,
) -> List[T.Augmentation]:
    """The training augmentations of Sparse R-CNN without a config (LazyConfig configs call it).

    Random flip; then, if ``crop_type`` is given, with probability ``crop_prob`` a resize of the
    short side to one of ``crop_resize_sizes`` followed by ``T.RandomCrop(crop_type, crop_size)``;
    then the multi-scale resize of the short side to ``min_size`` (long side <= ``max_size``).
    Defaults: the paper's and the official ones ("crop" models: ``crop_type="absolute_range"``).

    Args:
        min_size, max_size, sample_style: ``T.ResizeShortestEdge`` of the multi-scale resize.
        random_flip: "horizontal", "vertical" or "none".
        crop_type, crop_size: ``T.RandomCrop``; ``crop_type=None`` disables the resize + crop.
        crop_resize_sizes: short sides of the resize before the crop (one at random).
        crop_prob: probability of the resize + crop.

    Returns:
        Augmentations, applied in order.
    """
    if random_flip not in ("horizontal", "vertical", "none"):
        raise ValueError(f"random_flip must be horizontal, vertical or none, got {random_flip!r}")
    augs = []
    if random_flip != "none":
        augs.append(
            T.RandomFlip(horizontal=random_flip == "horizontal", vertical=random_flip == "vertical")
        )
    if crop_type is not None:
        crop = T.AugmentationList(
            [
                T.ResizeShortestEdge(list(crop_resize_sizes), sample_style="choice"),
                T.RandomCrop(crop_type, crop_size),
            ]
        )
        augs.append(T.RandomApply(crop, prob=crop_prob))
    augs.append(T.ResizeShortestEdge(min_size, max_size, sample_style))
    return augs


def _float_box_annotation(anno: dict) -> Optional[dict]:
    """The annotation with a float box, or None if its category or box is invalid or empty.

    Float boxes matter: Detectron2 transforms an integer box array in place, truncating every
    coordinate after each transform.
    """
    try:
        int(anno["category_id"])
        bbox = [float(v) for v in anno["bbox"]]
        if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox):
            return None
        x0, y0, x1, y1 = BoxMode.convert(bbox, anno["bbox_mode"], BoxMode.XYXY_ABS)
    except (KeyError, TypeError, ValueError, AssertionError):
        return None
    if not (x1 > x0 and y1 > y0):
        return None
    anno["bbox"] = bbox
    return anno


class SparseRCNNDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` with Sparse R-CNN's augmentation
    (``build_sparse_rcnn_augmentation``) and a forgiving treatment of annotations.

    Every output dict has "image" (uint8 (C, H, W) in ``image_format``), "height" and "width"
    (the original size, for rescaling the predictions). Training dicts also have "instances"
    (``Instances`` with gt_boxes (XYXY, clipped to the image) and gt_classes), possibly empty:
    annotations with an invalid or degenerate box, crowd annotations and boxes cropped away are
    dropped, and an image left without objects is kept. Inference dicts have no "instances".

    With ``use_instance_mask`` (from a config: ``MODEL.MASK_ON``, for QueryInst) the instances also
    have gt_masks: the annotations' "segmentation" (polygons or COCO RLE) through the same flip,
    resize and crop, as ``PolygonMasks`` or ``BitMasks`` (``INPUT.MASK_FORMAT`` "polygon" or
    "bitmask"; RLE needs "bitmask"). This is Detectron2's ``DatasetMapper`` behaviour, including
    ``recompute_boxes`` (``MODEL.MASK_ON`` and ``INPUT.CROP.ENABLED``): after a crop the boxes are
    the cropped masks' boxes. Cropping polygons needs the ``shapely`` package.
    """

    @configurable
    def __init__(self, is_train: bool, *, augmentations, image_format: str, **kwargs):
        """
        Args:
            is_train: whether to produce "instances".
            augmentations: augmentations or deterministic transforms, applied in order.
            image_format: an image format supported by ``detection_utils.read_image``.
            kwargs: the other arguments of ``DatasetMapper`` (masks, keypoints, proposals).
        """
        super().__init__(is_train, augmentations=augmentations, image_format=image_format, **kwargs)
        # Annotations dropped so far by this mapper (in this process), by reason.
        self.dropped = collections.Counter()
        self.num_mapped = 0
        self.report_after = REPORT_DROPPED_AFTER

    @classmethod
    def from_config(
        cls,
        cfg,
        is_train: bool = True,
        crop_resize_sizes: Optional[Sequence[int]] = None,
        crop_prob: float = 0.5,
    ):
        """
        Args:
            cfg, is_train: as in ``DatasetMapper``.
            crop_resize_sizes: short sides of the resize before the crop. Default:
                ``cfg.INPUT.CROP.RESIZE_SIZES``.
            crop_prob: probability of the resize + crop (official: 0.5).
        """
        ret = super().from_config(cfg, is_train)
        ret["augmentations"] = build_sparse_rcnn_augmentation(
            cfg, is_train, crop_resize_sizes=crop_resize_sizes, crop_prob=crop_prob
        )
        return ret

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        # dataset_dict is the mapper's own deep copy: its annotations can be modified.
        annos = dataset_dict["annotations"]
        valid = [a for a in map(_float_box_annotation, annos) if a is not None]
        dataset_dict["annotations"] = valid
        kept = [a for a in valid if a.get("iscrowd", 0) == 0]
        super()._transform_annotations(dataset_dict, transforms, image_shape)
        # Counted, not logged per sample: the trainer's pre-flight check reports the invalid ones
        # of the whole dataset once (sparse_rcnn.dataset_checks.count_invalid_annotations).
        self.dropped["invalid"] += len(annos) - len(valid)
        self.dropped["crowd"] += len(valid) - len(kept)
        if "instances" in dataset_dict:
            self.dropped["cropped away"] += len(kept) - len(dataset_dict["instances"])
        self.num_mapped += 1
        if self.num_mapped == self.report_after:
            summary = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items()) if n)
            logger.info(
                f"The data mapper dropped {sum(self.dropped.values())} annotations in its first "
                f"{self.num_mapped} training images ({summary or 'none'}); reported once."
            )

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict: one image in Detectron2's dataset format ("file_name", "height",
                "width", "annotations" with "bbox", "bbox_mode", "category_id").

        Returns:
            The model's input dict ("image", "height", "width", and "instances" in training), or,
            in training, None for an image that cannot be read or transformed: Detectron2's
            ``MapDataset`` then draws another sample, so one bad file does not end a run.
        """
        if not self.is_train:
            return super().__call__(dataset_dict)
        if "annotations" not in dataset_dict:
            dataset_dict = {**dataset_dict, "annotations": []}
        try:
            return super().__call__(dataset_dict)
        except (OSError, ValueError) as e:  # unreadable file, wrong recorded size, ...
            logger.warning(f"Skipping training sample {dataset_dict.get('file_name')}: {e}")
            return None
