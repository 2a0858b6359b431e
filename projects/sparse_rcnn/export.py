"""Export Sparse R-CNN and Dynamic Sparse R-CNN to ONNX, ``torch.export`` (``.pt2``) or TorchScript.

    python -m sparse_rcnn.export --config-file configs/sparse_rcnn_quick_cpu.yaml --format onnx \\
        --output out/ MODEL.WEIGHTS output/quick_cpu/model_final.pth
    python -m sparse_rcnn.export --config-file configs/sparse_rcnn_quick_cpu.py --format onnx \\
        --output out/ train.init_checkpoint=output/quick_cpu_lazy/model_final.pth
    python -m sparse_rcnn.export --config-file ... --format torch_export --output out/ ...

A yaml config takes ``KEY VALUE`` options, a LazyConfig (``.py``) ``key=value`` overrides and its
weights from ``train.init_checkpoint`` (as ``train_net.py --eval-only``); Detectron2's Swin, ViT
and MViT backbones are refused (:func:`check_backbone_exportable`). ``--register-coco NAME JSON
IMAGE_ROOT`` registers a COCO-format dataset (``sparse_rcnn.custom_datasets``): the class count
comes from the config's training set unless the options give it, and the sample image from the
dataset.

The conventions of Detectron2's ``tools/deploy/export_model.py``: the graph computes an inference
function that stops before ``detector_postprocess`` (:func:`inference_func`); the rescaling to the
original image size happens outside the graph (``sparse_rcnn.onnx_predictor.ONNXRuntimePredictor``
does it). Two graph makers:

* ``torch.export`` (:func:`export_program`): the ``torch_export`` format (``torch.export.save``,
  the successor of TorchScript) and, where torch has it (torch >= 2.5 with ``onnxscript``), the
  ONNX file (``torch.onnx.export(..., dynamo=True)``, opset 18), with the image's height and width
  as ``dynamic_shapes`` (at least :data:`MIN_EXPORT_SIDE` px; an FPN level of one pixel would
  broadcast differently);
* ``torch.jit.trace`` through ``detectron2.export.TracingAdapter``: TorchScript, and the ONNX file
  on older torch (the TorchScript-based exporter, opset 17, dynamic axes).

The graph:

* input ``image``: one (C, H, W) float32 image in ``INPUT.FORMAT``, already resized (as the test
  augmentation resizes it), of any H and W (ONNX: dynamic axes ``height``, ``width``);
* outputs ``boxes`` (D, 4) xyxy in input pixels, ``scores`` (D,), ``classes`` (D,) int64: the
  top-k detections (score descending), after the score threshold and, for Dynamic Sparse R-CNN,
  class-aware NMS (D <= k; k = ``TEST.DETECTIONS_PER_IMAGE``, 0: the number of proposals, is a
  constant of the graph: export again to change it). Boxes are clipped only where NMS needs it, as
  in eager inference.

Both run the exportable paths of the model (the same numbers as eager within float rounding):
Detectron2's ROIPooler instead of FastROIPooler's CPU kernel, the attention without PyTorch's MHA
fast path, no reused dynamic-parameter buffer. RoIAlign with ``aligned=True`` (ROIAlignV2) needs
ONNX opset >= 16; we write opset 17 with the TorchScript-based exporter (LayerNormalization is a
single op from 17 on) and 18, its lowest opset, with the ``torch.export``-based one.
"""

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from copy import deepcopy
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode, instantiate
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.export import TracingAdapter
from scipy.optimize import linear_sum_assignment
from torch import nn

from .checkpoint import load_inference_weights
from .config_loader import config_reader, load_config
from .custom_datasets import (
    add_register_coco_argument,
    first_image,
    opts_with_dataset_num_classes,
    register_from_args,
)
from .onnx_predictor import INPUT_NAME, OUTPUT_NAMES

