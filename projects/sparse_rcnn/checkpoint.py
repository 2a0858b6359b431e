"""Checkpoint handling of every entry point: a missing or corrupt file reported with its path,
``last_checkpoint`` repaired, and ``--resume`` for yaml and LazyConfig runs alike."""

import contextlib
import logging
import os
import pickle
import zipfile
from typing import List

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
            f"MODEL.WEIGHTS / train.init_checkpoint {path} does not exist (working directory "
            f"{os.getcwd()}): give the path of a checkpoint (e.g. output/demo_cpu/model_final.pth), "
            "or '' for an untrained model."
        )


def load_model_weights(model, cfg, resume: bool = False) -> None:
    """``DetectionCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume)`` with a missing or
    corrupt checkpoint reported with its path."""
    checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    resume_or_load(checkpointer, cfg.MODEL.WEIGHTS, resume)


def _checkpoint_candidates(folder: str) -> List[str]:
    """The ``model_*.pth`` files of ``folder``, newest first: ``model_final.pth``, then by
    iteration (``PeriodicCheckpointer`` names them ``model_{iteration:07d}.pth``)."""
    names = [f for f in os.listdir(folder) if f.startswith("model_") and f.endswith(".pth")]
    return sorted(names, key=lambda f: (f == "model_final.pth", f), reverse=True)


def _repair_last_checkpoint(checkpointer) -> None:
    """A run killed while writing ``last_checkpoint`` leaves it empty (or naming a file that is not
    there): tag the newest ``model_*.pth`` of the folder instead (``model_final.pth`` first, then
    the highest iteration), with a warning; without any, remove the tag (a fresh start)."""
    path = checkpointer.get_checkpoint_file()
    if os.path.isfile(path):
        return
    folder = checkpointer.save_dir
    newest = (_checkpoint_candidates(folder) or [None])[0]
    logger.warning(
        f"{os.path.join(folder, 'last_checkpoint')} names {path!r}, which does not exist (a run "
        f"killed while saving?); resuming from {newest or 'nothing (no model_*.pth there)'}."
    )
    if newest is not None:
        checkpointer.tag_last_checkpoint(newest)
    else:
        os.remove(os.path.join(folder, "last_checkpoint"))


def resume_or_load(checkpointer, weights: str, resume: bool):
    """``checkpointer.resume_or_load(weights, resume)`` that a preempted job can rely on.

    With ``resume`` and a checkpoint in ``checkpointer.save_dir`` (``last_checkpoint``): the
    checkpoint it names, with everything in it (model, trainer state). If that file is truncated
    or unreadable (a run killed while saving), the newest readable ``model_*.pth`` of the folder
    is loaded instead, with a warning naming both files, and tagged as the last checkpoint. Only
    when no checkpoint of the folder can be read: a :class:`CorruptCheckpointError` naming them.
    Otherwise: the model weights of ``weights`` (a missing or corrupt file named in the error).

    Returns:
        What ``Checkpointer.load`` returns (the checkpoint's other contents).
    """
    if resume and checkpointer.has_checkpoint():
        _repair_last_checkpoint(checkpointer)
    if not (resume and checkpointer.has_checkpoint()):
        check_weights_file(weights)
        with explain_checkpoint_errors(weights):
            return checkpointer.resume_or_load(weights, resume=resume)
    folder = checkpointer.save_dir
    newest = checkpointer.get_checkpoint_file()
    others = [os.path.join(folder, f) for f in _checkpoint_candidates(folder)]
    unreadable = []
    for path in [newest] + [p for p in others if os.path.abspath(p) != os.path.abspath(newest)]:
        try:
            with explain_checkpoint_errors(path):
                loaded = checkpointer.load(path)
        except CorruptCheckpointError as e:
            unreadable.append((path, e))
            # DetectionCheckpointer.load leaves this set when reading fails: clear it for the next.
            if getattr(checkpointer, "_parsed_url_during_load", None) is not None:
                checkpointer._parsed_url_during_load = None
            continue
        if unreadable:
            logger.warning(
                f"Resuming from {path}: the newest checkpoint {newest} cannot be read "
                f"({unreadable[0][1].__cause__!r}; a run killed while saving?)"
                + (
                    f", nor can {', '.join(p for p, _ in unreadable[1:])}"
                    if len(unreadable) > 1
                    else ""
                )
                + ". The unreadable files are left in place."
            )
            checkpointer.tag_last_checkpoint(os.path.basename(path))
        return loaded
    files = ", ".join(f"{p} ({os.path.getsize(p)} bytes)" for p, _ in unreadable)
    raise CorruptCheckpointError(
        f"--resume: no checkpoint of {folder} can be read: {files} are corrupt or truncated "
        f"(first error: {unreadable[0][1].__cause__!r}). Delete them and start without --resume, "
        "or load a complete checkpoint as the config's weights."
    ) from unreadable[0][1]
