"""Export Sparse R-CNN and Dynamic Sparse R-CNN to TorchScript or ONNX, by tracing.

    python -m sparse_rcnn.export --config-file configs/sparse_rcnn_quick_cpu.yaml --format onnx \\
        --output out/ MODEL.WEIGHTS output/quick_cpu/model_final.pth

The conventions of Detectron2's ``tools/deploy/export_model.py``: the model is traced through
``detectron2.export.TracingAdapter`` with an inference function that stops before
``detector_postprocess`` (:func:`inference_func`); the rescaling to the original image size happens
outside the graph (``sparse_rcnn.onnx_predictor.ONNXRuntimePredictor`` does it). The graph:

* input ``image``: one (C, H, W) float32 image in ``INPUT.FORMAT``, already resized (as the test
  augmentation resizes it), of any H and W (ONNX: dynamic axes ``height``, ``width``);
* outputs ``boxes`` (D, 4) xyxy in input pixels, ``scores`` (D,), ``classes`` (D,) int64: the
  top-k detections (k = the number of proposals, score descending), after the score threshold
  and, for Dynamic Sparse R-CNN, class-aware NMS (D <= k). Boxes are clipped only where NMS needs
  it, as in eager inference.

Tracing runs the exportable paths of the model (the same numbers as eager within float rounding):
Detectron2's ROIPooler instead of FastROIPooler's CPU kernel, the attention without PyTorch's MHA
fast path, no reused dynamic-parameter buffer. RoIAlign with ``aligned=True`` (ROIAlignV2) needs
ONNX opset >= 16; we write opset 17 (LayerNormalization is a single op from 17 on).
"""

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from torch import nn

from .config import add_sparse_rcnn_config
from .onnx_predictor import INPUT_NAME, OUTPUT_NAMES

__all__ = [
    "check_exportable",
    "export_onnx",
    "export_torchscript",
    "export_settings",
    "exporting",
    "inference_func",
    "main",
    "sample_input",
]

# Named, not __name__: run as `python -m sparse_rcnn.export` the module is "__main__".
logger = logging.getLogger("sparse_rcnn.export")

ONNX_OPSET = 17
FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}


