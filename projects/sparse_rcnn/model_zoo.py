"""The configs that ship with the package, looked up by name as ``detectron2.model_zoo`` does.

    from sparse_rcnn import model_zoo
    cfg = model_zoo.get_config("sparse_rcnn_R_50_FPN_300pro_crop_3x.py")     # LazyConfig
    cfg = model_zoo.get_config("sparse_rcnn_R_50_FPN_300pro_crop_3x.yaml")   # yacs CfgNode
    model = model_zoo.get("sparse_rcnn_quick_cpu.py", weights="model_final.pth")  # eval mode

Names are paths relative to the repository's ``configs/``. An installed package (``pip install .``)
carries them as package data in ``sparse_rcnn/configs/`` (setup.py maps ``configs/`` there); in a
checkout or an editable install they are read from the repository's ``configs/``.
"""

import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
from detectron2.config import CfgNode

from .checkpoint import SafeDetectionCheckpointer, explain_checkpoint_errors, load_inference_weights
from .config_loader import config_reader, load_config

__all__ = ["configs_dir", "list_configs", "get_config_file", "get_config", "get"]

_CONFIG_SUFFIXES = (".py", ".yaml", ".yml")


def configs_dir() -> Path:
    """The folder of the packaged configs."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parents[1] / "configs"):
        if (candidate / "Base-SparseRCNN.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"No Sparse R-CNN configs next to {here}: reinstall the package (pip install .), which "
        "ships configs/ as package data, or run from a checkout of the repository."
    )


def list_configs() -> List[str]:
    """Names of every packaged model config (not the shared pieces under ``common/``)."""
    root = configs_dir()
    return sorted(
        p.name for p in root.iterdir() if p.suffix in _CONFIG_SUFFIXES and p.name[0] != "_"
    )


def get_config_file(config_path: str) -> str:
    """The real path of a packaged config.

    Args:
        config_path: a name relative to ``configs/``, e.g. "sparse_rcnn_R_50_FPN_100pro_3x.yaml"
            or "sparse_rcnn_R_50_FPN_100pro_3x.py".

    Returns:
        An absolute path.
    """
    root = configs_dir()
    path = (root / config_path).resolve()
    if root.resolve() not in path.parents or not path.is_file():
        raise RuntimeError(
            f"{config_path} is not a packaged config; available: {', '.join(list_configs())}"
        )
    return str(path)


def get_config(
    config_path: str, opts: Sequence = ()
) -> Union[CfgNode, "omegaconf.DictConfig"]:  # noqa: F821
    """A packaged config (``config_loader.load_config``): a yacs ``CfgNode`` with the Sparse R-CNN
    keys for ``.yaml``, a LazyConfig ``DictConfig`` for ``.py``; ``opts`` in the config's syntax
    (``KEY VALUE`` pairs for yaml, ``key=value`` for ``.py``)."""
    return load_config(get_config_file(config_path), opts)


def get(
    config_path: str,
    weights: Optional[str] = None,
    device: Optional[str] = None,
    *,
    training: bool = False,
    allow_unsafe: Optional[bool] = None,
):
    """A model built from a packaged config, ready for inference (eval mode) unless ``training``.

    Args:
        config_path: see :func:`get_config_file`.
        weights: a checkpoint to load (a path or a ``detectron2://`` / https URL; ``.pth``,
            ``.pkl`` or ``.safetensors``), read weights-only; default: none (the config's ImageNet
            initialisation is not loaded, nothing is downloaded). For inference it must provide
            every module of the model (``sparse_rcnn.checkpoint.InferenceCheckpointer``).
        device: default: "cuda" if available, else "cpu".
        training: return the model in training mode, loading ``weights`` as fine-tuning does
            (partial checkpoints with Detectron2's warnings).
        allow_unsafe: load a checkpoint that weights-only loading refuses (only files you trust);
            default ``$SPARSE_RCNN_ALLOW_UNSAFE_CHECKPOINT``.
    """
    run = config_reader(get_config(config_path))
    run.set_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = run.build_model()
    if weights:
        weights = os.fspath(weights)
        if training:
            with explain_checkpoint_errors(weights):
                SafeDetectionCheckpointer(model, allow_unsafe=allow_unsafe).load(weights)
        else:
            load_inference_weights(model, weights, key="weights", allow_unsafe=allow_unsafe)
    return model.train(training)
