# Sparse R-CNN R-101-FPN, 300 proposals, random crop, 3x (paper table 1: 46.4 AP). LazyConfig twin
# of sparse_rcnn_R_101_FPN_300pro_crop_3x.yaml.
from .sparse_rcnn_R_50_FPN_300pro_crop_3x import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
    tta,
)

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-101.pkl"
train.output_dir = "output/sparse_rcnn_R_101_FPN_300pro_crop_3x"
