"""Export to ONNX, torch.export (.pt2) and TorchScript (sparse_rcnn.export) and the ONNX Runtime
predictor.

ONNX goes through the torch.export-based exporter where torch has it (current torch) and through
the TorchScript-based one elsewhere (the pinned torch 2.3); the ``.pt2`` format needs torch >= 2.5,
so its tests are skipped on the pinned stack and run on the current one.

Every model is exported once (module fixtures) at the export size and then compared with eager
inference at two other sizes and on an image where nothing passes the score threshold.

The test models are randomly initialised, with every stage's box-delta layer scaled by 0.1 (see
:func:`well_conditioned`): with the plain random init the boxes grow or shrink by e^{+-1} per stage
and leave the image, where RoIAlign is discontinuous (a sample that crosses the border at -1 or H
switches from its bilinear value to 0), so rounding differences of 1e-7 between two kernels (even
PyTorch's MHA fast path against its slow path) grow to pixels after a few stages. A trained model
keeps its boxes on the image; the scaled deltas do the same for a random one.
"""

import copy
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import onnxruntime
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from conftest import CONFIG_DIR, TINY_CONFIG, build_tiny_model, make_cfg
from sparse_rcnn import export as sparse_export
from sparse_rcnn.onnx_predictor import INPUT_NAME, OUTPUT_NAMES, ONNXRuntimePredictor

HAS_TORCH_EXPORT = getattr(torch.compiler, "is_exporting", None) is not None
needs_torch_export = pytest.mark.skipif(
    not HAS_TORCH_EXPORT, reason=f"torch {torch.__version__}: --format torch_export needs >= 2.5"
)

EXPORT_SIZE = (128, 160)
CANDIDATE_SIZES = [(96, 200), (160, 128), (112, 144)]

TINY_TWO_STAGES = ["MODEL.SPARSE_RCNN.NUM_STAGES", "2"]
DYNAMIC_OPTS = TINY_TWO_STAGES + [
    "MODEL.SPARSE_RCNN.PROPOSAL_GENERATOR",
    "DynamicProposalGenerator",
    "MODEL.SPARSE_RCNN.DPG.FC_DIM",
    "64",
    "MODEL.SPARSE_RCNN.NMS_ENABLED",
    "True",
    "MODEL.SPARSE_RCNN.NMS_THRESH_TEST",
    "0.5",
]
# (config file, opts): the tiny model (2 of its 6 stages, to keep the export quick), the quick
# model of the main job (as configured) and the tiny model as Dynamic Sparse R-CNN (DPG + NMS).
MODELS = {
    "tiny": (TINY_CONFIG, TINY_TWO_STAGES),
    "quick": (CONFIG_DIR / "sparse_rcnn_quick_cpu.yaml", []),
    "dynamic": (TINY_CONFIG, DYNAMIC_OPTS),
}


def well_conditioned(model, factor=0.1):
    """Scale every stage's box deltas by ``factor`` (see the module doc)."""
    with torch.no_grad():
        for stage in model.head.head_series:
            stage.bboxes_delta.weight.mul_(factor)
            stage.bboxes_delta.bias.mul_(factor)
    return model


def random_image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float()


def eager(model, image):
    with torch.no_grad():
        return sparse_export.inference_func(model, image)


def assert_same_detections(expected, actual, score_tol, box_tol):
    boxes, scores, classes = (torch.as_tensor(np.asarray(t)) for t in expected)
    boxes2, scores2, classes2 = (torch.as_tensor(np.asarray(t)) for t in actual)
    assert len(scores2) == len(scores)
    assert torch.equal(classes2, classes)
    torch.testing.assert_close(scores2, scores, atol=score_tol, rtol=0)
    torch.testing.assert_close(boxes2, boxes, atol=box_tol, rtol=0)


class Exported:
    """A model, its score threshold, its test images and its exported files."""

    def __init__(self, name, tmp_dir):
        self.name = name
        config_file, opts = MODELS[name]
        self.cfg = make_cfg(config_file, opts)
        torch.manual_seed(0)
        self.model = well_conditioned(build_model(self.cfg)).eval()
        self.export_image = random_image(*EXPORT_SIZE, seed=1)
        # Three random images of sizes other than the export size. The score threshold is
        # chosen from their eager scores: between the highest score of the image whose highest
        # score is lowest (the "empty" image: nothing passes on it) and that of the next one, so
        # that part of the detections pass on the other two (checked in the tests).
        candidates = [random_image(h, w, seed=2 + i) for i, (h, w) in enumerate(CANDIDATE_SIZES)]
        top = [eager(self.model, x)[1].max().item() for x in candidates]
        order = sorted(range(len(candidates)), key=lambda i: top[i])
        assert top[order[1]] - top[order[0]] > 1e-4, (name, top)  # far from ORT's 1e-7 errors
        self.empty_image = candidates[order[0]]
        self.images = [candidates[i] for i in order[1:]]
        self.model.score_thresh_test = (top[order[0]] + top[order[1]]) / 2
        self.cfg.MODEL.SPARSE_RCNN.SCORE_THRESH_TEST = self.model.score_thresh_test
        self.settings = sparse_export.export_settings(self.cfg)
        self.ts_path = str(tmp_dir / f"{name}.ts")
        self.onnx_path = str(tmp_dir / f"{name}.onnx")
        self.pt2_path = str(tmp_dir / f"{name}.pt2")
        self.traced = sparse_export.export_torchscript(
            self.model, self.export_image, self.ts_path, self.settings
        )
        self.program = None
        if HAS_TORCH_EXPORT:
            sparse_export.export_torch_export(
                self.model, self.export_image, self.pt2_path, self.settings
            )
            self.program = torch.export.load(self.pt2_path).module()  # as a user loads it
        sparse_export.export_onnx(self.model, self.export_image, self.onnx_path, self.settings)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(self.onnx_path, options)

    def run_onnx(self, image):
        return self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: image.numpy()})


