#!/usr/bin/env python
"""Write docs/tutorials/getting_started.ipynb (outputs stripped) from the cells below.

    python tools/make_notebook.py          # rewrite the notebook
    python tools/make_notebook.py --check  # exit 1 if the committed notebook differs

Edit the cells here, not in the .ipynb: tests/test_notebook.py checks that the two agree and runs
the notebook headless.
"""

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "tutorials" / "getting_started.ipynb"

CELLS = [
    (
        "markdown",
        """# Sparse R-CNN: getting started on a COCO-format dataset

This notebook trains Sparse R-CNN on a small COCO-format dataset on the CPU, evaluates it with
Detectron2's `COCOEvaluator`, runs the predictor on an image and draws its detections (with the
project's drawing and with Detectron2's `Visualizer`), then exports the model to ONNX and runs it
with ONNX Runtime. It uses only the installed package (`pip install .` of the repository, or the
checkout's environment: `make venv`), so it runs from any folder.

The dataset is the project's built-in synthetic one (128-px images of rectangles, ellipses and
triangles), written as a COCO json and an image folder: your own data enters the same way, as a
json and a folder. Training takes a few minutes on a CPU; `SPARSE_RCNN_NOTEBOOK_QUICK=1` makes
everything tiny (the test suite runs the notebook that way). The same steps from the command line:
[docs/custom_datasets.md](../custom_datasets.md).""",
    ),
    (
        "code",
        """import json
import math
import os
import tempfile

import cv2
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from IPython.display import Image, display

import sparse_rcnn

setup_logger()  # Detectron2's training log in the notebook
QUICK = os.environ.get("SPARSE_RCNN_NOTEBOOK_QUICK") == "1"
WORK_DIR = tempfile.mkdtemp(prefix="sparse_rcnn_notebook_")  # everything is written here
print("sparse_rcnn from", os.path.dirname(sparse_rcnn.__file__), "| quick:", QUICK)


def show(image_bgr):
    \"\"\"Display a BGR uint8 image in the notebook.\"\"\"
    display(Image(data=cv2.imencode(".png", image_bgr)[1].tobytes()))""",
    ),
    (
        "markdown",
        """## 1. A model from the packaged configs

`sparse_rcnn.model_zoo` finds the configs that ship with the package by name, as
`detectron2.model_zoo` does: a `.yaml` name gives a yacs config, a `.py` name a LazyConfig.
`model_zoo.get` builds the model, ready for inference (eval mode; `weights=` loads a checkpoint).
`sparse_rcnn_quick_cpu.yaml` is the small model that trains from scratch on a CPU: a ResNet-18 FPN,
3 stages, 50 proposals.""",
    ),
    (
        "code",
        """from sparse_rcnn import model_zoo

print([name for name in model_zoo.list_configs() if "cpu" in name])
model = model_zoo.get("sparse_rcnn_quick_cpu.yaml", device="cpu")
parameters = sum(p.numel() for p in model.parameters())
print(type(model).__name__, "training:", model.training, f"{parameters / 1e6:.1f}M parameters")""",
    ),
    (
        "markdown",
        """## 2. Register a COCO-format dataset

A COCO instances json (`images`, `annotations` with `bbox` as `[x, y, width, height]`,
`categories`) and the folder of its images. Here `ensure_generated` writes the built-in dataset's
splits in that format; with your own data, skip it and pass your json and folder.
`register_coco` is Detectron2's `register_coco_instances` (one call per dataset; running it
again with the same files does nothing), and `num_classes_from_dataset` reads the class count
from the json's categories.""",
    ),
    (
        "code",
        """from sparse_rcnn.builtin_datasets import ensure_generated
from sparse_rcnn.custom_datasets import num_classes_from_dataset, register_coco

data_dir = os.path.join(WORK_DIR, "data")
train_json, train_images = ensure_generated("train", root=data_dir, num_images=32 if QUICK else 400)
val_json, val_images = ensure_generated("val", root=data_dir, num_images=8 if QUICK else 50)
with open(train_json) as f:
    coco = json.load(f)
print(len(coco["images"]), "images,", len(coco["annotations"]), "boxes")
print("categories:", coco["categories"])

register_coco("shapes_train", train_json, train_images)
register_coco("shapes_val", val_json, val_images)
num_classes = num_classes_from_dataset("shapes_train")
print("classes:", num_classes)""",
    ),
    (
        "markdown",
        """## 3. Train

The config says which datasets to use and how long to train. The quick config trains from
scratch with its learning rate (6e-4 at batch 4, cosine schedule); from COCO-pretrained weights
use the paper's 2.5e-5 per 16 images instead ([docs/custom_datasets.md](../custom_datasets.md)).
300 iterations (a step takes about 0.35 s on two free cores) only start the model: expect about
1 box AP, detections scoring around 0.2. The config's own 1300 iterations reach 12-16 AP on the
built-in data: set `cfg.SOLVER.MAX_ITER = 1300` for a model worth looking at.

The trainer is Detectron2's `DefaultTrainer` with the Sparse R-CNN data loaders (the paper's
augmentation), optimizer (AdamW, gradient clipping) and evaluator; it evaluates `DATASETS.TEST` at
the end.""",
    ),
    (
        "code",
        """from detectron2.engine import DefaultTrainer

from sparse_rcnn.data_loaders import build_sparse_rcnn_test_loader, build_sparse_rcnn_train_loader
from sparse_rcnn.evaluation import build_sparse_rcnn_evaluator
from sparse_rcnn.solver import build_optimizer


class Trainer(DefaultTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return build_sparse_rcnn_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_sparse_rcnn_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_sparse_rcnn_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)


cfg = model_zoo.get_config("sparse_rcnn_quick_cpu.yaml")
cfg.DATASETS.TRAIN = ("shapes_train",)
cfg.DATASETS.TEST = ("shapes_val",)
cfg.MODEL.SPARSE_RCNN.NUM_CLASSES = num_classes
cfg.MODEL.DEVICE = "cpu"
cfg.SOLVER.MAX_ITER = 20 if QUICK else 300
cfg.SOLVER.WARMUP_ITERS = 5 if QUICK else 50
cfg.OUTPUT_DIR = os.path.join(WORK_DIR, "output")
os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)

trainer = Trainer(cfg)
trainer.resume_or_load(resume=False)
trainer.train()
ap_after_training = trainer.storage.latest()["bbox/AP"][0]
print("AP on shapes_val after training:", ap_after_training)""",
    ),
    (
        "markdown",
        """## 4. Evaluate

`COCOEvaluator` scores the detections against the json with pycocotools (the numbers of the
evaluation at the end of training, as the weights are the same).""",
    ),
    (
        "code",
        """from detectron2.evaluation import COCOEvaluator, inference_on_dataset

evaluator = COCOEvaluator("shapes_val", output_dir=os.path.join(cfg.OUTPUT_DIR, "eval"))
results = inference_on_dataset(
    trainer.model, build_sparse_rcnn_test_loader(cfg, "shapes_val"), evaluator
)
ap = results["bbox"]["AP"]
print(f"box AP {ap:.2f}, AP50 {results['bbox']['AP50']:.2f}")""",
    ),
    (
        "markdown",
        """## 5. Predict and draw

`SparseRCNNPredictor` is Detectron2's `DefaultPredictor` (a BGR image in, `Instances` out) that
loads the weights safely and checks that they fit the model. The model keeps every detection
(`SCORE_THRESH_TEST` 0 for COCO AP), so choose a score threshold: COCO models use about 0.5; a
short schedule from scratch scores its correct detections lower. `f1_optimal_threshold` (the
demo's `--confidence-threshold auto`) picks the threshold whose detections best match the
validation set's ground truth.""",
    ),
    (
        "code",
        """from sparse_rcnn.demo import FALLBACK_THRESHOLD, f1_optimal_threshold
from sparse_rcnn.predictor import SparseRCNNPredictor

cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
predictor = SparseRCNNPredictor(cfg)
records = DatasetCatalog.get("shapes_val")
images = [cv2.imread(r["file_name"]) for r in records]
predictions = [predictor(image)["instances"].to("cpu") for image in images]
threshold = f1_optimal_threshold(predictions, records) or FALLBACK_THRESHOLD
print(f"score threshold {threshold:.3f}")

image, record, instances = images[0], records[0], predictions[0]
kept = instances[instances.scores > threshold]
print(len(instances), "detections,", len(kept), "above the threshold")""",
    ),
    (
        "markdown",
        """The project's drawing (`sparse_rcnn.visualization`): the ground truth beside the
predictions, upscaled (the images are 128 px), each label above its box and never over
another label. The class names are the training set's (`thing_classes`, from the json).""",
    ),
    (
        "code",
        """from sparse_rcnn.visualization import draw_prediction_beside_ground_truth

class_names = MetadataCatalog.get("shapes_train").thing_classes
show(draw_prediction_beside_ground_truth(image, kept, record, class_names, scale=4))""",
    ),
    (
        "markdown",
        """Detectron2's `Visualizer` takes an RGB image and the dataset's metadata; `scale=4` draws a
small image at a readable size.""",
    ),
    (
        "code",
        """from detectron2.utils.visualizer import Visualizer

visualizer = Visualizer(image[:, :, ::-1], MetadataCatalog.get("shapes_train"), scale=4)
show(visualizer.draw_instance_predictions(kept).get_image()[:, :, ::-1])""",
    ),
    (
        "markdown",
        """## 6. Export to ONNX and run it with ONNX Runtime

`sparse_rcnn.export.export` takes a config file and options, as `python -m sparse_rcnn.export`
does: the config is written next to the weights first. It checks the exported graph against the
PyTorch model. `ONNXRuntimePredictor` has the predictor's interface and needs only
`onnxruntime`, numpy and Detectron2's structures at run time.""",
    ),
    (
        "code",
        """from sparse_rcnn.export import export
from sparse_rcnn.onnx_predictor import ONNXRuntimePredictor

config_file = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
with open(config_file, "w") as f:
    f.write(cfg.dump())
weights = ["MODEL.WEIGHTS", cfg.MODEL.WEIGHTS]
export_dir = os.path.join(WORK_DIR, "export")
onnx_path, checked, _ = export(config_file, weights, export_dir, "onnx", record["file_name"])
print("wrote", onnx_path, "| max |difference| (scores, boxes px) at the export check:", checked)

onnx_predictor = ONNXRuntimePredictor(onnx_path)
from_onnx = onnx_predictor(image)["instances"]
print(len(from_onnx), "ONNX detections,", len(instances), "PyTorch")
if len(from_onnx) == len(instances):  # the same detections, in score order
    a, b = from_onnx.scores.argsort(descending=True), instances.scores.argsort(descending=True)
    score_difference = (from_onnx.scores[a] - instances.scores[b]).abs().max().item()
    boxes_a, boxes_b = from_onnx.pred_boxes.tensor[a], instances.pred_boxes.tensor[b]
    box_difference = (boxes_a - boxes_b).abs().max().item()
    print(f"max |difference|: scores {score_difference:.2e}, boxes {box_difference:.2e} px")
else:
    score_difference = box_difference = math.inf""",
    ),
    (
        "markdown",
        """## Summary""",
    ),
    (
        "code",
        """summary = {
    "num_classes": num_classes,
    "iterations": cfg.SOLVER.MAX_ITER,
    "ap_after_training": ap_after_training,
    "ap": ap,
    "threshold": threshold,
    "detections": len(instances),
    "onnx_detections": len(from_onnx),
    "onnx_score_difference": score_difference,
    "onnx_box_difference": box_difference,
}
print(json.dumps(summary))""",
    ),
    (
        "markdown",
        """Next: your own data from the command line (train, evaluate, draw without a Python file)
and the errors you may meet: [docs/custom_datasets.md](../custom_datasets.md); deployment:
[docs/deployment.md](../deployment.md).""",
    ),
]


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs."""
    cells = [
        new_markdown_cell(source) if kind == "markdown" else new_code_cell(source)
        for kind, source in CELLS
    ]
    for index, cell in enumerate(cells):
        cell["id"] = f"cell-{index:02d}"  # stable ids: the file only changes with its cells
    notebook = new_notebook(cells=cells)
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    return notebook


def text() -> str:
    return nbformat.writes(build()) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    if args.check:
        if not NOTEBOOK.is_file() or NOTEBOOK.read_text() != text():
            print(f"{NOTEBOOK} differs from tools/make_notebook.py: run it", file=sys.stderr)
            return 1
        return 0
    NOTEBOOK.parent.mkdir(parents=True, exist_ok=True)
    NOTEBOOK.write_text(text())
    print(f"Wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
