"""build_optimizer: AdamW/SGD, backbone LR multiplier, weight decay groups, gradient clipping."""

import copy

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from conftest import make_cfg
from sparse_rcnn.solver import build_optimizer

NORM_TYPES = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)


def build(opts=()):
    cfg = make_cfg(opts=list(opts))
    torch.manual_seed(0)
    model = build_model(cfg)
    return cfg, model, build_optimizer(cfg, model)


def group_of(optimizer):
    mapping = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in mapping, "parameter in two groups"
            mapping[id(p)] = group
    return mapping


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def set_random_grads(model, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    for _, p in trainable(model):
        p.grad = torch.randn(p.shape, generator=gen) * scale


def total_norm(params):
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))


def test_adamw_with_backbone_multiplier_and_weight_decays():
    base_lr = 2e-4
    cfg, model, opt = build(
        [
            "SOLVER.BASE_LR",
            base_lr,
            "SOLVER.BACKBONE_MULTIPLIER",
            0.1,
            "SOLVER.WEIGHT_DECAY",
            1e-4,
            "SOLVER.WEIGHT_DECAY_NORM",
            3e-4,
            "SOLVER.WEIGHT_DECAY_BIAS",
            2e-4,
        ]
    )
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    groups = group_of(opt)
    checked = {"backbone": 0, "other": 0, "norm": 0, "bias": 0}
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            name = f"{module_name}.{param_name}"
            group = groups[id(p)]
            is_backbone = name.startswith("backbone.")
            expected_lr = base_lr * 0.1 if is_backbone else base_lr
            assert group["lr"] == pytest.approx(expected_lr, rel=1e-12), name
            checked["backbone" if is_backbone else "other"] += 1
            if param_name == "bias":
                expected_wd = 2e-4
                checked["bias"] += 1
            elif isinstance(module, NORM_TYPES):
                expected_wd = 3e-4
                checked["norm"] += 1
            else:
                expected_wd = 1e-4
            assert group["weight_decay"] == pytest.approx(expected_wd, rel=1e-12), name
    assert all(v > 0 for v in checked.values()), checked


def test_base_config_decays_every_parameter():
    # Base-SparseRCNN.yaml: the official solver decays every parameter with 1e-4.
    cfg, model, opt = build()
    assert (
        cfg.SOLVER.WEIGHT_DECAY
        == cfg.SOLVER.WEIGHT_DECAY_NORM
        == cfg.SOLVER.WEIGHT_DECAY_BIAS
        == 1e-4
    )
    for group in opt.param_groups:
        assert group["weight_decay"] == pytest.approx(1e-4)
        assert group["lr"] == pytest.approx(cfg.SOLVER.BASE_LR)  # multiplier 1.0 by default


def test_frozen_parameters_absent_and_trainable_present_once():
    cfg, model, opt = build()
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen, "FREEZE_AT=2 should freeze the stem and res2"
    assert any("stem" in n for n in frozen) and any("res2" in n for n in frozen)
    for n, p in model.named_parameters():
        assert (id(p) in in_optimizer) == p.requires_grad, n
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable(model))


def _reference_adamw(model, opt):
    """A plain torch.optim.AdamW over a deep copy of the model, with the same groups."""
    ref_model = copy.deepcopy(model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(ref_model.named_parameters())
    groups = [
        {
            "params": [ref_params[name_of[id(p)]] for p in g["params"]],
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
        }
        for g in opt.param_groups
    ]
    return ref_model, torch.optim.AdamW(groups, lr=1.0)


def test_full_model_clipping_matches_reference_adamw():
    clip = 1.0
    cfg, model, opt = build(["SOLVER.BACKBONE_MULTIPLIER", 0.1])
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == clip
    ref_model, ref_opt = _reference_adamw(model, opt)
    ref_trainable = [p for _, p in trainable(ref_model)]

    # Two steps with very different gradient scales: the first is clipped, the second is not.
    for step, scale in enumerate([1000.0, 1e-3]):
        set_random_grads(model, scale, seed=step)
        set_random_grads(ref_model, scale, seed=step)
        before = total_norm([p for _, p in trainable(model)])
        opt.step()
        after = total_norm([p for _, p in trainable(model)])
        if before > clip:
            assert after == pytest.approx(clip, rel=1e-4)  # the grads were rescaled in place
        else:
            assert after == pytest.approx(before, rel=1e-6)  # untouched below the threshold
        torch.nn.utils.clip_grad_norm_(ref_trainable, clip)
        ref_opt.step()

    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=name)


def test_full_model_clipping_is_global_not_per_parameter():
    cfg, model, opt = build()
    set_random_grads(model, 10.0, seed=3)
    originals = {n: p.grad.clone() for n, p in trainable(model)}
    norm = total_norm([p for _, p in trainable(model)])
    opt.step()
    factor = cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE / norm
    for n, p in trainable(model):
        # every gradient is scaled by the same factor (direction of the whole gradient kept)
        torch.testing.assert_close(p.grad, originals[n] * factor, rtol=1e-4, atol=1e-9)


