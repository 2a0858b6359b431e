"""Numeric parity with the official Sparse R-CNN implementation (PeizeSun/SparseR-CNN).

``tests/data/parity`` holds a tiny model's official weights (``model_final.pth``) and what the
official code computed with them (``fixture.pth``): detections, every stage's logits and boxes at
inference and in training, the 18 weighted losses, the Hungarian matches, gradients and one step of
the official solver. ``FIXTURE_README.md`` there describes each quantity and gives the tolerances
used below; they are the official code's own run-to-run differences with margin, never loosen them.

The model is loaded and each pass (inference, training forward/backward, optimizer step) runs once
per module; every test then compares one quantity, so that a failure says what differs.
"""

import contextlib
import math
import os
import re

import pytest
import torch

from conftest import PARITY_DIR, make_cfg

PARITY_CONFIG = PARITY_DIR / "sparse_rcnn_parity_tiny.yaml"
PARITY_WEIGHTS = PARITY_DIR / "model_final.pth"
PARITY_FIXTURE = PARITY_DIR / "fixture.pth"
NUM_STAGES = 6
NUM_PARAMETERS = 905238
STAGES = list(range(1, NUM_STAGES + 1))

# Tolerances of FIXTURE_README.md.
SCORE_ATOL = 1e-4  # scores and logits, absolute
BOX_ATOL = 1e-2  # boxes, pixels
LOSS_RTOL = 1e-5  # every loss term and the total, relative
PROPOSAL_GRAD_RTOL = 2e-2  # proposal-box and proposal-feature gradients, relative L2 error
GLOBAL_GRAD_NORM_RTOL = 1e-3  # L2 norm of all gradients together, relative
PARAM_GRAD_NORM_RTOL = 0.10  # L2 norm of every single parameter's gradient, relative
STEP_MEAN_ABS_DIFF = 1e-5  # optimizer-step deltas: mean absolute difference over all elements
STEP_ELEMENT_ATOL = 1e-6  # ... and at least STEP_MIN_FRACTION of the elements within this
STEP_MIN_FRACTION = 0.98

# Our loss terms -> the official ones. The official dict has the last stage without a suffix
# and stages 1..T-1 with the suffixes _0 .. _{T-2}.
LOSS_TERMS = {"cls": "loss_ce", "l1": "loss_bbox", "giou": "loss_giou"}


def official_loss_name(term: str, stage: int) -> str:
    """The official key of our ``loss_{term}_stage{stage}`` (stage is 1-based)."""
    base = LOSS_TERMS[term]
    return base if stage == NUM_STAGES else f"{base}_{stage - 1}"


def official_match_call(stage: int) -> int:
    """Index of a stage's matcher call in the fixture: the last stage first, then stages 1..T-1."""
    return 0 if stage == NUM_STAGES else stage


def official_name(name: str) -> str:
    """Our parameter name -> the official one (OFFICIAL_KEY_RENAMES reversed)."""
    from sparse_rcnn.detector import OFFICIAL_KEY_RENAMES

    for official, ours in OFFICIAL_KEY_RENAMES.items():
        if name.startswith(ours):
            return official + name[len(ours) :]
    return name


