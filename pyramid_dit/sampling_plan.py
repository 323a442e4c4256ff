"""What a sampling run will do, decided before any model runs: which latent frames are denoised together (the
*units*), how many Euler steps each stage takes, and whether the pixel size fits the pyramid.

Two sampling modes, matching the two training objectives (:mod:`pyramid_dit.objective`):

* ``"ar"``: the first latent frame is a unit of its own, then groups of ``frame_per_unit`` frames; units are
  denoised one after another, each conditioned on the ones before it (the temporal-pyramid objective);
* ``"full_sequence"``: all latent frames are one unit, denoised jointly with no history (the objective without
  the temporal pyramid, and image training, where the one frame is the whole sequence).

Both run the same per-unit stage loop in :class:`pyramid_dit.pipeline.PyramidFlowPipeline`; with one latent frame
(an image) the two modes are the same computation.
"""
from __future__ import annotations

from typing import List, Sequence, Union

from pyramid_dit.pyramid import num_units, unit_frames
from pyramid_dit.training_record import SAMPLING_MODES

VAE_DOWNSAMPLE = 8  # pixels per latent cell


def frame_units(temp: int, mode: str, frame_per_unit: int) -> List[slice]:
    """The latent-frame slices denoised together, in generation order."""
    if mode not in SAMPLING_MODES:
        raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
    if temp < 1:
        raise ValueError(f"temp={temp}: needs at least one latent frame")
    if mode == "full_sequence":
        return [slice(0, temp)]
    if (temp - 1) % frame_per_unit:
        raise ValueError(f"temp={temp}: autoregressive sampling needs 1 + k * frame_per_unit ({frame_per_unit}) "
                         "latent frames, k >= 0")
    return [unit_frames(unit, unit + 1, frame_per_unit) for unit in range(num_units(temp, frame_per_unit))]


def per_stage_steps(steps: Union[int, Sequence[int]], num_stages: int, name: str) -> List[int]:
    """One Euler step count per pyramid stage, from one count for all stages or a list."""
    steps = [steps] * num_stages if isinstance(steps, int) else [int(s) for s in steps]
    if len(steps) == 1:
        steps = steps * num_stages
    if len(steps) != num_stages or any(s < 1 for s in steps):
        raise ValueError(f"{name} must be one positive step count or one per stage ({num_stages}), got {steps}")
    return steps


def check_pixel_size(height: int, width: int, num_stages: int) -> None:
    """The latent (pixels / 8) is halved ``num_stages - 1`` times and the lowest stage must still be cut into 2x2
    patches: multiples of ``8 * 2**(num_stages - 1) * 2`` pixels (64 for the usual 3 stages)."""
    multiple = VAE_DOWNSAMPLE * 2 ** num_stages
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"height and width must be positive multiples of {multiple} pixels ({num_stages} pyramid "
                         f"stages halve the latent {num_stages - 1} times, then 2x2 patches), got {height}x{width}")
