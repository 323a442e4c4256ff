"""Reading files of tensors without running pickled code: weights, latents, text features, checkpoints.

Our own files are safetensors (no pickle, memory-mappable). Files written by the reference tools (``torch.save``
of a tensor or a dict of tensors, usually named ``.pt``) are still accepted, loaded with
``torch.load(weights_only=True)``, so a stale or hostile pickle cannot run code. The format is chosen by suffix:
``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin``.

This is the one reader of user-supplied tensor files; the trainer's and the tools' writers are in
``trainer_misc.files``.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

__all__ = ["PICKLE_SUFFIXES", "SAFETENSORS_SUFFIXES", "TensorFileError", "load_tensor_file",
           "read_safetensors_metadata"]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


class TensorFileError(ValueError):
    """A file of tensors is missing, unreadable or has the wrong content. The message names the file."""


def load_tensor_file(path: str | os.PathLike) -> dict[str, torch.Tensor] | torch.Tensor:
    """Load a safetensors file (as a dict) or a reference ``.pt`` file (a tensor or a dict of tensors).

    Tensors are cloned out of the safetensors memory map: mapped buffers can be unaligned, which changes float
    results slightly and keeps the file open.
    """
    path = Path(path)
    if not path.is_file():
        raise TensorFileError(f"{path}: file does not exist")
    if path.stat().st_size == 0:
        raise TensorFileError(f"{path}: file is empty (zero bytes)")
    if path.suffix in SAFETENSORS_SUFFIXES:
        try:
            return {k: v.clone() for k, v in load_file(str(path)).items()}
        except SafetensorError as e:
            raise TensorFileError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise TensorFileError(f"{path}: refused to unpickle (only tensors and dicts of tensors are loaded, "
                                  f"with weights_only=True): {e}") from None
        except (RuntimeError, EOFError, ValueError) as e:
            raise TensorFileError(f"{path}: not a readable torch file ({e})") from None
        if isinstance(obj, torch.Tensor):
            return obj
        if isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
        raise TensorFileError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")
    raise TensorFileError(f"{path}: unknown file type {path.suffix!r}; expected .safetensors, or .pt/.pth/.bin "
                          "written by the reference tools")


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty when there is none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise TensorFileError(f"{path}: cannot read the safetensors header ({e})") from None
