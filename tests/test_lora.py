"""LoRA (pyramid_dit.lora): only adapters train, the merge is exact, the peft-format adapter round-trips.

In-process on the tiny flux DiT with random weights (the default init zeroes outputs); a few seconds.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_dit import TINY, make_inputs, tiny_model

from pyramid_dit.kinds import KINDS, get_kind
from pyramid_dit.lora import LoraSettings, add_lora, load_adapter, merged_state_dict
from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
from trainer_misc.optim.adamw import build_adamw
from trainer_misc.state.export import export_pretrained, save_adapter

SHAPES = [[(1, 2, 2)], [(1, 2, 2), (1, 4, 4)]]


def _adapted(seed: int = 0) -> tuple[PyramidFluxTransformer, dict[str, torch.Tensor], LoraSettings]:
    model = tiny_model(seed).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    settings = LoraSettings(rank=4, alpha=8.0, targets=get_kind("pyramid_flux").lora_targets)
    add_lora(model, settings)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B starts at zero (the adapter is a no-op then): give it values to test the merge
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model, base, settings


def test_default_targets_cover_every_block_and_only_adapters_train():
    for kind in KINDS.values():
        assert kind.lora_targets, f"{kind.name} has no documented LoRA targets"
    model = tiny_model().eval()
    counts = add_lora(model, LoraSettings(rank=4, alpha=4.0, targets=get_kind("pyramid_flux").lora_targets))
    layers = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    joint = TINY["num_layers"] * 12  # 8 attention projections + 4 MLP linears per joint block
    single = TINY["num_single_layers"] * 5  # q/k/v + proj_mlp + proj_out per single block
    assert counts["adapted_layers"] == len(layers) == joint + single
    assert "proj_out" not in layers, "the model's final projection is not a block layer"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    optimizer = build_adamw(model, 1e-3)
    in_optimizer = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert in_optimizer == counts["trainable"] < counts["frozen"]


def test_merged_weights_equal_base_plus_scaled_product_and_give_the_same_outputs():
    model, base, settings = _adapted()
    merged = merged_state_dict(model.state_dict(), model)
    assert set(merged) == set(base)
    scale = settings.alpha / settings.rank
    a = model.transformer_blocks[0].attn.to_q.lora_A["default"].weight
    b = model.transformer_blocks[0].attn.to_q.lora_B["default"].weight
    key = "transformer_blocks.0.attn.to_q.weight"
    assert torch.allclose(merged[key], base[key] + scale * b @ a, rtol=0, atol=1e-7)
    unadapted = "transformer_blocks.0.norm1.linear.weight"
    assert torch.equal(merged[unadapted], base[unadapted])

    plain = PyramidFluxTransformer(**TINY).eval()
    plain.load_state_dict(merged, strict=True)
    inputs = make_inputs(SHAPES, batch=2)
    with torch.no_grad():
        want, got, ref = model(**inputs), plain(**inputs), tiny_model().eval()(**inputs)
    worst = max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want))
    assert worst <= 1e-5
    assert any(not torch.allclose(r, w, atol=1e-4) for r, w in zip(ref, want)), "the adapter changed nothing"


def test_adapter_folder_is_peft_format_and_applies_without_merging(tmp_path):
    model, _, settings = _adapted()
    out = save_adapter(model.state_dict(), model, tmp_path / "lora")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    keys = list(load_file(str(out / "adapter_model.safetensors")))
    assert keys and all(k.startswith("base_model.model.") and (".lora_A.weight" in k or ".lora_B.weight" in k)
                        for k in keys)
    inputs = make_inputs(SHAPES, batch=2)
    with torch.no_grad():
        want = model(**inputs)
        fresh = tiny_model().eval()
        load_adapter(fresh, out, scale=1.0)
        got = fresh(**inputs)
        off = tiny_model().eval()
        load_adapter(off, out, scale=0.0)
        base_out, off_out = tiny_model().eval()(**inputs), off(**inputs)
    assert all(torch.allclose(g, w, rtol=0, atol=1e-6) for g, w in zip(got, want))
    assert all(torch.equal(o, b) for o, b in zip(off_out, base_out))


GOLDEN = {"pyramid_flux": ("flux_tiny", "pyramid_flux_miniflux.json"),
          "pyramid_mmdit": ("mmdit_tiny", "pyramid_mmdit_sd3.json")}


@pytest.mark.parametrize("kind", sorted(GOLDEN))
def test_merged_export_has_the_reference_state_dict_layout(kind, golden_dir, tmp_path):
    """The reference class loads export/transformer: its keys and shapes are the ones the reference class wrote for
    the tiny config (tests/golden/<kind>_tiny, written by the reference) and listed at released size
    (tests/golden/keys, meta device), adapters or not, and its config.json carries the reference's values."""
    tiny_dir, listing_file = GOLDEN[kind]
    golden = golden_dir / tiny_dir
    cls, targets = get_kind(kind).dit(), get_kind(kind).lora_targets
    model = cls.from_pretrained(golden).eval()
    add_lora(model, LoraSettings(rank=4, alpha=4.0, targets=targets))
    out = export_pretrained(model, merged_state_dict(model.state_dict(), model), tmp_path / "transformer")
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as ours, \
            safe_open(str(golden / "diffusion_pytorch_model.safetensors"), "pt") as ref:
        ours_shapes = {k: ours.get_slice(k).get_shape() for k in ours.keys()}
        ref_shapes = {k: ref.get_slice(k).get_shape() for k in ref.keys()}
    assert ours_shapes == ref_shapes, (f"missing {sorted(set(ref_shapes) - set(ours_shapes))[:5]}, "
                                       f"extra {sorted(set(ours_shapes) - set(ref_shapes))[:5]}")
    config, ref_config = (json.loads((d / "config.json").read_text()) for d in (out, golden))
    assert config["_class_name"] == ref_config["_class_name"]
    assert {k: config.get(k) for k in ref_config if not k.startswith("_")} == \
        {k: v for k, v in ref_config.items() if not k.startswith("_")}

    listing = json.loads((golden_dir / "keys" / listing_file).read_text())
    with torch.device("meta"):
        released = cls(**listing["model_config"])
    add_lora(released, LoraSettings(rank=16, alpha=16.0, targets=targets))
    merged = merged_state_dict(released.state_dict(), released)
    assert {k: list(v.shape) for k, v in merged.items()} == listing["state_dict"]


