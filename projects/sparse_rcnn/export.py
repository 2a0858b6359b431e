"""Export Sparse R-CNN and Dynamic Sparse R-CNN to TorchScript or ONNX, by tracing.

    python -m sparse_rcnn.export --config-file configs/sparse_rcnn_quick_cpu.yaml --format onnx \\
        --output out/ MODEL.WEIGHTS output/quick_cpu/model_final.pth
    python -m sparse_rcnn.export --config-file configs/sparse_rcnn_quick_cpu.py --format onnx \\
        --output out/ train.init_checkpoint=output/quick_cpu_lazy/model_final.pth

A yaml config takes ``KEY VALUE`` options, a LazyConfig (``.py``) ``key=value`` overrides and its
weights from ``train.init_checkpoint`` (as ``train_net.py --eval-only``); Detectron2's Swin, ViT
and MViT backbones are refused (:func:`check_backbone_exportable`).

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
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from torch import nn

from .config import add_sparse_rcnn_config
from .lazy_engine import is_lazy_config
from .onnx_predictor import INPUT_NAME, OUTPUT_NAMES

__all__ = [
    "check_backbone_exportable",
    "check_exportable",
    "export_onnx",
    "export_torchscript",
    "export_settings",
    "export",
    "exporting",
    "inference_func",
    "main",
    "sample_input",
    "setup_model",
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


def check_exportable(cfg) -> None:
    """Raise a ValueError naming the first config option the exported graph does not support.

    Args:
        cfg: a yaml config (``CfgNode``) or a LazyConfig (its ``model``, ``dataloader.test``).
    """
    if isinstance(cfg, CfgNode):
        pooler_key = "MODEL.ROI_BOX_HEAD.POOLER_TYPE"
        pooler_type = cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE
        unsupported = [
            ("TEST.AUG.ENABLED", cfg.TEST.AUG.ENABLED, _TTA_REASON),
            ("MODEL.SPARSE_RCNN.EVAL_PER_STAGE", cfg.MODEL.SPARSE_RCNN.EVAL_PER_STAGE, _STAGES),
            ("MODEL.MASK_ON", cfg.MODEL.MASK_ON, _MASK_REASON),
            ("MODEL.KEYPOINT_ON", cfg.MODEL.KEYPOINT_ON, "Sparse R-CNN has no keypoint head"),
        ]
    else:
        pooler_key = "model.head.box_pooler.pooler_type"
        pooler_type = cfg.model.head.box_pooler.get("pooler_type", "ROIAlignV2")
        unsupported = [
            ("model.output_all_stages", cfg.model.get("output_all_stages", False), _STAGES),
        ]
        if cfg.model.get("mask_head") is not None:
            raise ValueError(f"Cannot export with a model.mask_head: {_MASK_REASON}. Set it None.")
    for key, value, reason in unsupported:
        if value:
            raise ValueError(f"Cannot export with {key}={value}: {reason}. Set {key} False.")
    if pooler_type not in ("ROIAlign", "ROIAlignV2"):
        raise ValueError(
            f"Cannot export with {pooler_key}={pooler_type!r}: the exported graph supports "
            "ROIAlignV2 and ROIAlign (ONNX RoiAlign)."
        )


_TTA_REASON = (
    "the graph runs one image at one scale; test-time augmentation runs several forward passes "
    "and merges them outside the model"
)
_STAGES = "the graph returns the last stage's detections only"
_MASK_REASON = (
    "the exported graph returns boxes, scores and classes only; QueryInst's mask head is not "
    "exported (evaluate and serve mask models in PyTorch)"
)


def check_backbone_exportable(backbone: nn.Module, key: str) -> None:
    """Raise a ValueError if ``backbone`` contains one of Detectron2's transformer backbones.

    Swin, ViT and MViT compute their padding, window partitions, attention masks and position
    embedding sizes with Python and numpy arithmetic on the input size, which tracing freezes: the
    graph would run only at the export size, while it takes any height and width (found by
    exporting ``configs/sparse_rcnn_swin_T_FPN_300pro_crop_3x.py`` and
    ``configs/sparse_rcnn_vitdet_B_300pro_crop_3x.py``: ONNX Runtime fails at a second size).

    Args:
        backbone: the model's backbone.
        key: the config option that chose it, for the message.
    """
    from detectron2.modeling.backbone import MViT, SwinTransformer, ViT

    for name, module in backbone.named_modules():
        if isinstance(module, (SwinTransformer, ViT, MViT)):
            where = f"{key} ({type(module).__name__}{' at ' + name if name else ''})"
            raise ValueError(
                f"Cannot export this model's backbone, {where}: it computes its padding, windows "
                "and position-embedding sizes in Python from the input size, which tracing "
                "freezes, so the graph would run only at the export size. The export supports "
                "the ResNet-FPN configs (every yaml config in configs/ and their .py twins)."
            )


def export_settings(cfg) -> Dict[str, str]:
    """Preprocessing settings stored with the exported file (ONNX metadata, TorchScript extra
    file), so that a predictor needs no config: see ``onnx_predictor.METADATA_KEYS``.

    Args:
        cfg: a yaml config (``CfgNode``) or a LazyConfig, whose ``dataloader.test.mapper`` must
            resize with one ``ResizeShortestEdge`` (as ``DefaultPredictor`` does) and nothing
            else.
    """
    if isinstance(cfg, CfgNode):
        input_format, min_size, max_size = (
            cfg.INPUT.FORMAT,
            cfg.INPUT.MIN_SIZE_TEST,
            cfg.INPUT.MAX_SIZE_TEST,
        )
        score_thresh = cfg.MODEL.SPARSE_RCNN.SCORE_THRESH_TEST
        nms_thresh = (
            cfg.MODEL.SPARSE_RCNN.NMS_THRESH_TEST if cfg.MODEL.SPARSE_RCNN.NMS_ENABLED else None
        )
        num_classes = cfg.MODEL.SPARSE_RCNN.NUM_CLASSES
    else:
        input_format, (min_size, max_size) = cfg.dataloader.test.mapper.image_format, _lazy_resize(
            cfg
        )
        score_thresh = cfg.model.get("score_thresh_test", 0.0)
        nms_thresh = cfg.model.get("nms_thresh_test", None)
        num_classes = cfg.model.num_classes
    return {
        "input_format": input_format,
        "min_size_test": str(min_size),
        "max_size_test": str(max_size),
        "score_thresh_test": repr(float(score_thresh)),
        "nms_thresh_test": "none" if nms_thresh is None else repr(float(nms_thresh)),
        "num_classes": str(num_classes),
        "opset": str(ONNX_OPSET),
    }


def _lazy_resize(cfg) -> Tuple[int, int]:
    """(short side, max size) of a LazyConfig's test resize, which the predictor reproduces."""
    augmentations = instantiate(cfg.dataloader.test.mapper.augmentations)
    resize = augmentations[0] if len(augmentations) == 1 else None
    if not isinstance(resize, T.ResizeShortestEdge) or len(set(resize.short_edge_length)) != 1:
        raise ValueError(
            "Cannot export with dataloader.test.mapper.augmentations="
            f"{augmentations}: the exported file records one test resize, a single "
            "ResizeShortestEdge(short_edge_length=S, max_size=M) as in configs/common/data/coco.py."
        )
    return int(resize.short_edge_length[0]), int(resize.max_size)


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


