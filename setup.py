"""Sparse R-CNN and Dynamic Sparse R-CNN for Detectron2.

The package lives in ``projects/sparse_rcnn`` and is imported as ``sparse_rcnn``. Detectron2 itself is
deliberately not listed in ``install_requires``: install it from ``requirements.txt`` (the PyPI build
``sal-detectron2``) or bring your own source build.
"""
from setuptools import setup

setup(
    name="sparse_rcnn",
    version="0.1.0",
    description="Sparse R-CNN and Dynamic Sparse R-CNN for Detectron2",
    python_requires=">=3.8",
    package_dir={"sparse_rcnn": "projects/sparse_rcnn"},
    packages=["sparse_rcnn"],
    install_requires=["torch", "torchvision", "numpy", "scipy", "pycocotools", "fvcore"],
)
