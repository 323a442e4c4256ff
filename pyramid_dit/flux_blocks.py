"""Transformer blocks of the Pyramid Flow miniFLUX DiT, working on a packed multi-column token sequence.

A forward call carries several *columns* (pyramid stages, or autoregressive units) at once. Each column has
its own text rows, its own video tokens and its own conditioning vector; attention never crosses columns.
To keep the matrix multiplies large, tokens of all columns are packed along the sequence axis and only the
column-dependent steps (adaptive-norm modulation, attention) loop over columns.

Layouts (``B`` = rows per column, ``n`` = columns, ``D`` = width; column ``c`` has ``T_c`` text tokens, its
text trimmed to the longest prompt among its rows, and ``L_c`` video tokens):

* double-stream blocks: video ``[B, sum(L_c), D]`` and text ``[B, sum(T_c), D]``, column after column;
* single-stream blocks: ``[B, sum(T_c + L_c), D]`` where each column's segment is its text then its video.

Parameter names mirror the released checkpoint (``attn.to_q``, ``ff.net.0.proj``, ``norm1.linear``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyramid_dit.embeddings import apply_rope


# --------------------------------------------------------------------------------------------------------
# Packed-sequence bookkeeping, built once per forward call
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionGroup:
    """The next ``n_queries`` queries of a column segment attend keys ``[0, k_end)`` of that segment.

    ``mask`` is ``None`` (all those keys visible) or a boolean ``[B, 1, 1, k_end]`` (True = visible: not text
    padding), shared by every layer of the forward call.
    """

    n_queries: int
    k_end: int
    mask: Optional[torch.Tensor]


@dataclass
class PackedSequence:
    """Everything the blocks need to know about how the columns are packed (no parameters, no grads).

    ``groups[c]`` splits column ``c``'s queries (text first, then video) into consecutive runs with their
    key prefix and mask; see ``PyramidFluxTransformer._attention_groups``. ``last_groups[c]`` is the same for
    the queries of the column's last clip alone (``last_lens[c]`` tokens, at the end of the segment): the
    final block computes only those, since nothing else is returned.
    """

    batch: int
    text_lens: list[int]
    video_lens: list[int]
    last_lens: list[int]
    groups: list[list[AttentionGroup]]
    last_groups: list[list[AttentionGroup]]
    rope_video: tuple[torch.Tensor, torch.Tensor]  # rope_tables() of the packed video tokens
    rope_joint: tuple[torch.Tensor, torch.Tensor]  # ... of the single-stream layout (text rows: angle 0)
    rope_last: tuple[torch.Tensor, torch.Tensor]  # ... of the last clips' tokens

    @property
    def n_columns(self) -> int:
        return len(self.video_lens)

    @property
    def joint_lens(self) -> list[int]:
        return [t + v for t, v in zip(self.text_lens, self.video_lens)]


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, seg_lens: Sequence[int]) -> torch.Tensor:
    """``x * (1 + scale_c) + shift_c`` on each column segment of the packed ``x`` ``[B, S, D]``.

    ``scale``/``shift`` are ``[B, n, D]``. Broadcasting per segment avoids materialising a per-token copy of
    the modulation vectors.
    """
    parts = x.split(list(seg_lens), dim=1)
    scales, shifts = (1 + scale).unsqueeze(2).unbind(1), shift.unsqueeze(2).unbind(1)
    return torch.cat([p * s + b for p, s, b in zip(parts, scales, shifts)], dim=1)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, seg_lens: Sequence[int]) -> torch.Tensor:
    """``x + gate_c * y`` on each column segment; ``gate`` is ``[B, n, D]``."""
    xs, ys = x.split(list(seg_lens), dim=1), y.split(list(seg_lens), dim=1)
    return torch.cat([xp + g * yp for xp, g, yp in zip(xs, gate.unsqueeze(2).unbind(1), ys)], dim=1)


def tails(x: torch.Tensor, seg_lens: Sequence[int], tail_lens: Sequence[int]) -> torch.Tensor:
    """The last ``tail_lens[c]`` tokens of each column segment of the packed ``x``, packed again."""
    split = [m for length, tail in zip(seg_lens, tail_lens) for m in (length - tail, tail)]
    return torch.cat(x.split(split, dim=1)[1::2], dim=1)


def per_column(emb: torch.Tensor, batch: int) -> torch.Tensor:
    """Row-interleaved ``[B*n, K]`` -> ``[B, n, K]`` (row ``b*n + c`` is column ``c`` of batch item ``b``)."""
    return emb.view(batch, -1, emb.shape[-1])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: Sequence[AttentionGroup]) -> torch.Tensor:
    """Attention within one column segment. ``q, k, v``: ``[B, L, H, d]`` -> ``[B, L, H*d]``.

    Each group is one ``scaled_dot_product_attention`` call over its key prefix: keys past the prefix are
    ones the temporal-causal rule forbids for every query of the group, so they are skipped, not masked.
    """
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    outs = []
    for g, q_g in zip(groups, q.split([g.n_queries for g in groups], dim=1)):
        k_g, v_g = (k, v) if g.k_end == k.shape[2] else (k[:, :, : g.k_end], v[:, :, : g.k_end])
        outs.append(F.scaled_dot_product_attention(q_g.transpose(1, 2), k_g, v_g, attn_mask=g.mask).transpose(1, 2))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.flatten(2)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    if hasattr(F, "rms_norm"):  # torch >= 2.4: fused, same float32 result as the formula below
        return F.rms_norm(x, x.shape[-1:], eps=eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# --------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMS norm over the last axis with a learned scale (queries and keys, per head), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.normalize_fp32(x)).to(x.dtype)

    def normalize_fp32(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x.float(), self.eps) * self.weight.float()


def heads(linear: nn.Linear, x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``linear(x)`` split into heads: ``[B, L, D] -> [B, L, H, d]``."""
    return linear(x).unflatten(-1, (n_heads, -1))