@contextlib.contextmanager
def _threads():
    # Module fixtures are set up before the function-scoped thread limit of conftest applies.
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SPARSE_RCNN_TEST_THREADS", "1")))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_parity_model(load: bool = True, opts=()):
    """Our model with the fixture's sizes; with ``load``, the official weights loaded through
    DetectionCheckpointer. Returns (cfg, model, the checkpointer's incompatible keys or None)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = make_cfg(PARITY_CONFIG, opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    incompatible = []
    if load:
        checkpointer = DetectionCheckpointer(model)
        log_incompatible = checkpointer._log_incompatible_keys

        def record(keys):  # load() reports what did not match through this method
            incompatible.append(keys)
            log_incompatible(keys)

        checkpointer._log_incompatible_keys = record
        checkpointer.load(str(PARITY_WEIGHTS))
    return cfg, model, (incompatible[0] if incompatible else None)


def run_inference(model, inputs):
    """Detections of the normal inference forward, and every stage's logits and boxes.

    Inference asks the head for the last stage's logits only; the stage outputs are captured in a
    second forward in which a pre-hook asks the head for every stage's logits.
    """
    model.eval()
    with torch.no_grad():
        detections = [out["instances"] for out in model([dict(x) for x in inputs])]

        captured = []

        def all_logits(module, args, kwargs):
            return args[:3], {**kwargs, "stages_with_logits": None}

        hooks = [
            model.head.register_forward_pre_hook(all_logits, with_kwargs=True),
            model.head.register_forward_hook(lambda module, args, output: captured.append(output)),
        ]
        try:
            model([dict(x) for x in inputs])
        finally:
            for hook in hooks:
                hook.remove()
    (stage_outputs,) = captured
    return {
        "detections": detections,
        "stage_logits": torch.stack([out["pred_logits"] for out in stage_outputs]),
        "stage_boxes": torch.stack([out["pred_boxes"] for out in stage_outputs]),
    }


def run_training(model, inputs):
    """One training forward and ``total_loss.backward()``; per-stage outputs, matches, grads."""
    model.train()
    model.zero_grad(set_to_none=True)
    stage_outputs, matches = [], []
    hooks = [
        model.head.register_forward_hook(lambda m, args, out: stage_outputs.append(out)),
        model.criterion.matcher.register_forward_hook(lambda m, args, out: matches.append(out)),
    ]
    try:
        losses = model([dict(x) for x in inputs])
    finally:
        for hook in hooks:
            hook.remove()
    total_loss = sum(losses.values())
    total_loss.backward()
    (stage_outputs,) = stage_outputs
    grads = {
        official_name(name): None if p.grad is None else p.grad.detach().clone()
        for name, p in model.named_parameters()
    }
    return {
        "losses": {k: v.detach() for k, v in losses.items()},
        "total_loss": total_loss.detach(),
        "stage_logits": torch.stack([o["pred_logits"].detach() for o in stage_outputs]),
        "stage_boxes": torch.stack([o["pred_boxes"].detach() for o in stage_outputs]),
        "matches": matches,
        "grads": grads,
    }


def run_optimizer_step(cfg, model, step_config):
    """One step of our solver (sparse_rcnn.solver.build_optimizer) on the model's current grads,
    with the fixture's LR, weight decay and backbone multiplier. Returns "deltas" (new minus old of
    every parameter, by official name), "groups" (official name -> the settings of the parameter's
    group) and "optimizer"; restores the parameters (and grads) afterwards."""
    from sparse_rcnn.solver import build_optimizer

    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.BASE_LR = step_config["base_lr"]
    cfg.SOLVER.WEIGHT_DECAY = step_config["weight_decay"]
    # The official solver decays every parameter, norms and biases included.
    cfg.SOLVER.WEIGHT_DECAY_NORM = step_config["weight_decay"]
    cfg.SOLVER.WEIGHT_DECAY_BIAS = step_config["weight_decay"]
    cfg.SOLVER.BACKBONE_MULTIPLIER = step_config["backbone_multiplier"]
    # Optimizer and clipping come from the config (test_parity_solver_config checks them).
    optimizer = build_optimizer(cfg, model)
    params = dict(model.named_parameters())
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    groups = {
        official_name(n): {k: v for k, v in group_of[id(p)].items() if k != "params"}
        for n, p in params.items()
        if id(p) in group_of
    }
    old = {name: p.detach().clone() for name, p in params.items()}
    old_grads = {name: None if p.grad is None else p.grad.clone() for name, p in params.items()}
    optimizer.step()
    deltas = {official_name(n): params[n].detach() - old[n] for n in params}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(old[name])
            p.grad = old_grads[name]
    return {"deltas": deltas, "groups": groups, "optimizer": optimizer}


@pytest.fixture(scope="module")
def fixture():
    return torch.load(PARITY_FIXTURE, weights_only=False)


@pytest.fixture(scope="module")
def loaded():
    with _threads():
        return build_parity_model(load=True)


@pytest.fixture(scope="module")
def ours_inference(loaded, fixture):
    _, model, _ = loaded
    with _threads():
        return run_inference(model, fixture["inference"]["inputs"])


@pytest.fixture(scope="module")
def ours_training(loaded, fixture):
    _, model, _ = loaded
    torch.manual_seed(0)  # nothing is random (dropout 0); for safety
    with _threads():
        return run_training(model, fixture["training"]["inputs"])


@pytest.fixture(scope="module")
def ours_step(loaded, fixture, ours_training):
    cfg, model, _ = loaded
    with _threads():
        return run_optimizer_step(cfg, model, fixture["training"]["optimizer_step"])


def _sorted_detections(instances):
    scores = instances.scores
    order = torch.argsort(scores, descending=True, stable=True)
    return scores[order], instances.pred_boxes.tensor[order], instances.pred_classes[order]


def _max_abs(a, b):
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------------------------
# Loading the official checkpoint


def test_parity_checkpoint_loads_completely(loaded):
    _, model, incompatible = loaded
    assert incompatible is not None
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMETERS


def test_parity_checkpoint_values_loaded(loaded):
    _, model, _ = loaded
    official = torch.load(PARITY_WEIGHTS, map_location="cpu", weights_only=False)["model"]
    ours = {official_name(k): v for k, v in model.state_dict().items()}
    assert set(ours) == set(official)
    different = [k for k in official if not torch.equal(ours[k], official[k].to(ours[k].dtype))]
    assert different == []


# --------------------------------------------------------------------------------------------
# Inference


@pytest.mark.parametrize("image", [0, 1])
def test_parity_detections(ours_inference, fixture, image):
    expected = fixture["inference"]["outputs"][image]
    instances = ours_inference["detections"][image]
    assert tuple(instances.image_size) == tuple(expected["image_size"])
    scores, boxes, classes = _sorted_detections(instances)
    order = torch.argsort(expected["scores"], descending=True, stable=True)
    exp_scores = expected["scores"][order]
    exp_boxes = expected["pred_boxes"][order]
    exp_classes = expected["pred_classes"][order]
    assert scores.shape == exp_scores.shape
    torch.testing.assert_close(scores, exp_scores, rtol=0, atol=SCORE_ATOL)
    # Scores closer than the tolerance may legitimately come in either order: pair every official
    # detection with one of ours of the same class, score and box, preferring the same rank.
    unused = list(range(len(scores)))
    for i in range(len(exp_scores)):
        candidates = sorted(unused, key=lambda j: (j != i, abs(j - i)))
        match = next(
            (
                j
                for j in candidates
                if classes[j] == exp_classes[i]
                and abs(scores[j] - exp_scores[i]) <= SCORE_ATOL
                and (boxes[j] - exp_boxes[i]).abs().max() <= BOX_ATOL
            ),
            None,
        )
        assert match is not None, (
            f"official detection {i} (score {exp_scores[i]:.6f}, class {exp_classes[i]}, box "
            f"{exp_boxes[i].tolist()}) has no counterpart; ours at that rank: score "
            f"{scores[i]:.6f}, class {classes[i]}, box {boxes[i].tolist()}"
        )
        unused.remove(match)


@pytest.mark.parametrize("stage", STAGES)
def test_parity_inference_stage_logits(ours_inference, fixture, stage):
    expected = fixture["inference"]["stage_logits"][stage - 1]
    ours = ours_inference["stage_logits"][stage - 1]
    torch.testing.assert_close(ours, expected, rtol=0, atol=SCORE_ATOL)


@pytest.mark.parametrize("stage", STAGES)
def test_parity_inference_stage_boxes(ours_inference, fixture, stage):
    expected = fixture["inference"]["stage_boxes"][stage - 1]
    ours = ours_inference["stage_boxes"][stage - 1]
    torch.testing.assert_close(ours, expected, rtol=0, atol=BOX_ATOL)


# --------------------------------------------------------------------------------------------
# Training forward


@pytest.mark.parametrize("stage", STAGES)
def test_parity_training_stage_logits(ours_training, fixture, stage):
    expected = fixture["training"]["stage_logits"][stage - 1]
    ours = ours_training["stage_logits"][stage - 1]
    torch.testing.assert_close(ours, expected, rtol=0, atol=SCORE_ATOL)


@pytest.mark.parametrize("stage", STAGES)
def test_parity_training_stage_boxes(ours_training, fixture, stage):
    expected = fixture["training"]["stage_boxes"][stage - 1]
    ours = ours_training["stage_boxes"][stage - 1]
    torch.testing.assert_close(ours, expected, rtol=0, atol=BOX_ATOL)


def test_parity_loss_names(ours_training, fixture):
    ours = set(ours_training["losses"])
    expected = {f"loss_{term}_stage{s}" for term in LOSS_TERMS for s in STAGES}
    assert ours == expected
    assert {official_loss_name(t, s) for t in LOSS_TERMS for s in STAGES} == set(
        fixture["training"]["losses"]
    )


@pytest.mark.parametrize("term", list(LOSS_TERMS))
@pytest.mark.parametrize("stage", STAGES)
def test_parity_loss(ours_training, fixture, stage, term):
    ours = ours_training["losses"][f"loss_{term}_stage{stage}"]
    expected = fixture["training"]["losses"][official_loss_name(term, stage)]
    torch.testing.assert_close(ours, expected, rtol=LOSS_RTOL, atol=0)


def test_parity_total_loss(ours_training, fixture):
    torch.testing.assert_close(
        ours_training["total_loss"], fixture["training"]["total_loss"], rtol=LOSS_RTOL, atol=0
    )


@pytest.mark.parametrize("stage", STAGES)
def test_parity_matches(ours_training, fixture, stage):
    assert len(ours_training["matches"]) == NUM_STAGES
    ours = ours_training["matches"][stage - 1]
    expected = fixture["training"]["matches"][official_match_call(stage)]
    assert len(ours) == len(expected)
    for image, ((src, gt), (exp_src, exp_gt)) in enumerate(zip(ours, expected)):
        pairs = sorted(zip(src.tolist(), gt.tolist()))
        exp_pairs = sorted(zip(exp_src.tolist(), exp_gt.tolist()))
        assert pairs == exp_pairs, f"image {image}"


# --------------------------------------------------------------------------------------------
# Gradients


def _relative_l2_error(ours, expected):
    return ((ours - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("name", ["init_proposal_boxes.weight", "init_proposal_features.weight"])
def test_parity_proposal_gradient(ours_training, fixture, name):
    ours = ours_training["grads"][name]
    expected = fixture["training"]["grads"][name]
    assert ours is not None and ours.shape == expected.shape
    assert _relative_l2_error(ours, expected) <= PROPOSAL_GRAD_RTOL


def _grad_norms(grads):
    return {k: 0.0 if g is None else g.norm().item() for k, g in grads.items()}


def test_parity_global_gradient_norm(ours_training, fixture):
    ours = math.sqrt(sum(n**2 for n in _grad_norms(ours_training["grads"]).values()))
    expected = math.sqrt(sum(n**2 for n in fixture["training"]["grad_norms"].values()))
    assert abs(ours - expected) <= GLOBAL_GRAD_NORM_RTOL * expected


def test_parity_parameter_gradient_norms(ours_training, fixture):
    ours = _grad_norms(ours_training["grads"])
    expected = fixture["training"]["grad_norms"]
    assert set(ours) == set(expected)
    failures = []
    for name, norm in expected.items():
        if norm == 0.0:
            if ours[name] != 0.0:
                failures.append(f"{name}: ours {ours[name]:.6g}, official 0")
        elif abs(ours[name] - norm) > PARAM_GRAD_NORM_RTOL * norm:
            failures.append(f"{name}: ours {ours[name]:.6g}, official {norm:.6g}")
    assert failures == []


# --------------------------------------------------------------------------------------------
# One optimizer step


def test_parity_solver_config(loaded, fixture):
    """The config's solver is the official one: AdamW, the L2 norm of all gradients clipped."""
    cfg, _, _ = loaded
    clip = cfg.SOLVER.CLIP_GRADIENTS
    assert cfg.SOLVER.OPTIMIZER.upper() == "ADAMW"
    assert clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.NORM_TYPE == 2.0
    assert clip.CLIP_VALUE == fixture["training"]["optimizer_step"]["clip_full_model_l2"]
    assert cfg.SOLVER.BIAS_LR_FACTOR == 1.0


