"""Checks of the datasets against the model before a run: category ids and ``thing_classes`` that
do not fit NUM_CLASSES, annotations the data mapper will drop (counted once), and a missing
dataset explained (where Detectron2 looks and how to point it elsewhere)."""

import logging
import math
import os
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Union

logger = logging.getLogger(__name__)


def _dataset_hint(names: Sequence[str]) -> str:
    root = os.environ.get("DETECTRON2_DATASETS")
    where = (
        f"DETECTRON2_DATASETS={root}"
        if root
        else f"DETECTRON2_DATASETS is not set, so Detectron2 looks in ./datasets (here: "
        f"{os.path.abspath('datasets')})"
    )
    return (
        f"Cannot load dataset(s) {', '.join(names)}: {where}. Set DETECTRON2_DATASETS to the "
        "folder that holds them, in Detectron2's layout, e.g. for COCO:\n"
        "  $DETECTRON2_DATASETS/coco/annotations/instances_{train,val}2017.json\n"
        "  $DETECTRON2_DATASETS/coco/{train,val}2017/*.jpg\n"
        "(https://detectron2.readthedocs.io/en/latest/tutorials/builtin_datasets.html), or train "
        "on the built-in data: DATASETS.TRAIN \"('synthetic_shapes_train',)\" DATASETS.TEST "
        "\"('synthetic_shapes_val',)\"."
    )


def load_dataset_dicts(names: Union[str, Sequence[str]], **kwargs) -> List[Dict]:
    """``detectron2.data.get_detection_dataset_dicts(names, **kwargs)`` with the built-in
    (synthetic) datasets among ``names`` generated first; a dataset whose files are missing raises
    a FileNotFoundError naming ``DETECTRON2_DATASETS`` and the expected layout. The ``dataset`` of
    the LazyConfig loaders (``configs/common/data/coco.py``)."""
    from detectron2.data import get_detection_dataset_dicts

    from .builtin_datasets import prepare_builtin_dataset

    names = dataset_names(names)
    for name in names:
        prepare_builtin_dataset(name)
    try:
        return get_detection_dataset_dicts(names, **kwargs)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{_dataset_hint(names)}\n(original error: {e})") from e


def dataset_names(names: Union[str, Sequence[str]]) -> List[str]:
    """A dataset name or a sequence of them (as a LazyConfig gives them) as a list."""
    return [names] if isinstance(names, str) else [str(n) for n in names]


def check_dataset_classes(
    dataset_name: str,
    dataset_dicts: Optional[Iterable[Dict]],
    num_classes: int,
    key: str = "MODEL.SPARSE_RCNN.NUM_CLASSES",
) -> None:
    """Stop when a dataset does not fit a model with ``num_classes`` classes.

    Args:
        dataset_name: a registered dataset (its metadata's ``thing_classes`` is checked, if set).
        dataset_dicts: its records (Detectron2's format, category ids already mapped to
            contiguous ids), or None to check the metadata only.
        num_classes: the model's number of classes.
        key: the config key to name in the message.

    Raises:
        ValueError: naming the dataset, the offending id or class list, and ``key``.
    """
    from detectron2.data import MetadataCatalog

    thing_classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)
    if thing_classes is not None and len(thing_classes) != num_classes:
        raise ValueError(
            f"Dataset '{dataset_name}' has {len(thing_classes)} classes (thing_classes "
            f"{list(thing_classes)[:10]}{'...' if len(thing_classes) > 10 else ''}) but the model "
            f"has {key} {num_classes}: set {key} {len(thing_classes)}."
        )
    for record in dataset_dicts or ():
        for anno in record.get("annotations", ()):
            category = anno.get("category_id")
            if not isinstance(category, int) or not 0 <= category < num_classes:
                raise ValueError(
                    f"Dataset '{dataset_name}': image {record.get('file_name')} has an annotation "
                    f"with category_id {category!r}, outside [0, {num_classes}) = the classes of "
                    f"{key} {num_classes} (after Detectron2's id mapping, ids must be contiguous "
                    f"from 0). Set {key} to the number of classes, or map the dataset's ids to "
                    "0 ... K-1 (thing_dataset_id_to_contiguous_id)."
                )


def _invalid_box_reason(anno: Dict) -> Optional[str]:
    from detectron2.structures import BoxMode

    try:
        bbox = [float(v) for v in anno["bbox"]]
        if len(bbox) != 4:
            return "malformed"
        if not all(math.isfinite(v) for v in bbox):
            return "non-finite"
        x0, y0, x1, y1 = BoxMode.convert(bbox, anno["bbox_mode"], BoxMode.XYXY_ABS)
    except (KeyError, TypeError, ValueError, AssertionError):
        return "malformed"
    return None if (x1 > x0 and y1 > y0) else "degenerate"


def count_invalid_annotations(dataset_name: str, dataset_dicts: Iterable[Dict]) -> Counter:
    """Count the annotations the data mapper always drops (malformed, non-finite or degenerate
    boxes, crowd regions) and log one line for the dataset, not one per sample.

    Returns:
        A Counter reason -> count (empty if every annotation is used).
    """
    counts, total, example = Counter(), 0, None
    for record in dataset_dicts:
        for anno in record.get("annotations", ()):
            total += 1
            reason = "crowd" if anno.get("iscrowd", 0) else _invalid_box_reason(anno)
            if reason is not None:
                counts[reason] += 1
                if example is None and reason != "crowd":
                    example = (record.get("file_name"), anno.get("bbox"))
    if counts:
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        where = f"; e.g. {example[0]} bbox {example[1]}" if example else ""
        logger.warning(
            f"Dataset '{dataset_name}': {sum(counts.values())} of {total} annotations are not "
            f"trained on ({parts}){where}. The data mapper drops them; boxes cropped away by the "
            "random crop are dropped too (normal)."
        )
    return counts
