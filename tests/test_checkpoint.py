"""Official checkpoints: key names, shapes, parameter counts, loading and equivalence of names."""

import ast
import copy
import logging
import math
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import CONFIG_DIR, DATA_DIR, build_tiny_model, make_cfg, perturbed_tiny
from sparse_rcnn.detector import OFFICIAL_KEY_RENAMES

KEYS_DIR = DATA_DIR / "official_keys"
OFFICIAL = {
    "official_state_dict.sparsercnn.res50.100pro.3x.tsv": "sparse_rcnn_R_50_FPN_100pro_3x.yaml",
    "official_state_dict.sparsercnn.res50.300pro.3x.tsv": "sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml",
    "official_state_dict.sparsercnn.res101.300pro.3x.tsv": "sparse_rcnn_R_101_FPN_300pro_crop_3x.yaml",
}
# Detectron2's FrozenBatchNorm2d keeps weight, bias and running statistics as buffers.
FROZEN_BN_KEY = re.compile(
    r"^backbone\.bottom_up\..*\.norm\.(weight|bias|running_mean|running_var)$"
)


def read_tsv(path):
    lines = path.read_text().splitlines()
    header_count = int(re.search(r"(\d+) parameters in all", lines[0]).group(1))
    assert lines[1].split("\t") == ["key", "shape", "dtype"]
    entries = {}
    for line in lines[2:]:
        key, shape, dtype = line.split("\t")
        assert key not in entries
        entries[key] = (tuple(ast.literal_eval(shape)), dtype)
    return header_count, entries


def ours_to_official(key):
    for official, ours in OFFICIAL_KEY_RENAMES.items():
        if key.startswith(ours):
            return official + key[len(ours) :]
    return key


def official_state_dict(model):
    return {ours_to_official(k): v for k, v in model.state_dict().items()}


def load_and_capture(model, path):
    """DetectionCheckpointer(model).load(path), returning the incompatible-keys record."""
    checkpointer = DetectionCheckpointer(model)
    captured = {}
    original = checkpointer._load_model

    def spy(checkpoint):
        captured["incompatible"] = original(checkpoint)
        return captured["incompatible"]

    checkpointer._load_model = spy
    checkpointer.load(str(path))
    return captured["incompatible"]


def test_tsv_files_present():
    assert set(OFFICIAL) <= {p.name for p in KEYS_DIR.glob("*.tsv")}


@pytest.fixture(scope="module", params=sorted(OFFICIAL), ids=lambda n: n.split("sparsercnn.")[1])
def official_case(request):
    """The official list and the config's model on the meta device: names, shapes, dtypes and
    counts without allocating (or initialising) its 100M+ parameters."""
    header_count, entries = read_tsv(KEYS_DIR / request.param)
    cfg = make_cfg(CONFIG_DIR / OFFICIAL[request.param], ["MODEL.WEIGHTS", ""])
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    return header_count, entries, model.eval()


def test_state_dict_names_and_shapes_match_official(official_case):
    _, entries, model = official_case
    sd = official_state_dict(model)
    assert set(sd) == set(
        entries
    ), f"missing {sorted(set(entries) - set(sd))[:5]}, extra {sorted(set(sd) - set(entries))[:5]}"
    for key, (shape, dtype) in entries.items():
        assert tuple(sd[key].shape) == shape, key
        assert str(sd[key].dtype) == f"torch.{dtype}", key


def test_parameter_count_matches_official(official_case):
    header_count, entries, model = official_case
    total = sum(math.prod(shape) for shape, _ in entries.values())
    frozen_bn = sum(math.prod(shape) for k, (shape, _) in entries.items() if FROZEN_BN_KEY.match(k))
    assert frozen_bn > 0
    # The header counts parameters (model.parameters(), frozen ones included): every listed tensor
    # except the FrozenBN buffers.
    assert total - frozen_bn == header_count
    assert sum(p.numel() for p in model.parameters()) == header_count
    # Our buffers in the state dict are exactly the FrozenBN tensors of the list.
    state = model.state_dict()
    buffers = {k for k, _ in model.named_buffers() if k in state}
    assert buffers == {k for k in entries if FROZEN_BN_KEY.match(k)}
    assert sum(t.numel() for t in state.values()) == total


