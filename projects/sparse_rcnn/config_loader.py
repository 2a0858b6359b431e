"""One config loader for both of Detectron2's config systems, shared by ``train_net.py``, the
demo, export and the model zoo.

* :func:`load_config` reads a yaml config (a yacs ``CfgNode`` with the Sparse R-CNN keys,
  overridden by ``KEY VALUE`` pairs) or a LazyConfig (``.py``, overridden by ``key=value`` as in
  Detectron2's ``lazyconfig_train_net.py``).
* :func:`config_reader` wraps either in a :class:`ConfigReader`: the settings the entry points
  read (device, weights, output folder, schedule, ...) and the pieces they build (model,
  optimizer, loaders, evaluator, LR schedule, TTA model), each built by the same function or class
  in both systems. A yaml config calls them with ``cfg`` (they are ``@configurable``); a
  LazyConfig names them in its nodes (``configs/common/``). Only how a setting is read differs.

The keys of each system: docs/configs.md.
"""

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import CfgNode, LazyConfig, instantiate
from omegaconf import DictConfig, OmegaConf

from .config import get_sparse_rcnn_cfg
from .dataset_checks import dataset_names

__all__ = [
    "ConfigReader",
    "LazyConfigReader",
    "YamlConfigReader",
    "config_reader",
    "is_lazy_config",
    "load_config",
    "require_keys",
]

logger = logging.getLogger(__name__)

YAML_SUFFIXES = (".yaml", ".yml")


def is_lazy_config(config_file) -> bool:
    """Whether ``config_file`` is a LazyConfig (``.py``); yaml configs end in ``.yaml``/``.yml``."""
    return str(config_file).endswith(".py")


def load_config(config_file, opts: Sequence = ()) -> Union[CfgNode, DictConfig]:
    """A config of either system with its command-line options applied.

    Args:
        config_file: a ``.yaml``/``.yml`` file (yacs, with the Sparse R-CNN keys) or a ``.py``
            LazyConfig.
        opts: yaml: ``[KEY, VALUE, ...]`` (values may be strings or Python values); LazyConfig:
            ``["key=value", ...]`` (Hydra override syntax).

    Returns:
        A yacs ``CfgNode`` (not frozen) or a LazyConfig ``DictConfig``.

    Raises:
        ValueError: options in the other system's syntax, or a file of another kind.
    """
    opts = list(opts)
    path = str(config_file)
    if is_lazy_config(path):
        pairs = [o for o in opts if not (isinstance(o, str) and "=" in o)]
        if pairs:
            raise ValueError(
                f"A LazyConfig (.py) takes key=value overrides, got {pairs[0]!r} ({path}): e.g. "
                "train.init_checkpoint=output/model_final.pth (KEY VALUE pairs are for yaml "
                "configs)."
            )
        return LazyConfig.apply_overrides(LazyConfig.load(path), opts)
    if not path.endswith(YAML_SUFFIXES):
        raise ValueError(f"{path}: a config is a .yaml/.yml (yacs) or a .py (LazyConfig) file.")
    if len(opts) % 2 and any(isinstance(o, str) and "=" in o for o in opts):
        raise ValueError(
            f"A yaml config takes KEY VALUE pairs, got {opts} ({path}): e.g. MODEL.WEIGHTS "
            "output/model_final.pth (key=value overrides are for .py LazyConfigs)."
        )
    return get_sparse_rcnn_cfg(path, opts)


def require_keys(cfg, keys: Sequence[str], what: str = "this command") -> None:
    """A LazyConfig must define ``keys`` (e.g. "model", "dataloader", "train") for ``what``."""
    if isinstance(cfg, CfgNode):
        return
    for key in keys:
        if key not in cfg:
            raise KeyError(
                f"The LazyConfig has no '{key}', which {what} needs: see configs/*.py and "
                "docs/configs.md."
            )


def _instantiate_with(node, **overrides):
    """``instantiate(node)`` with some arguments replaced (the config itself is not changed)."""
    spec = OmegaConf.to_container(node, resolve=True)
    spec.update(overrides)
    return instantiate(spec)


