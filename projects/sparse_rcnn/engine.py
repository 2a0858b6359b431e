"""Training-loop pieces shared by ``train_net.py``, the demo and the tests."""

import functools
import logging
import os
import time
from typing import Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import SimpleTrainer, defaults
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger

from .crowdhuman_evaluation import CrowdHumanEvaluator, is_crowdhuman_dataset
from .evaluation import PerStageEvaluator

from . import checks
from .builtin_datasets import prepare_builtin_dataset
from .dataset_mapper import SparseRCNNDatasetMapper
from .resumable_loader import ResumableLoaderHook, ResumableTrainLoader

logger = logging.getLogger(__name__)


def build_sparse_rcnn_train_loader(cfg):
    """The train loader with the paper's augmentation (:class:`SparseRCNNDatasetMapper`).

    The datasets are checked against the model first (:func:`checks.check_dataset_classes`, and
    the annotations the mapper drops are counted once). With ``DATALOADER.SAMPLER_TRAIN``
    "TrainingSampler" (the default) it is a :class:`ResumableTrainLoader`: Detectron2's sampler
    order, continued where it stopped on ``--resume``; other samplers use Detectron2's loader.
    """
    names = list(cfg.DATASETS.TRAIN)
    for name in names:
        prepare_builtin_dataset(name)
    dicts = checks.load_dataset_dicts(
        names,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    check_datasets(cfg, names, dicts)
    mapper = SparseRCNNDatasetMapper(cfg, is_train=True)
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        logger.warning(
            f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN}: --resume restarts its data "
            "stream (only TrainingSampler's is continued where it stopped)."
        )
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dicts)
    world_size = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} must be divisible by the number of "
            f"processes ({world_size})"
        )
    return ResumableTrainLoader(
        dicts,
        mapper,
        batch_size=cfg.SOLVER.IMS_PER_BATCH // world_size,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def check_datasets(cfg, names, dicts=None) -> None:
    """The model's NUM_CLASSES against the datasets ``names`` (their metadata, and the records
    ``dicts`` if given); the mapper's dropped annotations counted once. Raises ValueError."""
    num_classes = cfg.MODEL.SPARSE_RCNN.NUM_CLASSES
    for name in names:
        checks.check_dataset_classes(name, None, num_classes)
    if dicts is not None:
        label = names[0] if len(names) == 1 else "+".join(names)
        checks.check_dataset_classes(label, dicts, num_classes)
        checks.count_invalid_annotations(label, dicts)


def build_sparse_rcnn_test_loader(cfg, dataset_name: str):
    """Detectron2's test loader; the dataset is checked against NUM_CLASSES first, so that
    ``--eval-only`` with a model that does not fit stops before inference."""
    prepare_builtin_dataset(dataset_name)
    proposal_files = None
    if cfg.MODEL.LOAD_PROPOSALS:
        proposal_files = [
            cfg.DATASETS.PROPOSAL_FILES_TEST[list(cfg.DATASETS.TEST).index(dataset_name)]
        ]
    dicts = checks.load_dataset_dicts(
        [dataset_name], filter_empty=False, proposal_files=proposal_files
    )
    check_datasets(cfg, [dataset_name], dicts)
    return build_detection_test_loader(
        dataset=dicts,
        mapper=SparseRCNNDatasetMapper(cfg, is_train=False),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def build_sparse_rcnn_evaluator(cfg, dataset_name: str, output_folder=None):
    """COCOEvaluator (box AP) on ``dataset_name``; generates a built-in dataset first if needed.

    With ``MODEL.SPARSE_RCNN.EVAL_PER_STAGE`` every stage is evaluated too (``bbox_stage{t}``).

    Datasets whose metadata has ``evaluator_type == "crowdhuman"`` (``crowdhuman_train``/``_val``)
    get :class:`CrowdHumanEvaluator` (AP, mMR, Recall of the official protocol) instead of COCO
    AP (per stage too: ``crowdhuman_stage{t}``).
    """
    prepare_builtin_dataset(dataset_name)
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)

    def make_evaluator(folder):
        if is_crowdhuman_dataset(dataset_name):
            return CrowdHumanEvaluator(dataset_name, output_dir=folder)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=folder)

    evaluator = make_evaluator(output_folder)
    if cfg.MODEL.SPARSE_RCNN.EVAL_PER_STAGE:
        num_stages = cfg.MODEL.SPARSE_RCNN.NUM_STAGES
        evaluator = PerStageEvaluator(evaluator, make_evaluator, num_stages, output_folder)
    return evaluator


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