def test_official_checkpoint_loads_cleanly(official_case):
    """DetectionCheckpointer loads a state dict with every official name and shape into the
    model: nothing missing, unexpected or of another shape, every tensor where it belongs. The
    model is allocated without initialisation (``to_empty``) and zeroed; the checkpoint holds
    tensor i filled with i + 1 (a broadcast scalar: no second copy of the weights), so that a
    tensor loaded under another name shows. Reading the file is torch.load's: the tiny-model tests
    below load from files."""
    _, entries, meta_model = official_case
    model = copy.deepcopy(meta_model).to_empty(device="cpu")
    names = list(official_state_dict(model))
    assert set(names) == set(entries)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    saved = {
        name: torch.tensor(i + 1.0, dtype=tensor.dtype).expand(tensor.shape)
        for i, (name, tensor) in enumerate(official_state_dict(model).items())
    }
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model({"model": saved})
    assert list(incompatible.missing_keys) == []
    assert list(incompatible.unexpected_keys) == []
    assert list(incompatible.incorrect_shapes) == []
    loaded = official_state_dict(model)
    assert list(loaded) == names
    for i, name in enumerate(names):
        assert bool((loaded[name] == i + 1).all()), name


# ---------------------------------------------------------------------------------------------
# Tiny model: equivalence of official and own names; wrong number of proposals
# ---------------------------------------------------------------------------------------------
def _image(h=64, w=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)


def _infer(model, image):
    model.eval()
    with torch.no_grad():
        return model([{"image": image, "height": 128, "width": 192}])[0]["instances"]


def test_official_and_own_names_give_identical_outputs(tmp_path):
    source = perturbed_tiny()
    own, official = tmp_path / "own.pth", tmp_path / "official.pth"
    torch.save({"model": source.state_dict()}, own)
    official_sd = official_state_dict(source)
    assert "init_proposal_boxes.weight" in official_sd
    assert not any(k.startswith("proposal_generator.") for k in official_sd)
    torch.save({"model": official_sd}, official)

    image = _image()
    expected = _infer(source, image)
    fresh = build_tiny_model(seed=1)
    assert not torch.equal(
        fresh.proposal_generator.init_proposal_boxes.weight,
        source.proposal_generator.init_proposal_boxes.weight,
    )

    results = []
    for path, seed in ((official, 1), (own, 2)):
        model = build_tiny_model(seed=seed)
        incompatible = load_and_capture(model, path)
        assert not incompatible.missing_keys and not incompatible.unexpected_keys
        assert not incompatible.incorrect_shapes
        results.append(_infer(model, image))
    a, b = results
    assert len(a) == len(b) == len(expected) > 0
    for field in ("scores", "pred_classes"):
        assert torch.equal(getattr(a, field), getattr(b, field))
        assert torch.equal(getattr(a, field), getattr(expected, field))
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.pred_boxes.tensor, expected.pred_boxes.tensor)


@pytest.mark.parametrize("names", ["official", "own"])
def test_wrong_number_of_proposals_is_skipped_not_fatal(names, tmp_path, caplog):
    source = build_tiny_model(opts=["MODEL.SPARSE_RCNN.NUM_PROPOSALS", 30], seed=3)
    sd = official_state_dict(source) if names == "official" else source.state_dict()
    path = tmp_path / "wrong.pth"
    torch.save({"model": sd}, path)

    model = build_tiny_model(seed=4)  # 20 proposals
    before_boxes = model.proposal_generator.init_proposal_boxes.weight.detach().clone()
    before_features = model.proposal_generator.init_proposal_features.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        incompatible = load_and_capture(model, path)  # must not raise

    skipped = {
        "proposal_generator.init_proposal_boxes.weight",
        "proposal_generator.init_proposal_features.weight",
    }
    reported = set(incompatible.missing_keys) | {k for k, *_ in incompatible.incorrect_shapes}
    assert skipped <= reported
    assert not incompatible.unexpected_keys
    # A warning names the skipped parameter.
    assert "init_proposal_boxes.weight" in caplog.text
    # The skipped parameters keep their values; everything else is loaded.
    assert torch.equal(model.proposal_generator.init_proposal_boxes.weight, before_boxes)
    assert torch.equal(model.proposal_generator.init_proposal_features.weight, before_features)
    source_sd = source.state_dict()
    for key, value in model.state_dict().items():
        if key not in skipped:
            assert torch.equal(value, source_sd[key]), key
