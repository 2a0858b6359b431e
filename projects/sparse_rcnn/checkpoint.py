"""Checkpoint handling of every entry point: files loaded without running code from them, a
missing, corrupt or refused file reported with its path, inference stopped on weights that did not
load, ``last_checkpoint`` repaired, and ``--resume`` for yaml and LazyConfig runs alike.

A ``.pth`` is a pickle, and unpickling can call any function the file names. Every checkpoint is
therefore read weights-only (docs/checkpoints.md):

- ``.pth`` / ``.pt`` / ``.pyth``: ``torch.load(weights_only=True)``; a file that PyTorch's
  weights-only loader refuses is read again by :class:`RestrictedUnpickler`, which admits the same
  tensor types plus numpy arrays (what PyTorch < 2.4 cannot allow-list), reads the omegaconf values
  of older LazyConfig checkpoints as plain lists and dicts, and names the first global it refuses;
- ``.pkl`` (Detectron2 model-zoo and ImageNet weights: numpy arrays in a dict) by
  :class:`RestrictedUnpickler`;
- ``.safetensors`` by the ``safetensors`` package (a format that cannot carry code).

A refused file raises :class:`UnsafeCheckpointError`; a file the user trusts loads in full with
``SPARSE_RCNN_ALLOW_UNSAFE_CHECKPOINT=1`` in the environment (or ``allow_unsafe=True``), with a
warning. :class:`SafeDetectionCheckpointer` is Detectron2's ``DetectionCheckpointer`` with this
loading (training: partial loads keep Detectron2's warnings); :class:`InferenceCheckpointer` also
stops with :class:`IncompleteCheckpointError` when the checkpoint leaves the model, a whole module
of it or a layer's shape untrained (evaluation, demo, export, predictors).
"""

import _compat_pickle
import collections
import contextlib
import functools
import logging
import os
import pickle
import re
import types
import zipfile
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

# Set to 1 to load checkpoints that weights-only loading refuses (only files you trust).
ALLOW_UNSAFE_ENV = "SPARSE_RCNN_ALLOW_UNSAFE_CHECKPOINT"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, not a checkpoint)."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds objects whose unpickling could run code; it was not loaded."""


class IncompleteCheckpointError(RuntimeError):
    """At inference, a checkpoint leaves the model, a whole module of it or a layer untrained."""


def unsafe_loading_allowed(allow_unsafe: Optional[bool] = None) -> bool:
    """``allow_unsafe`` if given, else whether ``$SPARSE_RCNN_ALLOW_UNSAFE_CHECKPOINT`` is set to
    1 / true / yes."""
    if allow_unsafe is not None:
        return bool(allow_unsafe)
    return os.environ.get(ALLOW_UNSAFE_ENV, "").strip().lower() in ("1", "true", "yes")


def _unsafe_message(path: str, refused: str) -> str:
    return (
        f"Checkpoint {path} was not loaded: it contains {refused}, an object whose unpickling "
        "could run code (a checkpoint needs only tensors, numpy arrays, numbers, strings, lists "
        "and dicts). Checkpoints from untrusted sources can carry programs: get the file from its "
        "original source, or convert a file you trust to .safetensors (python -m "
        "sparse_rcnn.convert_to_safetensors IN OUT.safetensors). To load a file you trust as it "
        f"is, set {ALLOW_UNSAFE_ENV}=1 in the environment (see docs/checkpoints.md)."
    )


