"""Loading a checkpoint never runs code from it, and inference never runs on weights that did not
load (sparse_rcnn.checkpoint, sparse_rcnn.predictor, sparse_rcnn.convert_to_safetensors).

A malicious file here is a pickle whose unpickling would call ``os.system`` to create a marker file;
every entry point must refuse it before that call, so the marker must never appear."""

import argparse
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor, default_argument_parser, hooks
from detectron2.modeling import build_model

from conftest import (
    CONFIG_DIR,
    PARITY_DIR,
    REPO_ROOT,
    TINY_CONFIG,
    build_tiny_model,
    make_cfg,
    perturbed_tiny,
    registered_synthetic_shapes,
)
from sparse_rcnn import checkpoint as ckpt, demo, export, model_zoo
from sparse_rcnn.checkpoint import (
    ALLOW_UNSAFE_ENV,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InferenceCheckpointer,
    SafeDetectionCheckpointer,
    UnsafeCheckpointError,
)
from sparse_rcnn.convert_to_safetensors import convert_to_safetensors, main as convert_main
from sparse_rcnn.predictor import SparseRCNNPredictor
from sparse_rcnn.resumable_loader import ResumableLoaderHook

sys.path.insert(0, str(REPO_ROOT))
import train_net  # noqa: E402

OFFICIAL = PARITY_DIR / "model_final.pth"
PARITY_CONFIG = PARITY_DIR / "sparse_rcnn_parity_tiny.yaml"
PREFIX = "safety_shapes"


class Payload:
    """Unpickling calls ``os.system("touch <marker>")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(autouse=True)
def _no_unsafe_env(monkeypatch):
    monkeypatch.delenv(ALLOW_UNSAFE_ENV, raising=False)


@pytest.fixture
def malicious(tmp_path):
    """``{"pth": path, "pkl": path}`` of files that would run a shell command; after the test,
    the command's marker file must not exist."""
    marker = tmp_path / "code_ran"
    state = {k: v.numpy() for k, v in build_tiny_model().state_dict().items()}
    files = {"pth": tmp_path / "evil.pth", "pkl": tmp_path / "evil.pkl"}
    # The payload after real weights: nothing in the file may be taken on trust.
    torch.save({"model": {}, "x": Payload(marker)}, files["pth"])
    with open(files["pkl"], "wb") as f:
        pickle.dump({"model": state, "__author__": Payload(marker)}, f)
    yield {k: str(v) for k, v in files.items()}
    assert not marker.exists(), "a checkpoint ran code"


def refused(path):
    """pytest.raises for the refusal of ``path``: names the file, the global and the opt-in."""
    return pytest.raises(
        UnsafeCheckpointError,
        match=f"(?s){path} was not loaded: it contains posix.system, .*could run code.*"
        f"{ALLOW_UNSAFE_ENV}=1",
    )


def assert_same_state(model, expected):
    actual = model.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], torch.as_tensor(value)), key


def random_image(h=80, w=120, seed=0):
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)  # BGR


def assert_same_instances(a, b):
    assert len(a) == len(b) > 0
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


# ------------------------------------------------------------------------------------------------
# Malicious files are refused by every entry point
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pth", "pkl"])
def test_malicious_file_is_refused_by_the_loader_and_the_checkpointers(malicious, kind):
    path = malicious[kind]
    with refused(path):
        ckpt.load_checkpoint_file(path)
    for cls in (SafeDetectionCheckpointer, InferenceCheckpointer):
        with refused(path):
            cls(build_tiny_model()).load(path)


