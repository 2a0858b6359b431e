# Dynamic Sparse R-CNN R-50-FPN (Hong et al., CVPR 2022, table 1: 47.2 AP): Sparse R-CNN's
# 300-proposal crop setting with DPG + DLA. LazyConfig twin of
# dynamic_sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml; choices: docs/dynamic_sparse_rcnn.md.
from .common.models.dynamic_sparse_rcnn import model
from .sparse_rcnn_R_50_FPN_300pro_crop_3x import dataloader, lr_multiplier, optimizer, train, tta

train.output_dir = "output/dynamic_sparse_rcnn_R_50_FPN_300pro_crop_3x"