def test_value_clipping_uses_detectron2_per_parameter_clipper():
    cfg, model, opt = build(
        ["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.01]
    )
    set_random_grads(model, 1.0, seed=1)
    originals = {n: p.grad.clone() for n, p in trainable(model)}
    opt.step()
    for n, p in trainable(model):
        assert torch.equal(p.grad, originals[n].clamp(-0.01, 0.01)), n


def test_norm_clipping_is_per_parameter():
    cfg, model, opt = build(
        ["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.5]
    )
    set_random_grads(model, 1.0, seed=2)
    originals = {n: p.grad.clone() for n, p in trainable(model)}
    opt.step()
    for n, p in trainable(model):
        original_norm = float(originals[n].norm())
        expected = originals[n] * min(1.0, 0.5 / (original_norm + 1e-6))
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-8, msg=n)
    # so the total norm is well above the per-parameter limit
    assert total_norm([p for _, p in trainable(model)]) > 1.0


def test_clipping_disabled_leaves_gradients():
    cfg, model, opt = build(["SOLVER.CLIP_GRADIENTS.ENABLED", False])
    set_random_grads(model, 1000.0, seed=4)
    originals = {n: p.grad.clone() for n, p in trainable(model)}
    opt.step()
    for n, p in trainable(model):
        assert torch.equal(p.grad, originals[n]), n


def test_sgd_option():
    cfg, model, opt = build(
        ["SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", 0.8, "SOLVER.NESTEROV", True]
    )
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.8 and opt.defaults["nesterov"] is True
    set_random_grads(model, 1000.0, seed=5)
    opt.step()  # full-model clipping applies to SGD as well
    assert total_norm([p for _, p in trainable(model)]) == pytest.approx(1.0, rel=1e-4)
    # lower-case name accepted
    _, _, opt2 = build(["SOLVER.OPTIMIZER", "sgd"])
    assert isinstance(opt2, torch.optim.SGD)


def test_bad_optimizer_name():
    cfg = make_cfg(opts=["SOLVER.OPTIMIZER", "LAMB"])
    model = build_model(cfg)
    with pytest.raises(ValueError, match="LAMB"):
        build_optimizer(cfg, model)


@pytest.mark.parametrize("name", ["ADAMW", "SGD"])
def test_foreach_optimizer_steps_like_the_for_loop_one(name):
    """The optimizers use the multi-tensor implementation on a CPU too (PyTorch's default there is
    the per-parameter loop), and three steps give the same weights bit for bit."""
    opts = ["SOLVER.OPTIMIZER", name, "SOLVER.MOMENTUM", 0.9, "SOLVER.BACKBONE_MULTIPLIER", 0.1]
    cfg, model, opt = build(opts)
    assert all(group["foreach"] is True for group in opt.param_groups)
    loop_model = copy.deepcopy(model)
    loop_opt = build_optimizer(cfg, loop_model)
    for group in loop_opt.param_groups:
        group["foreach"] = False
    for step, scale in enumerate([1000.0, 1e-3, 1.0]):  # clipped, not clipped, clipped
        set_random_grads(model, scale, seed=10 + step)
        set_random_grads(loop_model, scale, seed=10 + step)
        opt.step()
        loop_opt.step()
    for (n, p), (_, q) in zip(model.named_parameters(), loop_model.named_parameters()):
        assert torch.equal(p, q), n
    fresh = build()[1]  # the same seed-0 weights before any step: the steps did move them
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


def test_clip_gradients_then_step_computes_the_norm_once(monkeypatch):
    """``clip_gradients`` returns the total norm before clipping and clips; the ``step`` after it
    does not compute the norm again; ``zero_grad`` forgets a clip whose step did not come."""
    cfg, model, opt = build()
    calls = []
    clip_grad_norm = torch.nn.utils.clip_grad_norm_

    def counting(*args, **kwargs):
        calls.append(1)
        return clip_grad_norm(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting)
    set_random_grads(model, 1000.0, seed=20)
    before = total_norm([p for _, p in trainable(model)])
    norm = opt.clip_gradients()
    assert float(norm) == pytest.approx(before, rel=1e-5)
    assert total_norm([p for _, p in trainable(model)]) == pytest.approx(1.0, rel=1e-4)
    opt.step()
    assert len(calls) == 1
    set_random_grads(model, 1000.0, seed=21)
    opt.step()  # without clip_gradients: step clips by itself
    assert len(calls) == 2
    assert total_norm([p for _, p in trainable(model)]) == pytest.approx(1.0, rel=1e-4)
    opt.clip_gradients()
    opt.zero_grad()
    set_random_grads(model, 1000.0, seed=22)
    opt.step()  # the forgotten clip: these new gradients are clipped
    assert len(calls) == 4
    assert total_norm([p for _, p in trainable(model)]) == pytest.approx(1.0, rel=1e-4)
