"""Validation samples during training: prompts from readable items only (no text encoder loaded for them), the
empty-prompt features as negative even with --text_drop_rate 0, one sampling DiT built once in the run's dtype."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

from pyramid_dit.text_features import TextFeatures
from trainer_misc.loop.validation import ValidationSampler, pick_validation_prompts


def _features(seed: int, width: int = 8) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    return TextFeatures(torch.randn(1, 4, width, generator=g), torch.ones(1, 4, dtype=torch.long),
                        torch.randn(1, 6, generator=g))


class _NoEncoder:
    def encode(self, *a, **k):
        raise AssertionError("no text encoder may run for items that carry features")


def test_prompts_skip_unreadable_items_and_never_need_a_text_encoder():
    items = [{"bad": ("clip0.safetensors", "truncated")}, {"text": "a", "text_features": _features(1)},
             {"bad": ("clip2.safetensors", "missing")}, {"text": "b", "text_features": _features(2)},
             {"text": "c", "text_features": _features(3)}]
    prompts = pick_validation_prompts(items, 2, text_encoder=_NoEncoder())
    assert [p.caption for p in prompts] == ["a", "b"]
    assert torch.equal(prompts[1].features.prompt_embeds, _features(2).prompt_embeds)
    with pytest.raises(ValueError, match="no text features and no text encoder"):
        pick_validation_prompts([{"text": "a"}], 1)
    with pytest.raises(ValueError, match="none of the first 2 items is readable"):
        pick_validation_prompts(items[:1] * 2, 1)

    class Encoder:  # the training run's own encoder (--load_text_encoder) is reused, not a second one
        def encode(self, captions, device):
            assert captions == ["a"]
            return _features(9)

    assert torch.equal(pick_validation_prompts([{"text": "a"}], 1, Encoder())[0].features.pooled_prompt_embeds,
                       _features(9).pooled_prompt_embeds)


def test_validation_uses_the_empty_prompt_features_with_text_drop_rate_0(tmp_path):
    from safetensors.torch import save_file

    from train.args import build_parser, empty_prompt_file
    from train.run import load_null_text

    fea = tmp_path / "empty.safetensors"
    save_file({"prompt_embed": torch.zeros(1, 4, 8), "prompt_attention_mask": torch.ones(1, 4, dtype=torch.long),
               "pooled_prompt_embed": torch.zeros(1, 6)}, str(fea))

    def args(*flags):
        return build_parser().parse_args(["--model_path", "m", "--anno_file", str(tmp_path / "a.jsonl"),
                                          "--output_dir", "o", "--text_drop_rate", "0", *flags])

    assert load_null_text(args()) is None  # nothing needs it
    null = load_null_text(args("--validation_every", "5", "--empty_prompt_fea", str(fea)))
    assert isinstance(null, TextFeatures) and null.prompt_embeds.shape == (1, 4, 8)
    # What needs the file is said when it is missing (train.args.check_args refuses the launch with it).
    path, needed_by = empty_prompt_file(args("--validation_every", "5"))
    assert path == tmp_path / "empty_prompt_text_fea.safetensors"
    assert needed_by == ["validation samples (--validation_every)"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tools.build_tiny_checkpoint import build_tiny_checkpoint
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def test_sampler_is_built_once_in_the_run_dtype_and_takes_new_weights(tiny, tmp_path):
    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    from pyramid_dit.text_encoder import FluxTextEncoder
    from video_vae.modeling_causal_vae import CausalVideoVAE

    encoder = FluxTextEncoder.from_pretrained(tiny)
    prompt = encoder.encode(["a red square"])
    from trainer_misc.loop.validation import ValidationPrompt

    trained = PyramidFluxTransformer.from_pretrained(tiny, subfolder="diffusion_transformer_384p")
    sampler = ValidationSampler(type(trained).from_config(trained.config),
                                CausalVideoVAE.from_pretrained(tiny / "causal_video_vae"),
                                [ValidationPrompt("a red square", prompt)], encoder.encode([""]),
                                width=64, height=64, temp=2, steps=[1, 1, 1], dtype=torch.bfloat16,
                                device=torch.device("cpu"), output_dir=str(tmp_path), tensorboard=False)
    dit = sampler.dit
    assert {p.dtype for p in dit.parameters()} == {torch.bfloat16}  # the run's dtype, not fp32
    assert {p.dtype for p in sampler.vae.parameters()} == {torch.bfloat16}
    state = trained.state_dict()
    first = sampler(1, state)
    moved = {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}
    second = sampler(2, moved)
    assert sampler.dit is dit, "the sampling DiT is built once, only its weights change"
    assert all(torch.equal(p, moved[n].to(torch.bfloat16)) for n, p in dit.named_parameters())
    assert [p.name for p in first + second] == ["prompt0.mp4", "prompt0.mp4"]
    assert first[0].parent.name == "step-000001" and second[0].parent.name == "step-000002"
    assert first[0].read_bytes() != second[0].read_bytes()


def test_base_samples_once_then_before_after_images_also_after_a_resume(tiny, tmp_path):
    """Step 0 (the base weights, before the first step) writes samples/base/ and its frame strips; every later
    validation writes the base strip above the current one, to a PNG and to tensorboard; a new sampler (a resumed
    run) reads the base strips back from disk instead of sampling resumed weights."""
    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    from pyramid_dit.text_encoder import FluxTextEncoder
    from trainer_misc.loop.validation import ValidationPrompt
    from video_vae.modeling_causal_vae import CausalVideoVAE

    encoder = FluxTextEncoder.from_pretrained(tiny)
    trained = PyramidFluxTransformer.from_pretrained(tiny, subfolder="diffusion_transformer_384p")

    def sampler():
        return ValidationSampler(type(trained).from_config(trained.config),
                                 CausalVideoVAE.from_pretrained(tiny / "causal_video_vae"),
                                 [ValidationPrompt("a red square", encoder.encode(["a red square"]))],
                                 encoder.encode([""]), width=64, height=64, temp=2, steps=[1, 1, 1],
                                 dtype=torch.float32, device=torch.device("cpu"), output_dir=str(tmp_path))

    state = trained.state_dict()
    first = sampler()
    base = first(0, state)
    assert [p.relative_to(tmp_path).as_posix() for p in base] == ["samples/base/prompt0.mp4"]
    assert (tmp_path / "samples" / "base" / "strips.safetensors").is_file()
    moved = {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}
    after = first(3, moved)
    assert [p.name for p in after] == ["prompt0.mp4", "before_after_prompt0.png"]
    pair = torch.from_numpy(np.array(Image.open(after[1]))).permute(2, 0, 1).float() / 255
    assert pair.shape[1] == 2 * 64  # base above current
    top, bottom = pair[:, :64], pair[:, 64:]
    assert torch.allclose(top, first.base_strips[0], atol=1 / 255 + 1e-6)
    assert not torch.allclose(top, bottom, atol=0.02), "the current weights drew something else"

    resumed = sampler()  # a new process: the base comes from samples/base/, not from the (moved) weights
    again = resumed(3, moved)
    assert again[1].read_bytes() == after[1].read_bytes()
    tags = set()
    for events in (tmp_path / "logs").glob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["images"])
    assert {"validation/prompt0", "validation/before_after/prompt0"} <= tags
