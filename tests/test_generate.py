"""Video generation: parity with the reference sampler, block noise, the tiny-model pipeline, video files, the CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pyramid_dit.block_noise import block_noise_covariance, correlate_blocks, sample_block_noise
from pyramid_dit.media import save_video
from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
from pyramid_dit.noise import GeneratorNoise, ReplayNoise
from pyramid_dit.pipeline import PyramidFlowPipeline
from pyramid_dit.text_features import TextFeatures

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_inference_steps=1, video_num_inference_steps=1, progress=False)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``[..., H, W]`` -> ``[N, 4]``: the values of every 2x2 block, row-major within the block."""
    h, w = x.shape[-2:]
    return x.reshape(-1, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4)


# ------------------------------------------------------------------------------------------- golden replay
def test_golden_generate_replay(golden_dir):
    """A whole reference generate() run (4 latent frames, 3 stages, CFG 7 / 5), replayed with its recorded noise."""
    case = {k: v.clone() for k, v in load_file(golden_dir / "flux_tiny" / "generate.safetensors").items()}
    dit = PyramidFluxTransformer.from_pretrained(golden_dir / "flux_tiny")
    dit.train()  # the trainer hands over a model in training mode; the pipeline must not leave it changed
    pipe = PyramidFlowPipeline(dit)  # no text encoder, no VAE: features in, latents out
    noise = ReplayNoise(case["initial_noise"], [case[f"block_noise.{i}"] for i in range(8)])
    out = pipe.generate(
        prompt_features=TextFeatures(case["prompt_embeds"], case["prompt_attention_mask"],
                                     case["pooled_prompt_embeds"]),
        negative_features=TextFeatures(case["negative_prompt_embeds"], case["negative_prompt_attention_mask"],
                                       case["negative_pooled_prompt_embeds"]),
        height=128, width=192, temp=4, num_inference_steps=[3, 3, 3], video_num_inference_steps=[2, 2, 2],
        guidance_scale=7.0, video_guidance_scale=5.0, noise=noise, output_type="latent", progress=False,
    )
    ref = case["video_latent"]
    assert out.shape == ref.shape == (1, 16, 4, 16, 24)
    assert noise.blocks_used == 8  # 2 stage jumps per latent frame
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, f"generate() differs from the reference by {err:.3g} (relative to max |ref|)"
    assert dit.training


def test_golden_block_noise_has_the_reference_structure(golden_dir):
    """The recorded stage-jump noise (drawn with the reference's covariance) sums to 0 over every 2x2 block, as
    gamma = 1/3 implies (eigenvalue 1 - 3 gamma along the block mean); ours does too."""
    case = load_file(golden_dir / "flux_tiny" / "generate.safetensors")
    ours = sample_block_noise((1, 16, 1, 16, 24), 1 / 3, generator=torch.Generator().manual_seed(0))
    for noise in (case["block_noise.1"], ours):
        assert _blocks(noise).sum(dim=1).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------- block noise
@pytest.mark.parametrize("gamma", [1 / 3, 0.2])
def test_block_noise_covariance(gamma):
    """Empirical 4x4 block covariance of the one-call sampler matches (1 + gamma) I - gamma J."""
    noise = sample_block_noise((8, 16, 4, 64, 64), gamma, generator=torch.Generator().manual_seed(1))
    values = _blocks(noise).double()  # 524,288 blocks
    cov = values.T @ values / values.shape[0]  # zero mean by construction
    # Std of an empirical covariance entry is ~ 1/sqrt(n) = 1.4e-3; 6e-3 is > 4 sigma.
    torch.testing.assert_close(cov, block_noise_covariance(gamma), atol=6e-3, rtol=0)
    assert abs(values.mean().item()) < 3e-3
    # Blocks are independent of each other: neighbouring blocks are uncorrelated.
    left, right = noise[..., 0::2, 0::4].double(), noise[..., 0::2, 2::4].double()  # same cell, adjacent blocks
    assert abs((left * right).mean().item()) < 6e-3


