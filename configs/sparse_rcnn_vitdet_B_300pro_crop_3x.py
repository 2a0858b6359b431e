# Sparse R-CNN with a plain ViT-B and ViTDet's SimpleFeaturePyramid (Li et al., 2022; Detectron2's
# detectron2.modeling.ViT / SimpleFeaturePyramid as in configs/common/models/mask_rcnn_vitdet.py),
# 300 proposals, random crop, 3x: the R-50 300-proposal crop config with the backbone swapped. The
# pyramid gives P2-P5 (strides 4-32) from the stride-16 ViT output. As ViTDet: layer-wise LR decay
# 0.7 over the 12 blocks; MAE-pretrained weights (train.init_checkpoint, a local copy where nothing
# can be downloaded). No square padding: Sparse R-CNN's multi-scale images are up to 1333 px long
# (ViTDet pads to 1024 x 1024 after its LSJ crop); the ViT interpolates its position embedding.
from functools import partial

import torch.nn as nn
from detectron2.config import LazyCall as L
from detectron2.modeling import SimpleFeaturePyramid, ViT
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate

from .sparse_rcnn_R_50_FPN_300pro_crop_3x import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
    tta,
)

model.backbone = L(SimpleFeaturePyramid)(
    net=L(ViT)(
        img_size=1024,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        drop_path_rate=0.1,
        window_size=14,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        window_block_indexes=[0, 1, 3, 4, 6, 7, 9, 10],  # blocks 2, 5, 8, 11: global attention
        residual_block_indexes=[],
        use_rel_pos=True,
        out_feature="last_feat",
    ),
    in_feature="${.net.out_feature}",
    out_channels="${..head.hidden_dim}",
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
    square_pad=0,
)
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
train.init_checkpoint = "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_base.pth"
train.output_dir = "output/sparse_rcnn_vitdet_B_300pro_crop_3x"
