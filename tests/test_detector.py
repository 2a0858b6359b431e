"""SparseRCNN end to end on the tiny CPU config: losses, gradients, inference and post-processing."""

import math

import pytest
import torch
from detectron2.structures import Boxes, Instances
from torchvision.ops import box_iou

from conftest import CONFIG_DIR, build_tiny_model, make_cfg

NUM_PROPOSALS, NUM_CLASSES = 20, 3
LOSS_KEYS = {f"loss_{t}_stage{s}" for t in ("cls", "l1", "giou") for s in range(1, 7)}


def make_image(h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)


def make_input(h, w, num_gt=3, seed=0, **extra):
    gen = torch.Generator().manual_seed(100 + seed)
    x1 = torch.rand(num_gt, generator=gen) * w * 0.6
    y1 = torch.rand(num_gt, generator=gen) * h * 0.6
    bw = 4 + torch.rand(num_gt, generator=gen) * w * 0.35
    bh = 4 + torch.rand(num_gt, generator=gen) * h * 0.35
    boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], 1).reshape(-1, 4)
    classes = torch.randint(0, NUM_CLASSES, (num_gt,), generator=gen)
    instances = Instances((h, w), gt_boxes=Boxes(boxes), gt_classes=classes)
    return {
        "image": make_image(h, w, seed),
        "height": h,
        "width": w,
        "instances": instances,
        **extra,
    }


def infer(model, inputs):
    model.eval()
    with torch.no_grad():
        return [out["instances"] for out in model(inputs)]


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=0).eval()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def test_training_losses_and_gradients():
    model = build_tiny_model().train()
    losses = model([make_input(64, 96, 3, seed=0), make_input(80, 64, 2, seed=1)])
    assert set(losses) == LOSS_KEYS
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        assert value >= 0, name
    assert all(losses[f"loss_cls_stage{s}"] > 0 for s in range(1, 7))
    sum(losses.values()).backward()
    pg = model.proposal_generator
    for param in (pg.init_proposal_boxes.weight, pg.init_proposal_features.weight):
        assert param.grad is not None and torch.isfinite(param.grad).all()
        assert param.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    # Every stage's class-logit layer gets a gradient (deep supervision).
    for stage in model.head.head_series:
        assert stage.class_logits.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("matcher", ["HungarianMatcher", "OTAMatcher"])
def test_autocast_keeps_matching_and_losses_in_fp32(matcher):
    # SOLVER.AMP.ENABLED runs the model under autocast (fp16 on CUDA; on CPU autocast is bf16).
    model = build_tiny_model(("MODEL.SPARSE_RCNN.MATCHER_NAME", matcher)).train()
    inputs = [make_input(64, 96, 3, seed=0), make_input(80, 64, 2, seed=1)]
    criterion_forward = model.criterion.forward
    captured = {}

    def recording_forward(stage_outputs, targets):
        captured["outputs"] = [{k: v.detach() for k, v in o.items()} for o in stage_outputs]
        captured["targets"] = targets
        return criterion_forward(stage_outputs, targets)

    model.criterion.forward = recording_forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(inputs)
    # Autocast reached the head (its logits are bf16), not the losses.
    assert captured["outputs"][-1]["pred_logits"].dtype == torch.bfloat16
    assert all(value.dtype == torch.float32 for value in losses.values())
    # The same matching and losses as in fp32 from the same (bf16) stage outputs.
    reference = criterion_forward(captured["outputs"], captured["targets"])
    assert reference.keys() == losses.keys()
    for name, value in losses.items():
        assert torch.equal(value.detach(), reference[name]), name
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def test_image_without_annotations_in_batch():
    model = build_tiny_model().train()
    losses = model([make_input(64, 96, 3, seed=0), make_input(64, 64, 0, seed=1)])
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_batch_without_any_annotation():
    model = build_tiny_model().train()
    losses = model([make_input(64, 64, 0, seed=2)])
    assert all(torch.isfinite(v) for v in losses.values())
    for s in range(1, 7):
        assert float(losses[f"loss_l1_stage{s}"]) == 0.0
        assert float(losses[f"loss_giou_stage{s}"]) == 0.0
        assert float(losses[f"loss_cls_stage{s}"]) > 0.0
    sum(losses.values()).backward()
    assert torch.isfinite(model.proposal_generator.init_proposal_features.weight.grad).all()


