"""Encoder and decoder stacks of the causal video VAE, and the diagonal Gaussian posterior."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.activations import get_activation
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from video_vae.blocks import NORM_EPS, CausalMidBlock, DownEncoderBlockCausal3D, UpDecoderBlockCausal3D, activate
from video_vae.causal_conv import CausalConv3d, CausalGroupNorm, ConvCache


class CausalVaeEncoder(nn.Module):
    """conv_in -> down blocks -> mid block -> norm, act, conv_out to ``2 * latent_channels`` (mean and log-variance)."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: Sequence[int],
        spatial_down_sample: Sequence[bool],
        temporal_down_sample: Sequence[bool],
        block_dropout: Sequence[float],
        norm_num_groups: int,
        act_fn: str,
    ) -> None:
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0], kernel_size=3)
        self.down_blocks = nn.ModuleList()
        prev = block_out_channels[0]
        for i, width in enumerate(block_out_channels):
            self.down_blocks.append(
                DownEncoderBlockCausal3D(
                    prev, width, layers_per_block[i], norm_num_groups, act_fn,
                    spatial_down_sample[i], temporal_down_sample[i], block_dropout[i],
                )
            )
            prev = width
        self.mid_block = CausalMidBlock(prev, norm_num_groups, act_fn, block_dropout[-1])
        self.conv_norm_out = CausalGroupNorm(norm_num_groups, prev, eps=NORM_EPS)
        self.conv_act = get_activation(act_fn)
        self.conv_out = CausalConv3d(prev, 2 * latent_channels, kernel_size=3)

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(activate(self.conv_act, self.conv_norm_out(x)), cache)


class CausalVaeDecoder(nn.Module):
    """conv_in -> mid block -> up blocks (widths reversed) -> norm, act, conv_out to pixels."""

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: Sequence[int],
        spatial_up_sample: Sequence[bool],
        temporal_up_sample: Sequence[bool],
        block_dropout: Sequence[float],
        norm_num_groups: int,
        act_fn: str,
    ) -> None:
        super().__init__()
        widths = list(reversed(block_out_channels))
        self.conv_in = CausalConv3d(latent_channels, widths[0], kernel_size=3)
        self.mid_block = CausalMidBlock(widths[0], norm_num_groups, act_fn, block_dropout[-1])
        self.up_blocks = nn.ModuleList()
        prev = widths[0]
        for i, width in enumerate(widths):
            self.up_blocks.append(
                UpDecoderBlockCausal3D(
                    prev, width, layers_per_block[i], norm_num_groups, act_fn,
                    spatial_up_sample[i], temporal_up_sample[i], block_dropout[i],
                )
            )
            prev = width
        self.conv_norm_out = CausalGroupNorm(norm_num_groups, prev, eps=NORM_EPS)
        self.conv_act = get_activation(act_fn)
        self.conv_out = CausalConv3d(prev, out_channels, kernel_size=3)

    def forward(self, z: Tensor, cache: ConvCache | None = None, is_init_image: bool = True) -> Tensor:
        x = self.conv_in(z, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache, is_init_image=is_init_image)
        return self.conv_out(activate(self.conv_act, self.conv_norm_out(x)), cache)


class DiagonalGaussianDistribution:
    """Posterior ``N(mean, diag(std^2))`` from moments ``[mean, logvar]`` stacked on the channel dim.

    The log-variance is clamped to [-30, 20] (as in the reference and diffusers) to keep ``exp`` finite.
    """

    def __init__(self, parameters: Tensor) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """``mean + std * eps``; ``eps`` is drawn like diffusers' ``randn_tensor`` (CPU generators work anywhere)."""
        eps = randn_tensor(
            self.mean.shape, generator=generator, device=self.parameters.device, dtype=self.parameters.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean
