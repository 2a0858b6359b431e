"""Config keys of Sparse R-CNN and Dynamic Sparse R-CNN.

Every default is the one of the Sparse R-CNN paper (section 4, "Training details") and of the
official implementation (PeizeSun/SparseR-CNN, ``sparsercnn/config.py``), unless a comment says
otherwise. The official code names this node ``MODEL.SparseRCNN``; ours is ``MODEL.SPARSE_RCNN``.
"""
from detectron2.config import CfgNode as CN


def add_sparse_rcnn_config(cfg: CN) -> None:
    """Add the ``MODEL.SPARSE_RCNN`` node and the solver keys the trainer needs to ``cfg``."""
    cfg.MODEL.SPARSE_RCNN = CN()
    _C = cfg.MODEL.SPARSE_RCNN
    # Number of foreground classes (sigmoid classification: no background logit).
    _C.NUM_CLASSES = 80
    # N, the number of learnable proposal boxes and proposal features (paper: 100; "*" models 300).
    _C.NUM_PROPOSALS = 100
    # How the proposal boxes start, in normalised (cx, cy, w, h) (paper table 6):
    # "image": whole image (0.5, 0.5, 1, 1), the default; "center": (0.5, 0.5, 0.1, 0.1);
    # "grid": a regular grid of cells covering the image; "random": Gaussian centres and sizes.
    _C.PROPOSAL_BOX_INIT = "image"
    # Which proposal generator builds the stage-1 boxes and features (registry
    # SPARSE_RCNN_PROPOSAL_REGISTRY): "LearnableProposals" (Sparse R-CNN) or
    # "DynamicProposalGenerator" (Dynamic Sparse R-CNN).
    _C.PROPOSAL_GENERATOR = "LearnableProposals"

    # ---- Dynamic head (paper section 3.3 and figure 3) ----
    _C.HEAD_NAME = "DynamicHead"  # registry SPARSE_RCNN_HEAD_REGISTRY
    _C.HIDDEN_DIM = 256  # d, width of proposal features
    _C.NHEADS = 8  # attention heads of the self-attention between proposals
    _C.DROPOUT = 0.0
    _C.DIM_FEEDFORWARD = 2048  # FFN width
    _C.ACTIVATION = "relu"  # FFN activation
    _C.NUM_CLS = 1  # layers of the classification tower (Linear, LayerNorm, ReLU)
    _C.NUM_REG = 3  # layers of the regression tower
    _C.NUM_STAGES = 6  # iterative stages (the official key is NUM_HEADS)
    _C.NUM_DYNAMIC = 2  # generated 1x1 convolutions in the dynamic instance interaction
    _C.DIM_DYNAMIC = 64  # their inner width (d -> 64 -> d)
    # Box deltas (dx, dy, dw, dh) are decoded by Box2BoxTransform with these weights.
    _C.BBOX_REG_WEIGHTS = (2.0, 2.0, 1.0, 1.0)

    # ---- Set prediction loss (paper eq. 1) ----
    _C.MATCHER_NAME = "HungarianMatcher"  # registry SPARSE_RCNN_MATCHER_REGISTRY
    _C.CRITERION_NAME = "SetCriterion"  # registry SPARSE_RCNN_CRITERION_REGISTRY
    _C.CLASS_WEIGHT = 2.0  # lambda_cls, for matching cost and loss
    _C.L1_WEIGHT = 5.0  # lambda_L1
    _C.GIOU_WEIGHT = 2.0  # lambda_giou
    # Every stage gets its own loss terms (loss_*_stage1 ... loss_*_stage6).
    _C.DEEP_SUPERVISION = True
    # Sigmoid focal loss; the classification bias starts at -log((1 - p) / p).
    _C.ALPHA = 0.25
    _C.GAMMA = 2.0
    _C.PRIOR_PROB = 0.01

    # ---- Inference ----
    # Detections with a score not above this are dropped. 0.0 keeps all top-k results, which is
    # what COCO evaluation wants (the official code ignores any threshold).
    _C.SCORE_THRESH_TEST = 0.0
    # Class-aware NMS at inference (Dynamic Sparse R-CNN uses it at IoU 0.7). Off for Sparse R-CNN.
    _C.NMS_ENABLED = False
    _C.NMS_THRESH_TEST = 0.7

    # ---- Solver (used by sparse_rcnn.solver.build_optimizer) ----
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # "ADAMW" or "SGD"
    # LR multiplier of every parameter whose name contains "backbone".
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
