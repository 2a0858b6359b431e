"""Training that does not die, and errors that say what to do: pre-flight checks, the skipping of
non-finite steps, checkpoint repair and the --resume fallback, inference input checks,
first-contact messages."""

import copy
import itertools
import logging
import os
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.engine import default_argument_parser, defaults
from detectron2.utils.events import EventStorage

from conftest import (
    CONFIG_DIR,
    REPO_ROOT,
    TINY_CONFIG,
    build_tiny_model,
    make_cfg,
)
from sparse_rcnn import (
    checkpoint,
    dataset_checks,
    demo as demo_module,
    distributed,
    solver,
    trainer as trainer_module,
)
from sparse_rcnn.checkpoint import load_model_weights
from sparse_rcnn.data_loaders import build_sparse_rcnn_train_loader
from sparse_rcnn.dataset_mapper import SparseRCNNDatasetMapper
from sparse_rcnn.resumable_loader import ResumableTrainLoader
from sparse_rcnn.runtime import setup_package_logger
from sparse_rcnn.solver import build_optimizer
from sparse_rcnn.trainer import NonFiniteSkippingTrainer
from test_distributed import make_batch

sys.path.insert(0, str(REPO_ROOT))
import train_net  # noqa: E402


def record(category_ids, file_name="img.png", boxes=None):
    boxes = boxes or [[1.0, 1.0, 10.0, 10.0]] * len(category_ids)
    return {
        "file_name": file_name,
        "height": 32,
        "width": 32,
        "image_id": file_name,
        "annotations": [
            {"bbox": b, "bbox_mode": 0, "category_id": c} for b, c in zip(boxes, category_ids)
        ],
    }


# ------------------------------------------------------------------------------------------------
# Before the first iteration
# ------------------------------------------------------------------------------------------------
def test_faster_rcnn_lr_warns_with_the_scaled_paper_value_and_the_key(records):
    log = records("sparse_rcnn.solver")
    cfg = make_cfg(opts=["SOLVER.BASE_LR", 0.01, "SOLVER.IMS_PER_BATCH", 4])
    message = solver.check_learning_rate(cfg)
    # The paper's 2.5e-5 for 16 images, scaled to 4 images: 6.25e-6.
    assert "SOLVER.BASE_LR 6.25e-06" in message and "SOLVER.IMS_PER_BATCH 4" in message
    assert "1600x" in message  # 0.01 / 6.25e-6
    assert log.messages == [message]
    # Both sides of the threshold (200x the paper value scaled to IMS_PER_BATCH).
    for ims, factor, warns in [
        (4, 0.99, False),
        (4, 1.01, True),
        (16, 0.99, False),
        (16, 1.01, True),
    ]:
        lr = solver.LR_WARNING_FACTOR * solver.paper_lr(ims) * factor
        cfg = make_cfg(opts=["SOLVER.BASE_LR", lr, "SOLVER.IMS_PER_BATCH", ims])
        assert (solver.check_learning_rate(cfg) is not None) == warns, (ims, factor)
    # SGD is not checked (the paper gives no SGD LR).
    sgd = make_cfg(opts=["SOLVER.BASE_LR", 0.02, "SOLVER.OPTIMIZER", "SGD"])
    assert solver.check_learning_rate(sgd) is None


def test_no_config_in_configs_warns_about_its_lr():
    configs = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        assert solver.check_learning_rate(make_cfg(path)) is None, path.name


def test_category_id_outside_num_classes_stops_before_training(fake_dataset, tmp_path):
    name = fake_dataset("robust_bad_ids", [record([0, 2]), record([7], "seven.png")])
    cfg = make_cfg(opts=["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()"])
    cfg.OUTPUT_DIR = str(tmp_path)
    with pytest.raises(ValueError) as info:
        train_net.Trainer(cfg)  # builds the model, then the loader: no iteration has run
    message = str(info.value)
    assert name in message and "category_id 7" in message and "seven.png" in message
    assert "MODEL.SPARSE_RCNN.NUM_CLASSES 3" in message


def test_thing_classes_that_differ_from_num_classes_stop_with_the_key(fake_dataset):
    name = fake_dataset("robust_four_classes", [record([0])], thing_classes=["a", "b", "c", "d"])
    cfg = make_cfg(opts=["DATASETS.TRAIN", f"('{name}',)"])
    with pytest.raises(ValueError, match=r"has 4 classes .* set MODEL.SPARSE_RCNN.NUM_CLASSES 4"):
        build_sparse_rcnn_train_loader(cfg)


