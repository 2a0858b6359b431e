"""CPU distributed training: Detectron2's ``launch`` with the gloo backend on a machine without
GPUs, each local process its share of the cores."""

import functools
import os
from typing import Optional

import torch
from detectron2.engine import defaults
from detectron2.utils import comm


def _cpu_aware_create_ddp_model(create_ddp_model, model, **kwargs):
    # DistributedDataParallel rejects device_ids for CPU modules; Detectron2 always passes them.
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return create_ddp_model(model, **kwargs)


def enable_cpu_distributed_training() -> None:
    """Let ``DefaultTrainer`` wrap a CPU model in DDP (gloo), e.g. ``--num-gpus 2`` on a CPU machine.

    Detectron2's ``launch`` already starts CPU workers with the gloo backend, but its
    ``create_ddp_model`` passes ``device_ids=[local_rank]``, which DistributedDataParallel refuses
    for CPU modules. This wraps it so CPU models get ``device_ids=None``; GPU models are unchanged.
    Idempotent; call it in every worker (``main()`` of train_net.py does).
    """
    current = defaults.create_ddp_model
    if getattr(current, "_sparse_rcnn_cpu_aware", False):
        return
    patched = functools.partial(_cpu_aware_create_ddp_model, current)
    patched._sparse_rcnn_cpu_aware = True
    defaults.create_ddp_model = patched


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
