"""CausalVideoVAE: checkpoint layout, parity with the reference's golden vectors, causality, chunking, loading."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from video_vae.modeling_causal_vae import CausalVideoVAE

PARITY_BOUND = 1e-5  # max |ours - reference| / max |reference|, float32

# Same layout as golden/vae_tiny (released structure, small widths) so tests that need no golden files run anywhere.
TINY_CONFIG = dict(
    encoder_out_channels=16,
    decoder_in_channels=16,
    encoder_block_out_channels=(8, 16, 16, 16),
    decoder_block_out_channels=(8, 16, 16, 16),
    encoder_layers_per_block=(1, 1, 1, 1),
    decoder_layers_per_block=(2, 2, 2, 2),
    encoder_norm_num_groups=4,
    decoder_norm_num_groups=4,
    scaling_factor=0.13025,
)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def tiny_vae() -> CausalVideoVAE:
    """Random tiny VAE with weights large enough that every frame's influence is visible (N(0, 0.05))."""
    gen = torch.Generator().manual_seed(0)
    vae = CausalVideoVAE(**TINY_CONFIG)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_scale = p.ndim == 1 and ("norm" in name) and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_norm_scale else 0.05 * noise)
    return vae.eval()


def _video(frames: int, h: int = 16, w: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, frames, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- checkpoint layout


def test_state_dict_matches_released_checkpoint(golden_dir: Path) -> None:
    listing = json.loads((golden_dir / "keys" / "causal_video_vae.json").read_text())
    with torch.device("meta"):
        vae = CausalVideoVAE(**listing["model_config"])
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    expected = listing["state_dict"]
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}
    assert len(ours) == listing["n_keys"] == 260
    assert sum(p.numel() for p in vae.parameters()) == listing["n_params"] == 335_402_067
    assert dict(vae.config) | listing["model_config"] == dict(vae.config)  # every released config key is accepted


# ---------------------------------------------------------------- golden parity


@pytest.fixture(scope="module")
def golden_vae(golden_dir: Path) -> CausalVideoVAE:
    vae = CausalVideoVAE.from_pretrained(golden_dir / "vae_tiny", interpolate=False)
    assert not vae.training  # from_pretrained returns an eval-mode model, which chunking needs
    return vae


@pytest.fixture(scope="module")
def golden_cases(golden_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(golden_dir / "vae_tiny" / "cases.safetensors").items()}


# case name -> (reference outputs to compare with, tiling on?, call)
GOLDEN_CALLS: dict[str, tuple[str, bool, Callable]] = {
    "encode": ("encode", False, lambda vae, d: vae.encode(d["input.video17"], temporal_chunk=False)),
    "encode_chunk16": ("encode_chunk16", False, lambda vae, d: vae.encode(
        d["input.video17"], temporal_chunk=True, window_size=16, tile_sample_min_size=256)),
    "encode_chunk8": ("encode_chunk8", False, lambda vae, d: vae.encode(
        d["input.video17"], temporal_chunk=True, window_size=8)),
    "encode33": ("encode33", False, lambda vae, d: vae.encode(d["input.video33"], temporal_chunk=False)),
    "encode33_chunk16": ("encode33_chunk16", False, lambda vae, d: vae.encode(
        d["input.video33"], temporal_chunk=True, window_size=16)),
    "encode_image": ("encode_image", False, lambda vae, d: vae.encode(d["input.image"])),
    "encode_tiled": ("encode_tiled", True, lambda vae, d: vae.encode(
        d["input.video17"], temporal_chunk=True, window_size=8, tile_sample_min_size=32)),
    "decode": ("decode", False, lambda vae, d: vae.decode(d["input.latent"], temporal_chunk=False)),
    "decode_chunk1": ("decode_chunk1", False, lambda vae, d: vae.decode(
        d["input.latent"], temporal_chunk=True, window_size=1)),
    # One chunk of all 3 latent frames: the reference gives exactly `decode` (not stored separately).
    "decode_chunk2": ("decode", False, lambda vae, d: vae.decode(
        d["input.latent"], temporal_chunk=True, window_size=2)),
    "decode_tiled": ("decode_tiled", True, lambda vae, d: vae.decode(
        d["input.latent"], temporal_chunk=True, window_size=1, tile_sample_min_size=32)),
}


