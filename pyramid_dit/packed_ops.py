"""The ops that work on a packed token sequence (see :mod:`pyramid_dit.packing`): per-column modulation and gated
residuals, the last-clip tails, per-column embeddings and the per-column, per-frame attention.

Modulation and gated residuals are custom autograd functions that write each column's segment of one output in
place (forward and backward), instead of splitting the sequence, running two ops per column and concatenating;
the frame-prefix attention accumulates the key/value gradients of every frame's prefix into one buffer instead of
one zero-filled, full-size gradient per prefix slice. ``tests/test_packed_ops.py`` checks all of them, outputs and
every input gradient, against the plain formulas in float64.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pyramid_dit.packing import AttentionGroup

# The attention kernels ``attend`` may use: every SDPA backend but cuDNN's. From torch 2.5 on, masked SDPA on
# Hopper and newer GPUs goes to cuDNN first, and cuDNN builds an execution plan for every shape it has not seen
# (hundreds of ms each, forward and backward). The temporal pyramid gives attention new shapes step after step:
# on an H200 (torch 2.11) the tiny quickstart model trained at 4-6 s per step with cuDNN and 0.03-0.05 s per step
# without it (flash / memory-efficient kernels, which need no plan).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _segments(seg_lens: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(column, start, stop)`` of each non-empty column segment along the packed sequence axis."""
    out, start = [], 0
    for c, length in enumerate(seg_lens):
        if length:
            out.append((c, start, start + length))
        start += length
    return out


def _segment_product_grads(grad: torch.Tensor, segs: list[tuple[int, int, int]], tokens: torch.Tensor,
                           per_column: torch.Tensor, need_tokens: bool, need_column: bool
                           ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of the product ``tokens * per_column_c`` on each column segment, given the output gradient:
    ``grad * per_column_c`` for ``tokens`` ``[B, S, D]``, and the segment's sum of ``grad * tokens`` for
    ``per_column`` ``[B, n, D]`` (``None`` where not needed). The backward of both segment functions below."""
    g_tokens = torch.empty_like(tokens) if need_tokens else None
    g_column = per_column.new_zeros(per_column.shape) if need_column else None
    for c, a, b in segs:
        g = grad[:, a:b]
        if need_tokens:
            torch.mul(g, per_column[:, c, None], out=g_tokens[:, a:b])
        if need_column:
            g_column[:, c] = (g * tokens[:, a:b]).sum(1)
    return g_tokens, g_column


class _SegmentModulate(torch.autograd.Function):
    """``x * (1 + scale_c) + shift_c`` per column segment, written segment by segment into one output.

    The composite form (split, two ops per segment, concatenate) costs a concatenation copy forward and another
    backward, and a temporary per op; here forward is one pass per segment and backward two (the input
    gradient, and the product reduced for the scale's gradient).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, seg_lens: tuple[int, ...]
                ) -> torch.Tensor:
        segs = _segments(seg_lens)
        scale1 = 1 + scale
        dtype = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), shift.dtype)
        out = x.new_empty(x.shape, dtype=dtype)
        for c, a, b in segs:
            torch.addcmul(shift[:, c, None], x[:, a:b], scale1[:, c, None], out=out[:, a:b])
        ctx.segs = segs
        ctx.save_for_backward(x, scale1)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale1 = ctx.saved_tensors
        need_x, need_scale, need_shift = ctx.needs_input_grad[:3]
        gx, gscale = _segment_product_grads(grad, ctx.segs, x, scale1, need_x, need_scale)
        gshift = None
        if need_shift:
            gshift = scale1.new_zeros(scale1.shape)
            for c, a, b in ctx.segs:
                gshift[:, c] = grad[:, a:b].sum(1)
        return gx, gscale, gshift, None