def test_more_gt_than_proposals():
    model = build_tiny_model().train()
    losses = model([make_input(96, 128, 30, seed=3)])
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grad = model.proposal_generator.init_proposal_features.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_training_without_instances_raises():
    model = build_tiny_model().train()
    with pytest.raises(ValueError, match="instances"):
        model([{"image": make_image(64, 64)}])


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------
def test_inference_outputs_sorted_bounded(model):
    (result,) = infer(model, [{"image": make_image(64, 96)}])
    assert result.image_size == (64, 96)
    assert 0 < len(result) <= NUM_PROPOSALS
    scores = result.scores
    assert ((scores >= 0) & (scores <= 1)).all()
    assert torch.equal(scores, scores.sort(descending=True).values)
    assert ((result.pred_classes >= 0) & (result.pred_classes < NUM_CLASSES)).all()
    boxes = result.pred_boxes.tensor
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 96).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 64).all()


def test_inference_rescales_to_requested_size(model):
    image = make_image(64, 96, seed=5)
    (native,) = infer(model, [{"image": image, "height": 64, "width": 96}])
    (scaled,) = infer(model, [{"image": image, "height": 128, "width": 144}])
    assert scaled.image_size == (128, 144)
    boxes = scaled.pred_boxes.tensor
    assert (
        (boxes >= 0).all() and (boxes[:, [0, 2]] <= 144).all() and (boxes[:, [1, 3]] <= 128).all()
    )
    # x scaled by 1.5, y by 2; same detections and scores.
    assert len(native) == len(scaled) > 0
    assert torch.equal(native.scores, scaled.scores)
    assert torch.equal(native.pred_classes, scaled.pred_classes)
    factor = torch.tensor([1.5, 2.0, 1.5, 2.0])
    torch.testing.assert_close(boxes, native.pred_boxes.tensor * factor, rtol=1e-5, atol=1e-3)


def test_inference_without_postprocess_is_in_input_resolution(model):
    # do_postprocess=False (TTA, export): the detections before detector_postprocess, in the
    # network's input resolution; post-processing them by hand gives forward()'s output.
    from detectron2.modeling import detector_postprocess

    inputs = [dict(make_input(64, 96, seed=0), height=128, width=192)]
    with torch.no_grad():
        raw = model.inference(inputs, do_postprocess=False)
        final = infer(model, inputs)
    assert isinstance(raw[0], Instances) and raw[0].image_size == (64, 96)
    assert len(raw[0]) == NUM_PROPOSALS  # top-k, nothing clipped or filtered yet
    raw_boxes = raw[0].pred_boxes.tensor.clone()
    # (detector_postprocess scales the boxes of its input in place: give it a copy.)
    copy = Instances(raw[0].image_size, **{k: v.clone() for k, v in raw[0].get_fields().items()})
    expected = detector_postprocess(copy, 128, 192)
    assert final[0].image_size == (128, 192)
    torch.testing.assert_close(final[0].pred_boxes.tensor, expected.pred_boxes.tensor)
    torch.testing.assert_close(final[0].scores, expected.scores)
    # Doubling the output size doubles the boxes (before clipping).
    doubled = raw_boxes * 2
    doubled[:, 0::2] = doubled[:, 0::2].clamp(0, 192)
    doubled[:, 1::2] = doubled[:, 1::2].clamp(0, 128)
    nonempty = (doubled[:, 2] > doubled[:, 0]) & (doubled[:, 3] > doubled[:, 1])
    torch.testing.assert_close(final[0].pred_boxes.tensor, doubled[nonempty])


def test_inference_with_detected_instances_returns_them(model):
    # No mask or keypoint head: given boxes come back as the results (rescaled to the output).
    given = Instances((64, 96), pred_boxes=Boxes(torch.tensor([[10.0, 5.0, 40.0, 30.0]])))
    given.pred_classes = torch.tensor([2])
    given.scores = torch.tensor([0.9])
    inputs = [dict(make_input(64, 96, seed=0), height=32, width=48)]
    with torch.no_grad():
        out = model.inference(inputs, detected_instances=[given])
    assert out[0]["instances"].pred_classes.tolist() == [2]
    torch.testing.assert_close(
        out[0]["instances"].pred_boxes.tensor, torch.tensor([[5.0, 2.5, 20.0, 15.0]])
    )


