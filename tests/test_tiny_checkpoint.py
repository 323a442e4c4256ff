"""tools/build_tiny_checkpoint.py: layout, determinism, loading, refusal to overwrite, usable tokenizers."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tools.build_tiny_checkpoint import (
    TRANSFORMER_SUBFOLDERS,
    build_clip_tokenizer,
    build_t5_tokenizer,
    build_text_components,
    build_tiny_checkpoint,
)
from tools.tiny_tokenizers import CAPTION_WORDS

REPO_ROOT = Path(__file__).resolve().parents[1]
CAPTION = "a red square moving left"

EXPECTED_FILES = {
    "causal_video_vae": {"config.json", "diffusion_pytorch_model.safetensors"},
    **{name: {"config.json", "diffusion_pytorch_model.safetensors"} for name in TRANSFORMER_SUBFOLDERS},
    "text_encoder": {"config.json", "model.safetensors"},
    "text_encoder_2": {"config.json", "model.safetensors"},
    "tokenizer": {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"},
    "tokenizer_2": {"tokenizer.json", "tokenizer_config.json"},
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# Text side only (no DiT / VAE needed)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    return build_text_components(tmp_path_factory.mktemp("tiny_text"), seed=0)


def test_tokenizers_map_captions_to_known_tokens(text_dir):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(text_dir / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(text_dir / "tokenizer_2")
    words = CAPTION.split()
    # One whole-word token per word, plus the special tokens.
    assert clip.convert_ids_to_tokens(clip(CAPTION).input_ids) == (
        ["<|startoftext|>", *(w + "</w>" for w in words), "<|endoftext|>"])
    assert t5.convert_ids_to_tokens(t5(CAPTION).input_ids) == [*("▁" + w for w in words), "</s>"]

    caption = "A cinematic aerial shot of the ocean waves at sunset, slow motion. Two dogs running on the beach!"
    t5_ids = t5(caption).input_ids
    assert t5.unk_token_id not in t5_ids
    assert len(t5_ids) <= len(caption.split()) + 6  # whole words (+ a few punctuation marks and </s>)
    clip_ids = clip(caption).input_ids
    assert len(clip_ids) <= len(caption.split()) + 8
    # Words outside the list still tokenize (into pieces), never into a run of unknowns.
    assert t5.unk_token_id not in t5("Zebras gallop").input_ids
    assert clip.unk_token_id not in clip("zebras gallop").input_ids[1:-1]


def test_tokenizer_special_ids_inside_vocab(text_dir):
    from transformers import CLIPTextConfig, T5Config

    clip = build_clip_tokenizer()
    clip_config = CLIPTextConfig.from_pretrained(text_dir / "text_encoder")
    assert clip_config.bos_token_id == clip.bos_token_id and clip_config.eos_token_id == clip.eos_token_id
    assert clip.eos_token_id == clip_config.vocab_size - 1  # largest id: legacy argmax pooling agrees too
    assert clip.pad_token_id == clip.eos_token_id and clip.model_max_length == 77
    t5 = build_t5_tokenizer()
    t5_config = T5Config.from_pretrained(text_dir / "text_encoder_2")
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5_config.vocab_size == len(t5)


def test_clip_pools_the_end_of_text_state(text_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(text_dir / "tokenizer")
    clip = CLIPTextModel.from_pretrained(text_dir / "text_encoder").eval()
    ids = tok([CAPTION, "a cat", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = clip(ids)
    eos_pos = torch.tensor([len(CAPTION.split()) + 1, 3, 1])
    assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(3), eos_pos])


def test_clip_weights_carry_the_released_key_names(text_dir):
    # transformers 4.x loads CLIPTextModel only from "text_model."-prefixed keys (the released layout); without the
    # prefix the weights would silently stay random there.
    from transformers import CLIPTextModel

    stored = load_file(str(text_dir / "text_encoder" / "model.safetensors"))
    assert stored and all(key.startswith("text_model.") for key in stored)
    model, info = CLIPTextModel.from_pretrained(text_dir / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded = model.state_dict()
    for key, value in stored.items():
        name = key if key in loaded else key[len("text_model."):]
        assert torch.equal(loaded[name], value), key


_OLDEST_TRANSFORMERS_SCRIPT = """
import sys, torch, transformers
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
root, caption, out = sys.argv[1:]
clip, clip_info = CLIPTextModel.from_pretrained(root + "/text_encoder", output_loading_info=True)
t5, t5_info = T5EncoderModel.from_pretrained(root + "/text_encoder_2", output_loading_info=True)
for name, info in (("text_encoder", clip_info), ("text_encoder_2", t5_info)):
    bad = info["missing_keys"] + info["unexpected_keys"]
    assert not bad, f"transformers {transformers.__version__} {name}: {len(bad)} keys do not match: {bad[:4]}"
with torch.no_grad():
    pooled = clip(CLIPTokenizer.from_pretrained(root + "/tokenizer")([caption], return_tensors="pt").input_ids).pooler_output
    seq = t5(T5TokenizerFast.from_pretrained(root + "/tokenizer_2")([caption], return_tensors="pt").input_ids).last_hidden_state
