"""The train and test loaders of Sparse R-CNN: the paper's data mapper on Detectron2's loaders,
the datasets checked against the model first, and a train stream that ``--resume`` continues.

Both builders are ``@configurable``: a yaml config calls them with ``cfg``
(``build_sparse_rcnn_train_loader(cfg)``), a LazyConfig names them in ``dataloader.train`` /
``dataloader.test`` (``configs/common/data/coco.py``) with the same arguments, so that both config
systems get the same loaders and checks.
"""

import logging
from typing import Callable, Dict, List, Optional, Sequence, Union

from detectron2.config import configurable
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.utils import comm

from . import dataset_checks
from .dataset_mapper import SparseRCNNDatasetMapper
from .resumable_loader import ResumableTrainLoader

__all__ = ["build_sparse_rcnn_train_loader", "build_sparse_rcnn_test_loader", "check_datasets"]

logger = logging.getLogger(__name__)

YAML_NUM_CLASSES_KEY = "MODEL.SPARSE_RCNN.NUM_CLASSES"
LAZY_NUM_CLASSES_KEY = "model.num_classes"


def _train_loader_from_config(cfg) -> Dict:
    names = list(cfg.DATASETS.TRAIN)
    dicts = dataset_checks.load_dataset_dicts(
        names,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    # The classes are checked before the mapper and the sampler are built.
    check_datasets(names, cfg.MODEL.SPARSE_RCNN.NUM_CLASSES, dicts, YAML_NUM_CLASSES_KEY)
    mapper = SparseRCNNDatasetMapper(cfg, is_train=True)
    sampler = None
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        from detectron2.data.build import _train_loader_from_config as detectron2_loader_args

        sampler = detectron2_loader_args(cfg, mapper=mapper, dataset=dicts)["sampler"]
    return {
        "dataset": dicts,
        "mapper": mapper,
        "total_batch_size": cfg.SOLVER.IMS_PER_BATCH,
        "num_classes": cfg.MODEL.SPARSE_RCNN.NUM_CLASSES,
        "dataset_names": names,
        "aspect_ratio_grouping": cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
        "sampler": sampler,
        "checked": True,
        "num_classes_key": YAML_NUM_CLASSES_KEY,
        "batch_size_key": "SOLVER.IMS_PER_BATCH",
    }


@configurable(from_config=_train_loader_from_config)
def build_sparse_rcnn_train_loader(
    *,
    dataset: List[Dict],
    mapper: Callable,
    total_batch_size: int,
    num_classes: int,
    dataset_names: Union[str, Sequence[str]] = (),
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    sampler=None,
    seed: Optional[int] = None,
    checked: bool = False,
    num_classes_key: str = LAZY_NUM_CLASSES_KEY,
    batch_size_key: str = "dataloader.train.total_batch_size",
):
    """The train loader of Sparse R-CNN.

    The datasets are checked against the model first (:func:`check_datasets`: their classes, and
    the annotations the mapper drops counted once). Without a ``sampler`` it is a
    :class:`ResumableTrainLoader`: Detectron2's ``TrainingSampler`` order, continued where it
    stopped on ``--resume``; a ``sampler`` (yaml: ``DATALOADER.SAMPLER_TRAIN`` other than
    "TrainingSampler") uses Detectron2's loader, whose stream restarts on ``--resume``.

    Args:
        dataset: the training records (``dataset_checks.load_dataset_dicts``).
        mapper: record -> model input (``SparseRCNNDatasetMapper(is_train=True)``).
        total_batch_size: images per step over all processes.
        num_classes: the model's number of classes, which the datasets must fit.
        dataset_names: the datasets of ``dataset`` (their metadata's ``thing_classes`` is checked).
        aspect_ratio_grouping: batch landscape and portrait images separately.
        num_workers: data-loader worker processes.
        sampler: a Detectron2 sampler instead of the resumable stream.
        seed: the stream's seed (default: a seed shared by all processes, saved in checkpoints).
        checked: the datasets were checked already (by the yaml ``from_config``).
        num_classes_key, batch_size_key: the config keys named in error messages.
    """
    if not checked:
        check_datasets(
            dataset_checks.dataset_names(dataset_names), num_classes, dataset, num_classes_key
        )
    if sampler is not None:
        logger.warning(
            f"Train sampler {type(sampler).__name__}: --resume restarts its data stream (only the "
            "default TrainingSampler order is continued where it stopped)."
        )
        return build_detection_train_loader(
            dataset=dataset,
            mapper=mapper,
            sampler=sampler,
            total_batch_size=total_batch_size,
            aspect_ratio_grouping=aspect_ratio_grouping,
            num_workers=num_workers,
        )
    world_size = comm.get_world_size()
    if total_batch_size % world_size:
        raise ValueError(
            f"{batch_size_key} {total_batch_size} must be divisible by the number of "
            f"processes ({world_size})"
        )
    return ResumableTrainLoader(
        dataset,
        mapper,
        batch_size=total_batch_size // world_size,
        aspect_ratio_grouping=aspect_ratio_grouping,
        num_workers=num_workers,
        seed=seed,
    )


def check_datasets(
    names: Sequence[str],
    num_classes: int,
    dicts: Optional[List[Dict]] = None,
    key: str = YAML_NUM_CLASSES_KEY,
) -> None:
    """The model's ``num_classes`` (config key ``key``) against the datasets ``names`` (their
    metadata, and the records ``dicts`` if given); the mapper's dropped annotations counted once.
    Raises ValueError."""
    names = list(names)
    for name in names:
        dataset_checks.check_dataset_classes(name, None, num_classes, key)
    if dicts is not None:
        label = "+".join(names) if names else "the dataset"
        dataset_checks.check_dataset_classes(label, dicts, num_classes, key)
        dataset_checks.count_invalid_annotations(label, dicts)


def _test_loader_from_config(cfg, dataset_name: str) -> Dict:
    proposal_files = None
    if cfg.MODEL.LOAD_PROPOSALS:
        proposal_files = [
            cfg.DATASETS.PROPOSAL_FILES_TEST[list(cfg.DATASETS.TEST).index(dataset_name)]
        ]
    dicts = dataset_checks.load_dataset_dicts(
        [dataset_name], filter_empty=False, proposal_files=proposal_files
    )
    return {
        "dataset": dicts,
        "mapper": SparseRCNNDatasetMapper(cfg, is_train=False),
        "num_classes": cfg.MODEL.SPARSE_RCNN.NUM_CLASSES,
        "dataset_names": [dataset_name],
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
        "num_classes_key": YAML_NUM_CLASSES_KEY,
    }


@configurable(from_config=_test_loader_from_config)
def build_sparse_rcnn_test_loader(
    *,
    dataset: List[Dict],
    mapper: Callable,
    num_classes: int,
    dataset_names: Union[str, Sequence[str]] = (),
    num_workers: int = 0,
    num_classes_key: str = LAZY_NUM_CLASSES_KEY,
):
    """Detectron2's test loader; the dataset is checked against ``num_classes`` first, so that
    ``--eval-only`` with a model that does not fit stops before inference. Arguments as
    :func:`build_sparse_rcnn_train_loader`'s (yaml: ``build_sparse_rcnn_test_loader(cfg, name)``).
    """
    check_datasets(
        dataset_checks.dataset_names(dataset_names), num_classes, dataset, num_classes_key
    )
    return build_detection_test_loader(dataset=dataset, mapper=mapper, num_workers=num_workers)
