"""Dynamic proposal generation of Dynamic Sparse R-CNN, and the Dynamic Sparse R-CNN configs."""

import math

import pytest
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from conftest import CONFIG_DIR, build_tiny_model, make_cfg
from sparse_rcnn.dynamic_proposals import DynamicProposalGenerator, annealed_temperature
from sparse_rcnn.matcher import HungarianMatcher
from sparse_rcnn.ota import OTAMatcher
from sparse_rcnn.proposals import LearnableProposals

C, N, E = 8, 12, 3
LEVEL_SIZES = [(32, 40), (16, 20), (8, 10), (4, 5)]  # P2-P5 of a 128 x 160 padded input


def make_dpg(**kwargs):
    torch.manual_seed(0)
    args = dict(
        num_proposals=N,
        hidden_dim=C,
        in_channels=[C] * 4,
        num_experts=E,
        box_init="random",
        fc_dim=64,
        tau_anneal_iters=100,
    )
    args.update(kwargs)
    return DynamicProposalGenerator(**args)


def make_features(batch=2, sizes=LEVEL_SIZES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, C, h, w, generator=g) for h, w in sizes]


WHWH = torch.tensor([[160.0, 128.0, 160.0, 128.0], [120.0, 100.0, 120.0, 100.0]])


def test_shapes_and_eq3():
    dpg = make_dpg()
    features = make_features()
    boxes, proposal_features = dpg(features, WHWH)
    assert boxes.shape == (2, N, 4) and proposal_features.shape == (2, N, C)
    assert len(dpg.stairs) == 3
    assert [s.in_channels for s in dpg.stairs] == [C, 2 * C, 3 * C]
    assert all(s.groups == s.in_channels and s.stride == (2, 2) for s in dpg.stairs)
    assert dpg.fc1.in_features == 900 and dpg.fc2.out_features == E * N
    # Eq. 3: per-proposal weighted sums of the experts (normalised cxcywh, scaled to each image).
    weights = dpg.expert_weights(features)
    mixed = (weights[..., None] * dpg.expert_boxes[None]).sum(dim=1)  # (B, N, 4) cxcywh
    cx, cy, w, h = mixed.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * WHWH[:, None]
    torch.testing.assert_close(boxes, xyxy)
    expected_features = (weights[..., None] * dpg.expert_features[None]).sum(dim=1)
    torch.testing.assert_close(proposal_features, expected_features)


def test_expert_weights_sum_to_one_and_tau():
    dpg = make_dpg()
    features = make_features()
    weights = dpg.expert_weights(features, tau=1.0)
    assert weights.shape == (2, E, N) and (weights > 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, N))
    uniform = dpg.expert_weights(features, tau=1e6)
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1.0 / E), atol=1e-4, rtol=0)
    # A larger temperature flattens the distribution.
    spread = [float((dpg.expert_weights(features, tau=t) - 1 / E).abs().max()) for t in (1, 5, 30)]
    assert spread[0] > spread[1] > spread[2]


def test_different_images_get_different_proposals():
    dpg = make_dpg()
    features = make_features()
    same_size = WHWH[:1].expand(2, 4)
    boxes, proposal_features = dpg(features, same_size)
    assert not torch.allclose(boxes[0], boxes[1])
    assert not torch.allclose(proposal_features[0], proposal_features[1])
    # A plain Sparse R-CNN gives every image the same proposals.
    plain = LearnableProposals(num_proposals=N, hidden_dim=C)
    boxes, proposal_features = plain(features, same_size)
    assert torch.equal(boxes[0], boxes[1])
    assert torch.equal(proposal_features[0], proposal_features[1])


@pytest.mark.parametrize("staircase", [True, False])
def test_gradients_reach_experts_and_weight_network(staircase):
    dpg = make_dpg(staircase=staircase)
    features = [f.requires_grad_() for f in make_features()]
    boxes, proposal_features = dpg(features, WHWH)
    (boxes.sin().sum() + proposal_features.sin().sum()).backward()
    params = dict(dpg.named_parameters())
    expected = {"expert_boxes", "expert_features", "fc1.weight", "fc1.bias", "fc2.weight"}
    if staircase:
        expected |= {f"stairs.{i}.weight" for i in range(3)}
    else:
        assert not any(name.startswith("stairs") for name in params)
    for name in expected:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)


