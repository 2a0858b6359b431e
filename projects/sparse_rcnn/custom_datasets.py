"""Your own COCO-format dataset without a Python file: ``--register-coco NAME JSON IMAGE_ROOT`` on
the command lines of training, the demo and export, and the model's class count taken from the
training set's categories.

    python train_net.py --config-file configs/sparse_rcnn_quick_cpu.yaml \\
        --register-coco trees_train trees/train.json trees/images \\
        --register-coco trees_val trees/val.json trees/images \\
        DATASETS.TRAIN "('trees_train',)" DATASETS.TEST "('trees_val',)" OUTPUT_DIR output/trees

In Python the same is one call per dataset::

    from sparse_rcnn.custom_datasets import num_classes_from_dataset, register_coco
    register_coco("trees_train", "trees/train.json", "trees/images")
    cfg.MODEL.SPARSE_RCNN.NUM_CLASSES = num_classes_from_dataset("trees_train")

:func:`register_coco` is Detectron2's ``register_coco_instances`` (the images are read lazily, the
category ids are mapped to ``0 ... K-1`` in id order, ``COCOEvaluator`` reads the json), with
absolute paths, checked files and a clear error for a name that is taken.
:func:`opts_with_dataset_num_classes` adds the class count of the training set to the command-line
options unless they give it: ``MODEL.SPARSE_RCNN.NUM_CLASSES`` for a yaml config,
``model.num_classes`` for a LazyConfig (``.py``). Other formats: docs/custom_datasets.md.
"""

import argparse
import json
import logging
import os
from typing import List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = [
    "register_coco",
    "add_register_coco_argument",
    "register_from_args",
    "DatasetNotRegisteredError",
    "check_registered",
    "dataset_class_names",
    "num_classes_from_dataset",
    "train_dataset_names",
    "test_dataset_names",
    "config_num_classes",
    "opts_with_dataset_num_classes",
    "first_image",
]

logger = logging.getLogger(__name__)

FLAG = "--register-coco"
YAML_NUM_CLASSES = "MODEL.SPARSE_RCNN.NUM_CLASSES"
LAZY_NUM_CLASSES = "model.num_classes"


def register_coco(name: str, json_file: str, image_root: str) -> str:
    """Register a COCO-format detection dataset as ``name`` (Detectron2's
    ``register_coco_instances``, with the paths made absolute).

    Registering the same name with the same files again does nothing, so a script or notebook can
    run twice.

    Args:
        name: the dataset's name in ``DATASETS.TRAIN`` / ``DATASETS.TEST`` (yaml) or
            ``dataloader.*.dataset.names`` (LazyConfig).
        json_file: a COCO instances json ("images", "annotations", "categories").
        image_root: the folder that the json's ``file_name`` entries are relative to.

    Returns:
        ``name``.

    Raises:
        FileNotFoundError: ``json_file`` or ``image_root`` does not exist.
        ValueError: ``name`` is already registered with other files or without a json (a
            built-in dataset, e.g.).
    """
    json_abs = os.path.abspath(os.path.expanduser(os.fspath(json_file)))
    root_abs = os.path.abspath(os.path.expanduser(os.fspath(image_root)))
    where = f"Cannot register dataset '{name}' ({FLAG} {name} {json_file} {image_root})"
    if not os.path.isfile(json_abs):
        raise FileNotFoundError(
            f"{where}: the COCO json {json_file} does not exist (looked at {json_abs})."
        )
    if not os.path.isdir(root_abs):
        raise FileNotFoundError(
            f"{where}: the image folder {image_root} does not exist (looked at {root_abs}); it is "
            "the folder that the json's file_name entries are relative to."
        )
    if name in DatasetCatalog.list():
        metadata = MetadataCatalog.get(name)
        old = (metadata.get("json_file", None), metadata.get("image_root", None))
        if old == (json_abs, root_abs):
            return name
        registered = (
            f"with json {old[0]} and images {old[1]}"
            if old[0] is not None
            else "(a dataset without a COCO json)"
        )
        raise ValueError(
            f"{where}: the name '{name}' is already registered {registered}. Choose another name "
            f"(e.g. my_{name})."
        )
    register_coco_instances(name, {}, json_abs, root_abs)
    return name


