"""The two released model kinds, and everything that depends on which one a run uses — in one place.

``MODEL_NAME=pyramid_flux`` is ``rain1011/pyramid-flow-miniflux`` (:class:`PyramidFluxTransformer`, CLIP-L + T5),
``MODEL_NAME=pyramid_mmdit`` is ``rain1011/pyramid-flow-sd3`` (:class:`PyramidDiffusionMMDiT`, CLIP-L + CLIP-G +
T5). Code that needs the DiT class, the text encoder, the latent normalisation, the released DiT's configuration or
the folder layout asks :func:`get_kind` instead of branching on the name. Classes are imported on first use and
this module imports neither torch nor diffusers, so argument checks can use it before anything heavy loads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    import torch


def _check_5d(x: "torch.Tensor") -> None:
    if x.ndim != 5:
        raise ValueError(f"latents must be [batch, channels, frames, height, width], got shape {tuple(x.shape)}")


@dataclass(frozen=True)
class LatentNormalization:
    """Affine map from VAE latents to the DiT's unit-variance latent space.

    The causal VAE encodes the first frame of a clip on its own (like an image) and later frames in temporal
    groups, and the two have different statistics, hence two (shift, scale) pairs: the image pair applies to
    frame 0 (or to a one-frame latent), the video pair to frames 1.. . Each released kind's constants are its
    :attr:`ModelKind.normalization` below.
    """

    image_shift: float
    image_scale: float
    video_shift: float = -0.2343
    video_scale: float = 1 / 3.0986

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents ``[B, C, T, H, W]`` -> DiT latents: ``(z - shift) * scale`` per frame group."""
        _check_5d(latents)
        if latents.shape[2] == 1:
            return (latents - self.image_shift) * self.image_scale
        # clone() keeps the input's memory layout, which the objective's noise draws follow (see objective.py).
        out = latents.clone()
        out[:, :, :1] = (latents[:, :, :1] - self.image_shift) * self.image_scale
        out[:, :, 1:] = (latents[:, :, 1:] - self.video_shift) * self.video_scale
        return out

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` (``z / scale + shift``), for decoding generated latents with the VAE."""
        _check_5d(latents)
        if latents.shape[2] == 1:
            return latents / self.image_scale + self.image_shift
        out = latents.clone()
        out[:, :, :1] = latents[:, :, :1] / self.image_scale + self.image_shift
        out[:, :, 1:] = latents[:, :, 1:] / self.video_scale + self.video_shift
        return out


@dataclass(frozen=True)
class ModelKind:
    """One released model kind.

    Attributes:
        name: the ``--model_name`` / ``MODEL_NAME`` value.
        hub_repo: where the released folder is downloaded from.
        dit_class: ``module:Class`` of the DiT (``config.json``'s ``_class_name`` names the same class).
        text_encoder_class: ``module:Class`` of the frozen text encoder (has ``from_pretrained(path, dtype)``).
        text_subfolders: the text encoder's tokenizer/model subfolders of the model folder.
        variants: the DiT subfolders of the released model folder.
        normalization: the latent normalisation the released DiT was trained with.
        dit_config: the released DiT's configuration (every variant of a kind has the same one): what the planner
            counts at released size without downloading anything (``tests/test_kinds.py`` checks it against the
            released checkpoints' key listings in ``tests/golden/keys``).
        lora_targets: default LoRA target layers (``LORA_TARGETS``): module-name suffixes inside every block, the
            attention q/k/v/out projections of both streams and the MLP linears.
        text_encoder_configs: the released text encoders' transformers configurations, by subfolder (the class is
            the text encoder's ``subfolders`` entry): what the planner counts when captions are encoded during
            training (``LOAD_TEXT_ENCODER=1``).
    """

    name: str
    hub_repo: str
    dit_class: str
    text_encoder_class: str
    text_subfolders: tuple[str, ...]
    variants: tuple[str, ...]
    normalization: LatentNormalization
    dit_config: dict[str, Any] = field(default_factory=dict)
    lora_targets: tuple[str, ...] = ()
    text_encoder_configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def dit(self) -> type:
        module, cls = self.dit_class.split(":")
        return getattr(import_module(module), cls)

    def text_encoder(self) -> type:
        module, cls = self.text_encoder_class.split(":")
        return getattr(import_module(module), cls)

    def load_text_encoder(self, model_path: Union[str, Path], torch_dtype: Optional["torch.dtype"] = None):
        """The frozen text encoder from an official model folder (float32 unless ``torch_dtype`` says otherwise)."""
        import torch

        return self.text_encoder().from_pretrained(model_path, torch_dtype=torch_dtype or torch.float32)


# The released text encoders (the public checkpoints both releases copy): CLIP ViT-L/14's text tower
# (openai/clip-vit-large-patch14), OpenCLIP ViT-bigG/14's (SD3's text_encoder_2) and T5 v1.1 XXL's encoder
# (google/t5-v1_1-xxl). tests/test_planner.py pins their parameter counts.
_CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768, "hidden_act": "quick_gelu"}
_CLIP_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
           "num_attention_heads": 20, "max_position_embeddings": 77, "projection_dim": 1280, "hidden_act": "gelu"}
_T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
           "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}

# The released causal video VAE (both kinds ship the same one, ``causal_video_vae/``): the class defaults except 16
# latent channels and its scaling factor; tests/golden/keys/causal_video_vae.json lists its keys.
VAE_CONFIG: dict[str, Any] = {"encoder_out_channels": 16, "decoder_in_channels": 16, "scaling_factor": 0.13025,
                              "interpolate": False}

KINDS: dict[str, ModelKind] = {
    "pyramid_flux": ModelKind(
        name="pyramid_flux",
        hub_repo="rain1011/pyramid-flow-miniflux",
        dit_class="pyramid_dit.modeling_pyramid_flux:PyramidFluxTransformer",
        text_encoder_class="pyramid_dit.text_encoder:FluxTextEncoder",
        text_subfolders=("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"),
        variants=("diffusion_transformer_384p", "diffusion_transformer_768p", "diffusion_transformer_image"),
        normalization=LatentNormalization(image_shift=-0.04, image_scale=1 / 1.8726),
        dit_config={
            'patch_size': 1, 'in_channels': 64, 'num_layers': 8, 'num_single_layers': 16,
            'attention_head_dim': 64, 'num_attention_heads': 30, 'joint_attention_dim': 4096,
            'pooled_projection_dim': 768, 'axes_dims_rope': [16, 24, 24], 'use_flash_attn': False,
            'use_temporal_causal': True, 'interp_condition_pos': True, 'use_gradient_checkpointing': False,
            'gradient_checkpointing_ratio': 0.6},
        lora_targets=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                      "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                      "ff_context.net.2",
                      "proj_mlp", "proj_out"),  # the last two: MLP of the single-stream blocks
        text_encoder_configs={"text_encoder": _CLIP_L, "text_encoder_2": _T5_XXL},
    ),
    "pyramid_mmdit": ModelKind(
        name="pyramid_mmdit",
        hub_repo="rain1011/pyramid-flow-sd3",
        dit_class="pyramid_dit.modeling_pyramid_mmdit:PyramidDiffusionMMDiT",
        text_encoder_class="pyramid_dit.text_encoder_sd3:SD3TextEncoder",
        text_subfolders=("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3",
                         "text_encoder_3"),
        variants=("diffusion_transformer_384p", "diffusion_transformer_768p"),
        normalization=LatentNormalization(image_shift=0.1490, image_scale=1 / 1.8415),
        dit_config={
            'sample_size': 128, 'patch_size': 2, 'in_channels': 16, 'num_layers': 24, 'attention_head_dim': 64,
            'num_attention_heads': 24, 'caption_projection_dim': 1536, 'pooled_projection_dim': 2048,
            'pos_embed_max_size': 192, 'max_num_frames': 200, 'qk_norm': 'rms_norm',
            'pos_embed_type': 'sincos', 'temp_pos_embed_type': 'rope', 'joint_attention_dim': 4096,
            'use_gradient_checkpointing': False, 'use_flash_attn': False, 'use_temporal_causal': True,
            'use_t5_mask': True, 'add_temp_pos_embed': True, 'interp_condition_pos': True,
            'gradient_checkpointing_ratio': 0.6},
        lora_targets=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                      "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                      "ff_context.net.2"),
        text_encoder_configs={"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G, "text_encoder_3": _T5_XXL},
    ),
}
MODEL_NAMES: tuple[str, ...] = tuple(KINDS)


def get_kind(model_name: str) -> ModelKind:
    """The kind called ``model_name``; a clear error for anything else."""
    if model_name not in KINDS:
        raise ValueError(f"unknown model_name {model_name!r}; expected one of {', '.join(MODEL_NAMES)}")
    return KINDS[model_name]


def kind_of_class_name(class_name: str) -> ModelKind:
    """The kind whose DiT class is called ``class_name`` (a ``config.json``'s ``_class_name``)."""
    for kind in KINDS.values():
        if class_name == kind.dit_class.split(":")[1]:
            return kind
    raise ValueError(f"{class_name!r} is not a Pyramid Flow DiT of a known kind "
                     f"({', '.join(k.dit_class.split(':')[1] for k in KINDS.values())})")


def kind_of_dit(dit: "torch.nn.Module") -> ModelKind:
    """The kind a DiT instance belongs to (for code handed a model rather than a name)."""
    return kind_of_class_name(type(dit).__name__)


def kind_of_folder(dit_folder: Union[str, Path]) -> Optional[ModelKind]:
    """The kind of the DiT in ``dit_folder`` (from its ``config.json``'s ``_class_name``), or None when the folder
    holds no config or a class of neither kind. Reads one small JSON file."""
    path = Path(dit_folder) / "config.json"
    try:
        class_name = json.loads(path.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        return None
    try:
        return kind_of_class_name(class_name)
    except ValueError:
        return None
