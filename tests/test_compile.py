"""``compile_blocks`` (torch.compile of the DiT blocks, inductor on CPU): same outputs and gradients as eager."""
from __future__ import annotations

import pytest
import torch

from pyramid_dit.kinds import get_kind
from tests.test_attention_split import CONFIGS, _inputs


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
    inputs = {k: ([[c.float() for c in col] for col in v] if k == "sample" else
                  (v.float() if v.is_floating_point() else v)) for k, v in _inputs(torch.Generator().manual_seed(1)).items()}
    results = []
    for model in (eager, compiled):
        out = model(**inputs)
        w = [torch.randn(o.shape, generator=torch.Generator().manual_seed(2)) for o in out]
        sum((o * wi).sum() for o, wi in zip(out, w)).backward()
        results.append(([o.detach() for o in out], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks really were compiled
    (out_e, grad_e), (out_c, grad_c) = results
    for a, b in zip(out_c, out_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grad_e.keys() == grad_c.keys()
    for name in grad_e:
        torch.testing.assert_close(grad_c[name], grad_e[name], rtol=1e-4, atol=1e-6, msg=name)
    assert compiled.state_dict().keys() == eager.state_dict().keys()