__all__ = [
    "check_backbone_exportable",
    "export_program",
    "export_torch_export",
    "has_dynamo_onnx_exporter",
    "check_exportable",
    "damped_copy",
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

ONNX_OPSET = 17  # the TorchScript-based ONNX exporter's
DYNAMO_ONNX_OPSET = 18  # the torch.export-based ONNX exporter's (its lowest)
FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx", "torch_export": "model.pt2"}
# Settings stored in TorchScript and torch.export files (ONNX files keep them as metadata).
SETTINGS_FILE = "sparse_rcnn.json"


class _InferenceModule(nn.Module):
    """:func:`inference_func` as a module with one tensor input, for ``torch.export``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return inference_func(self.model, image)


def inference_func(model: nn.Module, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """What the graph computes: the model's detections in the resolution of ``image``.

    Args:
        model: a SparseRCNN in eval mode.
        image: (C, H, W) in the model's input format.

    Returns:
        boxes (D, 4) xyxy pixels of ``image``, scores (D,), classes (D,) int64.
    """
    # model.inference([{"image": image}], do_postprocess=False) as tensors: no Boxes/Instances,
    # whose checks on the number of detections torch.export cannot decide.
    images, image_whwh = model.preprocess_image([{"image": image}])
    features, proposal_boxes, proposal_features = model._features_and_proposals(images, image_whwh)
    last = model.head.num_stages - 1
    outputs = model.head(features, proposal_boxes, proposal_features, [last])[-1]
    return model.select_detections(
        outputs["pred_logits"][0], outputs["pred_boxes"][0], images.image_sizes[0]
    )


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
    with exporting(model), _torchscript_deprecation_noted():
        adapter = TracingAdapter(model, image, inference_func)
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
        torch.jit.save(traced, path, _extra_files={SETTINGS_FILE: json.dumps(settings or {})})
    return traced


@contextlib.contextmanager
def _torchscript_deprecation_noted():
    """Current torch deprecates ``torch.jit.trace``/``save`` with a FutureWarning on every call:
    say it once in our log, with the successor, instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        yield
    deprecated = [w for w in caught if issubclass(w.category, FutureWarning)]
    for w in caught:
        if w not in deprecated:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if deprecated:
        logger.warning(
            f"torch {torch.__version__} deprecates TorchScript ({deprecated[0].message}); "
            "--format torch_export writes its successor, a torch.export program (.pt2)."
        )


def has_dynamo_onnx_exporter() -> bool:
    """Whether this torch exports ONNX through ``torch.export`` (torch >= 2.5, whose
    ``torch.onnx.export`` takes ``dynamo=True``, with ``onnxscript`` installed)."""
    import importlib.util
    import inspect

    if getattr(torch.compiler, "is_exporting", None) is None:
        return False
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        return False
    return importlib.util.find_spec("onnxscript") is not None


# The smallest image side (after the test resize) that an exported graph takes: with a 32-px
# stride an FPN level (P6 of a 64-px side) would have one pixel and broadcast differently.
MIN_EXPORT_SIDE = 65


def export_program(model: nn.Module, image: torch.Tensor) -> "torch.export.ExportedProgram":
    """``torch.export`` of :func:`inference_func` on ``image``, with its height and width dynamic
    (at least :data:`MIN_EXPORT_SIDE` px each).

    Needs torch >= 2.5 (``torch.compiler.is_exporting``, which tells the model to take its
    exportable paths).
    """
    if getattr(torch.compiler, "is_exporting", None) is None:
        raise RuntimeError(
            f"torch {torch.__version__} cannot export this model with torch.export (it needs "
            "torch >= 2.5); use --format onnx or --format torchscript."
        )
    dims = {
        1: torch.export.Dim("height", min=MIN_EXPORT_SIDE),
        2: torch.export.Dim("width", min=MIN_EXPORT_SIDE),
    }
    with exporting(model), _nms_keeps_any_number():
        return torch.export.export(
            _InferenceModule(model), (image,), dynamic_shapes={"image": dims}, strict=False
        )


@contextlib.contextmanager
def _nms_keeps_any_number():
    """torchvision's shape function of ``nms`` declares that it keeps at least 2 boxes (the
    default ``min=2`` of ``create_unbacked_symint``), so an exported program asserts that at run
    time and fails on an image with 0 or 1 detections after NMS. For the duration of an export,
    a shape function with no such bound replaces it (torchvision's is restored afterwards)."""
    library = torch.library.Library("torchvision", "FRAGMENT")

    def nms_shape(boxes, scores, iou_threshold):
        kept = torch.library.get_ctx().new_dynamic_size(min=0)
        return boxes.new_empty(kept, dtype=torch.long)

    torch.library.register_fake("torchvision::nms", nms_shape, lib=library)
    try:
        yield
    finally:
        library._destroy()


def export_torch_export(
    model: nn.Module, image: torch.Tensor, path: str, settings: Optional[Dict[str, str]] = None
) -> "torch.export.ExportedProgram":
    """:func:`export_program`, saved with ``torch.export.save`` (settings in the extra file
    ``sparse_rcnn.json``).

    The file runs with ``torch.export.load(path).module()(image) -> (boxes, scores, classes)``
    after ``import torchvision`` (RoIAlign and NMS are torchvision ops), no model code.
    """
    program = export_program(model, image)
    torch.export.save(program, path, extra_files={SETTINGS_FILE: json.dumps(settings or {})})
    return program


def export_onnx(
    model: nn.Module,
    image: torch.Tensor,
    path: str,
    settings: Optional[Dict[str, str]] = None,
    exporter: Optional[str] = None,
) -> None:
    """Export ``model`` on the example ``image`` (see :func:`inference_func`) to ONNX with dynamic
    height and width, and store ``settings`` as the file's metadata.

    Args:
        exporter: "dynamo" (``torch.export``-based, opset 18) or "torchscript" (``torch.jit``-
            based, opset 17); default: "dynamo" where :func:`has_dynamo_onnx_exporter`.
    """
    import onnx

    exporter = exporter or ("dynamo" if has_dynamo_onnx_exporter() else "torchscript")
    if exporter == "dynamo":
        program = export_program(model, image)
        with _quiet_onnx_exporter():
            torch.onnx.export(
                program,
                (image,),
                path,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=DYNAMO_ONNX_OPSET,
                dynamo=True,
                external_data=False,
            )
    elif exporter == "torchscript":
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
                **({"dynamo": False} if has_dynamo_onnx_exporter() else {}),
            )
    else:
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    opset = DYNAMO_ONNX_OPSET if exporter == "dynamo" else ONNX_OPSET
    for key, value in {**(settings or {}), "opset": str(opset)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)


