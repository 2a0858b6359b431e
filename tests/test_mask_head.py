"""QueryInst's mask branch (sparse_rcnn.mask_head): shapes per stage, the dynamic mask convolution
against an einsum, the Dice loss and its normalisation, targets cropped by the box, the loss on
each stage's matched positives (Hungarian and OTA), no positives, inference pasting, checkpoints
without mask weights, export refusal, COCO segm evaluation."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from torch import nn

from conftest import TINY_CONFIG, build_tiny_model, make_cfg
from sparse_rcnn.criterion import SetCriterion, prepare_targets
from sparse_rcnn.head import DynamicHead
from sparse_rcnn.mask_head import (
    DICE_EPS,
    DynamicMaskConv,
    DynamicMaskHead,
    QueryInstMaskHead,
    dice_loss,
    mask_targets,
)
from sparse_rcnn.poolers import FastROIPooler

HIDDEN, K, NUM_STAGES, CONV_DIM = 16, 3, 3, 8
IMG_H, IMG_W = 64, 96
MASK_OPTS = ["MODEL.MASK_ON", "True", "MODEL.SPARSE_RCNN.MASK_CONV_DIM", "16"]


def make_mask_head(pooler_cls=ROIPooler, seed=0, norm="BN"):
    torch.manual_seed(seed)
    pooler = pooler_cls(
        output_size=14, scales=(1 / 4, 1 / 8), sampling_ratio=2, pooler_type="ROIAlignV2"
    )
    return QueryInstMaskHead(
        mask_pooler=pooler,
        num_stages=NUM_STAGES,
        num_classes=K,
        hidden_dim=HIDDEN,
        dim_dynamic=4,
        num_conv=4,
        conv_dim=CONV_DIM,
        norm=norm,
    )


def make_features(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, HIDDEN, IMG_H // 4, IMG_W // 4, generator=gen),
        torch.randn(batch, HIDDEN, IMG_H // 8, IMG_W // 8, generator=gen),
    ]


def make_boxes(counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    boxes = []
    for n in counts:
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([IMG_W / 2, IMG_H / 2])
        wh = 4 + torch.rand(n, 2, generator=gen) * torch.tensor([IMG_W / 2, IMG_H / 2])
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    return boxes


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------
def test_shapes_of_every_tensor_per_stage():
    head = make_mask_head()
    features = make_features()
    boxes = make_boxes([3, 2])
    queries = torch.randn(5, HIDDEN)
    for stage in range(NUM_STAGES):
        captured = {}
        module = head.head_series[stage]
        hooks = [
            module.inst_interact.register_forward_hook(
                lambda m, i, o: captured.update(query=i[0], roi=i[1], interact=o)
            ),
            module.deconv.register_forward_hook(lambda m, i, o: captured.update(deconv=o)),
        ]
        for k in range(1, 5):
            conv = getattr(module, f"mask_fcn{k}")
            hooks.append(conv.register_forward_hook(lambda m, i, o, k=k: captured.update({k: o})))
        logits = head(features, boxes, queries, stage)
        for h in hooks:
            h.remove()
        assert captured["query"].shape == (5, HIDDEN)
        assert captured["roi"].shape == (5, 14 * 14, HIDDEN)
        assert captured["interact"].shape == (5, 14 * 14, HIDDEN)
        for k in range(1, 5):
            assert captured[k].shape == (5, CONV_DIM, 14, 14)
            assert (captured[k] >= 0).all()  # ReLU after the norm
        assert captured["deconv"].shape == (5, CONV_DIM, 28, 28)
        assert logits.shape == (5, K, 28, 28) and head.mask_size == 28
    # The stages have their own weights.
    a, b = (head(features, boxes, queries, s) for s in (0, 1))
    assert not torch.allclose(a, b)


def test_box_head_exposes_the_attention_output_per_stage():
    torch.manual_seed(0)
    pooler = ROIPooler(
        output_size=7, scales=(1 / 4, 1 / 8), sampling_ratio=2, pooler_type="ROIAlignV2"
    )
    head = DynamicHead(
        box_pooler=pooler,
        num_classes=K,
        hidden_dim=HIDDEN,
        num_stages=NUM_STAGES,
        nheads=4,
        dim_feedforward=32,
        dim_dynamic=4,
    )
    features = make_features()
    boxes = torch.stack(make_boxes([5, 5], seed=1))
    queries = torch.randn(2, 5, HIDDEN)
    plain = head(features, boxes, queries)
    with_attention = head(features, boxes, queries, with_attention_features=True)
    assert all(set(out) == {"pred_logits", "pred_boxes"} for out in plain)
    # Every stage's attention output: LayerNorm(q + MSA(q)) of that stage's input query.
    stage_input = queries
    for stage, (a, b) in enumerate(zip(plain, with_attention)):
        assert set(b) == {"pred_logits", "pred_boxes", "attn_features"}
        for key in a:
            assert torch.equal(a[key], b[key])
        module = head.head_series[stage]
        attended = module.self_attn(stage_input, stage_input, stage_input)[0]
        expected = module.norm1(stage_input + attended)
        assert b["attn_features"].shape == (2, 5, HIDDEN)
        torch.testing.assert_close(b["attn_features"], expected)
        stage_boxes = boxes if stage == 0 else with_attention[stage - 1]["pred_boxes"]
        stage_input = module(features, stage_boxes, stage_input, pooler)[2]


# ---------------------------------------------------------------------------------------------
# The dynamic mask convolution
# ---------------------------------------------------------------------------------------------
def _layer_norm(x):
    """LayerNorm over the last dimension without affine parameters (they start at 1 and 0)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def test_dynamic_mask_conv_against_einsum():
    torch.manual_seed(0)
    c, d, r, p = 6, 3, 4, 10
    conv = DynamicMaskConv(c, d)
    queries, roi = torch.randn(r, c), torch.randn(r, p, c)
    weight, bias = conv.dynamic_layer.weight, conv.dynamic_layer.bias
    params = torch.einsum("oc,rc->ro", weight, queries) + bias  # (R, 2 C D)
    w1 = params[:, : c * d].reshape(r, c, d)  # C -> D, input channel major
    w2 = params[:, c * d :].reshape(r, d, c)  # D -> C
    hidden = F.relu(_layer_norm(torch.einsum("rpc,rcd->rpd", roi, w1)))
    expected = F.relu(_layer_norm(torch.einsum("rpd,rdc->rpc", hidden, w2)))
    torch.testing.assert_close(conv(queries, roi), expected, rtol=1e-5, atol=1e-5)
    # No projection and no residual: the output keeps the positions and depends on the query.
    other = conv(torch.randn(r, c), roi)
    assert other.shape == (r, p, c) and not torch.allclose(other, expected)


