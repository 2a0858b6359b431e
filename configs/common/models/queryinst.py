"""QueryInst R-50-FPN, 100 queries: Sparse R-CNN's model (``common/models/sparse_rcnn.py``) with
QueryInst's mask head, the model of ``queryinst_R_50_FPN_1x.yaml`` as a LazyConfig.

``model.mask_head`` is the LazyConfig form of ``MODEL.MASK_ON``: ``mask_head`` below adds QueryInst's
masks to any Sparse R-CNN or Dynamic Sparse R-CNN model (``model.mask_head = mask_head``; None drops
them). Its data needs instance masks: ``dataloader.train.mapper.use_instance_mask = True`` (with a
crop, ``recompute_boxes = True`` as the yaml path does) and ``dataloader.evaluator.tasks`` with
"segm". Every choice and its source: docs/queryinst.md.
"""

from detectron2.config import LazyCall as L

from sparse_rcnn import QueryInstMaskHead
from sparse_rcnn.poolers import FastROIPooler

from .sparse_rcnn import model

# One dynamic mask head per stage: RoIAlignV2 14x14 (sampling ratio 2) on P2-P5, the dynamic mask
# interaction (C -> dim_dynamic -> C), 4 convs 3x3 of 256 channels with BN, deconv to 28x28,
# class-specific mask logits. Dice loss weight 8 (model.criterion.mask_weight).
mask_head = L(QueryInstMaskHead)(
    mask_pooler=L(FastROIPooler)(
        output_size=14,
        scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
        sampling_ratio=2,
        pooler_type="ROIAlignV2",
    ),
    num_stages="${..head.num_stages}",
    num_classes="${..num_classes}",
    hidden_dim="${..head.hidden_dim}",
    dim_dynamic="${..head.dim_dynamic}",
    num_conv=4,
    conv_dim=256,
    norm="BN",
)

model.mask_head = mask_head
model.criterion.mask_weight = 8.0
