#!/usr/bin/env python
"""Train and evaluate Sparse R-CNN / Dynamic Sparse R-CNN with Detectron2 (yaml or LazyConfig).

    python train_net.py --config-file configs/sparse_rcnn_R_50_FPN_100pro_3x.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file configs/sparse_rcnn_quick_cpu.py train.max_iter=100
    python train_net.py --config-file ... --register-coco NAME JSON IMAGE_ROOT DATASETS.TRAIN ...

The code is ``sparse_rcnn.train_net`` (``python -m sparse_rcnn.train_net`` from an installed
package); this file is the entry point of a checkout, as in Detectron2's projects.
"""

from sparse_rcnn.train_net import Trainer, cli, get_parser, main, setup  # noqa: F401

if __name__ == "__main__":
    cli()
