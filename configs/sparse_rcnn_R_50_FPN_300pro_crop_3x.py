# Sparse R-CNN R-50-FPN, 300 proposals, random crop, 3x (paper table 1: 45.0 AP). LazyConfig twin
# of sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml.
from .sparse_rcnn_R_50_FPN_100pro_3x import dataloader, lr_multiplier, model, optimizer, train, tta

model.proposal_generator.num_proposals = 300
dataloader.train.mapper.augmentations.crop_type = "absolute_range"
train.output_dir = "output/sparse_rcnn_R_50_FPN_300pro_crop_3x"
