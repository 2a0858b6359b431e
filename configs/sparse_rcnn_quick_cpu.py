# The quick CPU model as a LazyConfig (twin of sparse_rcnn_quick_cpu.yaml, whose comments give the
# reasons): from scratch on the built-in synthetic dataset on CPU, a ResNet-18 FPN (BN), a
# 128-d head, 50 grid-initialised proposals, 3 stages, cosine LR 6e-4 over 1300 iterations.
#   python train_net.py --config-file configs/sparse_rcnn_quick_cpu.py
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import ResNet

from .common.schedule import cosine_schedule
from .sparse_rcnn_R_50_FPN_100pro_3x import dataloader, model, optimizer, train, tta

model.backbone.bottom_up.stem.norm = "BN"
model.backbone.bottom_up.stages = L(ResNet.make_default_stages)(depth=18, norm="BN")
model.backbone.bottom_up.freeze_at = 0
model.num_classes = 3
model.proposal_generator.num_proposals = 50
model.proposal_generator.box_init = "grid"
model.head.hidden_dim = 128
model.head.dim_feedforward = 512
model.head.dim_dynamic = 32
model.head.num_stages = 3

dataloader.train.dataset.names = "synthetic_shapes_train"
dataloader.train.mapper.augmentations.min_size = (112, 128, 144)
dataloader.train.mapper.augmentations.max_size = 192
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "synthetic_shapes_val"
dataloader.test.mapper.augmentations[0].short_edge_length = 128
dataloader.test.mapper.augmentations[0].max_size = 192
dataloader.test.num_workers = 1

optimizer.lr = 6e-4
train.max_iter = 1300
lr_multiplier = cosine_schedule(max_iter=train.max_iter, warmup_iters=50)
train.init_checkpoint = ""
train.device = "cpu"
train.checkpointer.period = 100000
train.eval_period = 0
train.output_dir = "output/quick_cpu_lazy"