def setup_model(config_file: str, opts: List[str]) -> Tuple[nn.Module, Dict[str, str]]:
    """The model of a config with its weights, in eval mode, and its :func:`export_settings`.

    A yaml config takes ``KEY VALUE`` options and loads ``MODEL.WEIGHTS``; a LazyConfig (``.py``)
    takes ``key=value`` overrides and loads ``train.init_checkpoint``, on the CPU, as
    ``train_net.py --eval-only`` does. Unsupported options fail (a ValueError naming them) before
    any weights are read.
    """
    lazy = is_lazy_config(config_file)
    if lazy:
        cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), opts)
    else:
        cfg = setup_cfg(config_file, opts)
    check_exportable(cfg)
    settings = export_settings(cfg)
    if lazy:
        model, backbone_key, weights = (
            instantiate(cfg.model),
            "model.backbone",
            cfg.train.init_checkpoint,
        )
    else:
        model, backbone_key, weights = build_model(cfg), "MODEL.BACKBONE.NAME", cfg.MODEL.WEIGHTS
    check_backbone_exportable(model.backbone, backbone_key)
    DetectionCheckpointer(model).load(weights)
    return model.eval(), settings


def default_sample_image() -> str:
    """The first image of the built-in validation set (generated on first use)."""
    from detectron2.data import DatasetCatalog

    from .builtin_datasets import prepare_builtin_dataset

    prepare_builtin_dataset("synthetic_shapes_val")
    return DatasetCatalog.get("synthetic_shapes_val")[0]["file_name"]


def sample_input(settings: Dict[str, str], bgr_image: np.ndarray) -> torch.Tensor:
    """A BGR (H, W, 3) image as the graph takes it: resized as ``DefaultPredictor`` resizes it,
    in the input format of ``settings`` (:func:`export_settings`), (C, H, W) float32."""
    if settings["input_format"] == "RGB":
        bgr_image = bgr_image[:, :, ::-1]
    min_size, max_size = int(settings["min_size_test"]), int(settings["max_size_test"])
    aug = T.ResizeShortestEdge([min_size, min_size], max_size)
    image = aug.get_transform(bgr_image).apply_image(bgr_image)
    return torch.as_tensor(np.ascontiguousarray(image.astype("float32").transpose(2, 0, 1)))