def test_staircase_switch_and_odd_sizes():
    features = make_features()
    with_stairs = make_dpg(staircase=True).fused_map(features)
    without = make_dpg(staircase=False).fused_map(features)
    assert with_stairs.shape == without.shape == (2, 900)
    assert not torch.allclose(with_stairs, without)
    # Without the staircase: every level's channel sum, bilinearly resized to 30 x 30, summed.
    expected = sum(
        torch.nn.functional.interpolate(f.sum(1, keepdim=True), size=(30, 30), mode="bilinear")
        for f in features
    ).flatten(1)
    torch.testing.assert_close(without, expected)
    # Levels that do not halve exactly (an unpadded input) are resized to fit.
    odd = make_features(sizes=[(33, 41), (17, 21), (9, 11), (5, 6)])
    boxes, _ = make_dpg(grid_size=7)(odd, WHWH)
    assert boxes.shape == (2, N, 4) and torch.isfinite(boxes).all()


def _hand_made_dpg(staircase):
    """Two experts of two proposals on one-channel P2-P5 of 4x4, 2x2, 1x1 and 1x1, every
    depth-wise 3x3 kernel all ones (bias 0, the second stair's second channel 1), a 1 x 1 map
    (grid_size 1), FC 1 -> 1 (weight 0.01, ReLU) and FC 1 -> 4 (weights 1, 0, 0, 2)."""
    dpg = DynamicProposalGenerator(
        num_proposals=2, hidden_dim=3, in_channels=[1, 1, 1, 1], num_experts=2,
        staircase=staircase, grid_size=1, fc_dim=1,
    )  # fmt: skip
    with torch.no_grad():
        for conv in dpg.stairs:
            conv.weight.fill_(1.0)
            conv.bias.zero_()
        if staircase:
            dpg.stairs[1].bias[1] = 1.0
        dpg.fc1.weight.fill_(0.01)
        dpg.fc1.bias.zero_()
        dpg.fc2.weight.copy_(torch.tensor([[1.0], [0.0], [0.0], [2.0]]))
        dpg.fc2.bias.zero_()
        # Expert 0 and expert 1 boxes, normalised (cx, cy, w, h).
        dpg.expert_boxes.copy_(
            torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 0.5]],
                          [[0.5, 0.5, 0.6, 0.8], [0.75, 0.5, 0.5, 0.5]]])  # fmt: skip
        )
    return dpg


def _hand_made_levels():
    p2 = torch.arange(16.0).view(1, 1, 4, 4)  # rows 0-3, 4-7, 8-11, 12-15
    p3 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    return [p2, p3, torch.full((1, 1, 1, 1), 5.0), torch.full((1, 1, 1, 1), -1.0)]


@pytest.mark.parametrize("staircase", [True, False])
def test_expert_weights_worked_by_hand(staircase):
    dpg = _hand_made_dpg(staircase)
    if staircase:
        # Stair 1 (3x3 ones, stride 2, padding 1) on P2: windows rows/cols {-1,0,1} and {1,2,3}:
        # (0,0) 0+1+4+5 = 10, (0,1) 1+2+3+5+6+7 = 24, (1,0) 4+5+8+9+12+13 = 51,
        # (1,1) 5+6+7+9+10+11+13+14+15 = 90. Concatenated with P3: 2 channels, 2x2.
        # Stair 2 on 2x2 -> 1x1, the window (-1..1, -1..1) covers all four: 10+24+51+90 = 175
        # and 1+2+3+4 + bias 1 = 11. With P4: (175, 11, 5). Stair 3 on 1x1 (only the centre
        # tap inside): (175, 11, 5). With P5: (175, 11, 5, -1); summed: 190.
        fused = 190.0
    else:
        # Each level's channel sum resized to 1x1 (bilinear, align_corners False: the centre
        # sample at (size / 2 - 0.5)): P2 (5+6+9+10)/4 = 7.5, P3 (1+2+3+4)/4 = 2.5, P4 5, P5 -1.
        fused = 14.0
    features = _hand_made_levels()
    torch.testing.assert_close(dpg.fused_map(features), torch.tensor([[fused]]))
    h = 0.01 * fused  # FC1 and ReLU
    for tau in (1.0, 2.0):
        # FC2 logits, viewed (experts, proposals): [[h, 0], [0, 2h]], softmax over the experts.
        w0 = [1 / (1 + math.exp(-h / tau)), 1 / (1 + math.exp(2 * h / tau))]  # expert 0's
        expected = torch.tensor([[w0, [1 - w0[0], 1 - w0[1]]]])
        torch.testing.assert_close(dpg.expert_weights(features, tau=tau), expected)
    # Eq. 3 on the 100 x 80 image, proposal 0: cx, cy 0.5; w 0.2 w0 + 0.6 (1 - w0); h likewise.
    dpg.eval()  # tau_end = 1
    boxes, _ = dpg(features, torch.tensor([[100.0, 80.0, 100.0, 80.0]]))
    a = 1 / (1 + math.exp(-h))
    w, hh = 0.2 * a + 0.6 * (1 - a), 0.4 * a + 0.8 * (1 - a)
    expected_box = [50 - 50 * w, 40 - 40 * hh, 50 + 50 * w, 40 + 40 * hh]
    torch.testing.assert_close(boxes[0, 0], torch.tensor(expected_box))