@contextlib.contextmanager
def explain_checkpoint_errors(path: str):
    """Re-raise the errors of reading a corrupt or truncated checkpoint as
    :class:`CorruptCheckpointError` naming ``path`` and what to do; PyTorch's weights-only refusal
    (a checkpoint read elsewhere with ``torch.load``) as :class:`UnsafeCheckpointError`."""
    try:
        yield
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError) as e:
        if isinstance(
            e, (CorruptCheckpointError, UnsafeCheckpointError, IncompleteCheckpointError)
        ):
            raise
        text = str(e)
        if "Weights only load failed" in text:
            raise UnsafeCheckpointError(
                _unsafe_message(path, _refused_in_torch_message(text))
            ) from e
        readable = isinstance(e, RuntimeError) and not any(
            s in text for s in ("PytorchStreamReader", "zip archive", "central directory", "EOF")
        )
        if readable:
            raise
        size = os.path.getsize(path) if path and os.path.isfile(path) else "?"
        raise CorruptCheckpointError(
            f"Checkpoint {path} ({size} bytes) is corrupt or truncated ({type(e).__name__}: {e}). "
            "A run killed while saving leaves such a file: delete it and resume from an earlier "
            "checkpoint (name it in the folder's last_checkpoint file) or set MODEL.WEIGHTS to a "
            "complete one."
        ) from e


def _refused_in_torch_message(text: str) -> str:
    """The global PyTorch's weights-only error names ("Unsupported class X" in PyTorch 2.3,
    "Unsupported global: GLOBAL X", "unsupported GLOBAL X whose module ..." later), or a generic
    description."""
    found = re.search(r"unsupported (?:global: )?(?:global|class) ([\w.]+)", text, re.IGNORECASE)
    return found.group(1) if found else "an object PyTorch's weights-only loading refuses"


# ------------------------------------------------------------------------------------------------
# Reading a file without running code from it
# ------------------------------------------------------------------------------------------------
class _RefusedGlobal(pickle.UnpicklingError):
    """Raised by :class:`RestrictedUnpickler` on the first object it does not admit."""

    def __init__(self, name: str):
        super().__init__(f"refused {name}")
        self.name = name


def _numpy_objects() -> Dict[str, Any]:
    """What numpy arrays unpickle with, under the names numpy 1 and numpy 2 pickle them with
    (``numpy.core.multiarray`` became ``numpy._core.multiarray``)."""
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    objects = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        objects[f"{module}._reconstruct"] = reconstruct
        objects[f"{module}.scalar"] = scalar
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype
    if dtypes is not None:
        for name in dir(dtypes):
            cls = getattr(dtypes, name)
            if isinstance(cls, type) and issubclass(cls, np.dtype):
                objects[f"numpy.dtypes.{name}"] = cls
    return objects


class _OmegaConfStandIn:
    """Unpickled in place of an omegaconf container or node (LazyConfig values that reach a
    checkpoint, e.g. an optimizer's ``betas`` instantiated from a LazyConfig) and replaced by its
    plain value (:func:`_plain`): omegaconf's own classes are not unpickled."""

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


# The omegaconf classes whose pickles hold only their content ("_content" / "_val") and metadata.
_OMEGACONF_CLASSES = [
    ("omegaconf.listconfig", "ListConfig"),
    ("omegaconf.dictconfig", "DictConfig"),
    ("omegaconf.base", "ContainerMetadata"),
    ("omegaconf.base", "Metadata"),
] + [("omegaconf.nodes", n) for n in ("AnyNode", "FloatNode", "IntegerNode", "StringNode",
                                     "BooleanNode", "BytesNode")]  # fmt: skip


