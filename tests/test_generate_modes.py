"""Full-sequence sampling and text-to-image: shapes, seeds, equality with a hand-driven loop over the scheduler (both
DiT kinds), the t2i CLI writing an image of the requested size, the mode recorded by the trainer's export and read
back by generation, and validation sampling with the mode the run trains."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from pyramid_dit.block_noise import sample_block_noise
from pyramid_dit.pipeline import PyramidFlowPipeline
from pyramid_dit.pyramid import noise_pyramid, upsample_nearest
from pyramid_dit.text_features import TextFeatures
from pyramid_dit.training_record import TRAINING_RECORD, TrainedAs, read_training_record, training_record

SMALL = dict(num_inference_steps=1, video_num_inference_steps=1, progress=False)


# ------------------------------------------------------------------------------------------ full sequence
def test_full_sequence_shapes_and_seed_determinism(pipe):
    prompts = ["a red ball rolling left", "a dog running on the beach"]
    kwargs = dict(height=64, width=64, temp=3, mode="full_sequence", negative_prompt="", **SMALL)
    a = pipe.generate(prompts, seed=0, output_type="latent", **kwargs)
    b = pipe.generate(prompts, seed=0, output_type="latent", **kwargs)
    c = pipe.generate(prompts, seed=1, output_type="latent", **kwargs)
    assert a.shape == (2, 16, 3, 8, 8)
    assert torch.equal(a, b), "the same seed must give the same latents"
    assert (a - c).abs().max() > 0.1, "a different seed must give a different video"
    ar = pipe.generate(prompts, seed=0, output_type="latent", **{**kwargs, "mode": "ar"})
    assert (a - ar).abs().max() > 1e-3, "full-sequence and autoregressive sampling are different algorithms"

    video = pipe.generate(prompts, seed=0, output_type="uint8", **kwargs)
    assert video.shape == (2, 3, 17, 64, 64) and video.dtype == torch.uint8  # [b, 3, 8k+1, H, W], k = temp - 1
    assert video.float().std() > 1

    # One latent frame (an image): both modes are the same computation.
    one = dict(kwargs, temp=1)
    assert torch.equal(pipe.generate(prompts, seed=2, output_type="latent", **one),
                       pipe.generate(prompts, seed=2, output_type="latent", **{**one, "mode": "ar"}))


def test_full_sequence_refuses_image_conditioning_and_unknown_modes(pipe):
    image = torch.rand(3, 64, 64)
    with pytest.raises(ValueError, match="image-to-video needs mode='ar'"):
        pipe.generate("x", image=image, temp=2, mode="full_sequence", **SMALL)
    with pytest.raises(ValueError, match="mode must be one of"):
        pipe.generate("x", height=64, width=64, temp=2, mode="joint", **SMALL)


def _mmdit():
    from pyramid_dit.modeling_pyramid_mmdit import PyramidDiffusionMMDiT
    from tools.build_tiny_checkpoint import MMDIT_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    return PyramidDiffusionMMDiT(**MMDIT_TRANSFORMER_CONFIG)


def _flux():
    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    from tools.build_tiny_checkpoint import TRANSFORMER_CONFIG

    torch.manual_seed(0)
    return PyramidFluxTransformer(**TRANSFORMER_CONFIG)


def _randomise(dit: torch.nn.Module) -> torch.nn.Module:
    """Every weight random: the default init zeroes the output layers, and a zero prediction would make the loops
    equal whatever they fed the DiT."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return dit.eval()