@pytest.mark.parametrize("case", list(GOLDEN_CALLS))
def test_golden_parity(case: str, golden_vae: CausalVideoVAE, golden_cases: dict[str, torch.Tensor]) -> None:
    ref_name, tiled, call = GOLDEN_CALLS[case]
    golden_vae.enable_tiling(tiled)
    try:
        with torch.no_grad():
            out = call(golden_vae, golden_cases)
    finally:
        golden_vae.disable_tiling()
    if case.startswith("encode"):
        dist = out.latent_dist
        ours = {
            "mean": dist.mean,
            "std": dist.std,
            "sample_seed5": dist.sample(generator=torch.Generator().manual_seed(5)),
        }
        assert torch.equal(dist.mode(), dist.mean)
    else:
        ours = {"sample": out.sample}
    for key, value in ours.items():
        ref = golden_cases[f"{ref_name}.{key}"]
        assert value.shape == ref.shape, f"{case}.{key}"
        assert value.dtype == torch.float32
        assert _rel_err(value, ref) < PARITY_BOUND, f"{case}.{key}: rel err {_rel_err(value, ref):.3g}"


def test_golden_case_list_is_covered(golden_dir: Path) -> None:
    cases = json.loads((golden_dir / "vae_tiny" / "cases.json").read_text())["cases"]
    assert set(cases) <= set(GOLDEN_CALLS)


# ---------------------------------------------------------------- causality and chunking


@pytest.mark.parametrize("chunk", [False, True], ids=["whole", "chunked"])
def test_encode_is_causal(tiny_vae: CausalVideoVAE, chunk: bool) -> None:
    kwargs = dict(temporal_chunk=chunk, window_size=8)
    video = _video(17)
    with torch.no_grad():
        full = tiny_vae.encode(video, **kwargs).latent_dist.mean
        prefix = tiny_vae.encode(video[:, :, :9], **kwargs).latent_dist.mean
        changed_future = video.clone()
        changed_future[:, :, 9:] = _video(8, seed=2)
        other = tiny_vae.encode(changed_future, **kwargs).latent_dist.mean
    assert full.shape == (1, 16, 3, 2, 3) and prefix.shape == (1, 16, 2, 2, 3)
    assert _rel_err(prefix, full[:, :, :2]) < 1e-6  # frames 0..8 -> latent frames 0, 1, whatever follows
    assert _rel_err(other[:, :, :2], full[:, :, :2]) < 1e-6
    assert _rel_err(other[:, :, 2], full[:, :, 2]) > 1e-2  # ... while the later latent frame does see them


def test_decode_is_causal(tiny_vae: CausalVideoVAE) -> None:
    z = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(3))
    z_changed = z.clone()
    z_changed[:, :, 2] = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = tiny_vae.decode(z).sample
        prefix = tiny_vae.decode(z[:, :, :2]).sample
        other = tiny_vae.decode(z_changed).sample
    assert full.shape == (1, 3, 17, 16, 24) and prefix.shape == (1, 3, 9, 16, 24)
    assert _rel_err(prefix, full[:, :, :9]) < 1e-6
    assert _rel_err(other[:, :, :9], full[:, :, :9]) < 1e-6
    assert _rel_err(other[:, :, 9:], full[:, :, 9:]) > 1e-3


