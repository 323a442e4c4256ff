"""Deterministic building blocks of the Pyramid Flow training objective.

Nothing here draws random numbers: the spatial pyramids of latents and noise, the assignment of batch columns to
stages, and the autoregressive bookkeeping (how many units each stage trains on
a given rank and step, and which history clips a column sees at which resolution). The random part lives in
:mod:`pyramid_dit.objective`.

Latents are ``[batch, channels, frames, height, width]`` throughout; pyramid lists are ordered lowest
resolution first, as the DiT expects its columns.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------- pyramids
def _check_5d(x: torch.Tensor, name: str) -> None:
    if x.ndim != 5:
        raise ValueError(f"{name} must be [batch, channels, frames, height, width], got shape {tuple(x.shape)}")


def check_pyramid_size(height: int, width: int, num_stages: int) -> None:
    """Each stage halves the grid, so ``height`` and ``width`` must be divisible by ``2**(num_stages - 1)``."""
    factor = 2 ** (num_stages - 1)
    if height % factor or width % factor:
        raise ValueError(
            f"latent height x width {height}x{width} is not divisible by {factor}, which {num_stages} pyramid "
            f"stages need (each halves the grid); resize or crop the videos to a multiple of {8 * factor} pixels"
        )


def _halve_bilinear(x: torch.Tensor) -> torch.Tensor:
    """Bilinear 2x spatial downsampling of every frame (frames are folded into the batch).

    The result is a ``[B, C, T, H/2, W/2]`` view of frame-major ``[B, T, C, H/2, W/2]`` storage. The objective
    relies on that layout: ``torch.randn_like`` fills memory in storage order, so it is part of what makes the
    history-corruption noise identical to the reference implementation for the same seed.
    """
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)
    frames = F.interpolate(frames, size=(h // 2, w // 2), mode="bilinear")
    return frames.reshape(b, t, c, h // 2, w // 2).transpose(1, 2)


def spatial_pyramid(latents: torch.Tensor, num_stages: int) -> List[torch.Tensor]:
    """``num_stages`` resolutions of ``latents``, lowest first; each level halves the previous bilinearly.

    The last entry is ``latents`` itself (not a copy).
    """
    _check_5d(latents, "latents")
    check_pyramid_size(latents.shape[-2], latents.shape[-1], num_stages)
    levels = [latents]
    for _ in range(num_stages - 1):
        levels.append(_halve_bilinear(levels[-1]))
    return levels[::-1]


def noise_pyramid(noise: torch.Tensor, num_stages: int) -> List[torch.Tensor]:
    """Like :func:`spatial_pyramid`, but each halving is multiplied by 2.

    Bilinear 2x downsampling of white noise averages 2x2 cells (variance / 4); the factor 2 restores unit
    variance, so the noise of every stage is standard normal and all stages share one draw.
    """
    _check_5d(noise, "noise")
    check_pyramid_size(noise.shape[-2], noise.shape[-1], num_stages)
    levels = [noise]
    for _ in range(num_stages - 1):
        levels.append(_halve_bilinear(levels[-1]) * 2)
    return levels[::-1]


def upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x spatial upsampling of every frame (how a stage hands its result to the next)."""
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)
    frames = F.interpolate(frames, size=(2 * h, 2 * w), mode="nearest")
    return frames.reshape(b, t, c, 2 * h, 2 * w).transpose(1, 2)


# ------------------------------------------------------------------------------------------ column layout
def column_stages(sample_ratios: Sequence[int]) -> List[int]:
    """Stage of each batch column: stage ``k`` gets ``sample_ratios[k]`` consecutive columns.

    Batch row ``r`` belongs to column ``r % len(columns)``; e.g. ratios ``[1, 2, 1]`` give columns
    ``[0, 1, 1, 2]`` and a batch of 8 puts rows 0, 4 in the low-resolution column, rows 3, 7 in the high one.
    """
    if any(int(r) != r or r < 0 for r in sample_ratios) or sum(sample_ratios) < 1:
        raise ValueError(f"sample_ratios must be non-negative integers with a positive sum, got {sample_ratios}")
    return [stage for stage, count in enumerate(sample_ratios) for _ in range(int(count))]


# ------------------------------------------------------------------------------- autoregressive bookkeeping
def num_units(num_frames: int, frame_per_unit: int) -> int:
    """Units in a latent clip of ``num_frames``: the first frame alone, then groups of ``frame_per_unit``."""
    return 1 + (num_frames - 1) // frame_per_unit


def unit_frames(first_unit: int, end_unit: int, frame_per_unit: int) -> slice:
    """Frame slice covering units ``first_unit .. end_unit - 1`` (unit 0 is frame 0 alone)."""
    start = 0 if first_unit == 0 else 1 + (first_unit - 1) * frame_per_unit
    return slice(start, 1 + (end_unit - 1) * frame_per_unit)


def sample_stage_length(
    *,
    num_stages: int,
    step: int,
    rank: int,
    max_temporal_length: int,
    frame_per_unit: int,
    video_sync_group: int,
    max_units: Optional[int] = None,
) -> List[int]:
    """Units per stage ``[low, ..., high]`` that one rank trains at one step of AR training.

    The ``video_sync_group`` ranks of a group receive the same video. Rank position ``p = rank % group`` trains
    the highest stage on unit ``p + 1 + turn * group`` (1-based), where ``turn`` cycles over the
    ``units // group`` turns with the step, so a group covers every unit position of the video. The lower
    stages train on the complementary length ``1 + units - high``, which keeps the tokens per rank balanced
    (long low-resolution sequences where the high-resolution one is short). Counts are capped at
    ``max_units`` (the units of a clip shorter than ``max_temporal_length``).

    ``step`` counts this rank's calls from 0; the reference increments its counter before using it, so at call
    ``step`` it uses ``step + 1`` (hence ``(step + 1) % turns`` below).
    """
    units_in_training = num_units(max_temporal_length, frame_per_unit)
    turns = units_in_training // video_sync_group
    if turns < 1:
        raise ValueError(
            f"video_sync_group ({video_sync_group}) exceeds the units of a training clip ({units_in_training} "
            f"for max_temporal_length {max_temporal_length}, frame_per_unit {frame_per_unit}); lower "
            "video_sync_group (it should divide max_temporal_length)"
        )
    turn = (step + 1) % turns
    high = max(rank % video_sync_group + 1 + turn * video_sync_group, 1)
    low = max(1 + units_in_training - high, 1)
    if max_units is not None:
        high, low = min(high, max_units), min(low, max_units)
    return [low] * (num_stages - 1) + [high]


class HistoryClip(NamedTuple):
    """A condition clip: units ``first_unit .. end_unit - 1`` shown at pyramid level ``stage``."""

    stage: int
    first_unit: int
    end_unit: int


def history_plan(stage: int, units: int) -> List[HistoryClip]:
    """Condition clips, newest first, for a column that trains unit ``units - 1`` at ``stage``.

    The temporal pyramid compresses older history: the newest condition unit is shown at the column's own
    resolution, the ones before it at one stage lower each (one unit per stage, down to stage 1), and all older
    units together at stage 0.
    """
    if units <= 1:
        return []
    plan = [HistoryClip(stage, units - 2, units - 1)]
    next_unit = units - 2  # units [0, next_unit) are still to be placed
    for lower in range(stage - 1, 0, -1):
        if next_unit == 0:
            break
        plan.append(HistoryClip(lower, next_unit - 1, next_unit))
        next_unit -= 1
    if next_unit > 0:
        plan.append(HistoryClip(0, 0, next_unit))
    return plan