@pytest.mark.parametrize("make_dit", [_flux, _mmdit], ids=["pyramid_flux", "pyramid_mmdit"])
def test_full_sequence_equals_a_hand_driven_scheduler_loop(make_dit):
    """Every Euler step of the pipeline equals a loop written out here: one seeded generator for the initial noise
    and each stage jump's block noise, the renoising coefficients derived from the scheduler's corrected start
    sigma, all frames in one column with no history, classifier-free guidance over [negative; prompt]."""
    dit = _randomise(make_dit())
    width, pooled = dit.config.joint_attention_dim, dit.config.pooled_projection_dim
    g = torch.Generator().manual_seed(5)
    text = TextFeatures(torch.randn(2, 6, width, generator=g), torch.ones(2, 6, dtype=torch.long),
                        torch.randn(2, pooled, generator=g))
    null = TextFeatures(torch.randn(1, 6, width, generator=g), torch.ones(1, 6, dtype=torch.long),
                        torch.randn(1, pooled, generator=g))
    steps, scale, seed, temp = [2, 3, 2], 4.0, 11, 3
    pipe = PyramidFlowPipeline(dit)

    recorded = []
    step = pipe.scheduler.step

    def recording_step(*args, **kwargs):
        result = step(*args, **kwargs)
        recorded.append(result.prev_sample)
        return result

    pipe.scheduler.step = recording_step
    out = pipe.generate(prompt_features=text, negative_features=null, height=64, width=64, temp=temp,
                        mode="full_sequence", num_inference_steps=steps, guidance_scale=scale, seed=seed,
                        output_type="latent", progress=False)
    del pipe.scheduler.step

    scheduler = pipe.scheduler
    gamma = scheduler.config.gamma
    rows = TextFeatures.cat([null.expand_rows(2, "negative"), text])
    gen = torch.Generator().manual_seed(seed)
    latents = noise_pyramid(torch.randn(2, 16, temp, 8, 8, generator=gen), 3)[0]
    expected = []
    with torch.no_grad():
        for stage in range(3):
            if stage > 0:
                signal = 1 - scheduler.ori_start_sigmas[stage]
                alpha = (1 - scheduler.start_sigmas[stage]) / signal  # lands on the corrected start sigma
                beta = alpha * (1 - signal) / math.sqrt(gamma)
                latents = upsample_nearest(latents)
                latents = alpha * latents + beta * sample_block_noise(tuple(latents.shape), gamma, generator=gen)
            scheduler.set_timesteps(steps[stage], stage)
            for t in scheduler.timesteps:
                pred = dit(sample=[[torch.cat([latents, latents])]], encoder_hidden_states=rows.prompt_embeds,
                           encoder_attention_mask=rows.prompt_attention_mask,
                           pooled_projections=rows.pooled_prompt_embeds,
                           timestep_ratio=t.expand(4).float())[0]
                uncond, cond = pred.chunk(2)
                latents = scheduler.step(uncond + scale * (cond - uncond), t, latents).prev_sample
                expected.append(latents)
    assert len(recorded) == len(expected) == sum(steps)
    for i, (got, want) in enumerate(zip(recorded, expected)):
        assert torch.equal(got, want), f"Euler step {i} differs from the hand-driven loop"
    assert torch.equal(out, expected[-1]) and out.shape == (2, 16, temp, 8, 8)
    assert out.abs().max() > 0.1


# ------------------------------------------------------------------------------------------------- t2i CLI
def test_t2i_cli_writes_an_image_from_the_released_image_dit_and_from_a_t2i_finetune(tiny_model, tmp_path, capsys,
                                                                                    monkeypatch):
    from tools.generate import main

    monkeypatch.chdir(tmp_path)
    flags = ["--model_path", str(tiny_model), "--prompt", "a red ball", "--height", "64", "--width", "128",
             "--num_inference_steps", "1", "--device", "cpu", "--guidance_scale", "9"]
    # --task t2i: the released image DiT, one latent frame, the default output is a .png.
    written = main([*flags, "--task", "t2i"])
    assert written == [Path("outputs/sample.png")]
    with Image.open(tmp_path / written[0]) as image:
        assert image.size == (128, 64) and image.mode == "RGB"
    log = capsys.readouterr().out
    assert "diffusion_transformer_image" in log and "t2i, mode full_sequence" in log and "1 image, 128x64" in log

    # A t2i finetune (an exported folder with its training record): t2i without being told, same weights, same
    # seed, same image.
    export = tmp_path / "export" / "transformer"
    shutil.copytree(tiny_model / "diffusion_transformer_image", export)
    (export / TRAINING_RECORD).write_text(json.dumps(training_record("t2i", False)))
    again = main([*flags, "--dit_path", str(export), "--output", "tuned.png"])
    assert again == [Path("tuned.png")]
    assert (tmp_path / "tuned.png").read_bytes() == (tmp_path / written[0]).read_bytes()
    assert "t2i, mode full_sequence" in capsys.readouterr().out

    # --temp 1 from a video DiT is an image too; a video suffix for one image is refused.
    with pytest.raises(SystemExit) as exc:
        main([*flags, "--temp", "1", "--output", "one.mp4"])
    assert exc.value.code == 2 and "written as .png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*flags, "--task", "t2i", "--temp", "3"])
    assert "--task t2i generates one image" in capsys.readouterr().err