def test_temperature_follows_the_training_iteration():
    assert annealed_temperature(0) == 30.0
    assert annealed_temperature(36650) == pytest.approx(15.5)
    assert annealed_temperature(73300) == 1.0 and annealed_temperature(10**6) == 1.0
    assert annealed_temperature(5, anneal_iters=0) == 1.0

    dpg = make_dpg()  # 30 -> 1 over 100 iterations
    features = make_features()
    dpg.train()
    assert dpg.temperature() == 1.0  # no event storage: not inside a training loop
    for start_iter, tau in [(0, 30.0), (50, 15.5), (100, 1.0), (250, 1.0)]:
        with EventStorage(start_iter) as storage:
            assert dpg.temperature() == pytest.approx(tau)
            torch.testing.assert_close(
                dpg.expert_weights(features), dpg.expert_weights(features, tau=tau)
            )
            storage.iter = start_iter + 10  # what the trainer does before each step: resumes
            expected = annealed_temperature(start_iter + 10, 30, 1, 100)
            assert dpg.temperature() == pytest.approx(expected)
    dpg.eval()
    with EventStorage(0):
        assert dpg.temperature() == 1.0  # inference: tau_end
    assert not any("iter" in name for name, _ in dpg.named_buffers())  # no counter in the module


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_dpg(num_experts=0)
    with pytest.raises(ValueError):
        make_dpg(tau_start=0.0)
    with pytest.raises(ValueError):
        make_dpg()(make_features()[:3], WHWH)


# ---- The tiny model with DPG and OTA -----------------------------------------------------------

DYNAMIC_OPTS = [
    "MODEL.SPARSE_RCNN.PROPOSAL_GENERATOR",
    "DynamicProposalGenerator",
    "MODEL.SPARSE_RCNN.MATCHER_NAME",
    "OTAMatcher",
]


