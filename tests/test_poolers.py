"""FastROIPooler against Detectron2's ROIPooler: features, gradients, level assignment, edge cases."""

import math

import pytest
import torch
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes

from sparse_rcnn.poolers import FastROIPooler, PreparedFeatures

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
# Odd image size: the levels have odd, non-halving sizes (25x34, 13x17, 7x9, 4x5).
IMAGE_HW = (100, 136)
TOL = dict(atol=1e-5, rtol=1e-5)


def _features(batch=3, channels=6, image_hw=IMAGE_HW, scales=SCALES, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(
            batch,
            channels,
            math.ceil(image_hw[0] * s),
            math.ceil(image_hw[1] * s),
            generator=gen,
            dtype=dtype,
        ).requires_grad_()
        for s in scales
    ]


def _random_boxes(num, image_hw=IMAGE_HW, seed=0):
    """Mixed boxes: inside, partly and fully outside the image, tiny, degenerate, huge."""
    gen = torch.Generator().manual_seed(seed)
    h, w = image_hw
    centre = torch.rand(num, 2, generator=gen) * torch.tensor(
        [w * 1.6, h * 1.6]
    ) - 0.3 * torch.tensor([w, h])
    # Sides from 0 to ~4x the image (cubed uniform: mostly small, some huge).
    size = torch.rand(num, 2, generator=gen) ** 3 * torch.tensor([4.0 * w, 4.0 * h])
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    fixed = torch.tensor(
        [
            [0.0, 0.0, w, h],  # the whole image
            [10.0, 10.0, 10.0, 10.0],  # zero area
            [20.0, 30.0, 20.3, 30.2],  # sub-pixel
            [-50.0, -40.0, -10.0, -5.0],  # fully outside (top-left)
            [w + 5.0, h + 5.0, w + 80.0, h + 60.0],  # fully outside (bottom-right)
            [-30.0, -30.0, 2 * w, 2 * h],  # covers the image and more
            [w - 3.0, h - 3.0, w + 1.0, h + 1.0],  # on the last row/column
            [-1.0, -1.0, 3.0, 3.0],  # around the first row/column
            [5.0, 5.0, 3.0, 2.0],  # x1 < x0, y1 < y0
            [0.0, 0.0, 10 * w, 10 * h],  # huge: clamped to the top level
        ]
    )
    return torch.cat([fixed, boxes])


def _box_lists(counts, seed=0):
    lists = []
    for i, n in enumerate(counts):
        boxes = _random_boxes(max(n, 10), seed=seed + i)
        perm = torch.randperm(len(boxes), generator=torch.Generator().manual_seed(seed + 100 + i))
        lists.append(Boxes(boxes[perm[:n]]))
    return lists


def _poolers(pooler_type="ROIAlignV2", sampling_ratio=2, scales=SCALES, output_size=7):
    return (
        ROIPooler(output_size, scales, sampling_ratio, pooler_type),
        FastROIPooler(output_size, scales, sampling_ratio, pooler_type),
    )


@pytest.mark.parametrize("pooler_type", ["ROIAlignV2", "ROIAlign"])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_forward_and_gradients_match_roipooler(pooler_type, sampling_ratio):
    stock, fast = _poolers(pooler_type, sampling_ratio)
    x = _features()
    box_lists = _box_lists([37, 0, 60])
    expected = stock(x, box_lists)
    actual = fast(x, box_lists)
    assert actual.shape == expected.shape == (97, 6, 7, 7)
    torch.testing.assert_close(actual, expected, **TOL)

    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    expected_grads = torch.autograd.grad(expected, x, grad)
    actual_grads = torch.autograd.grad(actual, x, grad)
    for level, (a, e) in enumerate(zip(actual_grads, expected_grads)):
        assert a.shape == e.shape, level
        torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"level {level}: {m}")


