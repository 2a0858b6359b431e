"""Every config file loads and builds; paper defaults; unknown keys and a missing config node fail."""

import gc
import re

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from conftest import CONFIG_DIR, make_cfg
from sparse_rcnn import SparseRCNN, add_sparse_rcnn_config

CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))


def test_config_dir_is_not_empty():
    names = {f.name for f in CONFIG_FILES}
    assert {
        "Base-SparseRCNN.yaml",
        "sparse_rcnn_R_50_FPN_100pro_3x.yaml",
        "sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml",
        "sparse_rcnn_R_101_FPN_300pro_crop_3x.yaml",
        "sparse_rcnn_tiny_cpu.yaml",
    } <= names


@pytest.mark.parametrize("config_file", CONFIG_FILES, ids=lambda p: p.name)
def test_config_loads_and_builds(config_file):
    cfg = make_cfg(config_file, ["MODEL.WEIGHTS", ""])
    assert cfg.MODEL.META_ARCHITECTURE == "SparseRCNN"
    torch.manual_seed(0)
    model = build_model(cfg)
    try:
        assert isinstance(model, SparseRCNN)
        assert model.device == torch.device("cpu")
        c = cfg.MODEL.SPARSE_RCNN
        assert model.num_classes == c.NUM_CLASSES
        assert model.head.num_stages == c.NUM_STAGES == len(model.head.head_series)
        # QueryInst configs (MODEL.MASK_ON): one mask head per stage; the others have none.
        assert (
            (model.mask_head is not None)
            == cfg.MODEL.MASK_ON
            == ("queryinst" in config_file.name.lower())
        )
        if cfg.MODEL.MASK_ON:
            assert len(model.mask_head.head_series) == c.NUM_STAGES
        if hasattr(model.proposal_generator, "num_proposals"):
            assert model.proposal_generator.num_proposals == c.NUM_PROPOSALS
        # The file name states the backbone depth and the number of proposals.
        depth = re.search(r"_R_(\d+)_", config_file.name)
        if depth:
            assert cfg.MODEL.RESNETS.DEPTH == int(depth.group(1))
            num_blocks = {50: 6, 101: 23}[int(depth.group(1))]
            assert len(model.backbone.bottom_up.res4) == num_blocks
        pro = re.search(r"_(\d+)pro", config_file.name)
        if pro:
            assert c.NUM_PROPOSALS == int(pro.group(1))
            assert cfg.INPUT.CROP.ENABLED == ("crop" in config_file.name)
    finally:
        del model
        gc.collect()


def test_paper_defaults_in_add_sparse_rcnn_config():
    cfg = get_cfg()
    add_sparse_rcnn_config(cfg)
    c = cfg.MODEL.SPARSE_RCNN
    assert c.HIDDEN_DIM == 256
    assert c.NHEADS == 8
    assert c.DROPOUT == 0.0
    assert c.DIM_FEEDFORWARD == 2048
    assert c.NUM_CLS == 1
    assert c.NUM_REG == 3
    assert c.NUM_STAGES == 6
    assert c.DIM_DYNAMIC == 64
    assert c.NUM_DYNAMIC == 2
    assert (c.CLASS_WEIGHT, c.L1_WEIGHT, c.GIOU_WEIGHT) == (2.0, 5.0, 2.0)
    assert c.ALPHA == 0.25
    assert c.GAMMA == 2.0
    assert c.PRIOR_PROB == 0.01
    assert c.DEEP_SUPERVISION is True
    assert c.PROPOSAL_BOX_INIT == "image"
    assert c.NUM_PROPOSALS == 100
    assert c.NUM_CLASSES == 80
    assert tuple(c.BBOX_REG_WEIGHTS) == (2.0, 2.0, 1.0, 1.0)
    assert c.ACTIVATION == "relu"
    assert c.NMS_ENABLED is False
    # QueryInst's mask head (used with MODEL.MASK_ON, which Detectron2 defaults to False).
    assert cfg.MODEL.MASK_ON is False
    assert (c.MASK_POOLER_RESOLUTION, c.MASK_POOLER_SAMPLING_RATIO) == (14, 2)
    assert (c.MASK_NUM_CONV, c.MASK_CONV_DIM, c.MASK_NORM) == (4, 256, "BN")
    assert c.MASK_WEIGHT == 8.0
    assert cfg.SOLVER.OPTIMIZER == "ADAMW"
    assert cfg.SOLVER.BACKBONE_MULTIPLIER == 1.0


def test_base_config_solver_and_input():
    cfg = make_cfg(CONFIG_DIR / "Base-SparseRCNN.yaml")
    s = cfg.SOLVER
    assert s.OPTIMIZER == "ADAMW"
    assert s.BASE_LR == pytest.approx(2.5e-5)
    assert s.WEIGHT_DECAY == pytest.approx(1e-4)
    assert s.IMS_PER_BATCH == 16
    assert s.MAX_ITER == 270000
    assert tuple(s.STEPS) == (210000, 250000)
    assert s.CLIP_GRADIENTS.ENABLED is True
    assert s.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert s.CLIP_GRADIENTS.CLIP_VALUE == 1.0
    assert s.BACKBONE_MULTIPLIER == 1.0
    i = cfg.INPUT
    assert tuple(i.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32))
    assert i.MAX_SIZE_TRAIN == 1333
    assert i.MIN_SIZE_TEST == 800 and i.MAX_SIZE_TEST == 1333
    assert i.FORMAT == "RGB"
    assert i.CROP.ENABLED is False
    m = cfg.MODEL
    assert list(m.PIXEL_MEAN) == pytest.approx([123.675, 116.28, 103.53])
    assert list(m.PIXEL_STD) == pytest.approx([58.395, 57.12, 57.375])
    assert m.RESNETS.STRIDE_IN_1X1 is False
    assert list(m.ROI_HEADS.IN_FEATURES) == ["p2", "p3", "p4", "p5"]
    assert m.ROI_BOX_HEAD.POOLER_RESOLUTION == 7
    assert m.ROI_BOX_HEAD.POOLER_TYPE == "ROIAlignV2"
    assert m.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO == 2
    assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS is False


