# Sparse R-CNN on CrowdHuman (paper appendix A, table 11: AP 89.2, mMR 48.3, Recall 95.9 on val).
# LazyConfig twin of sparse_rcnn_R_50_FPN_500pro_crowdhuman.yaml, whose comments give the choices.
# Evaluated with the CrowdHuman protocol (dataloader.evaluator picks CrowdHumanEvaluator for the
# CrowdHuman datasets: AP, mMR, Recall at IoU 0.5), never with COCO AP.
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from .sparse_rcnn_R_50_FPN_100pro_3x import dataloader, model, optimizer, train, tta

model.num_classes = 1  # person (full-body box)
model.proposal_generator.num_proposals = 500
# All 500 detections per image, no NMS: the protocol needs them (CrowdHuman images hold more than
# 100 people).
model.detections_per_image = 500

dataloader.train.dataset.names = "crowdhuman_train"
dataloader.train.mapper.augmentations.min_size = (640, 672, 704, 736, 768, 800)
dataloader.train.mapper.augmentations.max_size = 1500
dataloader.test.dataset.names = "crowdhuman_val"

# 50 epochs of the 15000 training images at 16 images per step, LR / 10 at epoch 40.
train.max_iter = 46875
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1], milestones=[37500], num_updates=train.max_iter
    ),
    warmup_length=1000 / train.max_iter,
    warmup_method="linear",
    warmup_factor=0.01,
)
train.checkpointer.period = 5000
train.eval_period = 5000
train.output_dir = "output/sparse_rcnn_R_50_FPN_500pro_crowdhuman"
