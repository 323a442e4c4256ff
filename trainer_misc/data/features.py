"""The pre-extracted training inputs: VAE latents and text features, their layouts and their checks.

Layouts (identical in our safetensors files and in the reference tools' ``.pt`` files, which are still accepted and
read weights-only through :func:`pyramid_dit.tensor_files.load_tensor_file`):

* latent: ``[1, C, T, h, w]`` (``C`` = 16 latent channels), the *raw* ``latent_dist.sample()`` of the causal VAE.
  The trainer applies the shift/scale normalisation itself. In safetensors the tensor is stored under ``"latent"``.
* text features: ``prompt_embed [1, L, D]`` float, ``prompt_attention_mask [1, L]`` integer (1 = token,
  0 = padding), ``pooled_prompt_embed [1, Dp]`` float.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open

from pyramid_dit.tensor_files import SAFETENSORS_SUFFIXES, TensorFileError, load_tensor_file

__all__ = ["LATENT_CHANNELS", "LATENT_KEY", "TEXT_FEATURE_KEYS", "check_latent", "check_text_features",
           "load_latent", "load_text_features"]

LATENT_KEY = "latent"
TEXT_FEATURE_KEYS = ("prompt_embed", "prompt_attention_mask", "pooled_prompt_embed")
LATENT_CHANNELS = 16


def check_latent(latent: torch.Tensor, *, source: str = "latent", channels: int | None = LATENT_CHANNELS) -> None:
    """Raise :class:`TensorFileError` unless ``latent`` is a finite float ``[1, C, T, h, w]`` tensor."""
    if latent.ndim != 5 or latent.shape[0] != 1:
        raise TensorFileError(f"{source}: expected a latent of shape [1, C, T, h, w], got {list(latent.shape)}")
    if channels is not None and latent.shape[1] != channels:
        raise TensorFileError(f"{source}: expected {channels} latent channels, got shape {list(latent.shape)}")
    if not latent.is_floating_point():
        raise TensorFileError(f"{source}: latent must be floating point, got {latent.dtype}")
    if not torch.isfinite(latent).all():
        raise TensorFileError(f"{source}: latent contains NaN or inf")


def load_latent(path: str | os.PathLike, *, channels: int | None = LATENT_CHANNELS,
                frames: int | None = None) -> torch.Tensor:
    """Load a raw VAE latent ``[1, C, T, h, w]`` in its stored dtype (the reference stored bf16).

    ``frames``: keep only the first ``frames`` latent frames. From a safetensors file only those bytes are read
    (a 10 s clip stored whole, trained on 16 frames, costs 16 frames of I/O); a ``.pt`` file is loaded whole.
    """
    path = Path(path)
    if frames is not None and path.suffix in SAFETENSORS_SUFFIXES and path.is_file() and path.stat().st_size:
        try:
            with safe_open(str(path), framework="pt") as f:
                if LATENT_KEY not in f.keys():
                    raise TensorFileError(f"{path}: no {LATENT_KEY!r} tensor (found {sorted(f.keys())})")
                part = f.get_slice(LATENT_KEY)
                if len(part.get_shape()) != 5:
                    raise TensorFileError(f"{path}: expected a latent of shape [1, C, T, h, w], "
                                        f"got {list(part.get_shape())}")
                latent = part[:, :, :frames].contiguous()
        except SafetensorError as e:
            raise TensorFileError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        obj = load_tensor_file(path)
        if isinstance(obj, dict):
            if LATENT_KEY not in obj:
                raise TensorFileError(f"{path}: no {LATENT_KEY!r} tensor (found {sorted(obj)})")
            latent = obj[LATENT_KEY]
        else:
            latent = obj
        if frames is not None:
            latent = latent[:, :, :frames]
    check_latent(latent, source=str(path), channels=channels)
    return latent


def check_text_features(fea: Mapping[str, torch.Tensor], *, source: str = "text features") -> None:
    """Raise :class:`TensorFileError` unless ``fea`` has the three text-feature tensors with consistent shapes."""
    missing = [k for k in TEXT_FEATURE_KEYS if k not in fea]
    if missing:
        raise TensorFileError(f"{source}: missing {missing} (found {sorted(fea)})")
    emb, mask, pooled = (fea[k] for k in TEXT_FEATURE_KEYS)
    if emb.ndim != 3 or emb.shape[0] != 1 or not emb.is_floating_point():
        raise TensorFileError(f"{source}: prompt_embed must be float [1, L, D], got {emb.dtype} {list(emb.shape)}")
    if mask.shape != emb.shape[:2] or mask.is_floating_point():
        raise TensorFileError(f"{source}: prompt_attention_mask must be integer [1, {emb.shape[1]}], "
                            f"got {mask.dtype} {list(mask.shape)}")
    if pooled.ndim != 2 or pooled.shape[0] != 1 or not pooled.is_floating_point():
        raise TensorFileError(f"{source}: pooled_prompt_embed must be float [1, Dp], "
                            f"got {pooled.dtype} {list(pooled.shape)}")
    if not (torch.isfinite(emb).all() and torch.isfinite(pooled).all()):
        raise TensorFileError(f"{source}: text features contain NaN or inf")


def load_text_features(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load ``{prompt_embed, prompt_attention_mask, pooled_prompt_embed}`` (each with a leading batch dim of 1)."""
    obj = load_tensor_file(path)
    if not isinstance(obj, dict):
        raise TensorFileError(f"{path}: expected a dict of text-feature tensors, got a single tensor")
    check_text_features(obj, source=str(path))
    return {k: obj[k] for k in TEXT_FEATURE_KEYS}
