"""PyramidFluxTransformer: reference parity, checkpoint layout, causality, loading, checkpointing, dtypes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyramid_dit.embeddings import apply_rope, clip_positions, rope_tables
from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer, patchify, unpatchify

TINY = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=[4, 6, 6])
PARITY = 1e-5  # relative to max |reference|, float32


def tiny_model(seed: int = 0, **overrides) -> PyramidFluxTransformer:
    """Tiny model with every weight random (the default init zeroes adaLN and the output: outputs would be 0)."""
    model = PyramidFluxTransformer(**{**TINY, **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_rms_scale = name.split(".")[-2].startswith("norm_")  # attn.norm_q / norm_k / norm_added_*
            p.copy_(1 + 0.1 * noise if is_rms_scale else 0.1 * noise)
    return model


def make_inputs(clip_shapes, batch=1, text_len=10, pad=(0, 3, 1, 5, 2, 0, 4, 1), seed=0):
    """Random model inputs; ``clip_shapes[c]`` lists (t, h, w) per clip of column c; row r gets pad[r] padding."""
    g = torch.Generator().manual_seed(seed)
    n = len(clip_shapes)
    rows = batch * n
    sample = [[torch.randn(batch, 16, *s, generator=g) for s in col] for col in clip_shapes]
    mask = torch.ones(rows, text_len, dtype=torch.int64)
    for r in range(rows):
        if pad[r % len(pad)]:
            mask[r, text_len - pad[r % len(pad)]:] = 0
    return dict(sample=sample, encoder_hidden_states=torch.randn(rows, text_len, 32, generator=g),
                encoder_attention_mask=mask, pooled_projections=torch.randn(rows, 24, generator=g),
                timestep_ratio=torch.rand(rows, generator=g) * 1000)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def outputs_and_grads(model, inputs: dict, weights: list[torch.Tensor]
                      ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs and gradients (parameters and the float inputs) of ``sum(out * w)``."""
    model.zero_grad(set_to_none=True)
    leaves = {f"sample.{c}.{k}": clip for c, col in enumerate(inputs["sample"]) for k, clip in enumerate(col)}
    leaves["encoder_hidden_states"] = inputs["encoder_hidden_states"]
    leaves["pooled_projections"] = inputs["pooled_projections"]
    for t in leaves.values():
        t.grad = None
        t.requires_grad_(True)
    outs = model(**inputs)
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    grads = {f"param.{n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"input.{n}": t.grad.detach().clone() for n, t in leaves.items()})
    return [o.detach() for o in outs], grads


AR_COLUMNS = [[(1, 4, 6)] * 3, [(1, 4, 6), (1, 8, 12), (1, 8, 12)], [(3, 4, 6), (1, 8, 12), (1, 16, 24)]]


# ------------------------------------------------------------------------------------------------------------
# Reference parity (golden vectors written by the reference implementation)
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden_model(golden_dir) -> PyramidFluxTransformer:
    return PyramidFluxTransformer.from_pretrained(golden_dir / "flux_tiny")


@pytest.mark.parametrize("case", ["case_nonar", "case_ar", "case_infer"])
def test_golden_parity(golden_dir, golden_model, case):
    spec = json.loads((golden_dir / "flux_tiny" / "cases.json").read_text())[case]
    data = {k: v.clone() for k, v in load_file(golden_dir / "flux_tiny" / spec["file"]).items()}
    n = spec["n_columns"]
    sample = [[data[f"sample.{c}.{k}"] for k in range(len(spec["clip_shapes"][c]))] for c in range(n)]
    golden_model.train(spec["mode"] == "train")
    with torch.no_grad():
        out = golden_model(sample=sample, encoder_hidden_states=data["encoder_hidden_states"],
                           encoder_attention_mask=data["encoder_attention_mask"],
                           pooled_projections=data["pooled_projections"], timestep_ratio=data["timestep_ratio"])
    assert len(out) == n
    errs = [rel_err(out[c], data[f"out.{c}"]) for c in range(n)]
    print(f"{case}: max |out - ref| / max |ref| per column = {['%.2e' % e for e in errs]}")
    for c in range(n):
        assert out[c].shape == data[f"out.{c}"].shape
    assert max(errs) <= PARITY, errs

    if "loss" in data:  # mean over rows (every column) of each row's MSE
        per_row = torch.cat([(o - data[f"target.{c}"]).pow(2).flatten(1).mean(1) for c, o in enumerate(out)])
        loss = per_row.mean()
        print(f"{case}: loss {loss.item():.9g} vs reference {data['loss'].item():.9g}")
        assert abs(loss.item() - data["loss"].item()) <= 1e-6 * data["loss"].item()


# ------------------------------------------------------------------------------------------------------------
# Checkpoint layout of the released model
# ------------------------------------------------------------------------------------------------------------

def test_state_dict_matches_released_layout(golden_dir):
    listing = json.loads((golden_dir / "keys" / "pyramid_flux_miniflux.json").read_text())
    with torch.device("meta"):
        model = PyramidFluxTransformer(**listing["model_config"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    released = set(listing["state_dict"])
    assert set(ours) == released, (f"missing {sorted(released - set(ours))[:5]}, "
                                   f"extra {sorted(set(ours) - released)[:5]}")
    assert ours == listing["state_dict"]
    assert len(ours) == listing["n_keys"] == 496
    assert sum(p.numel() for p in model.parameters()) == listing["n_params"] == 1_972_059_200


def test_config_keys_round_trip(golden_dir):
    released = json.loads((golden_dir / "flux_tiny" / "config.json").read_text())
    model = PyramidFluxTransformer.from_config(released)
    for key, value in released.items():
        if not key.startswith("_"):
            assert model.config[key] == value, key


def test_flash_attn_flag_is_accepted(model):
    """Configs written with use_flash_attn=True load; attention still applies the exact masks."""
    flagged = PyramidFluxTransformer(**{**TINY, "use_flash_attn": True})
    flagged.load_state_dict(model.state_dict())
    inputs = make_inputs(AR_COLUMNS)
    for a, b in zip(run(flagged.eval(), inputs), run(model, inputs)):
        assert torch.equal(a, b)


def test_history_positions_are_resized_onto_the_last_clip_grid():
    pos = clip_positions(frames=2, height=4, width=2, grid_height=8, grid_width=8, first_frame=5).view(2, 4, 2, 3)
    assert pos[:, 0, 0, 0].tolist() == [5.0, 6.0]  # running frame index
    assert pos[0, :, 0, 1].tolist() == [0.5, 2.5, 4.5, 6.5]  # half-pixel linear resize of 0..7
    assert pos[0, 0, :, 2].tolist() == [1.5, 5.5]


def test_rope_rotates_pairs_by_float64_angles():
    positions = torch.tensor([[0.0, 0.0, 0.0], [7.0, 300.5, 2.0]])
    cos, signed_sin = rope_tables(positions, [4, 6, 6])
    x = torch.randn(2, 16)
    y = apply_rope(x, cos, signed_sin)
    assert torch.equal(y[0], x[0])  # position 0: identity (text tokens)
    freqs = torch.cat([1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in (4, 6, 6)])
    angle = torch.tensor([7.0] * 2 + [300.5] * 3 + [2.0] * 3, dtype=torch.float64) * freqs
    c, s_ = torch.cos(angle).float(), torch.sin(angle).float()
    x0, x1 = x[1, 0::2], x[1, 1::2]
    assert torch.equal(y[1, 0::2], x0 * c - x1 * s_) and torch.equal(y[1, 1::2], x1 * c + x0 * s_)


def test_patchify_round_trip():
    x = torch.randn(2, 16, 3, 8, 12)
    tokens = patchify(x)
    assert tokens.shape == (2, 3 * 4 * 6, 64)
    # token (t=0, y=0, x=1) holds the 2x2 patch at rows 0-1, cols 2-3, channels last
    assert torch.equal(tokens[0, 1].view(2, 2, 16), x[0, :, 0, 0:2, 2:4].permute(1, 2, 0))
    assert torch.equal(unpatchify(tokens, 3, 4, 6), x)


# ------------------------------------------------------------------------------------------------------------
# Masks: what an output may and may not depend on
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model() -> PyramidFluxTransformer:
    return tiny_model().eval()


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("blocks", [{}, {"num_single_layers": 0}, {"num_layers": 0}])
def test_causal_within_last_clip(blocks):
    """Frame k of a multi-frame clip never influences outputs at frames < k; it does influence frames >= k."""
    model = tiny_model(**blocks).eval()
    inputs = make_inputs([[(1, 4, 6), (4, 8, 12)]])
    base = run(model, inputs)[0]
    for k in (1, 2, 3):
        changed = make_inputs([[(1, 4, 6), (4, 8, 12)]])
        changed["sample"][0][1][:, :, k] += torch.randn_like(changed["sample"][0][1][:, :, k])
        out = run(model, changed)[0]
        assert torch.equal(out[:, :, :k], base[:, :, :k]), f"frame {k} leaked into earlier frames"
        assert (out[:, :, k:] - base[:, :, k:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-4


def test_history_is_used_and_last_clip_sees_all_of_it(model):
    inputs = make_inputs(AR_COLUMNS)
    base = run(model, inputs)
    for k in range(len(AR_COLUMNS[2]) - 1):  # each history clip of the last column matters
        changed = make_inputs(AR_COLUMNS)
        changed["sample"][2][k] = changed["sample"][2][k] + 1.0
        out = run(model, changed)
        assert rel_err(out[2], base[2]) > 1e-3
        # ... and only for its own column: attention never crosses columns
        assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])


def test_text_padding_content_is_ignored(model):
    inputs = make_inputs(AR_COLUMNS)
    base = run(model, inputs)
    pad = inputs["encoder_attention_mask"] == 0
    assert pad.any()
    changed = dict(inputs)
    changed["encoder_hidden_states"] = inputs["encoder_hidden_states"].masked_fill(pad[..., None], 1e3)
    out = run(model, changed)
    for a, b in zip(out, base):
        assert torch.allclose(a, b, rtol=0, atol=1e-6 * b.abs().max().item())
    # whereas a valid token matters
    changed["encoder_hidden_states"] = inputs["encoder_hidden_states"].clone()
    changed["encoder_hidden_states"][0, 0] += 1.0
    assert rel_err(run(model, changed)[0], base[0]) > 1e-4


def test_attention_masks_are_compact(model):
    """Each frame's queries see the key prefix ending with their frame; the only mask is a [B, 1, 1, K] row."""
    inputs = make_inputs(AR_COLUMNS, batch=2)  # rows b*3 + c: padding (0, 5), (3, 2), (1, 0) per column
    seq = model._pack(inputs["sample"], inputs["encoder_attention_mask"])
    assert seq.text_lens == [10, 8, 10]  # text trimmed to each column's longest prompt
    for c, col in enumerate(AR_COLUMNS):
        frames = [(h // 2) * (w // 2) for t, h, w in col for _ in range(t)]
        ends = torch.tensor(frames).cumsum(0).add(seq.text_lens[c]).tolist()
        groups = seq.groups[c]
        assert [g.k_end for g in groups] == ends
        assert [g.n_queries for g in groups] == [ends[0]] + frames[1:]  # the text joins frame 0
        assert all(tuple(g.mask.shape) == (2, 1, 1, g.k_end) for g in groups)
        last = seq.last_groups[c]  # the last clip (one frame here) only
        assert len(last) == 1 and last[0].n_queries == frames[-1] and last[0].k_end == ends[-1]


def test_fully_padded_prompt(model):
    """A column whose rows are all padding has no text tokens at all; its video still gets a prediction."""
    inputs = make_inputs(AR_COLUMNS)
    inputs["encoder_attention_mask"][1] = 0
    out = run(model, inputs)
    assert model._pack(inputs["sample"], inputs["encoder_attention_mask"]).text_lens[1] == 0
    assert all(torch.isfinite(o).all() for o in out)
    inputs["encoder_hidden_states"][1] += 5.0
    assert all(torch.equal(a, b) for a, b in zip(run(model, inputs), out))


def test_non_causal_mode_lets_later_frames_in():
    model = tiny_model(use_temporal_causal=False).eval()
    inputs = make_inputs([[(3, 4, 6)]])
    base = run(model, inputs)[0]
    inputs["sample"][0][0][:, :, 2] += 1.0
    assert (run(model, inputs)[0][:, :, 0] - base[:, :, 0]).abs().max() > 1e-4


def test_batch_rows_are_independent(model):
    """A batch of 2 with different padding per row gives each row what it gets alone."""
    inputs = make_inputs(AR_COLUMNS, batch=2)
    out = run(model, inputs)
    for b in range(2):
        rows = [b * 3 + c for c in range(3)]
        single = dict(sample=[[clip[b:b + 1] for clip in col] for col in inputs["sample"]],
                      **{k: inputs[k][rows] for k in ("encoder_hidden_states", "encoder_attention_mask",
                                                      "pooled_projections", "timestep_ratio")})
        for a, s in zip(out, run(model, single)):
            assert rel_err(a[b:b + 1], s) < 1e-6


# ------------------------------------------------------------------------------------------------------------
# Loading and saving
# ------------------------------------------------------------------------------------------------------------

def test_save_load_round_trip_and_subfolder(tmp_path, model):
    inputs = make_inputs(AR_COLUMNS)
    expected = run(model, inputs)
    model.save_pretrained(tmp_path / "diffusion_transformer_384p")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    for loaded in (PyramidFluxTransformer.from_pretrained(tmp_path, subfolder="diffusion_transformer_384p"),
                   PyramidFluxTransformer.from_pretrained(tmp_path / "sharded")):
        for a, b in zip(run(loaded.eval(), inputs), expected):
            assert torch.equal(a, b)


def _copy_with_weights(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    weights = {k: v.clone() for k, v in load_file(src / "diffusion_pytorch_model.safetensors").items()}
    save_file(edit(weights), dst / "diffusion_pytorch_model.safetensors")
    return dst


def test_missing_weight_is_an_error(tmp_path, model):
    model.save_pretrained(tmp_path / "ok")
    key = "single_transformer_blocks.1.attn.norm_k.weight"
    folder = _copy_with_weights(tmp_path / "ok", tmp_path / "missing",
                                lambda w: {k: v for k, v in w.items() if k != key})
    with pytest.raises(ValueError, match="missing") as err:
        PyramidFluxTransformer.from_pretrained(folder)
    assert key in str(err.value)


def test_misnamed_weight_is_an_error(tmp_path, model):
    model.save_pretrained(tmp_path / "ok")
    key, wrong = "transformer_blocks.0.ff.net.2.weight", "transformer_blocks.0.ff.net.1.weight"
    folder = _copy_with_weights(tmp_path / "ok", tmp_path / "misnamed",
                                lambda w: {(wrong if k == key else k): v for k, v in w.items()})
    with pytest.raises(ValueError) as err:
        PyramidFluxTransformer.from_pretrained(folder)
    assert key in str(err.value) and wrong in str(err.value)


def test_bad_inputs_raise_clear_errors(model):
    inputs = make_inputs(AR_COLUMNS)
    inputs["timestep_ratio"] = inputs["timestep_ratio"][:2]
    with pytest.raises(ValueError, match="timestep_ratio"):
        run(model, inputs)
    inputs = make_inputs([[(1, 4, 6)]])
    inputs["sample"][0][0] = torch.randn(1, 16, 1, 5, 6)
    with pytest.raises(ValueError, match="even"):
        run(model, inputs)
    with pytest.raises(ValueError, match="patch_size"):
        PyramidFluxTransformer(**{**TINY, "patch_size": 2})


# ------------------------------------------------------------------------------------------------------------
# Training features
# ------------------------------------------------------------------------------------------------------------

def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    loss = torch.cat([o.pow(2).flatten(1).mean(1) for o in out]).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


# (ratio, blocks recomputed) for 2 double-stream and 4 single-stream blocks under the reference's rule: blocks with
# index <= int(n * ratio), i.e. int(n * ratio) + 1 of n (capped at n).
CHECKPOINT_CASES = [(0.0, 1, 1), (0.5, 2, 3), (0.75, 2, 4)]  # each differs from a ceil(n * ratio) rule


@pytest.mark.parametrize("ratio,double,single", CHECKPOINT_CASES)
def test_gradient_checkpointing_recomputes_the_reference_blocks(ratio, double, single):
    model = tiny_model(num_single_layers=4).train()
    inputs = make_inputs(AR_COLUMNS)
    loss, grads = _loss_and_grads(model, inputs)
    assert all(g.abs().sum() > 0 for g in grads.values())

    calls = {}
    # pre-hooks: a block runs twice (forward, then recomputed in backward) exactly when it is checkpointed
    hooks = [block.register_forward_pre_hook(lambda *_, key=(kind, i): calls.update({key: calls.get(key, 0) + 1}))
             for kind, blocks in (("double", model.transformer_blocks), ("single", model.single_transformer_blocks))
             for i, block in enumerate(blocks)]
    model.enable_gradient_checkpointing(ratio)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, inputs)
    for h in hooks:
        h.remove()
    recomputed = sorted(key for key, n in calls.items() if n == 2)
    assert recomputed == [("double", i) for i in range(double)] + [("single", i) for i in range(single)]
    assert torch.equal(loss, loss_ckpt)
    for k in grads:
        assert torch.equal(grads[k], grads_ckpt[k]), k
    model.disable_gradient_checkpointing()
    assert not model.gradient_checkpointing


def test_gradient_checkpointing_count_on_the_released_block_counts():
    """At the training default 0.75 the released 8 + 16 blocks recompute 7 + 13 blocks, as in the reference."""
    model = tiny_model()
    model.enable_gradient_checkpointing(0.75)
    assert (len(model._checkpointed_blocks(8)), len(model._checkpointed_blocks(16))) == (7, 13)


def test_config_enables_checkpointing():
    model = PyramidFluxTransformer(**{**TINY, "use_gradient_checkpointing": True, "gradient_checkpointing_ratio": 1.0})
    assert model.gradient_checkpointing and model.is_gradient_checkpointing


@pytest.mark.parametrize("mode", ["model.to(bf16)", "autocast"])
def test_bfloat16(model, mode):
    inputs = make_inputs(AR_COLUMNS)
    ref = run(model, inputs)
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(model, inputs)
    else:
        low = tiny_model().to(torch.bfloat16).eval()
        cast = {k: inputs[k].to(torch.bfloat16) for k in ("encoder_hidden_states", "pooled_projections")}
        cast["sample"] = [[c.to(torch.bfloat16) for c in col] for col in inputs["sample"]]
        cast.update({k: inputs[k] for k in ("encoder_attention_mask", "timestep_ratio")})
        out = run(low, cast)
        assert all(o.dtype == torch.bfloat16 for o in out)
    for a, b in zip(out, ref):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 5e-2


# ------------------------------------------------------------------------------------------------------------
# Shape-only tracing (meta / fake tensors): what the planner counts FLOPs and memory with
# ------------------------------------------------------------------------------------------------------------

def _train_step_flops(model: PyramidFluxTransformer, inputs: dict) -> dict[str, int]:
    from trainer_misc.planning.tracing import flop_counter_mode
    with flop_counter_mode() as counter:
        outputs = model(**inputs)
        torch.stack([o.float().pow(2).mean() for o in outputs]).sum().backward()
    return {str(op).split(".")[1]: n for op, n in counter.get_flop_counts()["Global"].items()}


TRACE_COLUMNS = [[(2, 2, 4), (1, 4, 6)], [(1, 2, 4), (1, 4, 6)]]


def test_forward_and_backward_trace_on_meta_and_fake_tensors_with_the_real_flop_count():
    from torch._subclasses.fake_tensor import FakeTensorMode

    unpadded = make_inputs(TRACE_COLUMNS, pad=(0,))
    real = _train_step_flops(tiny_model(), unpadded)
    assert set(real) == {"mm", "addmm", "_scaled_dot_product_flash_attention_for_cpu",
                         "_scaled_dot_product_flash_attention_for_cpu_backward"}

    # Fake CPU tensors take the same kernels as real ones: the same count, op by op.
    with FakeTensorMode() as mode:
        fake = {k: ([[mode.from_tensor(c) for c in col] for col in v] if k == "sample" else mode.from_tensor(v))
                for k, v in unpadded.items()}
        fake_model = PyramidFluxTransformer(**TINY)
        assert _train_step_flops(fake_model, fake) == real
        assert all(p.grad is not None for p in fake_model.parameters())

    # Meta tensors with attention per frame run it as plain matmuls (bmm); every linear layer is counted the same.
    on_meta = {k: ([[c.to("meta") for c in col] for col in v] if k == "sample" else v.to("meta"))
               for k, v in unpadded.items()}
    with torch.device("meta"):
        meta_model = PyramidFluxTransformer(**TINY)
    meta_model.attention_split = "frame"
    meta = _train_step_flops(meta_model, on_meta)
    assert (meta["mm"], meta["addmm"]) == (real["mm"], real["addmm"]) and meta["bmm"] > 0

    # By default meta tensors trace what CUDA runs: FlexAttention, one shape-only op each way, counting the FLOPs of
    # the same (query, key) pairs as the per-frame calls; the linear layers also see the single-stream sequence's
    # tile padding (computed on the GPU too), so they count more.
    meta_model.attention_split = "auto"
    flex = _train_step_flops(meta_model, on_meta)
    assert flex["flex_attention_shape"] == real["_scaled_dot_product_flash_attention_for_cpu"]
    assert flex["flex_attention_shape_backward"] == real["_scaled_dot_product_flash_attention_for_cpu_backward"]
    assert flex["mm"] > real["mm"] and "bmm" not in flex

    # Real tensors still trim text padding: a padded batch costs less than the untrimmed (traced) count.
    padded = _train_step_flops(tiny_model(), make_inputs(TRACE_COLUMNS, pad=(4,)))
    assert sum(padded.values()) < sum(real.values())
