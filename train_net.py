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

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch

from sparse_rcnn import add_sparse_rcnn_config
from sparse_rcnn.engine import (
    build_sparse_rcnn_evaluator,
    build_sparse_rcnn_test_loader,
    build_sparse_rcnn_train_loader,
    enable_cpu_distributed_training,
)
from sparse_rcnn.lazy_engine import is_lazy_config, main_lazy
from sparse_rcnn.solver import build_optimizer

logger = logging.getLogger("detectron2")


class Trainer(DefaultTrainer):
    """DefaultTrainer with Sparse R-CNN's data mapper, optimizer and evaluator."""

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


def setup(args):
    """Config from file and command line, Detectron2's default set-up (logging, seed, output dir)."""
    cfg = get_cfg()
    add_sparse_rcnn_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda") and not args.eval_only:
        raise ValueError(
            "SOLVER.AMP.ENABLED needs a CUDA device (Detectron2's AMPTrainer trains with CUDA "
            f"autocast only), but MODEL.DEVICE is {cfg.MODEL.DEVICE!r}: set SOLVER.AMP.ENABLED False"
        )
    cfg.freeze()
    default_setup(cfg, args)
    if cfg.MODEL.DEVICE == "cpu":
        logger.info("No CUDA device: running on the CPU.")
    return cfg


def main(args):
    if is_lazy_config(args.config_file):
        return main_lazy(args)
    cfg = setup(args)
    enable_cpu_distributed_training()
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