@pytest.mark.parametrize("output_size", [5, 14])
def test_other_output_sizes_and_tiny_maps(output_size):
    """Other output sizes (ROIPooler supports square ones only); maps of 1x1 and 2x2 pixels."""
    stock, fast = _poolers(output_size=output_size)
    image_hw = (20, 30)
    x = _features(image_hw=image_hw)
    assert [tuple(t.shape[2:]) for t in x] == [(5, 8), (3, 4), (2, 2), (1, 1)]
    gen = torch.Generator().manual_seed(5)
    box_lists = []
    for n in (15, 4, 9):
        centre = torch.rand(n, 2, generator=gen) * 40 - 5
        size = torch.rand(n, 2, generator=gen) ** 2 * 600
        box_lists.append(Boxes(torch.cat([centre - size / 2, centre + size / 2], dim=1)))
    expected, actual = stock(x, box_lists), fast(x, box_lists)
    torch.testing.assert_close(actual, expected, **TOL)
    grad = torch.randn(expected.shape, generator=gen)
    for a, e in zip(torch.autograd.grad(actual, x, grad), torch.autograd.grad(expected, x, grad)):
        torch.testing.assert_close(a, e, **TOL)


def test_float64_matches_to_rounding():
    stock, fast = _poolers()
    x = _features(dtype=torch.float64)
    box_lists = _box_lists([25, 40, 3])
    expected, actual = stock(x, box_lists), fast(x, box_lists)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)
    grad = torch.randn(expected.shape, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(actual, x, grad), torch.autograd.grad(expected, x, grad)):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)


def test_sparse_rcnn_shapes():
    """The small training config: 8 images of 128 px, 50 boxes each, C = 128, p2-p5."""
    stock, fast = _poolers()
    x = _features(batch=8, channels=128, image_hw=(128, 128))
    gen = torch.Generator().manual_seed(3)
    box_lists = []
    for _ in range(8):
        centre = torch.rand(50, 2, generator=gen) * 128
        size = (torch.rand(50, 2, generator=gen) * 0.95 + 0.05) * 128
        box_lists.append(Boxes(torch.cat([centre - size / 2, centre + size / 2], dim=1)))
    expected, actual = stock(x, box_lists), fast(x, box_lists)
    torch.testing.assert_close(actual, expected, **TOL)
    # The gradient in the head's layout: pooled.flatten(2).transpose(1, 2) is (R, S*S, C).
    grad = torch.randn(400, 49, 128, generator=gen).transpose(1, 2).view(400, 128, 7, 7)
    for a, e in zip(torch.autograd.grad(actual, x, grad), torch.autograd.grad(expected, x, grad)):
        torch.testing.assert_close(a, e, **TOL)


def test_level_assignment_identical():
    """Each level is constant (its index); boxes inside the image pool exactly that value."""
    _, fast = _poolers()
    h, w = 512, 512
    x = [
        torch.full((2, 1, h // int(1 / s), w // int(1 / s)), float(i)) for i, s in enumerate(SCALES)
    ]
    sizes = torch.tensor([1.0, 20.0, 55.9, 56.1, 111.9, 112.1, 223.9, 224.1, 447.9, 448.1, 500.0])
    boxes = torch.stack([torch.full_like(sizes, 5.0), torch.full_like(sizes, 5.0)], 1)
    boxes = torch.cat([boxes, boxes + sizes[:, None]], dim=1)
    box_lists = [Boxes(boxes), Boxes(boxes.flip(0))]
    pooled = fast(x, box_lists)
    expected_levels = assign_boxes_to_levels(box_lists, 2, 5, 224, 4).float()
    assert sorted(set(expected_levels.tolist())) == [0.0, 1.0, 2.0, 3.0]
    torch.testing.assert_close(pooled.amin(dim=(1, 2, 3)), expected_levels)
    torch.testing.assert_close(pooled.amax(dim=(1, 2, 3)), expected_levels)


def test_output_order_and_counts_per_image():
    stock, fast = _poolers()
    x = _features(batch=4)
    box_lists = _box_lists([1, 0, 17, 4])
    expected, actual = stock(x, box_lists), fast(x, box_lists)
    assert actual.shape[0] == 22
    torch.testing.assert_close(actual, expected, **TOL)
    # Pooling one image at a time gives the same rows.
    rows = 0
    for i, boxes in enumerate(box_lists):
        single = [Boxes(torch.zeros(0, 4))] * len(box_lists)
        single[i] = boxes
        torch.testing.assert_close(fast(x, single), actual[rows : rows + len(boxes)], **TOL)
        rows += len(boxes)


def test_empty_box_lists():
    stock, fast = _poolers()
    x = _features(batch=2)
    box_lists = [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))]
    out = fast(x, box_lists)
    assert out.shape == stock(x, box_lists).shape == (0, 6, 7, 7)
    assert out.dtype == x[0].dtype
    with torch.no_grad():
        assert fast(fast.prepare(x), box_lists).shape == (0, 6, 7, 7)


