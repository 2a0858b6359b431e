"""Training and evaluation from a LazyConfig (``.py``) config, for ``train_net.py``.

What Detectron2's ``tools/lazyconfig_train_net.py`` does, with the features of train_net.py's yaml
path: the config's ``train`` keys are those of Detectron2's ``configs/common/train.py``
(``train.max_iter``, ``train.output_dir``, ``train.init_checkpoint``, ``train.amp.enabled``,
``train.eval_period``, ``train.checkpointer``, ``train.ddp``, ``train.log_period``,
``train.device``, ``train.seed``), command-line overrides are ``key=value``
(``LazyConfig.apply_overrides``), and the config holds ``model``, ``dataloader.train`` /
``.test`` / ``.evaluator``, ``optimizer`` (its ``params.model`` is set to the model here) and
``lr_multiplier``. Built-in (synthetic) datasets named in the dataloaders are generated first.
"""

import logging
from typing import Dict, List

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_setup,
    default_writers,
    defaults,
    hooks,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from .builtin_datasets import prepare_builtin_dataset
from .checkpoint import InferenceCheckpointer, SafeDetectionCheckpointer
from .distributed import enable_cpu_distributed_training
from .runtime import check_amp_device, check_cuda_available, setup_process_runtime
from .trainer import NonFiniteSkippingTrainer

__all__ = ["is_lazy_config", "setup_lazy", "build_trainer", "do_test", "do_train", "main_lazy"]

logger = logging.getLogger("detectron2")


def is_lazy_config(config_file: str) -> bool:
    """Whether ``config_file`` is a LazyConfig (``.py``); yaml configs end in ``.yaml``/``.yml``."""
    return str(config_file).endswith(".py")


def _dataset_names(dataset_cfg) -> List[str]:
    names = dataset_cfg.get("names", []) if dataset_cfg is not None else []
    return [names] if isinstance(names, str) else list(names)


def _prepare_datasets(cfg, split: str) -> None:
    """Generate the built-in datasets that ``cfg.dataloader[split]`` reads (others: untouched)."""
    loader = cfg.dataloader.get(split)
    if loader is not None:
        for name in _dataset_names(loader.get("dataset")):
            prepare_builtin_dataset(name)


def setup_lazy(args):
    """Load the config, apply ``key=value`` overrides, check the device, Detectron2's set-up."""
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    for key in ("model", "dataloader", "train"):
        if key not in cfg:
            raise KeyError(f"The LazyConfig {args.config_file} has no '{key}': see configs/*.py")
    device = str(cfg.train.device)
    # No silent switch to the CPU: a COCO config would start a 270k-iteration run there.
    check_cuda_available(
        device,
        key="train.device",
        fix="add `train.device=cpu` to the train_net.py command line",
        advice="On a CPU, configs/sparse_rcnn_quick_cpu.py (built-in data) is the one to try.",
    )
    amp = cfg.train.amp.enabled and not args.eval_only
    check_amp_device(
        device,
        amp,
        amp_key="train.amp.enabled",
        device_key="train.device",
        fix="train.amp.enabled=False",
    )
    default_setup(cfg, args)
    if cfg.train.device == "cpu":
        logger.info("train.device is cpu: running on the CPU.")
    return cfg


def do_test(cfg, model) -> Dict:
    """Evaluate ``model`` with ``dataloader.evaluator`` on ``dataloader.test``; nothing (``{}``)
    without an evaluator (``dataloader.evaluator=null`` on the command line)."""
    if cfg.dataloader.get("evaluator") is None:
        return {}
    _prepare_datasets(cfg, "test")
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def build_trainer(cfg, model, train_loader, optimizer) -> SimpleTrainer:
    """The yaml path's trainer: :class:`NonFiniteSkippingTrainer` (a step with non-finite
    predictions, loss or gradient norm is skipped; the run stops, naming the LR, after 5 in a row),
    with ``optimizer.lr`` and ``dataloader.train.total_batch_size`` for its message; Detectron2's
    AMPTrainer with ``train.amp.enabled`` (CUDA, which handles non-finite steps itself)."""
    if cfg.train.amp.enabled:
        return AMPTrainer(model, train_loader, optimizer)
    return NonFiniteSkippingTrainer(
        model,
        train_loader,
        optimizer,
        base_lr=float(cfg.optimizer.lr),
        ims_per_batch=int(cfg.dataloader.train.total_batch_size),
    )


def do_train(args, cfg) -> Dict:
    """Train with :func:`build_trainer`'s trainer: LR schedule,
    periodic checkpoints, periodic and final evaluation, console / ``metrics.json`` / TensorBoard.

    Returns:
        The results of the last evaluation ({} if none ran).
    """
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    _prepare_datasets(cfg, "train")
    train_loader = instantiate(cfg.dataloader.train)

    model = defaults.create_ddp_model(model, **cfg.train.ddp)  # CPU-aware after enable_cpu_...
    trainer = build_trainer(cfg, model, train_loader, optimizer)
    checkpointer = SafeDetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    last_results = {}

    def test_and_keep():
        last_results.clear()
        last_results.update(do_test(cfg, model))
        return last_results

    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if comm.is_main_process()
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, test_and_keep),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if comm.is_main_process()
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if args.resume and checkpointer.has_checkpoint():
        start_iter = trainer.iter + 1  # the checkpoint's iteration has been completed
    else:
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)
    return dict(last_results)


def main_lazy(args):
    """``train_net.py``'s entry point for a ``.py`` config: train, or ``--eval-only``."""
    cfg = setup_lazy(args)
    enable_cpu_distributed_training()
    setup_process_runtime(
        cfg.train.device, cfg.train.output_dir
    )  # logging, CPU threads, subnormals
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = defaults.create_ddp_model(model)
        InferenceCheckpointer(model, save_dir=cfg.train.output_dir).resume_or_load(
            cfg.train.init_checkpoint, resume=args.resume
        )
        return do_test(cfg, model)
    return do_train(args, cfg)