def inference_func(model: nn.Module, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """What the graph computes: the model's detections in the resolution of ``image``.

    Args:
        model: a SparseRCNN in eval mode.
        image: (C, H, W) in the model's input format.

    Returns:
        boxes (D, 4) xyxy pixels of ``image``, scores (D,), classes (D,) int64.
    """
    instances = model.inference([{"image": image}], do_postprocess=False)[0]
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def check_exportable(cfg: CfgNode) -> None:
    """Raise a ValueError naming the first config option the exported graph does not support."""
    unsupported = [
        (
            "TEST.AUG.ENABLED",
            cfg.TEST.AUG.ENABLED,
            "the graph runs one image at one scale; test-time augmentation runs several "
            "forward passes and merges them outside the model",
        ),
        (
            "MODEL.SPARSE_RCNN.EVAL_PER_STAGE",
            cfg.MODEL.SPARSE_RCNN.EVAL_PER_STAGE,
            "the graph returns the last stage's detections only",
        ),
        (
            "MODEL.MASK_ON",
            cfg.MODEL.MASK_ON,
            "Sparse R-CNN has no mask head",
        ),
        (
            "MODEL.KEYPOINT_ON",
            cfg.MODEL.KEYPOINT_ON,
            "Sparse R-CNN has no keypoint head",
        ),
    ]
    for key, value, reason in unsupported:
        if value:
            raise ValueError(f"Cannot export with {key}={value}: {reason}. Set {key} False.")
    pooler_type = cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE
    if pooler_type not in ("ROIAlign", "ROIAlignV2"):
        raise ValueError(
            f"Cannot export with MODEL.ROI_BOX_HEAD.POOLER_TYPE={pooler_type!r}: the exported "
            "graph supports ROIAlignV2 and ROIAlign (ONNX RoiAlign)."
        )


def export_settings(cfg: CfgNode) -> Dict[str, str]:
    """Preprocessing settings stored with the exported file (ONNX metadata, TorchScript extra
    file), so that a predictor needs no config: see ``onnx_predictor.METADATA_KEYS``."""
    return {
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": str(cfg.INPUT.MIN_SIZE_TEST),
        "max_size_test": str(cfg.INPUT.MAX_SIZE_TEST),
        "score_thresh_test": repr(float(cfg.MODEL.SPARSE_RCNN.SCORE_THRESH_TEST)),
        "nms_thresh_test": (
            repr(float(cfg.MODEL.SPARSE_RCNN.NMS_THRESH_TEST))
            if cfg.MODEL.SPARSE_RCNN.NMS_ENABLED
            else "none"
        ),
        "num_classes": str(cfg.MODEL.SPARSE_RCNN.NUM_CLASSES),
        "opset": str(ONNX_OPSET),
    }


@contextlib.contextmanager
def exporting(model: nn.Module):
    """Eval mode and the exportable paths for the duration of an export, restored afterwards.

    * PyTorch's MultiheadAttention fast path (``aten::_native_multi_head_attention``, taken in
      eval mode without autograd) has no ONNX export: it is switched off.
    * ``torch.onnx.export`` puts the module back into the mode of the wrapper it traces
      (training, for a fresh ``TracingAdapter``): the model is set to eval again afterwards.
    * In-place ReLUs (the towers' ``nn.ReLU(inplace=True)``) are made out-of-place: in-place ops
      slow the ONNX exporter's passes down (by about 15%; the same graph otherwise).
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    inplace_relus = [m for m in model.modules() if isinstance(m, nn.ReLU) and m.inplace]
    for m in inplace_relus:
        m.inplace = False
    model.eval()
    try:
        with warnings.catch_warnings():
            # Tracer warnings come from checks of Detectron2 and PyTorch (asserts on traced
            # sizes) and from the loop over the batch of one image; none freezes an image size,
            # which verify() checks by running the graph at another size.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m in inplace_relus:
            m.inplace = True
        model.eval()


def export_torchscript(
    model: nn.Module, image: torch.Tensor, path: str, settings: Optional[Dict[str, str]] = None
) -> torch.jit.ScriptModule:
    """Trace ``model`` on ``image`` (see :func:`inference_func`) and save it as TorchScript.

    The file runs with ``torch.jit.load(path)(image) -> (boxes, scores, classes)``; it needs
    ``import torchvision`` first (RoIAlign and NMS are torchvision ops), no model code. The
    settings go into the extra file ``sparse_rcnn.json``.
    """
    with exporting(model):
        adapter = TracingAdapter(model, image, inference_func)
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    extra = {"sparse_rcnn.json": json.dumps(settings or {})}
    torch.jit.save(traced, path, _extra_files=extra)
    return traced


def export_onnx(
    model: nn.Module, image: torch.Tensor, path: str, settings: Optional[Dict[str, str]] = None
) -> None:
    """Export ``model`` traced on ``image`` (see :func:`inference_func`) to ONNX (opset 17) with
    dynamic height and width, and store ``settings`` as the file's metadata."""
    import onnx

    with exporting(model):
        adapter = TracingAdapter(model, image, inference_func)
        torch.onnx.export(
            adapter,
            adapter.flattened_inputs,
            path,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                INPUT_NAME: {1: "height", 2: "width"},
                **{name: {0: "detections"} for name in OUTPUT_NAMES},
            },
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
        )
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    for key, value in (settings or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)


def setup_cfg(config_file: str, opts: List[str]) -> CfgNode:
    cfg = get_cfg()
    add_sparse_rcnn_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def default_sample_image() -> str:
    """The first image of the built-in validation set (generated on first use)."""
    from detectron2.data import DatasetCatalog

    from .builtin_datasets import prepare_builtin_dataset

    prepare_builtin_dataset("synthetic_shapes_val")
    return DatasetCatalog.get("synthetic_shapes_val")[0]["file_name"]


def sample_input(cfg: CfgNode, bgr_image: np.ndarray) -> torch.Tensor:
    """A BGR (H, W, 3) image as the graph takes it: resized as ``DefaultPredictor`` resizes it,
    in INPUT.FORMAT, (C, H, W) float32."""
    if cfg.INPUT.FORMAT == "RGB":
        bgr_image = bgr_image[:, :, ::-1]
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(bgr_image).apply_image(bgr_image)
    return torch.as_tensor(np.ascontiguousarray(image.astype("float32").transpose(2, 0, 1)))


