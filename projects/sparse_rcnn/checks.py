"""Pre-flight checks: problems a run would otherwise meet late, or never report, stopped or warned
about before the first iteration, each with a message that names the problem and the fix.

- :func:`check_device`: a config that asks for CUDA on a machine without it.
- :func:`check_amp_device`: AMP training asked for without CUDA.
- :func:`check_learning_rate`: an LR on the Faster R-CNN scale instead of the paper's.
- :func:`check_dataset_classes`: category ids or ``thing_classes`` that do not fit NUM_CLASSES.
- :func:`count_invalid_annotations`: annotations the data mapper will drop, counted once.
- :func:`load_dataset_dicts`: Detectron2's dataset loading, with a missing dataset explained.
- :func:`explain_checkpoint_errors`: a corrupt or truncated checkpoint reported with its path.
- :func:`validate_batched_inputs`: the model's input list, checked with the input named.
- :func:`cpu_threads_per_process`: each of N CPU processes gets its share of the cores.
"""

import contextlib
import logging
import math
import os
import pickle
import zipfile
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

# The paper's LR (section 4: AdamW, 2.5e-5) for 16 images per batch. Other batch sizes scale it
# linearly, as Detectron2's linear scaling rule does.
PAPER_BASE_LR = 2.5e-5
PAPER_IMS_PER_BATCH = 16
# An LR more than this many times the paper's (scaled to IMS_PER_BATCH) is warned about. The
# Faster R-CNN habit (SGD, 0.02 for 16 images) is 800x the paper's value; the configs of this
# project go up to 96x (sparse_rcnn_quick_cpu.yaml: 6e-4 for 4 images, trained from scratch, which
# needs a larger LR than fine-tuning an ImageNet backbone). 200x lies between the two; every config
# in configs/ stays below it (tests/test_robustness.py checks both sides).
LR_WARNING_FACTOR = 200.0


def paper_lr(ims_per_batch: int) -> float:
    """The paper's AdamW LR scaled linearly to ``ims_per_batch`` images per batch."""
    return PAPER_BASE_LR * ims_per_batch / PAPER_IMS_PER_BATCH


# ------------------------------------------------------------------------------------------------
# Device
# ------------------------------------------------------------------------------------------------
def check_device(cfg, command: str = "train_net.py") -> None:
    """Stop when ``cfg.MODEL.DEVICE`` asks for CUDA and no CUDA device is available.

    Configs that say ``MODEL.DEVICE cpu`` are not affected. There is no silent switch to the CPU:
    a COCO config would then start a 270k-iteration run on the CPU.

    Args:
        cfg: a config with ``MODEL.DEVICE``.
        command: how the user adds options ("train_net.py" or "demo.py") for the message.

    Raises:
        RuntimeError: naming the device and how to run on the CPU.
    """
    how = "--opts MODEL.DEVICE cpu" if command == "demo.py" else "MODEL.DEVICE cpu"
    check_cuda_available(
        str(cfg.MODEL.DEVICE),
        key="MODEL.DEVICE",
        fix=f"add `{how}` to the {command} command line",
        advice=f"This config trains {cfg.SOLVER.MAX_ITER} iterations of "
        f"{cfg.SOLVER.IMS_PER_BATCH} images: on a CPU, configs/sparse_rcnn_quick_cpu.yaml (built-in "
        "data, about 10 minutes) is the one to try.",
    )


def check_cuda_available(device: str, *, key: str, fix: str, advice: str) -> None:
    """Raise a RuntimeError naming ``key`` = ``device``, ``fix`` and ``advice`` when ``device``
    asks for CUDA and none is available (the yaml path's :func:`check_device`, and LazyConfig
    training's ``train.device``)."""
    if not device.startswith("cuda") or torch.cuda.is_available():
        return
    raise RuntimeError(
        f"{key} is {device!r} but no CUDA device is available (torch {torch.__version__}, built "
        f"with CUDA {torch.version.cuda}). To run on the CPU, {fix}. {advice}"
    )


def check_amp_device(device: str, amp_enabled: bool, *, amp_key: str, device_key: str, fix: str):
    """Raise a ValueError when AMP training is asked for on a device other than CUDA: Detectron2's
    AMPTrainer autocasts with CUDA only (and bf16 autocast on a CPU makes a training step of this
    model slower, README "The main job"). ``fix``: the option that turns AMP off."""
    if amp_enabled and not device.startswith("cuda"):
        raise ValueError(
            f"{amp_key} needs a CUDA device (Detectron2's AMPTrainer trains with CUDA autocast "
            f"only), but {device_key} is {device!r}: set {fix}"
        )


