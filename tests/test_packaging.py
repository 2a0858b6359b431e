"""A non-editable install (``pip install --target``) works from outside the repository: the configs
ship inside the package and the model zoo finds them there, a model builds from a packaged
LazyConfig and yaml config, and the built-in dataset path generates, loads, maps and trains on a
small split in ``$SPARSE_RCNN_DATASETS``, writing nothing into the installed package."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

CHECK = r"""
import json, sys
from pathlib import Path

import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog

site = Path(sys.argv[1]).resolve()
before = sorted(str(p) for p in site.rglob("*") if "__pycache__" not in p.parts)

import sparse_rcnn
from sparse_rcnn import model_zoo, register_synthetic_shapes

torch.set_num_threads(1)
report = {"package": str(Path(sparse_rcnn.__file__).resolve().parent)}
report["config"] = model_zoo.get_config_file("sparse_rcnn_quick_cpu.py")
report["configs"] = model_zoo.list_configs()

cfg = model_zoo.get_config("sparse_rcnn_quick_cpu.py")
torch.manual_seed(0)
model = instantiate(cfg.model)
yaml_model = model_zoo.get("sparse_rcnn_quick_cpu.yaml", device="cpu")
report["same_keys"] = list(model.state_dict()) == list(yaml_model.state_dict())

register_synthetic_shapes(splits={"train": 4}, image_size=64, prefix="pkg")
records = DatasetCatalog.get("pkg_train")
report["records"] = len(records)
report["files"] = [r["file_name"] for r in records]
mapper = instantiate(cfg.dataloader.train.mapper)
batch = [mapper(dict(r)) for r in records[:2]]
report["image_shapes"] = [list(b["image"].shape) for b in batch]
report["mapped_files"] = [r["file_name"] for r in records[:2]]
losses = model(batch)
report["finite_loss"] = bool(torch.isfinite(sum(losses.values())))

after = sorted(str(p) for p in site.rglob("*") if "__pycache__" not in p.parts)
report["new_files_in_site"] = sorted(set(after) - set(before))
print("REPORT " + json.dumps(report))
"""


def test_non_editable_install_works_outside_the_repository(tmp_path):
    # Build from a clean copy of the sources, so no build/ folder of the checkout is reused.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(
        REPO_ROOT / "projects" / "sparse_rcnn", src / "projects" / "sparse_rcnn", ignore=ignore
    )
    shutil.copytree(REPO_ROOT / "configs", src / "configs", ignore=ignore)
    shutil.copy(REPO_ROOT / "setup.py", src / "setup.py")
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "--no-compile", "--target", str(site), str(src)], check=True, cwd=tmp_path
    )
    assert not (site / "sparse_rcnn" / "configs" / "__init__.py").exists()

    work = tmp_path / "elsewhere"
    work.mkdir()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), SPARSE_RCNN_DATASETS=str(data), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(site)],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("REPORT "))
    report = json.loads(line[len("REPORT ") :])

    package = site / "sparse_rcnn"
    assert Path(report["package"]) == package.resolve()
    assert Path(report["config"]) == (package / "configs" / "sparse_rcnn_quick_cpu.py").resolve()
    shipped = sorted(
        p.name for p in (REPO_ROOT / "configs").iterdir() if p.suffix in (".py", ".yaml")
    )
    assert report["configs"] == shipped
    assert report["same_keys"] and report["finite_loss"]
    assert report["records"] == 4
    data_root = data.resolve()
    assert all(Path(f).resolve().is_relative_to(data_root) for f in report["files"])
    assert all(Path(f).is_file() for f in report["mapped_files"])  # read by the mapper
    assert all(shape[0] == 3 and min(shape[1:]) >= 112 for shape in report["image_shapes"])
    assert report["new_files_in_site"] == []