def _max_difference(expected, actual) -> Optional[Tuple[float, float]]:
    """Max |difference| of (scores, boxes), or None if the detections differ in number/class."""
    boxes, scores, classes = (torch.as_tensor(t).detach() for t in expected)
    boxes2, scores2, classes2 = (torch.as_tensor(t).detach() for t in actual)
    if len(scores) != len(scores2) or not torch.equal(classes, classes2):
        return None
    if len(scores) == 0:
        return 0.0, 0.0
    return (scores - scores2).abs().max().item(), (boxes - boxes2).abs().max().item()


def verify(model: nn.Module, run_exported, image: torch.Tensor) -> None:
    """Compare the exported graph with eager inference on ``image`` and on a copy with another
    size (catches sizes frozen into the graph); raise if the detections differ."""
    other = torch.nn.functional.interpolate(
        image[None], scale_factor=(0.75, 1.25), mode="bilinear", align_corners=False
    )[0]
    for name, x in (("export size", image), (f"size {tuple(other.shape[1:])}", other)):
        with torch.no_grad():
            expected = inference_func(model, x)
        diff = _max_difference(expected, run_exported(x))
        # A sanity check against sizes frozen into the graph (which move boxes by pixels or
        # change the number of detections), not the parity test (tests/test_export.py): loose
        # enough for a randomly initialised model, whose boxes amplify rounding differences.
        box_tol = 0.1 + 1e-4 * float(expected[0].abs().max()) if len(expected[0]) else 0.1
        if diff is None or diff[0] > 1e-3 or diff[1] > box_tol:
            raise RuntimeError(
                f"The exported graph does not reproduce eager inference at the {name}: max "
                f"difference (scores, boxes) {diff} (None: different detections)."
            )
        print(f"checked at the {name}: max |score diff| {diff[0]:.2e}, |box diff| {diff[1]:.2e} px")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export Sparse R-CNN to TorchScript or ONNX")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    parser.add_argument(
        "--export-method",
        choices=["tracing", "scripting"],
        default="tracing",
        help="only tracing is supported (scripting: the model's Python structures, see README)",
    )
    parser.add_argument(
        "--sample-image",
        default=None,
        help="image to trace with (default: the first image of synthetic_shapes_val)",
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--skip-verify",
        action="store_true",
        help="do not compare the exported graph with eager inference after exporting",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return parser


def main(argv=None) -> str:
    args = get_parser().parse_args(argv)
    if args.export_method != "tracing":
        raise SystemExit(
            "--export-method scripting is not supported: the model passes Python lists of "
            "Boxes/Instances between modules, which TorchScript cannot compile; use tracing."
        )
    cfg = setup_cfg(args.config_file, args.opts)
    check_exportable(cfg)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    image = sample_input(cfg, read_image(args.sample_image or default_sample_image(), "BGR"))
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, FORMATS[args.format])
    settings = export_settings(cfg)
    if args.format == "torchscript":
        traced = export_torchscript(model, image, path, settings)

        def run_exported(x):
            with torch.no_grad():
                return traced(x)

        how = (
            "import torch, torchvision\n"
            f"    model = torch.jit.load({path!r})\n"
            "    boxes, scores, classes = model(image)  # (C, H, W) float32, "
            f"{cfg.INPUT.FORMAT}, resized"
        )
    else:
        export_onnx(model, image, path, settings)
        from .onnx_predictor import ONNXRuntimePredictor

        predictor = ONNXRuntimePredictor(path)
        run_exported = lambda x: predictor.session.run(  # noqa: E731
            list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()}
        )
        how = (
            f"python -m sparse_rcnn.demo --onnx {path} --config-file {args.config_file} "
            "--input IMAGES --output vis/\n"
            "    or in Python: from sparse_rcnn.onnx_predictor import ONNXRuntimePredictor;\n"
            f"    outputs = ONNXRuntimePredictor({path!r})(bgr_image)"
        )
    if not args.skip_verify:
        verify(model, run_exported, image)
    print(f"Wrote {path}\nRun it with:\n    {how}")
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    main()