save_file({"pooled": pooled.contiguous(), "seq": seq.contiguous()}, out, metadata={"version": transformers.__version__})
"""


def test_text_encoders_load_with_the_oldest_supported_transformers(text_dir, tmp_path):
    """The oldest transformers requirements.txt allows (4.44, installed beside ours by .ci/run) loads the tiny text
    encoders with every key matched and computes what the installed version computes."""
    import os

    from safetensors import safe_open
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    oldest = os.environ.get("PYRAMID_OLDEST_TRANSFORMERS")
    if not oldest:
        pytest.skip("PYRAMID_OLDEST_TRANSFORMERS is not set (.ci/run installs transformers 4.44.2 there)")
    out = tmp_path / "oldest.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([oldest, str(REPO_ROOT)])}
    result = subprocess.run([sys.executable, "-c", _OLDEST_TRANSFORMERS_SCRIPT, str(text_dir), CAPTION, str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["version"] == "4.44.2"
        old = {k: f.get_tensor(k) for k in f.keys()}
    with torch.no_grad():
        clip = CLIPTextModel.from_pretrained(text_dir / "text_encoder").eval()
        pooled = clip(CLIPTokenizer.from_pretrained(text_dir / "tokenizer")([CAPTION], return_tensors="pt").input_ids)
        t5 = T5EncoderModel.from_pretrained(text_dir / "text_encoder_2").eval()
        seq = t5(T5TokenizerFast.from_pretrained(text_dir / "tokenizer_2")([CAPTION], return_tensors="pt").input_ids)
    torch.testing.assert_close(old["pooled"], pooled.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(old["seq"], seq.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_clip_vocab_files_match_tokenizer_json(text_dir, tmp_path):
    """vocab.json + merges.txt (what transformers 4.x's slow CLIPTokenizer reads) encode like tokenizer.json."""
    from transformers import CLIPTokenizer

    legacy = tmp_path / "tokenizer"
    legacy.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (legacy / name).write_bytes((text_dir / "tokenizer" / name).read_bytes())
    fast = CLIPTokenizer.from_pretrained(text_dir / "tokenizer")
    slow = CLIPTokenizer.from_pretrained(legacy)
    for text in (CAPTION, "Zebras gallop, 42 times!"):
        assert fast(text).input_ids == slow(text).input_ids


def test_caption_words_are_valid():
    assert all(w.isascii() and w.isalpha() and w.islower() for w in CAPTION_WORDS)
    with pytest.raises(ValueError, match="lowercase ASCII"):
        build_clip_tokenizer(["Red"])


# ---------------------------------------------------------------------------------------------------------------
# Whole model folder
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """The same seed built twice: in this process, and through the CLI in a fresh one (other hash seeds)."""
    root = tmp_path_factory.mktemp("tiny_ckpt")
    start = time.perf_counter()
    first = build_tiny_checkpoint(root / "a", seed=0)
    print(f"\nbuild_tiny_checkpoint: {time.perf_counter() - start:.2f} s (in process, imports warm)")
    second = root / "b"
    (second).mkdir()  # an existing empty folder is fine
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "build_tiny_checkpoint.py"),
                             "--out", str(second), "--seed", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout.strip().splitlines()[-1], "(CLI, including imports)")
    return first, second


def test_same_seed_gives_identical_files(built):
    first, second = built
    a, b = _files(first), _files(second)
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"files differ between two builds with the same seed: {different}"


def test_official_layout(built):
    root = built[0]
    subfolders = {p.name for p in root.iterdir() if p.is_dir()}
    assert subfolders == set(EXPECTED_FILES)
    for name, files in EXPECTED_FILES.items():
        present = {p.name for p in (root / name).iterdir()}
        assert files <= present, f"{name}/ lacks {files - present}"
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    unreadable = [str(p) for p in root.rglob("*") if p.stat().st_mode & 0o444 != 0o444]
    assert not unreadable, f"not world-readable: {unreadable}"


def test_components_load_like_the_released_folders(built):
    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    from pyramid_dit.text_encoder import FluxTextEncoder
    from video_vae.modeling_causal_vae import CausalVideoVAE

    root = built[0]
    text = FluxTextEncoder.from_pretrained(root)
    vae = CausalVideoVAE.from_pretrained(root / "causal_video_vae")
    assert vae.config.encoder_out_channels == 16 and vae.config.downsample_scale == 8

    weights = {}
    for subfolder in TRANSFORMER_SUBFOLDERS:
        dit = PyramidFluxTransformer.from_pretrained(root, subfolder=subfolder)
        assert dit.config.joint_attention_dim == text.text_encoder_2.config.d_model
        assert dit.config.pooled_projection_dim == text.text_encoder.config.hidden_size
        saved = {k: v.clone() for k, v in load_file(root / subfolder / "diffusion_pytorch_model.safetensors").items()}
        state = dit.state_dict()
        assert set(saved) <= set(state)
        for key, value in saved.items():
            assert torch.equal(state[key], value), key
            assert value.abs().max() > 0, f"{subfolder}/{key} is all zeros: the random init should redraw it"
        weights[subfolder] = saved
    first, second = (weights[s] for s in TRANSFORMER_SUBFOLDERS[:2])
    assert any(not torch.equal(first[k], second[k]) for k in first), "384p and 768p weights should differ"

    # The parts fit together: text features -> DiT -> VAE decode, with non-trivial outputs.
    features = text.encode([CAPTION])
    latent = torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (pred,) = dit.eval()(sample=[[latent]], encoder_hidden_states=features.prompt_embeds,
                              encoder_attention_mask=features.prompt_attention_mask,
                              pooled_projections=features.pooled_prompt_embeds, timestep_ratio=torch.tensor([500.0]))
        video = vae.eval().decode(pred).sample
    assert pred.shape == latent.shape and torch.isfinite(pred).all() and pred.std() > 0.01
    assert video.shape == (1, 3, 1, 32, 48) and torch.isfinite(video).all() and video.std() > 0.01


def test_refuses_to_overwrite_unless_asked(built, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_tiny_checkpoint(target, seed=0)
    assert (target / "keep.txt").read_text() == "user data"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]

    build_tiny_checkpoint(target, seed=0, overwrite=True)
    assert not (target / "keep.txt").exists()
    assert _files(target) == _files(built[0])
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "temporary folders left behind"