def test_chunked_matches_whole_and_keeps_no_state(tiny_vae: CausalVideoVAE) -> None:
    first, second = _video(25, seed=5), _video(25, seed=6)
    with torch.no_grad():
        whole = tiny_vae.encode(second).latent_dist.mean
        tiny_vae.encode(first, temporal_chunk=True, window_size=8)  # must leave nothing behind
        after_other = tiny_vae.encode(second, temporal_chunk=True, window_size=8).latent_dist.mean
        alone = CausalVideoVAE(**TINY_CONFIG).eval()
        alone.load_state_dict(tiny_vae.state_dict())
        fresh = alone.encode(second, temporal_chunk=True, window_size=8).latent_dist.mean
        z = whole[:, :, :3]
        dec_whole = tiny_vae.decode(z).sample
        tiny_vae.decode(torch.randn_like(z), temporal_chunk=True, window_size=1)
        dec_chunked = tiny_vae.decode(z, temporal_chunk=True, window_size=1).sample
        # A continuation (first latent frame not an image) decodes to 8 frames per latent frame, chunked or not.
        cont_whole = tiny_vae.decode(z, is_init_image=False).sample
        cont_chunked = tiny_vae.decode(z, is_init_image=False, temporal_chunk=True, window_size=1).sample
    assert torch.equal(after_other, fresh)
    assert _rel_err(after_other, whole) < 1e-6
    assert _rel_err(dec_chunked, dec_whole) < 1e-5
    assert cont_whole.shape[2] == 24 and _rel_err(cont_chunked, cont_whole) < 1e-5
    assert not any(isinstance(v, torch.Tensor) for m in tiny_vae.modules() for v in vars(m).values())


def test_chunked_encode_rejects_bad_lengths_and_training_mode(tiny_vae: CausalVideoVAE) -> None:
    with pytest.raises(ValueError, match=r"1 \+ 8k frames"):
        tiny_vae.encode(_video(16), temporal_chunk=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny_vae.encode(_video(17), temporal_chunk=True, window_size=4)
    with pytest.raises(ValueError, match="unsqueeze"):
        tiny_vae.encode(_video(1)[:, :, 0])
    tiny_vae.train()
    try:
        with pytest.raises(RuntimeError, match="eval"):
            tiny_vae.encode(_video(9), temporal_chunk=True)
        with pytest.raises(RuntimeError, match="eval"):
            tiny_vae.decode(torch.zeros(1, 16, 2, 2, 3), temporal_chunk=True)
    finally:
        tiny_vae.eval()


def test_bfloat16_runs_and_stays_close(tiny_vae: CausalVideoVAE) -> None:
    video = _video(9)
    bf16 = CausalVideoVAE(**TINY_CONFIG).eval()
    bf16.load_state_dict(tiny_vae.state_dict())
    bf16.to(torch.bfloat16)
    with torch.no_grad():
        ref = tiny_vae.encode(video).latent_dist.mean
        low = bf16.encode(video.bfloat16(), temporal_chunk=True, window_size=8).latent_dist
        dec = bf16.decode(low.mode(), temporal_chunk=True, window_size=1).sample
    assert low.mean.dtype == low.std.dtype == dec.dtype == torch.bfloat16
    assert low.sample(generator=torch.Generator().manual_seed(0)).dtype == torch.bfloat16
    assert dec.shape == (1, 3, 9, 16, 24)
    assert _rel_err(low.mean, ref) < 0.05


# ---------------------------------------------------------------- saving and loading


def test_save_and_load_round_trip(tiny_vae: CausalVideoVAE, tmp_path: Path) -> None:
    tiny_vae.save_pretrained(tmp_path)
    loaded = CausalVideoVAE.from_pretrained(tmp_path)
    def plain(config) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}

    assert plain(loaded.config) == plain(tiny_vae.config)
    ours, theirs = tiny_vae.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    video = _video(9)
    with torch.no_grad():
        assert torch.equal(loaded.encode(video).latent_dist.mean, tiny_vae.encode(video).latent_dist.mean)


def test_missing_weight_is_an_error(tiny_vae: CausalVideoVAE, tmp_path: Path) -> None:
    tiny_vae.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = {k: v.clone() for k, v in load_file(weights).items()}
    del state["decoder.mid_block.attentions.0.to_q.weight"], state["quant_conv.conv.bias"]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"decoder\.mid_block\.attentions\.0\.to_q\.weight") as err:
        CausalVideoVAE.from_pretrained(tmp_path)
    assert "quant_conv.conv.bias" in str(err.value)


def test_loads_checkpoints_with_legacy_attention_names(tiny_vae: CausalVideoVAE, tmp_path: Path) -> None:
    # The reference's diffusers Attention renamed query/key/value/proj_attn on load; so do we.
    tiny_vae.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in load_file(weights).items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        state[key] = value.clone()
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in state
    save_file(state, weights)
    loaded = CausalVideoVAE.from_pretrained(tmp_path)
    assert all(torch.equal(v, tiny_vae.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_unsupported_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="interpolate"):
        CausalVideoVAE(**TINY_CONFIG, interpolate=True)
    with pytest.raises(ValueError, match="decoder_in_channels"):
        CausalVideoVAE(**{**TINY_CONFIG, "decoder_in_channels": 4})


# ---------------------------------------------------------------- fast paths


def _zero_padded_conv(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The causal conv by its definition: ``time_pad`` zero frames in front, then an ordinary convolution."""
    padded = torch.cat([x.new_zeros(*x.shape[:2], conv.time_pad, *x.shape[3:]), x], dim=2)
    c = conv.conv
    return torch.nn.functional.conv3d(padded, c.weight, c.bias, c.stride, c.padding)


# The VAE's causal convs: 3x3x3, its temporal and spatial down-samplers, 1x1x1, and a 2-tap conv.
CONV_SHAPES = [dict(kernel_size=3), dict(kernel_size=3, stride=(2, 1, 1)), dict(kernel_size=3, stride=(1, 2, 2)),
               dict(kernel_size=1), dict(kernel_size=(2, 3, 3))]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda d: "-".join(map(str, d.values())))
def test_causal_conv_equals_zero_padded_convolution(shape: dict) -> None:
    """At a clip start the causal conv skips the zero frames instead of convolving them (fewer FLOPs): every
    output, for every clip length, still equals the zero-padded convolution (float64 through torch's kernel,
    float32 through the inference route: oneDNN, channels-last), and so does a clip streamed in chunks."""
    from torch.utils.flop_counter import FlopCounterMode

    from video_vae.causal_conv import CausalConv3d

    gen = torch.Generator().manual_seed(3)
    conv = CausalConv3d(6, 8, **shape)
    with torch.no_grad():
        conv.conv.weight.normal_(generator=gen)
    stride = conv.time_stride
    for frames in (1, 2, 3, 5, 9):
        if stride > 1 and (frames - 1) % stride:
            continue  # not a length this conv is given (clips are 1 + 8k frames)
        x = torch.randn(1, 6, frames, 5, 7, generator=gen, dtype=torch.float64)
        conv64 = conv.double()
        assert torch.allclose(conv64(x), _zero_padded_conv(conv64, x), rtol=1e-12, atol=1e-12), frames
        conv.float()
        with torch.no_grad():
            fast = conv(x.float())
        assert fast.is_contiguous(memory_format=torch.channels_last_3d)
        assert _rel_err(fast, _zero_padded_conv(conv, x.float())) < 1e-6, frames
    x = torch.randn(1, 6, 9, 5, 7, generator=gen)
    with torch.no_grad():
        cache: dict = {}
        chunks = [conv(x[:, :, a:b], cache) for a, b in ((0, 1), (1, 5), (5, 9))]
        assert _rel_err(torch.cat(chunks, dim=2), _zero_padded_conv(conv, x)) < 1e-6
    with FlopCounterMode(display=False) as ours:  # with autograd: torch's kernel, which the counter sees
        conv(x)
    with FlopCounterMode(display=False) as by_definition:
        _zero_padded_conv(conv, x)
    # A 3-tap conv does one output frame's work less per clip start (2/3 of the first, 1/3 of the second).
    saved_frames = {3: 1.0, 2: 0.5, 1: 0.0}[conv.conv.kernel_size[0]] if stride == 1 else 2 / 3
    outputs = _zero_padded_conv(conv, x).shape[2]
    assert ours.get_total_flops() == pytest.approx(by_definition.get_total_flops() * (1 - saved_frames / outputs))


def test_streamed_chunks_must_end_on_the_temporal_stride() -> None:
    """A stride-2 causal conv streamed in chunks: the first chunk must be 1 + 2k frames and the others 2k, else
    an output window would straddle two chunks; the error says what the chunk lengths must be."""
    from video_vae.causal_conv import CausalConv3d

    conv = CausalConv3d(4, 4, kernel_size=3, stride=(2, 1, 1))
    with torch.no_grad():
        for lengths in ((8,), (9, 3)):
            cache: dict = {}
            with pytest.raises(ValueError, match="does not end on a stride-2 boundary"):
                for n in lengths:
                    conv(torch.randn(1, 4, n, 4, 4), cache)
        cache = {}
        assert [conv(torch.randn(1, 4, n, 4, 4), cache).shape[2] for n in (9, 4)] == [5, 2]


def test_cpu_inference_convolution_route_matches_torch() -> None:
    """Inference on CPU goes to oneDNN even where torch's kernel rule would pick its slow kernel (N*C*T*H under
    ~20k); it must compute the same convolution, and training keeps torch's own kernel."""
    from video_vae.causal_conv import CausalConv3d

    gen = torch.Generator().manual_seed(3)
    conv = CausalConv3d(16, 16, kernel_size=3)
    x = torch.randn(1, 16, 5, 40, 96, generator=gen)  # 1*16*7*40 padded = 4480 <= 20480
    expected = _zero_padded_conv(conv, x)
    with torch.no_grad():
        fast = conv(x)
    assert _rel_err(fast, expected) < 1e-5
    train = conv(x)  # weights require grad: torch's own kernel, differentiable
    assert train.requires_grad and _rel_err(train.detach(), expected.detach()) < 1e-6


def test_encode_and_decode_return_plain_contiguous_tensors(tiny_vae: CausalVideoVAE) -> None:
    """Inside, the CPU VAE computes channels-last; what it hands back is an ordinary contiguous tensor (latents
    are saved with safetensors, which needs one)."""
    with torch.no_grad():
        latent = tiny_vae.encode(_video(9)).latent_dist.mean
        chunked = tiny_vae.encode(_video(9), temporal_chunk=True, window_size=8).latent_dist.mean
        decoded = tiny_vae.decode(latent).sample
    assert latent.is_contiguous() and chunked.is_contiguous() and decoded.is_contiguous()


def test_compiled_inference_matches_eager(tiny_vae: CausalVideoVAE) -> None:
    """``compile_for_inference`` (inductor, weights frozen): chunked encode and decode as extraction and generation
    run them, equal to the eager model to float32 rounding, really compiled, state dict untouched."""
    import torch._inductor.config as inductor_config

    # Restored by assignment after this test: monkeypatch's undo (pytest >= 9.2) may delete the attribute instead,
    # which hides the option from inductor for the rest of the process.
    freezing = inductor_config.freezing
    try:
        _check_compiled_inference(tiny_vae)
    finally:
        inductor_config.freezing = freezing


def _check_compiled_inference(tiny_vae: CausalVideoVAE) -> None:
    import torch._dynamo

    compiled = CausalVideoVAE(**TINY_CONFIG)
    compiled.load_state_dict(tiny_vae.state_dict())
    with pytest.raises(RuntimeError, match="eval"):
        compiled.compile_for_inference()
    compiled.eval().compile_for_inference()
    torch._dynamo.reset()
    video = _video(17)
    with torch.no_grad():
        z_eager = tiny_vae.encode(video, temporal_chunk=True, window_size=8).latent_dist.mean
        z_compiled = compiled.encode(video, temporal_chunk=True, window_size=8).latent_dist.mean
        x_eager = tiny_vae.decode(z_eager, temporal_chunk=True, window_size=2).sample
        x_compiled = compiled.decode(z_eager, temporal_chunk=True, window_size=2).sample
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # encoder and decoder graphs were built
    assert _rel_err(z_compiled, z_eager) < 1e-5 and _rel_err(x_compiled, x_eager) < 1e-5
    assert compiled.state_dict().keys() == tiny_vae.state_dict().keys()
