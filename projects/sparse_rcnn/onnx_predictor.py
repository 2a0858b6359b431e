"""Serve an exported Sparse R-CNN / Dynamic Sparse R-CNN ONNX graph with ONNX Runtime.

:class:`ONNXRuntimePredictor` has the interface of Detectron2's ``DefaultPredictor``: a BGR
(H, W, 3) uint8 image in, ``{"instances": Instances}`` (pred_boxes, scores, pred_classes) out, at
the original image size. It resizes the image as the config's test augmentation does
(``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``, as ``DefaultPredictor``), runs the graph and
applies ``detector_postprocess`` outside it, as Detectron2's exported models do.

It imports no ``sparse_rcnn`` model code: the graph is self-contained, and the preprocessing
settings are read from the metadata that ``sparse_rcnn.export`` writes into the file (a config
passed in overrides them). Only ``onnxruntime``, numpy and Detectron2's structures and transforms
are needed at run time::

    from sparse_rcnn.onnx_predictor import ONNXRuntimePredictor
    predictor = ONNXRuntimePredictor("out/model.onnx")
    outputs = predictor(cv2.imread("input.jpg"))     # {"instances": Instances}
"""

from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

__all__ = ["ONNXRuntimePredictor", "METADATA_KEYS", "INPUT_NAME", "OUTPUT_NAMES"]

INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "classes")
# Keys of the ONNX metadata that sparse_rcnn.export writes and this predictor reads.
METADATA_KEYS = ("input_format", "min_size_test", "max_size_test", "score_thresh_test")


class ONNXRuntimePredictor:
    """``DefaultPredictor`` for an exported ONNX graph (see the module doc).

    Attributes:
        session: the ``onnxruntime.InferenceSession``.
        input_format: "RGB" or "BGR", the channel order the graph takes.
        aug: the test-time resize.
        score_thresh: detections with a score not above this are dropped after the graph (the
            graph itself applies the threshold it was exported with; a higher one here filters
            more, which gives the same detections as exporting with it: NMS only ever suppresses a
            box by a higher-scoring one).
    """

    def __init__(
        self,
        model_path: str,
        cfg=None,
        *,
        num_threads: Optional[int] = None,
        providers: Optional[List[str]] = None,
    ):
        """
        Args:
            model_path: the ``.onnx`` file written by ``python -m sparse_rcnn.export``.
            cfg: optional Detectron2 config; its INPUT.FORMAT, INPUT.MIN_SIZE_TEST,
                INPUT.MAX_SIZE_TEST and MODEL.SPARSE_RCNN.SCORE_THRESH_TEST override the file's
                metadata (``DefaultPredictor`` reads the same keys).
            num_threads: ONNX Runtime's intra-op threads (default: torch's thread count, so that
                the predictor and eager PyTorch use the same number of cores).
            providers: ONNX Runtime execution providers (default: CPU).
        """
        import onnxruntime as ort  # only the predictor needs it

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            model_path, options, providers=providers or ["CPUExecutionProvider"]
        )
        metadata = self.session.get_modelmeta().custom_metadata_map
        settings = read_settings(metadata, cfg)
        self.input_format = settings["input_format"]
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format!r}")
        self.aug = T.ResizeShortestEdge(
            [settings["min_size_test"], settings["min_size_test"]], settings["max_size_test"]
        )
        self.score_thresh = settings["score_thresh_test"]
        names = [o.name for o in self.session.get_outputs()]
        if tuple(names) != OUTPUT_NAMES or self.session.get_inputs()[0].name != INPUT_NAME:
            raise ValueError(
                f"{model_path} is not a graph written by sparse_rcnn.export: expected input "
                f"{INPUT_NAME!r} and outputs {OUTPUT_NAMES}, got "
                f"{[i.name for i in self.session.get_inputs()]} and {names}"
            )

    def run(self, image: np.ndarray) -> Instances:
        """Run the graph on one preprocessed image.

        Args:
            image: (C, H, W) float32 in ``input_format`` (the network's input resolution).

        Returns:
            Instances of ``image_size`` (H, W): pred_boxes (xyxy pixels of the input, not clipped),
            scores, pred_classes; the graph's top-k order (score, descending).
        """
        boxes, scores, classes = self.session.run(
            list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(image, dtype=np.float32)}
        )
        instances = Instances(tuple(image.shape[1:]))
        instances.pred_boxes = Boxes(torch.from_numpy(boxes))
        instances.scores = torch.from_numpy(scores)
        instances.pred_classes = torch.from_numpy(classes)
        if self.score_thresh > 0:
            instances = instances[instances.scores > self.score_thresh]
        return instances

    def __call__(self, original_image: np.ndarray) -> Dict[str, Instances]:
        """
        Args:
            original_image: (H, W, 3) image in BGR order, as ``DefaultPredictor`` takes it.

        Returns:
            {"instances": Instances} at the original (H, W).
        """
        if original_image.ndim != 3 or original_image.shape[2] != 3:
            raise ValueError(
                f"Expected an (H, W, 3) BGR image, got an array of shape {original_image.shape}"
            )
        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        height, width = original_image.shape[:2]
        image = self.aug.get_transform(original_image).apply_image(original_image)
        instances = self.run(image.astype("float32").transpose(2, 0, 1))
        return {"instances": detector_postprocess(instances, height, width)}


def read_settings(metadata: Dict[str, str], cfg=None) -> Dict:
    """The preprocessing settings: from ``cfg`` where given, else from the file's metadata."""
    if cfg is not None:
        sparse = cfg.MODEL.get("SPARSE_RCNN", None)
        return {
            "input_format": cfg.INPUT.FORMAT,
            "min_size_test": int(cfg.INPUT.MIN_SIZE_TEST),
            "max_size_test": int(cfg.INPUT.MAX_SIZE_TEST),
            "score_thresh_test": float(sparse.SCORE_THRESH_TEST) if sparse is not None else 0.0,
        }
    missing = [k for k in METADATA_KEYS if k not in metadata]
    if missing:
        raise ValueError(
            f"The ONNX file has no metadata {missing} (it was not written by sparse_rcnn.export): "
            "pass the config it was exported with, ONNXRuntimePredictor(path, cfg)."
        )
    return {
        "input_format": metadata["input_format"],
        "min_size_test": int(metadata["min_size_test"]),
        "max_size_test": int(metadata["max_size_test"]),
        "score_thresh_test": float(metadata["score_thresh_test"]),
    }
