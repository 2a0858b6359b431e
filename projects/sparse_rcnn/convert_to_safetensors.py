"""Write a checkpoint's model weights to ``.safetensors``, a format that cannot carry code.

    python -m sparse_rcnn.convert_to_safetensors model_final.pth model_final.safetensors

The input is read weights-only (:func:`sparse_rcnn.checkpoint.load_checkpoint_file`; a file that
holds code is refused unless ``SPARSE_RCNN_ALLOW_UNSAFE_CHECKPOINT=1``); its ``model`` state dict
(or the file itself when it is a state dict) is written with its names unchanged, so official
checkpoints keep their official names and load as the ``.pth`` does (``MODEL.WEIGHTS
model_final.safetensors``). A Detectron2 ``.pkl`` keeps its ``__author__`` / ``matching_heuristics``
in the file's metadata. The optimizer, scheduler and iteration of a training checkpoint are not
written: the result is for inference and fine-tuning, not for ``--resume``.
"""

import argparse
import logging
from typing import Dict, List, Optional

import numpy as np
import torch

from .checkpoint import detectron2_pkl_checkpoint, load_checkpoint_file

__all__ = ["model_state_dict", "convert_to_safetensors", "main"]

logger = logging.getLogger(__name__)


def model_state_dict(checkpoint) -> Dict[str, torch.Tensor]:
    """The model weights of a loaded checkpoint (``{"model": state_dict, ...}`` or a state dict)
    as contiguous CPU tensors, names unchanged."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(
            f"Not a checkpoint: a {type(checkpoint).__name__}, not a dict of tensors (with or "
            "without a 'model' entry)."
        )
    tensors = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"Checkpoint entry {key!r} is a {type(value).__name__}, not a tensor.")
        # A copy: safetensors refuses tensors that share memory (views of one storage).
        tensors[str(key)] = value.detach().cpu().contiguous().clone()
    return tensors


def convert_to_safetensors(src: str, dst: str, *, allow_unsafe: Optional[bool] = None) -> int:
    """Write the model weights of checkpoint ``src`` to ``dst`` (``.safetensors``).

    Returns:
        The number of tensors written.
    """
    from safetensors.torch import save_file

    checkpoint = load_checkpoint_file(src, allow_unsafe=allow_unsafe)
    metadata = {"format": "pt"}
    if src.endswith(".pkl"):
        checkpoint = detectron2_pkl_checkpoint(checkpoint)
    if isinstance(checkpoint, dict):
        if checkpoint.get("matching_heuristics"):
            metadata["matching_heuristics"] = "True"
        if isinstance(checkpoint.get("__author__"), str):
            metadata["__author__"] = checkpoint["__author__"]
    tensors = model_state_dict(checkpoint)
    save_file(tensors, dst, metadata=metadata)
    logger.info(f"Wrote {len(tensors)} tensors of {src} to {dst}")
    return len(tensors)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="checkpoint: .pth / .pt / .pkl (or .safetensors)")
    parser.add_argument("output", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        parser.error(f"{args.output}: the output name must end in .safetensors (MODEL.WEIGHTS "
                     "picks the format by the name)")  # fmt: skip
    count = convert_to_safetensors(args.input, args.output)
    print(f"{args.input} -> {args.output}: {count} tensors")
    return count


if __name__ == "__main__":
    main()