def _max_difference(expected, actual, tie: float = 1e-5) -> Optional[Tuple[float, float]]:
    """Max |difference| of (scores, boxes) of two runs' detections, or None if they differ in
    number or classes.

    Detections whose scores (in ``expected``) lie within ``tie`` of their neighbours' may come in
    either order: the top-k of two runtimes orders scores that differ by rounding (1e-7) either
    way (seen with a random R-101 model: two class-62 boxes at 0.0654013 and 0.0654011 swapped).
    Within such a run, each detection is compared with the closest remaining one of its class.
    """
    boxes, scores, classes = (torch.as_tensor(np.asarray(t)) for t in expected)
    boxes2, scores2, classes2 = (torch.as_tensor(np.asarray(t)) for t in actual)
    if len(scores) != len(scores2):
        return None
    if len(scores) == 0:
        return 0.0, 0.0
    order = list(range(len(scores)))
    start = 0
    for end in range(1, len(scores) + 1):
        if end < len(scores) and abs(float(scores[end - 1] - scores[end])) <= tie:
            continue
        remaining = list(range(start, end))
        for k in range(start, end):
            same_class = [j for j in remaining if classes2[j] == classes[k]]
            if not same_class:
                return None
            order[k] = min(same_class, key=lambda j: float((boxes2[j] - boxes[k]).abs().max()))
            remaining.remove(order[k])
        start = end
    boxes2, scores2, classes2 = boxes2[order], scores2[order], classes2[order]
    return (scores - scores2).abs().max().item(), (boxes - boxes2).abs().max().item()


def verify(model: nn.Module, run_exported, image: torch.Tensor) -> Dict[str, Tuple[float, float]]:
    """Compare the exported graph with eager inference on ``image`` and on a copy with another
    size (catches sizes frozen into the graph); raise if the detections differ.

    Returns:
        {"export size" / "size (H, W)": (max |score difference|, max |box difference| px)}.
    """
    other = torch.nn.functional.interpolate(
        image[None], scale_factor=(0.75, 1.25), mode="bilinear", align_corners=False
    )[0]
    checked = {}
    for name, x in (("export size", image), (f"size {tuple(other.shape[1:])}", other)):
        with torch.no_grad():
            expected = inference_func(model, x)
        try:
            actual = run_exported(x)
        except Exception as e:  # ONNX Runtime's and TorchScript's errors name a node deep inside
            raise RuntimeError(
                f"The exported graph fails at the {name} ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0][:300]}): a size of the export image was frozen "
                "into it (Python or numpy arithmetic on a shape inside the model). Make that code "
                "tensor code (detectron2.layers.shapes_to_tensor) or export a model without it."
            ) from e
        diff = _max_difference(expected, actual)
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
        checked[name] = diff
    return checked


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
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config options: KEY VALUE pairs for a yaml config, key=value for a .py LazyConfig",
    )
    return parser


def export(
    config_file: str,
    opts: List[str],
    output: str,
    fmt: str = "onnx",
    sample_image: Optional[str] = None,
    check: bool = True,
) -> Tuple[str, Dict[str, Tuple[float, float]], str]:
    """What ``python -m sparse_rcnn.export`` does (its arguments, see :func:`get_parser`).

    Returns:
        the file written, :func:`verify`'s differences (empty with ``check=False``) and how to run
        the file.
    """
    model, settings = setup_model(config_file, opts)
    image = sample_input(settings, read_image(sample_image or default_sample_image(), "BGR"))
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, FORMATS[fmt])
    if fmt == "torchscript":
        traced = export_torchscript(model, image, path, settings)

        def run_exported(x):
            with torch.no_grad():
                return traced(x)

        how = (
            "import torch, torchvision\n"
            f"    model = torch.jit.load({path!r})\n"
            "    boxes, scores, classes = model(image)  # (C, H, W) float32, "
            f"{settings['input_format']}, resized"
        )
    else:
        export_onnx(model, image, path, settings)
        from .onnx_predictor import ONNXRuntimePredictor

        predictor = ONNXRuntimePredictor(path)
        run_exported = lambda x: predictor.session.run(  # noqa: E731
            list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()}
        )
        how = (
            "from sparse_rcnn.onnx_predictor import ONNXRuntimePredictor\n"
            f"    outputs = ONNXRuntimePredictor({path!r})(bgr_image)"
        )
        if not is_lazy_config(config_file):  # the demo reads yaml configs
            how = (
                f"python -m sparse_rcnn.demo --onnx {path} --config-file {config_file} "
                f"--input IMAGES --output vis/\n    or in Python: {how}"
            )
    checked = verify(model, run_exported, image) if check else {}
    return path, checked, how


def main(argv=None) -> str:
    args = get_parser().parse_args(argv)
    if args.export_method != "tracing":
        raise SystemExit(
            "--export-method scripting is not supported: the model passes Python lists of "
            "Boxes/Instances between modules, which TorchScript cannot compile; use tracing."
        )
    path, _, how = export(
        args.config_file,
        args.opts,
        args.output,
        args.format,
        args.sample_image,
        check=not args.skip_verify,
    )
    print(f"Wrote {path}\nRun it with:\n    {how}")
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    main()