@contextlib.contextmanager
def _quiet_onnx_exporter():
    """The torch.export-based exporter prints its progress (and each constant it does not fold)
    to stdout: sent to our log at debug level instead."""
    import io

    stream = io.StringIO()
    with contextlib.redirect_stdout(stream):
        yield
    for line in stream.getvalue().splitlines():
        logger.debug(line)


def setup_cfg(config_file: str, opts: List[str]):
    """The config of ``config_file`` (yaml or LazyConfig, ``sparse_rcnn.config_loader``) with
    ``opts``, on the CPU where the config asks for CUDA and none is available."""
    cfg = load_config(config_file, opts)
    run = config_reader(cfg)
    if run.device.startswith("cuda") and not torch.cuda.is_available():
        run.set_device("cpu")
    run.freeze()
    return cfg


def setup_model(config_file: str, opts: List[str]) -> Tuple[nn.Module, Dict[str, str]]:
    """The model of a config with its weights, in eval mode, and its :func:`export_settings`.

    A yaml config takes ``KEY VALUE`` options and loads ``MODEL.WEIGHTS``; a LazyConfig (``.py``)
    takes ``key=value`` overrides and loads ``train.init_checkpoint``, as ``train_net.py
    --eval-only`` does (weights-only; a checkpoint that leaves the model untrained is an error:
    ``sparse_rcnn.checkpoint.load_inference_weights``). Unsupported options fail (a ValueError
    naming them) before any weights are read.
    """
    cfg = setup_cfg(config_file, opts)
    run = config_reader(cfg)
    check_exportable(cfg)
    settings = export_settings(cfg)
    model = run.build_model()
    check_backbone_exportable(
        model.backbone, "model.backbone" if run.lazy else "MODEL.BACKBONE.NAME"
    )
    load_inference_weights(model, run.weights, key=run.keys["weights"])
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