def test_mask_head_convs_see_the_interaction_as_a_feature_map():
    """The (R, S*S, C) interaction output is laid out as (R, C, S, S), row-major positions."""
    torch.manual_seed(0)
    head = DynamicMaskHead(
        num_classes=K, hidden_dim=HIDDEN, dim_dynamic=4, num_conv=1, conv_dim=4, norm=""
    )
    roi = torch.randn(2, HIDDEN, 14, 14)
    queries = torch.randn(2, HIDDEN)
    captured = {}
    head.mask_fcn1.register_forward_hook(lambda m, i, o: captured.update(x=i[0]))
    head(roi, queries)
    interact = head.inst_interact(queries, roi.flatten(2).transpose(1, 2))  # (R, 196, C)
    for y, x in [(0, 0), (0, 13), (5, 7), (13, 2)]:
        torch.testing.assert_close(captured["x"][:, :, y, x], interact[:, y * 14 + x, :])


def test_mask_head_init_follows_mmdetection():
    head = make_mask_head().head_series[0]
    assert torch.equal(head.predictor.bias, torch.zeros(K))
    assert head.mask_fcn1.bias is None and isinstance(head.mask_fcn1.norm, nn.BatchNorm2d)
    # Xavier-uniform bound sqrt(6 / (fan_in + fan_out)) on the weights.
    w = head.deconv.weight  # (in, out, 2, 2): fan_in = out * 4, fan_out = in * 4
    bound = (6 / (CONV_DIM * 4 + CONV_DIM * 4)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound


# ---------------------------------------------------------------------------------------------
# Dice loss and targets
# ---------------------------------------------------------------------------------------------
def test_dice_loss_hand_worked_values():
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    probs = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.0, 0.0]])
    loss = dice_loss(probs.double(), target.double())  # float64: eps is below float32's step at 1
    # Perfect: 1 - 4 / (2 + eps + 2 + eps) = eps / (2 + eps); disjoint: exactly 1;
    # half-half: 1 - 2 * 0.5 / (0.5 + 1 + 2 eps) = 1/3 (up to eps).
    assert loss[0].item() == pytest.approx(DICE_EPS / (2 + DICE_EPS), rel=1e-3)
    assert loss[0] < 1e-5
    assert loss[1].item() == 1.0
    assert loss[2].item() == pytest.approx(1 / 3, abs=1e-4)
    # Shapes (P, M, M) reduce per mask.
    assert dice_loss(torch.rand(5, 7, 7), torch.ones(5, 7, 7)).shape == (5,)
    with pytest.raises(ValueError, match="differ"):
        dice_loss(torch.rand(2, 4), torch.rand(2, 5))


