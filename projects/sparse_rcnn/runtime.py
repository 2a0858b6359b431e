"""Per-process runtime of the entry points (train_net.py, the demo, export): the device checked
before anything is built, the package's log lines, and subnormal floats flushed on the CPU."""

import logging
from typing import Optional

import torch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .distributed import apply_cpu_threads

logger = logging.getLogger(__name__)


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
    model slower, docs/benchmarks.md). ``fix``: the option that turns AMP off."""
    if amp_enabled and not device.startswith("cuda"):
        raise ValueError(
            f"{amp_key} needs a CUDA device (Detectron2's AMPTrainer trains with CUDA autocast "
            f"only), but {device_key} is {device!r}: set {fix}"
        )


def setup_package_logger(output_dir: Optional[str] = None):
    """Send this package's log lines (``sparse_rcnn.*``) to the console and ``output_dir/log.txt``,
    like Detectron2's (its ``setup_logger`` only configures "detectron2" and "fvcore")."""
    return setup_logger(
        output_dir, distributed_rank=comm.get_rank(), name="sparse_rcnn", abbrev_name="sparse_rcnn"
    )


def setup_process_runtime(device: str, output_dir: Optional[str] = None) -> None:
    """Per-process runtime settings of a train_net.py process (yaml and LazyConfig alike): the
    package's log lines, each of several CPU processes its share of the cores, and subnormal floats
    flushed to zero on the CPU.

    Subnormal floats can slow CPU steps down late in training (they did in OTA's transport plan,
    which now zeroes them: docs/benchmarks.md, "Subnormal floats"); flushing stays as a guard for
    other data. The flag is a setting of the process, not of a module, so it is made here rather
    than inside the model.
    """
    setup_package_logger(output_dir)
    if comm.get_world_size() > 1:
        apply_cpu_threads()  # see distributed.cpu_threads_per_process
    if str(device) == "cpu":
        torch.set_flush_denormal(True)