def _plain(obj, memo: Optional[Dict[int, Any]] = None):
    """``obj`` with every :class:`_OmegaConfStandIn` replaced by the list, dict or value it stands
    for (containers changed in place, keeping their type)."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, _OmegaConfStandIn):
        state = obj.state
        memo[id(obj)] = None  # a container that contains itself
        value = _plain(state["_content"] if "_content" in state else state.get("_val"), memo)
        memo[id(obj)] = value
        return value
    if type(obj) is tuple:
        memo[id(obj)] = value = tuple(_plain(x, memo) for x in obj)
        return value
    memo[id(obj)] = obj
    if isinstance(obj, dict):
        for key in list(obj):
            obj[key] = _plain(obj[key], memo)
    elif type(obj) is list:
        obj[:] = [_plain(x, memo) for x in obj]
    return obj


@functools.lru_cache(maxsize=1)
def _admitted_globals() -> Dict[Tuple[str, str], Any]:
    """(module, name) -> object: PyTorch's own weights-only allow-list (tensors, storages, dtypes,
    ``torch.Size``, ``OrderedDict``), numpy arrays and scalars, the plain types and containers
    pickle protocol 2 writes with a global, and stand-ins for omegaconf containers."""
    import _codecs

    torch_allowed = getattr(torch._weights_only_unpickler, "_get_allowed_globals", dict)()
    objects = {
        full: obj
        for full, obj in torch_allowed.items()
        if full.startswith("torch.") or full == "collections.OrderedDict"
    }
    objects.update(
        {
            "collections.OrderedDict": OrderedDict,
            "torch.Size": torch.Size,
            "torch.device": torch.device,
            "torch.nn.parameter.Parameter": torch.nn.Parameter,
            "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
            "_codecs.encode": _codecs.encode,
            "builtins.set": set,
            "builtins.frozenset": frozenset,
            "builtins.bytearray": bytearray,
            "builtins.complex": complex,
            "builtins.slice": slice,
            # The types an omegaconf container's metadata names, and its resolver cache.
            "typing.Any": Any,
            "collections.defaultdict": collections.defaultdict,
        }
    )
    for cls in (list, dict, tuple, int, float, str, bool, bytes):
        objects[f"builtins.{cls.__name__}"] = cls
    for module, name in _OMEGACONF_CLASSES:
        objects[f"{module}.{name}"] = _OmegaConfStandIn
    rebuilds = ("tensor", "tensor_v2", "tensor_v3", "parameter", "parameter_with_state")
    for name in (f"_rebuild_{r}" for r in rebuilds):
        if hasattr(torch._utils, name):
            objects[f"torch._utils.{name}"] = getattr(torch._utils, name)
    for value in vars(torch).values():
        if isinstance(value, torch.dtype):
            objects[str(value)] = value
    objects.update(_numpy_objects())
    return {tuple(full.rsplit(".", 1)): obj for full, obj in objects.items()}


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that builds only tensors, numpy arrays, numbers, strings and plain containers.

    ``find_class`` admits only :func:`_admitted_globals` (anything else, e.g. ``posix.system``,
    stops the load before it is called), and ``BUILD`` (setting an object's state) only applies
    to arrays, dtypes, tensors, ``OrderedDict`` and the omegaconf stand-ins. The pure-Python
    unpickler, so that ``BUILD`` can be restricted; its speed does not matter for the few hundred
    objects of a state dict.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 pickles (Detectron1 / Caffe2 .pkl)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        obj = _admitted_globals().get((module, name))
        if obj is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return obj

    def load_build(self) -> None:
        inst = self.stack[-2]  # below the state
        if not isinstance(
            inst, (np.ndarray, np.dtype, torch.Tensor, OrderedDict, _OmegaConfStandIn)
        ):
            raise _RefusedGlobal(f"state set on a {type(inst).__module__}.{type(inst).__name__}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load(pickle_module=...) needs of a pickle module.
_RESTRICTED_PICKLE = types.ModuleType("sparse_rcnn_restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = RestrictedUnpickler
_RESTRICTED_PICKLE.load = _restricted_load
_RESTRICTED_PICKLE.UnpicklingError = pickle.UnpicklingError

_torch_safe_globals_added = False


def _torch_numpy_safe_globals():
    """A context in which ``torch.load(weights_only=True)`` also admits numpy arrays: PyTorch's
    ``safe_globals`` (>= 2.5) or ``add_safe_globals`` (2.4); PyTorch < 2.4 has neither (numpy arrays
    are then read by :class:`RestrictedUnpickler`)."""
    global _torch_safe_globals_added
    serialization = torch.serialization
    objects = list({id(o): o for o in _numpy_objects().values()}.values())
    if hasattr(serialization, "safe_globals"):
        return serialization.safe_globals(objects)
    if hasattr(serialization, "add_safe_globals") and not _torch_safe_globals_added:
        serialization.add_safe_globals(objects)
        _torch_safe_globals_added = True
    return contextlib.nullcontext()


def _torch_load_weights_only(path: str) -> Any:
    """``torch.load(path, weights_only=True)``; what PyTorch's allow-list refuses is read again by
    :class:`RestrictedUnpickler` (numpy arrays on PyTorch < 2.4 load; code is refused by name)."""
    try:
        with _torch_numpy_safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return _plain(
            torch.load(
                path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE
            )
        )


def load_safetensors(path: str) -> Dict[str, Any]:
    """A ``.safetensors`` file as a Detectron2 checkpoint: ``{"model": {name: tensor}}``, with the
    ``__author__`` / ``matching_heuristics`` entries of its metadata
    (``sparse_rcnn.convert_to_safetensors`` writes them for Detectron2 ``.pkl`` weights)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        size = os.path.getsize(path) if os.path.isfile(path) else "?"
        raise CorruptCheckpointError(
            f"Checkpoint {path} ({size} bytes) is not a readable .safetensors file ({e}): "
            "convert the checkpoint again (python -m sparse_rcnn.convert_to_safetensors)."
        ) from e
    checkpoint: Dict[str, Any] = {"model": tensors}
    if metadata.get("matching_heuristics") == "True":
        checkpoint["matching_heuristics"] = True
    if "__author__" in metadata:
        checkpoint["__author__"] = metadata["__author__"]
    return checkpoint