@pytest.mark.parametrize("kind", ["polygon", "bitmask"])
def test_targets_cropped_by_the_box(kind):
    # Image 64 x 64; the object fills x in [20, 34), y in [10, 38); the box (20, 10, 48, 38) is
    # 28 x 28 px, so each target cell is one pixel: the left 14 columns are 1, the right 14 0.
    if kind == "polygon":
        masks = PolygonMasks([[np.array([20, 10, 34, 10, 34, 38, 20, 38], dtype=np.float64)]])
    else:
        bitmap = torch.zeros(1, 64, 64, dtype=torch.bool)
        bitmap[0, 10:38, 20:34] = True
        masks = BitMasks(bitmap)
    expected = torch.zeros(28, 28)
    expected[:, :14] = 1
    target = mask_targets(masks, torch.tensor([[20.0, 10.0, 48.0, 38.0]]), 28)
    assert target.shape == (1, 28, 28) and target.dtype == torch.float32
    assert torch.equal(target[0], expected)
    # A box twice as large (2 px per cell) over the object's top-left quarter region.
    target = mask_targets(masks, torch.tensor([[6.0, -18.0, 62.0, 38.0]]), 28)
    expected = torch.zeros(28, 28)
    expected[14:28, 7:14] = 1  # y in [10, 38) -> rows 14-27; x in [20, 34) -> columns 7-13
    assert torch.equal(target[0], expected)
    assert mask_targets(masks[[]], torch.zeros(0, 4), 28).shape == (0, 28, 28)


# ---------------------------------------------------------------------------------------------
# The loss on each stage's matched positives
# ---------------------------------------------------------------------------------------------
def _mask_input(h, w, seed=0, num_gt=2, masks=True):
    gen = torch.Generator().manual_seed(seed)
    instances = Instances((h, w))
    if num_gt:
        x0 = torch.rand(num_gt, generator=gen) * w * 0.5
        y0 = torch.rand(num_gt, generator=gen) * h * 0.5
        bw = 8 + torch.rand(num_gt, generator=gen) * w * 0.4
        bh = 8 + torch.rand(num_gt, generator=gen) * h * 0.4
        boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], 1)
    else:
        boxes = torch.zeros(0, 4)
    instances.gt_boxes = Boxes(boxes)
    instances.gt_classes = torch.randint(0, 3, (num_gt,), generator=gen)
    if masks and num_gt:
        # Ellipse-like polygons inside each box.
        polygons = []
        for x0, y0, x1, y1 in boxes.tolist():
            t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            polygons.append([np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).ravel()])
        instances.gt_masks = PolygonMasks(polygons)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
    return {"image": image, "instances": instances, "height": h, "width": w}


