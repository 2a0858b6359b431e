"""Find subnormal floats in a training step: where they are written, and where they stay.

Subnormal (denormal) floats make CPU arithmetic that reads them many times slower. Two tools:

* :func:`subnormal_sources` runs one training step (forward, backward, optimizer step) under a
  ``TorchDispatchMode`` that counts the subnormal values every ATen operation writes, and names
  the innermost ``sparse_rcnn`` source line of each;
* :func:`subnormal_counts` counts them in named tensors (weights, gradients, optimizer state).

``tools/ablate_dynamic.py --late-steps N`` runs both from each trained checkpoint. This is how the
subnormal entries of OTA's transport plan were found (docs/benchmarks.md, "Subnormal floats").
"""

import traceback
from typing import Dict, Iterable, Tuple

import torch

# Freshly allocated outputs hold garbage until written: not counted.
_UNINITIALISED = ("empty", "new_empty", "new_empty_strided", "empty_strided", "slice", "view")


def num_subnormal(tensor: torch.Tensor) -> int:
    """How many values of a floating-point tensor are subnormal in its own dtype."""
    return int(((tensor != 0) & (tensor.abs() < torch.finfo(tensor.dtype).tiny)).sum())


def subnormal_counts(named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> Dict[str, int]:
    """name -> number of subnormal values, for the floating-point tensors that hold any."""
    counts = {}
    for name, tensor in named_tensors:
        if tensor is not None and tensor.is_floating_point():
            count = num_subnormal(tensor)
            if count:
                counts[name] = count
    return counts


def subnormal_sources(model, optimizer, batch, top: int = 8) -> Dict[str, int]:
    """Which operations of one training step write subnormal float32/float64 values.

    Args:
        model: a model in training mode, returning a dict of losses for ``batch``.
        optimizer: its optimizer (stepped once).
        batch: one training batch (Detectron2 mapper dicts).
        top: how many of the largest counts to return.

    Returns:
        "op dtype (innermost sparse_rcnn source line)" -> count, the ``top`` largest.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    counts: Dict[str, int] = {}

    class CountSubnormals(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in _UNINITIALISED:
                return out
            for t in tree_flatten(out)[0]:
                if not (torch.is_tensor(t) and t.is_floating_point() and t.numel()):
                    continue
                count = num_subnormal(t)
                if count:
                    ours = [f for f in traceback.extract_stack() if "/sparse_rcnn/" in f.filename]
                    where = (
                        f"{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}" if ours else ""
                    )
                    key = f"{func.__name__} {str(t.dtype).replace('torch.', '')} ({where})"
                    counts[key] = counts.get(key, 0) + count
            return out

    with CountSubnormals():
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])