def norm_rope(x: torch.Tensor, norm: RMSNorm, rope: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """RMS-normalise queries or keys ``[B, L, H, d]`` and rotate them by ``rope`` (tables ``[L, d]``).

    Runs in float32 and rounds once to the activation dtype. ``rope=None`` means position (0, 0, 0), where the
    rotation is the identity (text tokens).
    """
    y = norm.normalize_fp32(x)
    if rope is not None:
        y = apply_rope(y, rope[0][:, None], rope[1][:, None])
    return y.to(x.dtype)


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
    """Projections of the double-stream attention (video: ``to_*``, text: ``add_*``); the math lives in the block."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.add_k_proj, self.add_v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.add_q_proj = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(inner, dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)


class FluxTransformerBlock(nn.Module):
    """Double-stream (MMDiT) block: text and video keep separate weights and meet only inside attention."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int):
        super().__init__()
        self.norm1 = AdaNorm(dim, 6)
        self.norm1_context = AdaNorm(dim, 6)
        self.attn = JointAttention(dim, num_attention_heads, attention_head_dim)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def forward(self, video: torch.Tensor, text: torch.Tensor, temb: torch.Tensor, seq: PackedSequence
                ) -> tuple[torch.Tensor, torch.Tensor]:
        B, lens, t_lens = seq.batch, seq.video_lens, seq.text_lens
        a = self.attn
        # One modulation set per column (= per text row), broadcast over that column's tokens.
        v_shift, v_scale, v_gate, v_shift2, v_scale2, v_gate2 = (per_column(c, B) for c in self.norm1.chunks(temb))
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = (
            per_column(c, B) for c in self.norm1_context.chunks(temb))

        h = modulate(self.norm1.norm(video), v_scale, v_shift, lens)
        v_q = norm_rope(heads(a.to_q, h, a.heads), a.norm_q, seq.rope_video)
        v_k = norm_rope(heads(a.to_k, h, a.heads), a.norm_k, seq.rope_video)
        v_v = heads(a.to_v, h, a.heads)
        h = modulate(self.norm1_context.norm(text), t_scale, t_shift, t_lens)
        t_q = norm_rope(heads(a.add_q_proj, h, a.heads), a.norm_added_q, None)  # text: no rotation
        t_k = norm_rope(heads(a.add_k_proj, h, a.heads), a.norm_added_k, None)
        t_v = heads(a.add_v_proj, h, a.heads)

        # Attention per column over its text followed by its video tokens.
        t_q, t_k, t_v = (t.split(t_lens, dim=1) for t in (t_q, t_k, t_v))
        v_q, v_k, v_v = (t.split(lens, dim=1) for t in (v_q, v_k, v_v))
        video_out, text_out = [], []
        for c in range(seq.n_columns):
            q, k, v = (torch.cat([t[c], vid[c]], dim=1) for t, vid in ((t_q, v_q), (t_k, v_k), (t_v, v_v)))
            o_text, o_video = attend(q, k, v, seq.groups[c]).split([t_lens[c], lens[c]], dim=1)
            text_out.append(o_text)
            video_out.append(o_video)
        video = gated_residual(video, v_gate, a.to_out[0](torch.cat(video_out, dim=1)), lens)
        text = gated_residual(text, t_gate, a.to_add_out(torch.cat(text_out, dim=1)), t_lens)

        video = gated_residual(video, v_gate2, self.ff(modulate(self.norm1.norm(video), v_scale2, v_shift2, lens)),
                               lens)
        text = gated_residual(text, t_gate2,
                              self.ff_context(modulate(self.norm1_context.norm(text), t_scale2, t_shift2, t_lens)),
                              t_lens)
        return video, text


class SingleAttention(nn.Module):
    """Projections of the single-stream attention (no output projection: the block's ``proj_out`` does it)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block: attention and MLP run in parallel on the joint text+video sequence."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaNorm(dim, 3)
        self.proj_mlp = nn.Linear(dim, self.mlp_hidden_dim)
        self.proj_out = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.attn = SingleAttention(dim, num_attention_heads, attention_head_dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, seq: PackedSequence, last_only: bool = False
                ) -> torch.Tensor:
        """``[B, S, D] -> [B, S, D]``; with ``last_only``, only each column's last-clip tokens are computed and
        returned (``[B, sum(last_lens), D]``), attending to the whole column as usual."""
        lens, a = seq.joint_lens, self.attn
        shift, scale, gate = (per_column(c, seq.batch) for c in self.norm.chunks(temb))

        h = modulate(self.norm.norm(x), scale, shift, lens)
        k = norm_rope(heads(a.to_k, h, a.heads), a.norm_k, seq.rope_joint)
        v = heads(a.to_v, h, a.heads)
        if last_only:  # the last clips' tokens are the only queries whose result is used
            x, h = tails(x, lens, seq.last_lens), tails(h, lens, seq.last_lens)
            q_lens, q_rope, groups = seq.last_lens, seq.rope_last, seq.last_groups
        else:
            q_lens, q_rope, groups = lens, seq.rope_joint, seq.groups
        q = norm_rope(heads(a.to_q, h, a.heads), a.norm_q, q_rope)

        outs = [attend(q_c, k_c, v_c, g) for q_c, k_c, v_c, g in
                zip(q.split(q_lens, dim=1), k.split(lens, dim=1), v.split(lens, dim=1), groups)]
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        return gated_residual(x, gate, self.proj_out(torch.cat([torch.cat(outs, dim=1), mlp], dim=-1)), q_lens)