@pytest.mark.parametrize("kind", ["pth", "pkl"])
def test_malicious_file_is_refused_by_train_net_eval_only_in_a_subprocess(
    malicious, kind, tmp_path
):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "projects"), OMP_NUM_THREADS="1")
    env.pop(ALLOW_UNSAFE_ENV, None)
    command = [sys.executable, str(REPO_ROOT / "train_net.py"), "--config-file", str(TINY_CONFIG)]
    command += ["--eval-only", "MODEL.WEIGHTS", malicious[kind], "OUTPUT_DIR", str(tmp_path / "o")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "UnsafeCheckpointError" in result.stderr
    assert f"{malicious[kind]} was not loaded: it contains posix.system" in result.stderr
    assert "copypaste" not in result.stdout + result.stderr  # no evaluation was reported


@pytest.mark.parametrize("kind", ["pth", "pkl"])
def test_malicious_file_is_refused_by_demo_export_model_zoo_predictor_and_lazy_eval(
    malicious, kind, tmp_path
):
    path = malicious[kind]
    image = tmp_path / "in.png"
    import cv2

    cv2.imwrite(str(image), random_image())
    with refused(path):
        demo.main(
            ["--config-file", str(TINY_CONFIG), "--input", str(image), "--output", str(tmp_path)]
            + ["--confidence-threshold", "0.5", "--opts", "MODEL.WEIGHTS", path]
        )
    with refused(path):
        export.setup_model(str(TINY_CONFIG), ["MODEL.WEIGHTS", path])
    for training in (False, True):
        with refused(path):
            model_zoo.get(
                "sparse_rcnn_tiny_cpu.yaml", weights=path, device="cpu", training=training
            )
    with refused(path):
        SparseRCNNPredictor(make_cfg(opts=["MODEL.WEIGHTS", path]))
    # A LazyConfig's --eval-only (train.init_checkpoint).
    args = default_argument_parser().parse_args(
        ["--config-file", str(CONFIG_DIR / "sparse_rcnn_quick_cpu.py"), "--eval-only"]
        + [f"train.init_checkpoint={path}", "train.device=cpu", f"train.output_dir={tmp_path}"]
    )
    with refused(path):
        train_net.main(args)


# ------------------------------------------------------------------------------------------------
# What our checkpoints hold loads weights-only
# ------------------------------------------------------------------------------------------------
def test_every_torch_load_of_the_checkpointer_is_weights_only_or_restricted(monkeypatch, tmp_path):
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = perturbed_tiny()
    path = tmp_path / "with_numpy.pth"
    # numpy arrays in a .pth: PyTorch 2.3's weights-only loader refuses them; ours admits them.
    torch.save({"model": {k: v.numpy() for k, v in model.state_dict().items()}}, path)
    fresh = build_tiny_model(seed=1)
    InferenceCheckpointer(fresh).load(str(path))
    assert_same_state(fresh, model.state_dict())
    assert calls
    for kwargs in calls:
        assert kwargs.get("weights_only") is True or kwargs.get("pickle_module").__name__ == (
            "sparse_rcnn_restricted_pickle"
        )


def test_official_checkpoint_loads_weights_only_and_completely():
    raw = torch.load(OFFICIAL, map_location="cpu", weights_only=True)["model"]
    model = build_model(make_cfg(PARITY_CONFIG))
    InferenceCheckpointer(model).load(str(OFFICIAL))  # would raise if anything did not load
    renamed = {
        ("proposal_generator." + k if k.startswith("init_proposal_") else k): v
        for k, v in raw.items()
    }
    assert_same_state(model, renamed)


def test_our_checkpoint_loads_weights_only(tmp_path):
    model = perturbed_tiny()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_0000009")
    path = tmp_path / "model_0000009.pth"
    assert set(torch.load(path, map_location="cpu", weights_only=True)) == {"model"}
    fresh = build_tiny_model(seed=1)
    InferenceCheckpointer(fresh).load(str(path))
    assert_same_state(fresh, model.state_dict())


def test_numpy_pkl_backbone_loads_and_is_a_training_start_only(tmp_path):
    model = perturbed_tiny()
    backbone = {k: v.numpy() for k, v in model.state_dict().items() if k.startswith("backbone.")}
    path = tmp_path / "backbone.pkl"
    with open(path, "wb") as f:  # protocol 2, as Detectron2's model-zoo .pkl files
        pickle.dump({"model": backbone, "__author__": "test"}, f, protocol=2)
    fresh = build_tiny_model(seed=1)
    head_before = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("head.")}
    SafeDetectionCheckpointer(fresh).load(str(path))  # fine-tuning: partial load, warnings
    for key, value in fresh.state_dict().items():
        expected = backbone[key] if key in backbone else head_before.get(key)
        if expected is not None:
            assert torch.equal(value, torch.as_tensor(expected)), key
    # For inference, a backbone alone is an error naming what is missing.
    with pytest.raises(
        IncompleteCheckpointError,
        match=r"(?s)no weights for the whole `proposal_generator` \(2 parameters\), the whole "
        r"`head` \(240 parameters\).*backbone weights, which are for training",
    ):
        InferenceCheckpointer(build_tiny_model(seed=2)).load(str(path))


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_numpy_1_and_2_pickles_both_load(numpy_module, tmp_path):
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    data = pickle.dumps({"blobs": {"conv1_w": array, "conv1_w_momentum": array}}, protocol=2)
    # The name this numpy writes (numpy 1: numpy.core, numpy 2: numpy._core), made the other's.
    written = next(
        m for m in (b"numpy.core.multiarray\n", b"numpy._core.multiarray\n") if m in data
    )
    path = tmp_path / "caffe2.pkl"
    path.write_bytes(data.replace(written, numpy_module.encode() + b"\n"))
    loaded = ckpt.load_checkpoint_file(str(path))
    assert np.array_equal(loaded["blobs"]["conv1_w"], array)
    # The Caffe2 layout as Detectron2 reads it: blobs, no momentum, name-matching heuristics.
    assert ckpt.detectron2_pkl_checkpoint(loaded) == {
        "model": {"conv1_w": loaded["blobs"]["conv1_w"]},
        "__author__": "Caffe2",
        "matching_heuristics": True,
    }


