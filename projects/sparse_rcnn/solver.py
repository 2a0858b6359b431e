"""The optimizer of Sparse R-CNN: AdamW (or SGD) with a backbone LR multiplier and full-model
gradient clipping (the L2 norm of all gradients together), which Detectron2 does not offer; and
the check of the LR against the paper's before training."""

import itertools
import logging
from collections.abc import Sequence
from typing import Iterable, Optional, Type

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

logger = logging.getLogger(__name__)


def maybe_add_full_model_gradient_clipping(
    optimizer_type: Type[torch.optim.Optimizer], clip_norm: float
) -> Type[torch.optim.Optimizer]:
    """A subclass of ``optimizer_type`` whose ``step`` first clips the total L2 norm of the
    gradients of all its parameters to ``clip_norm`` (unchanged when ``clip_norm <= 0``).

    ``clip_gradients()`` clips before ``step`` and returns the total norm before clipping, for a
    trainer that checks it (``trainer.NonFiniteSkippingTrainer``): the following ``step`` then does
    not clip again, so the norm is computed once per iteration (a few percent of a CPU step of
    the main job's model, docs/benchmarks.md). ``zero_grad`` forgets a clip whose step did not come.
    """
    if clip_norm <= 0.0:
        return optimizer_type

    class FullModelGradientClippingOptimizer(optimizer_type):
        _clipped = False

        def clip_gradients(self) -> torch.Tensor:
            all_params = itertools.chain(*[group["params"] for group in self.param_groups])
            norm = torch.nn.utils.clip_grad_norm_(all_params, clip_norm)
            self._clipped = True
            return norm

        def step(self, closure=None):
            if not self._clipped:
                self.clip_gradients()
            self._clipped = False
            return super().step(closure=closure)

        def zero_grad(self, set_to_none: bool = True):
            self._clipped = False
            return super().zero_grad(set_to_none=set_to_none)

    FullModelGradientClippingOptimizer.__name__ = (
        "FullModelGradientClipping" + optimizer_type.__name__
    )
    return FullModelGradientClippingOptimizer


class BackboneLRMultiplier:
    """``lr_factor_func`` of ``get_default_optimizer_params``: ``multiplier`` for every parameter
    whose name contains "backbone", 1 for the others (``SOLVER.BACKBONE_MULTIPLIER``).

    A class rather than a lambda, so that a LazyConfig can build it and override ``multiplier``
    (``optimizer.params.lr_factor_func.multiplier=0.1``).
    """

    def __init__(self, multiplier: float = 1.0):
        self.multiplier = multiplier

    def __call__(self, name: str) -> float:
        return self.multiplier if "backbone" in name else 1.0


