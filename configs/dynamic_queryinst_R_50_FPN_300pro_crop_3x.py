# QueryInst's mask head on Dynamic Sparse R-CNN R-50-FPN (300 queries, crop, 3x). LazyConfig twin of
# dynamic_queryinst_R_50_FPN_300pro_crop_3x.yaml: Dynamic Sparse R-CNN's config with the mask head.
from .common.models.queryinst import mask_head
from .dynamic_sparse_rcnn_R_50_FPN_300pro_crop_3x import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.mask_head = mask_head
model.criterion.mask_weight = 8.0
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.instance_mask_format = "polygon"
dataloader.train.mapper.recompute_boxes = True  # boxes of the cropped masks, as the yaml path
dataloader.evaluator.tasks = ("bbox", "segm")
train.output_dir = "output/dynamic_queryinst_R_50_FPN_300pro_crop_3x"
