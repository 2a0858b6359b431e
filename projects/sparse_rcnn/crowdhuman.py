"""The CrowdHuman dataset (Shao et al. 2018) as Detectron2 datasets ``crowdhuman_train`` and
``crowdhuman_val`` (Sparse R-CNN paper, appendix A).

Layout, as the release unpacks, under Detectron2's datasets root (``$DETECTRON2_DATASETS``,
default ``./datasets``)::

    crowdhuman/
      annotation_train.odgt        # one JSON record per line (the release's annotation files)
      annotation_val.odgt
      Images/                      # CrowdHuman_train0{1,2,3}.zip and CrowdHuman_val.zip all
                                   #   unpack into Images/ ({ID}.jpg)
    or, with the train and val images kept apart (the official Sparse R-CNN converter's layout):
      CrowdHuman_train/            # {ID}.jpg of the training images
      CrowdHuman_val/              # {ID}.jpg of the validation images

For each split the first of ``CrowdHuman_{split}/``, ``Images/`` that holds the split's first
image is used.

Annotations: each record is ``{"ID": str, "gtboxes": [gtbox, ...]}``; each gtbox has ``tag``
("person" or "mask"), ``fbox``/``vbox``/``hbox`` as [x, y, w, h] and optional ``extra``
(``ignore``: 0/1) and ``head_attr``. The full-body box ``fbox`` is the object's box (train and
evaluation, as the official converter and evaluation do); a gtbox whose tag is not "person" or
whose ``extra.ignore`` is not 0 is an ignore region (``iscrowd: 1``): Detectron2's mapper drops it
from the training targets, and :class:`~sparse_rcnn.crowdhuman_evaluation.CrowdHumanEvaluator`
counts detections inside it as neither true nor false positives. Boxes are kept as annotated,
also where the full body reaches outside the image (the mapper clips training boxes, the
evaluator clips boxes as the official evaluation does); ``vbox`` and ``hbox`` are kept in each
annotation as they are.

Image sizes: the odgt files have none, so the loader reads each image's header when a split is
first loaded (as the official converter does with PIL), applying the EXIF orientation as
Detectron2's ``read_image`` does, so that the mapper's size check holds. The sizes are cached per
process. Registration itself (at ``import sparse_rcnn``) touches no file.
"""

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

__all__ = [
    "CROWDHUMAN_CLASSES",
    "CROWDHUMAN_SPLITS",
    "crowdhuman_root",
    "read_odgt",
    "load_crowdhuman_odgt",
    "register_crowdhuman",
    "register_all_crowdhuman",
]

logger = logging.getLogger(__name__)

CROWDHUMAN_CLASSES = ("person",)
# Registered name -> (annotation file, split) under {DETECTRON2_DATASETS}/crowdhuman.
CROWDHUMAN_SPLITS = {
    "crowdhuman_train": ("annotation_train.odgt", "train"),
    "crowdhuman_val": ("annotation_val.odgt", "val"),
}
LAYOUT = (
    "{root}/crowdhuman/annotation_train.odgt, annotation_val.odgt and the images as "
    "{root}/crowdhuman/Images/{{ID}}.jpg (the release's zips unpack there) or "
    "{root}/crowdhuman/CrowdHuman_train/{{ID}}.jpg and CrowdHuman_val/{{ID}}.jpg"
)
_EXIF_ORIENTATION = 0x0112  # orientations 5-8 swap width and height
_SIZE_CACHE: Dict[str, Tuple[int, int]] = {}


def crowdhuman_root(datasets_root: Optional[str] = None) -> Path:
    """``{datasets_root}/crowdhuman``, with Detectron2's default root ``$DETECTRON2_DATASETS``
    (else ``datasets`` in the working directory)."""
    if datasets_root is None:
        datasets_root = os.getenv("DETECTRON2_DATASETS", "datasets")
    return Path(datasets_root).expanduser() / "crowdhuman"


