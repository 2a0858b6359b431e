"""``SparseRCNNPredictor``: Detectron2's ``DefaultPredictor`` (same constructor and call) whose
weights are loaded weights-only and must fit the model, and whose input image is checked.

    from sparse_rcnn.predictor import SparseRCNNPredictor
    predictor = SparseRCNNPredictor(cfg)              # cfg.MODEL.WEIGHTS: .pth, .pkl, .safetensors
    outputs = predictor(cv2.imread("input.jpg"))      # (H, W, 3) BGR uint8

``DefaultPredictor`` loads ``MODEL.WEIGHTS`` with Detectron2's checkpointer, which unpickles
anything the file holds (on PyTorch < 2.6) and only warns about weights it could not load. Here the
load is :func:`sparse_rcnn.checkpoint.load_inference_weights`: a missing file names the path, a
file holding code is refused, and a checkpoint that leaves the model, a whole module or the
classifier untrained is an error (docs/checkpoints.md).
"""

from typing import Optional

import numpy as np
import torch
from detectron2.data import MetadataCatalog, transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from .checkpoint import load_inference_weights

__all__ = ["SparseRCNNPredictor", "check_image"]


def check_image(image) -> None:
    """Raise TypeError / ValueError naming the problem and the fix unless ``image`` is an
    (H, W, 3) numpy array, as ``DefaultPredictor`` takes it."""
    if image is None:
        raise TypeError(
            "The image is None: cv2.imread returns None for a file it cannot read (a wrong path "
            "or an unsupported format). Check the path; detectron2.data.detection_utils."
            "read_image(path, format='BGR') raises an error naming the file instead."
        )
    if isinstance(image, torch.Tensor):
        raise TypeError(
            "The image is a torch.Tensor: the predictor takes a numpy (H, W, 3) BGR array, e.g. "
            "image.permute(1, 2, 0).numpy() for a (3, H, W) tensor (and [:, :, ::-1] if RGB)."
        )
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"The image is a {type(image).__name__}: the predictor takes a numpy (H, W, 3) BGR "
            "array, e.g. cv2.imread(path), or np.asarray(pil_image)[:, :, ::-1] for a PIL image."
        )
    if image.ndim == 2:
        raise ValueError(
            f"The image has shape {image.shape}, a grayscale (H, W) image: the predictor takes "
            "(H, W, 3) BGR. Convert it with cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) or read the "
            "file with cv2.imread(path), which gives 3 channels."
        )
    if image.ndim != 3 or image.shape[2] != 3:
        if image.ndim == 3 and image.shape[2] == 4:
            fix = "drop the alpha channel: cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)"
        elif image.ndim == 3 and image.shape[2] == 1:
            fix = "convert it: cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)"
        elif image.ndim == 3 and image.shape[0] in (1, 3, 4):
            fix = "it looks channels-first: image.transpose(1, 2, 0)"
        else:
            fix = "give one (H, W, 3) BGR image"
        raise ValueError(
            f"The image has shape {image.shape}: the predictor takes (H, W, 3) BGR; {fix}."
        )
    if image.size == 0:
        raise ValueError(f"The image has shape {image.shape}: it is empty.")


class SparseRCNNPredictor(DefaultPredictor):
    """``DefaultPredictor`` (one BGR image in, the model's output dict out; resize by
    ``INPUT.MIN/MAX_SIZE_TEST``, ``INPUT.FORMAT``) with a safe, complete weights load and checked
    images (module doc).

    Args:
        cfg: a Detectron2 config with the Sparse R-CNN keys; ``MODEL.WEIGHTS`` "" leaves the
            model untrained.
        allow_unsafe: load a checkpoint that weights-only loading refuses (only files you trust);
            default ``$SPARSE_RCNN_ALLOW_UNSAFE_CHECKPOINT``.
    """

    def __init__(self, cfg, *, allow_unsafe: Optional[bool] = None):
        # DefaultPredictor.__init__, with our load instead of DetectionCheckpointer's.
        self.cfg = cfg.clone()  # cfg can be modified by model
        self.model = build_model(self.cfg)
        self.model.eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        load_inference_weights(self.model, cfg.MODEL.WEIGHTS, allow_unsafe=allow_unsafe)
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT {self.input_format!r}: the predictor takes RGB or BGR")

    def __call__(self, original_image: np.ndarray):
        """Args:
            original_image: (H, W, 3) image in BGR order.

        Returns:
            The model's output for the image (``{"instances": Instances}``).
        """
        check_image(original_image)
        return super().__call__(original_image)