# Tolerances of verify(): a sanity check against sizes frozen into the graph (which move boxes by
# pixels or change the number of detections), not the parity test (tests/test_export.py).
_SCORE_TOL = 1e-3


def _box_tol(boxes) -> float:
    """0.1 px plus 1e-4 of the largest coordinate (float32 rounding grows with the coordinates)."""
    return 0.1 + 1e-4 * float(torch.as_tensor(np.asarray(boxes)).abs().max()) if len(boxes) else 0.1


def _match_by_score_and_box(
    expected, actual, score_tol: float, box_tol: float, score_floor: float = 0.0
) -> Optional[Tuple[float, float, int]]:
    """Pair two runs' detections one to one, each with one of its class whose score and box lie
    within the tolerances, in any order; a detection may stay unpaired only if its score lies
    within ``score_tol`` of the other run's cut (its lowest score, or ``score_floor``, the score
    threshold, when it has none), where rounding can move it across the top-k or threshold cut.

    Args:
        expected, actual: (boxes (D, 4), scores (D,), classes (D,)) of the two runs.
        score_tol, box_tol: the largest |score difference| and |box coordinate difference|.
        score_floor: the model's score threshold.

    Returns:
        (max |score difference|, max |box difference|) over the pairs and the number of unpaired
        detections, or None if no such pairing exists.
    """
    runs = [tuple(torch.as_tensor(np.asarray(t)) for t in run) for run in (expected, actual)]
    (boxes, scores, classes), (boxes2, scores2, classes2) = runs
    n, m = len(scores), len(scores2)
    score_diff = (scores[:, None].double() - scores2[None, :].double()).abs()  # (n, m)
    box_diff = (boxes[:, None].double() - boxes2[None, :].double()).abs().amax(-1)
    pairable = (classes[:, None] == classes2[None, :]) & (score_diff <= score_tol)
    pairable &= box_diff <= box_tol

    def may_stay_unpaired(own_scores, other_scores):
        cut = float(other_scores.min()) if len(other_scores) else score_floor
        return own_scores.double() <= cut + score_tol

    # A minimum-cost assignment on (n + m) x (m + n): a detection goes to one of the other run
    # (if pairable; cost: the normalised differences, at most 2) or to "unpaired" (if allowed;
    # cost 3, so that pairing two detections is always cheaper than leaving both unpaired).
    forbidden = 1e9
    cost = np.full((n + m, m + n), forbidden)
    cost[:n, :m] = np.where(pairable, score_diff / score_tol + box_diff / box_tol, forbidden)
    cost[:n, m:][np.diag_indices(n)] = np.where(may_stay_unpaired(scores, scores2), 3, forbidden)
    cost[n:, :m][np.diag_indices(m)] = np.where(may_stay_unpaired(scores2, scores), 3, forbidden)
    cost[n:, m:] = 0
    rows, cols = linear_sum_assignment(cost)
    if cost[rows, cols].max(initial=0) >= forbidden:
        return None
    pairs = [(r, c) for r, c in zip(rows, cols) if r < n and c < m]
    unpaired = n + m - 2 * len(pairs)
    if not pairs:
        return 0.0, 0.0, unpaired
    r, c = (torch.as_tensor(list(i)) for i in zip(*pairs))
    return float(score_diff[r, c].max()), float(box_diff[r, c].max()), unpaired


def _untrained(model: nn.Module) -> bool:
    """Whether every class-logit bias of every stage still holds one value, the focal-loss prior
    they are initialised to: a model that was never trained (training moves each class's bias
    its own way)."""
    stages = getattr(getattr(model, "head", None), "head_series", None)
    if not stages:
        return False
    biases = torch.cat([stage.class_logits.bias.detach().flatten() for stage in stages])
    return bool((biases == biases[0]).all())


