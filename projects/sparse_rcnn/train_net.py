"""Train and evaluate Sparse R-CNN / Dynamic Sparse R-CNN with Detectron2, from a yaml config or a
LazyConfig (``.py``) alike; ``python -m sparse_rcnn.train_net`` or the checkout's ``train_net.py``.

    python train_net.py --config-file configs/sparse_rcnn_R_50_FPN_100pro_3x.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file ... --resume
    python train_net.py --config-file configs/sparse_rcnn_quick_cpu.py train.max_iter=100  # .py
    python -m sparse_rcnn.train_net --config-file configs/sparse_rcnn_quick_cpu.yaml \
        --register-coco trees_train trees/train.json trees/images DATASETS.TRAIN "('trees_train',)"

A yaml config takes ``KEY VALUE`` options, a ``.py`` config ``key=value`` overrides; both run
through the same trainer (``sparse_rcnn.trainer.SparseRCNNTrainer``: Detectron2's DefaultTrainer
with the paper's data mapper, AdamW with a backbone LR multiplier and full-model gradient
clipping, pre-flight checks, non-finite steps skipped, a data order that ``--resume`` continues,
and the config's evaluator). ``--register-coco NAME JSON IMAGE_ROOT`` (repeatable) registers a
COCO-format dataset; the number of classes is then taken from the training set unless the command
line gives it (``sparse_rcnn.custom_datasets``). docs/configs.md lists the features and keys.
"""

import logging

from detectron2.engine import default_argument_parser, default_setup, launch

from .config_loader import config_reader, load_config, require_keys
from .custom_datasets import (
    add_register_coco_argument,
    opts_with_dataset_num_classes,
    register_from_args,
)
from .distributed import cpu_threads_per_process, enable_cpu_distributed_training
from .runtime import check_amp_device, setup_process_runtime
from .trainer import SparseRCNNTrainer

logger = logging.getLogger("detectron2")

Trainer = SparseRCNNTrainer


def setup(args):
    """Config from file and command line (either system), the device checked, Detectron2's default
    set-up (logging, seed, output dir, the config saved there)."""
    cfg = load_config(args.config_file, args.opts)
    require_keys(cfg, ("model", "dataloader", "train"), "train_net.py")
    run = config_reader(cfg)
    run.check_device()  # CUDA asked for but not available: an error that says how to use the CPU
    check_amp_device(
        run.device,
        run.amp and not args.eval_only,
        amp_key=run.keys["amp"],
        device_key=run.keys["device"],
        fix=run.option("amp", False),
    )
    run.freeze()
    default_setup(cfg, args)
    if run.device == "cpu":
        logger.info(f"{run.option('device', 'cpu')}: running on the CPU.")
    return cfg


def main(args):
    register_from_args(args)  # in every process: launch() starts new ones
    args.opts = opts_with_dataset_num_classes(args.config_file, args.opts)
    cfg = setup(args)
    run = config_reader(cfg)
    enable_cpu_distributed_training()
    setup_process_runtime(run.device, run.output_dir)  # logging, CPU threads, subnormals
    if args.eval_only:
        model = Trainer.build_model(run)
        Trainer.load_weights(run, model, resume=args.resume)
        model.eval()
        results = Trainer.test(run, model)
        if run.tta_enabled:
            results.update(Trainer.test_with_TTA(run, model))
        return results
    trainer = Trainer(cfg)  # with TTA enabled, it evaluates with TTA at the end too
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def get_parser():
    """Detectron2's ``default_argument_parser`` with ``--register-coco NAME JSON IMAGE_ROOT``."""
    return add_register_coco_argument(default_argument_parser())


def cli(argv=None):
    """``python train_net.py`` / ``python -m sparse_rcnn.train_net``: parse, then ``launch``."""
    args = get_parser().parse_args(argv)
    print("Command Line Args:", args)
    cpu_threads_per_process(args.num_gpus)  # each local process its share of the cores
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
