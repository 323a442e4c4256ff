"""Correlated 2x2 block noise for Pyramid Flow's re-noising between stages.

When a stage ends, its latent is upsampled 2x with nearest neighbours: every 2x2 block of the new grid holds
four copies of one value, so the upsampled noise is perfectly correlated inside blocks. The sampler adds fresh
noise whose four values per block have covariance

    Sigma = (1 + gamma) * I - gamma * J        (J = the 4x4 all-ones matrix),

i.e. unit variance and covariance ``-gamma`` between any two values of a block. Mixed into the upsampled latent
it breaks up the blockwise-constant noise (the scheduler's module docstring and
``renoise_coefficients`` give the matching rescaling).

The reference implementation draws this block by block from ``MultivariateNormal`` in a Python loop. Besides
being slow (one distribution sample per 2x2 block: ~15k per latent frame at 384p), that fails for the released
``gamma = 1/3``: Sigma then has eigenvalue ``1 - 3 * gamma = 0`` (it is singular) and the positive-definiteness
check rejects it on some LAPACK builds.

Here the same distribution is drawn in one call, from its eigen-decomposition. ``J / 4`` projects onto the
block mean and ``I - J / 4`` onto the within-block deviations; they are orthogonal projectors with

    Sigma = (1 + gamma) * (I - J/4) + (1 - 3 * gamma) * (J/4).

So for ``z ~ N(0, I)`` per block, with block mean ``m = mean(z)``,

    x = sqrt(1 + gamma) * (z - m) + sqrt(1 - 3 * gamma) * m

has covariance exactly Sigma (``P P^T = P`` for a projector, cross terms vanish). At ``gamma = 1/3`` the second
term is zero: every block of the noise sums to zero.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import torch

if TYPE_CHECKING:
    from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler


def block_noise_covariance(gamma: float) -> torch.Tensor:
    """The 4x4 float64 covariance ``(1 + gamma) I - gamma J`` of one block (row-major 2x2 order)."""
    return (1 + gamma) * torch.eye(4, dtype=torch.float64) - gamma * torch.ones(4, 4, dtype=torch.float64)


def _coefficients(gamma: float) -> tuple[float, float]:
    """(within-block scale, block-mean scale): the square roots of Sigma's two eigenvalues."""
    if gamma < 0:
        raise ValueError(f"block noise gamma must be >= 0, got {gamma}")
    mean_eig = 1 - 3 * gamma
    if mean_eig < -1e-12:
        raise ValueError(
            f"block noise gamma={gamma} > 1/3 gives a covariance with a negative eigenvalue (1 - 3*gamma = "
            f"{mean_eig:.3g}); no Gaussian has it. Use the scheduler's gamma (1/3 for the released models)."
        )
    return math.sqrt(1 + gamma), math.sqrt(max(mean_eig, 0.0))


def correlate_blocks(white: torch.Tensor, gamma: float) -> torch.Tensor:
    """Map i.i.d. standard normal ``white`` ``[..., H, W]`` (``H``, ``W`` even) to block noise of the same shape.

    Deterministic given ``white``: the whole randomness is the caller's single ``randn``. Computed in the
    input's dtype.
    """
    *lead, h, w = white.shape
    if h % 2 or w % 2:
        raise ValueError(f"block noise needs an even height and width (2x2 blocks), got {h}x{w}")
    within, across = _coefficients(gamma)
    blocks = white.reshape(*lead, h // 2, 2, w // 2, 2)
    mean = blocks.mean(dim=(-3, -1), keepdim=True)
    out = within * (blocks - mean)
    if across:
        out = out + across * mean
    return out.reshape(white.shape)


def sample_block_noise(
    shape: Sequence[int],
    gamma: float,
    *,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Block noise of ``shape`` (``[..., H, W]``, e.g. ``[B, C, T, H, W]``) drawn with one ``randn`` call.

    The draw happens on ``generator``'s device (CPU when no generator is given and ``device`` is None), so the
    same seed gives the same noise whatever device the result is moved to afterwards.
    """
    gen_device = generator.device if generator is not None else (device or "cpu")
    white = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
    return correlate_blocks(white, gamma).to(device=device or gen_device)


def renoise_coefficients(scheduler: PyramidFlowMatchEulerDiscreteScheduler, stage: int) -> tuple[float, float]:
    """``(alpha, beta)`` of the jump into ``stage``: ``x <- alpha * up(x) + beta * block_noise``.

    At the jump the latent is ``s * data + (1 - s) * noise`` with ``s = 1 - ori_start_sigmas[stage]``, and nearest
    upsampling makes its noise constant on 2x2 blocks (covariance ``J`` per block). With block noise of covariance
    ``(1 + g) I - g J`` (g = gamma) and ``beta = alpha (1 - s) / sqrt(g)`` the ``J`` terms cancel, leaving white
    noise of std ``alpha (1 - s) sqrt(1 + 1/g)``; ``alpha`` makes that std and the signal weight ``alpha * s`` sum
    to 1, so the result lies on the stage's flow at the scheduler's corrected ``start_sigmas[stage] = 1 - alpha*s``.
    """
    if stage < 1:
        raise ValueError(f"stage jumps start at stage 1, got {stage}")
    gamma = scheduler.config.gamma
    signal = 1 - scheduler.ori_start_sigmas[stage]
    alpha = 1 / (math.sqrt(1 + 1 / gamma) * (1 - signal) + signal)
    beta = alpha * (1 - signal) / math.sqrt(gamma)
    return alpha, beta
