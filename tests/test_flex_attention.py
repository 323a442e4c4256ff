"""FlexAttention (``attention_split="flex"``, the CUDA default): one attention call per block over the whole packed
sequence, with one block-sparse mask per forward built on the host.

The mask is the only part that is ours (the kernels are PyTorch's), so it is checked three ways on the CPU:

* tile by tile against the rule (no kernel): every allowed (query, key) pair lies in a tile the mask lists, a tile
  marked *full* (run without ``mask_mod``) holds allowed pairs only, and ``mask_mod`` equals the rule on every
  pair; for both key layouts and every query set, with prompt lengths known on the host or only on the device;
* the whole model, forward: outputs equal the per-frame SDPA path's (torch has no CPU backward for FlexAttention:
  ``tools/gpu_check.sh`` compares gradients on a GPU);
* compilations: many varied AR and full-sequence layouts reuse a handful of compiled kernels (dynamic shapes).

CPU FlexAttention compiles through inductor's C++ backend (seconds per kernel), so the model tests share one
process-wide compiled function and stay small.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_dit import AR_COLUMNS, make_inputs, rel_err
from test_dit import tiny_model as flux_model
from test_mmdit import tiny_model as sd3_model

from pyramid_dit.packing import FLEX_BLOCK, FlexPlan, _ColumnLayout, resolve_attention_split

PARITY = 1e-5  # the golden tests' bound (relative to the largest output), float32


# ------------------------------------------------------------------------------------------------ the mask alone

def _layout(text: int, frames: list[int], last_frames: int) -> _ColumnLayout:
    return _ColumnLayout(text=text, frames=frames, last_frames=last_frames, last_tokens=sum(frames[-last_frames:]))


def _rule(plan: FlexPlan, order: str, queries: str, row_lengths: list[list[int]]) -> np.ndarray:
    """``[B, q_padded, kv_padded]`` bool, written out token by token: query and key in the same column, the key
    not text padding and its frame not later than the query's (text is frame 0). Padding rows and columns: False."""
    mask = plan.mask(order, queries)
    text = [(c, 0, i) for c, col in enumerate(plan.columns) for i in range(col.text)]  # (column, frame, index)
    video = [[(c, f, None) for f, n in enumerate(col.frames) for _ in range(n)] for c, col in enumerate(plan.columns)]
    if order == "double":
        keys = text + [t for v in video for t in v]
    else:
        keys = [t for c in range(len(plan.columns)) for t in [x for x in text if x[0] == c] + video[c]]
    if queries == "all":
        qs = keys
    elif queries == "video":
        qs = [t for v in video for t in v]
    else:
        qs = [t for c, col in enumerate(plan.columns) for t in video[c][col.video - col.last_tokens:]]
    out = np.zeros((plan.batch, mask.q_padded, mask.kv_padded), dtype=bool)
    for b in range(plan.batch):
        for qi, (qc, qf, _) in enumerate(qs):
            for ki, (kc, kf, i) in enumerate(keys):
                out[b, qi, ki] = qc == kc and kf <= qf and (i is None or i < row_lengths[b][kc])
    return out


