#!/usr/bin/env python
"""Train and evaluate Sparse R-CNN / Dynamic Sparse R-CNN with Detectron2.

    python train_net.py --config-file configs/sparse_rcnn_R_50_FPN_100pro_3x.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file ... --resume
    python train_net.py --config-file configs/sparse_rcnn_quick_cpu.yaml   # CPU, built-in data
    python train_net.py --config-file configs/sparse_rcnn_quick_cpu.py train.max_iter=100  # LazyConfig

The trainer is Detectron2's DefaultTrainer with the Sparse R-CNN pieces: the paper's data mapper,
AdamW with a backbone LR multiplier and full-model gradient clipping, and COCOEvaluator.
A ``.py`` (LazyConfig) config runs through ``sparse_rcnn.lazy_engine.main_lazy`` instead, with the
same features and Detectron2's ``train.*`` keys, overridden as ``key=value``.
"""

import logging
import os
from collections import OrderedDict

from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks, launch

from sparse_rcnn.checkpoint import load_model_weights
from sparse_rcnn.config import get_sparse_rcnn_cfg
from sparse_rcnn.data_loaders import build_sparse_rcnn_test_loader, build_sparse_rcnn_train_loader
from sparse_rcnn.distributed import cpu_threads_per_process, enable_cpu_distributed_training
from sparse_rcnn.evaluation import build_sparse_rcnn_evaluator
from sparse_rcnn.lazy_engine import is_lazy_config, main_lazy
from sparse_rcnn.runtime import check_amp_device, check_device, setup_process_runtime
from sparse_rcnn.solver import build_optimizer
from sparse_rcnn.test_time_augmentation import SparseRCNNWithTTA
from sparse_rcnn.trainer import RobustTrainerMixin

logger = logging.getLogger("detectron2")


class Trainer(RobustTrainerMixin, DefaultTrainer):
    """DefaultTrainer with Sparse R-CNN's data mapper, optimizer and evaluator, pre-flight checks,
    non-finite steps skipped and a data order that ``--resume`` continues (RobustTrainerMixin)."""

    @classmethod
    def build_train_loader(cls, cfg):
        return build_sparse_rcnn_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_sparse_rcnn_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_sparse_rcnn_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate with test-time augmentation (cfg.TEST.AUG); results as "bbox_TTA"."""
        logger.info("Running inference with test-time augmentation ...")
        model = SparseRCNNWithTTA(cfg, model)
        cfg = cfg.clone()  # the TTA model returns no per-stage detections
        cfg.defrost()
        cfg.MODEL.SPARSE_RCNN.EVAL_PER_STAGE = False
        evaluators = [
            cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA", name))
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, model, evaluators)
        return OrderedDict({k + "_TTA": v for k, v in res.items()})


def setup(args):
    """Config from file and command line, Detectron2's default set-up (logging, seed, output dir)."""
    cfg = get_sparse_rcnn_cfg(args.config_file, args.opts)
    check_device(cfg)  # CUDA asked for but not available: an error that says how to use the CPU
    amp = cfg.SOLVER.AMP.ENABLED and not args.eval_only
    check_amp_device(
        cfg.MODEL.DEVICE,
        amp,
        amp_key="SOLVER.AMP.ENABLED",
        device_key="MODEL.DEVICE",
        fix="SOLVER.AMP.ENABLED False",
    )
    cfg.freeze()
    default_setup(cfg, args)
    if cfg.MODEL.DEVICE == "cpu":
        logger.info("MODEL.DEVICE cpu: running on the CPU.")
    return cfg


def main(args):
    if is_lazy_config(args.config_file):
        return main_lazy(args)
    cfg = setup(args)
    enable_cpu_distributed_training()
    setup_process_runtime(cfg.MODEL.DEVICE, cfg.OUTPUT_DIR)  # logging, CPU threads, subnormals
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_model_weights(model, cfg, resume=args.resume)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks(
            [hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))]
        )
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    cpu_threads_per_process(args.num_gpus)  # each local process its share of the cores
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