def test_single_level():
    stock, fast = _poolers(scales=(1 / 8,))
    x = _features(scales=(1 / 8,))
    box_lists = _box_lists([9, 30, 2])
    expected, actual = stock(x, box_lists), fast(x, box_lists)
    torch.testing.assert_close(actual, expected, **TOL)
    grad = torch.randn(expected.shape)
    torch.testing.assert_close(
        torch.autograd.grad(actual, x, grad)[0], torch.autograd.grad(expected, x, grad)[0], **TOL
    )


def test_prepare_reuse_across_stages():
    """prepare() once + several forwards == separate forwards, gradients summed over stages."""
    stock, fast = _poolers()
    x = _features()
    stages = [_box_lists([12, 7, 20], seed=s) for s in range(3)]
    grads = [torch.randn(39, 6, 7, 7, generator=torch.Generator().manual_seed(s)) for s in range(3)]

    prepared = fast.prepare(x)
    assert isinstance(prepared, PreparedFeatures) and len(prepared) == 4
    outs = [fast(prepared, b) for b in stages]
    expected = [stock(x, b) for b in stages]
    for o, e in zip(outs, expected):
        torch.testing.assert_close(o, e, **TOL)
    actual_grads = torch.autograd.grad(outs, x, grads)
    expected_grads = torch.autograd.grad(expected, x, grads)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e, **TOL)
    # A prepared object passes through prepare() unchanged.
    assert fast.prepare(prepared) is prepared


def test_no_grad_inference_and_unused_levels():
    stock, fast = _poolers()
    x = [t.detach() for t in _features()]
    # Small boxes only: all on p2, the other levels get no boxes.
    box_lists = [Boxes(torch.tensor([[10.0, 10.0, 30.0, 40.0], [50.0, 20.0, 60.0, 25.0]]))] * 3
    with torch.no_grad():
        torch.testing.assert_close(fast(x, box_lists), stock(x, box_lists), **TOL)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x, box_lists), stock(x, box_lists), **TOL)
    # Gradients still reach levels that pooled nothing (as zeros).
    x = _features()
    grads = torch.autograd.grad(fast(x, box_lists).sum(), x)
    assert all(g.shape == t.shape for g, t in zip(grads, x))
    assert grads[0].abs().sum() > 0 and all(g.abs().sum() == 0 for g in grads[1:])


def test_no_gradient_to_boxes():
    """As torchvision's RoIAlign: the pooled features do not depend on the boxes for autograd."""
    _, fast = _poolers()
    x = _features()
    boxes = _random_boxes(20).requires_grad_()
    out = fast(x, [Boxes(boxes[:5]), Boxes(boxes[5:12]), Boxes(boxes[12:])])
    out.sum().backward()
    assert boxes.grad is None
    assert all(t.grad is not None for t in x)


def test_box_and_feature_layouts():
    """float64 boxes with float32 features; channels-last and non-contiguous feature maps."""
    stock, fast = _poolers()
    x = _features()
    box_lists = [Boxes(b.tensor.double()) for b in _box_lists([8, 5, 11])]
    torch.testing.assert_close(fast(x, box_lists), stock(x, box_lists), **TOL)
    x_cl = [t.detach().contiguous(memory_format=torch.channels_last) for t in x]
    x_nc = [torch.cat([t.detach(), t.detach()], dim=1)[:, ::2] for t in x]
    torch.testing.assert_close(fast(x_cl, box_lists), stock(x_cl, box_lists), **TOL)
    torch.testing.assert_close(fast(x_nc, box_lists), stock(x_nc, box_lists), **TOL)