def test_block_noise_is_deterministic_and_validates():
    a = sample_block_noise((1, 2, 1, 4, 6), 1 / 3, generator=torch.Generator().manual_seed(3))
    b = sample_block_noise((1, 2, 1, 4, 6), 1 / 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # gamma = 0 is plain white noise.
    white = torch.randn(2, 4, 4)
    torch.testing.assert_close(correlate_blocks(white, 0.0), white)
    with pytest.raises(ValueError, match="even height and width"):
        sample_block_noise((1, 1, 1, 3, 4), 1 / 3)
    with pytest.raises(ValueError, match="negative eigenvalue"):
        sample_block_noise((1, 1, 1, 4, 4), 0.5)


# ------------------------------------------------------------------------------------------ tiny pipeline
def test_t2v_shapes_and_seed_determinism(pipe):
    prompts = ["a red ball rolling left", "a dog running on the beach"]
    kwargs = dict(height=64, width=64, temp=2, negative_prompt="", **SMALL)
    a = pipe.generate(prompts, seed=0, output_type="latent", **kwargs)
    b = pipe.generate(prompts, seed=0, output_type="latent", **kwargs)
    c = pipe.generate(prompts, seed=1, output_type="latent", **kwargs)
    assert a.shape == (2, 16, 2, 8, 8)
    assert torch.equal(a, b), "the same seed must give the same latents"
    assert (a - c).abs().max() > 0.1, "a different seed must give a different video"
    assert (a[0] - a[1]).abs().max() > 0.1, "different prompts in one batch must differ"

    # Decoding is deterministic too, so the same seed gives the same video; one decode keeps the test fast.
    video = pipe.generate(prompts, seed=0, output_type="uint8", **kwargs)
    assert video.shape == (2, 3, 9, 64, 64) and video.dtype == torch.uint8  # [b, 3, 8k+1, H, W]
    assert video.float().std() > 1  # not a constant image


def test_reduced_precision_autocast_runs(pipe):
    """dtype=bfloat16 runs the DiT under autocast (on CUDA for users; CPU autocast here) and stays close to fp32."""
    kwargs = dict(height=64, width=64, temp=2, seed=3, output_type="latent", **SMALL)
    fp32 = pipe.generate("a red ball", **kwargs)
    bf16 = PyramidFlowPipeline(pipe.dit, pipe.vae, pipe.text_encoder, dtype=torch.bfloat16).generate(
        "a red ball", **kwargs)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()  # latents and Euler steps stay float32
    assert 0 < ((bf16 - fp32).norm() / fp32.norm()).item() < 0.1


class _MeanPosterior(GeneratorNoise):
    """Seeded noise, but the image latent is the posterior mean (eps = 0), so it can be checked exactly."""

    def posterior(self, shape):
        return torch.zeros(shape)


def test_i2v_conditions_on_the_image(pipe):
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.random((3, 64, 128), dtype=np.float32)) for _ in range(2)]
    outs = [pipe.generate("a boat on the sea", image=img, temp=3, noise=_MeanPosterior(7), output_type="latent",
                          **SMALL) for img in images]
    assert outs[0].shape == (1, 16, 3, 8, 16)
    # Frame 0 is the image's (normalised) VAE latent.
    with torch.no_grad():
        mean = pipe.vae.encode(images[0][None, :, None] * 2 - 1).latent_dist.mean
    torch.testing.assert_close(outs[0][:, :, :1], pipe.normalization.normalize(mean), atol=1e-5, rtol=1e-5)
    # Same noise, other image: the generated frames change, so the image is really used as history.
    assert (outs[0][:, :, 1:] - outs[1][:, :, 1:]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="resize it"):
        pipe.generate("x", image=images[0], height=128, width=128, temp=2, **SMALL)


def test_generate_rejects_bad_arguments(pipe):
    with pytest.raises(ValueError, match="multiples of 64"):
        pipe.generate("x", height=96, width=64, temp=2, **SMALL)
    with pytest.raises(ValueError, match="one per stage"):
        pipe.generate("x", height=64, width=64, temp=2, num_inference_steps=[1, 1], progress=False)
    with pytest.raises(ValueError, match="seed or noise"):
        pipe.generate("x", height=64, width=64, seed=1, noise=GeneratorNoise(1), **SMALL)
    with pytest.raises(ValueError, match="exactly one of prompt"):
        pipe.generate(height=64, width=64, **SMALL)