def test_dropped_annotations_are_counted_and_reported_once(fake_dataset, records):
    log = records("sparse_rcnn.dataset_checks")
    boxes = [[1, 1, 10, 10], [5, 5, 5, 9], [float("nan"), 1, 3, 3], [2, 2, 0, 8]]
    dicts = [record([0, 1, 2, 0], f"{i}.png", boxes) for i in range(3)]
    dicts[0]["annotations"][0]["iscrowd"] = 1
    counts = dataset_checks.count_invalid_annotations("robust_drops", dicts)
    # Per image: box 2 has zero width, box 3 is NaN, box 4 has zero height (x1 = x0 + 0).
    assert counts == {"degenerate": 6, "non-finite": 3, "crowd": 1}
    assert len(log.messages) == 1
    assert "10 of 12 annotations" in log.messages[0] and "robust_drops" in log.messages[0]


def test_mapper_counts_its_drops_and_reports_them_once(tmp_path, records):
    log = records("sparse_rcnn.dataset_mapper")
    path = str(tmp_path / "img.png")
    cv2.imwrite(path, np.zeros((32, 32, 3), np.uint8))
    cfg = make_cfg(opts=["INPUT.CROP.ENABLED", False, "INPUT.RANDOM_FLIP", "none"])
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (32,), 32
    mapper = SparseRCNNDatasetMapper(cfg, is_train=True)
    mapper.report_after = 3
    sample = record([0, 1, 2], path, [[1, 1, 10, 10], [4, 4, 4, 9], [2, 2, 12, 12]])
    sample["annotations"][2]["iscrowd"] = 1
    for _ in range(5):
        out = mapper(copy.deepcopy(sample))
        assert len(out["instances"]) == 1
    assert mapper.dropped == {"invalid": 5, "crowd": 5, "cropped away": 0}
    assert len(log.messages) == 1 and "6 annotations in its first 3" in log.messages[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
def test_cuda_config_without_cuda_stops_and_says_how_to_use_the_cpu(tmp_path):
    config = str(CONFIG_DIR / "sparse_rcnn_R_50_FPN_100pro_3x.yaml")
    args = default_argument_parser().parse_args(
        ["--config-file", config, "OUTPUT_DIR", str(tmp_path)]
    )
    with pytest.raises(RuntimeError, match="no CUDA device.*add `MODEL.DEVICE cpu`.*270000"):
        train_net.setup(args)
    with pytest.raises(RuntimeError, match="add `--opts MODEL.DEVICE cpu` to the demo.py"):
        demo_module.setup_cfg(config, [], 0.5)
    # MODEL.DEVICE cpu keeps working, in a config or on the command line.
    args.opts += ["MODEL.DEVICE", "cpu"]
    assert train_net.setup(args).MODEL.DEVICE == "cpu"
    assert demo_module.setup_cfg(str(TINY_CONFIG), [], 0.5).MODEL.DEVICE == "cpu"


def test_missing_dataset_names_detectron2_datasets_and_the_layout(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # Detectron2's COCO paths are relative to $DETECTRON2_DATASETS
    cfg = make_cfg(opts=["DATASETS.TRAIN", "('coco_2017_val',)"])
    with pytest.raises(FileNotFoundError) as info:
        build_sparse_rcnn_train_loader(cfg)
    message = str(info.value)
    assert "DETECTRON2_DATASETS" in message and "coco_2017_val" in message
    assert "coco/annotations/instances_{train,val}2017.json" in message


def test_missing_and_corrupt_checkpoints_are_reported_with_their_path(tmp_path):
    model = build_tiny_model()
    path = tmp_path / "model_0000009.pth"
    torch.save({"model": model.state_dict()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # killed while saving
    cfg = make_cfg(opts=["MODEL.WEIGHTS", str(path)])
    with pytest.raises(checkpoint.CorruptCheckpointError, match=f"{path} .* corrupt or truncated"):
        load_model_weights(model, cfg)
    cfg.MODEL.WEIGHTS = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth does not exist"):
        load_model_weights(model, cfg)
    # --resume reads the checkpoint that last_checkpoint names.
    (tmp_path / "last_checkpoint").write_text(path.name)
    cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS = str(tmp_path), ""
    with pytest.raises(checkpoint.CorruptCheckpointError, match=str(path)):
        load_model_weights(model, cfg, resume=True)
    # A run killed while writing last_checkpoint leaves it empty: the newest checkpoint is used.
    trained = build_tiny_model(seed=1)
    torch.save({"model": trained.state_dict()}, tmp_path / "model_0000003.pth")
    path.unlink()
    (tmp_path / "last_checkpoint").write_text("")
    load_model_weights(model, cfg, resume=True)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert_same(model.state_dict(), trained.state_dict())


def _checkpointer_with(folder, names, last):
    """A DetectionCheckpointer on ``folder`` holding the files ``names`` (each a distinct model),
    with ``last_checkpoint`` saying ``last``."""
    from detectron2.checkpoint import DetectionCheckpointer

    states = {}
    for seed, name in enumerate(names, start=1):
        states[name] = build_tiny_model(seed=seed).state_dict()
        torch.save({"model": states[name]}, folder / name)
    if last is not None:
        (folder / "last_checkpoint").write_text(last)
    return DetectionCheckpointer(build_tiny_model(), save_dir=str(folder)), states


@pytest.mark.parametrize(
    "names, newest",
    [
        (["model_0000009.pth", "model_0000019.pth", "model_0000004.pth"], "model_0000019.pth"),
        (["model_0000019.pth", "model_final.pth", "model_0000009.pth"], "model_final.pth"),
        ([], None),
    ],
)
def test_an_empty_last_checkpoint_is_repaired_to_the_newest_checkpoint(tmp_path, names, newest):
    # Several checkpoints: the highest iteration wins; model_final.pth (the end) before any;
    # none left: the tag is removed and the run starts from the config's weights.
    checkpointer, states = _checkpointer_with(tmp_path, names, last="")
    checkpoint.resume_or_load(checkpointer, "", resume=True)
    if newest is None:
        assert not (tmp_path / "last_checkpoint").exists()
        assert_same(checkpointer.model.state_dict(), build_tiny_model().state_dict())
    else:
        assert (tmp_path / "last_checkpoint").read_text() == newest
        assert_same(checkpointer.model.state_dict(), states[newest])


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, records):
    log = records("sparse_rcnn.checkpoint")
    names = ["model_0000004.pth", "model_0000009.pth", "model_0000014.pth", "model_0000019.pth"]
    checkpointer, states = _checkpointer_with(tmp_path, names, last="model_0000019.pth")
    for name in ("model_0000019.pth", "model_0000014.pth"):  # the two newest are truncated
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    checkpoint.resume_or_load(checkpointer, "", resume=True)
    assert_same(checkpointer.model.state_dict(), states["model_0000009.pth"])
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    (warning,) = log.messages
    assert warning.startswith(f"Resuming from {tmp_path / 'model_0000009.pth'}: the newest")
    assert str(tmp_path / "model_0000019.pth") in warning
    assert str(tmp_path / "model_0000014.pth") in warning
    # None readable: the error names every file.
    (tmp_path / "last_checkpoint").write_text("model_0000019.pth")
    for name in ("model_0000009.pth", "model_0000004.pth"):
        (tmp_path / name).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="no checkpoint of .* can be read"):
        checkpoint.resume_or_load(checkpointer, "", resume=True)


# ------------------------------------------------------------------------------------------------
# During training: non-finite steps
# ------------------------------------------------------------------------------------------------
class FiniteOnlyMatcher(torch.nn.Module):
    """Wraps the criterion's matcher and fails if it is ever given a non-finite prediction."""

    def __init__(self, matcher):
        super().__init__()
        self.matcher = matcher

    def forward(self, pred_logits, pred_boxes, targets, stage):
        assert torch.isfinite(pred_logits).all() and torch.isfinite(pred_boxes).all()
        return self.matcher(pred_logits, pred_boxes, targets, stage)


def make_trainer(model, max_consecutive_skips=5):
    cfg = make_cfg(opts=["SOLVER.BASE_LR", 1e-4])
    model.criterion.matcher = FiniteOnlyMatcher(model.criterion.matcher)
    loader = itertools.repeat(make_batch()[:2])
    return NonFiniteSkippingTrainer(
        model,
        loader,
        build_optimizer(cfg, model),
        base_lr=1e-4,
        ims_per_batch=2,
        max_consecutive_skips=max_consecutive_skips,
    )


def nan_at_stage(model, stage, which):
    def hook(module, inputs, output):
        logits, boxes, features = output
        if which == "logits":
            logits = logits * float("nan")
        else:
            boxes = boxes.clone()
            boxes[0, 3, 2] = float("inf")
        return logits, boxes, features

    return model.head.head_series[stage].register_forward_hook(hook)


def snapshot(trainer):
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return weights, copy.deepcopy(trainer.optimizer.state_dict())


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("which", ["logits", "boxes"])
def test_a_nan_step_is_skipped_and_weights_and_optimizer_are_unchanged(which, records):
    log = records("sparse_rcnn.trainer")
    trainer = make_trainer(build_tiny_model(seed=0))
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.run_step()  # a normal step: the weights move, Adam has state
        weights, optimizer_state = snapshot(trainer)
        handle = nan_at_stage(trainer.model, 2, which)
        trainer.iter = 1
        trainer.run_step()
        handle.remove()
        after_weights, after_optimizer = snapshot(trainer)
        assert_same(weights, after_weights)
        assert after_optimizer["state"].keys() == optimizer_state["state"].keys()
        for key, state in optimizer_state["state"].items():
            assert_same(state, after_optimizer["state"][key])
        assert all(p.grad is None for p in trainer.model.parameters())
        key = "pred_logits" if which == "logits" else "pred_boxes"
        assert trainer.model.criterion.non_finite.startswith(f"stage 3 {key}")
        (message,) = log.messages
        assert message.startswith(f"Iteration 1: non-finite predictions at stage 3 {key}")
        assert "step skipped" in message
        trainer.iter = 2
        trainer.run_step()  # finite again: trained as usual
        assert trainer.consecutive_skips == 0 and trainer.skipped_steps == 1
        assert [v for v, _ in storage.history("skipped_steps").values()] == [1]
        moved = snapshot(trainer)[0]
        assert any(not torch.equal(moved[k], weights[k]) for k in weights)


def test_a_non_finite_gradient_norm_alone_skips_the_step():
    trainer = make_trainer(build_tiny_model(seed=0))
    weights, _ = snapshot(trainer)
    parameter = trainer.model.head.head_series[0].linear1.weight
    handle = parameter.register_hook(lambda grad: grad * float("inf"))
    with EventStorage(0):
        trainer.iter = 0
        trainer.run_step()
    handle.remove()
    assert trainer.model.criterion.non_finite is None  # the predictions were finite
    assert trainer.skipped_steps == 1
    assert_same(weights, snapshot(trainer)[0])
    assert trainer.optimizer.state_dict()["state"] == {}


def test_a_trainer_step_computes_the_gradient_norm_once_and_steps_as_the_optimizer(monkeypatch):
    """The non-finite check takes the norm from the optimizer's full-model clipping, so a step
    computes it once, and the weights are those of clipping inside ``optimizer.step``."""
    calls = []

    def counting(function):
        def counted(*args, **kwargs):
            calls.append(function.__name__)
            return function(*args, **kwargs)

        return counted

    trainer = make_trainer(build_tiny_model(seed=0))
    reference = build_tiny_model(seed=0)
    reference_opt = build_optimizer(make_cfg(opts=["SOLVER.BASE_LR", 1e-4]), reference)
    # Every total-norm computation: the clipping's and the trainer's own fallback.
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting(torch.nn.utils.clip_grad_norm_))
    monkeypatch.setattr(trainer_module, "total_grad_norm", counting(trainer_module.total_grad_norm))
    with EventStorage(0):
        for iteration in range(2):
            trainer.iter = iteration
            trainer.run_step()
            assert len(calls) == 2 * iteration + 1  # the trainer's step: one norm
            reference_opt.zero_grad()
            sum(reference(make_batch()[:2]).values()).backward()
            reference_opt.step()  # clips inside step
    assert len(calls) == 4
    for (name, p), q in zip(trainer.model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_repeated_nan_stops_the_run_naming_the_lr_and_the_fix():
    trainer = make_trainer(build_tiny_model(seed=0), max_consecutive_skips=3)
    nan_at_stage(trainer.model, 0, "logits")
    with EventStorage(0):
        for iteration in range(2):
            trainer.iter = iteration
            trainer.run_step()
        trainer.iter = 2
        with pytest.raises(FloatingPointError) as info:
            trainer.run_step()
    message = str(info.value)
    assert "3 steps in a row skipped at iteration 2" in message
    assert "the current LR is 0.0001 (SOLVER.BASE_LR 0.0001)" in message
    assert "SOLVER.IMS_PER_BATCH 2 is 3.13e-06" in message  # 2.5e-5 * 2 / 16 = 3.125e-6
    assert "Lower SOLVER.BASE_LR" in message


# ------------------------------------------------------------------------------------------------
# During training: the data order continues on resume
# ------------------------------------------------------------------------------------------------
def position_mapper(dataset_dict):
    """A mapper whose output shows the sample and its augmentation randomness."""
    return {
        "width": dataset_dict["width"],
        "height": dataset_dict["height"],
        "file_name": dataset_dict["file_name"],
        "draw": float(np.random.rand()),
    }


def sizes_dataset(n=11):
    # Landscape and portrait images mixed, so that aspect-ratio grouping holds samples back.
    return [{"file_name": f"{i}", "width": 40 if i % 3 else 20, "height": 30} for i in range(n)]


def batches(loader, count):
    return [
        [(d["file_name"], d["draw"]) for d in batch] for batch in itertools.islice(loader, count)
    ]


@pytest.mark.parametrize("grouping", [True, False])
def test_resumed_loader_continues_the_uninterrupted_stream(grouping):
    def make(**kwargs):
        return ResumableTrainLoader(
            sizes_dataset(), position_mapper, batch_size=3, aspect_ratio_grouping=grouping,
            seed=7, **kwargs,
        )  # fmt: skip

    uninterrupted = batches(make(), 12)
    # Detectron2's TrainingSampler order: the same shuffled epochs from the same seed.
    first_epoch = torch.randperm(11, generator=torch.Generator().manual_seed(7)).tolist()
    read = [int(name) for batch in uninterrupted[:2] for name, _ in batch]
    if not grouping:
        assert read == first_epoch[:6]
    else:
        assert set(read) <= set(first_epoch[:9])
        assert all(len({int(n) % 3 == 0 for n, _ in batch}) == 1 for batch in uninterrupted)
    for start in (1, 5, 9):
        resumed = make()
        resumed.start_iter = start
        assert batches(resumed, 12 - start) == uninterrupted[start:], start
    # Data-loader workers do not change the stream.
    assert batches(make(num_workers=2), 12) == uninterrupted
    # Another seed, another stream.
    other = ResumableTrainLoader(sizes_dataset(), position_mapper, batch_size=3, seed=8)
    assert batches(other, 12) != uninterrupted


# kill -9 and --resume from a yaml config and its .py twin, bit for bit, also from a truncated
# newest checkpoint: tests/test_one_path.py.


def run_main(argv):
    torch.set_num_threads(1)
    return train_net.main(default_argument_parser().parse_args(argv))


# ------------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------------
def test_inference_inputs_empty_list_and_malformed_inputs():
    model = build_tiny_model().eval()
    with torch.no_grad():
        assert model([]) == []
        image = torch.zeros(3, 32, 32, dtype=torch.uint8)
        with pytest.raises(TypeError, match="expects a list of dicts.*got Tensor"):
            model(image)
        with pytest.raises(ValueError, match=r"input 1: expected a dict with 'image'.*\['img'\]"):
            model([{"image": image}, {"img": image}])
        with pytest.raises(TypeError, match="input 0: 'image' must be a .* got ndarray"):
            model([{"image": np.zeros((32, 32, 3), np.uint8)}])
        with pytest.raises(ValueError, match=r"got shape \(32, 32\) \(input 0\)"):
            model([{"image": torch.zeros(32, 32)}])
    model.train()
    with pytest.raises(ValueError, match="empty list"):
        model([])


def test_training_target_with_a_class_id_outside_num_classes_names_it():
    model = build_tiny_model().train()  # 3 classes
    batch = make_batch()[2:]  # 4 boxes, 1 box
    batch[1]["file_name"] = "datasets/seven.png"
    batch[1]["instances"].gt_classes[0] = 7
    with pytest.raises(ValueError) as info:
        model(batch)
    message = str(info.value)
    assert "gt_classes id 7" in message and "datasets/seven.png" in message
    assert "MODEL.SPARSE_RCNN.NUM_CLASSES / model.num_classes 3" in message
    batch[1]["instances"].gt_classes[0] = -1  # negative ids too
    with pytest.raises(ValueError, match="gt_classes id -1"):
        model(batch)
    batch[1]["instances"].gt_classes[0] = 2  # the largest valid id trains
    assert all(torch.isfinite(v) for v in model(batch).values())


def test_eval_only_with_num_classes_that_do_not_fit_stops_before_inference(
    fake_dataset, monkeypatch, tmp_path
):
    name = fake_dataset("robust_val", [record([0])], thing_classes=["a", "b", "c"])
    monkeypatch.setattr(
        trainer_module, "inference_on_dataset", lambda *a, **k: pytest.fail("inference")
    )
    argv = ["--config-file", str(TINY_CONFIG), "--eval-only", "OUTPUT_DIR", str(tmp_path)]
    argv += ["DATASETS.TEST", f"('{name}',)", "MODEL.SPARSE_RCNN.NUM_CLASSES", "2"]
    with pytest.raises(
        ValueError,
        match="robust_val' has 3 classes .*NUM_CLASSES 2: set MODEL.SPARSE_RCNN.NUM_CLASSES 3",
    ):
        run_main(argv)


# ------------------------------------------------------------------------------------------------
# First contact
# ------------------------------------------------------------------------------------------------
def test_cpu_processes_get_their_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert distributed.cpu_threads_per_process(1, cpu_count=16) is None
    assert "OMP_NUM_THREADS" not in os.environ
    assert distributed.cpu_threads_per_process(3, cpu_count=16) == 5
    assert os.environ["OMP_NUM_THREADS"] == "5"
    assert distributed.cpu_threads_per_process(4, cpu_count=2) is None  # set now: left alone
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert distributed.cpu_threads_per_process(4, cpu_count=2) == 1  # never 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
    assert distributed.cpu_threads_per_process(2, cpu_count=16) is None
    assert os.environ["OMP_NUM_THREADS"] == "3"
    previous = torch.get_num_threads()
    try:
        assert distributed.apply_cpu_threads() == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)
    # Two real processes: see tests/test_distributed.py.


def test_demo_warns_untrained_and_reports_the_highest_score(tmp_path, records):
    log = records("sparse_rcnn.demo")
    path = tmp_path / "in" / "image.png"
    path.parent.mkdir()
    cv2.imwrite(str(path), (np.random.RandomState(0).rand(64, 80, 3) * 255).astype(np.uint8))
    argv = ["--config-file", str(TINY_CONFIG), "--input", str(path), "--output"]
    argv += [str(tmp_path / "out"), "--confidence-threshold", "0.999"]
    torch.manual_seed(0)
    assert demo_module.main(argv) == 0
    untrained, names, nothing = log.messages
    assert "MODEL.WEIGHTS is empty: the model is untrained" in untrained
    assert names == "Class names from dataset synthetic_shapes_train: rectangle, ellipse, triangle"
    # The same (seeded, untrained) model's best score.
    torch.manual_seed(0)
    cfg = demo_module.setup_cfg(str(TINY_CONFIG), [], 0.0)
    predictor = defaults.DefaultPredictor(cfg)
    highest = predictor(cv2.imread(str(path)))["instances"].scores.max().item()
    assert highest < 0.999
    assert "No detection scored above --confidence-threshold 0.999 in 1 image(s)" in nothing
    assert f"the highest score was {highest:.3f}" in nothing
    # A corrupt MODEL.WEIGHTS is reported with its path.
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(checkpoint.CorruptCheckpointError, match=str(bad)):
        demo_module.main(argv + ["--opts", "MODEL.WEIGHTS", str(bad)])


def test_package_log_lines_reach_console_and_log_txt(tmp_path):
    logger = setup_package_logger(str(tmp_path))
    assert logger.name == "sparse_rcnn"
    logging.getLogger("sparse_rcnn.builtin_datasets").info("Generating 5 synthetic_shapes images")
    assert "Generating 5 synthetic_shapes images" in (tmp_path / "log.txt").read_text()
    consoles = [h for h in logger.handlers if getattr(h, "stream", None) is sys.stdout]
    assert consoles, "no console handler"