_EXPORTED = {}  # every model is exported once per test session


def _get_exported(name, tmp_path_factory):
    if name not in _EXPORTED:
        torch.set_num_threads(1)
        _EXPORTED[name] = Exported(name, tmp_path_factory.mktemp(f"export_{name}"))
    return _EXPORTED[name]


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    return _get_exported(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model's export, for the tests that do not depend on the model."""
    return _get_exported("tiny", tmp_path_factory)


def test_export_leaves_model_in_eval_mode_with_fast_paths_restored(exported):
    assert not exported.model.training
    assert torch.backends.mha.get_fastpath_enabled()
    relus = [m for m in exported.model.modules() if isinstance(m, torch.nn.ReLU)]
    assert relus and all(m.inplace for m in relus)


def test_torchscript_matches_eager(exported):
    for image in [exported.export_image] + exported.images:
        expected = eager(exported.model, image)
        assert image is exported.export_image or 0 < len(expected[1])
        with torch.no_grad():
            actual = exported.traced(image)
        assert_same_detections(expected, actual, 1e-5, 1e-5 * 256)
        torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)


@needs_torch_export
def test_torch_export_program_matches_eager(exported):
    for image in [exported.export_image] + exported.images:
        expected = eager(exported.model, image)
        assert image is exported.export_image or 0 < len(expected[1])
        with torch.no_grad():
            actual = exported.program(image)
        assert_same_detections(expected, actual, 1e-5, 1e-5 * 256)


@needs_torch_export
def test_torch_export_program_when_nothing_passes_the_threshold(exported):
    assert len(eager(exported.model, exported.empty_image)[1]) == 0
    with torch.no_grad():
        boxes, scores, classes = exported.program(exported.empty_image)
    assert boxes.shape == (0, 4) and scores.shape == (0,) and classes.dtype == torch.int64


@needs_torch_export
def test_torch_export_file_carries_the_settings(exported):
    files = {sparse_export.SETTINGS_FILE: ""}
    torch.export.load(exported.pt2_path, extra_files=files)
    assert json.loads(files[sparse_export.SETTINGS_FILE]) == exported.settings


def test_onnx_file_records_the_exporter_it_came_from(exported):
    """torch.export-based (opset 18) where torch has that exporter, TorchScript-based (opset 17)
    on older torch."""
    meta = exported.session.get_modelmeta().custom_metadata_map
    dynamo = sparse_export.has_dynamo_onnx_exporter()
    assert meta["opset"] == str(18 if dynamo else 17)
    import onnx

    opsets = {o.domain: o.version for o in onnx.load(exported.onnx_path).opset_import}
    assert opsets[""] == int(meta["opset"])


def test_onnx_matches_eager_at_other_sizes(exported):
    num_proposals = exported.cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS
    for image in exported.images:
        expected = eager(exported.model, image)
        # The threshold (and NMS) leave part of the top-k detections: the counts are dynamic.
        assert 0 < len(expected[1]) < num_proposals
        assert_same_detections(expected, exported.run_onnx(image), 1e-4, 1e-3)


def test_onnx_and_torchscript_when_nothing_passes_the_threshold(exported):
    expected = eager(exported.model, exported.empty_image)
    assert len(expected[1]) == 0
    boxes, scores, classes = exported.run_onnx(exported.empty_image)
    assert boxes.shape == (0, 4) and scores.shape == (0,) and classes.shape == (0,)
    assert classes.dtype == np.int64
    with torch.no_grad():
        assert exported.traced(exported.empty_image)[0].shape == (0, 4)


def test_onnx_metadata_and_dynamic_axes(exported):
    meta = exported.session.get_modelmeta().custom_metadata_map
    assert meta["input_format"] == "RGB" and meta["min_size_test"] == "128"
    assert float(meta["score_thresh_test"]) == exported.model.score_thresh_test
    shape = exported.session.get_inputs()[0].shape
    assert shape[0] == 3 and isinstance(shape[1], str) and isinstance(shape[2], str)


