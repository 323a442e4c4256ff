"""One attention call per frame or one masked call per column: the same function, outputs and gradients."""
from __future__ import annotations

import pytest
import torch

from pyramid_dit.kinds import get_kind
from pyramid_dit.packing import attention_groups

CONFIGS = {
    "pyramid_flux": dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=[4, 6, 6]),
    "pyramid_mmdit": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32,
                          joint_attention_dim=24, pooled_projection_dim=20, sample_size=32, pos_embed_max_size=16,
                          pos_embed_type="sincos", temp_pos_embed_type="rope", add_temp_pos_embed=True,
                          use_temporal_causal=True, interp_condition_pos=True, use_t5_mask=True,
                          use_flash_attn=False),
}
# Two columns shaped like the temporal pyramid's: history clips, then the trained clip (last).
COLUMNS = [[(2, 4, 4), (1, 8, 8)], [(1, 4, 4), (1, 8, 8), (2, 8, 8)]]


def _inputs(g: torch.Generator) -> dict:
    rows, T = len(COLUMNS), 6
    mask = torch.ones(rows, T, dtype=torch.int64)
    mask[1, 4:] = 0  # padding at the end of one row's prompt
    return dict(sample=[[torch.randn(1, 16, *s, generator=g, dtype=torch.float64) for s in col] for col in COLUMNS],
                encoder_hidden_states=torch.randn(rows, T, 24, generator=g, dtype=torch.float64),
                encoder_attention_mask=mask,
                pooled_projections=torch.randn(rows, 20, generator=g, dtype=torch.float64),
                timestep_ratio=torch.tensor([300.0, 700.0]))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_column_split_equals_frame_split_with_gradients(kind):
    torch.manual_seed(0)
    model = get_kind(kind).dit()(**CONFIGS[kind]).double().train()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # no zero-initialised output layers: every path carries signal
    inputs = _inputs(torch.Generator().manual_seed(1))
    results = {}
    for split in ("frame", "column"):
        model.attention_split = split
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        w = [torch.randn(o.shape, generator=torch.Generator().manual_seed(2), dtype=o.dtype) for o in out]
        sum((o * wi).sum() for o, wi in zip(out, w)).backward()
        results[split] = ([o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters()
                                                       if p.grad is not None})
    (out_f, grad_f), (out_c, grad_c) = results["frame"], results["column"]
    for a, b in zip(out_f, out_c):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert grad_f.keys() == grad_c.keys() and len(grad_f) > 10
    for name in grad_f:
        torch.testing.assert_close(grad_f[name], grad_c[name], rtol=1e-9, atol=1e-12, msg=name)


def test_column_split_is_one_group_with_the_frame_rule():
    text_valid = torch.tensor([[True, False]])
    (group,) = attention_groups(2, text_valid, [1, 2], temporal_causal=True, split="column")
    frame_keys = [0, 0, 0, 1, 1]  # 2 text tokens and the first frame are frame 0
    expected = torch.tensor([[kf <= qf and k != 1 for k, kf in enumerate(frame_keys)] for qf in frame_keys])
    assert (group.n_queries, group.k_end) == (5, 5)
    assert torch.equal(group.mask[0, 0], expected)
    assert len(attention_groups(2, text_valid, [1, 2], temporal_causal=True, split="frame")) == 2
    with pytest.raises(ValueError, match="attention split 'clip'"):
        attention_groups(2, None, [1], temporal_causal=True, split="clip")