def test_parity_optimizer_param_groups(loaded, ours_step, fixture):
    """The official solver's settings (FIXTURE_README.md): AdamW, betas 0.9/0.999, eps 1e-8, LR
    times the backbone multiplier for names containing "backbone", and the same weight decay on
    every trainable parameter. The deltas' global criteria below would hardly notice a few
    thousand LayerNorm elements without decay, so the settings are checked exactly here."""
    _, model, _ = loaded
    step = fixture["training"]["optimizer_step"]
    assert isinstance(ours_step["optimizer"], torch.optim.AdamW)
    trainable = {official_name(n) for n, p in model.named_parameters() if p.requires_grad}
    assert set(ours_step["groups"]) == trainable
    failures = []
    for name, group in ours_step["groups"].items():
        lr = step["base_lr"] * (step["backbone_multiplier"] if "backbone" in name else 1.0)
        expected = {"lr": lr, "weight_decay": step["weight_decay"], "betas": (0.9, 0.999)}
        expected["eps"] = 1e-8
        for key, value in expected.items():
            ours = tuple(group[key]) if key == "betas" else group[key]
            if ours != pytest.approx(value, rel=1e-12):
                failures.append(f"{name}: {key} {ours}, official {value}")
        if group.get("amsgrad", False):
            failures.append(f"{name}: amsgrad")
    assert failures == []


