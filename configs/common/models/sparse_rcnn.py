"""Sparse R-CNN R-50-FPN, 100 proposals, 6 stages: the model of ``Base-SparseRCNN.yaml`` as a
LazyConfig (it builds the same modules, parameter names and outputs as the yaml config;
``tests/test_lazy_config.py``). Swap any piece in one line, e.g. the backbone::

    model.backbone.bottom_up.stages.depth = 101
"""

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from sparse_rcnn import DynamicHead, HungarianMatcher, LearnableProposals, SetCriterion, SparseRCNN
from sparse_rcnn.poolers import FastROIPooler

model = L(SparseRCNN)(
    # ImageNet-pretrained torchvision ResNet (STRIDE_IN_1X1 False), frozen BN, stem + res2 frozen.
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN"),
            out_features=["res2", "res3", "res4", "res5"],
            freeze_at=2,
        ),
        in_features="${.bottom_up.out_features}",
        out_channels="${..head.hidden_dim}",
        top_block=L(LastLevelMaxPool)(),
    ),
    # N learnable proposal boxes (whole image, paper table 6 "image") and features.
    proposal_generator=L(LearnableProposals)(
        num_proposals=100, hidden_dim="${..head.hidden_dim}", box_init="image"
    ),
    head=L(DynamicHead)(
        # RoIAlignV2 7x7 on P2-P5 (the order of model.in_features), sampling ratio 2.
        box_pooler=L(FastROIPooler)(
            output_size=7,
            scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
            sampling_ratio=2,
            pooler_type="ROIAlignV2",
        ),
        num_classes="${..num_classes}",
        hidden_dim=256,
        num_stages=6,
        nheads=8,
        dim_feedforward=2048,
        dropout=0.0,
        activation="relu",
        num_cls=1,
        num_reg=3,
        num_dynamic=2,
        dim_dynamic=64,
        prior_prob=0.01,
        bbox_reg_weights=(2.0, 2.0, 1.0, 1.0),
    ),
    # Set loss: focal 2.0, L1 5.0, GIoU 2.0 on every stage; the matcher uses the same weights.
    criterion=L(SetCriterion)(
        matcher=L(HungarianMatcher)(
            cost_class="${..class_weight}",
            cost_bbox="${..l1_weight}",
            cost_giou="${..giou_weight}",
            alpha="${..alpha}",
            gamma="${..gamma}",
        ),
        num_classes="${..num_classes}",
        class_weight=2.0,
        l1_weight=5.0,
        giou_weight=2.0,
        alpha=0.25,
        gamma=2.0,
        deep_supervision=True,
    ),
    in_features=["p2", "p3", "p4", "p5"],
    num_classes=80,
    # RGB input with torchvision's ImageNet mean/std (dataloader image_format "RGB").
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    score_thresh_test=0.0,
    nms_thresh_test=None,
    # At most this many detections per image; 0: the number of proposals (the official top-k).
    detections_per_image=0,
    output_all_stages=False,
)
