"""The train and test loaders of Sparse R-CNN: the paper's data mapper on Detectron2's loaders,
the datasets checked against the model first, and a train stream that ``--resume`` continues."""

import logging

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.utils import comm

from . import dataset_checks
from .builtin_datasets import prepare_builtin_dataset
from .dataset_mapper import SparseRCNNDatasetMapper
from .resumable_loader import ResumableTrainLoader

logger = logging.getLogger(__name__)


def build_sparse_rcnn_train_loader(cfg):
    """The train loader with the paper's augmentation (:class:`SparseRCNNDatasetMapper`).

    The datasets are checked against the model first (:func:`dataset_checks.check_dataset_classes`, and
    the annotations the mapper drops are counted once). With ``DATALOADER.SAMPLER_TRAIN``
    "TrainingSampler" (the default) it is a :class:`ResumableTrainLoader`: Detectron2's sampler
    order, continued where it stopped on ``--resume``; other samplers use Detectron2's loader.
    """
    names = list(cfg.DATASETS.TRAIN)
    for name in names:
        prepare_builtin_dataset(name)
    dicts = dataset_checks.load_dataset_dicts(
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
        dataset_checks.check_dataset_classes(name, None, num_classes)
    if dicts is not None:
        label = names[0] if len(names) == 1 else "+".join(names)
        dataset_checks.check_dataset_classes(label, dicts, num_classes)
        dataset_checks.count_invalid_annotations(label, dicts)


def build_sparse_rcnn_test_loader(cfg, dataset_name: str):
    """Detectron2's test loader; the dataset is checked against NUM_CLASSES first, so that
    ``--eval-only`` with a model that does not fit stops before inference."""
    prepare_builtin_dataset(dataset_name)
    proposal_files = None
    if cfg.MODEL.LOAD_PROPOSALS:
        proposal_files = [
            cfg.DATASETS.PROPOSAL_FILES_TEST[list(cfg.DATASETS.TEST).index(dataset_name)]
        ]
    dicts = dataset_checks.load_dataset_dicts(
        [dataset_name], filter_empty=False, proposal_files=proposal_files
    )
    check_datasets(cfg, [dataset_name], dicts)
    return build_detection_test_loader(
        dataset=dicts,
        mapper=SparseRCNNDatasetMapper(cfg, is_train=False),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
