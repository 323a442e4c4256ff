"""``compile_blocks`` (torch.compile of the DiT blocks, inductor on CPU): same outputs and gradients as eager."""
from __future__ import annotations

import pytest
import torch
from test_dit import outputs_and_grads

from pyramid_dit.kinds import get_kind

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
    """float32 inputs of ``COLUMNS``, one prompt padded."""
    rows, T = len(COLUMNS), 6
    mask = torch.ones(rows, T, dtype=torch.int64)
    mask[1, 4:] = 0  # padding at the end of one row's prompt
    return dict(sample=[[torch.randn(1, 16, *s, generator=g) for s in col] for col in COLUMNS],
                encoder_hidden_states=torch.randn(rows, T, 24, generator=g),
                encoder_attention_mask=mask,
                pooled_projections=torch.randn(rows, 20, generator=g),
                timestep_ratio=torch.tensor([300.0, 700.0]))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_compiled_blocks_match_eager_with_gradients(kind):
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = get_kind(kind).dit()(**CONFIGS[kind]).train()
    with torch.no_grad():
        for p in eager.parameters():
            p.normal_(0, 0.1)
    compiled = get_kind(kind).dit()(**CONFIGS[kind]).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    inputs = _inputs(torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(col[-1].shape, generator=g) for col in inputs["sample"]]
    out_e, grad_e = outputs_and_grads(eager, inputs, weights)
    out_c, grad_c = outputs_and_grads(compiled, inputs, weights)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks really were compiled
    for a, b in zip(out_c, out_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grad_e.keys() == grad_c.keys()
    for name in grad_e:
        torch.testing.assert_close(grad_c[name], grad_e[name], rtol=1e-4, atol=1e-6, msg=name)
    assert compiled.state_dict().keys() == eager.state_dict().keys()

