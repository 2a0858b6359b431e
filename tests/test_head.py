"""DynamicHead / DynamicStage / DynamicConv: shapes, box decoding, gradient blocking, flatten order, init."""

import math

import pytest
import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.poolers import ROIPooler
from torch import nn

from sparse_rcnn.head import DynamicConv, DynamicHead, DynamicStage

HIDDEN, K, NUM_STAGES = 16, 3, 3
IMG_H, IMG_W = 64, 96
CLAMP = math.log(100000.0 / 16)


def make_pooler(resolution=7):
    return ROIPooler(
        output_size=resolution, scales=(1 / 4, 1 / 8), sampling_ratio=2, pooler_type="ROIAlignV2"
    )


def make_head(num_stages=NUM_STAGES, num_classes=K, hidden=HIDDEN, seed=0):
    torch.manual_seed(seed)
    return DynamicHead(
        box_pooler=make_pooler(),
        num_classes=num_classes,
        hidden_dim=hidden,
        num_stages=num_stages,
        nheads=4,
        dim_feedforward=32,
        dim_dynamic=4,
    )


def make_inputs(batch=2, n=5, hidden=HIDDEN, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = [
        torch.randn(batch, hidden, IMG_H // 4, IMG_W // 4, generator=gen),
        torch.randn(batch, hidden, IMG_H // 8, IMG_W // 8, generator=gen),
    ]
    xy = torch.rand(batch, n, 2, generator=gen) * torch.tensor([IMG_W / 2, IMG_H / 2])
    wh = 4 + torch.rand(batch, n, 2, generator=gen) * torch.tensor([IMG_W / 2, IMG_H / 2])
    boxes = torch.cat([xy, xy + wh], dim=-1)
    proposal_features = torch.randn(batch, n, hidden, generator=gen)
    return features, boxes, proposal_features


def hand_decode(deltas, box):
    """Box2BoxTransform with weights (2, 2, 1, 1), by hand."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy = x1 + 0.5 * w, y1 + 0.5 * h
    dx, dy, dw, dh = deltas[0] / 2, deltas[1] / 2, min(deltas[2], CLAMP), min(deltas[3], CLAMP)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = math.exp(dw) * w, math.exp(dh) * h
    return [pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2]


# ---------------------------------------------------------------------------------------------
def test_output_shapes_and_dtypes():
    head = make_head()
    features, boxes, prop = make_inputs()
    outputs = head(features, boxes, prop)
    assert len(outputs) == NUM_STAGES
    for out in outputs:
        assert out["pred_logits"].shape == (2, 5, K) and out["pred_logits"].dtype == torch.float32
        assert out["pred_boxes"].shape == (2, 5, 4) and out["pred_boxes"].dtype == torch.float32
        assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()
    # Asking for the last stage's logits only: the same boxes, logits only where asked.
    last_only = head(features, boxes, prop, [NUM_STAGES - 1])
    for t, (a, b) in enumerate(zip(outputs, last_only)):
        torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=0)
        assert ("pred_logits" in b) == (t == NUM_STAGES - 1)
    torch.testing.assert_close(
        outputs[-1]["pred_logits"], last_only[-1]["pred_logits"], rtol=0, atol=0
    )


def test_stage_output_shapes():
    head = make_head()
    features, boxes, prop = make_inputs(batch=3, n=4)
    stage = head.head_series[0]
    assert isinstance(stage, DynamicStage)
    logits, pred_boxes, obj = stage(features, boxes, prop, head.box_pooler)
    assert (
        logits.shape == (3, 4, K) and pred_boxes.shape == (3, 4, 4) and obj.shape == (3, 4, HIDDEN)
    )
    none_logits, pred_boxes2, obj2 = stage(
        features, boxes, prop, head.box_pooler, compute_logits=False
    )
    assert none_logits is None
    assert torch.equal(pred_boxes, pred_boxes2) and torch.equal(obj, obj2)


def test_box_transform_settings_and_round_trip():
    head = make_head()
    transform = head.head_series[0].box2box_transform
    assert tuple(transform.weights) == (2.0, 2.0, 1.0, 1.0)
    assert transform.scale_clamp == pytest.approx(CLAMP)
    gen = torch.Generator().manual_seed(0)
    src = torch.cat(
        [torch.rand(50, 2, generator=gen) * 50, 50 + torch.rand(50, 2, generator=gen) * 50], 1
    )
    tgt = torch.cat(
        [torch.rand(50, 2, generator=gen) * 60, 61 + torch.rand(50, 2, generator=gen) * 80], 1
    )
    reference = Box2BoxTransform(weights=(2, 2, 1, 1), scale_clamp=CLAMP)
    deltas = reference.get_deltas(src, tgt)
    torch.testing.assert_close(transform.apply_deltas(deltas, src), tgt, rtol=1e-5, atol=1e-3)


def _fix_deltas(head, deltas):
    with torch.no_grad():
        for stage in head.head_series:
            stage.bboxes_delta.weight.zero_()
            stage.bboxes_delta.bias.copy_(torch.tensor(deltas))


def test_stage_decodes_deltas_by_hand():
    head = make_head()
    deltas = [0.3, -0.2, 0.4, -0.1]
    _fix_deltas(head, deltas)
    features, boxes, prop = make_inputs(batch=2, n=3)
    outputs = head(features, boxes, prop)
    for b in range(2):
        for i in range(3):
            expected = boxes[b, i].tolist()
            for t in range(NUM_STAGES):  # every stage refines the previous stage's boxes
                expected = hand_decode(deltas, expected)
                got = outputs[t]["pred_boxes"][b, i].tolist()
                assert got == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_scale_clamp_bounds_dw():
    head = make_head(num_stages=1)
    _fix_deltas(head, [0.0, 0.0, 50.0, 0.0])
    features, boxes, prop = make_inputs(batch=1, n=3)
    out = head(features, boxes, prop)[0]["pred_boxes"][0]
    for i in range(3):
        x1, y1, x2, y2 = boxes[0, i].tolist()
        w = x2 - x1
        got_w = float(out[i, 2] - out[i, 0])
        assert got_w == pytest.approx(math.exp(CLAMP) * w, rel=1e-4)  # = 6250 * w, not e^50 * w
        assert got_w == pytest.approx(6250.0 * w, rel=1e-4)
        # Centre and height unchanged.
        assert float(out[i, 0] + out[i, 2]) / 2 == pytest.approx((x1 + x2) / 2, rel=1e-4, abs=1e-2)
        assert float(out[i, 3] - out[i, 1]) == pytest.approx(y2 - y1, rel=1e-4)


def test_gradients_blocked_between_stages():
    head = make_head(num_stages=2)
    features, boxes, prop = make_inputs()
    boxes = boxes.clone().requires_grad_(True)
    prop = prop.clone().requires_grad_(True)
    outputs = head(features, boxes, prop)

    # Stage-2 boxes do not depend on stage-1 boxes through autograd.
    (through_boxes,) = torch.autograd.grad(
        outputs[1]["pred_boxes"].sum(),
        [outputs[0]["pred_boxes"]],
        retain_graph=True,
        allow_unused=True,
    )
    assert through_boxes is None or (through_boxes == 0).all()

    # A loss on stage-2 boxes only: no gradient to the proposal boxes, but one to the features.
    g_boxes, g_prop = torch.autograd.grad(
        outputs[1]["pred_boxes"].sum(), [boxes, prop], retain_graph=True, allow_unused=True
    )
    assert g_boxes is None or (g_boxes == 0).all()
    assert g_prop is not None and g_prop.abs().sum() > 0

    # A loss on stage-1 boxes reaches the proposal boxes (the first stage's input is not detached).
    (g_boxes1,) = torch.autograd.grad(outputs[0]["pred_boxes"].sum(), [boxes])
    assert g_boxes1.abs().sum() > 0


def test_dynamic_conv_flatten_is_position_major_channel_minor():
    torch.manual_seed(0)
    c, d, s = 6, 3, 2
    conv = DynamicConv(hidden_dim=c, dim_dynamic=d, num_dynamic=2, pooler_resolution=s)
    assert conv.out_layer.in_features == c * s * s
    r = 4
    proposal = torch.randn(r, c)
    roi = torch.zeros(r, s * s, c)
    position = 2
    roi[:, position] = torch.randn(r, c)  # only one spatial position is non-zero

    captured = {}
    conv.out_layer.register_forward_hook(lambda m, i, o: captured.update(inp=i[0], out=o))
    conv(proposal, roi)
    flat = captured["inp"]
    assert flat.shape == (r, s * s * c)
    # Zero RoI positions give exactly zero features (LayerNorm of 0 is 0): the non-zero entries must
    # be the contiguous block [position * C, (position + 1) * C).
    nonzero_columns = set(torch.nonzero(flat.abs().sum(0)).flatten().tolist())
    assert nonzero_columns and nonzero_columns <= set(range(position * c, (position + 1) * c))

    # Pick a single (position, channel) element with out_layer and read it back.
    channel = sorted(nonzero_columns)[0] - position * c
    with torch.no_grad():
        conv.out_layer.weight.zero_()
        conv.out_layer.bias.zero_()
        conv.out_layer.weight[1, position * c + channel] = 1.0
    conv(proposal, roi)
    out = captured["out"]
    torch.testing.assert_close(out[:, 1], flat[:, position * c + channel])
    assert (out[:, [0, 2, 3, 4, 5]] == 0).all()
    # The same element of the (R, S*S, C) feature map.
    torch.testing.assert_close(out[:, 1], flat.view(r, s * s, c)[:, position, channel])


def test_dynamic_conv_rejects_other_num_dynamic():
    with pytest.raises(ValueError, match="NUM_DYNAMIC"):
        DynamicConv(hidden_dim=8, dim_dynamic=4, num_dynamic=3, pooler_resolution=7)


def test_init_prior_bias_and_xavier():
    head = make_head(num_stages=2)
    prior = -math.log((1 - 0.01) / 0.01)
    for stage in head.head_series:
        torch.testing.assert_close(stage.class_logits.bias, torch.full((K,), prior))
    for name, p in head.named_parameters():
        if p.dim() < 2:
            continue
        fan_out, fan_in = p.shape[0], p.shape[1] * p[0][0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert p.abs().max() <= bound + 1e-6, name
        if p.numel() >= 200:  # uniform on [-bound, bound]: the max is close to the bound
            assert p.abs().max() >= 0.9 * bound, name
            assert float(p.std()) == pytest.approx(bound / math.sqrt(3), rel=0.15), name


def test_prior_only_on_class_logit_biases():
    # With num_classes == hidden_dim, the official quirk ("every parameter whose last dim is
    # num_classes") would hit LayerNorms, biases and weights; ours must set the prior only on
    # the class-logit biases.
    head = make_head(num_stages=2, num_classes=HIDDEN)
    prior = -math.log((1 - 0.01) / 0.01)
    for name, p in head.named_parameters():
        hits = int(torch.isclose(p, torch.tensor(prior), atol=1e-6).sum())
        if name.endswith("class_logits.bias"):
            assert hits == HIDDEN, name
        else:
            assert hits == 0, name
    # LayerNorms keep their default init.
    for name, m in head.named_modules():
        if isinstance(m, nn.LayerNorm):
            assert (m.weight == 1).all() and (m.bias == 0).all(), name


def test_head_rejects_bad_settings():
    with pytest.raises(ValueError, match="NUM_STAGES"):
        DynamicHead(
            box_pooler=make_pooler(), num_classes=K, hidden_dim=HIDDEN, num_stages=0, nheads=4
        )
    with pytest.raises(ValueError, match="divisible"):
        DynamicHead(
            box_pooler=make_pooler(), num_classes=K, hidden_dim=HIDDEN, num_stages=1, nheads=5
        )


def test_activation_choice():
    """gelu is applied in the FFN; glu (halves the width) and unknown names fail at build time."""
    common = dict(box_pooler=make_pooler(), num_classes=K, hidden_dim=HIDDEN, num_stages=1)
    torch.manual_seed(0)
    gelu = DynamicHead(**common, nheads=4, dim_feedforward=32, dim_dynamic=4, activation="gelu")
    x = torch.linspace(-3, 3, 13)
    assert torch.equal(gelu.head_series[0].activation(x), torch.nn.functional.gelu(x))
    assert not torch.equal(gelu.head_series[0].activation(x), torch.relu(x))
    with pytest.raises(ValueError, match="'glu' is not supported.*halves the FFN width"):
        DynamicHead(**common, nheads=4, activation="glu")
    with pytest.raises(ValueError, match="must be 'relu' or 'gelu', got 'swish'"):
        DynamicHead(**common, nheads=4, activation="swish")