@pytest.mark.parametrize(
    "config_file", [f for f in CONFIG_FILES if "300pro_crop" in f.name], ids=lambda p: p.name
)
def test_300pro_crop_configs(config_file):
    cfg = make_cfg(config_file)
    assert cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS == 300
    assert cfg.INPUT.CROP.ENABLED is True
    assert cfg.INPUT.CROP.TYPE == "absolute_range"
    assert tuple(cfg.INPUT.CROP.SIZE) == (384, 600)
    assert tuple(cfg.INPUT.CROP.RESIZE_SIZES) == (400, 500, 600)  # official, before the crop


@pytest.mark.parametrize(
    "config_file", [f for f in CONFIG_FILES if "100pro" in f.name], ids=lambda p: p.name
)
def test_100pro_configs(config_file):
    cfg = make_cfg(config_file)
    assert cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS == 100
    assert cfg.INPUT.CROP.ENABLED is False


def test_unknown_key_raises_key_error_naming_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        f'_BASE_: "{CONFIG_DIR / "Base-SparseRCNN.yaml"}"\n'
        "MODEL:\n  SPARSE_RCNN:\n    NOT_A_KEY: 3\n"
    )
    cfg = get_cfg()
    add_sparse_rcnn_config(cfg)
    with pytest.raises(KeyError, match="NOT_A_KEY"):
        cfg.merge_from_file(str(path))


def test_without_add_sparse_rcnn_config():
    # Merging one of our files fails on our node...
    cfg = get_cfg()
    with pytest.raises(KeyError, match="SPARSE_RCNN"):
        cfg.merge_from_file(str(CONFIG_DIR / "sparse_rcnn_tiny_cpu.yaml"))
    # ...and building SparseRCNN from a config without it says what to do.
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SparseRCNN"
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(KeyError, match="add_sparse_rcnn_config"):
        build_model(cfg)


QUERYINST_FILES = [
    f for f in CONFIG_FILES if f.name.startswith("queryinst_R_") or f.name == "Base-QueryInst.yaml"
]


@pytest.mark.parametrize("config_file", QUERYINST_FILES, ids=lambda p: p.name)
def test_queryinst_configs(config_file):
    """QueryInst's mask head and data, the authors' optimizer, mmdetection's epochs (7330
    iterations of 16 images each), single-scale 1x and multi-scale 3x."""
    from sparse_rcnn import SparseRCNNDatasetMapper

    cfg = make_cfg(config_file)
    assert cfg.MODEL.MASK_ON is True and cfg.INPUT.MASK_FORMAT == "polygon"
    mapper = SparseRCNNDatasetMapper(cfg, is_train=True)
    assert mapper.use_instance_mask and mapper.instance_mask_format == "polygon"
    assert mapper.recompute_boxes == cfg.INPUT.CROP.ENABLED
    s = cfg.SOLVER
    assert s.BASE_LR == pytest.approx(2.5e-5) and s.BACKBONE_MULTIPLIER == 1.0
    assert s.CLIP_GRADIENTS.CLIP_VALUE == 1.0 and s.WEIGHT_DECAY == pytest.approx(1e-4)
    assert s.WARMUP_FACTOR == pytest.approx(0.001) and s.WARMUP_ITERS == 1000
    epochs = {"1x": (12, (8, 11)), "3x": (36, (27, 33))}
    for schedule, (total, steps) in epochs.items():
        if config_file.name.endswith(f"_{schedule}.yaml"):
            assert s.MAX_ITER == 7330 * total
            assert tuple(s.STEPS) == tuple(7330 * e for e in steps)
    multi_scale = tuple(range(480, 801, 32))
    single = config_file.name.endswith("_1x.yaml")
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == ((800,) if single else multi_scale)


def test_dynamic_queryinst_is_dynamic_sparse_rcnn_with_masks():
    dynamic = make_cfg(CONFIG_DIR / "dynamic_sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml")
    masks = make_cfg(CONFIG_DIR / "dynamic_queryinst_R_50_FPN_300pro_crop_3x.yaml")
    assert masks.MODEL.MASK_ON and not dynamic.MODEL.MASK_ON
    masks.MODEL.MASK_ON = False
    assert masks.dump() == dynamic.dump()


def test_quick_queryinst_is_the_quick_model_with_masks():
    quick = make_cfg(CONFIG_DIR / "sparse_rcnn_quick_cpu.yaml")
    masks = make_cfg(CONFIG_DIR / "queryinst_quick_cpu.yaml")
    assert masks.MODEL.MASK_ON and masks.INPUT.MASK_FORMAT == "bitmask"  # the built-in RLE masks
    # Everything else is the quick model's.
    masks.MODEL.MASK_ON, masks.INPUT.MASK_FORMAT, masks.OUTPUT_DIR = (
        False,
        "polygon",
        quick.OUTPUT_DIR,
    )
    masks.MODEL.SPARSE_RCNN.MASK_NUM_CONV, masks.MODEL.SPARSE_RCNN.MASK_CONV_DIM = 4, 256
    assert masks.dump() == quick.dump()
