"""Resize-and-crop to a target size: the one helper behind video-latent extraction, text-to-image training images and
image-to-video input images.

Every use scales the source by one factor so that it covers ``width x height``, then crops. The reference
(jy0205/Pyramid-Flow) uses two size rules, and each of our uses follows the reference's rule for that use:

* ``"round"`` — video latent extraction (``tools/extract_video_vae_latents.py``) and the demo's image-to-video
  input: ``scale = max(width / w, height / h)``, size ``(round(w * scale), round(h * scale))``.
* ``"t2i"`` — the reference's text-to-image dataset: a shorter-edge resize (torchvision's rule: the longer edge is
  ``int(new_short * long / short)``) to ``max(ceil(long_t * short / long), short_t)`` when source and target have
  the same orientation, else ``max(ceil(short_t * long / short), long_t)`` (``long_t`` / ``short_t``: the target's
  longer / shorter side). Across orientations this zooms in further than a minimal cover; it is kept because the
  released image model was trained on such crops.

Crops: centre offset ``round((size - target) / 2)`` with Python's rounding (torchvision ``center_crop`` and PIL's
``crop`` of the reference's fractional box both give it); ``"random"``: uniform in ``[0, size - target]`` (as
torchvision ``RandomCrop``), drawn from the given ``torch.Generator``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

SIZE_RULES = ("round", "t2i")
CROP_MODES = ("center", "random")


def cover_size(src_w: int, src_h: int, width: int, height: int, rule: str = "round") -> tuple[int, int]:
    """Size ``(w, h)`` the source is resized to before cropping ``width x height`` (see the module docstring)."""
    if rule == "round":
        scale = max(width / src_w, height / src_h)
        return round(src_w * scale), round(src_h * scale)
    if rule != "t2i":
        raise ValueError(f"unknown size rule {rule!r}; expected one of {SIZE_RULES}")
    same_orientation = (height / width - 1) * (src_h / src_w - 1) >= 0
    short, long = min(src_w, src_h), max(src_w, src_h)
    if same_orientation:
        new_short = max(math.ceil(max(width, height) * short / long), min(width, height))
    else:
        new_short = max(math.ceil(min(width, height) * long / short), max(width, height))
    new_long = int(new_short * long / short)
    return (new_short, new_long) if src_w <= src_h else (new_long, new_short)


def crop_offset(size: int, target: int, mode: str = "center", generator: Optional[torch.Generator] = None) -> int:
    """Start of a ``target``-long crop of a ``size``-long side."""
    if target > size:
        raise ValueError(f"cannot crop {target} pixels out of {size}")
    if mode == "center":
        return int(round((size - target) / 2.0))
    if mode == "random":
        return int(torch.randint(0, size - target + 1, (1,), generator=generator))
    raise ValueError(f"unknown crop mode {mode!r}; expected one of {CROP_MODES}")


def resize_crop_image(image: "PIL.Image.Image", width: int, height: int, *, rule: str = "round",  # noqa: F821
                      resample: str = "lanczos", crop: str = "center",
                      generator: Optional[torch.Generator] = None) -> "PIL.Image.Image":  # noqa: F821
    """A PIL image covering ``width x height`` (``resample``: ``"lanczos"`` as the reference's i2v demo,
    ``"bicubic"`` as its t2i dataset), cropped to exactly that size. The top offset is drawn before the left one,
    as torchvision's ``RandomCrop`` does."""
    from PIL import Image

    filters = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC}
    if resample not in filters:
        raise ValueError(f"unknown resample filter {resample!r}; expected one of {sorted(filters)}")
    new_w, new_h = cover_size(image.width, image.height, width, height, rule)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample=filters[resample])
    top = crop_offset(new_h, height, crop, generator)
    left = crop_offset(new_w, width, crop, generator)
    return image.crop((left, top, left + width, top + height))


def resize_crop_frames(frames: torch.Tensor, width: int, height: int, chunk: int = 16) -> torch.Tensor:
    """uint8 video frames ``[T, H, W, 3]`` -> float ``[T, 3, height, width]`` in [0, 1]: rule ``"round"``, bicubic
    antialiased resize (torch, as the reference's torchvision tensor transform), centre crop.

    Works ``chunk`` frames at a time so a long high-resolution clip never exists as one float tensor. Values may
    overshoot [0, 1] slightly (bicubic), as in the reference; no clamping.
    """
    t, src_h, src_w, _ = frames.shape
    new_w, new_h = cover_size(src_w, src_h, width, height)
    top, left = crop_offset(new_h, height), crop_offset(new_w, width)
    out = torch.empty(t, 3, height, width)
    for start in range(0, t, chunk):
        x = frames[start:start + chunk].permute(0, 3, 1, 2).float() / 255.0
        if (new_h, new_w) != (src_h, src_w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        out[start:start + chunk] = x[:, :, top:top + height, left:left + width]
    return out