class _Recorder:
    """Wraps a mask predictor, keeping every call's boxes, queries and stage."""

    def __init__(self, predictor):
        self.predictor, self.calls = predictor, []

    def __call__(self, boxes, queries, stage):
        self.calls.append(([b.clone() for b in boxes], queries.detach().clone(), stage))
        return self.predictor(boxes, queries, stage)


@pytest.mark.parametrize(
    "opts",
    [
        [],
        ["MODEL.SPARSE_RCNN.MATCHER_NAME", "OTAMatcher", "MODEL.SPARSE_RCNN.TWO_LOSSES", "True",
         "MODEL.SPARSE_RCNN.LOSS_NORMALIZE_BY", "num_positives", "MODEL.SPARSE_RCNN.OTA.FIXED_K",
         "3"],
    ],
    ids=["hungarian", "ota"],
)  # fmt: skip
def test_mask_loss_uses_each_stages_matched_positives(opts, monkeypatch):
    model = build_tiny_model(MASK_OPTS + opts).train()
    inputs = [_mask_input(64, 96, seed=0, num_gt=3), _mask_input(80, 64, seed=1, num_gt=2)]
    matches, stage_outputs = [], []
    model.criterion.matcher.register_forward_hook(lambda m, a, out: matches.append(out))
    model.head.register_forward_hook(lambda m, a, out: stage_outputs.extend(out))
    original = SetCriterion.forward
    recorder = {}

    def spy(self, outputs, targets, mask_predictor=None):
        recorder["r"] = _Recorder(mask_predictor)
        return original(self, outputs, targets, recorder["r"])

    monkeypatch.setattr(SetCriterion, "forward", spy)
    losses = model(inputs)
    calls = recorder["r"].calls
    assert [stage for *_, stage in calls] == list(range(6))
    for stage, ((boxes, queries, _), indices) in enumerate(zip(calls, matches)):
        out = stage_outputs[stage]
        for image, (src, _) in enumerate(indices):
            # RoIs: the stage's refined boxes of its positives; queries: their attention output.
            assert torch.equal(boxes[image], out["pred_boxes"][image, src].detach())
        src = torch.cat([s for s, _ in indices])
        batch = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)])
        assert torch.equal(queries, out["attn_features"][batch, src].detach())
        assert len(queries) == sum(len(s) for s, _ in indices)
        assert f"loss_mask_stage{stage + 1}" in losses
    if opts:  # OTA gives many-to-one matches: more positives than GT boxes in some stage
        assert max(len(q) for _, q, _ in calls) > 5
    else:
        assert all(len(q) == 5 for _, q, _ in calls)
    # The mask loss is trained into the mask heads and, through the query, the box branch.
    total = sum(losses.values())
    total.backward()
    for name, p in model.mask_head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.head.head_series[0].self_attn.in_proj_weight.grad.abs().sum() > 0


