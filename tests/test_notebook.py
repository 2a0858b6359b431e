"""docs/tutorials/getting_started.ipynb runs top to bottom headless (nbclient, a kernel of this
interpreter, ``SPARSE_RCNN_NOTEBOOK_QUICK=1``) from an empty folder outside the checkout, and its
committed copy is the one tools/make_notebook.py writes, without outputs."""

import base64
import json
import math
import os
import sys

import cv2
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))
import make_notebook  # noqa: E402

KERNEL_NAME = "sparse-rcnn-test"


def test_committed_notebook_is_the_generators_without_outputs():
    assert make_notebook.NOTEBOOK.read_text() == make_notebook.text()
    notebook = nbformat.read(make_notebook.NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.fixture
def kernel_of_this_interpreter(tmp_path, monkeypatch):
    """A kernelspec running ``sys.executable`` (the test's environment, with ipykernel), found
    through JUPYTER_PATH; Jupyter's and IPython's files go to a temporary folder."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Sparse R-CNN tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("SPARSE_RCNN_TEST_THREADS", "1"))
    monkeypatch.setenv("SPARSE_RCNN_NOTEBOOK_QUICK", "1")
    return KERNEL_NAME


def _png_sizes(cell):
    """(height, width) of every PNG a cell displayed."""
    sizes = []
    for output in cell.outputs:
        data = output.get("data", {}).get("image/png")
        if data:
            image = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
            sizes.append(image.shape[:2])
    return sizes


def test_notebook_runs_and_its_results_agree(kernel_of_this_interpreter, tmp_path):
    notebook = nbformat.read(make_notebook.NOTEBOOK, as_version=4)
    run_dir = tmp_path / "elsewhere"  # not the checkout: packaged configs only
    run_dir.mkdir()
    NotebookClient(
        notebook,
        kernel_name=kernel_of_this_interpreter,
        timeout=600,
        resources={"metadata": {"path": str(run_dir)}},
    ).execute()

    summary_cell = [c for c in notebook.cells if c.cell_type == "code"][-1]
    printed = "".join(o.get("text", "") for o in summary_cell.outputs if o.output_type == "stream")
    summary = json.loads(printed.strip().splitlines()[-1])
    # The built-in json's categories: rectangle, ellipse, triangle; QUICK trains 20 iterations.
    assert summary["num_classes"] == 3 and summary["iterations"] == 20
    # COCOEvaluator by hand gives the evaluation at the end of training (same weights and data).
    assert math.isfinite(summary["ap"]) and 0 <= summary["ap"] <= 100
    assert summary["ap"] == pytest.approx(summary["ap_after_training"], abs=1e-9)
    # ONNX Runtime reproduces the PyTorch predictor (the export check's float tolerances).
    assert summary["onnx_detections"] == summary["detections"] > 0
    assert summary["onnx_score_difference"] < 1e-3 and summary["onnx_box_difference"] < 0.1
    # The two drawings of the 128-px image, upscaled 4x: the project's (ground truth, an 8-px gap,
    # predictions, each with a 24-px title bar) and Detectron2's Visualizer.
    drawn = [
        size for cell in notebook.cells if cell.cell_type == "code" for size in _png_sizes(cell)
    ]
    assert drawn == [(512 + 24, 512 + 8 + 512), (512, 512)]
    # Everything was written to the notebook's temporary folder: nothing in the working folder
    # (no built-in dataset generated there).
    assert list(run_dir.iterdir()) == []