class _SegmentGatedResidual(torch.autograd.Function):
    """``x + gate_c * y`` per column segment, written segment by segment into one output (see
    :class:`_SegmentModulate`); the gradient of ``x`` is the incoming gradient itself, no copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, seg_lens: tuple[int, ...]
                ) -> torch.Tensor:
        segs = _segments(seg_lens)
        dtype = torch.promote_types(torch.promote_types(x.dtype, gate.dtype), y.dtype)
        out = x.new_empty(x.shape, dtype=dtype)
        for c, a, b in segs:
            torch.addcmul(x[:, a:b], gate[:, c, None], y[:, a:b], out=out[:, a:b])
        ctx.segs, ctx.x_dtype = segs, x.dtype
        ctx.save_for_backward(gate, y)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, y = ctx.saved_tensors
        _, need_gate, need_y = ctx.needs_input_grad[:3]
        gy, ggate = _segment_product_grads(grad, ctx.segs, y, gate, need_y, need_gate)
        gx = grad if ctx.needs_input_grad[0] else None
        return (gx.to(ctx.x_dtype) if gx is not None else None), ggate, gy, None


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, seg_lens: Sequence[int]) -> torch.Tensor:
    """``x * (1 + scale_c) + shift_c`` on each column segment of the packed ``x`` ``[B, S, D]``.

    ``scale``/``shift`` are ``[B, n, D]``. Broadcasting per segment avoids materialising a per-token copy of
    the modulation vectors.
    """
    return _SegmentModulate.apply(x, scale, shift, tuple(seg_lens))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, seg_lens: Sequence[int]) -> torch.Tensor:
    """``x + gate_c * y`` on each column segment; ``gate`` is ``[B, n, D]``."""
    return _SegmentGatedResidual.apply(x, gate, y, tuple(seg_lens))


def tails(x: torch.Tensor, seg_lens: Sequence[int], tail_lens: Sequence[int]) -> torch.Tensor:
    """The last ``tail_lens[c]`` tokens of each column segment of the packed ``x``, packed again."""
    split = [m for length, tail in zip(seg_lens, tail_lens) for m in (length - tail, tail)]
    return torch.cat(x.split(split, dim=1)[1::2], dim=1)


def per_column(emb: torch.Tensor, batch: int) -> torch.Tensor:
    """Row-interleaved ``[B*n, K]`` -> ``[B, n, K]`` (row ``b*n + c`` is column ``c`` of batch item ``b``)."""
    return emb.view(batch, -1, emb.shape[-1])


class _KeyPrefixes(torch.autograd.Function):
    """Prefixes ``x[:, :, :end]`` of keys or values ``[B, H, K, d]``, one per attention group.

    Plain slicing would be correct too, but the backward of each slice allocates a zero-filled gradient of the
    whole ``x`` and autograd then adds those up: with temporal-causal groups (one per frame) that is a
    full-size fill and add per frame, per block. Here the prefixes' gradients are added into one buffer.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, ends: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        ctx.ends, ctx.length = ends, x.shape[2]
        return tuple(x[:, :, :end] for end in ends)

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], None]:
        pairs = sorted(((end, g) for end, g in zip(ctx.ends, grads) if g is not None), key=lambda p: -p[0])
        if not pairs:
            return None, None
        end, g = pairs[0]
        if end == ctx.length:
            total = g.clone()
        else:
            total = g.new_zeros(*g.shape[:2], ctx.length, g.shape[3])
            total[:, :, :end].add_(g)
        for end, g in pairs[1:]:  # add_ on the view: ``total[...] += g`` would also dispatch a slice and a copy_
            total[:, :, :end].add_(g)
        return total, None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: Sequence[AttentionGroup]) -> torch.Tensor:
    """Attention within one column segment. ``q, k, v``: ``[B, L, H, d]`` -> ``[B, L, H*d]``.

    Each group is one ``scaled_dot_product_attention`` call over its key prefix: keys past the prefix are
    ones the temporal-causal rule forbids for every query of the group, so they are skipped, not masked. The
    call never takes cuDNN's kernel (:data:`SDPA_BACKENDS` says why).
    """
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if len(groups) == 1:
        end = groups[0].k_end
        k_parts, v_parts = ([k], [v]) if end == k.shape[2] else ([k[:, :, :end]], [v[:, :, :end]])
    else:
        ends = tuple(g.k_end for g in groups)
        k_parts, v_parts = _KeyPrefixes.apply(k, ends), _KeyPrefixes.apply(v, ends)
    with sdpa_kernel(SDPA_BACKENDS):
        outs = [F.scaled_dot_product_attention(q_g.transpose(1, 2), k_g, v_g, attn_mask=g.mask).transpose(1, 2)
                for g, q_g, k_g, v_g in zip(groups, q.split([g.n_queries for g in groups], dim=1), k_parts, v_parts)]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.flatten(2)


# --------------------------------------------------------------------------------------------------------
# What both model classes share around the packing
# --------------------------------------------------------------------------------------------------------
