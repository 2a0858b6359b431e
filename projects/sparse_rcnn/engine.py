"""Training-loop pieces shared by ``train_net.py``, the demo and the tests."""

import functools
import logging
import os

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import defaults
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from .crowdhuman_evaluation import CrowdHumanEvaluator, is_crowdhuman_dataset
from .evaluation import PerStageEvaluator

from .builtin_datasets import prepare_builtin_dataset
from .dataset_mapper import SparseRCNNDatasetMapper

logger = logging.getLogger(__name__)


def build_sparse_rcnn_train_loader(cfg):
    """Detectron2's train loader with the paper's augmentation (:class:`SparseRCNNDatasetMapper`)."""
    for name in cfg.DATASETS.TRAIN:
        prepare_builtin_dataset(name)
    return build_detection_train_loader(cfg, mapper=SparseRCNNDatasetMapper(cfg, is_train=True))


def build_sparse_rcnn_test_loader(cfg, dataset_name: str):
    prepare_builtin_dataset(dataset_name)
    return build_detection_test_loader(
        cfg, dataset_name, mapper=SparseRCNNDatasetMapper(cfg, is_train=False)
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
        return COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=folder)

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
