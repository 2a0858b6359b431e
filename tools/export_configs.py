"""Export every config in configs/ to ONNX with ``sparse_rcnn.export`` and check it (a check, not
a timing: one JSON record per config in ``benchmarks/results/export_configs.jsonl``, written with
the benchmarks' recorder, ``benchmarks/common.py``).

For each yaml and LazyConfig ``.py`` config (the Swin and ViTDet ones are expected to be refused:
``check_backbone_exportable``): build its model with random weights (seed 0) and the box-delta
layers scaled by ``--delta-scale`` (0.1, as in tests/test_export.py: a random model's boxes
otherwise leave the image, where RoIAlign is discontinuous and 1e-7 rounding grows to pixels),
save them, and run what ``python -m sparse_rcnn.export --config-file CONFIG --output DIR
MODEL.WEIGHTS w.pth`` (``train.init_checkpoint=w.pth`` for ``.py``) runs: export on the default
sample image (synthetic_shapes_val, resized to the config's test size) and compare ONNX Runtime with
eager inference at the export size and at a second size. Records: ``exported``, the seconds, the
max differences, or the error.

Usage:
    python tools/export_configs.py [--configs configs/a.yaml ...] [--threads 2]
"""

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time

import torch
from detectron2.checkpoint import DetectionCheckpointer

from sparse_rcnn.config_loader import is_lazy_config
from sparse_rcnn.export import export, setup_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import common  # noqa: E402  (benchmarks/common.py: records, the box-delta scaling)


def random_weights(config_file: str, path: str, delta_scale: float) -> list:
    """Save a seed-0 random model of ``config_file`` (built as the export builds it, without
    weights) to ``path``; return the weights option that loads it."""
    lazy = is_lazy_config(config_file)
    no_weights = ["train.init_checkpoint=''"] if lazy else ["MODEL.WEIGHTS", ""]
    torch.manual_seed(0)
    model, _ = setup_model(config_file, no_weights)
    common.scale_box_deltas(model, delta_scale)
    DetectionCheckpointer(model, save_dir=os.path.dirname(path)).save(
        os.path.basename(path)[: -len(".pth")]
    )
    return [f"train.init_checkpoint={path}"] if lazy else ["MODEL.WEIGHTS", path]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=None, help="default: configs/*")
    parser.add_argument("--delta-scale", type=float, default=0.1)
    args, _, rec = common.parse_args(parser, "export_configs.jsonl", min_run_time=0.0)
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    configs = args.configs or sorted(
        glob.glob(os.path.join(root, "*.yaml")) + glob.glob(os.path.join(root, "*.py"))
    )
    for config_file in configs:
        name = os.path.relpath(config_file, os.path.join(root, ".."))
        work = tempfile.mkdtemp(prefix="export_configs_")
        rec.begin()
        start = time.perf_counter()
        try:
            weights = random_weights(config_file, os.path.join(work, "w.pth"), args.delta_scale)
            _, checked, _ = export(config_file, weights, os.path.join(work, "out"))
            result = {
                "exported": True,
                "checked": {k: {"score": v[0], "box_px": v[1]} for k, v in checked.items()},
            }
        except Exception as e:  # recorded: the refused backbones, or a failure to look at
            result = {"exported": False, "error": f"{type(e).__name__}: {e}"[:400]}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result["seconds"] = round(time.perf_counter() - start, 1)
        rec.emit("export_config", config=name, delta_scale=args.delta_scale, **result)


if __name__ == "__main__":
    main()
