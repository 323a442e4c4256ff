"""Building blocks of the causal video VAE: resnet block, frame attention, down/up samplers and the per-level blocks.

Attribute names (``resnets``, ``downsamplers.0.conv``, ``to_out.0`` ...) are chosen so that ``state_dict`` keys are
exactly those of the released Pyramid Flow ``causal_video_vae`` checkpoint.

Every ``forward`` takes an optional :data:`~video_vae.causal_conv.ConvCache` and hands it to its causal convs; see
:mod:`video_vae.causal_conv` for what it carries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.activations import get_activation
from torch import Tensor, nn

from video_vae.causal_conv import CausalConv3d, CausalGroupNorm, ConvCache, conv_layout, from_channels_last

NORM_EPS = 1e-6


def activate(act: nn.Module, x: Tensor) -> Tensor:
    """``act(x)`` for a freshly computed ``x``; without autograd, SiLU overwrites ``x`` instead of allocating.

    Inference is memory-bound around the convolutions: on CPU every new activation-sized buffer is also
    first-touched page by page (a 17 x 128 x 192 x 32 float32 activation is 53 MB, ~13k page faults).
    """
    if isinstance(act, nn.SiLU) and not torch.is_grad_enabled():
        return F.silu(x, inplace=True)
    return act(x)


class CausalResnetBlock3D(nn.Module):
    """Pre-norm residual block: (norm, act, causal conv) twice, plus a 1x1x1 shortcut when the width changes."""

    def __init__(
        self, in_channels: int, out_channels: int, groups: int, act_fn: str, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = CausalGroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = CausalConv3d(in_channels, out_channels, kernel_size=3)
        self.norm2 = CausalGroupNorm(groups, out_channels, eps=NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, kernel_size=3)
        self.nonlinearity = get_activation(act_fn)
        self.conv_shortcut = (
            CausalConv3d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        h = self.conv1(activate(self.nonlinearity, self.norm1(x)), cache)
        h = self.conv2(self.dropout(activate(self.nonlinearity, self.norm2(h))), cache)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x, cache)
        return x + h if torch.is_grad_enabled() else h.add_(x)  # h is the conv's fresh output


class FrameAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame (never across frames), with a residual.

    Same computation and parameter names as diffusers' ``Attention(..., heads=1, norm_num_groups=g,
    residual_connection=True, _from_deprecated_attn_block=True)``, which the reference used.
    """

    # diffusers' ``ModelMixin`` renames the pre-2023 attention keys (query/key/value/proj_attn) of modules carrying
    # this flag when it loads a checkpoint, so such old files load here exactly as they did in the reference.
    _from_deprecated_attn_block = True

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # index 0 keeps the ``to_out.0`` key

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h * w)
        tokens = self.group_norm(frames).transpose(1, 2)  # (b t, h w, c)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[0](out).transpose(1, 2) + frames
        return conv_layout(out.reshape(b, t, c, h, w).transpose(1, 2))


class SpatialDownsample2x(nn.Module):
    """Halves height and width with a stride-(1, 2, 2) causal conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, kernel_size=3, stride=(1, 2, 2))

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        return self.conv(x, cache)


class TemporalDownsample2x(nn.Module):
    """Halves the frame count (``1 + 2k -> 1 + k``) with a stride-(2, 1, 1) causal conv; frame 0 maps to frame 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, kernel_size=3, stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        return self.conv(x, cache)


class SpatialUpsample2x(nn.Module):
    """Doubles height and width: causal conv to 4x the channels, then depth-to-space (pixel shuffle)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels * 4, kernel_size=3)

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        y = self.conv(x, cache)
        b, c4, t, h, w = y.shape
        # channel index c * 4 + i * 2 + j  ->  pixel (2h + i, 2w + j)
        y = y.unflatten(1, (c4 // 4, 2, 2)).permute(0, 4, 5, 2, 6, 3, 1)  # [b, t, h, i, w, j, c]
        return from_channels_last(y.reshape(b, t, h * 2, w * 2, c4 // 4))


class TemporalUpsample2x(nn.Module):
    """Doubles the frame count: causal conv to 2x the channels, then depth-to-time.

    The first frame of a clip is an image, encoded alone; its upsampled pair's first half has no counterpart in the
    input video, so it is dropped when ``is_init_image`` (``1 + k -> 1 + 2k`` frames).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels * 2, kernel_size=3)

    def forward(self, x: Tensor, cache: ConvCache | None = None, is_init_image: bool = True) -> Tensor:
        y = self.conv(x, cache)
        b, c2, t, h, w = y.shape
        # channel index c * 2 + p  ->  frame 2t + p
        y = y.unflatten(1, (c2 // 2, 2)).permute(0, 3, 2, 4, 5, 1)  # [b, t, p, h, w, c]
        y = from_channels_last(y.reshape(b, t * 2, h, w, c2 // 2))
        return y[:, :, 1:] if is_init_image else y


class CausalMidBlock(nn.Module):
    """resnet -> frame attention -> resnet, at the lowest resolution."""

    def __init__(self, channels: int, groups: int, act_fn: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [CausalResnetBlock3D(channels, channels, groups, act_fn, dropout) for _ in range(2)]
        )
        self.attentions = nn.ModuleList([FrameAttention(channels, groups)])

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        x = self.resnets[0](x, cache)
        x = self.attentions[0](x)
        return self.resnets[1](x, cache)


class DownEncoderBlockCausal3D(nn.Module):
    """Encoder level: ``num_layers`` resnets, then optional spatial and temporal 2x downsampling (in that order)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        act_fn: str,
        spatial_downsample: bool,
        temporal_downsample: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                CausalResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn, dropout)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = nn.ModuleList([SpatialDownsample2x(out_channels)]) if spatial_downsample else None
        self.temporal_downsamplers = (
            nn.ModuleList([TemporalDownsample2x(out_channels)]) if temporal_downsample else None
        )

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, cache)
        if self.temporal_downsamplers is not None:
            x = self.temporal_downsamplers[0](x, cache)
        return x


class UpDecoderBlockCausal3D(nn.Module):
    """Decoder level: ``num_layers`` resnets, then optional spatial and temporal 2x upsampling (in that order)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        act_fn: str,
        spatial_upsample: bool,
        temporal_upsample: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                CausalResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn, dropout)
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nn.ModuleList([SpatialUpsample2x(out_channels)]) if spatial_upsample else None
        self.temporal_upsamplers = nn.ModuleList([TemporalUpsample2x(out_channels)]) if temporal_upsample else None

    def forward(self, x: Tensor, cache: ConvCache | None = None, is_init_image: bool = True) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        if self.temporal_upsamplers is not None:
            x = self.temporal_upsamplers[0](x, cache, is_init_image=is_init_image)
        return x
