"""One training path for both config systems: every feature of train_net.py, the demo and the
checkpoint handling, from ``configs/sparse_rcnn_quick_cpu.yaml`` and from its LazyConfig twin
``configs/sparse_rcnn_quick_cpu.py``, at tiny sizes (a 32-d head, 20 proposals, 64-px images, the
ResNet-18 frozen so that checkpoints stay small). Each test runs once per system; docs/configs.md
lists the features and the test of each."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser
from detectron2.utils.events import EventStorage

from conftest import CONFIG_DIR, REPO_ROOT, registered_synthetic_shapes
from sparse_rcnn import model_zoo
from sparse_rcnn.checkpoint import CorruptCheckpointError
from sparse_rcnn.config_loader import config_reader, load_config
from sparse_rcnn.crowdhuman_evaluation import CrowdHumanEvaluator
from sparse_rcnn.demo import main as demo_main
from sparse_rcnn.evaluation import PerStageEvaluator
from sparse_rcnn.resumable_loader import ResumableLoaderHook, ResumableTrainLoader
from sparse_rcnn.trainer import NonFiniteSkippingTrainer

sys.path.insert(0, str(REPO_ROOT))
import train_net  # noqa: E402

KINDS = ["yaml", "py"]
CONFIGS = {kind: CONFIG_DIR / f"sparse_rcnn_quick_cpu.{kind}" for kind in KINDS}
PREFIX = "onepath_shapes"

# setting -> (yaml key, LazyConfig key)
KEYS = {
    "output_dir": ("OUTPUT_DIR", "train.output_dir"),
    "max_iter": ("SOLVER.MAX_ITER", "train.max_iter"),
    "train": ("DATASETS.TRAIN", "dataloader.train.dataset.names"),
    "test": ("DATASETS.TEST", "dataloader.test.dataset.names"),
    "checkpoint_period": ("SOLVER.CHECKPOINT_PERIOD", "train.checkpointer.period"),
    "eval_period": ("TEST.EVAL_PERIOD", "train.eval_period"),
    "seed": ("SEED", "train.seed"),
    "lr": ("SOLVER.BASE_LR", "optimizer.lr"),
    "batch": ("SOLVER.IMS_PER_BATCH", "dataloader.train.total_batch_size"),
    "weights": ("MODEL.WEIGHTS", "train.init_checkpoint"),
    "per_stage": ("MODEL.SPARSE_RCNN.EVAL_PER_STAGE", "model.output_all_stages"),
    "tta": ("TEST.AUG.ENABLED", "tta.enabled"),
    "tta_min_sizes": ("TEST.AUG.MIN_SIZES", "tta.model.min_sizes"),
    "tta_scale_ranges": ("TEST.AUG.SCALE_RANGES", "tta.model.scale_ranges"),
}
# The same tiny model from both configs (the twins build the same modules and names).
TINY = {
    "yaml": [
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.SPARSE_RCNN.HIDDEN_DIM", "32",
        "MODEL.SPARSE_RCNN.NHEADS", "4", "MODEL.SPARSE_RCNN.DIM_FEEDFORWARD", "64",
        "MODEL.SPARSE_RCNN.DIM_DYNAMIC", "8", "MODEL.SPARSE_RCNN.NUM_PROPOSALS", "20",
        "MODEL.BACKBONE.FREEZE_AT", "5", "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
        "DATALOADER.NUM_WORKERS", "0",
    ],
    "py": [
        "model.head.hidden_dim=32", "model.head.nheads=4", "model.head.dim_feedforward=64",
        "model.head.dim_dynamic=8", "model.proposal_generator.num_proposals=20",
        "model.backbone.bottom_up.freeze_at=5",
        "dataloader.train.mapper.augmentations.min_size=[64]",
        "dataloader.train.mapper.augmentations.max_size=96",
        "dataloader.test.mapper.augmentations.0.short_edge_length=64",
        "dataloader.test.mapper.augmentations.0.max_size=96",
        "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
    ],
}  # fmt: skip


def _value(kind, setting, value):
    if setting in ("train", "test"):
        return f"('{value}',)" if kind == "yaml" else value
    if isinstance(value, (list, tuple)):
        if kind == "yaml":
            return str(tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in value))
        return json.dumps([list(v) if isinstance(v, (list, tuple)) else v for v in value]).replace(
            " ", ""
        )
    return str(value)


def opts(kind, evaluate=True, **settings):
    """The command-line options of ``settings`` in the syntax of ``kind``, after the tiny sizes.
    ``evaluate=False``: no evaluation (yaml: no test set; LazyConfig: no evaluator)."""
    out = list(TINY[kind])
    settings.setdefault("seed", 3)
    settings.setdefault("batch", 2)
    for setting, value in settings.items():
        key = KEYS[setting][KINDS.index(kind)]
        value = _value(kind, setting, value)
        out += [key, value] if kind == "yaml" else [f"{key}={value}"]
    if not evaluate:
        out += ["DATASETS.TEST", "()"] if kind == "yaml" else ["dataloader.evaluator=null"]
    return out


def run_main(kind, argv):
    torch.set_num_threads(1)
    return train_net.main(
        default_argument_parser().parse_args(["--config-file", str(CONFIGS[kind]), *argv])
    )


def make_trainer(kind, argv):
    args = default_argument_parser().parse_args(["--config-file", str(CONFIGS[kind]), *argv])
    return train_net.Trainer(train_net.setup(args))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    generator = registered_synthetic_shapes(
        tmp_path_factory, PREFIX, {"train": 8, "val": 3}, image_size=64
    )
    root = next(generator)
    DatasetCatalog.get(f"{PREFIX}_train")  # generate the files once (the subprocesses read them)
    yield root
    next(generator, None)


DATA = {"train": f"{PREFIX}_train", "test": f"{PREFIX}_val"}


def record(category_ids, file_name="img.png", boxes=None):
    boxes = boxes or [[1.0, 1.0, 10.0, 10.0]] * len(category_ids)
    annotations = [
        {"bbox": b, "bbox_mode": 0, "category_id": c} for b, c in zip(boxes, category_ids)
    ]
    return {"file_name": file_name, "height": 32, "width": 32, "image_id": file_name,
            "annotations": annotations}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Config loading
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_one_loader_takes_each_systems_override_syntax(kind):
    cfg = load_config(CONFIGS[kind], opts(kind, max_iter=7, lr=0.001))
    run = config_reader(cfg)
    assert (run.max_iter, run.base_lr, run.lazy) == (7, 0.001, kind == "py")
    assert run.num_classes == 3 and run.test_dataset_names == ["synthetic_shapes_val"]
    # The model zoo reads through the same loader.
    zoo = config_reader(model_zoo.get_config(f"sparse_rcnn_quick_cpu.{kind}", opts(kind, lr=0.002)))
    assert zoo.base_lr == 0.002
    # The other system's syntax is refused with the right one.
    wrong = ["train.max_iter=7"] if kind == "yaml" else ["SOLVER.MAX_ITER", "7"]
    right = "KEY VALUE pairs" if kind == "yaml" else "key=value overrides"
    with pytest.raises(ValueError, match=right):
        load_config(CONFIGS[kind], wrong)


# ------------------------------------------------------------------------------------------------
# Before the first iteration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_trainer_warns_about_the_lr_and_skips_a_non_finite_step(kind, datasets, tmp_path, records):
    log = records("sparse_rcnn.solver")
    trainer = make_trainer(kind, opts(kind, output_dir=tmp_path, lr=0.01, batch=4, **DATA))
    # The paper's 2.5e-5 for 16 images, scaled to 4 images: 6.25e-6; 0.01 is 1600x that.
    lr_key, batch_key = (
        ("SOLVER.BASE_LR", "SOLVER.IMS_PER_BATCH")
        if kind == "yaml"
        else ("optimizer.lr", "dataloader.train.total_batch_size")
    )
    fix = f"{lr_key} 6.25e-06" if kind == "yaml" else f"{lr_key}=6.25e-06"
    (message,) = log.messages
    assert f"{lr_key} 0.01 is 1600x" in message and f"{batch_key} 4" in message
    assert f"set {fix}" in message
    # The same trainer: non-finite steps skipped, the data order saved and continued.
    inner = trainer._trainer
    assert isinstance(inner, NonFiniteSkippingTrainer) and (inner.lr_key, inner.ims_key) == (
        lr_key, batch_key
    )  # fmt: skip
    assert isinstance(trainer.data_loader, ResumableTrainLoader)
    assert any(isinstance(h, ResumableLoaderHook) for h in trainer._hooks)
    model = trainer.model
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    nan = model.head.head_series[1].register_forward_hook(
        lambda module, inputs, output: (output[0] * float("nan"),) + tuple(output[1:])
    )
    with EventStorage(0):
        trainer.iter = 0
        trainer.run_step()
    nan.remove()
    assert inner.skipped_steps == 1 and model.criterion.non_finite.startswith("stage 2")
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())
    assert not trainer.optimizer.state  # AdamW took no step


@pytest.mark.parametrize("kind", KINDS)
def test_datasets_are_checked_against_the_model_before_training(
    kind, datasets, fake_dataset, tmp_path, records, monkeypatch
):
    key = "MODEL.SPARSE_RCNN.NUM_CLASSES 3" if kind == "yaml" else "model.num_classes 3"
    bad = fake_dataset(f"onepath_bad_ids_{kind}", [record([0, 2]), record([7], "seven.png")])
    with pytest.raises(ValueError) as info:
        make_trainer(kind, opts(kind, output_dir=tmp_path, train=bad, test=f"{PREFIX}_val"))
    assert "category_id 7" in str(info.value) and "seven.png" in str(info.value)
    assert key in str(info.value)
    # A test set whose classes do not fit stops before training too.
    four = fake_dataset(f"onepath_four_{kind}", [record([0])], thing_classes=list("abcd"))
    with pytest.raises(ValueError, match=f"has 4 classes .*{key}"):
        make_trainer(kind, opts(kind, output_dir=tmp_path, train=f"{PREFIX}_train", test=four))
    # Annotations the mapper drops are counted once, in one line.
    log = records("sparse_rcnn.dataset_checks")
    boxes = [[1, 1, 10, 10], [5, 5, 5, 9], [float("nan"), 1, 3, 3]]
    drops = fake_dataset(f"onepath_drops_{kind}", [record([0, 1, 2], "d.png", boxes)])
    make_trainer(kind, opts(kind, output_dir=tmp_path, train=drops, evaluate=False))
    assert len(log.messages) == 1 and "2 of 3 annotations" in log.messages[0]
    # A dataset whose files are missing: where Detectron2 looks and how to point it elsewhere.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="DETECTRON2_DATASETS"):
        make_trainer(kind, opts(kind, output_dir=tmp_path, train="coco_2017_val", evaluate=False))


# ------------------------------------------------------------------------------------------------
# Training and evaluation
# ------------------------------------------------------------------------------------------------
TTA = {"tta": True, "tta_min_sizes": (64, 96), "tta_scale_ranges": ((16, 1000), (0, 64))}


@pytest.fixture(scope="module", params=KINDS)
def trained(request, datasets, tmp_path_factory):
    """2 iterations, evaluated after each (periodic, then final) per stage and with TTA."""
    kind = request.param
    out = tmp_path_factory.mktemp(f"trained_{kind}")
    argv = opts(kind, output_dir=out, max_iter=2, eval_period=1, per_stage=True, **TTA, **DATA)
    results = run_main(kind, argv)
    return kind, out, results


def read_metrics(folder):
    with open(folder / "metrics.json") as f:
        return [json.loads(line) for line in f]


def test_periodic_and_final_evaluation_per_stage_and_with_tta(trained):
    kind, out, results = trained
    stages = {f"bbox_stage{t}" for t in (1, 2, 3)}
    assert set(results) == {"bbox", "bbox_TTA"} | stages
    # The last stage's detections are the model's: the same AP.
    assert results["bbox_stage3"] == pytest.approx(results["bbox"], nan_ok=True)
    evaluations = [r for r in read_metrics(out) if "bbox/AP" in r]
    # The periodic evaluation after iteration 0, and the final one (logged at max_iter).
    assert [r["iteration"] for r in evaluations] == [0, 2]
    assert all(f"{s}/AP" in evaluations[-1] for s in stages)
    (tta,) = [r for r in read_metrics(out) if "bbox_TTA/AP" in r]  # TTA at the end only
    assert tta["iteration"] == 2 and tta["bbox_TTA/AP"] == pytest.approx(
        results["bbox_TTA"]["AP"], nan_ok=True
    )
    folder = out / "inference" / f"{PREFIX}_val"
    assert (folder / "coco_instances_results.json").is_file()
    assert (folder / "stage1" / "coco_instances_results.json").is_file()
    assert (out / "inference_TTA" / f"{PREFIX}_val" / "coco_instances_results.json").is_file()


def test_eval_only_reproduces_the_final_evaluation(trained, tmp_path):
    kind, out, results = trained
    weights = out / "model_final.pth"
    argv = opts(kind, output_dir=tmp_path, per_stage=True, weights=weights, **TTA, **DATA)
    evaluated = run_main(kind, ["--eval-only", *argv])
    assert set(evaluated) == set(results)
    for key, metrics in results.items():
        assert evaluated[key] == pytest.approx(metrics, nan_ok=True), key


@pytest.mark.parametrize("kind", KINDS)
def test_crowdhuman_datasets_get_the_crowdhuman_evaluator(kind):
    config = CONFIG_DIR / f"sparse_rcnn_R_50_FPN_500pro_crowdhuman.{kind}"
    per_stage = ["MODEL.SPARSE_RCNN.EVAL_PER_STAGE", "True"] if kind == "yaml" else [
        "model.output_all_stages=True"
    ]  # fmt: skip
    plain = config_reader(load_config(config)).build_evaluator("crowdhuman_val")
    assert isinstance(plain, CrowdHumanEvaluator)
    staged = config_reader(load_config(config, per_stage)).build_evaluator("crowdhuman_val")
    assert isinstance(staged, PerStageEvaluator)
    evaluators = [staged.main_evaluator, *staged.stage_evaluators]
    assert len(evaluators) == 7 and all(isinstance(e, CrowdHumanEvaluator) for e in evaluators)


def test_demo_draws_the_same_detections_from_both_twins(datasets, tmp_path):
    torch.manual_seed(0)
    model = config_reader(load_config(CONFIGS["yaml"], TINY["yaml"])).build_model()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("weights")
    weights = tmp_path / "weights.pth"
    drawn = {}
    for kind in KINDS:
        out = tmp_path / kind
        argv = ["--config-file", str(CONFIGS[kind]), "--dataset", f"{PREFIX}_val"]
        argv += ["--num-images", "2", "--output", str(out), "--confidence-threshold", "0.0"]
        argv += ["--max-detections", "5", "--opts", *opts(kind, weights=weights)]
        assert demo_main(argv) == 2 * 5
        drawn[kind] = {p.name: cv2.imread(str(p)) for p in sorted(out.iterdir())}
    assert list(drawn["py"]) == list(drawn["yaml"]) and len(drawn["yaml"]) == 2
    for name, image in drawn["yaml"].items():
        assert np.array_equal(drawn["py"][name], image), name


# ------------------------------------------------------------------------------------------------
# Checkpoints: messages, kill -9 and --resume, a truncated newest checkpoint
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_missing_and_corrupt_weights_are_reported_with_their_path(kind, datasets, tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
        run_main(kind, ["--eval-only", *opts(kind, output_dir=tmp_path, weights=missing)])
    corrupt = tmp_path / "bad.pth"
    corrupt.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(CorruptCheckpointError, match=f"{corrupt} .* corrupt or truncated"):
        run_main(kind, ["--eval-only", *opts(kind, output_dir=tmp_path, weights=corrupt)])


SUBPROCESS = """
import sys
sys.path.insert(0, {repo!r})
from detectron2.engine import default_argument_parser
from sparse_rcnn import register_synthetic_shapes
splits = {{"train": 8, "val": 3}}
register_synthetic_shapes({root!r}, splits=splits, image_size=64, prefix={prefix!r})
import train_net
train_net.main(default_argument_parser().parse_args({argv!r}))
"""


def read_last(folder):
    try:
        return (folder / "last_checkpoint").read_text().strip()
    except FileNotFoundError:
        return ""


def train_and_kill(argv, folder, root):
    """Train in a subprocess and kill -9 it once ``last_checkpoint`` names its second
    checkpoint."""
    code = SUBPROCESS.format(repo=str(REPO_ROOT), root=str(root), prefix=PREFIX, argv=argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "projects")}
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 300
        while read_last(folder) in ("", "model_0000001.pth"):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no second checkpoint within 300 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def assert_same(a, b):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# The random resize + crop of the crop models (half of the samples), at the tiny sizes: its random
# draws must come back on resume too.
CROP = {
    "yaml": [
        "INPUT.CROP.ENABLED", "True", "INPUT.CROP.SIZE", "(32, 64)",
        "INPUT.CROP.RESIZE_SIZES", "(64, 80)",
    ],
    "py": [
        "dataloader.train.mapper.augmentations.crop_type=absolute_range",
        "dataloader.train.mapper.augmentations.crop_size=[32,64]",
        "dataloader.train.mapper.augmentations.crop_resize_sizes=[64,80]",
    ],
}  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_kill_9_then_resume_equals_an_uninterrupted_run_even_from_a_truncated_checkpoint(
    kind, datasets, tmp_path, records
):
    log = records("sparse_rcnn.checkpoint")
    settings = dict(max_iter=8, checkpoint_period=2, lr=0.001, **DATA)
    killed = tmp_path / "killed"
    argv = ["--config-file", str(CONFIGS[kind]), *opts(kind, False, output_dir=killed, **settings)]
    argv += CROP[kind]
    train_and_kill(argv, killed, datasets)
    last = read_last(killed)
    assert last != "model_final.pth" and not (killed / "model_final.pth").exists()
    # A second copy whose newest checkpoint is truncated (killed while writing it).
    truncated = tmp_path / "truncated"
    shutil.copytree(killed, truncated)
    newest = truncated / last
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    for folder in (killed, truncated):
        run_main(kind, ["--resume", *opts(kind, False, output_dir=folder, **settings), *CROP[kind]])
    uninterrupted = tmp_path / "uninterrupted"
    run_main(kind, [*opts(kind, False, output_dir=uninterrupted, **settings), *CROP[kind]])
    reference = torch.load(uninterrupted / "model_final.pth", map_location="cpu")
    for folder in (killed, truncated):
        resumed = torch.load(folder / "model_final.pth", map_location="cpu")
        assert resumed["iteration"] == reference["iteration"] == 7
        assert_same(resumed["model"], reference["model"])
    # The truncated copy went on from the newest readable checkpoint, and said so.
    (warning,) = [m for m in log.messages if m.startswith("Resuming from")]
    assert str(newest) in warning and "cannot be read" in warning
    previous = warning.split(":")[0][len("Resuming from ") :]
    assert previous != str(newest) and os.path.basename(previous).startswith("model_")
    assert read_last(truncated) == "model_final.pth"
    # The weights did move: the run trained after the checkpoint it resumed from.
    initial = torch.load(killed / last, map_location="cpu")["model"]
    assert any(not torch.equal(initial[k], reference["model"][k]) for k in initial)
