"""The ``train`` keys of Detectron2's LazyConfig ``configs/common/train.py`` (same names, read by
train_net.py as by Detectron2's ``tools/lazyconfig_train_net.py``) with Sparse R-CNN's values."""

train = dict(
    output_dir="./output",
    # ImageNet-pretrained backbone (a local copy where nothing can be downloaded).
    init_checkpoint="detectron2://ImageNetPretrained/torchvision/R-50.pkl",
    max_iter=270000,
    amp=dict(enabled=False),  # CUDA autocast (Detectron2's AMPTrainer); matching and loss stay fp32
    ddp=dict(  # options for DistributedDataParallel
        broadcast_buffers=False,
        find_unused_parameters=False,
        fp16_compression=False,
    ),
    checkpointer=dict(period=10000, max_to_keep=100),
    eval_period=7330,  # about one COCO epoch at 16 images per step
    log_period=20,
    device="cuda",  # without CUDA train_net.py stops with an error: set train.device=cpu
    seed=40244023,
)
