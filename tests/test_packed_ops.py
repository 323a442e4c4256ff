"""The fused packed-layout ops (per-segment modulation, gated residual, prefix attention) against the plain
formulas they replace: outputs and gradients of every input, in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyramid_dit.packed_ops import attend, gated_residual, modulate
from pyramid_dit.packing import AttentionGroup, Segments

LENS = [3, 0, 5, 2]  # an empty segment too (a sequence-parallel part may hold none of a column)


def _per_token(v: torch.Tensor, lens: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(v, torch.tensor(lens), dim=1)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out * weight).sum(), inputs))


@pytest.mark.parametrize("batched", [False, True], ids=["per-segment (CPU)", "gather + product (GPU)"])
@pytest.mark.parametrize("batch", [1, 2])
def test_modulate_and_gated_residual_match_the_per_token_formulas(batched, batch):
    """Both ways of the per-column ops: per segment (the CPU's) and one gather forward, one indicator product per
    sum backward (the GPU's: the same number of kernels whatever the number of columns)."""
    seg = Segments.build(LENS, torch.device("cpu"), batched=batched)
    assert seg.batched == batched and (seg.index is not None) == batched
    g = torch.Generator().manual_seed(0)
    B, S, D, n = batch, sum(LENS), 5, len(LENS)
    x, y = (torch.randn(B, S, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    scale, shift, gate = (torch.randn(B, n, D, generator=g, dtype=torch.float64, requires_grad=True)
                          for _ in range(3))
    w = torch.randn(B, S, D, generator=g, dtype=torch.float64)

    out = modulate(x, scale, shift, seg)
    ref = x * (1 + _per_token(scale, LENS)) + _per_token(shift, LENS)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(_grads(out, [x, scale, shift], w), _grads(ref, [x, scale, shift], w)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    out = gated_residual(x, gate, y, seg)
    ref = x + _per_token(gate, LENS) * y
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(_grads(out, [x, gate, y], w), _grads(ref, [x, gate, y], w)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_prefix_attention_matches_masked_attention_with_gradients():
    """Temporal-causal groups (text, then frames of 2, 3, 3 tokens) with text padding, against one masked call."""
    g = torch.Generator().manual_seed(1)
    B, H, d, T, frames = 2, 2, 4, 3, [2, 3, 3]
    L = T + sum(frames)
    q, k, v = (torch.randn(B, L, H, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    text_valid = torch.tensor([[True, True, True], [True, True, False]])
    key_valid = torch.cat([text_valid, torch.ones(B, sum(frames), dtype=torch.bool)], dim=1)
    ends, starts = [], [0]
    for f in frames:
        ends.append((ends[-1] if ends else T) + f)
    starts += ends[:-1]
    groups = [AttentionGroup(n_queries=e - s, k_end=e, mask=key_valid[:, None, None, :e])
              for s, e in zip(starts, ends)]
    frame_of = torch.tensor([0] * T + [i for i, f in enumerate(frames) for _ in range(f)])
    # First group's queries are the text and frame 0: frame index 0 sees keys of frame <= 0.
    full_mask = (frame_of[None, :] <= frame_of[:, None])[None, None] & key_valid[:, None, None, :]
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=full_mask).transpose(1, 2).flatten(2)
    out = attend(q, k, v, groups)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(_grads(out, [q, k, v], w), _grads(ref, [q, k, v], w)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_attention_never_takes_the_cudnn_kernel(monkeypatch):
    """Masked SDPA on Hopper goes to cuDNN first, which builds a plan per new shape (seconds per AR step, measured
    on an H200): every attention call of ``attend`` runs with cuDNN's backend switched off, and only then."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                     torch.backends.cuda.flash_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    q = k = v = torch.randn(1, 5, 2, 4)
    groups = [AttentionGroup(n_queries=2, k_end=2, mask=None), AttentionGroup(n_queries=3, k_end=5, mask=None)]
    assert torch.backends.cuda.cudnn_sdp_enabled()  # torch's default, restored after the call
    attend(q, k, v, groups)
    assert seen == [(False, True, True)] * 2
    assert torch.backends.cuda.cudnn_sdp_enabled()