@pytest.mark.parametrize(
    "data, name",
    [
        (b"cos\nsystem\n(S'true'\ntR.", "os.system"),  # protocol 0
        (b"c__builtin__\neval\n(S'1'\ntR.", "builtins.eval"),  # a Python 2 name, mapped first
        (b"ctorch\nSize\n)R}b.", "state set on a torch.Size"),  # BUILD on an admitted object
    ],
)
def test_restricted_unpickler_names_what_it_refuses(data, name, tmp_path):
    path = tmp_path / "crafted.pkl"
    path.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match=f"it contains {name}, "):
        ckpt.load_checkpoint_file(str(path))


# ------------------------------------------------------------------------------------------------
# Training: the trainer's checkpointer, a resume checkpoint
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    yield from registered_synthetic_shapes(tmp_path_factory, PREFIX, {"train": 8}, image_size=64)


def train_opts(output_dir, max_iter):
    return [
        "OUTPUT_DIR", str(output_dir),
        "DATASETS.TRAIN", f"('{PREFIX}_train',)",
        "DATASETS.TEST", "()",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.CHECKPOINT_PERIOD", "2",
        "SEED", "5",
    ]  # fmt: skip


def test_resume_checkpoint_loads_weights_only_and_resumes(datasets, tmp_path, malicious):
    out = tmp_path / "run"
    argv = ["--config-file", str(TINY_CONFIG), *train_opts(out, 3)]
    torch.set_num_threads(1)
    train_net.main(default_argument_parser().parse_args(argv))
    path = out / "model_0000001.pth"
    saved = torch.load(path, map_location="cpu", weights_only=True)  # plain types only
    assert saved["iteration"] == 1
    trainer_state = saved["trainer"]
    assert trainer_state["_trainer"]["optimizer"]["state"]  # AdamW moments
    assert trainer_state["hooks"]["LRScheduler"]["last_epoch"] == 2
    seed = trainer_state["hooks"]["ResumableLoaderHook"]["seed"]

    (out / "last_checkpoint").write_text(path.name)
    cfg = train_net.setup(default_argument_parser().parse_args(argv))
    trainer = train_net.Trainer(cfg)
    assert type(trainer.checkpointer) is SafeDetectionCheckpointer
    periodic = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert [h.checkpointer for h in periodic] == [trainer.checkpointer]
    loader_hook = next(h for h in trainer._hooks if isinstance(h, ResumableLoaderHook))
    loader_hook.loader.seed = seed + 1
    trainer.resume_or_load(resume=True)
    assert trainer.iter == 1 and trainer.start_iter == 2
    assert trainer.scheduler.last_epoch == 2
    assert loader_hook.loader.seed == seed
    assert_same_state(trainer.model, saved["model"])

    # Training from MODEL.WEIGHTS (no resume) reads weights-only too.
    (out / "last_checkpoint").unlink()
    cfg = train_net.setup(
        default_argument_parser().parse_args(argv + ["MODEL.WEIGHTS", malicious["pth"]])
    )
    with refused(malicious["pth"]):
        train_net.Trainer(cfg).resume_or_load(resume=False)


# ------------------------------------------------------------------------------------------------
# Inference stops on weights that did not load; training keeps Detectron2's warnings
# ------------------------------------------------------------------------------------------------
def run_eval_only(tmp_path, *opts):
    argv = ["--config-file", str(TINY_CONFIG), "--eval-only", "OUTPUT_DIR", str(tmp_path / "o")]
    argv += ["DATASETS.TEST", "('no_dataset_needed',)", *opts]
    return train_net.main(default_argument_parser().parse_args(argv))


