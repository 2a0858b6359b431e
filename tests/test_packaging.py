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


def test_detectron2_installer_copies_the_python_package_without_its_compiled_extension(tmp_path):
    """tools/install_detectron2.py (the current stack's Detectron2, and what a GPU run carries):
    every file of the wheel's ``detectron2/`` lands under the target, the compiled ``_C`` and
    the wheel's metadata do not, and a second run over the same target is harmless."""
    import zipfile

    wheel = tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl"
    members = {
        "detectron2/__init__.py": "__version__ = '0.7.2'\n",
        "detectron2/layers/__init__.py": "from .wrappers import cat\n",
        "detectron2/layers/wrappers.py": "def cat(x):\n    return x\n",
        "detectron2/model_zoo/configs/Base-RCNN-FPN.yaml": "MODEL: {}\n",
        "detectron2/_C.cpython-310-x86_64-linux-gnu.so": "\x7fELF",
        "sal_detectron2-0.7.2.dist-info/METADATA": "Name: sal-detectron2\n",
        "tools/train_net.py": "",
    }
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    site = tmp_path / "site"
    command = [sys.executable, str(REPO_ROOT / "tools" / "install_detectron2.py")]
    command += ["--wheel", str(wheel), "--target", str(site)]
    for _ in range(2):
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    installed = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
    assert installed == sorted(n for n in members if n.startswith("detectron2/") and "_C." not in n)
    assert (site / "detectron2" / "layers" / "wrappers.py").read_text() == members[
        "detectron2/layers/wrappers.py"
    ]
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", "import detectron2.layers as l; print(l.cat(3))"],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.stdout.strip() == "3", result.stderr


def test_deprecation_warnings_from_our_code_fail_the_suite():
    """tests/conftest.py turns FutureWarning and DeprecationWarning raised from sparse_rcnn's
    modules into errors (on the current stack, torch deprecates what the pinned one offers);
    warnings of other packages stay warnings."""
    import warnings

    import pytest

    for category in (FutureWarning, DeprecationWarning):
        with pytest.raises(category):
            warnings.warn_explicit("old API", category, "export.py", 1, module="sparse_rcnn.export")
        with pytest.warns(category):
            warnings.warn_explicit("theirs", category, "x.py", 1, module="fvcore.nn.focal_loss")
