# Sparse R-CNN R-50-FPN, 100 proposals, 3x (paper table 1: 42.8 AP on COCO val). LazyConfig twin of
# sparse_rcnn_R_50_FPN_100pro_3x.yaml: the same model, data, optimizer and schedule.
#   python train_net.py --config-file configs/sparse_rcnn_R_50_FPN_100pro_3x.py --num-gpus 8
from .common.data.coco import dataloader
from .common.models.sparse_rcnn import model
from .common.optim import AdamW as optimizer
from .common.schedule import lr_multiplier_3x as lr_multiplier
from .common.test_time_augmentation import tta
from .common.train import train

train.output_dir = "output/sparse_rcnn_R_50_FPN_100pro_3x"