def test_mask_loss_value_and_normalisation(monkeypatch):
    """loss_mask_stage{t} = 8 * sum of the positives' Dice losses / (their number averaged over
    processes), on the sigmoid of the GT class's mask against the box-cropped GT mask. With OTA
    (many-to-one) the number of positives differs from the number of GT boxes."""
    ota = ["MODEL.SPARSE_RCNN.MATCHER_NAME", "OTAMatcher", "MODEL.SPARSE_RCNN.OTA.FIXED_K", "2"]
    model = build_tiny_model(MASK_OPTS + ota).train()
    inputs = [_mask_input(64, 96, seed=2, num_gt=3), _mask_input(64, 96, seed=3, num_gt=1)]
    counts = []

    def fake_average(count, device):  # as if another process had 4 more positives
        counts.append(count)
        return (count + 4) / 2

    monkeypatch.setattr(SetCriterion, "average_over_processes", staticmethod(fake_average))
    logits_of = {}

    def predictor(boxes, queries, stage):  # fixed logits: a known loss
        gen = torch.Generator().manual_seed(stage)
        logits = torch.randn(len(queries), 3, 28, 28, generator=gen) * 3
        logits_of[stage] = (logits, boxes)
        return logits

    images, whwh = model.preprocess_image(inputs)
    features, boxes, feats = model._features_and_proposals(images, whwh)
    outputs = model.head(features, boxes, feats, with_attention_features=True)
    targets = prepare_targets([x["instances"] for x in inputs], model.device)
    matches = []
    model.criterion.matcher.register_forward_hook(lambda m, a, out: matches.append(out))
    losses = model.criterion(outputs, targets, predictor)
    num_positives = [sum(len(src) for src, _ in indices) for indices in matches]
    assert counts == [4] + num_positives  # the GT count (box losses), then each stage's positives
    assert max(num_positives) > 4
    for stage in range(6):
        logits, stage_boxes = logits_of[stage]
        expected, row = 0.0, 0
        for target, (src, gt), image_boxes in zip(targets, matches[stage], stage_boxes):
            for j in range(len(src)):
                label = target["labels"][gt[j]]
                mask = target["masks"][[int(gt[j])]].crop_and_resize(image_boxes[j : j + 1], 28)
                p, t = logits[row, label].sigmoid(), mask[0].float()
                expected += 1 - 2 * (p * t).sum() / ((p * p).sum() + (t * t).sum() + 2 * DICE_EPS)
                row += 1
        assert row == num_positives[stage]
        normalizer = (num_positives[stage] + 4) / 2
        torch.testing.assert_close(
            losses[f"loss_mask_stage{stage + 1}"], 8.0 * expected / normalizer
        )


def test_no_positives_zero_loss_with_gradients_to_every_mask_parameter():
    model = build_tiny_model(MASK_OPTS).train()
    bn = model.mask_head.head_series[0].mask_fcn1.norm
    running_mean = bn.running_mean.clone()
    losses = model([_mask_input(64, 96, num_gt=0), _mask_input(48, 64, seed=1, num_gt=0)])
    for stage in range(1, 7):
        assert losses[f"loss_mask_stage{stage}"].item() == 0.0
    sum(losses.values()).backward()
    for name, p in model.mask_head.named_parameters():
        assert p.grad is not None, name
        assert torch.equal(p.grad, torch.zeros_like(p)), name
    # No forward pass on an empty batch: the BN statistics did not move.
    assert torch.equal(bn.running_mean, running_mean)


def test_objects_without_masks_raise_naming_the_fix():
    model = build_tiny_model(MASK_OPTS).train()
    with pytest.raises(ValueError, match="MODEL.MASK_ON False"):
        model([_mask_input(64, 96, num_gt=2, masks=False)])


def test_mask_branch_does_not_change_the_box_branch():
    """With the same weights the mask model's box losses and detections are the box model's."""
    box_model = build_tiny_model(seed=5).train()
    mask_model = build_tiny_model(MASK_OPTS, seed=5).train()
    mask_model.load_state_dict(box_model.state_dict(), strict=False)
    inputs = [_mask_input(64, 96, seed=4, num_gt=3), _mask_input(64, 80, seed=5, num_gt=0)]
    box_losses, mask_losses = box_model(inputs), mask_model(inputs)
    assert set(mask_losses) == set(box_losses) | {f"loss_mask_stage{s}" for s in range(1, 7)}
    for key, value in box_losses.items():
        assert torch.equal(mask_losses[key], value), key
    box_model.eval(), mask_model.eval()
    with torch.no_grad():
        a, b = box_model(inputs), mask_model(inputs)
    for x, y in zip(a, b):
        x, y = x["instances"], y["instances"]
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
        assert torch.equal(x.scores, y.scores) and torch.equal(x.pred_classes, y.pred_classes)
        assert y.pred_masks.shape == (len(y), *y.image_size) and not x.has("pred_masks")