def _single_resize(augmentations, key: str):
    resize = augmentations[0] if len(augmentations) == 1 else None
    from detectron2.data import transforms as T

    if not isinstance(resize, T.ResizeShortestEdge):
        raise ValueError(
            f"{key}={augmentations}: the predictor resizes with one ResizeShortestEdge, as "
            "configs/common/data/coco.py's test mapper."
        )
    return resize


class ConfigReader:
    """What the entry points read from a config and the pieces they build from it.

    Attributes:
        cfg: the config (yacs ``CfgNode`` or LazyConfig ``DictConfig``).
        lazy: whether it is a LazyConfig.
        keys: setting -> the config key that sets it, for messages ("device", "weights",
            "num_classes", "amp", "lr", "ims_per_batch", "output_dir").
        assign: how a command line sets a key: " " (yaml ``KEY VALUE``) or "=" (``key=value``).
    """

    lazy = False
    keys: Dict[str, str] = {}
    assign = " "

    def __init__(self, cfg):
        self.cfg = cfg

    def option(self, key: str, value) -> str:
        """The command-line option that sets setting ``key`` to ``value``."""
        return f"{self.keys[key]}{self.assign}{value}"

    # ---- settings -------------------------------------------------------------------------
    device: str
    weights: str
    output_dir: str
    max_iter: int
    amp: bool
    num_classes: int
    eval_period: int
    log_period: int
    tta_enabled: bool

    @property
    def evaluation_sets(self) -> List[str]:
        """One name per evaluation (yaml: every ``DATASETS.TEST``; LazyConfig: the one
        ``dataloader.test``, named by its dataset(s))."""
        raise NotImplementedError

    @property
    def test_dataset_names(self) -> List[str]:
        """Every dataset evaluated on."""
        raise NotImplementedError

    def check_learning_rate(self) -> Optional[str]:
        raise NotImplementedError

    def checkpointer_kwargs(self) -> Dict:
        """``hooks.PeriodicCheckpointer``'s period and max_to_keep."""
        raise NotImplementedError

    def ddp_kwargs(self) -> Dict:
        raise NotImplementedError

    def precise_bn(self) -> Tuple[bool, int]:
        """(enabled, iterations) of Detectron2's PreciseBN hook."""
        raise NotImplementedError

    def check_device(self, command: str = "train_net.py") -> None:
        """Stop when the config asks for CUDA and there is none (no silent switch to the CPU)."""
        raise NotImplementedError

    def freeze(self) -> None:
        """Make the config read-only (yaml)."""

    def set_score_threshold(self, threshold: float) -> None:
        raise NotImplementedError

    def set_device(self, device: str) -> None:
        raise NotImplementedError

    def verify_results(self, results) -> None:
        """Detectron2's ``TEST.EXPECTED_RESULTS`` check (yaml)."""

    # ---- pieces ---------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        """The model on the config's device, in training mode, with its initial weights."""
        raise NotImplementedError

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def build_train_loader(self, num_workers: Optional[int] = None):
        """The train loader (``data_loaders.build_sparse_rcnn_train_loader`` in the shipped
        configs); ``num_workers`` overrides the config's."""
        raise NotImplementedError

    def build_lr_scheduler(self, optimizer):
        """A ``detectron2.solver.LRMultiplier`` over ``max_iter``."""
        raise NotImplementedError

    def build_test_loader(self, name: str):
        """The test loader of evaluation ``name`` (one of :attr:`evaluation_sets`)."""
        raise NotImplementedError

    def build_evaluator(
        self, name: str, output_folder: Optional[str] = None, per_stage: Optional[bool] = None
    ):
        """The evaluator of evaluation ``name`` (``evaluation.build_sparse_rcnn_evaluator`` in the
        shipped configs), or None when the config has none. ``output_folder`` and ``per_stage``
        override the config's."""
        raise NotImplementedError

    def build_tta_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` with test-time augmentation (``SparseRCNNWithTTA``)."""
        raise NotImplementedError

    def build_predictor(self):
        """A ``SparseRCNNPredictor`` (Detectron2's ``DefaultPredictor``: BGR image in,
        ``{"instances"}`` out) of the config's model and weights (loaded weights-only, and they must
        fit the model), with the config's test resize and input format."""
        raise NotImplementedError


class YamlConfigReader(ConfigReader):
    """:class:`ConfigReader` of a yacs ``CfgNode`` with the Sparse R-CNN keys."""

    keys = {
        "device": "MODEL.DEVICE",
        "weights": "MODEL.WEIGHTS",
        "num_classes": "MODEL.SPARSE_RCNN.NUM_CLASSES",
        "amp": "SOLVER.AMP.ENABLED",
        "lr": "SOLVER.BASE_LR",
        "ims_per_batch": "SOLVER.IMS_PER_BATCH",
        "output_dir": "OUTPUT_DIR",
    }

    device = property(lambda self: str(self.cfg.MODEL.DEVICE))
    weights = property(lambda self: self.cfg.MODEL.WEIGHTS)
    output_dir = property(lambda self: self.cfg.OUTPUT_DIR)
    max_iter = property(lambda self: int(self.cfg.SOLVER.MAX_ITER))
    amp = property(lambda self: bool(self.cfg.SOLVER.AMP.ENABLED))
    num_classes = property(lambda self: int(self.cfg.MODEL.SPARSE_RCNN.NUM_CLASSES))
    eval_period = property(lambda self: int(self.cfg.TEST.EVAL_PERIOD))
    log_period = 20  # DefaultTrainer's
    tta_enabled = property(lambda self: bool(self.cfg.TEST.AUG.ENABLED))
    base_lr = property(lambda self: float(self.cfg.SOLVER.BASE_LR))
    ims_per_batch = property(lambda self: int(self.cfg.SOLVER.IMS_PER_BATCH))

    @property
    def evaluation_sets(self) -> List[str]:
        return list(self.cfg.DATASETS.TEST)

    @property
    def test_dataset_names(self) -> List[str]:
        return list(self.cfg.DATASETS.TEST)

    def check_learning_rate(self) -> Optional[str]:
        from .solver import check_learning_rate

        return check_learning_rate(self.cfg)

    def checkpointer_kwargs(self) -> Dict:
        return {"period": self.cfg.SOLVER.CHECKPOINT_PERIOD}

    def ddp_kwargs(self) -> Dict:
        return {"broadcast_buffers": False}  # DefaultTrainer's

    def precise_bn(self) -> Tuple[bool, int]:
        precise = self.cfg.TEST.PRECISE_BN
        return bool(precise.ENABLED), int(precise.NUM_ITER)

    def check_device(self, command: str = "train_net.py") -> None:
        from .runtime import check_device

        check_device(self.cfg, command=command)

    def freeze(self) -> None:
        self.cfg.freeze()

    def set_score_threshold(self, threshold: float) -> None:
        self.cfg.MODEL.SPARSE_RCNN.SCORE_THRESH_TEST = threshold

    def set_device(self, device: str) -> None:
        self.cfg.MODEL.DEVICE = device

    def verify_results(self, results) -> None:
        if len(self.cfg.TEST.EXPECTED_RESULTS):
            from detectron2.evaluation import verify_results

            verify_results(self.cfg, results)

    def build_model(self) -> torch.nn.Module:
        from detectron2.modeling import build_model

        return build_model(self.cfg)

    def build_optimizer(self, model):
        from .solver import build_optimizer

        return build_optimizer(self.cfg, model)

    def build_train_loader(self, num_workers: Optional[int] = None):
        from .data_loaders import build_sparse_rcnn_train_loader

        cfg = self.cfg
        if num_workers is not None:
            cfg = cfg.clone()
            cfg.defrost()
            cfg.DATALOADER.NUM_WORKERS = num_workers
        return build_sparse_rcnn_train_loader(cfg)

    def build_lr_scheduler(self, optimizer):
        from detectron2.solver import build_lr_scheduler

        return build_lr_scheduler(self.cfg, optimizer)

    def build_test_loader(self, name: str):
        from .data_loaders import build_sparse_rcnn_test_loader

        return build_sparse_rcnn_test_loader(self.cfg, name)

    def build_evaluator(self, name, output_folder=None, per_stage=None):
        from .evaluation import build_sparse_rcnn_evaluator

        cfg = self.cfg
        if per_stage is not None:
            cfg = cfg.clone()
            cfg.defrost()
            cfg.MODEL.SPARSE_RCNN.EVAL_PER_STAGE = per_stage
        return build_sparse_rcnn_evaluator(cfg, name, output_folder)

    def build_tta_model(self, model):
        from .test_time_augmentation import SparseRCNNWithTTA

        return SparseRCNNWithTTA(self.cfg, model)

    def build_predictor(self):
        from .predictor import SparseRCNNPredictor

        return SparseRCNNPredictor(self.cfg)


def _get(node, dotted: str, default=None):
    """``node.a.b.c`` for ``dotted`` "a.b.c", or ``default`` where a part is missing."""
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node


class LazyConfigReader(ConfigReader):
    """:class:`ConfigReader` of a LazyConfig: ``model``, ``dataloader.train`` / ``.test`` /
    ``.evaluator``, ``optimizer`` (its ``params.model`` is set to the model when built),
    ``lr_multiplier``, ``train`` (the keys of Detectron2's ``common/train.py``) and ``tta``."""

    lazy = True
    assign = "="
    keys = {
        "device": "train.device",
        "weights": "train.init_checkpoint",
        "num_classes": "model.num_classes",
        "amp": "train.amp.enabled",
        "lr": "optimizer.lr",
        "ims_per_batch": "dataloader.train.total_batch_size",
        "output_dir": "train.output_dir",
    }

    device = property(lambda self: str(_get(self.cfg, "train.device", "cpu")))
    weights = property(lambda self: _get(self.cfg, "train.init_checkpoint", "") or "")
    output_dir = property(lambda self: self.cfg.train.output_dir)
    max_iter = property(lambda self: int(self.cfg.train.max_iter))
    amp = property(lambda self: bool(_get(self.cfg, "train.amp.enabled", False)))
    num_classes = property(lambda self: int(self.cfg.model.num_classes))
    eval_period = property(lambda self: int(self.cfg.train.eval_period))
    log_period = property(lambda self: int(self.cfg.train.log_period))
    tta_enabled = property(lambda self: bool(_get(self.cfg, "tta.enabled", False)))
    base_lr = property(lambda self: float(self.cfg.optimizer.lr))
    ims_per_batch = property(lambda self: int(self.cfg.dataloader.train.total_batch_size))

    @property
    def test_dataset_names(self) -> List[str]:
        names = _get(self.cfg, "dataloader.test.dataset.names")
        return [] if names is None else dataset_names(names)

    @property
    def evaluation_sets(self) -> List[str]:
        names = self.test_dataset_names
        return ["+".join(names)] if names else []

    def check_learning_rate(self) -> Optional[str]:
        from .solver import check_adamw_learning_rate

        node = self.cfg.optimizer
        optimizer = node.get("optimizer_type", None) or node.get("_target_", "")
        name = getattr(optimizer, "__name__", str(optimizer).rsplit(".", 1)[-1])
        return check_adamw_learning_rate(
            name,
            self.base_lr,
            self.ims_per_batch,
            lr_key=self.keys["lr"],
            ims_key=self.keys["ims_per_batch"],
            assign=self.assign,
        )

    def checkpointer_kwargs(self) -> Dict:
        return dict(self.cfg.train.checkpointer)

    def ddp_kwargs(self) -> Dict:
        return dict(_get(self.cfg, "train.ddp", {}) or {})

    def precise_bn(self) -> Tuple[bool, int]:
        precise = _get(self.cfg, "train.precise_bn", None) or {}
        return bool(precise.get("enabled", False)), int(precise.get("num_iter", 200))

    def check_device(self, command: str = "train_net.py") -> None:
        from .runtime import check_cuda_available

        how = "--opts train.device=cpu" if command == "demo.py" else "train.device=cpu"
        check_cuda_available(
            self.device,
            key="train.device",
            fix=f"add `{how}` to the {command} command line",
            advice="On a CPU, configs/sparse_rcnn_quick_cpu.py (built-in data) is the one to try.",
        )

    def set_score_threshold(self, threshold: float) -> None:
        self.cfg.model.score_thresh_test = threshold

    def set_device(self, device: str) -> None:
        self.cfg.train.device = device

    def build_model(self) -> torch.nn.Module:
        return instantiate(self.cfg.model).to(self.device)

    def build_optimizer(self, model):
        self.cfg.optimizer.params.model = model
        try:
            return instantiate(self.cfg.optimizer)
        finally:
            self.cfg.optimizer.params.model = None

    def build_train_loader(self, num_workers: Optional[int] = None):
        node = self.cfg.dataloader.train
        if num_workers is None:
            return instantiate(node)
        return _instantiate_with(node, num_workers=num_workers)

    def build_lr_scheduler(self, optimizer):
        from detectron2.solver import LRMultiplier

        return LRMultiplier(optimizer, instantiate(self.cfg.lr_multiplier), self.max_iter)

    def build_test_loader(self, name: str):
        return instantiate(self.cfg.dataloader.test)

    def build_evaluator(self, name, output_folder=None, per_stage=None):
        node = _get(self.cfg, "dataloader.evaluator")
        if node is None:
            return None
        overrides = {}
        if output_folder is not None:
            overrides["output_dir"] = output_folder
        if per_stage is not None:
            overrides["per_stage"] = per_stage
        return _instantiate_with(node, **overrides) if overrides else instantiate(node)

    def build_tta_model(self, model):
        node = _get(self.cfg, "tta.model")
        if node is None:
            raise KeyError(
                "tta.enabled is set but the LazyConfig has no tta.model: import tta from "
                "configs/common/test_time_augmentation.py."
            )
        overrides = {"model": model}
        if node.get("max_detections", None) is None:  # as the yaml TEST.DETECTIONS_PER_IMAGE
            count = int(_get(self.cfg, "model.detections_per_image", 0) or 0)
            overrides["max_detections"] = count or int(
                self.cfg.model.proposal_generator.num_proposals
            )
        return _instantiate_with(node, **overrides)

    def build_predictor(self):
        from detectron2.data import MetadataCatalog

        from .checkpoint import load_inference_weights
        from .predictor import SparseRCNNPredictor

        mapper = self.cfg.dataloader.test.mapper
        predictor = SparseRCNNPredictor.__new__(SparseRCNNPredictor)  # __init__ reads yaml keys
        # DefaultPredictor.__call__ reads cfg.MODEL.DEVICE only.
        predictor.cfg = CfgNode({"MODEL": {"DEVICE": self.device}})
        predictor.model = self.build_model().eval()
        load_inference_weights(predictor.model, self.weights, key=self.keys["weights"])
        predictor.aug = _single_resize(
            instantiate(mapper.augmentations), "dataloader.test.mapper.augmentations"
        )
        predictor.input_format = mapper.image_format
        if predictor.input_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be RGB or BGR, got {predictor.input_format!r}")
        if self.test_dataset_names:
            predictor.metadata = MetadataCatalog.get(self.test_dataset_names[0])
        return predictor


def config_reader(cfg) -> ConfigReader:
    """The :class:`ConfigReader` of a config of either system (a reader is returned as it is)."""
    if isinstance(cfg, ConfigReader):
        return cfg
    if isinstance(cfg, CfgNode):
        return YamlConfigReader(cfg)
    if isinstance(cfg, (DictConfig, dict)):
        return LazyConfigReader(cfg)
    raise TypeError(f"Expected a yacs CfgNode or a LazyConfig, got {type(cfg).__name__}")


def default_output_folder(reader: ConfigReader, kind: str, name: str) -> str:
    """``{output_dir}/{kind}/{name}``, the folder of an evaluation's files."""
    return os.path.join(reader.output_dir, kind, name)