def add_register_coco_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--register-coco NAME JSON IMAGE_ROOT`` (repeatable) to a command's parser."""
    parser.add_argument(
        FLAG,
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset (a COCO instances json and the folder of its images) "
        "as NAME, to use in the config's datasets (e.g. DATASETS.TRAIN \"('NAME',)\"); repeat it "
        "for each dataset. The model's class count is taken from the training set's categories "
        "unless the options give it.",
    )
    return parser


def register_from_args(args: argparse.Namespace) -> List[str]:
    """Register every ``--register-coco`` dataset of parsed arguments; the names, in order."""
    return [register_coco(*triple) for triple in (getattr(args, "register_coco", None) or [])]


class DatasetNotRegisteredError(KeyError):
    """A dataset name that is not in ``DatasetCatalog`` (a KeyError, as Detectron2's), whose
    message says how to register it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def check_registered(name: str, flag: Optional[str] = "--dataset") -> None:
    """Raise :class:`DatasetNotRegisteredError` (naming ``--register-coco``) unless ``name`` is a
    registered dataset; ``flag`` is the option that named it, if any."""
    if name not in DatasetCatalog.list():
        prefix = f"{flag} {name}: n" if flag else "N"
        raise DatasetNotRegisteredError(
            f"{prefix}o dataset '{name}' is registered. For a COCO-format dataset add "
            f"{FLAG} {name} path/to/{name}.json path/to/images (before --opts); the built-in "
            "ones are synthetic_shapes_train and synthetic_shapes_val, and Detectron2's (e.g. "
            "coco_2017_val) read their files under $DETECTRON2_DATASETS."
        )


def _read_categories(name: str, json_file: str) -> List[str]:
    """The category names of a COCO json in id order (the order of ``load_coco_json``'s
    ``thing_classes``)."""
    with open(json_file) as f:
        data = json.load(f)
    categories = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(categories, list) or not categories:
        raise ValueError(
            f"Dataset '{name}': {json_file} has no 'categories' list, so it is not a COCO "
            "instances json. Each category needs an 'id' and a 'name' "
            "(https://cocodataset.org/#format-data)."
        )
    return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]


def dataset_class_names(name: str) -> Optional[List[str]]:
    """The class names of a registered dataset: its metadata's ``thing_classes``, else the
    categories of its COCO json (``json_file`` metadata), which are then stored as its
    ``thing_classes``. None when the dataset is not registered or neither is there. Nothing is
    generated or downloaded."""
    if name not in DatasetCatalog.list():
        return None
    metadata = MetadataCatalog.get(name)
    names = metadata.get("thing_classes", None)
    if names is not None:
        return list(names)
    json_file = metadata.get("json_file", None)
    if json_file is None or not os.path.isfile(json_file):
        return None
    names = _read_categories(name, json_file)
    metadata.thing_classes = names  # what load_coco_json sets when the dataset is loaded
    return names


def num_classes_from_dataset(name: str) -> int:
    """The number of categories of a registered dataset (:func:`dataset_class_names`).

    Raises:
        DatasetNotRegisteredError: (a KeyError) the dataset is not registered.
        ValueError: its metadata has no ``thing_classes`` and no readable COCO json.
    """
    check_registered(name, flag=None)
    names = dataset_class_names(name)
    if names is None:
        raise ValueError(
            f"Dataset '{name}' has no class names: neither thing_classes in its metadata nor a "
            "COCO json (json_file) on this machine. Set MetadataCatalog.get(name).thing_classes "
            "when you register it."
        )
    return len(names)


def _is_lazy(cfg) -> bool:
    from detectron2.config import CfgNode

    return not isinstance(cfg, CfgNode)


def _names(value) -> List[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def train_dataset_names(cfg) -> List[str]:
    """The training sets of a yaml config (``DATASETS.TRAIN``) or a LazyConfig
    (``dataloader.train.dataset.names``)."""
    if not _is_lazy(cfg):
        return list(cfg.DATASETS.TRAIN)
    loader = cfg.get("dataloader", {}).get("train")
    return _names(loader.get("dataset", {}).get("names")) if loader is not None else []


def test_dataset_names(cfg) -> List[str]:
    """The test sets of a yaml config (``DATASETS.TEST``) or a LazyConfig
    (``dataloader.test.dataset.names``)."""
    if not _is_lazy(cfg):
        return list(cfg.DATASETS.TEST)
    loader = cfg.get("dataloader", {}).get("test")
    return _names(loader.get("dataset", {}).get("names")) if loader is not None else []


def config_num_classes(cfg) -> int:
    """The model's class count: ``MODEL.SPARSE_RCNN.NUM_CLASSES`` or ``model.num_classes``."""
    return int(cfg.model.num_classes if _is_lazy(cfg) else cfg.MODEL.SPARSE_RCNN.NUM_CLASSES)


