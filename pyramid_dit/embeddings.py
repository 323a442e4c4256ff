"""Conditioning embeddings and rotary position tables of the Pyramid Flow miniFLUX DiT.

Parameter names (``linear_1``/``linear_2``, ``timestep_embedder``/``text_embedder``) follow the released
checkpoint, so these modules load it unchanged.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_sinusoids(timesteps: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of 0-1000-scale timesteps, ``[N] -> [N, dim]`` float32, cosines first.

    Frequencies are ``max_period ** (-i / (dim/2))`` (no frequency shift): the FLUX/SD3 convention the
    checkpoint was trained with.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (one per text row), got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLPEmbedder(nn.Module):
    """``linear_1 -> SiLU -> linear_2``: the timestep MLP and the pooled-text projection share this shape."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepTextEmbedding(nn.Module):
    """Per-row conditioning vector: MLP(sinusoids(t)) + MLP(pooled text embedding).

    It modulates every token of its row (text and video alike) through the adaptive norms.
    """

    def __init__(self, dim: int, pooled_projection_dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.timestep_embedder = MLPEmbedder(frequency_dim, dim)
        self.text_embedder = MLPEmbedder(pooled_projection_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled_projection: torch.Tensor) -> torch.Tensor:
        t_feat = timestep_sinusoids(timestep, self.frequency_dim).to(pooled_projection.dtype)
        return self.timestep_embedder(t_feat) + self.text_embedder(pooled_projection)


# --------------------------------------------------------------------------------------------------------
# Rotary position embedding over (time, height, width)
# --------------------------------------------------------------------------------------------------------

def clip_positions(frames: int, height: int, width: int, grid_height: int, grid_width: int,
                   first_frame: int, device: torch.device | None = None) -> torch.Tensor:
    """(t, y, x) positions of a clip's ``frames*height*width`` tokens, ``[N, 3]`` float32, row-major t-h-w.

    A clip coarser than the column's last clip (``grid_height`` x ``grid_width`` tokens) gets that grid's
    integer positions resized to its own size by half-pixel linear interpolation, so a low-resolution history
    frame covers the same image area as the frame being predicted (8 -> 4 gives 0.5, 2.5, 4.5, 6.5).
    """
    def axis(size: int, grid: int) -> torch.Tensor:
        pos = torch.arange(grid, dtype=torch.float32, device=device)
        if size != grid:
            pos = F.interpolate(pos[None, None], size=size, mode="linear", align_corners=False)[0, 0]
        return pos

    t = torch.arange(first_frame, first_frame + frames, dtype=torch.float32, device=device)
    y, x = axis(height, grid_height), axis(width, grid_width)
    grid = torch.stack(torch.meshgrid(t, y, x, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def rope_tables(positions: torch.Tensor, axes_dims: Sequence[int], theta: float = 10000.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables ``(cos, signed_sin)``, each ``[N, head_dim]`` float32, for ``positions`` ``[N, n_axes]``.

    Axis ``a`` owns ``axes_dims[a] / 2`` consecutive channel pairs with frequencies
    ``theta ** (-2i / axes_dims[a])``. Angles are formed in float64 and rounded once to float32, as the
    checkpoint's reference does (positions reach the hundreds at 768p, where float32 angles drift). Each
    pair's entries are repeated for both of its channels, the sine with sign (-, +), which is the form
    :func:`apply_rope` consumes.
    """
    if positions.shape[-1] != len(axes_dims):
        raise ValueError(f"positions have {positions.shape[-1]} axes but axes_dims_rope has {len(axes_dims)}")
    angles = []
    for a, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim))
        angles.append(positions[:, a].to(torch.float64)[:, None] * freqs[None, :])
    angle = torch.cat(angles, dim=-1)
    cos, sin = torch.cos(angle).float(), torch.sin(angle).float()
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs ``(x[2i], x[2i+1])`` of ``x`` ``[..., head_dim]`` by the tables' angles.

    ``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)``: each pair is read as the complex number ``x0 + i x1``
    and multiplied by ``cos + i sin`` (tables from :func:`rope_tables`, broadcasting against ``x``). One complex
    multiply is one pass over ``x`` forward and one backward, bit-equal to the real formula (no fused
    multiply-add), where the real form needs a pair swap (a copy) and four passes each way.
    """
    rotation = torch.complex(cos[..., 0::2], signed_sin[..., 1::2])
    pairs = torch.view_as_complex(x.contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2)


# --------------------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos patch positions (SD3 kind)
# --------------------------------------------------------------------------------------------------------

def sincos_table_2d(embed_dim: int, grid_size: int, base_size: int) -> torch.Tensor:
    """The SD3 kind's fixed ``[grid_size**2, embed_dim]`` float32 position table, row-major over (row, col).

    Coordinates are ``arange(grid_size) / (grid_size / base_size)`` in float32; the first half of the channels
    encodes the column, the second half the row, each as ``[sin, cos]`` of the coordinate times
    ``10000 ** (-i / (embed_dim / 4))`` (angles in float64, rounded once).
    """
    if embed_dim % 4:
        raise ValueError(f"the sin-cos position table needs a width divisible by 4, got {embed_dim}")
    coord = torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.to(torch.float64)[:, None] * omega[None, :]
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)

    rows, cols = torch.meshgrid(coord, coord, indexing="ij")
    return torch.cat([encode(cols.reshape(-1)), encode(rows.reshape(-1))], dim=-1).float()