def _tiles(mask, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(listed partial tiles, listed full tiles) of batch row ``b`` as dense ``[nq, nk]`` bool."""
    bm = mask.block_mask
    nq, nk = mask.q_padded // FLEX_BLOCK, mask.kv_padded // FLEX_BLOCK
    dense = []
    for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        d = np.zeros((nq, nk), dtype=bool)
        for i in range(nq):
            d[i, idx[b, 0, i, :num[b, 0, i]].numpy()] = True
        dense.append(d)
    return dense[0], dense[1]


LAYOUTS = {
    # AR: text, then history frames at lower resolutions, the trained clip last (several columns).
    "ar": ([_layout(40, [60, 60, 120], 1), _layout(0, [15, 200], 1), _layout(100, [30, 30, 30, 300, 300], 2)],
           [[40, 0, 77], [12, 0, 100]]),
    # Full sequence, no temporal causality: one "frame" per column.
    "full": ([_layout(50, [700], 1), _layout(9, [130], 1)], [[50, 9], [3, 1]]),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("host_lengths", [True, False])
def test_block_mask_tiles_and_mask_mod_follow_the_rule(name, host_lengths):
    columns, lengths = LAYOUTS[name]
    batch = len(lengths)
    plan = FlexPlan(columns, batch, lengths if host_lengths else None, torch.device("cpu"))
    if not host_lengths:  # the device mask, as pack_columns hands it over
        plan.text_valid = torch.tensor([[i < lengths[b][c] for c, col in enumerate(columns) for i in range(col.text)]
                                        for b in range(batch)])
    for order, queries in [("double", "all"), ("double", "video"), ("double", "last"), ("joint", "all"),
                           ("joint", "last")]:
        mask = plan.mask(order, queries)
        rule = _rule(plan, order, queries, lengths)
        mask_mod = mask.block_mask.mask_mod
        q_idx = torch.arange(mask.q_padded)[:, None]
        kv_idx = torch.arange(mask.kv_padded)[None, :]
        for b in range(batch):
            evaluated = mask_mod(torch.tensor(b), 0, q_idx, kv_idx).numpy()
            assert (evaluated == rule[b]).all(), (order, queries, b)
            partial, full = _tiles(mask, b)
            assert not (partial & full).any()
            for i, j in itertools.product(range(partial.shape[0]), range(partial.shape[1])):
                tile = rule[b, i * FLEX_BLOCK:(i + 1) * FLEX_BLOCK, j * FLEX_BLOCK:(j + 1) * FLEX_BLOCK]
                if tile.any():
                    assert partial[i, j] or full[i, j], (order, queries, b, i, j)
                if full[i, j]:  # every real query of the tile sees every key of it
                    real = rule[b, i * FLEX_BLOCK:(i + 1) * FLEX_BLOCK].any(-1)
                    assert tile[real].all(), (order, queries, b, i, j)
            if host_lengths:  # exact: a listed partial tile has both allowed and forbidden pairs
                for i, j in zip(*np.nonzero(partial)):
                    tile = rule[b, i * FLEX_BLOCK:(i + 1) * FLEX_BLOCK, j * FLEX_BLOCK:(j + 1) * FLEX_BLOCK]
                    assert tile.any()
        allowed = int(rule.sum())
        assert mask.pairs == allowed if host_lengths else mask.pairs >= allowed


def test_auto_resolves_to_flex_on_cuda_and_meta_only():
    assert resolve_attention_split("auto", torch.device("cpu")) == "frame"
    assert resolve_attention_split("auto", torch.device("meta")) == "flex"
    assert resolve_attention_split("column", torch.device("meta")) == "column"
    with pytest.raises(ValueError, match="attention split 'clip'"):
        resolve_attention_split("clip", torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ the model

def _forward(model, inputs: dict, split: str) -> list[torch.Tensor]:
    model.attention_split = split
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("kind", ["pyramid_flux", "pyramid_mmdit"])
def test_flex_forward_equals_the_frame_path(kind):
    """AR columns (history clips, text padded per row, batch 2) and a full-sequence one; the second case has a
    prompt with a hole, so the host cannot trim it and the kernel reads the device mask."""
    model = (flux_model if kind == "pyramid_flux" else sd3_model)().eval()
    cases = [make_inputs(AR_COLUMNS, batch=2), make_inputs([[(3, 4, 6)], [(2, 8, 8)]], batch=1)]
    cases[1]["encoder_attention_mask"][0, 2] = 0
    for inputs in cases:
        frame, flex = _forward(model, inputs, "frame"), _forward(model, inputs, "flex")
        errs = [rel_err(a, b) for a, b in zip(flex, frame)]
        print(kind, [f"{e:.1e}" for e in errs])
        assert max(errs) <= PARITY, errs


@pytest.mark.parametrize("folder", ["flux_tiny", "mmdit_tiny"])
def test_flex_forward_meets_the_golden_bound(golden_dir, folder):
    """The reference-written AR vectors (tests/golden) through FlexAttention: within the golden tests' bound."""
    import json

    from safetensors.torch import load_file

    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    from pyramid_dit.modeling_pyramid_mmdit import PyramidDiffusionMMDiT

    cls = PyramidFluxTransformer if folder == "flux_tiny" else PyramidDiffusionMMDiT
    model = cls.from_pretrained(golden_dir / folder).train()
    spec = json.loads((golden_dir / folder / "cases.json").read_text())["case_ar"]
    data = load_file(golden_dir / folder / spec["file"])
    n = spec["n_columns"]
    sample = [[data[f"sample.{c}.{k}"] for k in range(len(spec["clip_shapes"][c]))] for c in range(n)]
    inputs = dict(sample=sample, **{k: data[k] for k in ("encoder_hidden_states", "encoder_attention_mask",
                                                           "pooled_projections", "timestep_ratio")})
    out = _forward(model, inputs, "flex")
    errs = [rel_err(out[c], data[f"out.{c}"]) for c in range(n)]
    print(folder, [f"{e:.1e}" for e in errs])
    assert max(errs) <= PARITY, errs


def test_flex_refuses_cpu_backward_with_a_way_out():
    model = flux_model().train()
    model.attention_split = "flex"
    inputs = make_inputs(AR_COLUMNS)
    with pytest.raises(NotImplementedError, match="attention_split='frame'"):
        torch.stack([o.sum() for o in model(**inputs)]).sum().backward()


def test_new_layouts_reuse_the_compiled_kernel(monkeypatch):
    """Varied AR and full-sequence batches (column counts, history lengths, resolutions, prompt lengths, one
    or two rows per column) compile FlexAttention a handful of times, not once per layout.

    Compiled as on CUDA (dynamic shapes); whether a call compiles again is TorchDynamo's decision (its guards),
    made before any backend runs, so the graphs are handed to a counting backend that runs them with torch's
    eager FlexAttention (the CPU's C++ kernel builder cannot make dynamic FlexAttention kernels in torch 2.13).
    ``tools/gpu_check.sh`` counts the real CUDA compilations.
    """
    import pyramid_dit.packed_ops as packed_ops

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    as_on_cuda = packed_ops._compiled_flex
    monkeypatch.setattr(packed_ops, "_compiled_flex", lambda dynamic: as_on_cuda(True, counting))
    model = flux_model().to(torch.bfloat16).eval()  # as trained on a GPU (the attention inputs' bases differ in fp32)
    layouts = [
        (AR_COLUMNS, 1, (0, 3, 1)), (AR_COLUMNS, 2, (2, 0)), ([[(1, 4, 6)] * 2, [(1, 4, 6), (1, 8, 12)]], 1, (5,)),
        ([[(2, 4, 6), (1, 8, 12), (1, 8, 12)]], 1, (0,)), ([[(1, 4, 6)] * 4, [(3, 4, 6), (1, 16, 24)]], 2, (1, 4)),
        ([[(3, 8, 8)]], 1, (0,)), ([[(5, 4, 6)], [(2, 8, 12)], [(1, 16, 24)]], 1, (6, 0, 2)),
        ([[(4, 16, 24)]], 2, (9, 0)), ([[(2, 6, 6)], [(2, 12, 12)]], 1, (0, 7)),
        ([[(1, 8, 12)] * 3, [(1, 8, 12), (1, 16, 24), (1, 16, 24)]], 1, (2, 2)),
        ([[(1, 4, 6)] * 3, [(1, 4, 6), (1, 8, 12), (1, 8, 12)], [(3, 4, 6), (1, 8, 12), (1, 16, 24), (1, 16, 24)]], 2,
         (0, 1, 8)),
        ([[(7, 8, 12)]], 1, (3,)), ([[(1, 2, 4), (2, 4, 6)], [(1, 16, 16)]], 1, (1, 1)),
        ([[(2, 4, 6)] * 2, [(2, 4, 6), (1, 8, 12)]], 2, (0, 0)),
    ]
    for columns, batch, pad in layouts:
        inputs = make_inputs(columns, batch=batch, pad=pad)
        inputs = {k: ([[c.bfloat16() for c in col] for col in v] if k == "sample" else
                      v.bfloat16() if k in ("encoder_hidden_states", "pooled_projections") else v)
                  for k, v in inputs.items()}
        flex, frame = _forward(model, inputs, "flex"), _forward(model, inputs, "frame")
        assert max(rel_err(a, b) for a, b in zip(flex, frame)) <= 2e-2  # bfloat16 rounding
    print(f"{len(layouts)} layouts, {2 * len(layouts) * (len(model.transformer_blocks) + 2)} FlexAttention calls, "
          f"{len(graphs)} compilations")
    # One per batch size (1, 2) and per kind of attention input the blocks hand over (the double-stream blocks'
    # concatenations, the single-stream block's projections): none per layout.
    assert 1 <= len(graphs) <= 6
