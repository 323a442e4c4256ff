"""Layers shared by both DiT kinds, and the joint (MMDiT / double-stream) block they both stack.

The SD3 kind's ``JointTransformerBlock`` and the miniFLUX kind's double-stream block are the same computation:
text and video keep separate weights (adaptive norms, projections, MLPs) and meet only inside one attention
over each column's text followed by its video. They differ in the queries'/keys' RMS-norm epsilon, in the
checkpoint names of the text-side norms (``norm_added_q`` for miniFLUX, ``norm_add_q`` for SD3), in the rotary
tables they are given, and in the SD3 kind's last block, which updates only the video stream
(``context_pre_only``: a 2-vector adaptive norm for the text and no text output or MLP).

Tensors are in the packed layout of :mod:`pyramid_dit.packing`: video ``[B, sum(L_c), D]`` and text
``[B, sum(T_c), D]``, column after column. Parameter names mirror the released checkpoints.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyramid_dit.packed_ops import attend, flex_attention_padded, gated_residual, modulate, per_column, rms_norm, rotate
from pyramid_dit.packing import PackedSequence, queries_from


class RMSNorm(nn.Module):
    """RMS norm over the last axis with a learned scale (queries and keys, per head), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def heads(linear: nn.Linear, x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``linear(x)`` split into heads: ``[B, L, D] -> [B, L, H, d]``."""
    return linear(x).unflatten(-1, (n_heads, -1))


def norm_rope(x: torch.Tensor, norm: RMSNorm, rotation: Optional[torch.Tensor], flat: bool = False) -> torch.Tensor:
    """RMS-normalise queries or keys ``[B, L, H, d]`` and rotate them by ``rotation`` (complex ``[L, 1, d/2]``,
    ``PackedSequence.rotation``); ``flat``: return ``[B, L, H*d]`` (FlexAttention's input form).

    Runs in float32 and rounds once to the activation dtype. ``rotation=None`` means no rotation (text tokens sit
    at position 0, where the rotation is the identity, or the model has no rotary positions): then the norm
    alone, one fused kernel on CUDA.
    """
    if rotation is None:
        y = norm(x)
        return y.flatten(2) if flat else y
    y = rotate(rms_norm(x.float(), norm.weight, norm.eps), rotation)
    return (y.flatten(2) if flat else y).to(x.dtype)


def pad_cat(seq: PackedSequence, parts: list[torch.Tensor], padded: int) -> torch.Tensor:
    """``parts`` ``[B, l_i, ...]`` concatenated along the tokens and zero-padded to ``padded`` tokens (one copy;
    the zeros are made once per call and shape)."""
    length = sum(p.shape[1] for p in parts)
    if padded > length:
        parts = parts + [seq.zeros(padded - length, parts[0])]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class GELUProj(nn.Module):
    """Linear followed by tanh-approximated GELU (checkpoint name ``ff.net.0.proj``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """MLP with 4x expansion. ``net.1`` is a zero-rate dropout slot kept so the checkpoint's ``net.2`` lines up."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class AdaNorm(nn.Module):
    """Parameter-free LayerNorm plus ``linear(silu(cond))`` producing ``n_chunks`` modulation vectors."""

    def __init__(self, dim: int, n_chunks: int, eps: float = 1e-6):
        super().__init__()
        self.linear = nn.Linear(dim, n_chunks * dim)
        self.n_chunks = n_chunks
        self.eps = eps

    def chunks(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(cond)).chunk(self.n_chunks, dim=-1)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)


class JointAttention(nn.Module):
    """Projections of the joint attention (video: ``to_*``, text: ``add_*``); the math lives in the block.

    ``text_norm`` names the text-side query/key norms (``<text_norm>_q``, ``<text_norm>_k``); ``text_out``
    is False for a block whose text output is never used (no ``to_add_out``).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6, text_norm: str = "norm_added",
                 text_out: bool = True):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.add_k_proj, self.add_v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.add_q_proj = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        if text_out:
            self.to_add_out = nn.Linear(inner, dim)
        self._text_norm = text_norm
        setattr(self, f"{text_norm}_q", RMSNorm(head_dim, eps))
        setattr(self, f"{text_norm}_k", RMSNorm(head_dim, eps))

    @property
    def text_norm_q(self) -> RMSNorm:
        return getattr(self, f"{self._text_norm}_q")

    @property
    def text_norm_k(self) -> RMSNorm:
        return getattr(self, f"{self._text_norm}_k")


class JointTransformerBlock(nn.Module):
    """MMDiT block: text and video keep separate weights and meet only inside attention (see module docstring).

    ``forward(..., last_only=True)`` computes only each column's last-clip video tokens (the queries whose
    result is returned; keys and values still come from the whole column) and no text: use it for the final
    block of a stack. With ``context_pre_only`` the text is never updated and ``forward`` returns ``None`` for it.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, qk_norm_eps: float = 1e-6,
                 text_norm: str = "norm_added", context_pre_only: bool = False):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaNorm(dim, 6)  # (shift, scale, gate) for attention, then for the MLP
        self.norm1_context = AdaNorm(dim, 2 if context_pre_only else 6)  # pre-only: (scale, shift)
        self.attn = JointAttention(dim, num_attention_heads, attention_head_dim, qk_norm_eps, text_norm,
                                   text_out=not context_pre_only)
        self.ff = FeedForward(dim)
        if not context_pre_only:
            self.ff_context = FeedForward(dim)
        else:
            # The checkpoint keeps the text-query projection and norm of a pre-only block, but no output ever
            # depends on them (the reference computes text queries and discards what they produce: zero
            # gradient). They are frozen so distributed training sees no trainable parameter without a gradient.
            self.attn.add_q_proj.requires_grad_(False)
            self.attn.text_norm_q.requires_grad_(False)

    def forward(self, video: torch.Tensor, text: torch.Tensor, temb: torch.Tensor, seq: PackedSequence,
                last_only: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Under sequence parallelism ``video`` and ``text`` are this process's parts of the streams (token-wise
        layers run on them) and attention runs over the whole sequence for this process's heads; ``last_only``
        is then not available (the last clips' tokens are spread over the processes)."""
        if last_only and seq.sharded:
            raise ValueError("last_only is not available under sequence parallelism")
        B = seq.batch
        seg_v, seg_t = seq.segs("video"), seq.segs("text")  # of the tokens this process holds
        a = self.attn
        update_text = not (self.context_pre_only or last_only)
        # One modulation set per column (= per text row), broadcast over that column's tokens.
        v_shift, v_scale, v_gate, v_shift2, v_scale2, v_gate2 = (per_column(c, B) for c in self.norm1.chunks(temb))
        t_mod = [per_column(c, B) for c in self.norm1_context.chunks(temb)]
        t_scale, t_shift = t_mod[:2] if self.context_pre_only else (t_mod[1], t_mod[0])

        h = modulate(self.norm1.norm(video), v_scale, v_shift, seg_v)
        v_k = seq.to_heads("video", norm_rope(heads(a.to_k, h, a.heads), a.norm_k, seq.rotation("video")))
        v_v = seq.to_heads("video", heads(a.to_v, h, a.heads))
        if last_only:  # the last clips' tokens are the only video queries whose result is used
            video, h = seq.tails("video", video), seq.tails("video", h)
            q_seg, q_rot, queries = seq.segs("last"), seq.rotation("last"), "last"
        else:
            q_seg, q_rot, queries = seg_v, seq.rotation("video"), "all" if update_text else "video"
        v_q = seq.to_heads("video", norm_rope(heads(a.to_q, h, a.heads), a.norm_q, q_rot))
        ht = modulate(self.norm1_context.norm(text), t_scale, t_shift, seg_t)
        t_k = seq.to_heads("text", norm_rope(heads(a.add_k_proj, ht, a.heads), a.text_norm_k, None))  # no rotation
        t_v = seq.to_heads("text", heads(a.add_v_proj, ht, a.heads))
        t_q = (seq.to_heads("text", norm_rope(heads(a.add_q_proj, ht, a.heads), a.text_norm_q, None))
               if update_text else None)

        if seq.attention == "flex":
            text_out, video_out = _joint_flex(seq, t_q, t_k, t_v, v_q, v_k, v_v, queries)
        else:
            text_out, video_out = _joint_per_column(seq, t_q, t_k, t_v, v_q, v_k, v_v, queries)
        video_out = seq.from_heads("video", video_out)
        video = gated_residual(video, v_gate, a.to_out[0](video_out), q_seg)
        video = gated_residual(video, v_gate2, self.ff(modulate(self.norm1.norm(video), v_scale2, v_shift2, q_seg)),
                               q_seg)
        if not update_text:
            return video, None
        t_gate, t_shift2, t_scale2, t_gate2 = t_mod[2:]
        text_out = seq.from_heads("text", text_out)
        text = gated_residual(text, t_gate, a.to_add_out(text_out), seg_t)
        text = gated_residual(text, t_gate2,
                              self.ff_context(modulate(self.norm1_context.norm(text), t_scale2, t_shift2, seg_t)),
                              seg_t)
        return video, text


def _joint_flex(seq: PackedSequence, t_q: Optional[torch.Tensor], t_k: torch.Tensor, t_v: torch.Tensor,
                v_q: torch.Tensor, v_k: torch.Tensor, v_v: torch.Tensor, queries: str
                ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """The joint attention of every column in one FlexAttention call: keys and values are all columns' text then
    all columns' video (``"double"`` layout); queries the same (``"all"``), the video alone (``"video"``) or the
    last clips (``"last"``). Returns (text output or ``None``, video output), each ``[B, L, h*d]``."""
    mask = seq.flex_mask("double", queries)
    heads = v_k.shape[2]
    k = pad_cat(seq, [t_k.flatten(2), v_k.flatten(2)], mask.kv_padded)
    v = pad_cat(seq, [t_v.flatten(2), v_v.flatten(2)], mask.kv_padded)
    q = pad_cat(seq, [t_q.flatten(2), v_q.flatten(2)] if queries == "all" else [v_q.flatten(2)], mask.q_padded)
    out = flex_attention_padded(q, k, v, mask, heads)
    if queries == "all":
        text_out, video_out, _ = out.split([t_q.shape[1], v_q.shape[1], mask.q_padded - mask.q_len], dim=1)
        return text_out, video_out
    return None, out.split([mask.q_len, mask.q_padded - mask.q_len], dim=1)[0]


def _joint_per_column(seq: PackedSequence, t_q: Optional[torch.Tensor], t_k: torch.Tensor, t_v: torch.Tensor,
                      v_q: torch.Tensor, v_k: torch.Tensor, v_v: torch.Tensor, queries: str
                      ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """The joint attention column by column (SDPA over each column's text then video, ``frame`` or ``column``
    groups); same contract as :func:`_joint_flex`."""
    lens, t_lens = seq.video_lens, seq.text_lens
    if queries == "last":
        q_lens, q_groups = seq.last_lens, seq.last_groups
    else:
        q_lens = lens
        q_groups = seq.groups if queries == "all" else [queries_from(g, t) for g, t in zip(seq.groups, t_lens)]
    keys = [torch.cat(kv, dim=1) for kv in zip(t_k.split(t_lens, dim=1), v_k.split(lens, dim=1))]
    values = [torch.cat(kv, dim=1) for kv in zip(t_v.split(t_lens, dim=1), v_v.split(lens, dim=1))]
    q_parts = list(v_q.split(q_lens, dim=1))
    if queries == "all":
        q_parts = [torch.cat(tq_vq, dim=1) for tq_vq in zip(t_q.split(t_lens, dim=1), q_parts)]
    outs = [attend(q, k, v, g) for q, k, v, g in zip(q_parts, keys, values, q_groups)]
    if queries != "all":
        return None, torch.cat(outs, dim=1)
    text_out, video_out = zip(*(o.split([t, length], dim=1) for o, t, length in zip(outs, t_lens, lens)))
    return torch.cat(text_out, dim=1), torch.cat(video_out, dim=1)
