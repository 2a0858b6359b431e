"""LR schedules (``lr_multiplier``), as Detectron2's ``common/coco_schedule.py``: the values are
multipliers of ``optimizer.lr``; iterations are those of 16 images per step."""

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler, MultiStepParamScheduler

# Sparse R-CNN "3x" (36 epochs): 270k iterations, LR / 10 at 210k and 250k, linear warm-up over
# 1000 iterations from 0.01 (the official Base-SparseRCNN.yaml; Detectron2's 3x warms up from
# 0.001 and decays at 210k / 250k too).
lr_multiplier_3x = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[210000, 250000],
        num_updates=270000,
    ),
    warmup_length=1000 / 270000,
    warmup_method="linear",
    warmup_factor=0.01,
)


def cosine_schedule(max_iter: int, warmup_iters: int, warmup_factor: float = 0.01):
    """Cosine decay to 0 over ``max_iter`` with a linear warm-up (yaml ``WarmupCosineLR``)."""
    return L(WarmupParamScheduler)(
        scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
        warmup_length=warmup_iters / max_iter,
        warmup_method="linear",
        warmup_factor=warmup_factor,
    )
