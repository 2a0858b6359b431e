"""Training that does not die: non-finite steps skipped, pre-flight checks, a data order that
``--resume`` continues, checkpoint problems reported with their path."""

import logging
import time
from typing import Optional

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .checkpoint import SafeDetectionCheckpointer, resume_or_load
from .data_loaders import check_datasets
from .resumable_loader import ResumableLoaderHook, ResumableTrainLoader
from .solver import check_learning_rate, paper_lr

logger = logging.getLogger(__name__)

# Consecutive skipped (non-finite) steps after which the run stops with an error.
MAX_CONSECUTIVE_NON_FINITE_STEPS = 5


def total_grad_norm(parameters) -> torch.Tensor:
    """The L2 norm of all gradients together (what full-model clipping clips), as a tensor."""
    norms = [p.grad.detach().norm(2) for p in parameters if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2)


class NonFiniteSkippingTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose step is skipped, without touching the weights or the optimizer
    state, when the predictions (reported by the criterion's ``non_finite``), the loss or the total
    gradient norm are not finite. Every skip is logged with its iteration; after
    ``max_consecutive_skips`` skips in a row the run stops with a FloatingPointError naming the
    LR (current and the paper's) and the fix. All processes skip together (the flag is all-reduced).
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        base_lr: float,
        ims_per_batch: int,
        max_consecutive_skips: int = MAX_CONSECUTIVE_NON_FINITE_STEPS,
        **kwargs,
    ):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.base_lr = base_lr
        self.ims_per_batch = ims_per_batch
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive_skips = 0
        self.skipped_steps = 0

    def _parameters(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def non_finite_problem(self, losses: torch.Tensor) -> Optional[str]:
        """Why this step must be skipped (on any process), or None."""
        criterion = getattr(getattr(self.model, "module", self.model), "criterion", None)
        problem = getattr(criterion, "non_finite", None)
        if problem is not None:
            problem = f"non-finite predictions at {problem}"
        elif not bool(torch.isfinite(losses)):
            problem = f"non-finite loss {losses.item()}"
        else:
            # With full-model clipping the optimizer clips now and returns the norm it computed, and
            # its step does not compute it again (sparse_rcnn.solver).
            clip = getattr(self.optimizer, "clip_gradients", None)
            norm = clip() if clip is not None else total_grad_norm(self._parameters())
            if not bool(torch.isfinite(norm)):
                problem = f"non-finite total gradient norm {norm.item()}"
        if comm.get_world_size() > 1:
            flag = torch.tensor([0.0 if problem is None else 1.0], device=losses.device)
            torch.distributed.all_reduce(flag)
            if problem is None and flag.item() > 0:
                problem = "non-finite values on another process"
        return problem

    def run_step(self):
        assert self.model.training, "[NonFiniteSkippingTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            losses, loss_dict = loss_dict, {"total_loss": loss_dict}
        else:
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        problem = self.non_finite_problem(losses.detach())
        if problem is None:
            self.consecutive_skips = 0
            self._write_metrics(loss_dict, data_time)
            self.optimizer.step()
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.consecutive_skips += 1
        self.skipped_steps += 1
        get_event_storage().put_scalar("skipped_steps", self.skipped_steps, smoothing_hint=False)
        lr = self.optimizer.param_groups[0]["lr"]
        logger.warning(
            f"Iteration {self.iter}: {problem}; step skipped, weights and optimizer state "
            f"unchanged ({self.consecutive_skips} in a row, {self.skipped_steps} in this run)."
        )
        if self.consecutive_skips >= self.max_consecutive_skips:
            paper = paper_lr(self.ims_per_batch)
            raise FloatingPointError(
                f"Training diverged: {self.consecutive_skips} steps in a row skipped at iteration "
                f"{self.iter} ({problem}). The likely cause is the learning rate: the current LR "
                f"is {lr:g} (SOLVER.BASE_LR {self.base_lr:g}), the paper's AdamW LR for "
                f"SOLVER.IMS_PER_BATCH {self.ims_per_batch} is {paper:.3g}. Lower SOLVER.BASE_LR "
                f"(e.g. SOLVER.BASE_LR {paper:.3g}) and keep SOLVER.CLIP_GRADIENTS enabled; if "
                "the LR is right, check the data for broken boxes."
            )


class RobustTrainerMixin:
    """Mix into ``DefaultTrainer`` (``class Trainer(RobustTrainerMixin, DefaultTrainer)``):

    - before training: the LR warning and the test datasets' classes (the train datasets are
      checked by :func:`build_sparse_rcnn_train_loader`);
    - non-finite steps skipped (:class:`NonFiniteSkippingTrainer`; AMP keeps Detectron2's
      AMPTrainer, whose GradScaler skips steps with non-finite gradients itself);
    - the data order saved in checkpoints and continued on ``--resume``
      (:class:`ResumableLoaderHook`);
    - checkpoints read weights-only (:class:`SafeDetectionCheckpointer`); a missing, corrupt or
      refused checkpoint reported with its path.
    """

    def __init__(self, cfg):
        check_learning_rate(cfg)
        check_datasets(cfg, list(cfg.DATASETS.TEST))
        super().__init__(cfg)
        old = self._trainer
        if type(old) is SimpleTrainer:
            self._trainer = NonFiniteSkippingTrainer(
                old.model,
                old.data_loader,
                old.optimizer,
                base_lr=cfg.SOLVER.BASE_LR,
                ims_per_batch=cfg.SOLVER.IMS_PER_BATCH,
            )
        default = self.checkpointer  # DefaultTrainer's, which would unpickle anything
        self.checkpointer = SafeDetectionCheckpointer(
            default.model, default.save_dir, **default.checkpointables
        )
        for hook in self._hooks:
            if getattr(hook, "checkpointer", None) is default:
                hook.checkpointer = self.checkpointer
        if isinstance(self._trainer.data_loader, ResumableTrainLoader):
            self.register_hooks([ResumableLoaderHook(self._trainer.data_loader)])

    def resume_or_load(self, resume=True):
        parent = super(RobustTrainerMixin, self).resume_or_load
        resume_or_load(
            self.checkpointer, self.cfg.MODEL.WEIGHTS, resume, load=lambda: parent(resume=resume)
        )
