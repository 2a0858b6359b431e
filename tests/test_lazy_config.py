"""LazyConfig (.py) configs: each model-zoo config and its yaml twin build the same model (names,
shapes, parameter count, and the same outputs on the same weights), the same optimizer, LR
schedule and augmentation; train_net.py trains, resumes and evaluates a .py config."""

import copy
import json
import sys

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from detectron2.structures import Boxes, Instances
from omegaconf import ListConfig

from conftest import CONFIG_DIR, REPO_ROOT, make_cfg, registered_synthetic_shapes
from sparse_rcnn import SparseRCNNDatasetMapper, build_optimizer

sys.path.insert(0, str(REPO_ROOT))
import train_net  # noqa: E402

TWINS = [
    "sparse_rcnn_R_50_FPN_100pro_3x",
    "sparse_rcnn_R_50_FPN_300pro_crop_3x",
    "sparse_rcnn_R_101_FPN_100pro_3x",
    "sparse_rcnn_R_101_FPN_300pro_crop_3x",
    "dynamic_sparse_rcnn_R_50_FPN_300pro_crop_3x",
    "sparse_rcnn_R_50_FPN_500pro_crowdhuman",
    "sparse_rcnn_quick_cpu",
    "queryinst_R_50_FPN_1x",
    "dynamic_queryinst_R_50_FPN_300pro_crop_3x",
]


def load_lazy(name, overrides=()):
    cfg = LazyConfig.load(str(CONFIG_DIR / f"{name}.py"))
    return LazyConfig.apply_overrides(cfg, list(overrides))


def yaml_cfg(name, opts=()):
    return make_cfg(CONFIG_DIR / f"{name}.yaml", opts)


@pytest.mark.parametrize("name", TWINS)
def test_lazy_and_yaml_twins_build_the_same_model(name):
    # On the meta device: names, shapes and counts without allocating 125M parameters.
    cfg = yaml_cfg(name)
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        yaml_model = build_model(cfg)
        lazy_model = instantiate(load_lazy(name).model)
    yaml_state, lazy_state = yaml_model.state_dict(), lazy_model.state_dict()
    assert list(lazy_state) == list(yaml_state)
    assert all(lazy_state[k].shape == yaml_state[k].shape for k in yaml_state)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert count(lazy_model) == count(yaml_model)
    assert trainable(lazy_model) == trainable(yaml_model)  # the same frozen stem and res2
    assert repr(lazy_model) == repr(yaml_model)  # same modules with the same layer shapes
    # ... and the same settings that are not layers: loss and matching weights, OTA and DPG
    # parameters, proposal count and init, thresholds, box-delta weights, pooler settings.
    assert settings(lazy_model) == settings(yaml_model)
    assert settings(yaml_model)["criterion.weights"] == {"cls": 2.0, "l1": 5.0, "giou": 2.0}


_SKIP = object()


def _plain(value):
    """A comparable copy of a setting; LazyConfig's instantiate passes lists as ListConfig (as for
    every Detectron2 LazyConfig model) and the yaml path passes tuples or lists: compare as lists.
    Tensors, modules and containers of modules are not settings."""
    if isinstance(value, (ListConfig, list, tuple)):
        items = [_plain(v) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else items
    if isinstance(value, dict):
        items = {k: _plain(v) for k, v in value.items()}
        return _SKIP if any(v is _SKIP for v in items.values()) else items
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    return _SKIP


def settings(model):
    """Every plain (non-tensor, non-module) attribute of every submodule, one level into helper
    objects such as Box2BoxTransform."""
    out = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key.startswith("_"):
                continue
            full = f"{name}.{key}" if name else key
            plain = _plain(value)
            if plain is not _SKIP:
                out[full] = plain
            elif hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module):
                helper = {k: _plain(v) for k, v in vars(value).items()}
                out[full] = {k: v for k, v in helper.items() if v is not _SKIP}
    return out


def test_official_parameter_counts():
    # The counts of the official models (tests/data/official_keys; docs/configs.md), via LazyConfig.
    expected = {
        "sparse_rcnn_R_50_FPN_100pro_3x": 106237768,
        "sparse_rcnn_R_50_FPN_300pro_crop_3x": 106289768,
        "sparse_rcnn_R_101_FPN_300pro_crop_3x": 125229672,
    }
    for name, count in expected.items():
        with torch.device("meta"):
            model = instantiate(load_lazy(name).model)
        assert sum(p.numel() for p in model.parameters()) == count, name


