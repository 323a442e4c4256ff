"""Every random draw of a generation run, behind one interface (:class:`NoiseSource`).

The sampler draws: the full-resolution initial noise (shrunk to the lowest stage like training noise), one block-noise
draw per stage jump, and, for image-to-video, the VAE posterior sample of the image. :class:`GeneratorNoise` draws
them from a seeded CPU generator, so a seed gives the same video on any device; :class:`ReplayNoise` replays recorded
draws (used to check parity with the reference).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from pyramid_dit.block_noise import sample_block_noise


class NoiseSource:
    """Every random draw of one generation run. Subclass to record, replay or control the randomness.

    Each method returns a float32 tensor of exactly ``shape`` (on any device; the pipeline moves it).
    """

    def initial(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal latent noise ``[B, C, T, H, W]`` at full latent resolution, drawn once per run."""
        raise NotImplementedError

    def block(self, shape: Sequence[int], gamma: float) -> torch.Tensor:
        """Correlated 2x2 block noise (covariance ``(1 + gamma) I - gamma J`` per block), once per stage jump."""
        raise NotImplementedError

    def posterior(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal ``eps`` for sampling the VAE latent of an image-to-video input image."""
        raise NotImplementedError


class GeneratorNoise(NoiseSource):
    """Draws from a CPU ``torch.Generator`` (seeded with ``seed``, or torch's global generator when ``None``).

    Draws happen on the CPU and are moved to the device afterwards, so a seed gives the same noise, hence the
    same video up to kernel rounding, on every device.
    """

    def __init__(self, seed: Optional[int] = None):
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def initial(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator)

    def block(self, shape: Sequence[int], gamma: float) -> torch.Tensor:
        return sample_block_noise(shape, gamma, generator=self.generator)

    def posterior(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator)


class ReplayNoise(NoiseSource):
    """Returns recorded draws: ``initial``, then ``blocks`` in call order (and ``posterior`` for i2v).

    Shapes are checked, and running out of recorded draws is an error, so a replay cannot silently diverge.
    """

    def __init__(self, initial: torch.Tensor, blocks: Sequence[torch.Tensor],
                 posterior: Optional[torch.Tensor] = None):
        self._initial = initial
        self._blocks = list(blocks)
        self._posterior = posterior
        self.blocks_used = 0

    @staticmethod
    def _checked(what: str, tensor: Optional[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
        if tensor is None:
            raise ValueError(f"ReplayNoise: no recorded {what} draw")
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"ReplayNoise: recorded {what} has shape {tuple(tensor.shape)}, the pipeline asks "
                             f"for {tuple(shape)}; the replayed run had different settings")
        return tensor.float()

    def initial(self, shape: Sequence[int]) -> torch.Tensor:
        return self._checked("initial noise", self._initial, shape)

    def block(self, shape: Sequence[int], gamma: float) -> torch.Tensor:
        if self.blocks_used >= len(self._blocks):
            raise ValueError(f"ReplayNoise: the pipeline asks for block noise #{self.blocks_used} but only "
                             f"{len(self._blocks)} were recorded")
        tensor = self._checked(f"block noise #{self.blocks_used}", self._blocks[self.blocks_used], shape)
        self.blocks_used += 1
        return tensor

    def posterior(self, shape: Sequence[int]) -> torch.Tensor:
        return self._checked("posterior noise", self._posterior, shape)