def test_from_pretrained_with_finetuned_dit(tiny_model, tmp_path):
    """--dit_path (a trainer-exported folder) and --dit_weight (a state-dict file) replace the variant's DiT."""
    base = PyramidFluxTransformer.from_pretrained(tiny_model / "diffusion_transformer_384p")
    tuned = {k: v + 0.01 for k, v in base.state_dict().items()}
    base.load_state_dict(tuned)
    base.save_pretrained(tmp_path / "export")
    save_file({k: v.contiguous() for k, v in tuned.items()}, str(tmp_path / "dit.safetensors"))
    torch.save({f"dit.{k}": v for k, v in tuned.items()}, tmp_path / "dit.pt")  # reference-style full checkpoint

    for source in (dict(dit_path=tmp_path / "export"), dict(dit_weight=tmp_path / "dit.safetensors"),
                   dict(dit_weight=tmp_path / "dit.pt")):
        pipe = PyramidFlowPipeline.from_pretrained(tiny_model, device="cpu", load_text_encoder=False,
                                                   load_vae=False, **source)
        got = pipe.dit.state_dict()
        assert all(torch.equal(got[k], v) for k, v in tuned.items()), source
        assert list(pipe.dit.config.axes_dims_rope) == [4, 6, 6]  # the config is read, not overridden

    with pytest.raises(ValueError, match="not both"):
        PyramidFlowPipeline.from_pretrained(tiny_model, dit_path=tmp_path / "export",
                                            dit_weight=tmp_path / "dit.pt")
    with pytest.raises(FileNotFoundError, match="diffusion_transformer_384p"):
        PyramidFlowPipeline.from_pretrained(tiny_model, variant="diffusion_transformer_999p", load_vae=False,
                                            load_text_encoder=False)



def test_lora_path_equals_the_merged_export_and_scale_zero_equals_the_base(tiny_model, pipe, tmp_path):
    """--lora_path applies export/lora without merging: at scale 1 the video equals the merged export's
    (export/transformer), at scale 0 the base DiT's, and in between it differs from both."""
    from pyramid_dit.kinds import get_kind
    from pyramid_dit.lora import LoraSettings, add_lora, merged_state_dict
    from trainer_misc.state.export import save_adapter

    dit = PyramidFluxTransformer.from_pretrained(tiny_model / "diffusion_transformer_384p")
    add_lora(dit, LoraSettings(rank=4, alpha=8.0, targets=get_kind("pyramid_flux").lora_targets))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B starts at zero (a no-op adapter): give it values, as training would
        for name, p in dit.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    save_adapter(dit.state_dict(), dit, tmp_path / "lora")
    merged = PyramidFluxTransformer.from_pretrained(tiny_model / "diffusion_transformer_384p")
    merged.load_state_dict(merged_state_dict(dit.state_dict(), dit), strict=True)
    merged.save_pretrained(tmp_path / "transformer")

    def latents(**source):
        loaded = PyramidFlowPipeline.from_pretrained(tiny_model, device="cpu", load_text_encoder=False,
                                                     load_vae=False, **source)
        return PyramidFlowPipeline(loaded.dit, pipe.vae, pipe.text_encoder).generate(
            "a red ball", height=64, width=64, temp=2, seed=4, output_type="latent", **SMALL)

    base, want = latents(), latents(dit_path=tmp_path / "transformer")
    got, off, half = (latents(lora_path=tmp_path / "lora", lora_scale=s) for s in (1.0, 0.0, 0.5))
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"--lora_path vs merged export: relative max difference {err:.3g}")
    assert err <= 1e-5, f"--lora_path differs from the merged export by {err:.3g}"
    assert torch.equal(off, base)
    assert (want - base).abs().max() > 1e-3, "the adapter changed nothing: the test would prove nothing"
    assert (half - base).abs().max() > 1e-4 and (half - want).abs().max() > 1e-4
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PyramidFlowPipeline.from_pretrained(tiny_model, device="cpu", load_text_encoder=False, load_vae=False,
                                            lora_path=tmp_path / "transformer")


