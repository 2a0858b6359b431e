"""The trainer of both config systems (yaml and LazyConfig): pre-flight checks, non-finite
steps skipped, a data order that ``--resume`` continues, checkpoint problems reported with their
path, periodic and final evaluation (per stage, CrowdHuman, TTA)."""

import logging
import os
import time
import weakref
from collections import OrderedDict
from typing import Dict, Optional

import torch
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    TrainerBase,
    default_writers,
    defaults,
    hooks,
)
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .checkpoint import InferenceCheckpointer, SafeDetectionCheckpointer, resume_or_load
from .config_loader import config_reader
from .dataset_checks import check_dataset_classes
from .resumable_loader import ResumableLoaderHook, ResumableTrainLoader
from .solver import paper_lr

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
        lr_key: str = "SOLVER.BASE_LR",
        ims_key: str = "SOLVER.IMS_PER_BATCH",
        assign: str = " ",
        **kwargs,
    ):
        """
        Args:
            model, data_loader, optimizer: as ``SimpleTrainer``'s.
            base_lr, ims_per_batch: the config's LR and images per step, for the message.
            max_consecutive_skips: skips in a row after which the run stops.
            lr_key, ims_key, assign: the config keys of both and how a command line sets a key
                (" " yaml, "=" LazyConfig), for the message.
        """
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.base_lr = base_lr
        self.ims_per_batch = ims_per_batch
        self.lr_key, self.ims_key, self.assign = lr_key, ims_key, assign
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
            lr_key, ims_key, assign = self.lr_key, self.ims_key, self.assign
            raise FloatingPointError(
                f"Training diverged: {self.consecutive_skips} steps in a row skipped at iteration "
                f"{self.iter} ({problem}). The likely cause is the learning rate: the current LR "
                f"is {lr:g} ({lr_key} {self.base_lr:g}), the paper's AdamW LR for "
                f"{ims_key} {self.ims_per_batch} is {paper:.3g}. Lower {lr_key} "
                f"(e.g. {lr_key}{assign}{paper:.3g}) and keep full-model gradient clipping; if "
                "the LR is right, check the data for broken boxes."
            )


