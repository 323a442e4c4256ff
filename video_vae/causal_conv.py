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


def _cpu_autocast() -> bool:
    """Whether CPU autocast is on (then convolutions go through torch's op, which autocast casts)."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.is_autocast_enabled("cpu")
    return torch.is_autocast_cpu_enabled()


def _conv3d(conv: nn.Conv3d, x: Tensor, weight: Tensor | None = None) -> Tensor:
    """``conv(x)`` (with ``weight`` in place of ``conv.weight`` if given) in :func:`conv_layout`; on CPU inference
    always oneDNN's convolution.

    torch picks its convolution kernel with a rule written for 2-D images: it counts ``N * C * D0 * D1`` of the
    input, which for a 5-D video ignores the width, so single clips under ~20k "elements" (e.g. 64 channels x 7
    frames x 32 rows, whatever the width) go to the unblocked ``slow_conv3d`` kernel. On the VAE's shapes that is
    2-5x slower than oneDNN, from 1 x 16 x 24 frames (0.44 vs 0.18 ms) to 7 x 32 x 48 (44 vs 8 ms; 64 channels,
    2 CPU threads). Outputs agree to float32 rounding (~1e-6 relative). Only float32 without autograd or autocast
    (extraction, generation): otherwise torch's own op and kernel choice. Under ``torch.compile`` the plain conv
    is traced and inductor chooses (with frozen weights it takes oneDNN's prepacked convolutions).
    """
    weight = conv.weight if weight is None else weight.contiguous()  # a slice of the taps (see _from_clip_start)
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not _cpu_autocast()
            and not torch.compiler.is_compiling()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        out = torch.ops.aten.mkldnn_convolution(conv_layout(x), weight, conv.bias, conv.padding,
                                                conv.stride, conv.dilation, conv.groups)
    else:
        out = F.conv3d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return conv_layout(out)


def conv_layout(x: Tensor) -> Tensor:
    """``x`` in the memory layout the VAE computes in: channels-last (``NDHWC``) on CPU, unchanged elsewhere.

    oneDNN's 3-D convolutions run 10-25% faster on channels-last activations than on ``NCDHW`` (measured on the
    VAE's shapes, 32-256 channels), and the VAE's other layers keep that layout without copies: per-frame group
    norm is a view of a channels-last 2-D image batch, SiLU and residual adds are element-wise, the causal
    padding concatenates along time, and the up-samplers write their outputs channels-last. Every convolution's
    output, concatenation and cache entry is put in this layout (a no-op when it already is): tensors of mixed
    layouts make element-wise ops and concatenations take torch's slow strided paths. On GPUs the layout is left
    as it is (not measured there).
    """
    return x.contiguous(memory_format=torch.channels_last_3d) if x.device.type == "cpu" else x


def from_channels_last(y: Tensor) -> Tensor:
    """A ``[b, t, h, w, c]`` tensor as ``[b, c, t, h, w]`` in :func:`conv_layout` (a view on CPU, a copy elsewhere)."""
    out = y.permute(0, 4, 1, 2, 3)
    return conv_layout(out) if out.device.type == "cpu" else out.contiguous()


def _cat_frames(parts: list[Tensor]) -> Tensor:
    """Concatenation along time, in :func:`conv_layout` (inputs in that layout make it one block copy each)."""
    return conv_layout(torch.cat([conv_layout(p) for p in parts], dim=2))


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

    At the start of a clip the zero frames are not materialised: the first outputs, whose windows reach into them,
    are convolved with only the temporal taps that meet real frames (the others would multiply zeros). For a
    3-tap conv that is one frame of work fewer per clip start, 9-10% of the convolution FLOPs of a 17-frame encode
    and decode (``tools/benchmark_vae.py`` counts them); the result is the zero-padded convolution's, up to
    float32 summation order.

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
        if self.time_pad == 0:
            return _conv3d(self.conv, x)
        front = cache.get(self) if cache is not None else None
        padded = x if front is None else _cat_frames([front, x])  # a clip start's zero frames are left out
        if cache is not None:
            padded_len = padded.shape[2] + (self.time_pad if front is None else 0)  # with a clip start's zeros
            if self.time_stride > 1 and (padded_len - self.time_pad - 1) % self.time_stride:
                raise ValueError(
                    f"temporal chunk of {x.shape[2]} frames does not end on a stride-{self.time_stride} boundary of "
                    "this conv; chunk lengths must be multiples of the VAE's temporal compression (the first chunk "
                    "one frame more)"
                )
            cache[self] = self._carry(padded)
        return self._from_clip_start(x) if front is None else _conv3d(self.conv, padded)

    def _carry(self, padded: Tensor) -> Tensor:
        """The last ``carry_frames`` of the (padded) input, which the next chunk needs in front of it; copied, so
        the cache does not keep the whole activation alive. A clip start shorter than that gets zeros in front."""
        short = self.carry_frames - padded.shape[2]
        if short > 0:
            padded = _cat_frames([padded.new_zeros(*padded.shape[:2], short, *padded.shape[3:]), padded])
        return conv_layout(padded[:, :, padded.shape[2] - self.carry_frames:].clone())

    def _from_clip_start(self, x: Tensor) -> Tensor:
        """The convolution of ``x`` front-padded with ``time_pad`` zero frames, without the zeros.

        Output ``j`` reads padded frames ``j*s .. j*s + k - 1``, i.e. input frames from ``j*s - time_pad``; while
        that is negative, only the last taps meet input frames, so those outputs are convolved with just those
        taps. The remaining outputs are one ordinary convolution of ``x`` from the first full window on.
        """
        k, s, pad = self.conv.kernel_size[0], self.time_stride, self.time_pad
        n_out = (x.shape[2] + pad - k) // s + 1
        if n_out <= 0:
            raise ValueError(f"{x.shape[2]} frames are too few for a causal conv with temporal kernel {k}, stride {s}")
        outs, j = [], 0
        while j < n_out and j * s < pad:
            first = j * s - pad  # < 0: the first -first taps meet zero frames
            outs.append(_conv3d(self.conv, x[:, :, :k + first], weight=self.conv.weight[:, :, -first:]))
            j += 1
        if j < n_out:
            outs.append(_conv3d(self.conv, x[:, :, j * s - pad:]))
        return outs[0] if len(outs) == 1 else _cat_frames(outs)


class CausalGroupNorm(nn.GroupNorm):
    """Group norm over each frame separately, so statistics never mix frames (keeps the model causal)."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        frames = F.group_norm(frames, self.num_groups, self.weight, self.bias, self.eps)
        return frames.reshape(b, t, c, h, w).transpose(1, 2)