_OLDEST_PEFT_SCRIPT = """
import sys, torch, peft
from safetensors.torch import save_file
from peft import PeftModel
from test_dit import make_inputs, tiny_model
from test_lora import SHAPES
model = PeftModel.from_pretrained(tiny_model().eval(), sys.argv[1])  # peft's own loader, no code of ours
with torch.no_grad():
    outs = model(**make_inputs(SHAPES, batch=2))
save_file({f"out{i}": o.contiguous() for i, o in enumerate(outs)}, sys.argv[2], metadata={"version": peft.__version__})
"""


def test_the_exported_adapter_loads_with_the_oldest_peft_allowed(tmp_path):
    """export/lora must be usable by anyone's peft, not only by the version we train with: its adapter_config.json
    carries only fields every release since requirements.txt's lower bound knows (newer ones reject nothing, older
    ones fail on unknown keys). .ci/run installs that release (.ci/oldest.txt) beside the pinned one; peft's own
    PeftModel.from_pretrained must give the outputs of the adapted model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    oldest = os.environ.get("PYRAMID_OLDEST_PEFT")
    if not oldest:
        pytest.skip("PYRAMID_OLDEST_PEFT is not set (.ci/run installs peft 0.13.0 there)")
    model, _, _ = _adapted()
    out = save_adapter(model.state_dict(), model, tmp_path / "lora")
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([oldest, str(here.parent), str(here)])}
    result = subprocess.run([sys.executable, "-c", _OLDEST_PEFT_SCRIPT, str(out), str(tmp_path / "outs.safetensors")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with safe_open(str(tmp_path / "outs.safetensors"), "pt") as f:
        assert f.metadata()["version"] == "0.13.0"
        got = [f.get_tensor(f"out{i}") for i in range(len(f.keys()))]
    with torch.no_grad():
        want = model(**make_inputs(SHAPES, batch=2))
    assert len(got) == len(want) and all(torch.allclose(g, w, rtol=0, atol=1e-6) for g, w in zip(got, want))