def test_eval_only_with_an_empty_model_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"model": {}}, path)
    with pytest.raises(
        IncompleteCheckpointError,
        match=f"(?s){path} does not fit the model for inference: it provides none of the model's "
        r"311 parameters.*Likely cause: a file of another model",
    ):
        run_eval_only(tmp_path, "MODEL.WEIGHTS", str(path))
    none = "it provides none of the model's"
    with pytest.raises(IncompleteCheckpointError, match=none):
        export.setup_model(str(TINY_CONFIG), ["MODEL.WEIGHTS", str(path)])
    args = default_argument_parser().parse_args(
        ["--config-file", str(CONFIG_DIR / "sparse_rcnn_quick_cpu.py"), "--eval-only"]
        + [f"train.init_checkpoint={path}", "train.device=cpu", f"train.output_dir={tmp_path}"]
    )
    with pytest.raises(IncompleteCheckpointError, match=none):
        train_net.main(args)  # LazyConfig --eval-only


def test_eval_only_with_another_models_names_is_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"roi_heads.box_predictor.cls_score.weight": torch.zeros(4, 8)}}, path)
    with pytest.raises(
        IncompleteCheckpointError,
        match=r"none of the model's 311 parameters \(the names it has that the model does not: "
        r"roi_heads.box_predictor.cls_score.weight\)",
    ):
        run_eval_only(tmp_path, "MODEL.WEIGHTS", str(path))


def test_a_classifier_that_does_not_fit_is_an_error_at_inference_and_a_warning_in_training(
    tmp_path, caplog
):
    path = tmp_path / "three_classes.pth"
    torch.save({"model": perturbed_tiny().state_dict()}, path)  # NUM_CLASSES 3
    fix = "classifier has 3 classes, the config 2: set MODEL.SPARSE_RCNN.NUM_CLASSES 3"
    opts = ["MODEL.WEIGHTS", str(path), "MODEL.SPARSE_RCNN.NUM_CLASSES", "2"]
    with pytest.raises(IncompleteCheckpointError, match=f"12 tensors do not fit .*{fix}"):
        run_eval_only(tmp_path, *opts)
    with pytest.raises(IncompleteCheckpointError, match=fix):
        SparseRCNNPredictor(make_cfg(opts=opts))
    with pytest.raises(IncompleteCheckpointError, match=fix):
        demo.main(
            ["--config-file", str(TINY_CONFIG), "--input", str(tmp_path), "--output"]
            + [str(tmp_path / "out"), "--opts", *opts]
        )
    # Fine-tuning to another class count: everything else loads, the classifier is skipped.
    model = build_tiny_model(opts=["MODEL.SPARSE_RCNN.NUM_CLASSES", "2"])
    with caplog.at_level(logging.WARNING, logger="fvcore"):
        SafeDetectionCheckpointer(model).load(str(path))
    assert "Skip loading parameter 'head.head_series.0.class_logits.weight'" in caplog.text


def test_missing_weights_files_name_the_key_and_the_fix(tmp_path):
    missing = str(tmp_path / "nowhere.pth")
    fix = "does not exist .*give the path of a checkpoint"
    with pytest.raises(FileNotFoundError, match=f"MODEL.WEIGHTS {missing} {fix}"):
        SparseRCNNPredictor(make_cfg(opts=["MODEL.WEIGHTS", missing]))
    with pytest.raises(FileNotFoundError, match=f"MODEL.WEIGHTS {missing} {fix}"):
        export.setup_model(str(TINY_CONFIG), ["MODEL.WEIGHTS", missing])
    with pytest.raises(FileNotFoundError, match=f"train.init_checkpoint {missing} {fix}"):
        export.setup_model(
            str(CONFIG_DIR / "sparse_rcnn_quick_cpu.py"), [f"train.init_checkpoint={missing}"]
        )
    with pytest.raises(FileNotFoundError, match=f"weights {missing} {fix}"):
        model_zoo.get("sparse_rcnn_tiny_cpu.yaml", weights=missing, device="cpu")


