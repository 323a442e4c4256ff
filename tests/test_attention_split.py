"""One attention call per frame or one masked call per column: the same function, outputs and gradients."""
from __future__ import annotations

import pytest
import torch
from test_dit import AR_COLUMNS, make_inputs, outputs_and_grads

from pyramid_dit.packing import attention_groups


def tiny_model(kind: str):
    """The tiny random-weight model of each kind's own tests."""
    if kind == "pyramid_flux":
        from test_dit import tiny_model as build
    else:
        from test_mmdit import tiny_model as build
    return build()


def ar_inputs(dtype: torch.dtype) -> tuple[dict, list[torch.Tensor]]:
    """AR columns (history clips, then the trained clip) with padded prompts, and one weight per output."""
    inputs = make_inputs(AR_COLUMNS, batch=2, seed=1)
    inputs = {k: ([[c.to(dtype) for c in col] for col in v] if k == "sample" else
                  (v.to(dtype) if v.is_floating_point() and k != "timestep_ratio" else v)) for k, v in inputs.items()}
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(col[-1].shape, generator=g, dtype=dtype) for col in inputs["sample"]]
    return inputs, weights


@pytest.mark.parametrize("kind", ["pyramid_flux", "pyramid_mmdit"])
def test_column_split_equals_frame_split_with_gradients(kind):
    model = tiny_model(kind).double().train()
    inputs, weights = ar_inputs(torch.float64)
    results = []
    for split in ("frame", "column"):
        model.attention_split = split
        results.append(outputs_and_grads(model, inputs, weights))
    (out_f, grad_f), (out_c, grad_c) = results
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
