"""FluxTextEncoder on a tiny random text side built offline (tools/build_tiny_checkpoint.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pyramid_dit.text_encoder import FluxTextEncoder
from pyramid_dit.text_features import TextFeatures
from tools.build_tiny_checkpoint import CLIP_HIDDEN_SIZE, T5_D_MODEL, build_text_components

LONG = "a red square moving left"  # 5 words, all whole tokens of the tiny vocabularies
SHORT = "a cat"


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory) -> Path:
    return build_text_components(tmp_path_factory.mktemp("tiny_text"), seed=0)


@pytest.fixture(scope="session")
def encoder(text_model_dir) -> FluxTextEncoder:
    return FluxTextEncoder.from_pretrained(text_model_dir)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} exceeds {rel:g} x max|expected| = {rel * scale:.3g}"


def test_shapes_mask_and_pooled(encoder):
    f = encoder.encode([LONG, SHORT], "cpu")
    assert isinstance(f, TextFeatures)
    assert f.prompt_embeds.shape == (2, 128, T5_D_MODEL) and f.prompt_embeds.dtype == torch.float32
    assert f.pooled_prompt_embeds.shape == (2, CLIP_HIDDEN_SIZE)
    assert f.prompt_attention_mask.shape == (2, 128) and f.prompt_attention_mask.dtype == torch.int64
    # Words + the closing </s>; the mask is ones then zeros.
    counts = [len(LONG.split()) + 1, len(SHORT.split()) + 1]
    assert f.prompt_attention_mask.sum(1).tolist() == counts
    for row, n in zip(f.prompt_attention_mask, counts):
        assert row[:n].eq(1).all() and row[n:].eq(0).all()
    assert not torch.allclose(f.pooled_prompt_embeds[0], f.pooled_prompt_embeds[1])
    assert torch.isfinite(f.prompt_embeds).all() and torch.isfinite(f.pooled_prompt_embeds).all()


def test_matches_released_pipeline_procedure(encoder, text_model_dir):
    """Same tokenizer settings and calls as the released pipeline, done by hand with the transformers classes."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    prompts = [LONG, SHORT, ""]
    t5_tok = T5TokenizerFast.from_pretrained(text_model_dir / "tokenizer_2")
    t5 = T5EncoderModel.from_pretrained(text_model_dir / "text_encoder_2").eval()
    clip_tok = CLIPTokenizer.from_pretrained(text_model_dir / "tokenizer")
    clip = CLIPTextModel.from_pretrained(text_model_dir / "text_encoder").eval()
    assert clip_tok.model_max_length == 77
    with torch.no_grad():
        t5_in = t5_tok(prompts, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
        expected_embeds = t5(t5_in.input_ids, attention_mask=t5_in.attention_mask)[0]
        clip_in = clip_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        expected_pooled = clip(clip_in.input_ids).pooler_output

    f = encoder.encode(prompts, "cpu")
    assert torch.equal(f.prompt_attention_mask, t5_in.attention_mask)
    assert torch.equal(f.prompt_embeds, expected_embeds)
    assert torch.equal(f.pooled_prompt_embeds, expected_pooled)


def test_padding_length_does_not_change_valid_outputs(encoder):
    short_pad = FluxTextEncoder(encoder.tokenizer, encoder.text_encoder, encoder.tokenizer_2, encoder.text_encoder_2,
                                max_sequence_length=16)
    a = encoder.encode([LONG, SHORT])
    b = short_pad.encode([LONG, SHORT])
    assert b.prompt_embeds.shape == (2, 16, T5_D_MODEL)
    assert torch.equal(a.prompt_attention_mask[:, :16], b.prompt_attention_mask)
    valid = b.prompt_attention_mask.bool()
    _assert_close(b.prompt_embeds[valid], a.prompt_embeds[:, :16][valid])
    assert torch.equal(a.pooled_prompt_embeds, b.pooled_prompt_embeds)


def test_batch_equals_single(encoder):
    batch = encoder.encode([LONG, SHORT])
    for i, prompt in enumerate([LONG, SHORT]):
        single = encoder.encode([prompt])
        assert torch.equal(single.prompt_attention_mask[0], batch.prompt_attention_mask[i])
        valid = single.prompt_attention_mask[0].bool()
        _assert_close(single.prompt_embeds[0][valid], batch.prompt_embeds[i][valid])
        _assert_close(single.pooled_prompt_embeds[0], batch.pooled_prompt_embeds[i])
    # A bare string is one prompt.
    assert torch.equal(encoder.encode(SHORT).prompt_attention_mask, encoder.encode([SHORT]).prompt_attention_mask)


def test_empty_prompt_for_classifier_free_guidance(encoder):
    f = encoder.encode(["", LONG])
    assert f.prompt_attention_mask[0].sum().item() == 1  # only </s>
    assert torch.isfinite(f.prompt_embeds).all() and torch.isfinite(f.pooled_prompt_embeds).all()
    assert not torch.allclose(f.pooled_prompt_embeds[0], f.pooled_prompt_embeds[1])


def test_long_prompt_is_truncated_to_max_length(encoder):
    f = encoder.encode([" ".join(["red"] * 300)])
    assert f.prompt_attention_mask.sum().item() == 128


def test_deterministic_and_frozen(encoder, text_model_dir):
    a = encoder.encode([LONG, SHORT])
    b = FluxTextEncoder.from_pretrained(text_model_dir).encode([LONG, SHORT])
    assert torch.equal(a.prompt_embeds, b.prompt_embeds)
    assert torch.equal(a.pooled_prompt_embeds, b.pooled_prompt_embeds)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.text_encoder_2.training and not encoder.text_encoder.training


def test_bfloat16_load(text_model_dir, encoder):
    f32 = encoder.encode([LONG])
    bf16 = FluxTextEncoder.from_pretrained(text_model_dir, torch_dtype=torch.bfloat16).encode([LONG])
    assert bf16.prompt_embeds.dtype == torch.bfloat16 and bf16.pooled_prompt_embeds.dtype == torch.bfloat16
    assert torch.equal(bf16.prompt_attention_mask, f32.prompt_attention_mask)
    _assert_close(bf16.pooled_prompt_embeds.float(), f32.pooled_prompt_embeds, rel=0.1)


def test_bad_inputs_raise_clear_errors(encoder, text_model_dir, tmp_path):
    with pytest.raises(TypeError, match="item 1"):
        encoder.encode(["ok", None])
    with pytest.raises(ValueError, match="at least one"):
        encoder.encode([])
    partial = tmp_path / "model"
    shutil.copytree(text_model_dir, partial)
    shutil.rmtree(partial / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"text_encoder_2/ not found .*official layout"):
        FluxTextEncoder.from_pretrained(partial)
