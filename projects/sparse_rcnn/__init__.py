"""Sparse R-CNN and Dynamic Sparse R-CNN for Detectron2.

Importing the package registers ``SparseRCNN`` in Detectron2's ``META_ARCH_REGISTRY`` and our heads,
matchers, criteria and proposal generators in the registries of this package.
"""

from .builtin_datasets import (
    SYNTHETIC_SHAPES_CLASSES,
    prepare_builtin_dataset,
    prepare_synthetic_shapes,
    register_synthetic_shapes,
)
from .config import add_sparse_rcnn_config
from .criterion import SPARSE_RCNN_CRITERION_REGISTRY, SetCriterion, build_criterion
from .crowdhuman import register_all_crowdhuman, register_crowdhuman
from .crowdhuman_evaluation import CrowdHumanEvaluator
from .dataset_mapper import SparseRCNNDatasetMapper, build_sparse_rcnn_augmentation
from .detector import SparseRCNN
from .dynamic_proposals import DynamicProposalGenerator
from .head import SPARSE_RCNN_HEAD_REGISTRY, DynamicConv, DynamicHead, DynamicStage
from .mask_head import QueryInstMaskHead
from .matcher import SPARSE_RCNN_MATCHER_REGISTRY, HungarianMatcher, build_matcher
from .ota import OTAMatcher
from .proposals import SPARSE_RCNN_PROPOSAL_REGISTRY, LearnableProposals
from .solver import build_optimizer
from .test_time_augmentation import SparseRCNNWithTTA

register_synthetic_shapes()  # lazy: files are generated on first load / prepare_synthetic_shapes()
register_all_crowdhuman()  # lazy: crowdhuman_{train,val} under $DETECTRON2_DATASETS, read on load

__all__ = [k for k in globals().keys() if not k.startswith("_")]