_FRESH_PROCESS = r"""
import json, sys
import numpy as np
import onnxruntime
import onnxruntime
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = 1
session = onnxruntime.InferenceSession(sys.argv[1], options)
image = np.load(sys.argv[3])
onnx_out = session.run(["boxes", "scores", "classes"], {"image": image})
import torch, torchvision  # TorchScript: torchvision registers RoIAlign and NMS
torch.set_num_threads(1)
traced = torch.jit.load(sys.argv[2])
with torch.no_grad():
    ts_out = [t.numpy() for t in traced(torch.from_numpy(image))]
pt2_out = []
if sys.argv[5] != "-":
    program = torch.export.load(sys.argv[5]).module()
    with torch.no_grad():
        pt2_out = [t.numpy() for t in program(torch.from_numpy(image))]
assert not any(m.startswith(("sparse_rcnn", "detectron2")) for m in sys.modules), "model code"
np.savez(sys.argv[4], *onnx_out, *ts_out, *pt2_out)
"""


def test_exported_files_load_and_run_in_a_fresh_process(tiny, tmp_path):
    image = tiny.images[0]
    np.save(tmp_path / "image.npy", image.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no sparse_rcnn on the path
    subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, tiny.onnx_path, tiny.ts_path]
        + [str(tmp_path / "image.npy"), str(tmp_path / "out.npz")]
        + [tiny.pt2_path if HAS_TORCH_EXPORT else "-"],
        check=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    out = np.load(tmp_path / "out.npz")
    onnx_out, ts_out = [out[f"arr_{i}"] for i in range(3)], [out[f"arr_{i}"] for i in range(3, 6)]
    expected = eager(tiny.model, image)
    assert_same_detections(expected, onnx_out, 1e-4, 1e-3)
    assert_same_detections(expected, ts_out, 1e-5, 1e-5 * 256)
    if HAS_TORCH_EXPORT:
        pt2_out = [out[f"arr_{i}"] for i in range(6, 9)]
        assert_same_detections(expected, pt2_out, 1e-5, 1e-5 * 256)


def test_onnx_predictor_matches_default_predictor(tiny, tmp_path):
    weights = tmp_path / "model.pth"
    DetectionCheckpointer(tiny.model, save_dir=str(tmp_path)).save("model")
    cfg = tiny.cfg.clone()
    cfg.MODEL.WEIGHTS = str(weights)
    default = DefaultPredictor(cfg)
    onnx_predictor = ONNXRuntimePredictor(tiny.onnx_path, num_threads=1)  # settings: metadata
    rng = np.random.default_rng(0)
    # Not the export size, not the network's input size: resized (to 128 short side) and back.
    bgr = rng.integers(0, 256, size=(150, 230, 3), dtype=np.uint8)
    expected = default(bgr)["instances"]
    actual = onnx_predictor(bgr)["instances"]
    assert actual.image_size == expected.image_size == (150, 230)
    assert len(expected) > 0
    assert_same_detections(
        (expected.pred_boxes.tensor, expected.scores, expected.pred_classes),
        (actual.pred_boxes.tensor, actual.scores, actual.pred_classes),
        1e-4,
        1e-3,
    )
    with pytest.raises(ValueError, match="BGR image"):
        onnx_predictor(bgr[:, :, 0])


def _predictor_outputs(predictor, bgr):
    instances = predictor(bgr)["instances"]
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def _default_predictor(model, cfg, tmp_path):
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    cfg = cfg.clone()
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    return DefaultPredictor(cfg)


def test_onnx_predictor_config_overrides_the_metadata(tiny, tmp_path):
    # Another test resize than the exported one (128): the config's, as DefaultPredictor's.
    cfg = tiny.cfg.clone()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 150
    bgr = np.random.default_rng(0).integers(0, 256, size=(150, 230, 3), dtype=np.uint8)
    predictor = ONNXRuntimePredictor(tiny.onnx_path, cfg, num_threads=1)
    assert (list(predictor.aug.short_edge_length), predictor.aug.max_size) == ([96, 96], 150)
    expected = _predictor_outputs(_default_predictor(tiny.model, cfg, tmp_path), bgr)
    assert len(expected[1]) > 0
    assert_same_detections(expected, _predictor_outputs(predictor, bgr), 1e-4, 1e-3)
    from_metadata = _predictor_outputs(ONNXRuntimePredictor(tiny.onnx_path, num_threads=1), bgr)
    assert len(from_metadata[1]) != len(expected[1]) or not torch.allclose(
        from_metadata[0], expected[0]
    )  # the override changed the result


