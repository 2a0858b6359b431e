"""sparse_rcnn.model_zoo: the packaged configs by name, as detectron2.model_zoo; every .py config
carries the train keys of Detectron2's LazyConfig common/train.py."""

from pathlib import Path

import detectron2
import pytest
import torch
from detectron2.config import CfgNode, LazyConfig

from conftest import CONFIG_DIR
from sparse_rcnn import model_zoo

# Read as a file: importing detectron2.model_zoo needs pkg_resources, which recent setuptools lack.
DETECTRON2_TRAIN = Path(detectron2.__file__).parent / "model_zoo/configs/common/train.py"


def test_every_config_of_the_repository_is_listed_and_found():
    on_disk = sorted(p.name for p in CONFIG_DIR.iterdir() if p.suffix in (".py", ".yaml"))
    assert model_zoo.list_configs() == on_disk
    for name in on_disk:
        assert Path(model_zoo.get_config_file(name)) == (CONFIG_DIR / name).resolve()


@pytest.mark.parametrize("name", ["no_such_config.py", "../setup.py", "common/optim.py.bak"])
def test_unknown_or_outside_names_fail_with_the_available_names(name):
    with pytest.raises(RuntimeError, match="is not a packaged config; available: .*quick_cpu"):
        model_zoo.get_config_file(name)


def test_get_config_returns_a_yacs_or_a_lazy_config():
    yaml_cfg = model_zoo.get_config("sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml")
    assert isinstance(yaml_cfg, CfgNode) and yaml_cfg.MODEL.SPARSE_RCNN.NUM_PROPOSALS == 300
    lazy_cfg = model_zoo.get_config("sparse_rcnn_R_50_FPN_300pro_crop_3x.py")
    assert lazy_cfg.model.proposal_generator.num_proposals == 300


def test_get_builds_the_model_and_loads_weights(tmp_path):
    torch.manual_seed(0)
    model = model_zoo.get("sparse_rcnn_quick_cpu.py", device="cpu")
    path = tmp_path / "w.pth"
    torch.save({"model": model.state_dict()}, path)
    torch.manual_seed(1)
    loaded = model_zoo.get("sparse_rcnn_quick_cpu.yaml", weights=str(path), device="cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.skipif(not DETECTRON2_TRAIN.is_file(), reason="this Detectron2 build has no configs/")
@pytest.mark.parametrize("name", [n for n in model_zoo.list_configs() if n.endswith(".py")])
def test_lazy_configs_have_detectron2s_train_keys(name):
    cfg = model_zoo.get_config(name)
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg)
    reference = LazyConfig.load(str(DETECTRON2_TRAIN)).train

    def keys(node, prefix=""):
        out = set()
        for k, v in node.items():
            out |= keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
        return out

    assert keys(reference) <= keys(cfg.train)