def damped_copy(model: nn.Module, factor: float = 0.1) -> nn.Module:
    """A copy of ``model`` with every stage's box deltas scaled by ``factor``.

    A randomly initialised model's boxes grow or shrink by up to e^{+-1} per stage and leave the
    image, where RoIAlign is discontinuous, so rounding differences of 1e-7 between two runtimes
    grow to pixels; the copy's boxes stay near the proposals, and its detections agree to
    rounding. Sizes frozen into a graph come from the traced code, not from the weights: the
    copy, exported the same way, shows them as the model would.
    """
    copy = deepcopy(model)
    with torch.no_grad():
        for stage in copy.head.head_series:
            stage.bboxes_delta.weight.mul_(factor)
            stage.bboxes_delta.bias.mul_(factor)
    return copy.eval()


def _run_at(run_exported, name: str, x: torch.Tensor):
    try:
        return run_exported(x)
    except Exception as e:  # ONNX Runtime's and TorchScript's errors name a node deep inside
        raise RuntimeError(
            f"The exported graph fails at the {name} ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:300]}): a size of the export image was frozen "
            "into it (Python or numpy arithmetic on a shape inside the model). Make that code "
            "tensor code (detectron2.layers.shapes_to_tensor) or export a model without it."
        ) from e


def verify(
    model: nn.Module,
    run_exported,
    image: torch.Tensor,
    export_copy: Optional[Callable[[nn.Module, str], Callable]] = None,
) -> Dict[str, Tuple[float, float]]:
    """Compare the exported graph with eager inference on ``image`` and on a copy with another
    size (catches sizes frozen into the graph); raise if the detections differ.

    A trained model must agree detection by detection, in rank order (scores within 1e-3, boxes
    within :func:`_box_tol`; scores within 1e-5 of each other may come in either order). A model
    that was never trained (:func:`_untrained`) often cannot: its random box deltas amplify the
    runtimes' rounding into pixels, and its near-equal scores (all about the focal-loss prior)
    reorder. If it fails that comparison, the same check runs on :func:`damped_copy` exported by
    ``export_copy`` (a graph traced by the same code), its detections paired by score and box in
    any order (:func:`_match_by_score_and_box`): a frozen size still shows there.

    Args:
        model: the exported model, in eval mode.
        run_exported: image -> (boxes, scores, classes) of the exported file.
        image: the (C, H, W) export image.
        export_copy: (model, folder) -> its ``run_exported``: exports another model the same way
            into ``folder``; without it an untrained model is held to the trained model's check.

    Returns:
        {"export size" / "size (H, W)": (max |score difference|, max |box difference| px)}; for
        an untrained model checked on its damped copy, the names end with " (damped copy)".
    """
    other = torch.nn.functional.interpolate(
        image[None], scale_factor=(0.75, 1.25), mode="bilinear", align_corners=False
    )[0]
    inputs = (("export size", image), (f"size {tuple(other.shape[1:])}", other))
    checked, failed = {}, {}
    for name, x in inputs:
        with torch.no_grad():
            expected = inference_func(model, x)
        actual = _run_at(run_exported, name, x)
        diff = _max_difference(expected, actual)
        if diff is None or diff[0] > _SCORE_TOL or diff[1] > _box_tol(expected[0]):
            failed[name] = diff
            continue
        print(f"checked at the {name}: max |score diff| {diff[0]:.2e}, |box diff| {diff[1]:.2e} px")
        checked[name] = diff
    if not failed:
        return checked
    name, diff = next(iter(failed.items()))
    message = (
        f"The exported graph does not reproduce eager inference at the {name}: max difference "
        f"(scores, boxes) {diff} (None: different detections)."
    )
    if not _untrained(model) or export_copy is None:
        raise RuntimeError(message)
    copy = damped_copy(model)
    with tempfile.TemporaryDirectory() as folder:
        run_copy = export_copy(copy, folder)
        for name, x in inputs:
            with torch.no_grad():
                expected = inference_func(copy, x)
            actual = _run_at(run_copy, name, x)
            matched = _match_by_score_and_box(
                expected, actual, _SCORE_TOL, _box_tol(expected[0]), copy.score_thresh_test
            )
            if matched is None:
                raise RuntimeError(
                    f"{message} The model is untrained, but a copy with damped box deltas, "
                    f"exported the same way, does not reproduce eager inference at the {name} "
                    "either (its detections cannot be paired by class, score and box): a size of "
                    "the export image was frozen into the graph."
                )
            print(
                f"checked a copy with damped box deltas at the {name}: {len(expected[1])} "
                f"detections paired by score and box, {matched[2]} at the cut unpaired; max "
                f"|score diff| {matched[0]:.2e}, |box diff| {matched[1]:.2e} px"
            )
            checked[f"{name} (damped copy)"] = matched[:2]
    print(
        "The model is untrained (its class-logit biases hold their initial value): its random box "
        "deltas amplify the runtimes' rounding and its near-equal scores reorder, so the graph was "
        "checked on a copy with damped box deltas, exported the same way: no size is frozen into "
        "it. A trained model is checked detection by detection."
    )
    return checked


