"""The ops that work on a packed token sequence (see :mod:`pyramid_dit.packing`): per-column modulation and gated
residuals, per-column embeddings, attention (FlexAttention over the whole sequence, or SDPA per column and frame)
and the RMS norm of queries and keys.

Modulation and gated residuals are custom autograd functions that never materialise a per-token copy of the
per-column vectors for backward. On a GPU (and on meta tensors, which trace what a GPU runs) their number of
kernels does not grow with the number of columns: each column's vector reaches its tokens through one gather
(``index_select`` with the packing's token-to-column index), and the backward sums a segment's gradient with one
matrix product against the packing's column indicator. On the CPU, where a launch costs nothing and those skinny
products are slow, they write each column's segment of one output in place (``Segments.batched``). The
frame-prefix attention accumulates the key/value gradients of every frame's prefix into one buffer instead of one
zero-filled, full-size gradient per prefix slice. ``tests/test_packed_ops.py`` checks all of them, both ways,
outputs and every input gradient, against the plain formulas in float64.

Kernels by device. What a GPU runs is what the planner must count, so meta tensors (shape-only tracing, no
values) take shape-only stand-ins of the CUDA kernels: one op each way with the CUDA kernel's outputs, saved
tensors and FLOPs (``pyramid_dit::flex_attention_shape``, ``pyramid_dit::rms_norm_shape``):

* FlexAttention: compiled once with dynamic shapes (:func:`flex_attention_padded`); on CUDA forward and
  backward, on the CPU forward only (torch has no CPU backward for it);
* RMS norm: CUDA's fused kernel (``aten._fused_rms_norm``, one kernel each way); elsewhere ``F.rms_norm``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.nn.attention import SDPBackend, sdpa_kernel

from pyramid_dit.packing import AttentionGroup, FlexMask, Segments

# The attention kernels ``attend`` may use: every SDPA backend but cuDNN's. From torch 2.5 on, masked SDPA on
# Hopper and newer GPUs goes to cuDNN first, and cuDNN builds an execution plan for every shape it has not seen
# (hundreds of ms each, forward and backward). The temporal pyramid gives attention new shapes step after step:
# on an H200 (torch 2.11) the tiny quickstart model trained at 4-6 s per step with cuDNN and 0.03-0.05 s per step
# without it (flash / memory-efficient kernels, which need no plan).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

SegLike = Union[Segments, Sequence[int]]


def _as_segments(seg: SegLike, device: torch.device) -> Segments:
    return seg if isinstance(seg, Segments) else Segments.build(seg, device, batched=device.type != "cpu")


def _shape_only(t: Tensor) -> bool:
    return t.is_meta or is_fake(t)


# --------------------------------------------------------------------------------------------------------
# Per-column modulation and gated residual
# --------------------------------------------------------------------------------------------------------

def _per_token(v: Tensor, seg: Segments) -> Tensor:
    """``[B, n, D]`` per-column vectors -> their value at every token (``[B, S, D]``, or a broadcastable
    ``[B, 1, D]`` view when one column holds every token)."""
    if seg.single:
        return v[:, seg.column:seg.column + 1]
    return v.index_select(1, seg.index)


def _indicator_product(t: Tensor, indicator: Tensor) -> Tensor:
    """``indicator`` ``[n, S]`` times ``t`` ``[B, S, D]`` -> ``[B, n, D]``."""
    if t.shape[0] == 1:
        return torch.mm(indicator, t[0])[None]
    return torch.matmul(indicator, t)


def _define_segment_sum() -> Callable[[Tensor, Tensor], Tensor]:
    """The per-column sum as one op, ``pyramid_dit::segment_sum`` (a matrix product inside): a sum, so FLOP
    counters do not count it (a bare product would add ``2 n S D`` FLOPs per call, and grow with the number of
    columns a call packs, where the planner's counts add up over columns)."""
    if not hasattr(torch.library, "custom_op"):
        return _indicator_product
    if not hasattr(torch.ops.pyramid_dit, "segment_sum"):
        @torch.library.custom_op("pyramid_dit::segment_sum", mutates_args=())
        def segment_sum(t: Tensor, indicator: Tensor) -> Tensor:
            return _indicator_product(t, indicator)

        @segment_sum.register_fake
        def _(t, indicator):
            return t.new_empty(t.shape[0], indicator.shape[0], t.shape[2])
    return torch.ops.pyramid_dit.segment_sum


_SEGMENT_SUM = _define_segment_sum()


def _segment_sum(t: Tensor, seg: Segments, n: int) -> Tensor:
    """Per-column sums over the tokens of ``t`` ``[B, S, D]`` -> ``[B, n, D]``: one matrix product with the column
    indicator (no per-column loop; accumulated in float32 like any other matrix product of the step)."""
    if seg.single:
        total = t.sum(1, keepdim=True)
        if n == 1:
            return total
        out = t.new_zeros(t.shape[0], n, t.shape[2])
        out[:, seg.column:seg.column + 1] = total
        return out
    return _SEGMENT_SUM(t, seg.indicator(t.dtype))


def _segment_product_grads(grad: Tensor, seg: Segments, tokens: Tensor, per_column: Tensor, need_tokens: bool,
                           need_column: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of the product ``tokens * per_column_c`` on each column segment, given the output gradient:
    ``grad * per_column_c`` for ``tokens`` ``[B, S, D]``, and the segment's sum of ``grad * tokens`` for
    ``per_column`` ``[B, n, D]`` (``None`` where not needed). The backward of both segment functions below."""
    if seg.batched:
        g_tokens = grad * _per_token(per_column, seg) if need_tokens else None
        g_column = _segment_sum(grad * tokens, seg, per_column.shape[1]) if need_column else None
        return g_tokens, g_column
    g_tokens = torch.empty_like(tokens) if need_tokens else None
    g_column = per_column.new_zeros(per_column.shape) if need_column else None
    for c, a, b in seg.spans:
        g = grad[:, a:b]
        if need_tokens:
            torch.mul(g, per_column[:, c, None], out=g_tokens[:, a:b])
        if need_column:
            g_column[:, c] = (g * tokens[:, a:b]).sum(1)
    return g_tokens, g_column


def _segment_sums(grad: Tensor, seg: Segments, n: int) -> Tensor:
    """Per-column sums of ``grad`` (the shift's gradient)."""
    if seg.batched:
        return _segment_sum(grad, seg, n)
    out = grad.new_zeros(grad.shape[0], n, grad.shape[2])
    for c, a, b in seg.spans:
        out[:, c] = grad[:, a:b].sum(1)
    return out


class _SegmentModulate(torch.autograd.Function):
    """``x * (1 + scale_c) + shift_c`` per column segment (see the module docstring for the two ways).

    Saves ``x`` and ``1 + scale``, never per-token copies of the vectors (they are gathered again in the
    backward): the saved memory is that of the plain formula on per-column vectors.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, shift: Tensor, seg: Segments) -> Tensor:
        scale1 = 1 + scale
        if seg.batched:
            out = torch.addcmul(_per_token(shift, seg), x, _per_token(scale1, seg))
        else:
            dtype = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), shift.dtype)
            out = x.new_empty(x.shape, dtype=dtype)
            for c, a, b in seg.spans:
                torch.addcmul(shift[:, c, None], x[:, a:b], scale1[:, c, None], out=out[:, a:b])
        ctx.seg = seg
        ctx.save_for_backward(x, scale1)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, scale1 = ctx.saved_tensors
        need_x, need_scale, need_shift = ctx.needs_input_grad[:3]
        gx, gscale = _segment_product_grads(grad, ctx.seg, x, scale1, need_x, need_scale)
        gshift = _segment_sums(grad, ctx.seg, scale1.shape[1]) if need_shift else None
        return gx, gscale, gshift, None


class _SegmentGatedResidual(torch.autograd.Function):
    """``x + gate_c * y`` per column segment (see :class:`_SegmentModulate`); the gradient of ``x`` is the incoming
    gradient itself, no copy."""

    @staticmethod
    def forward(ctx, x: Tensor, gate: Tensor, y: Tensor, seg: Segments) -> Tensor:
        if seg.batched:
            out = torch.addcmul(x, _per_token(gate, seg), y)
        else:
            dtype = torch.promote_types(torch.promote_types(x.dtype, gate.dtype), y.dtype)
            out = x.new_empty(x.shape, dtype=dtype)
            for c, a, b in seg.spans:
                torch.addcmul(x[:, a:b], gate[:, c, None], y[:, a:b], out=out[:, a:b])
        ctx.seg, ctx.x_dtype = seg, x.dtype
        ctx.save_for_backward(gate, y)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, y = ctx.saved_tensors
        _, need_gate, need_y = ctx.needs_input_grad[:3]
        gy, ggate = _segment_product_grads(grad, ctx.seg, y, gate, need_y, need_gate)
        gx = grad if ctx.needs_input_grad[0] else None
        return (gx.to(ctx.x_dtype) if gx is not None else None), ggate, gy, None


def modulate(x: Tensor, scale: Tensor, shift: Tensor, seg: SegLike) -> Tensor:
    """``x * (1 + scale_c) + shift_c`` on each column segment of the packed ``x`` ``[B, S, D]``.

    ``scale``/``shift`` are ``[B, n, D]``; ``seg``: the stream's :class:`~pyramid_dit.packing.Segments` (from
    ``PackedSequence.segs``) or plain per-column lengths.
    """
    return _SegmentModulate.apply(x, scale, shift, _as_segments(seg, x.device))


def gated_residual(x: Tensor, gate: Tensor, y: Tensor, seg: SegLike) -> Tensor:
    """``x + gate_c * y`` on each column segment; ``gate`` is ``[B, n, D]``."""
    return _SegmentGatedResidual.apply(x, gate, y, _as_segments(seg, x.device))


def per_column(emb: Tensor, batch: int) -> Tensor:
    """Row-interleaved ``[B*n, K]`` -> ``[B, n, K]`` (row ``b*n + c`` is column ``c`` of batch item ``b``)."""
    return emb.view(batch, -1, emb.shape[-1])


# --------------------------------------------------------------------------------------------------------
# Shape-only stand-ins of the CUDA kernels, for meta tensors
# --------------------------------------------------------------------------------------------------------

def _define_stand_ins() -> bool:
    """Register the meta stand-ins (once per process); False where this torch lacks ``torch.library.custom_op``."""
    if not hasattr(torch.library, "custom_op"):
        return False
    if hasattr(torch.ops.pyramid_dit, "flex_attention_shape"):
        return True

    def shape_only(*_args, **_kwargs):
        raise NotImplementedError("a shape-only stand-in of a CUDA kernel: meta tensors only")

    @torch.library.custom_op("pyramid_dit::flex_attention_shape", mutates_args=())
    def flex_shape(q: Tensor, k: Tensor, v: Tensor, pairs: int) -> tuple[Tensor, Tensor]:
        return shape_only()

    @flex_shape.register_fake
    def _(q, k, v, pairs):
        # FlexAttention's output follows the query's memory order; the log-sum-exp is float32 per query.
        return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)

    @torch.library.custom_op("pyramid_dit::flex_attention_shape_backward", mutates_args=())
    def flex_shape_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, pairs: int
                            ) -> tuple[Tensor, Tensor, Tensor]:
        return shape_only()

    @flex_shape_backward.register_fake
    def _(grad, q, k, v, out, lse, pairs):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def flex_setup(ctx, inputs, output):
        q, k, v, pairs = inputs
        ctx.pairs = pairs
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the unused log-sum-exp (CUDA makes none)
        ctx.save_for_backward(q, k, v, *output)

    def flex_backward(ctx, grad, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        return (*torch.ops.pyramid_dit.flex_attention_shape_backward(grad, q, k, v, out, lse, ctx.pairs), None)

    flex_shape.register_autograd(flex_backward, setup_context=flex_setup)

    @torch.library.custom_op("pyramid_dit::rms_norm_shape", mutates_args=())
    def rms_shape(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        return shape_only()

    @rms_shape.register_fake
    def _(x, weight, eps):
        return torch.empty_like(x), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)

    @torch.library.custom_op("pyramid_dit::rms_norm_shape_backward", mutates_args=())
    def rms_shape_backward(grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
        return shape_only()

    @rms_shape_backward.register_fake
    def _(grad, x, weight, rstd):
        return torch.empty_like(x), torch.empty_like(weight)

    def rms_setup(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, output[1])

    def rms_backward(ctx, grad, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        gx, gw = torch.ops.pyramid_dit.rms_norm_shape_backward(grad, x, weight, rstd)
        return gx, gw, None

    rms_shape.register_autograd(rms_backward, setup_context=rms_setup)

    from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

    # FLOPs of the (query, key) pairs the mask allows (the frame split's count for the same attention): torch's
    # SDPA formulas with the pairs as one row of keys per query.
    @register_flop_formula(torch.ops.pyramid_dit.flex_attention_shape)
    def _flex_flops(q_shape, k_shape, v_shape, pairs, *args, out_shape=None, **kwargs) -> int:
        h, d, dv = q_shape[1], q_shape[3], v_shape[3]
        return sdpa_flop_count((1, h, pairs, d), (1, h, 1, d), (1, h, 1, dv))

    @register_flop_formula(torch.ops.pyramid_dit.flex_attention_shape_backward)
    def _flex_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        pairs = args[-1]
        h, d, dv = q_shape[1], q_shape[3], v_shape[3]
        return sdpa_backward_flop_count((1, h, pairs, dv), (1, h, pairs, d), (1, h, 1, d), (1, h, 1, dv))

    return True


_STAND_INS = _define_stand_ins()


# --------------------------------------------------------------------------------------------------------
# RMS norm
# --------------------------------------------------------------------------------------------------------

# The fused kernel and its own backward (torch >= 2.8); without both, the composite norm.
_FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm") and hasattr(torch.ops.aten, "_fused_rms_norm_backward")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMS norm over the last axis with a learned scale, computed in float32 and rounded once to ``x.dtype``.

    CUDA: the fused kernel (one launch each way). Meta: its shape-only stand-in. Elsewhere torch's composite
    ``F.rms_norm`` in float32 (bit-equal to the written-out formula).
    """
    if x.is_cuda and _FUSED_RMS_NORM:
        return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight.to(x.dtype), eps)[0]
    if x.is_meta and _STAND_INS:
        return torch.ops.pyramid_dit.rms_norm_shape(x, weight.to(x.dtype), eps)[0]
    if hasattr(F, "rms_norm"):  # torch >= 2.4
        return F.rms_norm(x.float(), x.shape[-1:], weight=weight.float(), eps=eps).to(x.dtype)
    y = x.float()
    return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rotate(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x`` ``[..., d]`` (float32, contiguous) by the complex ``rotation``
    ``[..., d/2]`` (``PackedSequence.rotation``): one complex multiply each way."""
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotation).flatten(-2)


# --------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------

class _KeyPrefixes(torch.autograd.Function):
    """Prefixes ``x[:, :, :end]`` of keys or values ``[B, H, K, d]``, one per attention group.

    Plain slicing would be correct too, but the backward of each slice allocates a zero-filled gradient of the
    whole ``x`` and autograd then adds those up: with temporal-causal groups (one per frame) that is a
    full-size fill and add per frame, per block. Here the prefixes' gradients are added into one buffer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, ends: tuple[int, ...]) -> tuple[Tensor, ...]:
        ctx.ends, ctx.length = ends, x.shape[2]
        return tuple(x[:, :, :end] for end in ends)

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]) -> tuple[Optional[Tensor], None]:
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


