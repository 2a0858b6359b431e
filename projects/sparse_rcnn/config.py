"""Config keys of Sparse R-CNN and Dynamic Sparse R-CNN.

Every default is the one of the Sparse R-CNN paper (section 4, "Training details") and of the
official implementation (PeizeSun/SparseR-CNN, ``sparsercnn/config.py``), unless a comment says
otherwise. The official code names this node ``MODEL.SparseRCNN``; ours is ``MODEL.SPARSE_RCNN``.
"""

from typing import Optional, Sequence

from detectron2.config import CfgNode as CN

# Short sides of the resize before the random crop (official, for COCO-size images). The one copy:
# the yacs key INPUT.CROP.RESIZE_SIZES and sparse_rcnn_train_augmentation's default use it.
CROP_RESIZE_SIZES = (400, 500, 600)


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
    # RoI pooler of the head: "fast" (sparse_rcnn.poolers.FastROIPooler: the same features and
    # gradients as Detectron2's ROIPooler with a much faster CPU backward; it uses ROIPooler's
    # path on CUDA; needs ROI_BOX_HEAD.POOLER_TYPE ROIAlign(V2) and POOLER_SAMPLING_RATIO > 0)
    # or "detectron2" (detectron2.modeling.poolers.ROIPooler). Not in the official code.
    _C.POOLER_IMPL = "fast"
    _C.HIDDEN_DIM = 256  # d, width of proposal features
    _C.NHEADS = 8  # attention heads of the self-attention between proposals
    _C.DROPOUT = 0.0
    _C.DIM_FEEDFORWARD = 2048  # FFN width
    _C.ACTIVATION = "relu"  # FFN activation: relu or gelu (glu is rejected: it halves the width)
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
    # Evaluate every stage's detections too (COCO AP per stage, Dynamic Sparse R-CNN figure 6).
    _C.EVAL_PER_STAGE = False
    # Detections kept per image (Detectron2's key; its default is 100). 0: the number of proposals,
    # as the official code (top-k over proposals x classes with k = NUM_PROPOSALS), whose numbers
    # the Sparse R-CNN paper reports. N > 0: the best N after the score threshold and NMS, a prefix
    # of the detections with any larger value (docs/evaluation.md).
    cfg.TEST.DETECTIONS_PER_IMAGE = 0

    # ---- Dynamic Sparse R-CNN (Hong et al., CVPR 2022; docs/dynamic_sparse_rcnn.md) ----
    # Dynamic label assignment (DLA, section 3.2): used when MATCHER_NAME is "OTAMatcher".
    _C.OTA = CN()
    _C.OTA.SINKHORN_EPS = 0.1  # entropic regularisation of the Sinkhorn-Knopp solver (OTA: 0.1)
    _C.OTA.SINKHORN_ITERS = 50  # Sinkhorn-Knopp iterations (OTA: 50)
    # Dynamic k: k = max(1, int(sum of each GT's top-q IoUs with the predictions)), as OTA converts
    # it (paper: q = 8).
    _C.OTA.TOP_Q = 8
    # > 0: every GT supplies this fixed k instead of the dynamic k (paper table 3, "fixed k").
    _C.OTA.FIXED_K = 0
    # At most this fraction of the proposals is positive (paper: 80%, i.e. >= 20% negatives): if
    # the units k* sum to more than this x N, all are scaled by one factor to sum to that.
    _C.OTA.MAX_POSITIVE_FRACTION = 0.8
    # Unit increasing strategy (eq. 2): k* = max(1, k - UNIT_STEP * (T - t)) at stage t = 1 ... T,
    # on the integer k, not rounded (fractional supplies, e.g. 3.5) (paper: on, step 0.5).
    _C.OTA.UNIT_INCREASING = True
    _C.OTA.UNIT_STEP = 0.5
    # alpha of eq. 1: positive cost = class cost + alpha * (L1 + GIoU terms, weighted by L1_WEIGHT
    # and GIOU_WEIGHT). The paper gives no value; 1.0 = the Hungarian matching cost.
    _C.OTA.REG_WEIGHT = 1.0
    # Background (negative assignment) cost. "full_focal": full focal loss of the all-zero target
    # vs the full focal loss of the GT's one-hot target for positives (consistent; the default).
    # "neg_focal": focal loss of "no object" vs the Hungarian cost (a literal reading of eq. 1).
    _C.OTA.BG_COST = "full_focal"
    # Loss normaliser of SetCriterion: "num_gt" (Sparse R-CNN, official) or "num_positives" (the
    # number of matched pairs of each stage, averaged over processes; the DLA configs use it).
    _C.LOSS_NORMALIZE_BY = "num_gt"
    # Table 3's "two losses": also add the one-to-one Hungarian loss of every stage
    # (loss_*_stage{t}_o2o) to the many-to-one OTA loss. Off for Sparse R-CNN; on in the full DLA.
    _C.TWO_LOSSES = False
    # Dynamic proposal generation (DPG, section 3.3): used when PROPOSAL_GENERATOR is
    # "DynamicProposalGenerator".
    _C.DPG = CN()
    _C.DPG.NUM_EXPERTS = 4  # N_e (paper: 4, table 5)
    # Softmax temperature over the experts, annealed linearly from TAU_START to TAU_END over the
    # first TAU_ANNEAL_ITERS training iterations (dynamic convolution: 30 -> 1 over 10 epochs;
    # 73300 iterations = 10 COCO epochs at batch 16; the paper gives no length). TAU_END at
    # inference.
    _C.DPG.TAU_START = 30.0
    _C.DPG.TAU_END = 1.0
    _C.DPG.TAU_ANNEAL_ITERS = 73300
    # Staircase aggregation of P2-P5 in the expert-weight network (paper: on; table 2 row 2 off).
    _C.DPG.STAIRCASE = True
    _C.DPG.FC_DIM = 1500  # width of the first FC layer (paper: 900 x 1500)
    _C.DPG.GRID_SIZE = 30  # fused features are interpolated to GRID_SIZE x GRID_SIZE (paper: 30)

    # ---- QueryInst instance masks (Fang et al., ICCV 2021; docs/queryinst.md) ----
    # Used when MODEL.MASK_ON (Detectron2's key) is True: a dynamic mask head per stage
    # (sparse_rcnn.mask_head), trained with the Dice loss on every stage's matched positives. The
    # defaults are QueryInst's (mmdetection's DynamicMaskHead). The mask pooler shares POOLER_IMPL
    # and ROI_BOX_HEAD.POOLER_TYPE with the box pooler; the dynamic mask interaction's inner width
    # is DIM_DYNAMIC, as the box branch's.
    _C.MASK_POOLER_RESOLUTION = 14  # S: RoIAlign S x S; masks are 2S x 2S (28 x 28)
    _C.MASK_POOLER_SAMPLING_RATIO = 2
    _C.MASK_NUM_CONV = 4  # 3x3 convolutions after the dynamic mask interaction
    _C.MASK_CONV_DIM = 256  # their channels
    _C.MASK_NORM = "BN"  # their normalisation (Detectron2's get_norm names; "" for none)
    _C.MASK_WEIGHT = 8.0  # weight of the Dice loss

    # ---- Data (used by sparse_rcnn.dataset_mapper) ----
    # With INPUT.CROP.ENABLED, half of the training samples are first resized to one of these short
    # sides, then randomly cropped (INPUT.CROP.TYPE/SIZE), then multi-scale resized (official).
    cfg.INPUT.CROP.RESIZE_SIZES = CROP_RESIZE_SIZES

    # ---- Solver (used by sparse_rcnn.solver.build_optimizer) ----
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # "ADAMW" or "SGD"
    # LR multiplier of every parameter whose name contains "backbone".
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0

    # ---- Test-time augmentation (sparse_rcnn.test_time_augmentation.SparseRCNNWithTTA) ----
    # Detectron2 defines TEST.AUG.ENABLED (False: train_net.py --eval-only also evaluates with TTA
    # when True, as "bbox_TTA"), MAX_SIZE (4000, the official value) and FLIP (True: every scale
    # also flipped). The official values of the other keys (sparsercnn/config.py):
    # Short sides of the augmented copies: 13 scales x 2 flips = 26 forward passes per image.
    cfg.TEST.AUG.MIN_SIZES = (400, 500, 600, 640, 700, 900, 1000, 1100, 1200, 1300, 1400, 1800, 800)
    # Per-scale box-size filter: at MIN_SIZES[i] keep only boxes with SCALE_RANGES[i][0] <
    # sqrt(area) < SCALE_RANGES[i][1], in pixels of that copy (official: on).
    cfg.TEST.AUG.SCALE_FILTER = True
    cfg.TEST.AUG.SCALE_RANGES = (
        [96, 10000], [96, 10000], [64, 10000], [64, 10000], [64, 10000], [0, 10000], [0, 10000],
        [0, 256], [0, 256], [0, 192], [0, 192], [0, 96], [0, 10000],
    )  # fmt: skip
    # How the copies' detections are merged: "soft_vote" (class-aware soft box voting, the official
    # "cvpods TTA"), "vote" (the same without the soft copies) or "nms" (class-aware NMS, what
    # Detectron2's GeneralizedRCNNWithTTA does). Every copy gives its top NUM_PROPOSALS; at most
    # TEST.DETECTIONS_PER_IMAGE merged detections are kept (0: NUM_PROPOSALS, the official).
    cfg.TEST.AUG.MERGE = "soft_vote"
    cfg.TEST.AUG.VOTE_THRESH = 0.65  # IoU with the top box from which a box votes in its group
    # Soft voting also keeps each group member with score * (1 - IoU with the top box) if >= this.
    cfg.TEST.AUG.SOFT_VOTE_MIN_SCORE = 0.05
    # IoU of the "nms" merge (the official non-cvpods path: ROI_HEADS.NMS_THRESH_TEST, 0.5).
    cfg.TEST.AUG.NMS_THRESH = 0.5
    # Augmented copies per forward pass. 2 runs a scale and its flip together (same size, so no
    # padding); the official code ran one copy at a time. Larger values pad smaller copies.
    cfg.TEST.AUG.BATCH_SIZE = 2


def get_sparse_rcnn_cfg(config_file: Optional[str] = None, opts: Sequence = ()) -> CN:
    """Detectron2's default config with our keys, merged from ``config_file`` (a yaml path) and
    ``opts`` (``[key, value, ...]`` as on a command line; values may be strings or Python values).
    """
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_sparse_rcnn_config(cfg)
    if config_file is not None:
        cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    return cfg