def test_inference_deterministic(model):
    inputs = [{"image": make_image(64, 96, seed=6)}, {"image": make_image(96, 64, seed=7)}]
    first, second = infer(model, inputs), infer(model, inputs)
    other = build_tiny_model(seed=0)  # the same seed builds the same model
    third = infer(other, inputs)
    for a, b, c in zip(first, second, third):
        for r in (b, c):
            assert torch.equal(a.pred_boxes.tensor, r.pred_boxes.tensor)
            assert torch.equal(a.scores, r.scores)
            assert torch.equal(a.pred_classes, r.pred_classes)


def test_batching_invariance():
    # Float64 so that the backbone's rounding differences between batch sizes (amplified by six
    # stages of random weights) stay far below the tolerance. The large image's padded size is the
    # same alone and in the batch; the small image comes first so that the large one is index 1.
    model = build_tiny_model(seed=0).double().eval()
    big, small = make_image(64, 96, seed=8), make_image(40, 50, seed=9)
    (alone,) = infer(model, [{"image": big}])
    small_out, big_out = infer(model, [{"image": small}, {"image": big}])
    assert len(alone) == len(big_out) > 0
    # Float64 rounding (2e-16 relative), amplified by the six stages, stays far below 1e-9 (the
    # same runs in float32 differ by about 1e-2 px and 7e-6 in the scores).
    torch.testing.assert_close(
        big_out.pred_boxes.tensor, alone.pred_boxes.tensor, rtol=0, atol=1e-9
    )
    torch.testing.assert_close(big_out.scores, alone.scores, rtol=0, atol=1e-9)
    assert torch.equal(big_out.pred_classes, alone.pred_classes)
    # The small image's detections are in its own frame.
    assert small_out.image_size == (40, 50)
    b = small_out.pred_boxes.tensor
    assert (b >= 0).all() and (b[:, [0, 2]] <= 50).all() and (b[:, [1, 3]] <= 40).all()


def test_pixel_normalisation_uses_buffers(model):
    assert model.device == torch.device("cpu")
    buffers = dict(model.named_buffers())
    assert "pixel_mean" in buffers and "pixel_std" in buffers
    assert "pixel_mean" not in model.state_dict()  # the official checkpoints have no such keys
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))
    torch.testing.assert_close(model.pixel_std.flatten(), torch.tensor([58.395, 57.12, 57.375]))
    image = make_image(64, 96, seed=10)
    images, whwh = model.preprocess_image([{"image": image}, {"image": make_image(40, 50)}])
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    torch.testing.assert_close(images.tensor[0, :, :64, :96], (image.float() - mean) / std)
    assert images.tensor.shape[-2] % 32 == 0 and images.tensor.shape[-1] % 32 == 0
    assert (images.tensor[1, :, 40:, :] == 0).all() and (images.tensor[1, :, :, 50:] == 0).all()
    torch.testing.assert_close(
        whwh, torch.tensor([[96.0, 64.0, 96.0, 64.0], [50.0, 40.0, 50.0, 40.0]])
    )


def test_wrong_input_raises_value_error(model):
    with pytest.raises(ValueError, match=r"\(3, H, W\).*got shape \(64, 96\)"):
        infer(model, [{"image": torch.zeros(64, 96, dtype=torch.uint8)}])


def test_topk_over_proposals_and_classes_brute_force(model):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(2, NUM_PROPOSALS, NUM_CLASSES, generator=gen) * 3
    xy = torch.rand(2, NUM_PROPOSALS, 2, generator=gen) * 40
    boxes = torch.cat([xy, xy + 5 + torch.rand(2, NUM_PROPOSALS, 2, generator=gen) * 20], -1)
    results = model.topk_detections(logits, boxes, [(64, 96), (80, 80)])
    for b, result in enumerate(results):
        candidates = sorted(
            (
                (1 / (1 + math.exp(-float(logits[b, i, k]))), i, k)
                for i in range(NUM_PROPOSALS)
                for k in range(NUM_CLASSES)
            ),
            reverse=True,
        )[:NUM_PROPOSALS]
        assert len(result) == NUM_PROPOSALS
        assert result.scores.tolist() == pytest.approx([s for s, _, _ in candidates], rel=1e-6)
        assert result.pred_classes.tolist() == [k for _, _, k in candidates]
        expected_boxes = torch.stack([boxes[b, i] for _, i, _ in candidates])
        assert torch.equal(result.pred_boxes.tensor, expected_boxes)


