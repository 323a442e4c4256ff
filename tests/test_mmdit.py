"""PyramidDiffusionMMDiT (SD3 kind): reference parity, released layout, generation replay, masks, checkpointing,
shape-only tracing. Inputs and helpers are those of the miniFLUX tests (same call signature)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_dit import AR_COLUMNS, make_inputs, rel_err, run

from pyramid_dit.embeddings import sincos_table_2d
from pyramid_dit.modeling_pyramid_mmdit import PyramidDiffusionMMDiT
from pyramid_dit.noise import ReplayNoise
from pyramid_dit.pipeline import PyramidFlowPipeline
from pyramid_dit.text_features import TextFeatures

PARITY = 1e-5  # relative to max |reference|, float32
TINY = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=2,
            caption_projection_dim=32, pooled_projection_dim=24, pos_embed_max_size=16, joint_attention_dim=32,
            pos_embed_type="sincos", temp_pos_embed_type="rope", add_temp_pos_embed=True, use_t5_mask=True,
            use_temporal_causal=True, interp_condition_pos=True, use_flash_attn=False)


def tiny_model(seed: int = 0, **overrides) -> PyramidDiffusionMMDiT:
    """Tiny model with every weight random (the default init zeroes adaLN and the output: outputs would be 0)."""
    model = PyramidDiffusionMMDiT(**{**TINY, **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.split(".")[-2].startswith("norm_") else 0.1 * noise)
    return model


@pytest.fixture(scope="module")
def model() -> PyramidDiffusionMMDiT:
    return tiny_model().eval()


# ------------------------------------------------------------------------------------------------------------
# Reference parity and the released layout
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden_model(golden_dir) -> PyramidDiffusionMMDiT:
    return PyramidDiffusionMMDiT.from_pretrained(golden_dir / "mmdit_tiny")


@pytest.mark.parametrize("case", ["case_nonar", "case_ar", "case_infer"])
def test_golden_parity(golden_dir, golden_model, case):
    spec = json.loads((golden_dir / "mmdit_tiny" / "cases.json").read_text())[case]
    data = {k: v.clone() for k, v in load_file(golden_dir / "mmdit_tiny" / spec["file"]).items()}
    n = spec["n_columns"]
    sample = [[data[f"sample.{c}.{k}"] for k in range(len(spec["clip_shapes"][c]))] for c in range(n)]
    golden_model.train(spec["mode"] == "train")
    with torch.no_grad():
        out = golden_model(sample=sample, encoder_hidden_states=data["encoder_hidden_states"],
                           encoder_attention_mask=data["encoder_attention_mask"],
                           pooled_projections=data["pooled_projections"], timestep_ratio=data["timestep_ratio"])
    assert len(out) == n and all(out[c].shape == data[f"out.{c}"].shape for c in range(n))
    errs = [rel_err(out[c], data[f"out.{c}"]) for c in range(n)]
    print(f"{case}: max |out - ref| / max |ref| per column = {['%.2e' % e for e in errs]}")
    assert max(errs) <= PARITY, errs
    if "loss" in data:  # mean over rows (every column) of each row's MSE
        loss = torch.cat([(o - data[f"target.{c}"]).pow(2).flatten(1).mean(1) for c, o in enumerate(out)]).mean()
        print(f"{case}: loss {loss.item():.9g} vs reference {data['loss'].item():.9g}")
        assert abs(loss.item() - data["loss"].item()) <= PARITY * data["loss"].item()


def test_golden_generate_replay(golden_dir):
    """A whole reference generate() run on the SD3 kind, replayed through our pipeline with its recorded noise."""
    case = {k: v.clone() for k, v in load_file(golden_dir / "mmdit_tiny" / "generate.safetensors").items()}
    dit = PyramidDiffusionMMDiT.from_pretrained(golden_dir / "mmdit_tiny")
    pipe = PyramidFlowPipeline(dit, model_name="pyramid_mmdit")
    noise = ReplayNoise(case["initial_noise"], [case[f"block_noise.{i}"] for i in range(8)])
    features = {
        side: TextFeatures(case[f"{side}prompt_embeds"], case[f"{side}prompt_attention_mask"],
                           case[f"{side}pooled_prompt_embeds"]) for side in ("", "negative_")}
    out = pipe.generate(prompt_features=features[""], negative_features=features["negative_"], height=128,
                        width=192, temp=4, num_inference_steps=[3, 3, 3], video_num_inference_steps=[2, 2, 2],
                        guidance_scale=7.0, video_guidance_scale=5.0, noise=noise, output_type="latent",
                        progress=False)
    ref = case["video_latent"]
    assert out.shape == ref.shape == (1, 16, 4, 16, 24) and noise.blocks_used == 8
    err = rel_err(out, ref)
    print(f"generate: max |out - ref| / max |ref| = {err:.2e}")
    assert err < PARITY


def test_state_dict_matches_released_layout(golden_dir):
    listing = json.loads((golden_dir / "keys" / "pyramid_mmdit_sd3.json").read_text())
    with torch.device("meta"):
        model = PyramidDiffusionMMDiT(**{**listing["config_json"], **listing["pipeline_overrides"]})
    assert all(model.config[k] == v for k, v in listing["model_config"].items())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    released = set(listing["state_dict"])
    assert set(ours) == released, (f"missing {sorted(released - set(ours))[:5]}, "
                                   f"extra {sorted(set(ours) - released)[:5]}")
    assert ours == listing["state_dict"] and len(ours) == listing["n_keys"] == 779
    assert sum(p.numel() for p in model.parameters()) == listing["n_params"] == 2_028_334_144
    assert list(model.state_dict()["pos_embed.pos_embed"].shape) == [1, 36864, 1536]


def test_config_keys_round_trip_and_position_table(golden_dir):
    released = json.loads((golden_dir / "mmdit_tiny" / "config.json").read_text())
    model = PyramidDiffusionMMDiT.from_config(released)
    for key, value in released.items():
        if not key.startswith("_"):
            assert model.config[key] == value, key
    # the persistent table we build equals the one the reference saved
    stored = load_file(golden_dir / "mmdit_tiny" / "diffusion_pytorch_model.safetensors")["pos_embed.pos_embed"]
    assert torch.equal(model.pos_embed.pos_embed, stored)
    # released geometry: coordinates i / 3 (192-entry table for a 64-patch base); column first, then row
    table = sincos_table_2d(8, 192, 64)
    third = torch.tensor(1 / 3).sin().item()
    assert abs(table[1, 0].item() - third) < 1e-7 and table[1, 4].item() == 0.0  # (row 0, col 1)
    assert abs(table[192, 4].item() - third) < 1e-7 and table[192, 0].item() == 0.0  # (row 1, col 0)


def test_unsupported_options_raise():
    with pytest.raises(NotImplementedError, match="pos_embed_type"):
        PyramidDiffusionMMDiT(**{**TINY, "pos_embed_type": "rope"})
    with pytest.raises(ValueError, match="caption_projection_dim"):
        PyramidDiffusionMMDiT(**{**TINY, "caption_projection_dim": 48})
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        run(tiny_model().eval(), make_inputs([[(1, 36, 6)]]))


# ------------------------------------------------------------------------------------------------------------
# What an output may and may not depend on
# ------------------------------------------------------------------------------------------------------------

def test_causal_within_last_clip(model):
    """Frame k of a multi-frame clip never influences outputs at frames < k; it does influence frames >= k."""
    inputs = make_inputs([[(1, 4, 6), (4, 8, 12)]])
    base = run(model, inputs)[0]
    for k in (1, 3):
        changed = make_inputs([[(1, 4, 6), (4, 8, 12)]])
        changed["sample"][0][1][:, :, k] += torch.randn_like(changed["sample"][0][1][:, :, k])
        out = run(model, changed)[0]
        assert torch.equal(out[:, :, :k], base[:, :, :k]), f"frame {k} leaked into earlier frames"
        assert (out[:, :, k:] - base[:, :, k:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-4


def test_history_matters_only_in_its_own_column(model):
    inputs = make_inputs(AR_COLUMNS)
    base = run(model, inputs)
    for k in range(len(AR_COLUMNS[2]) - 1):
        changed = make_inputs(AR_COLUMNS)
        changed["sample"][2][k] = changed["sample"][2][k] + 1.0
        out = run(model, changed)
        assert rel_err(out[2], base[2]) > 1e-3
        assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])


def test_text_padding_content_is_ignored(model):
    inputs = make_inputs(AR_COLUMNS, batch=2)
    base = run(model, inputs)
    pad = inputs["encoder_attention_mask"] == 0
    assert pad.any()
    changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].masked_fill(pad[..., None], 1e3))
    for a, b in zip(run(model, changed), base):
        assert torch.allclose(a, b, rtol=0, atol=1e-6 * b.abs().max().item())
    changed["encoder_hidden_states"] = inputs["encoder_hidden_states"].clone()
    changed["encoder_hidden_states"][0, 0] += 1.0  # a valid token does matter
    assert rel_err(run(model, changed)[0], base[0]) > 1e-4


# ------------------------------------------------------------------------------------------------------------
# Training features and shape-only tracing
# ------------------------------------------------------------------------------------------------------------

def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = torch.cat([o.pow(2).flatten(1).mean(1) for o in model(**inputs)]).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_same_loss_and_grads():
    model = tiny_model().train()
    inputs = make_inputs(AR_COLUMNS)
    loss, grads = _loss_and_grads(model, inputs)
    assert all(g.abs().sum() > 0 for g in grads.values())  # every trainable parameter gets a gradient
    # ... and the only frozen ones are the text-query side of the last block, whose results nobody reads
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"transformer_blocks.2.attn.{n}" for n in ("add_q_proj.weight", "add_q_proj.bias",
                                                                 "norm_add_q.weight")}
    calls = []
    hooks = [b.register_forward_pre_hook(lambda *_, i=i: calls.append(i)) for i, b in enumerate(model.transformer_blocks)]
    model.enable_gradient_checkpointing(0.5)  # reference rule: blocks int(0.5 * 3) = 1 .. 2 recomputed
    loss_ckpt, grads_ckpt = _loss_and_grads(model, inputs)
    for h in hooks:
        h.remove()
    assert sorted(calls) == [0, 1, 1, 2, 2]
    assert torch.equal(loss, loss_ckpt) and all(torch.equal(grads[k], grads_ckpt[k]) for k in grads)


def test_traces_on_meta_and_fake_tensors(golden_dir):
    """The memory planner runs the released-size model on shape-only tensors (no host copy of the mask)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    listing = json.loads((golden_dir / "keys" / "pyramid_mmdit_sd3.json").read_text())
    with torch.device("meta"):
        big = PyramidDiffusionMMDiT(**listing["model_config"])
        inputs = make_inputs([[(1, 48, 80)], [(2, 24, 40), (1, 48, 80)]], text_len=128)
        inputs = {k: ([[c.to("meta") for c in col] for col in v] if k == "sample" else v.to("meta"))
                  for k, v in inputs.items()}
        inputs["encoder_hidden_states"] = torch.empty(2, 128, 4096)
        inputs["pooled_projections"] = torch.empty(2, 2048)
        out = big(**inputs)
    assert [tuple(o.shape) for o in out] == [(1, 16, 1, 48, 80), (1, 16, 1, 48, 80)]
    small = tiny_model().eval()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = make_inputs(AR_COLUMNS)
        fake = {k: ([[mode.from_tensor(c) for c in col] for col in v] if k == "sample" else mode.from_tensor(v))
                for k, v in fake.items()}
        out = small(**fake)
    assert [tuple(o.shape) for o in out] == [(1, 16, 1, 4, 6), (1, 16, 1, 8, 12), (1, 16, 1, 16, 24)]