def test_fast_pooler_gives_the_detectron2_poolers_masks():
    features = make_features()
    boxes = make_boxes([4, 3], seed=2)
    queries = torch.randn(7, HIDDEN)
    slow = make_mask_head(ROIPooler).eval()
    fast = make_mask_head(FastROIPooler).eval()
    fast.load_state_dict(slow.state_dict())
    expected = slow(features, boxes, queries, 1)
    torch.testing.assert_close(fast(fast.prepare(features), boxes, queries, 1), expected)
    torch.testing.assert_close(fast(features, boxes, queries, 1), expected)


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------
class _FixedHead(nn.Module):
    """One stage with fixed logits, boxes and attention features (query p = p * ones)."""

    num_stages = 1

    def __init__(self, logits, boxes):
        super().__init__()
        self.logits, self.boxes = logits, boxes

    def forward(self, features, proposal_boxes, proposal_features, stages=None, **kwargs):
        n = self.logits.shape[1]
        attention = torch.arange(n, dtype=torch.float32)[None, :, None].expand(1, n, 4)
        return [{"pred_logits": self.logits, "pred_boxes": self.boxes, "attn_features": attention}]


class _PatternMaskHead(nn.Module):
    """Mask logits from the query: query 0 -> left half of the box, query 1 -> top half, on the
    channel of class 1 for query 0 and class 0 for query 1 (the opposite pattern elsewhere)."""

    mask_size = 28

    def __init__(self):
        super().__init__()
        self.calls = []

    def prepare(self, features):
        return features

    def forward(self, features, boxes, queries, stage):
        self.calls.append((torch.cat(boxes), queries[:, 0].clone(), stage))
        logits = torch.full((len(queries), 2, 28, 28), -10.0)
        for r, q in enumerate(queries[:, 0].round().long().tolist()):
            pattern = torch.full((28, 28), -10.0)
            if q == 0:
                pattern[:, :14] = 10.0
                channel = 1
            else:
                pattern[:14, :] = 10.0
                channel = 0
            logits[r, channel] = pattern
            logits[r, 1 - channel] = -pattern
        return logits


def test_inference_pastes_the_predicted_class_mask_at_the_box():
    model = build_tiny_model(MASK_OPTS).eval()
    # Proposal 0: class 1, box (8, 16, 40, 48); proposal 1: class 0, box (40, -8, 72, 24), which
    # leaves the 64 x 64 input (clipped to (40, 0, 64, 24)); proposal 2: low scores.
    logits = torch.tensor([[[-9.0, 5.0], [3.0, -9.0], [-8.0, -8.0]]])
    boxes = torch.tensor([[[8.0, 16.0, 40.0, 48.0], [40.0, -8.0, 72.0, 24.0], [0, 0, 4.0, 4.0]]])
    model.head = _FixedHead(logits, boxes)
    model.mask_head = _PatternMaskHead()
    model.num_classes = 2
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    with torch.no_grad():
        out = model([{"image": image, "height": 128, "width": 128}])[0]["instances"]
    # The mask head got the detections' queries and their boxes clipped to the image.
    call_boxes, call_queries, stage = model.mask_head.calls[0]
    assert stage == 0
    assert call_queries[:2].tolist() == [0.0, 1.0]
    assert torch.equal(call_boxes[0], boxes[0, 0])
    assert torch.equal(call_boxes[1], torch.tensor([40.0, 0.0, 64.0, 24.0]))
    assert out.pred_classes[:2].tolist() == [1, 0]
    masks = out.pred_masks
    assert masks.shape == (len(out), 128, 128) and masks.dtype == torch.bool
    # Output at twice the input size: box 0 -> (16, 32, 80, 96), its left half is the mask.
    expected = torch.zeros(128, 128, dtype=torch.bool)
    expected[32:96, 16:48] = True
    assert torch.equal(masks[0], expected)
    # Box 1 clipped -> (80, 0, 128, 48), its top half.
    expected = torch.zeros(128, 128, dtype=torch.bool)
    expected[0:24, 80:128] = True
    assert torch.equal(masks[1], expected)
    # Without post-processing: (R, 1, 28, 28) probabilities of the predicted class.
    with torch.no_grad():
        raw = model.inference([{"image": image}], do_postprocess=False)[0]
    assert raw.pred_masks.shape == (len(raw), 1, 28, 28)
    assert raw.pred_masks[0, 0, 0, 0] > 0.99 and raw.pred_masks[0, 0, 0, 27] < 0.01
    assert not raw.has("proposal_indices")