def _missing_dataset_message(what: str, path: Path) -> str:
    root = os.getenv("DETECTRON2_DATASETS")
    where = f"DETECTRON2_DATASETS={root!r}" if root else "DETECTRON2_DATASETS not set: ./datasets"
    return (
        f"CrowdHuman {what} {str(path)!r} not found ({where}). Expected layout: "
        + LAYOUT.format(root="$DETECTRON2_DATASETS")
        + ". Set DETECTRON2_DATASETS to the folder that holds crowdhuman/."
    )


def read_odgt(path) -> Iterator[Tuple[int, dict]]:
    """The records of an odgt file (one JSON object per line; blank lines are skipped).

    Yields:
        (line number starting at 1, record dict).

    Raises:
        ValueError: naming the file and line, for a line that is not a JSON object.
    """
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); an odgt "
                    "file has one JSON record per line"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            yield lineno, record


def _box(gtbox: dict, key: str, where: str) -> List[float]:
    box = gtbox.get(key)
    if (
        not isinstance(box, (list, tuple))
        or len(box) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ):
        raise ValueError(f"{where}: '{key}' must be [x, y, w, h] (4 numbers), got {box!r}")
    return [float(v) for v in box]


def _is_ignore(gtbox: dict) -> bool:
    """Official rule: a tag other than "person", or ``extra.ignore`` != 0, is an ignore region."""
    extra = gtbox.get("extra") or {}
    return gtbox.get("tag") != "person" or extra.get("ignore", 0) != 0


def _parse_record(record: dict, where: str) -> Tuple[str, List[dict]]:
    image_id = record.get("ID")
    if not isinstance(image_id, str) or not image_id:
        raise ValueError(f"{where}: missing or empty 'ID' (the image file name without .jpg)")
    gtboxes = record.get("gtboxes", [])
    if not isinstance(gtboxes, list):
        raise ValueError(f"{where}: 'gtboxes' must be a list, got {type(gtboxes).__name__}")
    annotations = []
    for index, gtbox in enumerate(gtboxes):
        at = f"{where}, gtboxes[{index}]"
        if not isinstance(gtbox, dict) or "tag" not in gtbox:
            raise ValueError(f"{at}: expected an object with 'tag' and 'fbox', got {gtbox!r}")
        extra = gtbox.get("extra") or {}
        if not isinstance(extra, dict):
            raise ValueError(f"{at}: 'extra' must be an object, got {extra!r}")
        anno = {
            "bbox": _box(gtbox, "fbox", at),
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 0,
            "iscrowd": int(_is_ignore(gtbox)),
        }
        for key in ("vbox", "hbox"):  # not used here: kept where well-formed, else left out
            try:
                anno[key] = _box(gtbox, key, at)
            except ValueError:
                pass
        annotations.append(anno)
    return image_id, annotations


def _image_size(path: Path) -> Tuple[int, int]:
    """(height, width) after the EXIF orientation, from the file's header only."""
    key = str(path)
    if key not in _SIZE_CACHE:
        from PIL import Image

        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
        _SIZE_CACHE[key] = (height, width)
    return _SIZE_CACHE[key]


def _resolve_image_root(image_roots: List[Path], first_id: Optional[str]) -> Path:
    existing = [root for root in image_roots if root.is_dir()]
    for root in existing:
        if first_id is None or (root / f"{first_id}.jpg").is_file():
            return root
    tried = ", ".join(str(r) for r in image_roots)
    image = f" holding {first_id}.jpg" if first_id else ""
    raise FileNotFoundError(
        _missing_dataset_message(f"image folder{image} (tried {tried})", image_roots[0])
    )


