"""COCO 2017 with the augmentation of Sparse R-CNN (paper section 4, official mapper): random flip,
multi-scale 480-800 short side (max 1333); with a crop type (the "crop" models), half of the
samples are first resized to 400/500/600 and randomly cropped to 384-600. Test: 800 / 1333.
Images are RGB (torchvision-pretrained backbones). Empty images are kept (the official config).

The loaders and the evaluator are the ones a yaml config gets (``sparse_rcnn.data_loaders``,
``sparse_rcnn.evaluation``): the datasets are checked against ``model.num_classes`` before the
first iteration (and the annotations the mapper drops counted once), a missing dataset names
``DETECTRON2_DATASETS``, the train stream is a ``ResumableTrainLoader`` (``--resume`` continues it
where it stopped), and the evaluator is COCO box AP, or CrowdHuman's AP / mMR / Recall on a
CrowdHuman dataset, per stage too with ``model.output_all_stages=True``.
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from omegaconf import OmegaConf

from sparse_rcnn import SparseRCNNDatasetMapper
from sparse_rcnn.data_loaders import build_sparse_rcnn_test_loader, build_sparse_rcnn_train_loader
from sparse_rcnn.dataset_checks import load_dataset_dicts
from sparse_rcnn.dataset_mapper import sparse_rcnn_train_augmentation
from sparse_rcnn.evaluation import build_sparse_rcnn_evaluator

dataloader = OmegaConf.create()

dataloader.train = L(build_sparse_rcnn_train_loader)(
    dataset=L(load_dataset_dicts)(names="coco_2017_train", filter_empty=False),
    dataset_names="${.dataset.names}",
    mapper=L(SparseRCNNDatasetMapper)(
        is_train=True,
        augmentations=L(sparse_rcnn_train_augmentation)(
            min_size=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
            max_size=1333,
            sample_style="choice",
            random_flip="horizontal",
            crop_type=None,  # "absolute_range" for the crop models
            crop_size=(384, 600),
            crop_resize_sizes=(400, 500, 600),
            crop_prob=0.5,
        ),
        image_format="RGB",
    ),
    total_batch_size=16,
    aspect_ratio_grouping=True,
    num_workers=4,
    num_classes="${model.num_classes}",
)

dataloader.test = L(build_sparse_rcnn_test_loader)(
    dataset=L(load_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    dataset_names="${.dataset.names}",
    mapper=L(SparseRCNNDatasetMapper)(
        is_train=False,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333, sample_style="choice"),
        ],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
    num_classes="${model.num_classes}",
)

# Box AP (CrowdHuman's metrics on a CrowdHuman dataset); results go to
# {train.output_dir}/inference/{dataset}; every stage's too with model.output_all_stages=True.
dataloader.evaluator = L(build_sparse_rcnn_evaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${train.output_dir}/inference/${..test.dataset.names}",
    per_stage="${model.output_all_stages}",
    num_stages="${model.head.num_stages}",
)
