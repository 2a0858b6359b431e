"""Dynamic Sparse R-CNN R-50-FPN, 300 proposals: the model of
``dynamic_sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml`` as a LazyConfig. Sparse R-CNN's model with
dynamic proposal generation (DPG), the optimal-transport label assignment (DLA) with the loss
normalised by the number of positives plus the one-to-one "two losses", and NMS at IoU 0.7.
Every choice the paper leaves open: docs/dynamic_sparse_rcnn.md.
"""

from detectron2.config import LazyCall as L

from sparse_rcnn import DynamicProposalGenerator, HungarianMatcher, OTAMatcher

from .sparse_rcnn import model

model.proposal_generator = L(DynamicProposalGenerator)(
    num_proposals=300,
    hidden_dim="${..head.hidden_dim}",
    in_channels=["${...head.hidden_dim}"] * 4,  # P2-P5 of the FPN
    num_experts=4,
    box_init="image",
    staircase=True,
    grid_size=30,
    fc_dim=1500,
    tau_start=30.0,
    tau_end=1.0,
    tau_anneal_iters=73300,
)
model.criterion.matcher = L(OTAMatcher)(
    num_stages="${...head.num_stages}",
    cost_class="${..class_weight}",
    cost_bbox="${..l1_weight}",
    cost_giou="${..giou_weight}",
    reg_weight=1.0,
    alpha="${..alpha}",
    gamma="${..gamma}",
    top_q=8,
    fixed_k=0,
    unit_increasing=True,
    unit_step=0.5,
    max_positive_fraction=0.8,
    background_cost="full_focal",
    sinkhorn_eps=0.1,
    sinkhorn_iters=50,
)
model.criterion.normalize_by = "num_positives"
model.criterion.one_to_one_matcher = L(HungarianMatcher)(
    cost_class="${..class_weight}",
    cost_bbox="${..l1_weight}",
    cost_giou="${..giou_weight}",
    alpha="${..alpha}",
    gamma="${..gamma}",
)
model.nms_thresh_test = 0.7