def attend(q: Tensor, k: Tensor, v: Tensor, groups: Sequence[AttentionGroup]) -> Tensor:
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


_COMPILED_FLEX: dict[tuple, Callable] = {}


def _compiled_flex(dynamic: bool, backend: Union[str, Callable] = "inductor") -> Callable:
    """``flex_attention`` compiled once per process (per ``dynamic``).

    CUDA compiles with dynamic shapes: the packed lengths (multiples of :data:`~pyramid_dit.packing.FLEX_BLOCK`),
    the mask's tile counts and the batch are symbols, so a new batch layout reuses the kernel
    (``tests/test_flex_attention.py`` counts the compilations over varied layouts; ``tools/gpu_check.sh`` on a
    GPU). The CPU compiles per shape: torch 2.13's C++ FlexAttention template fails to build dynamic kernels for
    this mask (FlexAttention serves forward checks there, not training). ``backend``: a test's counting backend.
    """
    key = (dynamic, backend)
    if key not in _COMPILED_FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED_FLEX[key] = torch.compile(flex_attention, dynamic=dynamic, backend=backend)
    return _COMPILED_FLEX[key]


def flex_attention_padded(q: Tensor, k: Tensor, v: Tensor, mask: FlexMask, heads: int) -> Tensor:
    """One FlexAttention call over a whole packed sequence: ``q`` ``[B, q_padded, heads*d]``, ``k``/``v``
    ``[B, kv_padded, heads*d]`` -> ``[B, q_padded, heads*d]`` (rows of padding queries are zeros or garbage: drop
    them).

    CUDA: the compiled kernel, forward and backward. CPU: the compiled kernel, forward only (torch has no CPU
    backward for FlexAttention: train on the CPU with ``attention_split="frame"``). Meta: the shape-only
    stand-in (one op each way, FLOPs of the allowed pairs).
    """
    if q.shape[1] != mask.q_padded or k.shape[1] != mask.kv_padded:
        raise ValueError(f"flex attention inputs of {q.shape[1]} queries and {k.shape[1]} keys; the mask is for "
                         f"{mask.q_padded} and {mask.kv_padded}")
    if _shape_only(q):
        if not _STAND_INS:
            raise NotImplementedError("shape-only FlexAttention needs torch.library.custom_op (torch >= 2.4)")
        qt, kt, vt = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))
        out = torch.ops.pyramid_dit.flex_attention_shape(qt, kt, vt, mask.pairs)[0]
        return out.transpose(1, 2).flatten(2)
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise NotImplementedError("FlexAttention has no CPU backward in torch: train on the CPU with "
                                  "attention_split='frame' (the default there)")
    # The kernel gets head-split views of whole [B, L, heads*d] tensors (a concatenation, a projection, a cast),
    # the same form at every call site: the compiler guards on a view's base, and bases of other forms would
    # compile the kernel again. No "duck sizing": a tile count that happens to equal the head count or width
    # would share its (static) symbol and be compiled as a constant.
    # Past TorchDynamo's recompile limit (8 per function by default) a call would silently run FlexAttention's
    # eager form, which materialises every (query, key) score: a process that trains (batch 1 or 2 per column, three
    # kinds of call sites) and also samples (no grad, classifier-free guidance's doubled batch) can reach it, so the
    # limit is raised around this call only.
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as fx_config

    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    qt, kt, vt = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))
    with fx_config.patch(use_duck_shape=False), dynamo_config.patch(**{limit: 64}):
        out = _compiled_flex(q.device.type != "cpu")(qt, kt, vt, block_mask=mask.block_mask)
    return out.transpose(1, 2).flatten(2)