def _inputs(size, num_images=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for i in range(num_images):
        h, w = size[0] - 8 * i, size[1]
        instances = Instances((h, w))
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(3, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 4
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.tensor([0, 2, 1])
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        inputs.append({"image": image, "instances": instances, "height": h, "width": w})
    return inputs


# The Dynamic Sparse R-CNN twin with a narrower head (the same overrides on both sides) keeps the
# test fast; every module type of the full config (DPG, OTA + one-to-one loss, NMS) is there.
NARROW_YAML = [
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.SPARSE_RCNN.HIDDEN_DIM", "64",
    "MODEL.SPARSE_RCNN.DIM_FEEDFORWARD", "128", "MODEL.SPARSE_RCNN.DIM_DYNAMIC", "16",
    "MODEL.SPARSE_RCNN.NUM_PROPOSALS", "30", "MODEL.SPARSE_RCNN.DPG.FC_DIM", "100",
]  # fmt: skip
NARROW_LAZY = [
    "model.head.hidden_dim=64", "model.head.dim_feedforward=128", "model.head.dim_dynamic=16",
    "model.proposal_generator.num_proposals=30", "model.proposal_generator.fc_dim=100",
]  # fmt: skip


@pytest.mark.parametrize(
    "name,size,yaml_opts,lazy_overrides",
    [
        ("sparse_rcnn_quick_cpu", (96, 128), [], []),
        ("dynamic_sparse_rcnn_R_50_FPN_300pro_crop_3x", (64, 96), NARROW_YAML, NARROW_LAZY),
    ],
)
def test_lazy_and_yaml_twins_give_the_same_outputs_on_the_same_weights(
    name, size, yaml_opts, lazy_overrides
):
    torch.manual_seed(0)
    yaml_model = build_model(yaml_cfg(name, yaml_opts))
    torch.manual_seed(1)  # different random init: the weights must come from the checkpoint
    lazy_model = instantiate(load_lazy(name, lazy_overrides).model)
    lazy_model.load_state_dict(yaml_model.state_dict(), strict=True)
    inputs = _inputs(size)

    losses = [model(copy.deepcopy(inputs)) for model in (yaml_model, lazy_model)]
    assert sorted(losses[0]) == sorted(losses[1]) and len(losses[0]) >= 9
    for key in losses[0]:
        torch.testing.assert_close(losses[1][key], losses[0][key], rtol=0, atol=0)

    outputs = []
    for model in (yaml_model, lazy_model):
        model.eval()
        with torch.no_grad():
            # Raw top-k (and NMS) detections: random weights can give boxes that
            # detector_postprocess drops as empty, so compare before it, then after it.
            raw = model.inference(copy.deepcopy(inputs), do_postprocess=False)
            outputs.append(raw + [o["instances"] for o in model(copy.deepcopy(inputs))])
    for a, b in zip(*outputs):
        torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, rtol=0, atol=0)
        torch.testing.assert_close(b.scores, a.scores, rtol=0, atol=0)
        assert torch.equal(b.pred_classes, a.pred_classes)
    assert all(len(r) > 0 for r in outputs[0][: len(inputs)])


def test_lazy_optimizer_is_the_yaml_optimizer():
    """Same param groups (LR with the backbone multiplier, weight decay on every parameter) and the
    same step, including the full-model clipping."""
    torch.manual_seed(0)
    model = build_model(yaml_cfg("sparse_rcnn_quick_cpu"))
    yaml_opt = build_optimizer(
        yaml_cfg("sparse_rcnn_quick_cpu", ["SOLVER.BACKBONE_MULTIPLIER", "0.1"]), model
    )
    cfg = load_lazy("sparse_rcnn_quick_cpu", ["optimizer.params.lr_factor_func.multiplier=0.1"])
    cfg.optimizer.params.model = model
    lazy_opt = instantiate(cfg.optimizer)
    assert type(lazy_opt).__name__ == "FullModelGradientClippingAdamW"

    def groups(opt):
        return [
            (g["lr"], g["weight_decay"], g["betas"], g["eps"], [id(p) for p in g["params"]])
            for g in opt.param_groups
        ]

    assert groups(lazy_opt) == groups(yaml_opt)
    lrs = sorted({g["lr"] for g in lazy_opt.param_groups})
    assert lrs == [pytest.approx(6e-5), 6e-4]  # backbone x 0.1
    assert {g["weight_decay"] for g in lazy_opt.param_groups} == {1e-4}

    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) * 10 for p in params]  # total norm >> 1: clipping applies
    results = []
    for opt in (yaml_opt, lazy_opt):
        for p, s, g in zip(params, start, grads):
            p.data.copy_(s)
            p.grad = g.clone()
        opt.step()
        clipped_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        torch.testing.assert_close(clipped_norm, torch.tensor(1.0))
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name",
    [
        "sparse_rcnn_R_50_FPN_100pro_3x",
        "sparse_rcnn_R_50_FPN_500pro_crowdhuman",
        "sparse_rcnn_quick_cpu",
        "queryinst_R_50_FPN_1x",
    ],
)
def test_lazy_lr_schedule_is_the_yaml_schedule(name):
    cfg = yaml_cfg(name)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    yaml_multiplier = build_lr_scheduler(cfg, optimizer)._multiplier
    lazy_multiplier = instantiate(load_lazy(name).lr_multiplier)
    max_iter = cfg.SOLVER.MAX_ITER
    assert load_lazy(name).train.max_iter == max_iter
    points = sorted(
        set(np.linspace(0, max_iter - 1, 97).astype(int).tolist())
        | {0, 1, cfg.SOLVER.WARMUP_ITERS - 1, cfg.SOLVER.WARMUP_ITERS}
        | {s + d for s in cfg.SOLVER.STEPS for d in (-1, 0, 1)}
    )
    for it in points:
        where = it / max_iter
        assert lazy_multiplier(where) == pytest.approx(yaml_multiplier(where), rel=1e-12), it


