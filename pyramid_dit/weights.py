"""Loading DiT weights from a single state-dict file, strictly, and refusing broken (NaN / inf) weights.

Used by generation (``--dit_weight``), by training (``--dit_pretrained_weight``) and by the ZeRO-3 loader, which
reads the same tensors one at a time. Files are read through :func:`pyramid_dit.tensor_files.load_tensor_file`
(safetensors, or reference ``.pt`` files weights-only).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from pyramid_dit.tensor_files import load_tensor_file

__all__ = ["check_finite_weights", "load_dit_weights", "read_dit_state"]

logger = logging.getLogger(__name__)

_IGNORED_PREFIXES = ("vae.", "text_encoder")


def read_dit_state(path: Path) -> dict[str, torch.Tensor]:
    """The DiT tensors of a single-file state dict, under the model's key names (see ``load_dit_weights``)."""
    loaded = load_tensor_file(path)
    if isinstance(loaded, torch.Tensor):
        raise ValueError(f"{path}: holds a single tensor, expected a state dict (name -> tensor)")
    return {key[len("dit."):] if key.startswith("dit.") else key: value for key, value in loaded.items()
            if not key.startswith(_IGNORED_PREFIXES)}


def load_dit_weights(model: nn.Module, path: os.PathLike | str) -> None:
    """Load a single-file DiT state dict (``--dit_pretrained_weight``) into ``model``, strictly.

    Accepts ``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin`` read with ``torch.load(weights_only=True)``. Like the
    reference, keys of a full-pipeline checkpoint are mapped: a ``dit.`` prefix is stripped and ``vae.*`` /
    ``text_encoder*`` entries are ignored. Missing or unexpected keys, and shape mismatches, raise with the file
    name and the offending keys.
    """
    path = Path(path)
    state = read_dit_state(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return f"{len(keys)} {keys[:8]}{' ...' if len(keys) > 8 else ''}"
        raise KeyError(f"{path}: keys do not match the model {type(model).__name__}: missing {show(missing)}, "
                       f"unexpected {show(unexpected)}. Is it a checkpoint of the same model kind and variant?")
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
           for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {len(bad)} tensors, e.g. {bad[:5]}")
    check_finite_weights(state, str(path))
    model.load_state_dict(state, strict=True)
    logger.info("loaded %d tensors from %s", len(state), path)


def check_finite_weights(weights: nn.Module | Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` naming the first tensors with NaN or inf values (a diverged or damaged checkpoint
    would otherwise generate black videos without a word)."""
    items = weights.state_dict().items() if isinstance(weights, nn.Module) else weights.items()
    bad = [name for name, t in items if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"{source}: tensor {', '.join(bad[:3])}{more} contains NaN or inf values; these weights "
                         "are broken (a diverged run or a damaged file). Use an earlier checkpoint or export")