def load_checkpoint_file(path: str, *, allow_unsafe: Optional[bool] = None) -> Any:
    """The object a local checkpoint file holds, read without running code from it (module doc).

    Args:
        path: a ``.pth`` / ``.pt`` / ``.pyth`` (``torch.save``), ``.pkl`` (pickled dict of numpy
            arrays) or ``.safetensors`` file.
        allow_unsafe: load a refused file in full (with a warning); default
            ``$SPARSE_RCNN_ALLOW_UNSAFE_CHECKPOINT``.

    Raises:
        UnsafeCheckpointError: the file holds an object that is not a tensor, array, number,
            string or plain container (named in the message).
    """
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    is_pickle = path.endswith(".pkl")
    try:
        if is_pickle:
            with PathManager.open(path, "rb") as f:
                return _plain(RestrictedUnpickler(f, encoding="latin1").load())
        return _torch_load_weights_only(path)
    except _RefusedGlobal as e:
        refused = e.name
    if not unsafe_loading_allowed(allow_unsafe):
        raise UnsafeCheckpointError(_unsafe_message(path, refused))
    logger.warning(
        f"Loading {path} with full unpickling, which runs any code the file carries (it contains "
        f"{refused}), because {ALLOW_UNSAFE_ENV} / allow_unsafe is set. Do this only for files "
        "you trust; convert it to .safetensors to load it safely from now on."
    )
    if is_pickle:
        with PathManager.open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    return torch.load(path, map_location="cpu", weights_only=False)


def detectron2_pkl_checkpoint(data: Dict, log: Optional[logging.Logger] = None) -> Dict:
    """A ``.pkl`` file's dict as Detectron2's checkpointer reads it: a Detectron2 model-zoo file
    (``{"model": ..., "__author__": ...}``) as it is; a Caffe2 / Detectron1 file (arrays, under
    "blobs" for detection models) as ``{"model": arrays, "__author__": "Caffe2",
    "matching_heuristics": True}``, without the ``*_momentum`` blobs."""
    if "model" in data and "__author__" in data:
        (log or logger).info(f"Reading a file from '{data['__author__']}'")
        return data
    if "blobs" in data:
        data = data["blobs"]
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