@pytest.mark.parametrize(
    "name",
    [
        "sparse_rcnn_R_50_FPN_300pro_crop_3x",
        "sparse_rcnn_R_50_FPN_500pro_crowdhuman",
        "sparse_rcnn_quick_cpu",
    ],
)
@pytest.mark.parametrize("is_train", [True, False])
def test_lazy_augmentation_is_the_yaml_augmentation(name, is_train):
    yaml_mapper = SparseRCNNDatasetMapper(yaml_cfg(name), is_train)
    lazy_cfg = load_lazy(name).dataloader
    lazy_mapper = instantiate(lazy_cfg.train.mapper if is_train else lazy_cfg.test.mapper)
    assert lazy_mapper.image_format == yaml_mapper.image_format == "RGB"
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    boxes = np.array([[10.0, 20.0, 300.0, 400.0], [200.0, 100.0, 620.0, 470.0]])
    crops = 0
    for seed in range(12):
        out = []
        for mapper in (yaml_mapper, lazy_mapper):
            np.random.seed(seed)
            aug_input = T.AugInput(image.copy(), boxes=boxes.copy())
            transforms = mapper.augmentations(aug_input)
            out.append((aug_input.image, aug_input.boxes, transforms))
        (img_a, box_a, tf_a), (img_b, box_b, tf_b) = out
        assert np.array_equal(img_a, img_b) and np.allclose(box_a, box_b)
        crops += any(isinstance(t, T.CropTransform) for t in tf_a)
    if is_train and "crop" in name:
        assert 0 < crops < 12  # the resize + crop of half of the samples
    else:
        assert crops == 0


# ---- train_net.py with a .py config ----

PREFIX = "lazy_shapes"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    yield from registered_synthetic_shapes(tmp_path_factory, PREFIX, {"train": 8, "val": 4})


def run_lazy(argv, output_dir, max_iter):
    torch.set_num_threads(1)
    overrides = [
        f"train.output_dir={output_dir}",
        f"train.max_iter={max_iter}",
        f"dataloader.train.dataset.names={PREFIX}_train",
        f"dataloader.test.dataset.names={PREFIX}_val",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "train.checkpointer.period=1",
        "train.log_period=1",
        "train.seed=3",
    ]
    config = str(CONFIG_DIR / "sparse_rcnn_quick_cpu.py")
    return train_net.main(
        default_argument_parser().parse_args(["--config-file", config, *argv, *overrides])
    )


def test_train_net_trains_resumes_and_evaluates_a_lazy_config(datasets, tmp_path):
    out = tmp_path / "out"
    first = run_lazy([], out, max_iter=2)
    assert (out / "model_final.pth").is_file() and (out / "model_0000000.pth").is_file()
    assert set(first) == {"bbox"} and np.isfinite(first["bbox"]["AP50"])
    resumed = run_lazy(["--resume"], out, max_iter=3)
    with open(out / "metrics.json") as f:
        records = [json.loads(line) for line in f]
    losses = [r for r in records if "total_loss" in r]
    # The second run continues at iteration 2 (from model_final.pth, iteration 1): no repeats.
    assert [r["iteration"] for r in losses] == [0, 1, 2]
    for stage in (1, 2, 3):  # the quick config's 3 stages, every loss term logged
        for term in ("cls", "l1", "giou"):
            assert f"loss_{term}_stage{stage}" in losses[-1]
    assert "lr" in losses[-1] and any(
        (out / f).name.startswith("events.out") for f in out.iterdir()
    )
    # --eval-only on the final weights gives the final evaluation of the resumed run.
    evaluated = run_lazy(
        ["--eval-only", f"train.init_checkpoint={out / 'model_final.pth'}"], out, max_iter=3
    )
    assert evaluated["bbox"] == pytest.approx(resumed["bbox"], nan_ok=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
def test_lazy_cuda_config_without_cuda_fails_with_the_key_to_change(tmp_path):
    with pytest.raises(RuntimeError, match="add `train.device=cpu`"):
        run_lazy(["train.device=cuda"], tmp_path, max_iter=1)


def test_lazy_amp_on_cpu_fails_with_the_key_to_change(tmp_path):
    with pytest.raises(ValueError, match="train.amp.enabled=False"):
        run_lazy(["train.amp.enabled=True"], tmp_path, max_iter=1)


def test_cfg_free_augmentation_rejects_an_unknown_flip():
    from sparse_rcnn.dataset_mapper import sparse_rcnn_train_augmentation

    with pytest.raises(ValueError, match="random_flip must be horizontal, vertical or none"):
        sparse_rcnn_train_augmentation(random_flip="diagonal")