# ---------------------------------------------------------------------------------------------
# Score threshold and NMS options
# ---------------------------------------------------------------------------------------------
def _fixed_boxes(model, boxes_cxcywh=None):
    """Zero every stage's box deltas: the detections are the proposal boxes themselves."""
    with torch.no_grad():
        for stage in model.head.head_series:
            stage.bboxes_delta.weight.zero_()
            stage.bboxes_delta.bias.zero_()
        if boxes_cxcywh is not None:
            model.proposal_generator.init_proposal_boxes.weight.copy_(boxes_cxcywh)
    return model


def test_score_threshold_is_strict_on_exact_half():
    for thresh, expected in ((0.5, 0), (0.4999, NUM_PROPOSALS)):
        model = _fixed_boxes(build_tiny_model(["MODEL.SPARSE_RCNN.SCORE_THRESH_TEST", thresh]))
        with torch.no_grad():
            last = model.head.head_series[-1].class_logits
            last.weight.zero_()
            last.bias.zero_()  # every score is exactly sigmoid(0) = 0.5
        (result,) = infer(model, [{"image": make_image(64, 96)}])
        assert len(result) == expected
        if expected:
            assert (result.scores == 0.5).all()


def test_score_threshold_drops_scores_not_above_it():
    image = make_image(64, 96, seed=12)
    (reference,) = infer(build_tiny_model(seed=0), [{"image": image}])
    assert len(reference) >= 4
    thresh = float(reference.scores[3])  # exactly the 4th score: it and all below are dropped
    model = build_tiny_model(["MODEL.SPARSE_RCNN.SCORE_THRESH_TEST", thresh], seed=0)
    (result,) = infer(model, [{"image": image}])
    keep = reference.scores > thresh
    assert len(result) == int(keep.sum()) <= 3
    assert (result.scores > thresh).all()
    assert torch.equal(result.scores, reference.scores[keep])
    assert torch.equal(result.pred_boxes.tensor, reference.pred_boxes.tensor[keep])


def _near_duplicate_proposals():
    gen = torch.Generator().manual_seed(13)
    centres = torch.rand(10, 2, generator=gen) * 0.5 + 0.25
    sizes = torch.rand(10, 2, generator=gen) * 0.3 + 0.2
    first = torch.cat([centres, sizes], 1)
    second = first + torch.tensor([0.02, -0.01, 0.01, 0.02])  # IoU with its twin ~0.8-0.9
    return torch.cat([first, second], 0)


def greedy_nms(boxes, scores, classes, thresh):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    kept = []
    for i in order:
        if all(
            int(classes[j]) != int(classes[i])
            or float(box_iou(boxes[i : i + 1], boxes[j : j + 1])) <= thresh
            for j in kept
        ):
            kept.append(i)
    return kept


def test_nms_option():
    thresh = 0.7
    proposals = _near_duplicate_proposals()
    plain = _fixed_boxes(build_tiny_model(seed=0), proposals)
    with_nms = _fixed_boxes(
        build_tiny_model(
            ["MODEL.SPARSE_RCNN.NMS_ENABLED", True, "MODEL.SPARSE_RCNN.NMS_THRESH_TEST", thresh],
            seed=0,
        ),
        proposals,
    )
    image = make_image(64, 96, seed=14)
    (before,) = infer(plain, [{"image": image}])
    (after,) = infer(with_nms, [{"image": image}])

    def same_class_max_iou(result):
        iou = box_iou(result.pred_boxes.tensor, result.pred_boxes.tensor)
        same = result.pred_classes[:, None] == result.pred_classes[None, :]
        same &= ~torch.eye(len(result), dtype=torch.bool)
        return float((iou * same).max())

    assert len(before) == NUM_PROPOSALS
    assert same_class_max_iou(before) > thresh  # the test has duplicates to suppress
    assert same_class_max_iou(after) <= thresh
    assert len(after) < len(before)
    kept = greedy_nms(before.pred_boxes.tensor, before.scores, before.pred_classes, thresh)
    assert len(after) == len(kept)
    assert torch.equal(after.scores, before.scores[kept])
    assert torch.equal(after.pred_classes, before.pred_classes[kept])
    assert torch.equal(after.pred_boxes.tensor, before.pred_boxes.tensor[kept])


# ---------------------------------------------------------------------------------------------
# TEST.DETECTIONS_PER_IMAGE
# ---------------------------------------------------------------------------------------------
def _random_head_outputs(seed=11, batch=2):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, NUM_PROPOSALS, NUM_CLASSES, generator=gen) * 3
    xy = torch.rand(batch, NUM_PROPOSALS, 2, generator=gen) * 40
    boxes = torch.cat([xy, xy + 5 + torch.rand(batch, NUM_PROPOSALS, 2, generator=gen) * 20], -1)
    return logits, boxes