def test_onnx_predictor_score_threshold_above_the_exported_one(tiny):
    image = max(tiny.images, key=lambda x: len(eager(tiny.model, x)[1]))  # the network's input
    exported = ONNXRuntimePredictor(tiny.onnx_path, num_threads=1).run(image.numpy())
    scores = exported.scores
    assert len(scores) >= 2 and scores[-1] > tiny.model.score_thresh_test
    higher = float(scores[-2] + scores[-1]) / 2  # drops the last one
    cfg = tiny.cfg.clone()
    cfg.MODEL.SPARSE_RCNN.SCORE_THRESH_TEST = higher
    predictor = ONNXRuntimePredictor(tiny.onnx_path, cfg, num_threads=1)
    assert predictor.score_thresh == higher
    actual = predictor.run(image.numpy())
    actual = (actual.pred_boxes.tensor, actual.scores, actual.pred_classes)
    # The exported graph's detections above it, which a model exported with it gives as well.
    kept = (exported.pred_boxes.tensor, scores, exported.pred_classes)
    assert_same_detections(tuple(t[:-1] for t in kept), actual, 0, 0)
    model = copy.deepcopy(tiny.model)
    model.score_thresh_test = higher
    assert_same_detections(eager(model, image), actual, 1e-4, 1e-3)


def test_onnx_predictor_without_metadata_needs_the_config(tiny, tmp_path):
    import onnx

    proto = onnx.load(tiny.onnx_path)
    del proto.metadata_props[:]
    path = str(tmp_path / "no_metadata.onnx")
    onnx.save(proto, path)
    with pytest.raises(
        ValueError, match=r"no metadata \['input_format'.*ONNXRuntimePredictor\(path, cfg\)"
    ):
        ONNXRuntimePredictor(path)
    bgr = np.random.default_rng(0).integers(0, 256, size=(150, 230, 3), dtype=np.uint8)
    with_cfg = _predictor_outputs(ONNXRuntimePredictor(path, tiny.cfg, num_threads=1), bgr)
    with_metadata = _predictor_outputs(ONNXRuntimePredictor(tiny.onnx_path, num_threads=1), bgr)
    assert len(with_cfg[1]) > 0
    assert_same_detections(with_metadata, with_cfg, 0, 0)


def test_onnx_predictor_refuses_a_foreign_onnx_file(tiny, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, "h", "w"])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = str(tmp_path / "foreign.onnx")
    onnx.save(proto, path)
    # Without metadata and without a config: the metadata error, which names the cause too.
    with pytest.raises(ValueError, match=r"not written by sparse_rcnn\.export"):
        ONNXRuntimePredictor(path)
    # With a config, or with our metadata copied in: the inputs and outputs are not ours.
    expected = r"not a graph written by sparse_rcnn\.export: expected input 'image' and outputs"
    with pytest.raises(ValueError, match=expected + r".*\['x'\] and \['y'\]"):
        ONNXRuntimePredictor(path, tiny.cfg)
    for key, value in tiny.settings.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)
    with pytest.raises(ValueError, match=expected):
        ONNXRuntimePredictor(path)


def _write_sample_image(path):
    rng = np.random.default_rng(1)
    cv2.imwrite(str(path), rng.integers(0, 256, size=(100, 140, 3), dtype=np.uint8))
    return str(path)


@needs_torch_export
def test_export_command_writes_a_torch_export_program(tmp_path, capsys):
    sample = _write_sample_image(tmp_path / "sample.png")
    args = ["--config-file", str(TINY_CONFIG), "--sample-image", sample, "--format", "torch_export"]
    path = sparse_export.main(
        args + ["--output", str(tmp_path), "MODEL.SPARSE_RCNN.NUM_STAGES", "1"]
    )
    assert path == str(tmp_path / "model.pt2")
    printed = capsys.readouterr().out
    assert "checked at the size" in printed and "torch.export.load" in printed
    files = {sparse_export.SETTINGS_FILE: ""}
    torch.export.load(path, extra_files=files)
    assert json.loads(files[sparse_export.SETTINGS_FILE])["min_size_test"] == "128"


def test_export_command_writes_a_file_that_the_demo_runs(tmp_path, capsys):
    sample = _write_sample_image(tmp_path / "sample.png")
    args = ["--config-file", str(TINY_CONFIG), "--sample-image", sample]
    args += ["--output", str(tmp_path / "out"), "MODEL.SPARSE_RCNN.NUM_STAGES", "1"]
    path = sparse_export.main(["--format", "onnx"] + args)
    assert path == str(tmp_path / "out" / "model.onnx") and os.path.exists(path)
    printed = capsys.readouterr().out
    assert f"Wrote {path}" in printed and "checked at the size" in printed

    from sparse_rcnn import demo

    demo.main(
        ["--onnx", path, "--config-file", str(TINY_CONFIG), "--input", sample]
        + ["--output", str(tmp_path / "vis"), "--confidence-threshold", "0.0"]
    )
    assert os.path.exists(tmp_path / "vis" / "sample.png")


@pytest.mark.parametrize(
    "opts, key",
    [
        (["TEST.AUG.ENABLED", "True"], "TEST.AUG.ENABLED"),
        (["MODEL.SPARSE_RCNN.EVAL_PER_STAGE", "True"], "MODEL.SPARSE_RCNN.EVAL_PER_STAGE"),
        (["MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignRotated"], "MODEL.ROI_BOX_HEAD.POOLER_TYPE"),
    ],
)
def test_unsupported_option_fails_at_export_time_naming_it(tmp_path, opts, key):
    args = ["--config-file", str(TINY_CONFIG), "--output", str(tmp_path)] + opts
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        sparse_export.main(args)
    assert not os.listdir(tmp_path)