def test_parity_optimizer_step_deltas(ours_step, fixture):
    deltas = ours_step["deltas"]
    expected = fixture["training"]["optimizer_step"]["deltas"]
    assert set(deltas) == set(expected)
    diffs = []
    for name, delta in expected.items():
        assert deltas[name].shape == delta.shape, name
        diffs.append((deltas[name] - delta).abs().flatten())
    diffs = torch.cat(diffs)
    assert diffs.numel() == NUM_PARAMETERS
    assert diffs.mean().item() <= STEP_MEAN_ABS_DIFF
    assert (diffs <= STEP_ELEMENT_ATOL).float().mean().item() >= STEP_MIN_FRACTION


def test_parity_optimizer_step_frozen_parameters(loaded, ours_step, fixture):
    _, model, _ = loaded
    expected = fixture["training"]["optimizer_step"]["deltas"]
    frozen = [official_name(n) for n, p in model.named_parameters() if not p.requires_grad]
    # Detectron2's FREEZE_AT 2: the stem and res2.
    assert frozen and all(re.match(r"backbone\.bottom_up\.(stem|res2)\.", n) for n in frozen)
    assert all(fixture["training"]["grad_norms"][n] == 0.0 for n in frozen)
    for name in frozen:
        assert torch.count_nonzero(expected[name]) == 0, name
        assert torch.count_nonzero(ours_step["deltas"][name]) == 0, name