# -------------------------------------------------------------------------------------------- video files
def test_decode_and_write_report_progress(pipe, tmp_path, capsys):
    """Decode reports once per decoded piece (temporal window x spatial tile) against the real count of decoder
    calls, and the bars reach their totals; writing an mp4 counts its frames."""
    latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    vae = pipe.vae
    calls, reports = [], []
    hook = vae.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            vae.enable_tiling(True)
            vae.decode(pipe.normalization.denormalize(latents), temporal_chunk=True, window_size=1,
                       tile_sample_min_size=32, progress=lambda done, total: reports.append((done, total)))
            vae.enable_tiling(False)
    finally:
        hook.remove()
    total = len(calls)
    assert total > 2  # several windows and tiles
    assert reports == [(i, total) for i in range(1, total + 1)]

    video = pipe.decode_latents(latents, window_size=1, tile_size=None, progress=True)
    save_video(video[0], tmp_path / "v.mp4", progress=True)
    err = capsys.readouterr().err
    assert "VAE decode" in err and "2/2" in err  # 3 latent frames, window 1: windows of 2 and 1 latent frames
    assert "writing v.mp4" in err and f"{video.shape[2]}/{video.shape[2]}" in err


def test_save_video_formats(tmp_path):
    import decord
    from PIL import Image

    frames = torch.linspace(0, 1, 17).view(1, 17, 1, 1).expand(3, 17, 48, 80).contiguous()
    mp4 = save_video(frames, tmp_path / "v.mp4", fps=24)
    reader = decord.VideoReader(str(mp4))
    assert len(reader) == 17 and reader[0].shape == (48, 80, 3)
    brightness = [float(reader[i].asnumpy().mean()) for i in (0, 8, 16)]
    assert brightness[0] < 20 and 110 < brightness[1] < 145 and brightness[2] > 235  # frame order kept

    gif = Image.open(save_video(frames, tmp_path / "v.gif"))
    assert gif.n_frames == 17 and gif.size == (80, 48)
    strip = Image.open(save_video(frames, tmp_path / "v.png", strip_frames=4))
    assert strip.size == (4 * 80, 48)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gif", "v.mp4", "v.png"]  # no temp files left

    with pytest.raises(ValueError, match="unsupported video suffix"):
        save_video(frames, tmp_path / "v.avi")
    with pytest.raises(ValueError, match="index the batch"):
        save_video(frames[None], tmp_path / "v.mp4")


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_rejects_bad_flags(tiny_model, capsys):
    from tools.generate import main

    cases = [
        (["--height", "100"], "multiple of 64"),
        (["--dit_path", str(tiny_model), "--dit_weight", "x.pt"], "alternatives"),
        (["--output", "out.avi"], "suffix must be one of"),
        (["--num_inference_steps", "1", "2"], "one per stage"),
        (["--image", "missing.png"], "no such file"),
        (["--lora_path", "missing_lora"], "no such folder"),
        (["--lora_scale", "0.5"], "set --lora_path too"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["--model_path", str(tiny_model), "--prompt", "x", *extra])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model_path", str(tiny_model / "nope"), "--prompt", "x"])
    assert "is not a folder" in capsys.readouterr().err


def test_cli_writes_mp4(tiny_model, tmp_path):
    import decord
    out = tmp_path / "videos" / "clip.mp4"
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "generate.py"), "--model_path", str(tiny_model),
           "--prompt", "a red ball", "--height", "64", "--width", "128", "--temp", "2",
           "--num_inference_steps", "1", "--video_num_inference_steps", "1", "--device", "cpu",
           "--output", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout
    reader = decord.VideoReader(str(out))
    assert len(reader) == 9 and reader[0].shape == (64, 128, 3)


def test_cli_prompt_file_gives_one_output_per_prompt(tmp_path):
    from tools.generate import build_parser, output_paths, read_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n\n  a blue car  \n", encoding="utf-8")
    args = build_parser().parse_args(["--model_path", str(tmp_path), "--prompt_file", str(prompts)])
    assert read_prompts(args) == ["a red ball", "a blue car"]
    assert output_paths("out/v.mp4", 1) == [Path("out/v.mp4")]
    assert output_paths("out/v.mp4", 2) == [Path("out/v_000.mp4"), Path("out/v_001.mp4")]