def test_inference_with_every_stage_gives_every_stage_masks():
    model = build_tiny_model(MASK_OPTS + ["MODEL.SPARSE_RCNN.EVAL_PER_STAGE", "True"]).eval()
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    stages = []
    model.mask_head.register_forward_hook(lambda m, args, out: stages.append(args[3]))
    with torch.no_grad():
        out = model([{"image": image}])[0]
    assert stages == list(range(6))
    for instances in out["stage_instances"] + [out["instances"]]:
        assert instances.pred_masks.shape == (len(instances), 64, 96)


# ---------------------------------------------------------------------------------------------
# Checkpoints and export
# ---------------------------------------------------------------------------------------------
def test_checkpoint_without_mask_weights_loads_with_a_warning(tmp_path, caplog):
    box_model = build_tiny_model(seed=1)
    DetectionCheckpointer(box_model, save_dir=str(tmp_path)).save("boxes")
    mask_model = build_tiny_model(MASK_OPTS, seed=2)
    init = {k: v.clone() for k, v in mask_model.mask_head.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(mask_model).load(str(tmp_path / "boxes.pth"))
    assert "no mask head weights" in caplog.text and "MODEL.MASK_ON" in caplog.text
    box_state = box_model.state_dict()
    for key, value in mask_model.state_dict().items():
        if key.startswith("mask_head."):
            assert torch.equal(value, init[key[len("mask_head.") :]]), key
        else:
            assert torch.equal(value, box_state[key]), key
    # A mask checkpoint loads without that warning.
    DetectionCheckpointer(mask_model, save_dir=str(tmp_path)).save("masks")
    caplog.clear()
    other = build_tiny_model(MASK_OPTS, seed=3)
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(other).load(str(tmp_path / "masks.pth"))
    assert "no mask head weights" not in caplog.text
    for key, value in other.state_dict().items():
        assert torch.equal(value, mask_model.state_dict()[key]), key


def test_export_refuses_mask_configs(tmp_path):
    from sparse_rcnn import export

    with pytest.raises(ValueError, match="MODEL.MASK_ON"):
        export.check_exportable(make_cfg(opts=MASK_OPTS))
    export.check_exportable(make_cfg())  # boxes only: exportable
    args = ["--config-file", str(TINY_CONFIG), "--output", str(tmp_path), *MASK_OPTS]
    with pytest.raises(ValueError, match="QueryInst's mask head is not exported"):
        export.main(args)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Evaluation: train_net.py --eval-only with COCOEvaluator's bbox and segm
# ---------------------------------------------------------------------------------------------
EVAL_PREFIX = "qi_shapes"


@pytest.fixture(scope="module")
def mask_datasets(tmp_path_factory):
    from conftest import registered_synthetic_shapes

    yield from registered_synthetic_shapes(tmp_path_factory, EVAL_PREFIX, {"val": 6}, 96)


def test_eval_only_gives_bbox_and_segm_ap(mask_datasets, tmp_path, caplog):
    import json
    import sys

    from detectron2.data import MetadataCatalog
    from detectron2.engine import default_argument_parser
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from conftest import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT))
    import train_net

    # Untrained, with the box deltas zeroed: the detections are the grid of proposal boxes (a
    # random head would throw every box off the image).
    grid = ["MODEL.SPARSE_RCNN.PROPOSAL_BOX_INIT", "grid"]
    model = build_tiny_model(MASK_OPTS + grid, seed=7)
    with torch.no_grad():
        for stage in model.head.head_series:
            stage.bboxes_delta.weight.zero_()
            stage.bboxes_delta.bias.zero_()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    opts = [
        *MASK_OPTS,
        *grid,
        "INPUT.MASK_FORMAT", "bitmask",
        "MODEL.WEIGHTS", str(tmp_path / "model.pth"),
        "DATASETS.TEST", f"('{EVAL_PREFIX}_val',)",
        "OUTPUT_DIR", str(tmp_path / "out"),
    ]  # fmt: skip
    args = ["--eval-only", "--config-file", str(TINY_CONFIG), *opts]
    torch.set_num_threads(1)
    with caplog.at_level(logging.INFO):
        results = train_net.main(default_argument_parser().parse_args(args))
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75"} <= set(results[task])
    # The detections json has every detection's mask as RLE of the image, and segm AP is the one
    # pycocotools computes from it.
    with open(
        tmp_path / "out" / "inference" / f"{EVAL_PREFIX}_val" / "coco_instances_results.json"
    ) as f:
        detections = json.load(f)
    assert detections and all(d["segmentation"]["size"] == [96, 96] for d in detections)
    gt = COCO(MetadataCatalog.get(f"{EVAL_PREFIX}_val").json_file)
    for task in ("bbox", "segm"):
        coco_eval = COCOeval(gt, gt.loadRes(detections), task)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        for index, key in enumerate(("AP", "AP50", "AP75")):
            assert results[task][key] == pytest.approx(100 * coco_eval.stats[index], abs=1e-6)


