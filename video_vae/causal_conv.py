"""Causal 3-D convolution and per-frame group norm: the two primitives every VAE layer is built from.

A causal conv never looks at future frames: in time it is padded only at the front, so output frame ``i`` depends on
input frames ``<= i``. Spatially it is an ordinary "same" convolution.

Long clips can be processed in temporal chunks. The chunks of one clip share a :data:`ConvCache`, a plain dict that
each :class:`CausalConv3d` uses to carry the last input frames of one chunk over to the front of the next, so that
chunked and whole-clip processing compute the same thing. The cache is created by the caller for one clip and
thrown away afterwards; modules hold no state between calls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ConvCache = dict[nn.Module, Tensor]
"""Per-clip streaming state: for each causal conv, the input frames the next chunk needs in front of it."""

# Inputs of at least this many elements per batch item go to oneDNN on CPU (see `_conv3d`). Below it torch's own
# kernel is as fast or faster (measured on 64-channel 3x3x3 convs: 5x16x24 frames favour torch's, 7x32x48 oneDNN).
MKLDNN_MIN_NUMEL = 256 * 1024


def _conv3d(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """``conv(x)``, on CPU inference routed to oneDNN when torch's kernel choice would not.

    torch picks its convolution kernel with a rule written for 2-D images: it counts ``N * C * D0 * D1`` of the
    input, which for a 5-D video ignores the width, so single clips under ~20k "elements" (e.g. 64 channels x 7
    frames x 32 rows, whatever the width) go to the unblocked ``slow_conv3d`` kernel, 2-5x slower than oneDNN on
    the VAE's shapes. Outputs agree to float32 rounding (~1e-6 relative). Only without autograd (extraction,
    generation): training keeps torch's own choice. Under ``torch.compile`` the plain conv is traced and inductor
    chooses (with frozen weights it takes oneDNN's prepacked convolutions).
    """
    if (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and x[0].numel() >= MKLDNN_MIN_NUMEL
            and x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] <= 20480  # torch would not pick oneDNN itself
            and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))):
        return torch.ops.aten.mkldnn_convolution(x.contiguous(), conv.weight, conv.bias, conv.padding, conv.stride,
                                                 conv.dilation, conv.groups)
    return conv(x)


def _triple(value: int | tuple[int, int, int], name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    if len(value) != 3:
        raise ValueError(f"{name} must be an int or a (time, height, width) triple, got {value!r}")
    return tuple(value)  # type: ignore[return-value]


class CausalConv3d(nn.Module):
    """3-D convolution that is causal in time and "same"-padded in space.

    In time the input is front-padded with ``kernel_t - 1`` zero frames (the start of a clip). When a ``cache`` is
    given and holds this module's entry, the previous chunk's trailing frames are used instead of the zeros, and the
    frames the next chunk will need are stored back. With stride ``s_t`` the next output window starts
    ``kernel_t - s_t`` frames before the end of the padded input, so that is how many frames are carried.

    The weights live in ``self.conv`` (an ``nn.Conv3d``) so checkpoint keys read ``<name>.conv.weight``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kernel_t, kernel_h, kernel_w = _triple(kernel_size, "kernel_size")
        stride_t, _, _ = stride3 = _triple(stride, "stride")
        if kernel_h % 2 == 0 or kernel_w % 2 == 0:
            raise ValueError(f"spatial kernel sizes must be odd for 'same' padding, got {kernel_h}x{kernel_w}")
        if stride_t > kernel_t:
            raise ValueError(f"temporal stride {stride_t} larger than temporal kernel {kernel_t} would skip frames")
        self.time_pad = kernel_t - 1
        self.time_stride = stride_t
        self.carry_frames = kernel_t - stride_t
        # Spatial zero padding is done by the convolution itself (no padded copy of the activation).
        self.conv = nn.Conv3d(
            in_channels, out_channels, (kernel_t, kernel_h, kernel_w), stride=stride3,
            padding=(0, kernel_h // 2, kernel_w // 2), bias=bias,
        )

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        if self.time_pad > 0:
            front = cache.get(self) if cache is not None else None
            if front is None:  # start of the clip
                front = x.new_zeros(x.shape[0], x.shape[1], self.time_pad, *x.shape[3:])
            x = torch.cat([front, x], dim=2)
            if cache is not None:
                if self.time_stride > 1 and (x.shape[2] - self.time_pad - 1) % self.time_stride != 0:
                    raise ValueError(
                        f"temporal chunk of {x.shape[2] - front.shape[2]} frames does not end on a stride-"
                        f"{self.time_stride} boundary of this conv; chunk lengths must be multiples of the VAE's "
                        "temporal compression (the first chunk one frame more)"
                    )
                # Clone so the cache does not keep the whole padded activation alive.
                cache[self] = x[:, :, x.shape[2] - self.carry_frames:].clone()
        return _conv3d(self.conv, x)


class CausalGroupNorm(nn.GroupNorm):
    """Group norm over each frame separately, so statistics never mix frames (keeps the model causal)."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        frames = F.group_norm(frames, self.num_groups, self.weight, self.bias, self.eps)
        return frames.reshape(b, t, c, h, w).transpose(1, 2)
