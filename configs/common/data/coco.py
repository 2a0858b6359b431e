"""COCO 2017 with the augmentation of Sparse R-CNN (paper section 4, official mapper): random flip,
multi-scale 480-800 short side (max 1333); with a crop type (the "crop" models), half of the
samples are first resized to 400/500/600 and randomly cropped to 384-600. Test: 800 / 1333.
Images are RGB (torchvision-pretrained backbones). Empty images are kept (the official config).
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from sparse_rcnn import SparseRCNNDatasetMapper
from sparse_rcnn.dataset_mapper import sparse_rcnn_train_augmentation

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train", filter_empty=False),
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
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(SparseRCNNDatasetMapper)(
        is_train=False,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333, sample_style="choice"),
        ],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)

# Box AP; results go to {train.output_dir}/inference.
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    tasks=("bbox",),
    output_dir="${train.output_dir}/inference",
)