def load_crowdhuman_odgt(odgt_file, image_roots) -> List[dict]:
    """CrowdHuman annotations in Detectron2's dataset format.

    Args:
        odgt_file: an odgt annotation file (``annotation_{train,val}.odgt``).
        image_roots: a folder, or folders tried in order (the first that holds the first
            record's image is used), with the images as ``{ID}.jpg``.

    Returns:
        One dict per record, in file order: "file_name", "image_id" (the record's ID, a str),
        "height", "width" and "annotations", each with "bbox" (the full-body box ``fbox``,
        XYWH_ABS, as annotated: it may reach outside the image), "bbox_mode", "category_id" (0,
        person), "iscrowd" (1 for an ignore region: tag "mask" or ``extra.ignore`` 1) and, where
        well-formed, the visible and head boxes "vbox", "hbox" (XYWH; not used for training or
        evaluation).

    Raises:
        FileNotFoundError: the annotation file, the image folder or an image is missing (the
            message names DETECTRON2_DATASETS and the expected layout).
        ValueError: a malformed line or box (the message names the file and line).
    """
    odgt_file = Path(odgt_file)
    if isinstance(image_roots, (str, os.PathLike)):
        image_roots = [image_roots]
    image_roots = [Path(r) for r in image_roots]
    if not odgt_file.is_file():
        raise FileNotFoundError(_missing_dataset_message("annotation file", odgt_file))
    start = time.perf_counter()
    parsed, first_line = [], {}
    for lineno, record in read_odgt(odgt_file):
        image_id, annotations = _parse_record(record, f"{odgt_file}:{lineno}")
        if image_id in first_line:
            raise ValueError(
                f"{odgt_file}:{lineno}: image ID {image_id!r} already annotated on line "
                f"{first_line[image_id]}"
            )
        first_line[image_id] = lineno
        parsed.append((image_id, annotations))
    image_root = _resolve_image_root(image_roots, parsed[0][0] if parsed else None)
    dataset_dicts = []
    for image_id, annotations in parsed:
        file_name = image_root / f"{image_id}.jpg"
        if not file_name.is_file():
            raise FileNotFoundError(
                _missing_dataset_message(f"image of record {image_id!r}", file_name)
            )
        height, width = _image_size(file_name)
        dataset_dicts.append(
            {
                "file_name": str(file_name),
                "image_id": image_id,
                "height": height,
                "width": width,
                "annotations": annotations,
            }
        )
    logger.info(
        f"Loaded {len(dataset_dicts)} images, "
        f"{sum(len(d['annotations']) for d in dataset_dicts)} boxes from {odgt_file} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return dataset_dicts


def register_crowdhuman(name: str, odgt_file, image_roots) -> None:
    """Register a CrowdHuman-format dataset (lazily: no file is read until it is loaded).

    Args:
        name: the dataset name.
        odgt_file, image_roots: as in :func:`load_crowdhuman_odgt`.

    Metadata: thing_classes ["person"] and evaluator_type "crowdhuman" (Sparse R-CNN's
    ``build_sparse_rcnn_evaluator`` then chooses :class:`CrowdHumanEvaluator`).
    """
    if isinstance(image_roots, (str, os.PathLike)):
        image_roots = [image_roots]
    image_roots = [str(r) for r in image_roots]
    _register(name, lambda: load_crowdhuman_odgt(odgt_file, image_roots))


def _register(name: str, loader) -> None:
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(
        thing_classes=list(CROWDHUMAN_CLASSES), evaluator_type="crowdhuman"
    )


def _load_split(datasets_root: Optional[str], odgt: str, split: str) -> List[dict]:
    root = crowdhuman_root(datasets_root)  # resolved when loaded, so a later env change counts
    return load_crowdhuman_odgt(root / odgt, [root / f"CrowdHuman_{split}", root / "Images"])


def register_all_crowdhuman(datasets_root: Optional[str] = None) -> List[str]:
    """Register ``crowdhuman_train`` and ``crowdhuman_val``: the layout of the module docstring
    under ``{datasets_root}/crowdhuman``, by default ``$DETECTRON2_DATASETS/crowdhuman`` (else
    ``./datasets/crowdhuman``) as it is when a split is loaded. Names already in the catalog are
    left as they are. Returns the names registered now."""
    names = []
    for name, (odgt, split) in CROWDHUMAN_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        _register(name, functools.partial(_load_split, datasets_root, odgt, split))
        names.append(name)
    return names