def full_model_clipped_optimizer(
    *,
    params: Iterable,
    optimizer_type: Type[torch.optim.Optimizer] = torch.optim.AdamW,
    clip_norm: float = 1.0,
    **kwargs,
) -> torch.optim.Optimizer:
    """``optimizer_type(params, **kwargs)`` whose ``step`` first clips the L2 norm of all gradients
    together to ``clip_norm`` (no clipping when ``clip_norm <= 0``): the cfg-free builder of the
    optimizer that :func:`build_optimizer` makes from ``SOLVER.*``, for LazyConfig configs.

    Args:
        params: parameters or parameter groups (``get_default_optimizer_params(model, ...)``).
        optimizer_type: a ``torch.optim.Optimizer`` class (paper: AdamW).
        clip_norm: max total gradient norm (paper: 1.0).
        kwargs: the optimizer's own arguments (``lr``, ``weight_decay``, ``betas``, ...).
    """
    # A LazyConfig passes a list or tuple (``betas``) as an omegaconf ListConfig; as a tuple it
    # leaves the optimizer state, and so the checkpoints, plain data that loads weights-only.
    kwargs = {
        k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
        for k, v in kwargs.items()
    }
    return maybe_add_full_model_gradient_clipping(optimizer_type, clip_norm)(params, **kwargs)


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The official solver through Detectron2's parameter grouping.

    LR: ``SOLVER.BASE_LR``, times ``SOLVER.BACKBONE_MULTIPLIER`` for parameters whose name contains
    "backbone". Weight decay: ``SOLVER.WEIGHT_DECAY``, ``WEIGHT_DECAY_NORM`` for norm layers and
    ``WEIGHT_DECAY_BIAS`` for biases (our Base config sets both to WEIGHT_DECAY, as the official
    solver decays every parameter). ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: full_model`` clips the L2
    norm of all gradients together to ``CLIP_VALUE``; "value"/"norm" use Detectron2's
    per-parameter clipping.
    """
    multiplier = cfg.SOLVER.BACKBONE_MULTIPLIER
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_factor_func=BackboneLRMultiplier(multiplier),
    )
    clip = cfg.SOLVER.CLIP_GRADIENTS
    full_model = clip.ENABLED and clip.CLIP_TYPE == "full_model"
    optimizer_name = cfg.SOLVER.OPTIMIZER.upper()
    if optimizer_name == "ADAMW":
        optimizer_type, kwargs = torch.optim.AdamW, {}
    elif optimizer_name == "SGD":
        optimizer_type = torch.optim.SGD
        kwargs = {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
    # The multi-tensor ("foreach") implementation on every device: PyTorch picks it by itself only
    # for CUDA parameters. Same results bit for bit (tests/test_solver.py), fewer passes over the
    # parameters: a faster CPU step (docs/benchmarks.md, "The main job's step").
    kwargs["foreach"] = True
    if full_model:
        optimizer_type = maybe_add_full_model_gradient_clipping(optimizer_type, clip.CLIP_VALUE)
    else:
        optimizer_type = maybe_add_gradient_clipping(cfg, optimizer_type)
    return optimizer_type(params, lr=cfg.SOLVER.BASE_LR, **kwargs)


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


def check_learning_rate(cfg) -> Optional[str]:
    """:func:`check_adamw_learning_rate` for a yaml config (``SOLVER.OPTIMIZER``,
    ``SOLVER.BASE_LR``, ``SOLVER.IMS_PER_BATCH``)."""
    return check_adamw_learning_rate(
        str(cfg.SOLVER.OPTIMIZER), float(cfg.SOLVER.BASE_LR), int(cfg.SOLVER.IMS_PER_BATCH)
    )


def check_adamw_learning_rate(
    optimizer: str,
    lr: float,
    ims_per_batch: int,
    *,
    lr_key: str = "SOLVER.BASE_LR",
    ims_key: str = "SOLVER.IMS_PER_BATCH",
    assign: str = " ",
) -> Optional[str]:
    """Warn about an AdamW LR far above the paper's (scaled to ``ims_per_batch``).

    The most reported failure of the official code: NaN boxes, or a run that learns nothing, with
    an LR set the Faster R-CNN way. Other optimizers (SGD) are not checked: the paper gives no SGD
    LR.

    Args:
        optimizer: the optimizer's name ("ADAMW", "AdamW", "SGD", ...).
        lr: the base LR; ims_per_batch: images per step over all processes.
        lr_key, ims_key: the config keys of both, for the message (a LazyConfig's are
            ``optimizer.lr`` and ``dataloader.train.total_batch_size``).
        assign: how the command line sets a key: " " (yaml ``KEY VALUE``) or "=" (LazyConfig).

    Returns:
        The warning (also logged), or None.
    """
    if optimizer.upper() != "ADAMW":
        return None
    lr, ims = float(lr), int(ims_per_batch)
    reference = paper_lr(ims)
    if lr <= LR_WARNING_FACTOR * reference:
        return None
    message = (
        f"{lr_key} {lr:g} is {lr / reference:.0f}x the paper's AdamW LR for "
        f"{ims_key} {ims} ({PAPER_BASE_LR:g} x {ims}/{PAPER_IMS_PER_BATCH} = "
        f"{reference:.3g}). An LR on the Faster R-CNN scale makes Sparse R-CNN produce NaN boxes "
        f"or learn nothing; set {lr_key}{assign}{reference:.3g} (a model trained from scratch may "
        f"need up to ~100x that)."
    )
    logger.warning(message)
    return message
