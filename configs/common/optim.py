"""The optimizer of Sparse R-CNN (paper section 4, official solver): AdamW, LR 2.5e-5 for 16
images, weight decay 1e-4 on every parameter (norm layers and biases included), an LR multiplier
for the backbone (1.0) and full-model gradient clipping (L2 norm of all gradients together, 1.0).
``optimizer.params.model`` is set to the model by train_net.py before instantiating, as in
Detectron2's ``common/optim.py``.
"""

import torch
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from sparse_rcnn.solver import BackboneLRMultiplier, full_model_clipped_optimizer

AdamW = L(full_model_clipped_optimizer)(
    params=L(get_default_optimizer_params)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        weight_decay_norm="${..weight_decay}",
        weight_decay_bias="${..weight_decay}",
        lr_factor_func=L(BackboneLRMultiplier)(multiplier=1.0),
    ),
    optimizer_type=torch.optim.AdamW,
    clip_norm=1.0,  # <= 0: no clipping
    lr=2.5e-5,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=1e-4,
    foreach=True,  # the multi-tensor AdamW on a CPU too (sparse_rcnn.solver.build_optimizer)
)
