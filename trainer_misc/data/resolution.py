"""Training sizes: ``RESOLUTION`` (``384p``, ``768p`` or ``WIDTHxHEIGHT``) in pixels, and the image buckets.

Importable without torch: the launch checks use it before anything heavy starts.
"""
from __future__ import annotations

__all__ = ["IMAGE_BUCKETS", "RESOLUTIONS", "parse_resolution"]

# Training resolutions of the released checkpoints (width, height) in pixels; latents are 8x smaller.
RESOLUTIONS = {"384p": (640, 384), "768p": (1280, 768)}
# Aspect-ratio buckets (width, height) for image training, as in the reference t2i setup.
IMAGE_BUCKETS = {
    "384p": [(512, 512), (384, 640), (640, 384)],
    "768p": [(1024, 1024), (768, 1280), (1280, 768)],
}


def parse_resolution(resolution: str) -> tuple[int, int]:
    """``"384p"``, ``"768p"`` or ``"<W>x<H>"`` -> pixel ``(width, height)``, both multiples of 64.

    Multiples of 64 because a latent (8x smaller) must halve twice for the 3-stage pyramid and then split into
    2x2 patches.
    """
    if resolution in RESOLUTIONS:
        return RESOLUTIONS[resolution]
    try:
        w, h = (int(v) for v in resolution.lower().split("x"))
    except ValueError:
        raise ValueError(f"--resolution {resolution!r}: expected 384p, 768p or WIDTHxHEIGHT (e.g. 64x64)") from None
    if w <= 0 or h <= 0 or w % 64 or h % 64:
        raise ValueError(f"--resolution {resolution!r}: width and height must be positive multiples of 64 "
                         "(latents are 8x smaller and must halve twice for the pyramid, then split into 2x2 patches)")
    return w, h
