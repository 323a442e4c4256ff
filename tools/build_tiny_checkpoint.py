"""Build a tiny, randomly initialised Pyramid Flow (miniFLUX) model folder.

The folder has the layout of the released ``rain1011/pyramid-flow-miniflux`` checkpoint, so everything that loads
the real model (``from_pretrained`` on each subfolder) loads this one too, in seconds and on a CPU::

    DIR/causal_video_vae/               CausalVideoVAE
    DIR/diffusion_transformer_384p/     PyramidFluxTransformer
    DIR/diffusion_transformer_768p/     PyramidFluxTransformer (same shapes, other weights)
    DIR/diffusion_transformer_image/    PyramidFluxTransformer (same shapes, other weights)
    DIR/text_encoder/    DIR/tokenizer/     CLIPTextModel + CLIPTokenizer (byte-level BPE)
    DIR/text_encoder_2/  DIR/tokenizer_2/   T5EncoderModel + T5TokenizerFast (Unigram)

The weights are random and the output is meaningless; the point is exercising training and inference code paths
for real. The tokenizers are built offline from a small list of caption words, so ordinary English captions map
to mostly known ids instead of a column of unknown tokens.

With ``--kind pyramid_mmdit`` it writes the layout of ``rain1011/pyramid-flow-sd3`` instead: the VAE,
``diffusion_transformer_384p/`` and ``_768p/`` holding ``PyramidDiffusionMMDiT``, and three text encoders —
``text_encoder/`` + ``tokenizer/`` (CLIP-L) and ``text_encoder_2/`` + ``tokenizer_2/`` (CLIP-G), both
``CLIPTextModelWithProjection``, and ``text_encoder_3/`` + ``tokenizer_3/`` (T5).

Usage: ``python tools/build_tiny_checkpoint.py --out DIR [--kind pyramid_flux|pyramid_mmdit] [--seed 0]
[--overwrite]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tools.tiny_tokenizers import (
    CLIP_MAX_LENGTH,
    _save_clip_vocab_files,
    build_clip_tokenizer,
    build_t5_tokenizer,
)

# Widths the DiT's text projections must match: pooled CLIP width and T5 width.
CLIP_HIDDEN_SIZE = 24
T5_D_MODEL = 32

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,  # as in the released config; the model patchifies 2x2 internally
    "in_channels": 64,  # 16 latent channels x 2x2 patch
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": T5_D_MODEL,
    "pooled_projection_dim": CLIP_HIDDEN_SIZE,
    "axes_dims_rope": [4, 6, 6],  # sums to attention_head_dim
    "use_flash_attn": False,
    "use_temporal_causal": True,
    "interp_condition_pos": True,
    "use_gradient_checkpointing": False,
    "gradient_checkpointing_ratio": 0.6,
}

VAE_CONFIG: dict[str, Any] = {
    "encoder_in_channels": 3,
    "encoder_out_channels": 16,
    "encoder_layers_per_block": [1, 1, 1, 1],
    "encoder_down_block_types": ["DownEncoderBlockCausal3D"] * 4,
    "encoder_block_out_channels": [8, 16, 16, 16],
    "encoder_spatial_down_sample": [True, True, True, False],
    "encoder_temporal_down_sample": [True, True, True, False],
    "encoder_block_dropout": [0.0] * 4,
    "encoder_act_fn": "silu",
    "encoder_norm_num_groups": 4,
    "encoder_double_z": True,
    "encoder_type": "causal_vae_conv",
    "decoder_in_channels": 16,
    "decoder_out_channels": 3,
    "decoder_layers_per_block": [2, 2, 2, 2],
    "decoder_up_block_types": ["UpDecoderBlockCausal3D"] * 4,
    "decoder_block_out_channels": [8, 16, 16, 16],
    "decoder_spatial_up_sample": [True, True, True, False],
    "decoder_temporal_up_sample": [True, True, True, False],
    "decoder_block_dropout": [0.0] * 4,
    "decoder_act_fn": "silu",
    "decoder_norm_num_groups": 4,
    "decoder_type": "causal_vae_conv",
    "add_post_quant_conv": True,
    "interpolate": False,
    "downsample_scale": 8,
    "sample_size": 256,
    "scaling_factor": 0.13025,
}

# SD3 kind: CLIP-L and CLIP-G projected widths add up to the DiT's pooled width.
SD3_CLIP_PROJECTIONS = {"text_encoder": (CLIP_HIDDEN_SIZE, 8), "text_encoder_2": (32, 16)}  # (hidden, projection)
MMDIT_TRANSFORMER_CONFIG: dict[str, Any] = {  # the golden mmdit_tiny geometry, with the pipeline's overrides
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "caption_projection_dim": 32,
    "pooled_projection_dim": sum(proj for _, proj in SD3_CLIP_PROJECTIONS.values()),
    "pos_embed_max_size": 64,  # tokens per side: up to 1024x1024 pixels
    "max_num_frames": 200,
    "qk_norm": "rms_norm",
    "pos_embed_type": "sincos",
    "temp_pos_embed_type": "rope",
    "joint_attention_dim": T5_D_MODEL,
    "use_gradient_checkpointing": False,
    "use_flash_attn": False,
    "use_temporal_causal": True,
    "use_t5_mask": True,
    "add_temp_pos_embed": True,
    "interp_condition_pos": True,
    "gradient_checkpointing_ratio": 0.6,
}
MMDIT_TRANSFORMER_SUBFOLDERS: tuple[str, ...] = ("diffusion_transformer_384p", "diffusion_transformer_768p")
KINDS: tuple[str, ...] = ("pyramid_flux", "pyramid_mmdit")

TRANSFORMER_SUBFOLDERS: tuple[str, ...] = (
    "diffusion_transformer_384p",
    "diffusion_transformer_768p",
    "diffusion_transformer_image",
)
TEXT_SUBFOLDERS: tuple[str, ...] = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

# Each component draws from its own stream, so adding a component never changes the others' weights.
_SEED_OFFSETS = {
    "text_encoder": 1,
    "text_encoder_2": 2,
    "causal_video_vae": 3,
    "diffusion_transformer_384p": 4,
    "diffusion_transformer_768p": 5,
    "diffusion_transformer_image": 6,
    "text_encoder_3": 7,
}
_SEED_STRIDE = 1000

_README = """# Tiny random Pyramid Flow ({kind}) checkpoint

