# QueryInst R-50-FPN, 100 queries, 1x, single-scale training (mmdetection model zoo: 42.0 box AP,
# 37.5 mask AP). LazyConfig twin of queryinst_R_50_FPN_1x.yaml: the same model, data, optimizer and
# schedule (the authors' optimizer, as Sparse R-CNN's; docs/queryinst.md).
#   python train_net.py --config-file configs/queryinst_R_50_FPN_1x.py --num-gpus 8
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from .common.models.queryinst import model
from .sparse_rcnn_R_50_FPN_100pro_3x import dataloader, optimizer, train

dataloader.train.mapper.augmentations.min_size = (800,)
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.instance_mask_format = "polygon"
dataloader.evaluator.tasks = ("bbox", "segm")

# 12 epochs at 16 images per step, LR / 10 after epochs 8 and 11, warm-up from 0.001.
train.max_iter = 87960
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[58640, 80630],
        num_updates=87960,
    ),
    warmup_length=1000 / 87960,
    warmup_method="linear",
    warmup_factor=0.001,
)
train.output_dir = "output/queryinst_R_50_FPN_1x"