def _load_config(config_file: str, opts: Sequence[str]):
    if str(config_file).endswith(".py"):
        from detectron2.config import LazyConfig

        return LazyConfig.apply_overrides(LazyConfig.load(str(config_file)), list(opts))
    from .config import get_sparse_rcnn_cfg

    return get_sparse_rcnn_cfg(config_file, opts)


def _gives_num_classes(opts: Sequence[str], lazy: bool) -> bool:
    if lazy:
        return any(str(o).split("=", 1)[0].strip() == LAZY_NUM_CLASSES for o in opts)
    return YAML_NUM_CLASSES in [str(key) for key in list(opts)[0::2]]


def opts_with_dataset_num_classes(config_file: str, opts: Sequence[str]) -> List[str]:
    """Command-line options with the model's class count taken from its training set.

    When ``opts`` do not set the class count and the config's training sets (with ``opts``) are
    registered datasets whose categories are known (:func:`dataset_class_names`, e.g. those of
    ``--register-coco``), the count is appended to the options and a warning says so if it differs
    from the config file's. Otherwise (the options give it, a training set is unknown, or the sets
    disagree) ``opts`` come back unchanged and the datasets are checked against the model before
    training (``sparse_rcnn.dataset_checks``).

    Args:
        config_file: a yaml config (options ``KEY VALUE``) or a LazyConfig ``.py`` (``key=value``).
        opts: the command-line options.

    Returns:
        A new list: ``opts``, plus ``MODEL.SPARSE_RCNN.NUM_CLASSES N`` (yaml) or
        ``model.num_classes=N`` (LazyConfig) when taken from the dataset.
    """
    opts = list(opts)
    lazy = str(config_file).endswith(".py")
    if _gives_num_classes(opts, lazy):
        return opts
    cfg = _load_config(config_file, opts)
    names = train_dataset_names(cfg)
    classes = [dataset_class_names(name) for name in names]
    if not names or any(c is None for c in classes):
        return opts
    if any(len(c) != len(classes[0]) for c in classes):
        logger.warning(
            "The training sets "
            + ", ".join(f"{n} ({len(c)} classes)" for n, c in zip(names, classes))
            + " differ in their class counts: the class count stays the config's."
        )
        return opts
    count, key = len(classes[0]), LAZY_NUM_CLASSES if lazy else YAML_NUM_CLASSES
    configured = config_num_classes(cfg)
    if count == configured:
        return opts
    shown = ", ".join(classes[0][:5]) + (", ..." if count > 5 else "")
    logger.warning(
        f"{key} {count} taken from dataset {names[0]} ({shown}); the config file says "
        f"{configured}. Give {key} on the command line to set it yourself."
    )
    return opts + ([f"{key}={count}"] if lazy else [key, str(count)])


def first_image(names: Sequence[str]) -> Optional[str]:
    """The path of the first image of the first of the registered COCO datasets ``names`` whose
    json lists one (read from the json; nothing is generated), or None."""
    for name in names:
        metadata = MetadataCatalog.get(name)
        json_file, image_root = metadata.get("json_file", None), metadata.get("image_root", None)
        if json_file is None or image_root is None or not os.path.isfile(json_file):
            continue
        with open(json_file) as f:
            images = json.load(f).get("images") or []
        if images:
            return os.path.join(image_root, images[0]["file_name"])
    return None