Written by `tools/build_tiny_checkpoint.py --kind {kind}` (seed {seed}). Same folder layout as {repo},
random weights, tiny widths: for tests and smoke runs only; it generates noise.
"""
_REPOS = {"pyramid_flux": "rain1011/pyramid-flow-miniflux", "pyramid_mmdit": "rain1011/pyramid-flow-sd3"}


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


@torch.no_grad()
def randomize_parameters_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Redraw every parameter so that no branch is trivially zero and activations stay O(1).

    Models zero-initialise some layers (adaLN modulation, output projections) so that training starts from an
    identity; a test checkpoint built that way predicts zeros and hides bugs. Here: matrices and kernels
    N(0, 1/fan_in) with fan_in = all dimensions but the first; normalisation scales 1 + 0.1 N(0, 1); biases
    and other vectors 0.1 N(0, 1). Buffers are left as constructed.
    """
    for _, module in sorted(model.named_modules(), key=lambda item: item[0]):
        for name, param in sorted(module.named_parameters(recurse=False), key=lambda item: item[0]):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim >= 2:
                value = noise / param[0].numel() ** 0.5
            elif name == "weight" and not isinstance(module, _WEIGHT_LAYERS):
                value = 1.0 + 0.1 * noise  # a norm's scale
            else:
                value = 0.1 * noise
            param.copy_(value.to(param.dtype))
    return model


