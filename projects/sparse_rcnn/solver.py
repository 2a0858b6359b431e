"""The optimizer of Sparse R-CNN: AdamW (or SGD) with a backbone LR multiplier and full-model
gradient clipping (the L2 norm of all gradients together), which Detectron2 does not offer."""

import itertools
from typing import Type

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping


def maybe_add_full_model_gradient_clipping(
    optimizer_type: Type[torch.optim.Optimizer], clip_norm: float
) -> Type[torch.optim.Optimizer]:
    """A subclass of ``optimizer_type`` whose ``step`` first clips the total L2 norm of the
    gradients of all its parameters to ``clip_norm`` (unchanged when ``clip_norm <= 0``)."""
    if clip_norm <= 0.0:
        return optimizer_type

    class FullModelGradientClippingOptimizer(optimizer_type):
        def step(self, closure=None):
            all_params = itertools.chain(*[group["params"] for group in self.param_groups])
            torch.nn.utils.clip_grad_norm_(all_params, clip_norm)
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = (
        "FullModelGradientClipping" + optimizer_type.__name__
    )
    return FullModelGradientClippingOptimizer


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The official solver through Detectron2's parameter grouping.

    LR: ``SOLVER.BASE_LR``, times ``SOLVER.BACKBONE_MULTIPLIER`` for parameters whose name contains
    "backbone". Weight decay: ``SOLVER.WEIGHT_DECAY``, ``WEIGHT_DECAY_NORM`` for norm layers and
    ``WEIGHT_DECAY_BIAS`` for biases (our Base config sets both to WEIGHT_DECAY, as the official
    solver decays every parameter). ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: full_model`` clips the L2 norm
    of all gradients together to ``CLIP_VALUE``; "value"/"norm" use Detectron2's per-parameter
    clipping.
    """
    multiplier = cfg.SOLVER.BACKBONE_MULTIPLIER
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_factor_func=lambda name: multiplier if "backbone" in name else 1.0,
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
    if full_model:
        optimizer_type = maybe_add_full_model_gradient_clipping(optimizer_type, clip.CLIP_VALUE)
    else:
        optimizer_type = maybe_add_gradient_clipping(cfg, optimizer_type)
    return optimizer_type(params, lr=cfg.SOLVER.BASE_LR, **kwargs)
