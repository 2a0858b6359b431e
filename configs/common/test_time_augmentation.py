"""Test-time augmentation (``sparse_rcnn.test_time_augmentation.SparseRCNNWithTTA``) with the
official settings, the LazyConfig twin of the yaml ``TEST.AUG.*`` keys: 13 scales x 2 flips, the
per-scale box-size filter, soft box voting. ``tta.enabled=True``: ``train_net.py --eval-only`` and
the end of training also evaluate with TTA, reported as "bbox_TTA" (files in
``{train.output_dir}/inference_TTA``). Override any setting as ``tta.model.min_sizes=[400,800]``.
"""

from detectron2.config import LazyCall as L

from sparse_rcnn.test_time_augmentation import (
    OFFICIAL_MIN_SIZES,
    OFFICIAL_SCALE_RANGES,
    SparseRCNNWithTTA,
)

tta = dict(
    enabled=False,
    model=L(SparseRCNNWithTTA)(
        model=None,  # the model to evaluate, set by train_net.py
        min_sizes=OFFICIAL_MIN_SIZES,
        max_size=4000,
        flip=True,
        scale_ranges=OFFICIAL_SCALE_RANGES,  # null: no per-scale box-size filter
        merge="soft_vote",
        vote_thresh=0.65,
        soft_vote_min_score=0.05,
        nms_thresh=0.5,
        # Merged detections kept per image; null: the model's detections_per_image (0 there: the
        # number of proposals, the official), as the yaml TEST.DETECTIONS_PER_IMAGE.
        max_detections=None,
        batch_size=2,
        input_format="${dataloader.test.mapper.image_format}",
    ),
)