def _exported_runner(fmt: str, model: nn.Module, image: torch.Tensor, path: str, settings):
    """Export ``model`` on the example ``image`` to ``path`` in ``fmt``; returns image -> (boxes,
    scores, classes) of the written file (a torch.export program, TorchScript or ONNX Runtime)."""
    if fmt in ("torch_export", "torchscript"):
        if fmt == "torch_export":
            graph = export_torch_export(model, image, path, settings).module()
        else:
            graph = export_torchscript(model, image, path, settings)

        def run_exported(x):
            with torch.no_grad():
                return graph(x)

        return run_exported
    export_onnx(model, image, path, settings)
    from .onnx_predictor import ONNXRuntimePredictor

    predictor = ONNXRuntimePredictor(path)
    return lambda x: predictor.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export Sparse R-CNN to ONNX, torch.export (.pt2) or TorchScript"
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    parser.add_argument(
        "--export-method",
        choices=["tracing", "scripting"],
        default="tracing",
        help="only tracing is supported (scripting fails on the model's Python structures)",
    )
    parser.add_argument(
        "--sample-image",
        default=None,
        help="image to trace with (default: the first image of the first --register-coco "
        "dataset, else of synthetic_shapes_val)",
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--skip-verify",
        action="store_true",
        help="do not compare the exported graph with eager inference after exporting",
    )
    add_register_coco_argument(parser)
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
    run_exported = _exported_runner(fmt, model, image, path, settings)
    if fmt == "torch_export":
        how = (
            "import torch, torchvision\n"
            f"    model = torch.export.load({path!r}).module()\n"
            "    boxes, scores, classes = model(image)  # (C, H, W) float32, "
            f"{settings['input_format']}, resized"
        )
    elif fmt == "torchscript":
        how = (
            "import torch, torchvision\n"
            f"    model = torch.jit.load({path!r})\n"
            "    boxes, scores, classes = model(image)  # (C, H, W) float32, "
            f"{settings['input_format']}, resized"
        )
    else:
        how = (
            "from sparse_rcnn.onnx_predictor import ONNXRuntimePredictor\n"
            f"    outputs = ONNXRuntimePredictor({path!r})(bgr_image)"
        )
        how = (
            f"python -m sparse_rcnn.demo --onnx {path} --config-file {config_file} "
            f"--input IMAGES --output vis/\n    or in Python: {how}"
        )

    def export_copy(copy, folder):
        return _exported_runner(fmt, copy, image, os.path.join(folder, FORMATS[fmt]), settings)

    checked = verify(model, run_exported, image, export_copy) if check else {}
    return path, checked, how


def main(argv=None) -> str:
    args = get_parser().parse_args(argv)
    if args.export_method != "tracing":
        raise SystemExit(
            "--export-method scripting is not supported: the model passes Python lists of "
            "Boxes/Instances between modules, which TorchScript cannot compile; use tracing."
        )
    registered = register_from_args(args)
    path, _, how = export(
        args.config_file,
        opts_with_dataset_num_classes(args.config_file, args.opts),
        args.output,
        args.format,
        args.sample_image or first_image(registered),
        check=not args.skip_verify,
    )
    print(f"Wrote {path}\nRun it with:\n    {how}")
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    main()