# --------------------------------------------------------------------------------------------
# The official init quirk


@pytest.mark.parametrize("num_classes", [5, 4, 32])
def test_parity_init_quirk_not_copied(num_classes):
    """The official ``_reset_parameters`` sets every head parameter whose last dimension equals
    num_classes to the focal prior bias; ours sets only the class-logit biases. With the parity
    config (5 classes) only the class-logit biases have that last dimension; 4 classes would also
    hit ``bboxes_delta.bias`` and 32 (= hidden dim) most LayerNorms and linear layers. The loaded
    weights override any init (test_parity_checkpoint_values_loaded), so the parity numbers do
    not depend on it."""
    prior = -math.log((1 - 0.01) / 0.01)
    with _threads():
        _, model, _ = build_parity_model(
            load=False, opts=["MODEL.SPARSE_RCNN.NUM_CLASSES", num_classes]
        )
    class_bias = re.compile(r"head_series\.\d+\.class_logits\.bias$")
    biases = [n for n, _ in model.head.named_parameters() if class_bias.fullmatch(n)]
    assert len(biases) == NUM_STAGES
    for name, p in model.named_parameters():
        is_prior = torch.equal(p.detach(), torch.full_like(p, prior))
        if name.startswith("head.") and class_bias.fullmatch(name[len("head.") :]):
            assert is_prior, name
        else:
            assert not is_prior, name