# ------------------------------------------------------------------------------------------------
# Errors: refused vs corrupt; the opt-in
# ------------------------------------------------------------------------------------------------
def test_truncated_files_stay_corrupt_and_pytorch_refusals_are_unsafe(malicious, tmp_path):
    path = tmp_path / "model_0000009.pth"
    torch.save({"model": build_tiny_model().state_dict()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match=f"{path} .* corrupt or truncated"):
        ckpt.load_model_weights(build_tiny_model(), make_cfg(opts=["MODEL.WEIGHTS", str(path)]))
    # PyTorch's own weights-only refusal (a torch.load elsewhere) is not called corrupt.
    with pytest.raises(UnsafeCheckpointError, match="it contains posix.system, "):
        with ckpt.explain_checkpoint_errors(malicious["pth"]):
            torch.load(malicious["pth"], weights_only=True)


def test_the_opt_in_loads_a_trusted_pickled_object_with_a_warning(monkeypatch, tmp_path):
    model = perturbed_tiny()
    path = tmp_path / "with_args.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UnsafeCheckpointError, match="it contains argparse.Namespace, "):
        SafeDetectionCheckpointer(build_tiny_model(seed=1)).load(str(path))

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("sparse_rcnn.checkpoint")
    log.addHandler(handler)
    try:
        monkeypatch.setenv(ALLOW_UNSAFE_ENV, "1")
        fresh = build_tiny_model(seed=1)
        extra = InferenceCheckpointer(fresh).load(str(path))
        monkeypatch.delenv(ALLOW_UNSAFE_ENV)
        again = SafeDetectionCheckpointer(build_tiny_model(seed=2), allow_unsafe=True)
        again.load(str(path))
    finally:
        log.removeHandler(handler)
    assert extra["args"] == argparse.Namespace(lr=0.1)
    assert_same_state(fresh, model.state_dict())
    assert_same_state(again.model, model.state_dict())
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert f"{path} with full unpickling" in warnings[0] and "argparse.Namespace" in warnings[0]


# ------------------------------------------------------------------------------------------------
# .safetensors
# ------------------------------------------------------------------------------------------------
def test_safetensors_round_trip_gives_identical_weights_and_detections(tmp_path):
    source = perturbed_tiny()
    pth, st = tmp_path / "model.pth", tmp_path / "model.safetensors"
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("model")
    assert convert_main([str(pth), str(st)]) == len(source.state_dict())

    from_pth = SparseRCNNPredictor(make_cfg(opts=["MODEL.WEIGHTS", str(pth)]))
    from_st = SparseRCNNPredictor(make_cfg(opts=["MODEL.WEIGHTS", str(st)]))
    assert_same_state(from_st.model, source.state_dict())
    image = random_image()
    assert_same_instances(from_pth(image)["instances"], from_st(image)["instances"])


def test_official_checkpoint_converts_unchanged(tmp_path):
    from safetensors.torch import load_file

    st = tmp_path / "official.safetensors"
    convert_to_safetensors(str(OFFICIAL), str(st))
    raw = torch.load(OFFICIAL, map_location="cpu", weights_only=True)["model"]
    converted = load_file(str(st))
    assert list(converted) == sorted(raw)  # official names kept
    for key, value in raw.items():
        assert torch.equal(converted[key], value), key
    models = []
    for path in (OFFICIAL, st):
        models.append(build_model(make_cfg(PARITY_CONFIG)))
        InferenceCheckpointer(models[-1]).load(str(path))
    assert_same_state(models[1], models[0].state_dict())


def test_pkl_conversion_keeps_the_name_matching_heuristics(tmp_path):
    array = np.ones((2, 3), dtype=np.float32)
    src, dst = tmp_path / "R-50.pkl", tmp_path / "R-50.safetensors"
    with open(src, "wb") as f:
        pickle.dump({"blobs": {"res2_0_branch2a_w": array, "x_momentum": array}}, f, protocol=2)
    convert_to_safetensors(str(src), str(dst))
    loaded = ckpt.load_safetensors(str(dst))
    assert loaded["__author__"] == "Caffe2" and loaded["matching_heuristics"] is True
    assert list(loaded["model"]) == ["res2_0_branch2a_w"]
    assert torch.equal(loaded["model"]["res2_0_branch2a_w"], torch.from_numpy(array))


def test_a_corrupt_safetensors_file_is_reported(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CorruptCheckpointError, match=f"{path} .*not a readable .safetensors"):
        SafeDetectionCheckpointer(build_tiny_model()).load(str(path))


# ------------------------------------------------------------------------------------------------
# The predictor and model_zoo.get
# ------------------------------------------------------------------------------------------------
def test_predictor_matches_default_predictor_on_a_trusted_file(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": perturbed_tiny().state_dict()}, path)
    cfg = make_cfg(opts=["MODEL.WEIGHTS", str(path)])
    ours, theirs = SparseRCNNPredictor(cfg), DefaultPredictor(cfg)
    assert not ours.model.training and ours.metadata is theirs.metadata
    image = random_image(seed=3)
    assert_same_instances(ours(image)["instances"], theirs(image)["instances"])


@pytest.mark.parametrize(
    "image, error, message",
    [
        (None, TypeError, "image is None: cv2.imread returns None"),
        (np.zeros((40, 50), np.uint8), ValueError, r"\(40, 50\), a grayscale .*COLOR_GRAY2BGR"),
        (np.zeros((40, 50, 4), np.uint8), ValueError, r"\(40, 50, 4\).*COLOR_BGRA2BGR"),
        (np.zeros((40, 50, 1), np.uint8), ValueError, r"\(40, 50, 1\).*COLOR_GRAY2BGR"),
        (np.zeros((3, 40, 50), np.uint8), ValueError, r"channels-first: image.transpose\(1, 2, 0"),
        (torch.zeros(40, 50, 3), TypeError, r"torch.Tensor: .*numpy \(H, W, 3\) BGR"),
        ([[0, 0, 0]], TypeError, r"a list: .*numpy \(H, W, 3\)"),
    ],
)
def test_predictor_image_errors_name_the_fix(image, error, message):
    predictor = SparseRCNNPredictor(make_cfg())
    with pytest.raises(error, match=message):
        predictor(image)


def test_model_zoo_get_returns_a_model_ready_for_inference(tmp_path):
    model = model_zoo.get("sparse_rcnn_tiny_cpu.yaml", device="cpu")
    assert not model.training and not any(m.training for m in model.modules())
    assert model_zoo.get("sparse_rcnn_tiny_cpu.yaml", device="cpu", training=True).training
    path = tmp_path / "w.safetensors"
    source = perturbed_tiny()
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("w")
    convert_to_safetensors(str(tmp_path / "w.pth"), str(path))
    loaded = model_zoo.get("sparse_rcnn_tiny_cpu.yaml", weights=path, device="cpu")
    assert_same_state(loaded, source.state_dict())
    # Ready for inference: a batch without "instances" runs.
    with torch.no_grad():
        out = loaded([{"image": torch.as_tensor(random_image().transpose(2, 0, 1).copy())}])
    assert len(out[0]["instances"]) > 0


def test_admitted_globals_are_tensors_arrays_plain_types_and_stand_ins():
    # A guard against widening the allow-list by accident: outside torch and numpy, only these.
    admitted = ckpt._admitted_globals()
    others = {f"{m}.{n}" for m, n in admitted if not m.startswith(("torch", "numpy"))}
    plain = {"list", "dict", "tuple", "int", "float", "str", "bool", "bytes", "set", "frozenset"}
    plain |= {"bytearray", "complex", "slice"}
    omegaconf = {f"{m}.{n}" for m, n in ckpt._OMEGACONF_CLASSES}
    assert others == {f"builtins.{n}" for n in plain} | omegaconf | {
        "collections.OrderedDict",
        "collections.defaultdict",
        "_codecs.encode",
        "typing.Any",
    }
    assert all(admitted[tuple(name.rsplit(".", 1))] is ckpt._OmegaConfStandIn for name in omegaconf)


def test_lazy_config_optimizer_state_is_plain_and_old_omegaconf_values_load_plain(tmp_path):
    from detectron2.config import instantiate
    from omegaconf import DictConfig, ListConfig

    cfg = model_zoo.get_config("sparse_rcnn_quick_cpu.py")
    model = build_tiny_model()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    path = tmp_path / "optimizer.pth"
    torch.save(optimizer.state_dict(), path)
    assert torch.load(path, weights_only=True)["param_groups"][0]["betas"] == (0.9, 0.999)

    # Checkpoints written before held omegaconf containers (LazyConfig values): read as plain data.
    old = tmp_path / "lazy_old.pth"
    betas = ListConfig([0.9, 0.999], flags={"allow_objects": True})
    extra = DictConfig({"names": ["a", "b"], "size": 3})
    torch.save({"model": model.state_dict(), "optimizer": {"betas": betas}, "extra": extra}, old)
    loaded = ckpt.load_checkpoint_file(str(old))
    assert (
        loaded["optimizer"] == {"betas": [0.9, 0.999]}
        and type(loaded["optimizer"]["betas"]) is list
    )
    assert loaded["extra"] == {"names": ["a", "b"], "size": 3} and type(loaded["extra"]) is dict
    fresh = build_tiny_model(seed=1)
    InferenceCheckpointer(fresh).load(str(old))
    assert_same_state(fresh, model.state_dict())