LAZY_QUICK = CONFIG_DIR / "sparse_rcnn_quick_cpu.py"


def test_lazy_config_exports_its_weights_and_settings(tmp_path, capsys):
    from detectron2.config import LazyConfig, instantiate

    overrides = ["model.head.num_stages=1"]
    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(LAZY_QUICK)), overrides)
    torch.manual_seed(3)
    model = well_conditioned(instantiate(cfg.model)).eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("lazy")  # tmp_path/lazy.pth
    sample = _write_sample_image(tmp_path / "sample.png")
    args = ["--config-file", str(LAZY_QUICK), "--sample-image", sample]
    args += ["--output", str(tmp_path / "out")]
    path = sparse_export.main(args + overrides + [f"train.init_checkpoint={tmp_path}/lazy.pth"])
    printed = capsys.readouterr().out
    assert f"Wrote {path}" in printed and "checked at the size" in printed
    assert f"sparse_rcnn.demo --onnx {path} --config-file {LAZY_QUICK}" in printed  # .py too

    session = onnxruntime.InferenceSession(path)
    # The settings of the yaml twin (the same test resize, input format, threshold, classes).
    twin = sparse_export.export_settings(make_cfg(CONFIG_DIR / "sparse_rcnn_quick_cpu.yaml", []))
    meta = session.get_modelmeta().custom_metadata_map
    assert {k: meta[k] for k in twin} == twin
    # The checkpoint's weights, not a fresh random init: equal to the saved model, at a size other
    # than the export size.
    image = random_image(112, 176, seed=5)
    expected = eager(model, image)
    assert len(expected[1]) > 0
    assert_same_detections(expected, session.run(None, {INPUT_NAME: image.numpy()}), 1e-4, 1e-3)


@pytest.mark.parametrize(
    "opts, key",
    [
        (["model.output_all_stages=True"], "model.output_all_stages"),
        (
            ["model.head.box_pooler.pooler_type=ROIAlignRotated"],
            "model.head.box_pooler.pooler_type",
        ),
        (
            ["dataloader.test.mapper.augmentations.0.short_edge_length=[112,128]"],
            "dataloader.test.mapper.augmentations",
        ),
    ],
)
def test_unsupported_lazy_option_fails_at_export_time_naming_it(tmp_path, opts, key):
    args = ["--config-file", str(LAZY_QUICK), "--output", str(tmp_path)] + opts
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        sparse_export.main(args)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "config, backbone",
    [
        ("sparse_rcnn_swin_T_FPN_300pro_crop_3x.py", "SwinTransformer at bottom_up"),
        ("sparse_rcnn_vitdet_B_300pro_crop_3x.py", "ViT at net"),
    ],
)
def test_transformer_backbones_are_refused_before_loading_weights(tmp_path, config, backbone):
    # The ViTDet config's init_checkpoint is a detectron2:// URL: refused before it is read.
    args = ["--config-file", str(CONFIG_DIR / config), "--output", str(tmp_path)]
    with pytest.raises(ValueError, match=rf"model\.backbone \({backbone}\).*export size"):
        sparse_export.main(args)
    assert not os.listdir(tmp_path)


def test_max_difference_lets_tied_scores_come_in_either_order():
    boxes = torch.tensor([[0, 0, 10, 10], [5, 5, 50, 50], [20, 0, 90, 40], [1, 1, 2, 2.0]])
    scores = torch.tensor([0.9, 0.5 + 2e-7, 0.5, 0.1])
    classes = torch.tensor([1, 2, 2, 3])
    expected = (boxes, scores, classes)
    # Runtime 2 orders the two tied class-2 detections the other way, with rounding differences.
    swap = [0, 2, 1, 3]
    actual = (boxes[swap] + 1e-4, scores[swap] + torch.tensor([0, -2e-7, 2e-7, 0]), classes[swap])
    score_diff, box_diff = sparse_export._max_difference(expected, actual)
    assert score_diff < 1e-6 and box_diff == pytest.approx(1e-4, abs=1e-6)
    # Ranks 1 and 2 are not tied: swapped, their boxes differ by the whole box.
    swap = [1, 0, 2, 3]
    actual = (boxes[swap], scores[swap], classes[swap])
    assert sparse_export._max_difference(expected, actual) is None  # classes differ by rank
    actual = (boxes[swap], scores[swap], classes)
    assert sparse_export._max_difference(expected, actual)[1] == 40.0
    # A tie does not excuse another class.
    assert (
        sparse_export._max_difference(expected, (boxes, scores, torch.tensor([1, 2, 3, 3]))) is None
    )