def test_generation_defaults_come_from_the_trained_export(tiny_model, tmp_path):
    """The trainer's export carries the record; tools/generate.py takes --task / --mode / --temp from it."""
    from tools.generate import build_parser, check_args, resolve_defaults
    from train.args import build_parser as train_parser
    from train.run import train_config
    from trainer_misc.runtime.arguments import ConfigError
    from trainer_misc.state.export import export_pretrained

    def trained(*flags):
        args = train_parser().parse_args(["--model_path", "m", "--anno_file", "a.jsonl", "--output_dir", "o", *flags])
        return train_config(args).export_files

    assert trained("--task", "t2v") == {TRAINING_RECORD: {"task": "t2v", "sampling_mode": "full_sequence"}}
    assert trained("--use_temporal_pyramid", "--sync_video_input")[TRAINING_RECORD]["sampling_mode"] == "ar"
    assert trained("--task", "t2i") == {TRAINING_RECORD: {"task": "t2i", "sampling_mode": "full_sequence"}}

    dit = _flux()
    folder = export_pretrained(dit, dit.state_dict(), tmp_path / "export" / "transformer",
                               files=trained("--task", "t2v"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", "diffusion_pytorch_model.safetensors",
                                                               TRAINING_RECORD])
    assert read_training_record(folder) == TrainedAs("t2v", "full_sequence", str(folder / TRAINING_RECORD))

    parser = build_parser()

    def resolved(*flags):
        args = parser.parse_args(["--model_path", str(tiny_model), "--prompt", "x", *flags])
        check_args(args)
        resolve_defaults(args)
        return args.task, args.mode, args.temp, args.variant, args.height, args.width, args.output

    assert resolved("--dit_path", str(folder)) == ("t2v", "full_sequence", 16, "diffusion_transformer_384p", 384, 640,
                                                   "outputs/sample.mp4")
    assert resolved("--dit_path", str(folder), "--mode", "ar")[1] == "ar"  # the flag overrides the record
    assert resolved() == ("t2v", "ar", 16, "diffusion_transformer_384p", 384, 640, "outputs/sample.mp4")  # released
    assert resolved("--variant", "diffusion_transformer_768p")[4:6] == (768, 1280)
    assert resolved("--task", "t2i")[:6] == ("t2i", "full_sequence", 1, "diffusion_transformer_image", 768, 1280)
    image = tmp_path / "first.png"
    Image.new("RGB", (64, 64)).save(image)
    with pytest.raises(ConfigError, match="needs --mode ar"):
        resolved("--dit_path", str(folder), "--image", str(image))  # a full-sequence DiT cannot continue an image
    (folder / TRAINING_RECORD).write_text(json.dumps({"task": "t2v", "sampling_mode": "sideways"}))
    with pytest.raises(ValueError, match="damaged"):
        read_training_record(folder)


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("flags, mode, temp, size", [
    (["--task", "t2v", "--resolution", "64x64", "--max_frames", "2"], "full_sequence", 2, (64, 64)),
    (["--task", "t2i", "--resolution", "64x64"], "full_sequence", 1, (64, 64)),
    (["--use_temporal_pyramid", "--sync_video_input", "--video_sync_group", "2", "--resolution", "64x64",
      "--max_frames", "2"], "ar", 2, (64, 64)),
], ids=["full-sequence-t2v", "t2i", "ar"])
def test_validation_samples_with_the_mode_the_run_trains(tiny_model, tmp_path, monkeypatch, flags, mode, temp, size):
    """build_validation (as train_pyramid_flow_without_ar.sh / train_pyramid_flow.sh launch it) hands the sampler
    the run's mode, and the sampler passes it to every generate call."""
    from train.args import build_parser
    from train.run import ModelSide, build_validation

    args = build_parser().parse_args(["--model_path", str(tiny_model), "--anno_file", "a.jsonl", "--output_dir",
                                      str(tmp_path), "--validation_every", "1", "--validation_steps", "1", "1", "1",
                                      "--model_dtype", "fp32", "--report_to", "none", *flags])
    g = torch.Generator().manual_seed(0)
    features = TextFeatures(torch.randn(1, 4, 32, generator=g), torch.ones(1, 4, dtype=torch.long),
                            torch.randn(1, 24, generator=g))
    dit = _flux()
    sampler = build_validation(args, ModelSide(dit), [{"text": "a ball", "text_features": features}], features,
                               torch.device("cpu"))
    assert (sampler.mode, sampler.temp, (sampler.width, sampler.height)) == (mode, temp, size)

    calls = []
    generate = PyramidFlowPipeline.generate
    monkeypatch.setattr(PyramidFlowPipeline, "generate",
                        lambda self, *a, **k: calls.append(k["mode"]) or generate(self, *a, **k))
    written = sampler(1, dit.state_dict())
    assert calls == [mode]
    assert written[0].name == ("prompt0.png" if temp == 1 else "prompt0.mp4") and written[0].stat().st_size > 0
