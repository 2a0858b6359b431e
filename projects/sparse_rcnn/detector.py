"""The Sparse R-CNN meta-architecture.

images -> backbone (ResNet-FPN, P2-P5) -> proposal boxes and features -> T iterative stages ->
per-stage predictions -> matcher + set loss (training) or top-k post-processing (inference).
"""

import functools
import logging
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torch.nn import functional as F
from torchvision.ops import nms

from .criterion import build_criterion, prepare_targets
from .head import build_sparse_rcnn_head
from .mask_head import QueryInstMaskHead
from .proposals import build_proposal_generator
from .tracing import is_exporting, is_tracing, sizes_to_tensor

__all__ = ["SparseRCNN", "OFFICIAL_KEY_RENAMES"]

logger = logging.getLogger(__name__)

# Official checkpoint key prefix -> ours. The official model keeps the learnable proposals at the
# top level; ours keeps them in the proposal generator. Everything else has the official names.
OFFICIAL_KEY_RENAMES = {
    "init_proposal_boxes.": "proposal_generator.init_proposal_boxes.",
    "init_proposal_features.": "proposal_generator.init_proposal_features.",
}


@META_ARCH_REGISTRY.register()
class SparseRCNN(nn.Module):
    """Sparse R-CNN (Sun et al., CVPR 2021) and, through its proposal generator and matcher,
    Dynamic Sparse R-CNN (Hong et al., CVPR 2022); with a mask head, QueryInst (Fang et al.,
    ICCV 2021) on either."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        proposal_generator: nn.Module,
        head: nn.Module,
        criterion: nn.Module,
        in_features: List[str],
        num_classes: int,
        pixel_mean: Tuple[float, float, float],
        pixel_std: Tuple[float, float, float],
        score_thresh_test: float = 0.0,
        nms_thresh_test: Optional[float] = None,
        detections_per_image: int = 0,
        output_all_stages: bool = False,
        mask_head: Optional[nn.Module] = None,
    ):
        """
        Args:
            backbone: a Detectron2 backbone whose outputs include ``in_features``.
            proposal_generator: ``(features, image_whwh) -> (boxes (B,N,4), features (B,N,C))``.
            head: the iterative head, ``(features, boxes, proposal_features) -> per-stage dicts``.
            criterion: ``(stage_outputs, targets) -> loss dict``.
            in_features: backbone features the head pools from (p2-p5).
            num_classes: K.
            pixel_mean, pixel_std: per-channel normalisation, in the input format's channel order.
            score_thresh_test: detections with a score not above this are dropped at inference.
            nms_thresh_test: IoU of class-aware NMS at inference; None disables NMS.
            detections_per_image: at most this many detections per image (the best ones);
                0: the number of proposals, the official behaviour (see :meth:`topk_detections`).
            output_all_stages: at inference also return every stage's detections as
                "stage_instances" (a list, stage 1 first), for per-stage evaluation (paper figure 6
                of Dynamic Sparse R-CNN). Off by default: it computes every stage's class logits.
            mask_head: QueryInst's mask branches (:class:`QueryInstMaskHead`), or None (boxes
                only). Training adds every stage's mask loss; inference adds "pred_masks".
        """
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.head = head
        self.criterion = criterion
        self.in_features = in_features
        self.num_classes = num_classes
        self.score_thresh_test = score_thresh_test
        self.nms_thresh_test = nms_thresh_test
        if detections_per_image < 0:
            raise ValueError(
                "TEST.DETECTIONS_PER_IMAGE (LazyConfig: model.detections_per_image) must be >= 0 "
                f"(0: the number of proposals), got {detections_per_image}"
            )
        self.detections_per_image = int(detections_per_image)
        self.output_all_stages = output_all_stages
        self.mask_head = mask_head
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        if not hasattr(cfg.MODEL, "SPARSE_RCNN"):
            raise KeyError(
                "cfg.MODEL.SPARSE_RCNN is missing: call sparse_rcnn.add_sparse_rcnn_config(cfg) "
                "before merging a Sparse R-CNN config file."
            )
        backbone = build_backbone(cfg)
        input_shape = backbone.output_shape()
        c = cfg.MODEL.SPARSE_RCNN
        return {
            "backbone": backbone,
            "proposal_generator": build_proposal_generator(cfg, input_shape),
            "head": build_sparse_rcnn_head(cfg, input_shape),
            "criterion": build_criterion(cfg),
            "in_features": list(cfg.MODEL.ROI_HEADS.IN_FEATURES),
            "num_classes": c.NUM_CLASSES,
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "score_thresh_test": c.SCORE_THRESH_TEST,
            "nms_thresh_test": c.NMS_THRESH_TEST if c.NMS_ENABLED else None,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "output_all_stages": c.EVAL_PER_STAGE,
            "mask_head": QueryInstMaskHead(cfg, input_shape) if cfg.MODEL.MASK_ON else None,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.mask_head is not None and not any(
            k.startswith(prefix + "mask_head.") for k in state_dict
        ):
            logger.warning(
                "The checkpoint has no mask head weights (mask_head.*): QueryInst's mask head "
                "(MODEL.MASK_ON) keeps its random initialisation, so its masks mean nothing until "
                "it is trained (expected when starting from an ImageNet backbone or a box-only "
                "Sparse R-CNN checkpoint)."
            )
        # Official checkpoints keep the learnable proposals at the top level; rename them to ours
        # (OFFICIAL_KEY_RENAMES). DetectionCheckpointer checks shapes before this renaming, so a
        # renamed tensor of the wrong shape is skipped here with the same warning it would give.
        own_state = self.state_dict(keep_vars=True)
        for key in list(state_dict.keys()):
            for old, new in OFFICIAL_KEY_RENAMES.items():
                if not key.startswith(prefix + old):
                    continue
                new_key = prefix + new + key[len(prefix + old) :]
                value = state_dict.pop(key)
                expected = own_state.get(new_key[len(prefix) :])
                if expected is not None and tuple(expected.shape) != tuple(value.shape):
                    logger.warning(
                        f"Skip loading parameter '{key}' (as '{new_key}'): the checkpoint has shape "
                        f"{tuple(value.shape)}, the model {tuple(expected.shape)} (check "
                        "MODEL.SPARSE_RCNN.NUM_PROPOSALS and HIDDEN_DIM)."
                    )
                    continue
                state_dict.setdefault(new_key, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def preprocess_image(self, batched_inputs: List[Dict]) -> Tuple[ImageList, torch.Tensor]:
        """Normalise and pad the images; return them with each one's unpadded (w, h, w, h)."""
        images = []
        for i, x in enumerate(batched_inputs):
            image = x["image"]
            # Checked in eager mode only: while tracing, sizes are tensors, and a Python test on
            # them would freeze them into the trace.
            if not is_tracing():
                self._check_image(image, i)
            images.append((image.to(self.device) - self.pixel_mean) / self.pixel_std)
        if is_exporting() and len(images) == 1:
            images = _pad_symbolic(images[0], self.backbone.size_divisibility)
        else:
            images = ImageList.from_tensors(
                images,
                self.backbone.size_divisibility,
                padding_constraints=self.backbone.padding_constraints,
            )
        return images, _image_whwh(images.image_sizes, self.device)

    def _check_image(self, image: torch.Tensor, index: int) -> None:
        if image.dim() != 3 or image.shape[0] != self.pixel_mean.shape[0]:
            raise ValueError(
                f"Expected each input 'image' as a ({self.pixel_mean.shape[0]}, H, W) tensor, "
                f"got shape {tuple(image.shape)} (input {index})"
            )
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"Input image has zero size: {tuple(image.shape)} (input {index})")

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: a list, one dict per image, as Detectron2's DatasetMapper outputs:
                "image" (C, H, W) in cfg.INPUT.FORMAT, "instances" (training: gt_boxes, gt_classes,
                and gt_masks with a mask head), optional "height"/"width" of the output.

        Returns:
            Training: dict of weighted losses ``loss_{cls,l1,giou}_stage{t}`` (and
            ``loss_mask_stage{t}`` with a mask head).
            Inference: list of {"instances": Instances with pred_boxes, scores, pred_classes}
            (see :meth:`inference`).
        """
        validate_batched_inputs(batched_inputs, self.training)
        if not self.training:
            return self.inference(batched_inputs)
        images, image_whwh = self.preprocess_image(batched_inputs)
        features, proposal_boxes, proposal_features = self._features_and_proposals(
            images, image_whwh
        )
        gt_instances = [x["instances"] for x in batched_inputs]
        check_gt_classes(batched_inputs, self.num_classes)
        targets = prepare_targets(gt_instances, self.device)
        if self.mask_head is not None:
            return self._losses_with_masks(features, proposal_boxes, proposal_features, targets)
        stage_outputs = self.head(features, proposal_boxes, proposal_features)
        return self.criterion(stage_outputs, targets)

    def _losses_with_masks(self, features, proposal_boxes, proposal_features, targets):
        """The box losses and every stage's mask loss on its matched positives (QueryInst)."""
        stage_outputs = self.head(
            features, proposal_boxes, proposal_features, with_attention_features=True
        )
        # The criterion calls mask_predictor(boxes, queries, stage) for every supervised stage.
        mask_predictor = functools.partial(self.mask_head, self.mask_head.prepare(features))
        return self.criterion(stage_outputs, targets, mask_predictor)

    def _features_and_proposals(self, images: ImageList, image_whwh: torch.Tensor):
        """Backbone features (the ``in_features`` levels) and the stage-1 proposals."""
        features = self.backbone(images.tensor)
        features = [features[f] for f in self.in_features]
        proposal_boxes, proposal_features = self.proposal_generator(features, image_whwh)
        return features, proposal_boxes, proposal_features

    def inference(
        self,
        batched_inputs: List[Dict],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
    ):
        """Run inference on the given inputs (Detectron2's ``GeneralizedRCNN.inference`` contract).

        Args:
            batched_inputs: as in :meth:`forward`.
            detected_instances: if not None, one Instances per image with known ``pred_boxes``
                and ``pred_classes``: box detection is skipped and they are returned as the
                results. Nothing is added to them: Sparse R-CNN has no other per-box outputs, and
                QueryInst's mask head needs each detection's own query, which given boxes lack.
            do_postprocess: whether to rescale the detections to the requested output size
                ("height"/"width" of each input) with ``detector_postprocess``. TTA and export
                call it with False and post-process themselves.

        Returns:
            ``do_postprocess=True``: a list of {"instances": Instances} in the output resolution,
            plus "stage_instances" (every stage's, stage 1 first) with ``output_all_stages``.
            ``do_postprocess=False``: a list of Instances of the final stage in the resolution of
            the network's input (each image's unpadded size), not clipped.
        """
        assert not self.training
        if len(batched_inputs) == 0:
            return []
        images, image_whwh = self.preprocess_image(batched_inputs)
        if detected_instances is not None:
            results = [x.to(self.device) for x in detected_instances]
            if not do_postprocess:
                return results
            return self._postprocess(results, batched_inputs, images.image_sizes)

        features, proposal_boxes, proposal_features = self._features_and_proposals(
            images, image_whwh
        )
        if self.mask_head is not None:
            return self._inference_with_masks(
                features, proposal_boxes, proposal_features, batched_inputs, images, do_postprocess
            )
        all_stages = self.output_all_stages and do_postprocess
        stages = None if all_stages else [self.head.num_stages - 1]
        stage_outputs = self.head(features, proposal_boxes, proposal_features, stages)
        if not all_stages:
            stage_outputs = stage_outputs[-1:]
        per_stage = [
            self.topk_detections(out["pred_logits"], out["pred_boxes"], images.image_sizes)
            for out in stage_outputs
        ]
        return self._finish_inference(per_stage, batched_inputs, images, do_postprocess)

    def _inference_with_masks(
        self, features, proposal_boxes, proposal_features, batched_inputs, images, do_postprocess
    ):
        """:meth:`inference` with QueryInst's masks: each stage's detections (the last stage's,
        or every stage's with ``output_all_stages``) get "pred_masks" (R, 1, M, M), the sigmoid of
        the mask of the detection's class from that stage's mask head, on the detection's box
        clipped to the image (as ``detector_postprocess`` clips it before pasting the mask)."""
        all_stages = self.output_all_stages and do_postprocess
        last = self.head.num_stages - 1
        stage_indices = list(range(self.head.num_stages)) if all_stages else [last]
        stage_outputs = self.head(
            features,
            proposal_boxes,
            proposal_features,
            None if all_stages else [last],
            with_attention_features=True,
        )
        mask_features = self.mask_head.prepare(features)
        per_stage = []
        for stage in stage_indices:
            out = stage_outputs[stage]
            results = self.topk_detections(
                out["pred_logits"], out["pred_boxes"], images.image_sizes, True
            )
            boxes, queries = [], []
            for result, attention in zip(results, out["attn_features"]):
                image_whwh = _image_whwh([result.image_size], self.device)
                boxes.append(torch.min(result.pred_boxes.tensor.clamp(min=0), image_whwh))
                queries.append(attention[result.proposal_indices])
                result.remove("proposal_indices")
            logits = self.mask_head(mask_features, boxes, torch.cat(queries), stage)
            classes = torch.cat([r.pred_classes for r in results])
            masks = logits[torch.arange(len(classes), device=logits.device), classes]
            for result, mask in zip(
                results, masks.sigmoid()[:, None].split([len(r) for r in results])
            ):
                result.pred_masks = mask
            per_stage.append(results)
        return self._finish_inference(per_stage, batched_inputs, images, do_postprocess)

    def _finish_inference(self, per_stage, batched_inputs, images, do_postprocess):
        """The final stage's raw detections, or every stage's post-processed ones (see
        :meth:`inference`)."""
        all_stages = self.output_all_stages and do_postprocess
        if not do_postprocess:
            return per_stage[-1]
        processed = [self._postprocess(r, batched_inputs, images.image_sizes) for r in per_stage]
        results = processed[-1]
        if all_stages:
            for index, result in enumerate(results):
                result["stage_instances"] = [stage[index]["instances"] for stage in processed]
        return results

    def topk_detections(
        self,
        box_cls: torch.Tensor,
        box_pred: torch.Tensor,
        image_sizes: List[Tuple[int, int]],
        with_proposal_indices: bool = False,
    ) -> List[Instances]:
        """Top-k over (proposals x classes), sorted by score; then the score threshold, class-aware
        NMS if enabled, and the first ``detections_per_image``.

        The candidates are the top max(N, ``detections_per_image``) (N proposals; the official
        code keeps the top N and nothing else). Cutting after the threshold and NMS makes the
        detections with any ``detections_per_image`` a prefix of those with a larger one: the key
        changes how many detections an image gets, never which (greedy NMS only ever suppresses a
        box by a higher-scoring one, so the boxes below the cut do not change what is above it).

        Args:
            box_cls: (B, N, K) class logits; box_pred: (B, N, 4) xyxy pixels.
            image_sizes: unpadded (h, w) of every image.
            with_proposal_indices: also return each detection's proposal index (0 ... N - 1) as
                ``proposal_indices`` (the mask head reads the detection's query).

        Returns:
            B Instances of ``image_size`` (h, w) with pred_boxes, scores, pred_classes.
        """
        results = []
        for logits, boxes, image_size in zip(box_cls, box_pred, image_sizes):
            boxes, scores, classes, proposal_idx = self._select(logits, boxes, image_size)
            result = Instances(image_size)
            result.pred_boxes = Boxes(boxes)
            result.scores = scores
            result.pred_classes = classes
            if with_proposal_indices:
                result.proposal_indices = proposal_idx
            results.append(result)
        return results

    def select_detections(
        self, logits: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image's detections as tensors (what :meth:`topk_detections` puts into Instances,
        and what an exported graph returns).

        Args:
            logits: (N, K) class logits; boxes: (N, 4) xyxy pixels.
            image_size: unpadded (h, w) of the image.

        Returns:
            boxes (D, 4) float32, scores (D,), classes (D,) int64, score descending; D is at most
            ``detections_per_image`` (default: N).
        """
        return self._select(logits, boxes, image_size)[:3]

    def _select(
        self, logits: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`select_detections` and each detection's proposal index (D,) in 0 ... N - 1."""
        num_proposals = logits.shape[0]
        max_detections = self.detections_per_image or num_proposals
        scores = torch.sigmoid(logits.float()).flatten()  # (N * K,)
        num_candidates = min(max(num_proposals, max_detections), scores.shape[0])
        topk_scores, topk_indices = scores.topk(num_candidates)
        proposal_idx = topk_indices // self.num_classes
        classes = topk_indices % self.num_classes
        boxes = boxes[proposal_idx].float()
        keep = topk_scores > self.score_thresh_test
        topk_scores, boxes, classes = topk_scores[keep], boxes[keep], classes[keep]
        proposal_idx = proposal_idx[keep]
        if self.nms_thresh_test is not None:
            # Clip first (as Detectron2's own inference does) so that NMS sees the final boxes:
            # Boxes.clip's clamp(0, w) / clamp(0, h), with the size as a tensor (traceable).
            image_whwh = _image_whwh([image_size], boxes.device)
            boxes = torch.min(boxes.clamp(min=0), image_whwh)
            keep = _batched_nms(boxes, topk_scores, classes, self.nms_thresh_test)
            topk_scores, boxes, classes = topk_scores[keep], boxes[keep], classes[keep]
            proposal_idx = proposal_idx[keep]
        if max_detections < num_candidates:
            topk_scores, boxes, classes, proposal_idx = (
                topk_scores[:max_detections],
                boxes[:max_detections],
                classes[:max_detections],
                proposal_idx[:max_detections],
            )
        return boxes, topk_scores, classes, proposal_idx

    @staticmethod
    def _postprocess(
        instances: List[Instances], batched_inputs: List[Dict], image_sizes
    ) -> List[Dict[str, Instances]]:
        """Rescale to the requested output size ("height"/"width") and clip to the image."""
        processed = []
        for result, input_per_image, image_size in zip(instances, batched_inputs, image_sizes):
            height = input_per_image.get("height", image_size[0])
            width = input_per_image.get("width", image_size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed


def _image_whwh(image_sizes, device) -> torch.Tensor:
    """(B, 4) float32 (w, h, w, h) of the (h, w) ``image_sizes``: Python ints in eager mode, 0-dim
    tensors or symbolic ints in a trace or export (kept tied to the input, not frozen)."""
    return torch.stack([sizes_to_tensor([w, h, w, h], device) for h, w in image_sizes])


def _pad_symbolic(image: torch.Tensor, size_divisibility: int) -> ImageList:
    """``ImageList.from_tensors([image], size_divisibility)`` for ``torch.export``: the padded
    size by integer arithmetic on the (symbolic) shape, which ``from_tensors`` turns into a tensor
    and so freezes."""
    height, width = image.shape[-2:]
    stride = max(int(size_divisibility), 1)
    padded_h = (height + stride - 1) // stride * stride
    padded_w = (width + stride - 1) // stride * stride
    padded = F.pad(image, [0, padded_w - width, 0, padded_h - height], value=0.0)
    return ImageList(padded[None], [(height, width)])


def _batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Class-aware NMS: Detectron2's ``batched_nms`` in eager mode; while tracing or exporting, the
    same coordinate trick that torchvision's ``batched_nms`` uses for fewer than 1000 boxes, written
    without its ``if boxes.numel() == 0`` (which a trace would freeze). The boxes are clipped
    (>= 0), so padding the maximum with a 0 leaves it unchanged and makes it defined for no boxes.
    """
    if not is_tracing():
        return batched_nms(boxes, scores, classes, iou_threshold)
    boxes = boxes.float()
    max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = classes.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def validate_batched_inputs(batched_inputs, training: bool) -> None:
    """Check the model's input: a list with one dict per image, each with an "image" tensor
    (and "instances" in training). Raises TypeError/ValueError naming the input."""
    if not isinstance(batched_inputs, (list, tuple)):
        raise TypeError(
            "SparseRCNN expects a list of dicts, one per image (each with 'image': a (C, H, W) "
            f"tensor), got {type(batched_inputs).__name__}"
        )
    if training and len(batched_inputs) == 0:
        raise ValueError("SparseRCNN training got an empty list of inputs (batch of 0 images)")
    for i, x in enumerate(batched_inputs):
        if not isinstance(x, dict) or "image" not in x:
            got = f"a dict with keys {sorted(x)}" if isinstance(x, dict) else type(x).__name__
            raise ValueError(
                f"SparseRCNN input {i}: expected a dict with 'image' (a (C, H, W) tensor), got {got}"
            )
        if not isinstance(x["image"], torch.Tensor):
            raise TypeError(
                f"SparseRCNN input {i}: 'image' must be a (C, H, W) torch.Tensor, got "
                f"{type(x['image']).__name__} (convert with torch.as_tensor(img.transpose(2, 0, 1)))"
            )
        if training and "instances" not in x:
            raise ValueError(f"SparseRCNN training needs 'instances' in every input (input {i})")


def check_gt_classes(batched_inputs: List[Dict], num_classes: int) -> None:
    """Raise a ValueError naming the id, the image and the number of classes when a training
    target's ``gt_classes`` is outside [0, num_classes) (which would otherwise fail deep inside the
    matcher with an IndexError). One comparison over the whole batch.

    Args:
        batched_inputs: the training inputs, each with "instances" (gt_classes (G_i,) int64).
        num_classes: K, the model's number of classes.
    """
    classes = [x["instances"].gt_classes for x in batched_inputs]
    if not classes:
        return
    every = torch.cat([c.reshape(-1) for c in classes])
    if not bool(((every < 0) | (every >= num_classes)).any()):
        return
    for index, (x, c) in enumerate(zip(batched_inputs, classes)):
        bad = c[(c < 0) | (c >= num_classes)]
        if len(bad):
            image = x.get("file_name", x.get("image_id", f"input {index} of the batch"))
            raise ValueError(
                f"SparseRCNN training: image {image} has gt_classes id {int(bad[0])}, outside "
                f"[0, {num_classes}) = the model's classes (MODEL.SPARSE_RCNN.NUM_CLASSES / "
                f"model.num_classes {num_classes}). Set it to the dataset's number of classes, "
                "or map the dataset's ids to 0 ... K-1."
            )