def _assert_prefix(short, long, count):
    assert len(short) == count
    assert torch.equal(short.scores, long.scores[:count])
    assert torch.equal(short.pred_classes, long.pred_classes[:count])
    assert torch.equal(short.pred_boxes.tensor, long.pred_boxes.tensor[:count])


def test_detections_per_image_default_is_the_number_of_proposals(model):
    # Detectron2's default is 100; ours is 0 = the number of proposals, the official top-k.
    from detectron2.config import get_cfg

    assert get_cfg().TEST.DETECTIONS_PER_IMAGE == 100
    assert make_cfg().TEST.DETECTIONS_PER_IMAGE == 0 and model.detections_per_image == 0
    (result,) = model.topk_detections(*_random_head_outputs(batch=1), [(64, 96)])
    assert len(result) == NUM_PROPOSALS


@pytest.mark.parametrize("nms", [False, True], ids=["no_nms", "nms"])
def test_detections_per_image_changes_the_count_and_nothing_else(nms):
    opts = ["MODEL.SPARSE_RCNN.NMS_ENABLED", nms, "MODEL.SPARSE_RCNN.NMS_THRESH_TEST", 0.3]
    logits, boxes = _random_head_outputs()
    sizes = [(64, 96), (80, 80)]
    default = build_tiny_model(opts).eval().topk_detections(logits, boxes, sizes)
    if nms:  # boxes of random centres and sizes overlap: NMS at IoU 0.3 removes some
        assert all(len(r) < NUM_PROPOSALS for r in default)
    for count in (1, 5, 12):
        model = build_tiny_model([*opts, "TEST.DETECTIONS_PER_IMAGE", count]).eval()
        assert model.detections_per_image == count
        for short, full in zip(model.topk_detections(logits, boxes, sizes), default):
            _assert_prefix(short, full, min(count, len(full)))
    # More than the proposals: more (proposal, class) pairs, the default's detections first.
    model = build_tiny_model([*opts, "TEST.DETECTIONS_PER_IMAGE", 45]).eval()
    for b, (more, full) in enumerate(zip(model.topk_detections(logits, boxes, sizes), default)):
        _assert_prefix(full, more, len(full))
        if not nms:
            # The top 45 of (proposals x classes), by brute force.
            candidates = sorted(
                ((float(torch.sigmoid(logits[b, i, k])), i, k) for i in range(NUM_PROPOSALS)
                 for k in range(NUM_CLASSES)),
                reverse=True,
            )[:45]  # fmt: skip
            assert len(more) == 45
            assert more.pred_classes.tolist() == [k for _, _, k in candidates]
            assert torch.equal(more.pred_boxes.tensor, boxes[b, [i for _, i, _ in candidates]])
        else:
            assert len(full) < len(more) <= 45


def test_detections_per_image_reaches_the_outputs_from_yaml_and_lazy_config():
    from detectron2.config import LazyConfig, instantiate

    # The proposal boxes as the detections (all inside the image: none dropped when rescaled).
    image, proposals = make_image(64, 96, seed=15), _near_duplicate_proposals()
    inputs = [{"image": image, "height": 128, "width": 192}]
    (full,) = infer(_fixed_boxes(build_tiny_model(seed=0), proposals), inputs)
    five = _fixed_boxes(build_tiny_model(["TEST.DETECTIONS_PER_IMAGE", 5], seed=0), proposals)
    (result,) = infer(five, inputs)
    assert len(full) == NUM_PROPOSALS and result.image_size == (128, 192)
    _assert_prefix(result, full, 5)
    # The LazyConfig model takes the same setting (its yaml twin's default: 0).
    cfg = LazyConfig.load(str(CONFIG_DIR / "sparse_rcnn_quick_cpu.py"))
    assert cfg.model.detections_per_image == 0
    cfg = LazyConfig.apply_overrides(cfg, ["model.detections_per_image=7"])
    with torch.device("meta"):
        assert instantiate(cfg.model).detections_per_image == 7


def test_negative_detections_per_image_is_a_clear_error():
    with pytest.raises(ValueError, match=r"TEST\.DETECTIONS_PER_IMAGE .* must be >= 0"):
        build_tiny_model(["TEST.DETECTIONS_PER_IMAGE", -1])
