"""Registration and caching of the built-in ``synthetic_shapes`` datasets (the images are drawn
by ``sparse_rcnn.synthetic_shapes``).

The splits are written in COCO json format under ``{root}/synthetic_shapes/``::

    {split}.json                 # COCO instances json ("info" records the generator's parameters)
    {split}_{fingerprint}/       # the images, 000001.png ...

with ``{root}`` = ``$SPARSE_RCNN_DATASETS`` if set, else Detectron2's dataset root
``$DETECTRON2_DATASETS`` (default ``datasets`` in the working directory, as for Detectron2's own
builtin datasets), made absolute when the datasets are registered (``default_cache_dir``). It never
depends on where the package is installed, so an installed package writes nothing into
site-packages. Generation is deterministic given the seed, atomic (a temporary folder is renamed
into place and the json, written last, marks a finished split, so processes racing to generate
the same split cannot corrupt it), and fast (about 2000 128x128 images per 10 s).

Registration (``register_synthetic_shapes``, run when ``sparse_rcnn`` is imported) is lazy: the
files are generated the first time ``DatasetCatalog.get("synthetic_shapes_{train,val}")`` loads a
split. ``COCOEvaluator`` reads the ``json_file`` of the metadata directly, so a process that
evaluates without loading the dataset first must call ``prepare_synthetic_shapes(names)``
(harmless for names that are not synthetic, and a no-op once the files exist).
"""

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .synthetic_shapes import (
    DEFAULT_EMPTY_PROB,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_OBJECTS,
    DEFAULT_SEED,
    SYNTHETIC_SHAPES_CLASSES,
    ImageSize,
    generate_sample,
    generate_split,
    split_params,
)

__all__ = [
    "SYNTHETIC_SHAPES_CLASSES",
    "default_cache_dir",
    "generate_sample",
    "generate_split",
    "ensure_generated",
    "synthetic_shapes_paths",
    "register_synthetic_shapes",
    "prepare_synthetic_shapes",
    "prepare_builtin_dataset",
]

logger = logging.getLogger(__name__)

_DATASET_DIR = "synthetic_shapes"
# Split -> number of images of the registered datasets synthetic_shapes_{split}.
DEFAULT_SPLITS = {"train": 2000, "val": 200}
# Name -> keyword arguments of ensure_generated, for every dataset registered by this module.
_REGISTERED: Dict[str, Dict] = {}


def default_cache_dir() -> Path:
    """The absolute folder above ``synthetic_shapes/``: ``$SPARSE_RCNN_DATASETS`` if set, else
    ``$DETECTRON2_DATASETS``, else ``./datasets`` (Detectron2's default dataset root)."""
    root = os.environ.get("SPARSE_RCNN_DATASETS") or os.environ.get(
        "DETECTRON2_DATASETS", "datasets"
    )
    return Path(os.path.abspath(os.path.expanduser(root)))


def _locate(
    split, root=None, num_images=None, image_size=DEFAULT_IMAGE_SIZE, seed=DEFAULT_SEED,
    max_objects=DEFAULT_MAX_OBJECTS, empty_prob=DEFAULT_EMPTY_PROB,
) -> Tuple[Dict, str, str]:  # fmt: skip
    """``(params, json_file, image_root)`` of a split; arguments as in ``ensure_generated``."""
    root = Path(root) if root is not None else default_cache_dir()
    num_images = DEFAULT_SPLITS.get(split, 0) if num_images is None else num_images
    params = split_params(split, num_images, image_size, seed, max_objects, empty_prob)
    dataset_dir = root / _DATASET_DIR
    return params, str(dataset_dir / f"{split}.json"), str(dataset_dir / _image_dir_name(params))


def _image_dir_name(params: Dict) -> str:
    """``{split}_{fingerprint}``: the image folder of the split with these parameters."""
    fingerprint = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return f"{params['split']}_{fingerprint}"


def synthetic_shapes_paths(split: str, **kwargs) -> Tuple[str, str]:
    """``(json_file, image_root)`` of a split (keyword arguments as in ``ensure_generated``);
    no I/O."""
    return _locate(split, **kwargs)[1:]


def _read_params(json_file: str) -> Optional[Dict]:
    try:
        with open(json_file) as f:
            return json.load(f).get("info", {}).get("params")
    except (OSError, ValueError):
        return None