def _generator(seed: int, component: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * _SEED_STRIDE + _SEED_OFFSETS[component])


def _construct(factory, *args, **kwargs):
    """Build a model without consuming the caller's global RNG (library inits draw from it; we redraw anyway)."""
    with torch.random.fork_rng(devices=[]):
        return factory(*args, **kwargs)


# The released CLIP text encoder names its weights "text_model.<...>". transformers 5 saves a CLIPTextModel without
# that prefix and loads either form; transformers 4.x loads only the prefixed form (the other one silently stays
# random: 36 missing + 36 unexpected keys). We write the released form, which every supported version loads.
CLIP_KEY_PREFIX = "text_model."


def _save_clip_text_encoder(clip: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    clip.save_pretrained(folder)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    if not all(key.startswith(CLIP_KEY_PREFIX) for key in state):
        state = {key if key.startswith(CLIP_KEY_PREFIX) else CLIP_KEY_PREFIX + key: value
                 for key, value in state.items()}
        save_file(state, str(weights), metadata={"format": "pt"})


def build_text_components(out_dir: str | Path, seed: int = 0) -> Path:
    """Write ``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``, ``tokenizer_2/`` into ``out_dir``.

    Not atomic on its own (``build_tiny_checkpoint`` calls it on a temporary folder); tests that need only the
    text side use it directly.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    clip_tokenizer = build_clip_tokenizer()
    clip_tokenizer.save_pretrained(out_dir / "tokenizer")
    _save_clip_vocab_files(clip_tokenizer, out_dir / "tokenizer")
    clip_config = CLIPTextConfig(
        vocab_size=len(clip_tokenizer),
        hidden_size=CLIP_HIDDEN_SIZE,
        intermediate_size=4 * CLIP_HIDDEN_SIZE,
        projection_dim=CLIP_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",  # as CLIP ViT-L/14
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    clip = _construct(CLIPTextModel, clip_config).eval()
    randomize_parameters_(clip, _generator(seed, "text_encoder"))
    _save_clip_text_encoder(clip, out_dir / "text_encoder")

    t5_tokenizer = build_t5_tokenizer()
    t5_tokenizer.save_pretrained(out_dir / "tokenizer_2")
    t5_config = T5Config(
        vocab_size=len(t5_tokenizer),
        d_model=T5_D_MODEL,
        d_kv=8,
        d_ff=2 * T5_D_MODEL,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",  # as T5 v1.1 / T5-XXL
        tie_word_embeddings=False,
        pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id,
        decoder_start_token_id=t5_tokenizer.pad_token_id,
    )
    t5 = _construct(T5EncoderModel, t5_config).eval()
    randomize_parameters_(t5, _generator(seed, "text_encoder_2"))
    t5.save_pretrained(out_dir / "text_encoder_2")
    return out_dir


def build_sd3_text_components(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the SD3 kind's ``text_encoder*/`` and ``tokenizer*/`` (CLIP-L, CLIP-G, T5) into ``out_dir``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clip_tokenizer = build_clip_tokenizer()
    for folder, (hidden, projection) in SD3_CLIP_PROJECTIONS.items():
        tok_dir = out_dir / folder.replace("text_encoder", "tokenizer")
        clip_tokenizer.save_pretrained(tok_dir)
        _save_clip_vocab_files(clip_tokenizer, tok_dir)
        config = CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
            projection_dim=projection, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu" if folder == "text_encoder" else "gelu",
            bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id)
        clip = _construct(CLIPTextModelWithProjection, config).eval()
        randomize_parameters_(clip, _generator(seed, folder))
        clip.save_pretrained(out_dir / folder)

    t5_tokenizer = build_t5_tokenizer()
    t5_tokenizer.save_pretrained(out_dir / "tokenizer_3")
    t5_config = T5Config(
        vocab_size=len(t5_tokenizer), d_model=T5_D_MODEL, d_kv=8, d_ff=2 * T5_D_MODEL, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id,
        decoder_start_token_id=t5_tokenizer.pad_token_id)
    t5 = _construct(T5EncoderModel, t5_config).eval()
    randomize_parameters_(t5, _generator(seed, "text_encoder_3"))
    t5.save_pretrained(out_dir / "text_encoder_3")
    return out_dir


def _build_components(out_dir: Path, seed: int, kind: str = "pyramid_flux") -> None:
    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    from pyramid_dit.modeling_pyramid_mmdit import PyramidDiffusionMMDiT
    from video_vae.modeling_causal_vae import CausalVideoVAE

    if kind == "pyramid_mmdit":
        build_sd3_text_components(out_dir, seed)
        dit_class, dit_config, dit_subfolders = PyramidDiffusionMMDiT, MMDIT_TRANSFORMER_CONFIG, MMDIT_TRANSFORMER_SUBFOLDERS
    else:
        build_text_components(out_dir, seed)
        dit_class, dit_config, dit_subfolders = PyramidFluxTransformer, TRANSFORMER_CONFIG, TRANSFORMER_SUBFOLDERS

    vae = _construct(CausalVideoVAE, **VAE_CONFIG).eval()
    randomize_parameters_(vae, _generator(seed, "causal_video_vae"))
    vae.save_pretrained(out_dir / "causal_video_vae", safe_serialization=True)

    for subfolder in dit_subfolders:
        dit = _construct(dit_class, **dit_config).eval()
        randomize_parameters_(dit, _generator(seed, subfolder))
        dit.save_pretrained(out_dir / subfolder, safe_serialization=True)

    (out_dir / "README.md").write_text(_README.format(seed=seed, kind=kind, repo=_REPOS[kind]), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Atomic folder write
# ----------------------------------------------------------------------------------------------------------------

def _refuse_existing(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another --out path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def _honour_umask_tree(root: Path) -> None:
    """mkdtemp creates 0700 and safetensors writes 0600; give the model folder the modes the umask allows."""
    from trainer_misc.files import honour_umask

    honour_umask(root)
    for path in root.rglob("*"):
        honour_umask(path)


def build_tiny_checkpoint(out_dir: str | Path, seed: int = 0, overwrite: bool = False,
                          kind: str = "pyramid_flux") -> Path:
    """Write the tiny model folder to ``out_dir`` and return its path.

    Deterministic: the same ``seed`` gives byte-identical files. Atomic: everything is written into a temporary
    folder beside ``out_dir`` and renamed into place, so an interrupted build leaves no half-written model.
    An existing non-empty ``out_dir`` is refused unless ``overwrite`` is true.
    """
    out_dir = Path(out_dir).absolute()
    _refuse_existing(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old_dir: Path | None = None
    try:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} must be one of {KINDS}")
        _build_components(tmp_dir, seed, kind)
        _honour_umask_tree(tmp_dir)
        _refuse_existing(out_dir, overwrite)  # again: another process may have written it meanwhile
        if out_dir.is_dir() and any(out_dir.iterdir()):
            old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old_dir)
            try:
                os.replace(tmp_dir, out_dir)
            except OSError:
                os.replace(old_dir, out_dir)  # put the previous model back before reporting the failure
                raise
        else:
            if out_dir.is_dir():
                out_dir.rmdir()
            os.replace(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir)
    return out_dir


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="model folder to create")
    parser.add_argument("--kind", default="pyramid_flux", choices=KINDS,
                        help="layout: pyramid_flux (pyramid-flow-miniflux, default) or pyramid_mmdit (pyramid-flow-sd3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = build_tiny_checkpoint(args.out, seed=args.seed, overwrite=args.overwrite, kind=args.kind)
    except FileExistsError as err:
        parser.error(str(err))  # exits with status 2 and the message, no traceback
    print(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return path


if __name__ == "__main__":
    main()
