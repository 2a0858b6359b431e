"""Checkpoint handling of every entry point: a missing or corrupt file reported with its path,
``last_checkpoint`` repaired, and ``--resume`` for yaml and LazyConfig runs alike."""

import contextlib
import logging
import os
import pickle
import zipfile

from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)


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


def load_model_weights(model, cfg, resume: bool = False) -> None:
    """``DetectionCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume)`` with a missing or
    corrupt checkpoint reported with its path."""
    checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    resume_or_load(checkpointer, cfg.MODEL.WEIGHTS, resume)


def _repair_last_checkpoint(checkpointer) -> None:
    """A run killed while writing ``last_checkpoint`` leaves it empty (or naming a file that is not
    there): tag the newest ``model_*.pth`` of the folder instead, with a warning."""
    path = checkpointer.get_checkpoint_file()
    if os.path.isfile(path):
        return
    folder = checkpointer.save_dir
    candidates = sorted(
        f for f in os.listdir(folder) if f.startswith("model_") and f.endswith(".pth")
    )
    final = [f for f in candidates if f == "model_final.pth"]
    newest = (final or candidates[-1:] or [None])[-1]
    logger.warning(
        f"{os.path.join(folder, 'last_checkpoint')} names {path!r}, which does not exist (a run "
        f"killed while saving?); resuming from {newest or 'nothing (no model_*.pth there)'}."
    )
    if newest is not None:
        checkpointer.tag_last_checkpoint(newest)
    else:
        os.remove(os.path.join(folder, "last_checkpoint"))


def resume_or_load(checkpointer, weights: str, resume: bool, load=None):
    if resume and checkpointer.has_checkpoint():
        _repair_last_checkpoint(checkpointer)
    if resume and checkpointer.has_checkpoint():
        path = checkpointer.get_checkpoint_file()
    else:
        path = weights
        check_weights_file(path)
    with explain_checkpoint_errors(path):
        if load is not None:
            return load()
        return checkpointer.resume_or_load(weights, resume=resume)
