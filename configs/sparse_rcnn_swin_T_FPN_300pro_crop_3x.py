# Sparse R-CNN with Detectron2's Swin-T (detectron2.modeling.backbone.swin) + FPN, 300 proposals,
# random crop, 3x: the R-50 300-proposal crop config with the backbone swapped in one line (the
# Sparse R-CNN paper's appendix reports 47.9 AP with a Swin backbone; DiffusionDet ships Swin
# configs built on this code). The head, loss, data and optimizer are unchanged.
# Set train.init_checkpoint to ImageNet Swin-T weights converted to Detectron2's names
# (backbone.bottom_up.*); without it the backbone starts from scratch.
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.swin import SwinTransformer

from .sparse_rcnn_R_50_FPN_300pro_crop_3x import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
    tta,
)

model.backbone.bottom_up = L(SwinTransformer)(
    embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2
)
model.backbone.in_features = ["p0", "p1", "p2", "p3"]  # Swin's outputs, strides 4 to 32
train.init_checkpoint = ""
train.output_dir = "output/sparse_rcnn_swin_T_FPN_300pro_crop_3x"