@pytest.mark.parametrize(
    "name", ["queryinst_R_50_FPN_1x", "dynamic_queryinst_R_50_FPN_300pro_crop_3x"]
)
def test_lazy_twins_load_masks_and_evaluate_segm_like_the_yaml(name):
    from detectron2.config import LazyConfig, instantiate

    from conftest import CONFIG_DIR
    from sparse_rcnn import SparseRCNNDatasetMapper
    from sparse_rcnn.export import check_exportable

    lazy = LazyConfig.load(str(CONFIG_DIR / f"{name}.py"))
    yaml_mapper = SparseRCNNDatasetMapper(make_cfg(CONFIG_DIR / f"{name}.yaml"), is_train=True)
    lazy_mapper = instantiate(lazy.dataloader.train.mapper)
    for attr in ("use_instance_mask", "instance_mask_format", "recompute_boxes"):
        assert getattr(lazy_mapper, attr) == getattr(yaml_mapper, attr), attr
    assert lazy_mapper.use_instance_mask
    assert tuple(lazy.dataloader.evaluator.tasks) == ("bbox", "segm")
    assert lazy.model.criterion.mask_weight == 8.0
    with pytest.raises(ValueError, match="model.mask_head"):
        check_exportable(lazy)


def test_test_time_augmentation_refuses_a_model_with_masks():
    """TTA merges boxes only: a QueryInst model is refused with the key to turn TTA off, rather
    than evaluated without its masks."""
    from sparse_rcnn.test_time_augmentation import SparseRCNNWithTTA

    model = build_tiny_model(MASK_OPTS)
    with pytest.raises(ValueError, match=r"masks .*TEST\.AUG\.ENABLED False"):
        SparseRCNNWithTTA(make_cfg(opts=MASK_OPTS), model)