# ------------------------------------------------------------------------------------------------
# Learning rate
# ------------------------------------------------------------------------------------------------
def check_learning_rate(cfg) -> Optional[str]:
    """Warn about an AdamW LR far above the paper's (scaled to ``SOLVER.IMS_PER_BATCH``).

    The most reported failure of the official code: NaN boxes, or a run that learns nothing, with
    an LR set the Faster R-CNN way. SGD (``SOLVER.OPTIMIZER SGD``) is not checked: the paper gives
    no SGD LR.

    Returns:
        The warning (also logged), or None.
    """
    if str(cfg.SOLVER.OPTIMIZER).upper() != "ADAMW":
        return None
    lr, ims = float(cfg.SOLVER.BASE_LR), int(cfg.SOLVER.IMS_PER_BATCH)
    reference = paper_lr(ims)
    if lr <= LR_WARNING_FACTOR * reference:
        return None
    message = (
        f"SOLVER.BASE_LR {lr:g} is {lr / reference:.0f}x the paper's AdamW LR for "
        f"SOLVER.IMS_PER_BATCH {ims} ({PAPER_BASE_LR:g} x {ims}/{PAPER_IMS_PER_BATCH} = "
        f"{reference:.3g}). An LR on the Faster R-CNN scale makes Sparse R-CNN produce NaN boxes "
        f"or learn nothing; set SOLVER.BASE_LR {reference:.3g} (a model trained from scratch may "
        f"need up to ~100x that)."
    )
    logger.warning(message)
    return message


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------
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


def load_dataset_dicts(names: Sequence[str], **kwargs) -> List[Dict]:
    """``detectron2.data.get_detection_dataset_dicts(names, **kwargs)``; a dataset whose files are
    missing raises a FileNotFoundError naming ``DETECTRON2_DATASETS`` and the expected layout."""
    from detectron2.data import get_detection_dataset_dicts

    try:
        return get_detection_dataset_dicts(list(names), **kwargs)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{_dataset_hint(names)}\n(original error: {e})") from e


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


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, not a checkpoint)."""


@contextlib.contextmanager
def explain_checkpoint_errors(path: str):
    """Re-raise the errors of reading a corrupt or truncated checkpoint as
    :class:`CorruptCheckpointError` naming ``path`` and what to do."""
    try:
        yield
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError) as e:
        if isinstance(e, CorruptCheckpointError):
            raise
        text = str(e)
        readable = isinstance(e, RuntimeError) and not any(
            s in text for s in ("PytorchStreamReader", "zip archive", "central directory", "EOF")
        )
        if readable:
            raise
        size = os.path.getsize(path) if path and os.path.isfile(path) else "?"
        raise CorruptCheckpointError(
            f"Checkpoint {path} ({size} bytes) is corrupt or truncated ({type(e).__name__}: {e}). "
            "A run killed while saving leaves such a file: delete it and resume from an earlier "
            "checkpoint (name it in the folder's last_checkpoint file) or set MODEL.WEIGHTS to a "
            "complete one."
        ) from e


def check_weights_file(path: str) -> None:
    """A local MODEL.WEIGHTS path that does not exist raises FileNotFoundError naming it (rather
    than fvcore's bare ``assert os.path.isfile``). URLs and catalog paths are left alone."""
    if not path or "://" in path:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"MODEL.WEIGHTS {path} does not exist (working directory {os.getcwd()}): give the "
            "path of a checkpoint (e.g. output/demo_cpu/model_final.pth), or '' for an "
            "untrained model."
        )


# ------------------------------------------------------------------------------------------------
# Model inputs
# ------------------------------------------------------------------------------------------------
def validate_batched_inputs(batched_inputs, training: bool) -> None:
    """Check the model's input: a list with one dict per image, each with an "image" tensor
    (and "instances" in training). Raises TypeError/ValueError naming the input."""
    if not isinstance(batched_inputs, (list, tuple)):
        raise TypeError(
            "SparseRCNN expects a list of dicts, one per image (each with 'image': a (C, H, W) "
            f"tensor), got {type(batched_inputs).__name__}"
        )
    if training and len(batched_inputs) == 0:
        raise ValueError("SparseRCNN training got an empty list of inputs (batch of 0 images)")
    for i, x in enumerate(batched_inputs):
        if not isinstance(x, dict) or "image" not in x:
            got = f"a dict with keys {sorted(x)}" if isinstance(x, dict) else type(x).__name__
            raise ValueError(
                f"SparseRCNN input {i}: expected a dict with 'image' (a (C, H, W) tensor), got {got}"
            )
        if not isinstance(x["image"], torch.Tensor):
            raise TypeError(
                f"SparseRCNN input {i}: 'image' must be a (C, H, W) torch.Tensor, got "
                f"{type(x['image']).__name__} (convert with torch.as_tensor(img.transpose(2, 0, 1)))"
            )
        if training and "instances" not in x:
            raise ValueError(f"SparseRCNN training needs 'instances' in every input (input {i})")


# ------------------------------------------------------------------------------------------------
# CPU threads
# ------------------------------------------------------------------------------------------------
def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_threads_per_process(num_processes: int, cpu_count: Optional[int] = None) -> Optional[int]:
    """Give each of ``num_processes`` local processes its share of the cores, as ``torchrun``
    does: sets ``OMP_NUM_THREADS`` (inherited by the processes ``launch`` starts) unless the user
    set it. Call it before ``launch``; every worker then calls :func:`apply_cpu_threads`.

    Returns:
        The number of threads per process, or None when nothing was changed (one process, or
        ``OMP_NUM_THREADS`` already set by the user).
    """
    if num_processes <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = max(1, (cpu_count or available_cpus()) // num_processes)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def apply_cpu_threads() -> Optional[int]:
    """In a worker: apply ``OMP_NUM_THREADS`` to torch (``torch.set_num_threads``) if set."""
    value = os.environ.get("OMP_NUM_THREADS")
    if not value:
        return None
    threads = max(1, int(value))
    torch.set_num_threads(threads)
    return threads