def test_output_is_channels_last_view():
    _, fast = _poolers()
    out = fast(_features(), _box_lists([3, 4, 5]))
    assert out.shape == (12, 6, 7, 7)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.flatten(2).transpose(1, 2).is_contiguous()


def test_float16_cpu_uses_stock_path():
    stock, fast = _poolers()
    x = [t.detach().half() for t in _features()]
    box_lists = _box_lists([4, 6, 2])
    assert not fast._use_fast_path(x)
    assert torch.equal(fast(x, box_lists), stock(x, box_lists))
    assert fast.prepare(x) is x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_stock_path():
    stock, fast = _poolers()
    x = [t.detach().cuda() for t in _features()]
    box_lists = [Boxes(b.tensor.cuda()) for b in _box_lists([4, 6, 2])]
    assert not fast._use_fast_path(x)
    torch.testing.assert_close(fast(x, box_lists), stock(x, box_lists))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampling_ratio=0, pooler_type="ROIAlignV2"), "sampling_ratio > 0"),
        (dict(sampling_ratio=-1, pooler_type="ROIAlignV2"), "sampling_ratio > 0"),
        (dict(sampling_ratio=2, pooler_type="ROIPool"), "pooler_type"),
        (dict(sampling_ratio=2, pooler_type="ROIAlignRotated"), "pooler_type"),
    ],
)
def test_unsupported_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FastROIPooler(7, SCALES, **kwargs)


def test_bad_inputs_raise():
    _, fast = _poolers()
    x = _features(batch=2)
    with pytest.raises(ValueError, match="batch size"):
        fast(x, _box_lists([1, 2, 3]))
    with pytest.raises(ValueError, match="feature maps"):
        fast(x[:3], _box_lists([1, 2]))


def test_drop_in_for_the_head():
    """The tiny model gives the same losses and gradients with the fast pooler swapped in.

    Gradients are compared in float64: in float32 a training step of this model amplifies
    rounding to ~1e-3 relative gradient differences (stock float32 vs stock float64 differ by as
    much), so only the losses are compared in float32.
    """
    from detectron2.structures import Instances

    from conftest import build_tiny_model

    model = build_tiny_model()
    model.train()
    stock = model.head.box_pooler
    fast = FastROIPooler(
        stock.output_size,
        [p.spatial_scale for p in stock.level_poolers],
        stock.level_poolers[0].sampling_ratio,
        "ROIAlignV2" if stock.level_poolers[0].aligned else "ROIAlign",
    )
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(2):
        instances = Instances((96, 128))
        xy = torch.rand(3, 2, generator=gen) * 60
        instances.gt_boxes = Boxes(torch.cat([xy, xy + 30], dim=1))
        instances.gt_classes = torch.tensor([0, 1, 2])
        image = torch.rand(3, 96, 128, generator=gen) * 255
        inputs.append({"image": image, "instances": instances})

    def losses_and_grads(pooler):
        model.head.box_pooler = pooler
        model.zero_grad(set_to_none=True)
        losses = model(inputs)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in losses.items()}, grads

    expected_losses, _ = losses_and_grads(stock)
    actual_losses, _ = losses_and_grads(fast)
    assert actual_losses.keys() == expected_losses.keys()
    for k in expected_losses:
        torch.testing.assert_close(actual_losses[k], expected_losses[k], atol=1e-5, rtol=1e-4)

    model.double()
    for x in inputs:
        x["image"] = x["image"].double()
    expected_losses, expected_grads = losses_and_grads(stock)
    actual_losses, actual_grads = losses_and_grads(fast)
    for k in expected_losses:
        torch.testing.assert_close(actual_losses[k], expected_losses[k], atol=1e-10, rtol=1e-10)
    assert actual_grads.keys() == expected_grads.keys()
    assert "proposal_generator.init_proposal_boxes.weight" in expected_grads
    for k in expected_grads:
        torch.testing.assert_close(actual_grads[k], expected_grads[k], atol=1e-10, rtol=1e-8)