def test_verify_names_a_size_frozen_into_the_graph(tiny):
    """A graph that fails at another size (as a traced Swin does, in ONNX Runtime's Reshape)
    gives an error that says what happened, not only the runtime's node message."""
    size = tuple(tiny.export_image.shape[1:])

    def run_exported(x):
        if tuple(x.shape[1:]) != size:
            raise RuntimeError("Non-zero status code returned while running Reshape node")
        return tiny.run_onnx(x)

    with pytest.raises(RuntimeError, match=r"fails at the size .*Reshape.*frozen into it"):
        sparse_export.verify(tiny.model, run_exported, tiny.export_image)


def test_scripting_is_refused_with_a_message(tmp_path):
    args = ["--config-file", str(TINY_CONFIG), "--output", str(tmp_path)]
    with pytest.raises(SystemExit, match="use tracing"):
        sparse_export.main(args + ["--export-method", "scripting"])


def test_torchscript_file_carries_the_settings(exported):
    files = {sparse_export.SETTINGS_FILE: ""}
    torch.jit.load(exported.ts_path, _extra_files=files)
    assert json.loads(files[sparse_export.SETTINGS_FILE]) == exported.settings


# Detectron2's and torchvision's asserts on traced sizes; the trace is checked at other boxes.
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("pooler_type", ["ROIAlignV2", "ROIAlign"])
@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "list"])
def test_traced_fast_pooler_equals_detectron2_pooler_exactly(pooler_type, prepared):
    """While tracing, FastROIPooler pools each level and gathers the RoIs back into input order
    (no index_put_): the same values, bit for bit, as ROIPooler, for RoIs of every level. The
    trace is run again on maps of another size and other boxes (nothing frozen), for two images,
    with boxes that leave the map; ``prepare`` (as the head calls it) changes nothing."""
    from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
    from detectron2.structures import Boxes

    from sparse_rcnn.poolers import FastROIPooler

    args = dict(output_size=7, scales=(1 / 4, 1 / 8, 1 / 16, 1 / 32), sampling_ratio=2)
    reference_pooler = ROIPooler(pooler_type=pooler_type, **args)
    fast = FastROIPooler(pooler_type=pooler_type, **args)
    g = torch.Generator().manual_seed(0)

    def maps(h, w):
        return [torch.randn(2, 8, h // s, w // s, generator=g) for s in (4, 8, 16, 32)]

    def random_boxes():
        # Sizes from 3 to 500 px: canonical level 4 at 224 px spreads them over all four levels;
        # corners from -40 px: some boxes leave the map (samples beyond -1 count 0).
        sizes = torch.tensor([8.0, 30, 60, 120, 250, 500, 16, 100, 224, 448, 3, 40])
        xy = torch.rand(12, 2, generator=g) * 200 - 40
        return torch.cat([xy, xy + sizes[:, None]], dim=1)

    def pool(b0, b1, *features):
        x = fast.prepare(list(features)) if prepared else list(features)
        return fast(x, [Boxes(b0), Boxes(b1)])

    features, boxes = maps(256, 320), random_boxes()
    traced = torch.jit.trace(pool, (boxes[:7], boxes[7:], *features), check_trace=False)
    for features, boxes in ((features, boxes), (maps(192, 416), random_boxes().flip(0))):
        box_lists = [Boxes(boxes[:7]), Boxes(boxes[7:])]
        assert set(assign_boxes_to_levels(box_lists, 2, 5, 224, 4).tolist()) == {0, 1, 2, 3}
        reference = reference_pooler(features, box_lists)
        assert torch.equal(traced(boxes[:7], boxes[7:], *features), reference)


def test_exported_graph_keeps_detections_per_image(tmp_path):
    """TEST.DETECTIONS_PER_IMAGE is a constant of the graph (the size of its cut): the exported
    model returns the first 5 of the default model's detections, at a size other than the export
    size, in ONNX Runtime and TorchScript, with NMS."""
    opts = ["MODEL.SPARSE_RCNN.NUM_STAGES", "1", "MODEL.SPARSE_RCNN.NMS_ENABLED", "True"]
    # Random proposal boxes (the "image" init gives 20 equal boxes) and an NMS that removes some.
    opts += [
        "MODEL.SPARSE_RCNN.PROPOSAL_BOX_INIT",
        "random",
        "MODEL.SPARSE_RCNN.NMS_THRESH_TEST",
        "0.2",
    ]
    models = {}
    for count in (0, 5):
        cfg = make_cfg(TINY_CONFIG, opts + ["TEST.DETECTIONS_PER_IMAGE", str(count)])
        torch.manual_seed(0)
        models[count] = well_conditioned(build_model(cfg)).eval()
    image, other = random_image(96, 128, seed=1), random_image(112, 144, seed=2)
    full, expected = eager(models[0], other), eager(models[5], other)
    assert 5 < len(full[1]) < 20 and len(expected[1]) == 5  # NMS removed some of the 20
    for got, want in zip(expected, full):
        assert torch.equal(got, want[:5])
    sparse_export.export_onnx(models[5], image, str(tmp_path / "m.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    assert_same_detections(expected, session.run(None, {INPUT_NAME: other.numpy()}), 1e-4, 1e-3)
    traced = sparse_export.export_torchscript(models[5], image, str(tmp_path / "m.ts"))
    with torch.no_grad():
        assert_same_detections(expected, traced(other), 1e-5, 1e-5 * 256)


# ---------------------------------------------------------------------------------------------
# verify() on untrained and trained models
# ---------------------------------------------------------------------------------------------
def test_match_by_score_and_box_pairs_reordered_detections_and_the_cut():
    boxes = torch.tensor([[0, 0, 10, 10], [5, 5, 50, 50], [20, 0, 90, 40], [1, 1, 9, 9.0]])
    boxes = torch.cat([boxes, torch.tensor([[30, 30, 60, 70.0]])])
    scores = torch.tensor([0.9, 0.0102, 0.0101, 0.0100, 0.0099])
    classes = torch.tensor([0, 1, 2, 1, 0])
    expected = (boxes, scores, classes)
    # Another runtime: scores off by 5e-5 (more than _max_difference's 1e-5 ties), so ranks 1-3
    # come in another order; at the top-k cut, 0.0099 fell out and another candidate came in.
    order = [0, 3, 1, 2]
    actual = (
        torch.cat([boxes[order] + 1e-4, torch.tensor([[70, 0, 80, 9.0]])]),
        torch.tensor([0.9, 0.0102 - 5e-5 + 2e-4, 0.0102 - 5e-5, 0.0101 - 5e-5, 0.00985]),
        torch.cat([classes[order], torch.tensor([2])]),
    )
    assert sparse_export._max_difference(expected, actual) is None  # the strict check fails
    score_diff, box_diff, unpaired = sparse_export._match_by_score_and_box(
        expected, actual, 1e-3, 0.1
    )
    # 0.0100 (rank 3, class 1) pairs with 0.0102 - 5e-5 + 2e-4 (class 1, its box), not with the
    # class-1 detection of the closer score but another box.
    assert score_diff == pytest.approx(3.5e-4, abs=1e-7) and box_diff == pytest.approx(
        1e-4, abs=1e-6
    )
    assert unpaired == 2  # 0.0099 and 0.00985, each within 1e-3 of the other run's cut
    # A frozen size: boxes off by pixels, a class that changes, a detection missing above the cut.
    moved = (actual[0] + torch.tensor([0, 0, 1.0, 0]), actual[1], actual[2])
    assert sparse_export._match_by_score_and_box(expected, moved, 1e-3, 0.1) is None
    other_class = (actual[0], actual[1], torch.tensor([1, 1, 1, 2, 2]))
    assert sparse_export._match_by_score_and_box(expected, other_class, 1e-3, 0.1) is None
    missing_top = tuple(t[1:] for t in actual)
    assert sparse_export._match_by_score_and_box(expected, missing_top, 1e-3, 0.1) is None
    # Nothing left in the other run: only detections within 1e-3 of the threshold may be missing.
    empty = (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    low = tuple(t[3:] for t in expected)
    assert sparse_export._match_by_score_and_box(low, empty, 1e-3, 0.1, 0.0095)[2] == 2
    assert sparse_export._match_by_score_and_box(low, empty, 1e-3, 0.1, 0.005) is None


def _with_rounding_noise(outputs, seed):
    """What another runtime gives for a model with near-equal scores: scores off by up to 5e-5
    (as measured for an untrained R-50), boxes by 1e-4 px, re-sorted; the last detection swapped
    for a candidate 1e-5 below it (the top-k cut)."""
    boxes, scores, classes = (torch.as_tensor(np.asarray(t)).clone() for t in outputs)
    g = torch.Generator().manual_seed(seed)
    scores = scores + (torch.rand(len(scores), generator=g) - 0.5) * 1e-4
    boxes = boxes + 1e-4
    boxes[-1], scores[-1], classes[-1] = boxes[0] + 7, scores[-1] - 1e-5, (classes[-1] + 1) % 3
    order = scores.argsort(descending=True)
    return boxes[order], scores[order], classes[order]


def _trained_looking(model):
    """Per-class biases, as training leaves them (an untrained model's are all the prior)."""
    with torch.no_grad():
        for stage in model.head.head_series:
            stage.class_logits.bias.add_(torch.tensor([0.3, -0.2, 0.1]))
    return model


def test_verify_keeps_the_rank_by_rank_check_for_a_trained_model():
    model = _trained_looking(build_tiny_model(["MODEL.SPARSE_RCNN.NUM_STAGES", 1]).eval())
    assert not sparse_export._untrained(model)
    image = random_image(*EXPORT_SIZE, seed=1)
    calls = []

    def export_copy(copy, folder):
        calls.append(copy)
        return lambda x: eager(copy, x)

    # The same detections, in the same order, within rounding: passes.
    checked = sparse_export.verify(model, lambda x: eager(model, x), image, export_copy)
    assert set(checked) == {"export size", "size (96, 200)"} and not calls
    # Two neighbours of another class swapped, scores 5e-5 apart as the rounding of an untrained
    # model would swap them: a trained model's detections must agree rank by rank.
    expected = eager(model, image)
    gaps = (expected[1][:-1] - expected[1][1:]).tolist()
    i = next(
        i for i, g in enumerate(gaps) if 1e-5 < g < 1e-3 and expected[2][i] != expected[2][i + 1]
    )
    swap = list(range(len(gaps) + 1))
    swap[i], swap[i + 1] = i + 1, i

    def swapped(x):
        boxes, scores, classes = eager(model, x)
        return boxes[swap], scores, classes[swap]

    with pytest.raises(RuntimeError, match="does not reproduce eager inference at the export"):
        sparse_export.verify(model, swapped, image, export_copy)
    assert not calls  # a trained model is never checked on a copy


def test_verify_tells_rounding_from_a_frozen_size_on_an_untrained_model():
    model = build_tiny_model(["MODEL.SPARSE_RCNN.NUM_STAGES", 1]).eval()
    assert sparse_export._untrained(model)
    image = random_image(*EXPORT_SIZE, seed=1)
    # The untrained graph itself: boxes off by pixels (rounding amplified by random deltas).
    blown_up = lambda x: (eager(model, x)[0] + 5, *eager(model, x)[1:])  # noqa: E731
    with pytest.raises(RuntimeError, match="does not reproduce"):
        sparse_export.verify(model, blown_up, image)  # without a copy: the strict check
    copies = []

    def rounding_only(copy, folder):
        copies.append(copy)
        return lambda x: _with_rounding_noise(eager(copy, x), seed=x.shape[1])

    checked = sparse_export.verify(model, blown_up, image, rounding_only)
    assert set(checked) == {"export size (damped copy)", "size (96, 200) (damped copy)"}
    assert all(score <= 1e-4 and box <= 2e-4 for score, box in checked.values())
    # The copy: box deltas damped by 0.1, nothing else; the model itself unchanged.
    (copy,) = copies
    stage, damped = model.head.head_series[0], copy.head.head_series[0]
    assert torch.equal(damped.bboxes_delta.weight, stage.bboxes_delta.weight * 0.1)
    assert torch.equal(damped.class_logits.weight, stage.class_logits.weight)
    fresh = build_tiny_model(["MODEL.SPARSE_RCNN.NUM_STAGES", 1]).eval()
    assert sparse_export._max_difference(eager(model, image), eager(fresh, image)) == (0.0, 0.0)
    # The simulated rounding reorders the copy's detections: rank by rank they differ.
    noisy = _with_rounding_noise(eager(copy, image), seed=EXPORT_SIZE[0])
    assert sparse_export._max_difference(eager(copy, image), noisy) is None

    # A size frozen into the graph: at the other size, the copy's boxes come out scaled.
    def frozen(copy, folder):
        def run(x):
            boxes, scores, classes = _with_rounding_noise(eager(copy, x), seed=0)
            scale = 1.0 if tuple(x.shape[1:]) == EXPORT_SIZE else 1.25
            return boxes * scale, scores, classes

        return run

    with pytest.raises(RuntimeError, match=r"at the size \(96, 200\) either.*frozen"):
        sparse_export.verify(model, blown_up, image, frozen)


def test_export_command_checks_an_untrained_model_on_a_damped_copy(tmp_path, monkeypatch, capsys):
    """The command on random weights saved by DetectionCheckpointer. The untrained graph's boxes
    are made to come out pixels off (as a random R-50's do in ONNX Runtime: rounding amplified by
    random box deltas); the damped copy is exported and checked for real."""
    real_runner = sparse_export._exported_runner
    paths = []

    def amplified(fmt, model, image, path, settings):
        run = real_runner(fmt, model, image, path, settings)
        paths.append(path)
        if len(paths) > 1:  # the damped copy's graph
            return run
        return lambda x: (run(x)[0] + 5.0, *run(x)[1:])

    monkeypatch.setattr(sparse_export, "_exported_runner", amplified)
    opts = ["MODEL.SPARSE_RCNN.NUM_STAGES", "1"]
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(make_cfg(TINY_CONFIG, opts)), str(tmp_path)).save("random")
    out = tmp_path / "out"
    args = ["--config-file", str(TINY_CONFIG), "--format", "torchscript", "--output", str(out)]
    args += ["--sample-image", _write_sample_image(tmp_path / "sample.png")]
    path = sparse_export.main(args + opts + ["MODEL.WEIGHTS", str(tmp_path / "random.pth")])
    printed = capsys.readouterr().out
    assert "checked a copy with damped box deltas at the export size" in printed
    assert re.search(r"checked a copy with damped box deltas at the size \(\d+, \d+\)", printed)
    assert "no size is frozen into it" in printed and f"Wrote {path}" in printed
    # The copy went to a temporary folder: the output holds the model's file only.
    assert (
        paths[0] == path and not paths[1].startswith(str(out)) and os.listdir(out) == ["model.ts"]
    )