def ensure_generated(
    split: str,
    *,
    root: Optional[Union[str, Path]] = None,
    num_images: Optional[int] = None,
    image_size: ImageSize = DEFAULT_IMAGE_SIZE,
    seed: int = DEFAULT_SEED,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    empty_prob: float = DEFAULT_EMPTY_PROB,
) -> Tuple[str, str]:
    """Generate a split unless its files already exist with these parameters.

    Args:
        split: e.g. "train" or "val" (also a seed component: splits differ).
        root: the folder above ``synthetic_shapes/``; default ``default_cache_dir()``.
        num_images: default ``DEFAULT_SPLITS[split]`` (2000 train, 200 val).
        image_size: S or (H, W) of every image.
        seed: base seed.
        max_objects, empty_prob: see ``synthetic_shapes.generate_sample``.

    Returns:
        ``(json_file, image_root)``.
    """
    params, json_file, image_root = _locate(
        split, root, num_images, image_size, seed, max_objects, empty_prob
    )
    old_params = _read_params(json_file)
    if old_params == params and os.path.isdir(image_root):
        return json_file, image_root

    dataset_dir = Path(json_file).parent
    dataset_dir.mkdir(parents=True, exist_ok=True)
    logger.info(
        f"Generating {params['num_images']} synthetic_shapes images of split '{split}' in "
        f"{dataset_dir}"
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{split}-", dir=dataset_dir))
    try:
        coco = generate_split(
            tmp / "images", split, params["num_images"], image_size, seed, max_objects, empty_prob
        )
        with open(tmp / "data.json", "w") as f:
            json.dump(coco, f)
        # The image folder's name encodes the parameters: if it exists, a process racing with this
        # one placed identical files. The json is replaced last, atomically: a json with matching
        # parameters always has its images in place.
        try:
            os.rename(tmp / "images", image_root)
        except OSError:
            if not os.path.isdir(image_root):
                raise
        os.replace(tmp / "data.json", json_file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(old_params, dict) and old_params.get("split") == split:
        # The previous split's images (other parameters or an older generator) are no longer
        # referenced by the json.
        old_root = str(dataset_dir / _image_dir_name(old_params))
        if old_root != image_root:
            shutil.rmtree(old_root, ignore_errors=True)
    return json_file, image_root


def _load_synthetic_shapes(name: str, spec: Dict) -> List[Dict]:
    json_file, image_root = ensure_generated(**spec)
    return load_coco_json(json_file, image_root, name)


def register_synthetic_shapes(
    root: Optional[Union[str, Path]] = None,
    *,
    splits: Optional[Dict[str, int]] = None,
    image_size: ImageSize = DEFAULT_IMAGE_SIZE,
    seed: int = DEFAULT_SEED,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    empty_prob: float = DEFAULT_EMPTY_PROB,
    prefix: str = "synthetic_shapes",
) -> List[str]:
    """Register ``{prefix}_{split}`` for every split, lazily: nothing is generated here.

    The files are generated the first time a split is loaded (``DatasetCatalog.get``) or
    ``prepare_synthetic_shapes`` is called. Names that are already registered are left alone.

    Args:
        root: the folder above ``synthetic_shapes/``; default ``default_cache_dir()``, read now.
        splits: split name -> number of images; default ``DEFAULT_SPLITS`` (train 2000, val 200).
        image_size, seed, max_objects, empty_prob: see ``ensure_generated``.
        prefix: dataset names are ``{prefix}_{split}``.

    Returns:
        The names registered by this call.
    """
    root = Path(root).absolute() if root is not None else default_cache_dir()
    splits = DEFAULT_SPLITS if splits is None else splits
    registered = []
    for split, num_images in splits.items():
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            continue
        spec = dict(
            split=split,
            root=root,
            num_images=num_images,
            image_size=image_size,
            seed=seed,
            max_objects=max_objects,
            empty_prob=empty_prob,
        )
        json_file, image_root = synthetic_shapes_paths(**spec)
        DatasetCatalog.register(name, functools.partial(_load_synthetic_shapes, name, spec))
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=list(SYNTHETIC_SHAPES_CLASSES),
            thing_dataset_id_to_contiguous_id={
                i + 1: i for i in range(len(SYNTHETIC_SHAPES_CLASSES))
            },
        )
        _REGISTERED[name] = spec
        registered.append(name)
    return registered


def prepare_synthetic_shapes(dataset_names: Optional[Iterable[str]] = None) -> List[str]:
    """Generate the files of registered synthetic_shapes datasets if they do not exist yet.

    Call it before building a ``COCOEvaluator`` in a process that may not have loaded the
    dataset: the evaluator reads ``MetadataCatalog.get(name).json_file`` directly.

    Args:
        dataset_names: e.g. ``cfg.DATASETS.TRAIN + cfg.DATASETS.TEST``; names not registered by
            ``register_synthetic_shapes`` are ignored. Default: all of them.

    Returns:
        The names that are now ready on disk.
    """
    names = list(_REGISTERED) if dataset_names is None else list(dataset_names)
    ready = []
    for name in names:
        spec = _REGISTERED.get(name)
        # A name removed from the catalog (or re-registered by someone else) is not ours.
        if spec is None or name not in DatasetCatalog.list():
            continue
        ensure_generated(**spec)
        ready.append(name)
    return ready


def prepare_builtin_dataset(dataset_name: str) -> bool:
    """Generate the files of one built-in (synthetic) dataset if needed; False for other names.

    Same as ``prepare_synthetic_shapes([dataset_name])``, for callers that handle one dataset.
    """
    return bool(prepare_synthetic_shapes([dataset_name]))