# ------------------------------------------------------------------------------------------------
# Training that does not die: non-finite steps skipped, pre-flight checks, resumable data order
# ------------------------------------------------------------------------------------------------
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
            paper = checks.paper_lr(self.ims_per_batch)
            raise FloatingPointError(
                f"Training diverged: {self.consecutive_skips} steps in a row skipped at iteration "
                f"{self.iter} ({problem}). The likely cause is the learning rate: the current LR "
                f"is {lr:g} (SOLVER.BASE_LR {self.base_lr:g}), the paper's AdamW LR for "
                f"SOLVER.IMS_PER_BATCH {self.ims_per_batch} is {paper:.3g}. Lower SOLVER.BASE_LR "
                f"(e.g. SOLVER.BASE_LR {paper:.3g}) and keep SOLVER.CLIP_GRADIENTS enabled; if "
                "the LR is right, check the data for broken boxes."
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

    Late in Dynamic Sparse R-CNN training, subnormal floats slow CPU steps down: from a trained
    quick-config model, 0.89 s per step with flushing off and 0.74 s with it on (1 thread,
    2026-12-02, ``benchmarks/ablate_dynamic.py --variants dynamic --late-steps 30``; 0.9 s vs 0.39 s
    when issue 13 was filed). The flag is a setting of the process, not of a module, so it is made
    here rather than inside the model.
    """
    setup_package_logger(output_dir)
    if comm.get_world_size() > 1:
        checks.apply_cpu_threads()  # see checks.cpu_threads_per_process
    if str(device) == "cpu":
        torch.set_flush_denormal(True)


def load_model_weights(model, cfg, resume: bool = False) -> None:
    """``DetectionCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume)`` with a missing or
    corrupt checkpoint reported with its path."""
    checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    _resume_or_load(checkpointer, cfg.MODEL.WEIGHTS, resume)


def _repair_last_checkpoint(checkpointer) -> None:
    """A run killed while writing ``last_checkpoint`` leaves it empty (or naming a file that is not
    there): tag the newest ``model_*.pth`` of the folder instead, with a warning."""
    path = checkpointer.get_checkpoint_file()
    if os.path.isfile(path):
        return
    folder = checkpointer.save_dir
    candidates = sorted(
        f for f in os.listdir(folder) if f.startswith("model_") and f.endswith(".pth")
    )
    final = [f for f in candidates if f == "model_final.pth"]
    newest = (final or candidates[-1:] or [None])[-1]
    logger.warning(
        f"{os.path.join(folder, 'last_checkpoint')} names {path!r}, which does not exist (a run "
        f"killed while saving?); resuming from {newest or 'nothing (no model_*.pth there)'}."
    )
    if newest is not None:
        checkpointer.tag_last_checkpoint(newest)
    else:
        os.remove(os.path.join(folder, "last_checkpoint"))


def _resume_or_load(checkpointer, weights: str, resume: bool, load=None):
    if resume and checkpointer.has_checkpoint():
        _repair_last_checkpoint(checkpointer)
    if resume and checkpointer.has_checkpoint():
        path = checkpointer.get_checkpoint_file()
    else:
        path = weights
        checks.check_weights_file(path)
    with checks.explain_checkpoint_errors(path):
        if load is not None:
            return load()
        return checkpointer.resume_or_load(weights, resume=resume)


class RobustTrainerMixin:
    """Mix into ``DefaultTrainer`` (``class Trainer(RobustTrainerMixin, DefaultTrainer)``):

    - before training: the LR warning and the test datasets' classes (the train datasets are
      checked by :func:`build_sparse_rcnn_train_loader`);
    - non-finite steps skipped (:class:`NonFiniteSkippingTrainer`; AMP keeps Detectron2's
      AMPTrainer, whose GradScaler skips steps with non-finite gradients itself);
    - the data order saved in checkpoints and continued on ``--resume``
      (:class:`ResumableLoaderHook`);
    - a missing or corrupt checkpoint reported with its path.
    """

    def __init__(self, cfg):
        checks.check_learning_rate(cfg)
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
        if isinstance(self._trainer.data_loader, ResumableTrainLoader):
            self.register_hooks([ResumableLoaderHook(self._trainer.data_loader)])

    def resume_or_load(self, resume=True):
        parent = super(RobustTrainerMixin, self).resume_or_load
        _resume_or_load(
            self.checkpointer, self.cfg.MODEL.WEIGHTS, resume, load=lambda: parent(resume=resume)
        )