class SparseRCNNTrainer(TrainerBase):
    """Detectron2's ``DefaultTrainer`` for both config systems: ``SparseRCNNTrainer(cfg)`` with a
    yaml ``CfgNode`` or a LazyConfig builds the same pieces through :func:`config_reader`.

    - before training: the LR warning and the test datasets' classes (the train datasets are
      checked by ``data_loaders.build_sparse_rcnn_train_loader``, whose invalid annotations are
      counted once);
    - non-finite steps skipped (:class:`NonFiniteSkippingTrainer`; AMP keeps Detectron2's
      AMPTrainer, whose GradScaler skips steps with non-finite gradients itself);
    - the data order saved in checkpoints and continued on ``--resume``
      (:class:`ResumableLoaderHook` on a ``ResumableTrainLoader``);
    - checkpoints read weights-only (``SafeDetectionCheckpointer``; ``--eval-only``:
      ``InferenceCheckpointer``); ``--resume`` falls back to the newest readable checkpoint, and a
      missing, corrupt or refused checkpoint is reported with its path
      (``checkpoint.resume_or_load``);
    - periodic and final evaluation with the config's evaluator (per stage, CrowdHuman), and
      with test-time augmentation at the end when the config enables it (:meth:`test_with_TTA`);
    - LR schedule, periodic checkpoints, console / ``metrics.json`` / TensorBoard logs.

    The checkpoint holds the model, the trainer's iteration, the optimizer (``_trainer``), and the
    state of the hooks (LR scheduler, data order), as ``DefaultTrainer``'s.
    """

    def __init__(self, cfg):
        super().__init__()
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            from detectron2.utils.logger import setup_logger

            setup_logger()
        run = config_reader(cfg)
        self.cfg, self.run = run.cfg, run
        run.check_learning_rate()
        for name in run.test_dataset_names:
            check_dataset_classes(name, None, run.num_classes, run.keys["num_classes"])
        model = self.build_model(run)
        optimizer = run.build_optimizer(model)
        data_loader = run.build_train_loader()
        model = defaults.create_ddp_model(model, **run.ddp_kwargs())  # CPU-aware: distributed.py
        if run.amp:
            self._trainer = AMPTrainer(model, data_loader, optimizer)
        else:
            self._trainer = NonFiniteSkippingTrainer(
                model,
                data_loader,
                optimizer,
                base_lr=run.base_lr,
                ims_per_batch=run.ims_per_batch,
                lr_key=run.keys["lr"],
                ims_key=run.keys["ims_per_batch"],
                assign=run.assign,
            )
        self.scheduler = run.build_lr_scheduler(optimizer)
        self.checkpointer = SafeDetectionCheckpointer(
            model, run.output_dir, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = run.max_iter
        self._last_eval_results: Dict = {}
        self.register_hooks(self.build_hooks())

    model = property(lambda self: self._trainer.model)
    optimizer = property(lambda self: self._trainer.optimizer)
    data_loader = property(lambda self: self._trainer.data_loader)

    @classmethod
    def build_model(cls, cfg) -> torch.nn.Module:
        model = config_reader(cfg).build_model()
        logging.getLogger(__name__).info(f"Model:\n{model}")
        return model

    def build_hooks(self):
        run = self.run
        ret = [hooks.IterationTimer(), hooks.LRScheduler()]
        precise_bn, precise_bn_iters = run.precise_bn()
        if precise_bn:
            from fvcore.nn.precise_bn import get_bn_modules

            if get_bn_modules(self.model):
                loader = run.build_train_loader(num_workers=0)
                ret.append(hooks.PreciseBN(run.eval_period, self.model, loader, precise_bn_iters))
        if comm.is_main_process():
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, **run.checkpointer_kwargs()))

        def test_and_save_results():
            self._last_eval_results = self.test(run, self.model)
            return self._last_eval_results

        ret.append(hooks.EvalHook(run.eval_period, test_and_save_results))
        if run.tta_enabled:

            def test_with_tta_and_save_results():
                results = self.test_with_TTA(run, self.model)
                self._last_eval_results = {**self._last_eval_results, **results}
                return results

            # At the end of training, before the writer's last write (so metrics.json has it).
            ret.append(hooks.EvalHook(0, test_with_tta_and_save_results))
        if comm.is_main_process():
            writers = default_writers(run.output_dir, self.max_iter)
            ret.append(hooks.PeriodicWriter(writers, period=run.log_period))
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            ret.append(ResumableLoaderHook(loader))
        else:
            logging.getLogger(__name__).warning(
                f"Train loader {type(loader).__name__}: --resume restarts its data stream (a "
                "ResumableTrainLoader, data_loaders.build_sparse_rcnn_train_loader, continues it)."
            )
        return ret

    def resume_or_load(self, resume: bool = True) -> None:
        """``--resume``: the newest readable checkpoint of the output folder with the trainer's
        state, else the config's weights (``MODEL.WEIGHTS`` / ``train.init_checkpoint``) only."""
        resume_or_load(self.checkpointer, self.run.weights, resume, self.run.keys["weights"])
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1  # the checkpoint's iteration has been completed

    def train(self) -> Dict:
        """Train from ``start_iter`` to ``max_iter``.

        Returns:
            The results of the last evaluation ({} if none ran; {} on processes other than the
            main one).
        """
        super().train(self.start_iter, self.max_iter)
        if not comm.is_main_process():
            return {}
        self.run.verify_results(self._last_eval_results)
        return self._last_eval_results

    def run_step(self):
        self._trainer.iter = self.iter
        self._trainer.run_step()

    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def test(cls, cfg, model, evaluators=None) -> Dict:
        """Evaluate ``model`` on every evaluation of the config (yaml: each ``DATASETS.TEST``;
        LazyConfig: ``dataloader.test`` with ``dataloader.evaluator``).

        Args:
            cfg: a config of either system, or its :class:`ConfigReader`.
            model: the model to evaluate (weights loaded).
            evaluators: one per evaluation (None: the config's); None entries skip one.

        Returns:
            {evaluation name: results}, or the results alone when there is one evaluation.
        """
        run = config_reader(cfg)
        logger = logging.getLogger(__name__)
        names = run.evaluation_sets
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        if evaluators is not None and len(evaluators) != len(names):
            raise ValueError(f"{len(evaluators)} evaluators for {len(names)} evaluations {names}")
        results = OrderedDict()
        for index, name in enumerate(names):
            evaluator = run.build_evaluator(name) if evaluators is None else evaluators[index]
            if evaluator is None:
                logger.warning(f"No evaluator for {name} (dataloader.evaluator is null): skipped.")
                results[name] = {}
                continue
            results[name] = inference_on_dataset(model, run.build_test_loader(name), evaluator)
            if comm.is_main_process():
                logger.info(f"Evaluation results for {name} in csv format:")
                print_csv_format(results[name])
        if len(results) == 1:
            results = list(results.values())[0]
        return results

    @classmethod
    def test_with_TTA(cls, cfg, model) -> Dict:
        """Evaluate ``model`` with test-time augmentation (yaml ``TEST.AUG.*``, LazyConfig
        ``tta.model``); results as "bbox_TTA" (or "crowdhuman_TTA"), files in
        ``{output_dir}/inference_TTA/{name}``. The TTA model returns no per-stage detections, so
        only the final ones are evaluated."""
        run = config_reader(cfg)
        logging.getLogger(__name__).info("Running inference with test-time augmentation ...")
        model = run.build_tta_model(model)
        evaluators = [
            run.build_evaluator(
                name, os.path.join(run.output_dir, "inference_TTA", name), per_stage=False
            )
            for name in run.evaluation_sets
        ]
        results = cls.test(run, model, evaluators)
        return OrderedDict({k + "_TTA": v for k, v in results.items()})

    @classmethod
    def load_weights(cls, cfg, model: torch.nn.Module, resume: bool = False) -> None:
        """The weights of ``--eval-only`` (``InferenceCheckpointer``: weights-only, and a checkpoint
        that leaves modules untrained is an error): with ``resume`` the newest readable checkpoint
        of the output folder, else the config's weights; a missing, corrupt or refused file
        reported with its path."""
        run = config_reader(cfg)
        checkpointer = InferenceCheckpointer(model, save_dir=run.output_dir)
        resume_or_load(checkpointer, run.weights, resume, run.keys["weights"])