def tiny_inputs(with_instances=True):
    g = torch.Generator().manual_seed(0)
    inputs = []
    for (h, w), num_gt in [((128, 160), 4), ((96, 128), 2)]:
        x = {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)}
        if with_instances:
            xy = torch.rand(num_gt, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
            instances = Instances((h, w))
            wh = torch.rand(num_gt, 2, generator=g) * 30 + 10
            instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
            instances.gt_classes = torch.randint(0, 3, (num_gt,), generator=g)
            x["instances"] = instances
        inputs.append(x)
    return inputs


@pytest.mark.parametrize("two_losses", [False, True])
def test_tiny_model_with_dpg_and_ota(two_losses):
    opts = DYNAMIC_OPTS + ["MODEL.SPARSE_RCNN.TWO_LOSSES", str(two_losses)]
    opts += ["MODEL.SPARSE_RCNN.LOSS_NORMALIZE_BY", "num_positives"]
    model = build_tiny_model(opts=opts)
    generator = model.proposal_generator
    assert isinstance(generator, DynamicProposalGenerator)
    assert isinstance(model.criterion.matcher, OTAMatcher)
    assert generator.expert_features.shape == (4, 20, 32)
    model.train()
    with EventStorage(0):
        losses = model(tiny_inputs())
    assert len(losses) == (36 if two_losses else 18)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, param in generator.named_parameters():
        if name.endswith("bias") and name.startswith("stairs"):
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        results = model(tiny_inputs(with_instances=False))
    assert len(results) == 2 and all("instances" in r for r in results)


def test_tiny_dynamic_model_overfits_one_batch():
    """DPG + OTA + the one-to-one losses learn: 12 AdamW steps on one fixed batch of 2 images at
    least halve the total loss (about a quarter of it is left on this batch), and lower the last
    stage's classification and GIoU losses. A pipeline whose gradients, matches or targets were
    broken (boxes matched to the wrong GT, wrong scale, no gradient into the head) would not."""
    opts = DYNAMIC_OPTS + ["MODEL.SPARSE_RCNN.TWO_LOSSES", "True"]
    opts += ["MODEL.SPARSE_RCNN.LOSS_NORMALIZE_BY", "num_positives"]
    opts += ["MODEL.SPARSE_RCNN.DPG.TAU_ANNEAL_ITERS", "20"]
    model = build_tiny_model(opts=opts).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    batch = tiny_inputs()
    history = []
    with EventStorage(0) as storage:
        for iteration in range(13):
            storage.iter = iteration
            losses = model(batch)
            history.append({k: v.item() for k, v in losses.items()})
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    first, last = history[0], history[-1]
    assert sum(last.values()) < 0.5 * sum(first.values())
    for key in ("loss_cls_stage6", "loss_giou_stage6", "loss_giou_stage6_o2o"):
        assert last[key] < first[key], key


def test_plain_sparse_rcnn_keys_unchanged():
    # DPG is opt-in: the default model keeps LearnableProposals and its (official) parameter names.
    cfg = make_cfg()
    assert cfg.MODEL.SPARSE_RCNN.PROPOSAL_GENERATOR == "LearnableProposals"
    assert cfg.MODEL.SPARSE_RCNN.MATCHER_NAME == "HungarianMatcher"
    assert not cfg.MODEL.SPARSE_RCNN.TWO_LOSSES and not cfg.MODEL.SPARSE_RCNN.NMS_ENABLED
    assert cfg.MODEL.SPARSE_RCNN.LOSS_NORMALIZE_BY == "num_gt"
    model = build_tiny_model()
    keys = [k for k in model.state_dict() if k.startswith("proposal_generator.")]
    assert sorted(keys) == [
        "proposal_generator.init_proposal_boxes.weight",
        "proposal_generator.init_proposal_features.weight",
    ]
    assert isinstance(model.criterion.matcher, HungarianMatcher)
    assert model.criterion.one_to_one_matcher is None


# ---- Configs ----------------------------------------------------------------------------------

R50 = "dynamic_sparse_rcnn_R_50_FPN_300pro_crop_3x"
OTA, HUN = "OTAMatcher", "HungarianMatcher"
DPG, LP = "DynamicProposalGenerator", "LearnableProposals"
# config -> (matcher, generator, two losses, unit increasing, fixed k, staircase, NMS)
DYNAMIC_CONFIGS = {
    f"{R50}.yaml": (OTA, DPG, True, True, 0, True, True),  # table 2 last row
    "dynamic_sparse_rcnn_R_101_FPN_300pro_crop_3x.yaml": (OTA, DPG, True, True, 0, True, True),
    f"{R50}_no_unit_increasing.yaml": (OTA, DPG, True, False, 0, True, True),  # table 2 row 4
    f"{R50}_dpg_only.yaml": (HUN, DPG, False, True, 0, True, False),  # table 2 row 3
    f"{R50}_dpg_no_staircase.yaml": (HUN, DPG, False, True, 0, False, False),  # table 2 row 2
    f"{R50}_dla_only.yaml": (OTA, LP, True, True, 0, True, True),  # table 3 row 7
    f"{R50}_dla_only_q8_two_losses.yaml": (OTA, LP, True, False, 0, True, True),  # row 6
    f"{R50}_dla_only_q8.yaml": (OTA, LP, False, False, 0, True, True),  # row 5
    f"{R50}_dla_only_fixed_k1.yaml": (OTA, LP, False, False, 1, True, True),  # row 2
    f"{R50}_dla_only_fixed_k2.yaml": (OTA, LP, False, False, 2, True, True),  # row 3
    f"{R50}_dla_only_fixed_k3.yaml": (OTA, LP, False, False, 3, True, True),  # row 4
}


@pytest.mark.parametrize("name", sorted(DYNAMIC_CONFIGS))
def test_dynamic_configs(name):
    cfg = make_cfg(CONFIG_DIR / name)
    c = cfg.MODEL.SPARSE_RCNN
    matcher, generator, two_losses, unit_increasing, fixed_k, staircase, nms = DYNAMIC_CONFIGS[name]
    assert (c.MATCHER_NAME, c.PROPOSAL_GENERATOR, c.TWO_LOSSES) == (matcher, generator, two_losses)
    assert (c.OTA.UNIT_INCREASING, c.OTA.FIXED_K, c.DPG.STAIRCASE) == (
        unit_increasing,
        fixed_k,
        staircase,
    )
    assert (c.NMS_ENABLED, c.NMS_THRESH_TEST) == (nms, 0.7)
    assert c.LOSS_NORMALIZE_BY == ("num_positives" if matcher == "OTAMatcher" else "num_gt")
    # The Sparse R-CNN 300-proposal, crop, 36-epoch setting; q = 8, 4 experts, 6 stages.
    assert (c.NUM_PROPOSALS, c.NUM_STAGES, c.OTA.TOP_Q, c.DPG.NUM_EXPERTS) == (300, 6, 8, 4)
    assert cfg.INPUT.CROP.ENABLED and cfg.SOLVER.MAX_ITER == 270000
    assert cfg.SOLVER.STEPS == (210000, 250000) and cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.MODEL.RESNETS.DEPTH == (101 if "R_101" in name else 50)
