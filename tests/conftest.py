"""Shared helpers of the test suite. Tests never read ../shared: facts live in tests/data."""

import copy
import logging
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DATA_DIR = Path(__file__).resolve().parent / "data"
TINY_CONFIG = CONFIG_DIR / "sparse_rcnn_tiny_cpu.yaml"
PARITY_DIR = DATA_DIR / "parity"


def make_cfg(config_file=TINY_CONFIG, opts=()):
    """The config of ``config_file`` with our keys and ``opts``, on the CPU."""
    from sparse_rcnn.config import get_sparse_rcnn_cfg

    return get_sparse_rcnn_cfg(config_file, [*opts, "MODEL.DEVICE", "cpu"])


def build_tiny_model(opts=(), seed=0):
    """The tiny CPU model of ``configs/sparse_rcnn_tiny_cpu.yaml``, with a fixed seed."""
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    return build_model(make_cfg(TINY_CONFIG, opts))


def perturbed_tiny(seed=7, opts=()):
    """The tiny model with weights moved away from their initialisation (every path matters)."""
    model = build_tiny_model(opts=opts, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.02)
        boxes = model.proposal_generator.init_proposal_boxes.weight
        boxes.copy_(torch.rand(boxes.shape, generator=gen) * 0.5 + 0.25)
    return model


def registered_synthetic_shapes(tmp_path_factory, prefix, splits, image_size=96):
    """Generator for module fixtures: small synthetic_shapes splits registered as
    ``{prefix}_{split}`` under a temporary root (yields the root), unregistered afterwards."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from sparse_rcnn.builtin_datasets import register_synthetic_shapes

    root = tmp_path_factory.mktemp(f"{prefix}_datasets")
    names = register_synthetic_shapes(root, splits=splits, image_size=image_size, prefix=prefix)
    yield root
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores run the whole suite; keep each test on one thread so parallel jobs do not thrash.
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SPARSE_RCNN_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


def pytest_configure(config):
    # A deprecated API called from our own code fails the suite, on every stack (the current one
    # deprecates what the pinned one still offers); Detectron2's and fvcore's warnings are theirs.
    for category in ("FutureWarning", "DeprecationWarning"):
        config.addinivalue_line("filterwarnings", f"error::{category}:sparse_rcnn")


class Records(logging.Handler):
    """Collects the records of one logger (setup_logger turns propagation off, so caplog, which
    listens at the root, would miss them)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    @property
    def messages(self):
        return [r.getMessage() for r in self.records]


@pytest.fixture
def records():
    """attach(name) -> a :class:`Records` of the logger ``name`` (removed after the test)."""
    handlers = []

    def attach(name):
        handler = Records()
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        handlers.append((logger, handler, logger.level))
        logger.setLevel(logging.DEBUG)
        return handler

    yield attach
    for logger, handler, level in handlers:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def fake_dataset():
    """Register datasets of records (no image files needed: the checks run before mapping)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = []

    def register(name, records, thing_classes=None):
        DatasetCatalog.register(name, lambda: copy.deepcopy(records))
        if thing_classes is not None:
            MetadataCatalog.get(name).set(thing_classes=thing_classes)
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
