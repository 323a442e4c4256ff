"""Transformer blocks of the Pyramid Flow miniFLUX DiT, working on a packed multi-column token sequence.

The double-stream block is the joint block both kinds share (:class:`pyramid_dit.dit_layers.JointTransformerBlock`
with the miniFLUX names and epsilon); the single-stream block below is miniFLUX's own. Layouts are those of
:mod:`pyramid_dit.packing`; single-stream blocks see ``[B, sum(T_c + L_c), D]`` where each column's segment is
its text then its video.

Parameter names mirror the released checkpoint (``attn.to_q``, ``proj_mlp``, ``norm.linear``, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyramid_dit.dit_layers import AdaNorm, JointTransformerBlock, RMSNorm, heads, norm_rope, pad_cat
from pyramid_dit.packed_ops import attend, flex_attention_padded, gated_residual, modulate, per_column
from pyramid_dit.packing import PackedSequence


class FluxTransformerBlock(JointTransformerBlock):
    """Double-stream block of the miniFLUX kind (text-side norms named ``norm_added_q`` / ``norm_added_k``)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int):
        super().__init__(dim, num_attention_heads, attention_head_dim, qk_norm_eps=1e-6, text_norm="norm_added")


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
        returned (``[B, sum(last_lens), D]``), attending to the whole column as usual. Under sequence parallelism
        ``x`` is this process's part of the joint stream and ``last_only`` is not available."""
        if last_only and seq.sharded:
            raise ValueError("last_only is not available under sequence parallelism")
        lens, a = seq.joint_lens, self.attn
        seg = seq.segs("joint")
        shift, scale, gate = (per_column(c, seq.batch) for c in self.norm.chunks(temb))

        h = modulate(self.norm.norm(x), scale, shift, seg)
        if seq.attention == "flex" and not seq.sharded:
            return self._flex_unsharded(x, h, gate, seq, last_only)
        k = seq.to_heads("joint", norm_rope(heads(a.to_k, h, a.heads), a.norm_k, seq.rotation("joint")))
        v = seq.to_heads("joint", heads(a.to_v, h, a.heads))
        if last_only:  # the last clips' tokens are the only queries whose result is used
            x, h = seq.tails("joint", x), seq.tails("joint", h)
            q_seg, q_rot = seq.segs("last"), seq.rotation("last")
        else:
            q_seg, q_rot = seg, seq.rotation("joint")
        q = seq.to_heads("joint", norm_rope(heads(a.to_q, h, a.heads), a.norm_q, q_rot))

        if seq.attention == "flex":  # under SP: the whole stream of this process's heads, padded for the kernel
            mask = seq.flex_mask("joint", "all")
            out = flex_attention_padded(*(pad_cat(seq, [t.flatten(2)], n) for t, n in
                                          ((q, mask.q_padded), (k, mask.kv_padded), (v, mask.kv_padded))),
                                        mask, q.shape[2])
            attn = out.split([q.shape[1], mask.q_padded - q.shape[1]], dim=1)[0]
        else:
            q_lens, groups = (seq.last_lens, seq.last_groups) if last_only else (lens, seq.groups)
            outs = [attend(q_c, k_c, v_c, g) for q_c, k_c, v_c, g in
                    zip(q.split(q_lens, dim=1), k.split(lens, dim=1), v.split(lens, dim=1), groups)]
            attn = torch.cat(outs, dim=1)
        attn = seq.from_heads("joint", attn)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        return gated_residual(x, gate, self.proj_out(torch.cat([attn, mlp], dim=-1)), q_seg)

    def _flex_unsharded(self, x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, seq: PackedSequence,
                        last_only: bool) -> torch.Tensor:
        """The block's attention as one FlexAttention call, without SP. The joint stream already carries the tile
        padding (``seq.joint_pad``), so keys, values and (all) queries go to the kernel as computed: the
        projection and the cast after the rotation, no padded copies."""
        a = self.attn
        k = norm_rope(heads(a.to_k, h, a.heads), a.norm_k, seq.rotation("joint"), flat=True)
        v = a.to_v(h)
        if last_only:  # the last clips' tokens are the only queries whose result is used
            x, h = seq.tails("joint", x), seq.tails("joint", h)
            q_seg, q_rot, queries = seq.segs("last"), seq.rotation("last"), "last"
        else:
            q_seg, q_rot, queries = seq.segs("joint"), seq.rotation("joint"), "all"
        mask = seq.flex_mask("joint", queries)
        q = pad_cat(seq, [norm_rope(heads(a.to_q, h, a.heads), a.norm_q, q_rot, flat=True)], mask.q_padded)
        attn = flex_attention_padded(q, k, v, mask, a.heads)
        if attn.shape[1] != x.shape[1]:  # the last clips' queries were padded for the kernel
            attn = attn.split([x.shape[1], attn.shape[1] - x.shape[1]], dim=1)[0]
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        return gated_residual(x, gate, self.proj_out(torch.cat([attn, mlp], dim=-1)), q_seg)
