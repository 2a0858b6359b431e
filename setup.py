"""Sparse R-CNN and Dynamic Sparse R-CNN for Detectron2.

The package lives in ``projects/sparse_rcnn`` and is imported as ``sparse_rcnn``; the repository's
``configs/`` ship inside it as ``sparse_rcnn/configs/`` (package data, found by
``sparse_rcnn.model_zoo``). Detectron2 itself is deliberately not listed in ``install_requires``:
install it from ``requirements.txt`` (the PyPI build ``sal-detectron2``) or bring your own source
build. Everything else the package imports is listed.
"""

from setuptools import setup

setup(
    name="sparse_rcnn",
    version="0.1.0",
    description="Sparse R-CNN and Dynamic Sparse R-CNN for Detectron2",
    python_requires=">=3.8",
    package_dir={"sparse_rcnn": "projects/sparse_rcnn", "sparse_rcnn.configs": "configs"},
    packages=["sparse_rcnn", "sparse_rcnn.configs"],
    # yaml configs and the shared LazyConfig pieces (the top-level .py configs are picked up as
    # the modules of sparse_rcnn.configs).
    package_data={"sparse_rcnn.configs": ["*.yaml", "common/*.py", "common/*/*.py"]},
    install_requires=[
        "torch",
        "torchvision",
        "numpy",
        "scipy",  # Hungarian matching
        "pycocotools",  # COCOEvaluator
        "fvcore",  # focal loss, param schedulers
        # cv2 (built-in dataset renderer, demo); the headless build, as in requirements.txt. With
        # another OpenCV build already installed, install with --no-deps.
        "opencv-python-headless",
        "omegaconf",  # LazyConfig configs
        "tabulate",  # sparse_rcnn.report
        "safetensors",  # MODEL.WEIGHTS *.safetensors (sparse_rcnn.checkpoint)
    ],
    # Detectron2's ViT blocks (configs/sparse_rcnn_vitdet_*.py) and Swin's drop path import timm.
    extras_require={"transformers": ["timm"]},
)