# ------------------------------------------------------------------------------------------------
# Checkpointers
# ------------------------------------------------------------------------------------------------
class SafeDetectionCheckpointer(DetectionCheckpointer):
    """Detectron2's ``DetectionCheckpointer`` (the same formats, URL options, saving and partial
    loads with warnings) whose files are read by :func:`load_checkpoint_file`: weights-only
    ``.pth``, restricted ``.pkl``, ``.safetensors``.

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        allow_unsafe: load files that weights-only loading refuses (only files you trust);
            default ``$SPARSE_RCNN_ALLOW_UNSAFE_CHECKPOINT``.
    """

    def __init__(
        self,
        model,
        save_dir: str = "",
        *,
        save_to_disk: Optional[bool] = None,
        allow_unsafe: Optional[bool] = None,
        **checkpointables,
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_unsafe = allow_unsafe

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            data = load_checkpoint_file(filename, allow_unsafe=self.allow_unsafe)
            return detectron2_pkl_checkpoint(data, self.logger)
        if filename.endswith(".pyth"):  # pycls, as Detectron2 reads it
            data = load_checkpoint_file(filename, allow_unsafe=self.allow_unsafe)
            if "model_state" not in data:
                raise ValueError(f"Cannot load .pyth file {filename}: no 'model_state' in it.")
            state = {
                k: v
                for k, v in data["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)  # .pth / .safetensors via _torch_load; URL options

    def _torch_load(self, f: str) -> Any:
        return load_checkpoint_file(f, allow_unsafe=self.allow_unsafe)


class InferenceCheckpointer(SafeDetectionCheckpointer):
    """:class:`SafeDetectionCheckpointer` for evaluation and prediction: a checkpoint that
    leaves the model, a whole top-level module (backbone, proposal generator, head) or any layer's
    shape untrained raises :class:`IncompleteCheckpointError` (:func:`check_inference_weights`)
    instead of Detectron2's warnings, as an untrained layer at inference is a wrong answer."""

    _loading_path: Optional[str] = None

    def load(self, path: str, *args, **kwargs):
        self._loading_path = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading_path = None

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        check_inference_weights(self.model, incompatible, self._loading_path)
        return incompatible


def _shape_hint(key: str, checkpoint_shape: Tuple[int, ...], model_shape: Tuple[int, ...]) -> str:
    if "class_logits" in key and checkpoint_shape[:1] != model_shape[:1]:
        k = checkpoint_shape[0]
        return (
            f" (the checkpoint's classifier has {k} classes, the config {model_shape[0]}: set "
            f"MODEL.SPARSE_RCNN.NUM_CLASSES {k}, LazyConfig model.num_classes={k})"
        )
    if "init_proposal" in key:
        return " (check MODEL.SPARSE_RCNN.NUM_PROPOSALS and HIDDEN_DIM)"
    return ""


def check_inference_weights(model, incompatible, path: Optional[str]) -> None:
    """Raise :class:`IncompleteCheckpointError` when the load of ``path`` (``incompatible``:
    fvcore's record, with ``missing_keys``, ``unexpected_keys`` and ``incorrect_shapes``) leaves
    every weight of ``model``, every weight of one of its top-level modules, or a tensor whose shape
    differs, untrained. Some missing keys inside a module that loaded keep Detectron2's warning.

    Parameters are counted, not buffers: a module may fill missing buffers itself (Detectron2's
    FrozenBatchNorm2d sets absent running statistics to 0 and 1 without reporting them)."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    expected = [k for k in model.state_dict() if k in parameters]
    if not expected:
        return
    reshaped = {k: (tuple(c), tuple(m)) for k, c, m in incompatible.incorrect_shapes}
    untrained = set(incompatible.missing_keys) | set(reshaped)
    problems, causes = [], []
    if all(k in untrained for k in expected):
        names = list(incompatible.unexpected_keys)
        sample = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "none"
        problems.append(
            f"it provides none of the model's {len(expected)} parameters (the names it has that "
            f"the model does not: {sample})"
        )
        causes.append(
            "a file of another model (another architecture or backbone, or backbone-only "
            "weights such as ImageNet ones, which are for training) or a config that does not "
            "match the checkpoint (MODEL.BACKBONE, MODEL.RESNETS.DEPTH, MODEL.SPARSE_RCNN sizes)"
        )
    else:
        modules: Dict[str, list] = {}
        for key in expected:
            modules.setdefault(key.split(".", 1)[0], []).append(key)
        missing = [m for m, keys in modules.items() if all(k in untrained for k in keys)]
        if missing:
            problems.append(
                "it has no weights for "
                + ", ".join(f"the whole `{m}` ({len(modules[m])} parameters)" for m in missing)
            )
            causes.append(
                "a checkpoint of part of the model (e.g. backbone weights, which are for "
                "training) or of another architecture"
            )
    if reshaped:
        listed = sorted(reshaped)
        classifier = [k for k in listed if "class_logits" in k]
        shown = ([classifier[0]] if classifier else []) + [
            k for k in listed if "class_logits" not in k
        ][:4]
        details = "; ".join(
            f"`{k}` has shape {reshaped[k][0]} in the checkpoint, {reshaped[k][1]} in the model"
            + _shape_hint(k, *reshaped[k])
            for k in shown
        )
        more = len(listed) - len(shown)
        problems.append(
            f"{len(listed)} tensors do not fit the model: {details}"
            + (f"; and {more} more" if more > 0 else "")
        )
        causes.append("a config that differs from the one the checkpoint was trained with")
    if problems:
        raise IncompleteCheckpointError(
            f"Checkpoint {path} does not fit the model for inference: {'; '.join(problems)}. "
            "Inference with untrained layers gives meaningless results, so it stops here. "
            f"Likely cause: {'; or '.join(causes)}. Give the checkpoint of a model trained with "
            "this config (MODEL.WEIGHTS; LazyConfig train.init_checkpoint), or the config it was "
            "trained with. Training (train_net.py without --eval-only) loads partial checkpoints "
            "with warnings, as fine-tuning needs."
        )


def check_weights_file(path: str, key: str = "MODEL.WEIGHTS") -> None:
    """A local weights path that does not exist raises FileNotFoundError naming it and ``key``
    (rather than fvcore's bare ``assert os.path.isfile``). URLs and catalog paths are left alone."""
    if not path or "://" in path:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{key} {path} does not exist (working directory {os.getcwd()}): give the "
            "path of a checkpoint (e.g. output/demo_cpu/model_final.pth), or '' for an "
            "untrained model."
        )


def load_inference_weights(
    model, weights: str, *, key: str = "MODEL.WEIGHTS", allow_unsafe: Optional[bool] = None
) -> None:
    """Load ``weights`` into ``model`` for inference with :class:`InferenceCheckpointer`: a missing
    file (named with ``key``), a corrupt, refused or incomplete checkpoint are errors naming it.
    ``weights`` "" leaves the model untrained."""
    check_weights_file(weights, key)
    with explain_checkpoint_errors(weights):
        InferenceCheckpointer(model, allow_unsafe=allow_unsafe).load(weights)


def load_model_weights(model, cfg, resume: bool = False) -> None:
    """``--eval-only``'s load: ``InferenceCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS,
    resume)`` with a missing, corrupt, refused or incomplete checkpoint reported with its path."""
    checkpointer = InferenceCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    resume_or_load(checkpointer, cfg.MODEL.WEIGHTS, resume)


def _checkpoint_candidates(folder: str) -> List[str]:
    """The ``model_*.pth`` files of ``folder``, newest first: ``model_final.pth``, then by
    iteration (``PeriodicCheckpointer`` names them ``model_{iteration:07d}.pth``)."""
    names = [f for f in os.listdir(folder) if f.startswith("model_") and f.endswith(".pth")]
    return sorted(names, key=lambda f: (f == "model_final.pth", f), reverse=True)


def _repair_last_checkpoint(checkpointer) -> None:
    """A run killed while writing ``last_checkpoint`` leaves it empty (or naming a file that is not
    there): tag the newest ``model_*.pth`` of the folder instead (``model_final.pth`` first, then
    the highest iteration), with a warning; without any, remove the tag (a fresh start)."""
    path = checkpointer.get_checkpoint_file()
    if os.path.isfile(path):
        return
    folder = checkpointer.save_dir
    newest = (_checkpoint_candidates(folder) or [None])[0]
    logger.warning(
        f"{os.path.join(folder, 'last_checkpoint')} names {path!r}, which does not exist (a run "
        f"killed while saving?); resuming from {newest or 'nothing (no model_*.pth there)'}."
    )
    if newest is not None:
        checkpointer.tag_last_checkpoint(newest)
    else:
        os.remove(os.path.join(folder, "last_checkpoint"))


def resume_or_load(checkpointer, weights: str, resume: bool, key: str = "MODEL.WEIGHTS"):
    """``checkpointer.resume_or_load(weights, resume)`` that a preempted job can rely on.

    With ``resume`` and a checkpoint in ``checkpointer.save_dir`` (``last_checkpoint``): the
    checkpoint it names, with everything in it (model, trainer state). If that file is truncated
    or unreadable (a run killed while saving), the newest readable ``model_*.pth`` of the folder
    is loaded instead, with a warning naming both files, and tagged as the last checkpoint. Only
    when no checkpoint of the folder can be read: a :class:`CorruptCheckpointError` naming them.
    Otherwise: the model weights of ``weights`` (a missing or corrupt file named in the error,
    with the config key ``key`` that set it).

    Returns:
        What ``Checkpointer.load`` returns (the checkpoint's other contents).
    """
    if resume and checkpointer.has_checkpoint():
        _repair_last_checkpoint(checkpointer)
    if not (resume and checkpointer.has_checkpoint()):
        check_weights_file(weights, key)
        with explain_checkpoint_errors(weights):
            return checkpointer.resume_or_load(weights, resume=resume)
    folder = checkpointer.save_dir
    newest = checkpointer.get_checkpoint_file()
    others = [os.path.join(folder, f) for f in _checkpoint_candidates(folder)]
    unreadable = []
    for path in [newest] + [p for p in others if os.path.abspath(p) != os.path.abspath(newest)]:
        try:
            with explain_checkpoint_errors(path):
                loaded = checkpointer.load(path)
        except CorruptCheckpointError as e:
            unreadable.append((path, e))
            # DetectionCheckpointer.load leaves this set when reading fails: clear it for the next.
            if getattr(checkpointer, "_parsed_url_during_load", None) is not None:
                checkpointer._parsed_url_during_load = None
            continue
        if unreadable:
            logger.warning(
                f"Resuming from {path}: the newest checkpoint {newest} cannot be read "
                f"({unreadable[0][1].__cause__!r}; a run killed while saving?)"
                + (
                    f", nor can {', '.join(p for p, _ in unreadable[1:])}"
                    if len(unreadable) > 1
                    else ""
                )
                + ". The unreadable files are left in place."
            )
            checkpointer.tag_last_checkpoint(os.path.basename(path))
        return loaded
    files = ", ".join(f"{p} ({os.path.getsize(p)} bytes)" for p, _ in unreadable)
    raise CorruptCheckpointError(
        f"--resume: no checkpoint of {folder} can be read: {files} are corrupt or truncated "
        f"(first error: {unreadable[0][1].__cause__!r}). Delete them and start without --resume, "
        "or load a complete checkpoint as the config's weights."
    ) from unreadable[0][1]
