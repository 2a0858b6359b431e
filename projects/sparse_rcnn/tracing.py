"""Whether the model is being turned into a graph, and the size arithmetic that keeps image sizes
variable in that graph.

Two graph makers run the model: ``torch.jit.trace`` (TorchScript and the TorchScript-based ONNX
exporter), whose shapes are 0-dim tensors, and ``torch.export`` (``.pt2`` files and the ONNX
exporter of current torch), whose shapes are symbolic integers. Python arithmetic on either keeps
the size variable; turning a symbolic size into a tensor with ``torch.as_tensor`` (what
Detectron2's ``shapes_to_tensor`` does outside ``torch.jit``) freezes it to the example's value.
"""

from typing import Sequence

import torch


def is_exporting() -> bool:
    """Whether ``torch.export`` is tracing the model (torch >= 2.5 tells; older torch exports
    through ``torch.jit.trace`` only, so it never is)."""
    is_exporting_fn = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting_fn is not None and is_exporting_fn())


def is_tracing() -> bool:
    """Whether ``torch.jit.trace`` or ``torch.export`` is tracing the model: the model then takes
    its exportable paths (no Python test on a size, no custom CPU kernels)."""
    return torch.jit.is_tracing() or is_exporting()


def is_fx_symbolic_tracing() -> bool:
    """Whether ``torch.fx.symbolic_trace`` is tracing the model. Current torch has its own test;
    its ``is_fx_tracing`` (which Detectron2's wraps) logs that it also answers for torch.export."""
    from torch.fx import _symbolic_trace

    own = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None)
    if own is not None:
        return own()
    from detectron2.utils.tracing import is_fx_tracing

    return is_fx_tracing()


def sizes_to_tensor(values: Sequence, device=None) -> torch.Tensor:
    """A 1-D float32 tensor of image sizes (ints, 0-dim tensors or symbolic ints) that stays tied
    to the input's shape in a trace or an export, as Detectron2's ``shapes_to_tensor`` does for
    ``torch.jit.trace`` only."""
    if is_exporting():
        return torch.stack(
            [torch.scalar_tensor(v, dtype=torch.float32, device=device) for v in values]
        )
    from detectron2.layers import shapes_to_tensor

    return shapes_to_tensor(list(values), device).to(dtype=torch.float32, device=device)
