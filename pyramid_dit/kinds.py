"""The two released model kinds, and everything that depends on which one a run uses — in one place.

``MODEL_NAME=pyramid_flux`` is ``rain1011/pyramid-flow-miniflux`` (:class:`PyramidFluxTransformer`, CLIP-L + T5),
``MODEL_NAME=pyramid_mmdit`` is ``rain1011/pyramid-flow-sd3`` (:class:`PyramidDiffusionMMDiT`, CLIP-L + CLIP-G +
T5). Code that needs the DiT class, the text encoder, the latent normalisation or the folder layout asks
:func:`get_kind` instead of branching on the name. Classes are imported on first use, so this module is cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Union

import torch

from pyramid_dit.pyramid import LatentNormalization


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
        lora_targets: default LoRA target layers (``LORA_TARGETS``): module-name suffixes inside every block, the
            attention q/k/v/out projections of both streams and the MLP linears.
    """

    name: str
    hub_repo: str
    dit_class: str
    text_encoder_class: str
    text_subfolders: tuple[str, ...]
    variants: tuple[str, ...]
    normalization: LatentNormalization
    lora_targets: tuple[str, ...] = ()

    def dit(self) -> type:
        module, cls = self.dit_class.split(":")
        return getattr(import_module(module), cls)

    def text_encoder(self) -> type:
        module, cls = self.text_encoder_class.split(":")
        return getattr(import_module(module), cls)

    def load_text_encoder(self, model_path: Union[str, Path], torch_dtype: torch.dtype = torch.float32):
        """The frozen text encoder from an official model folder."""
        return self.text_encoder().from_pretrained(model_path, torch_dtype=torch_dtype)


KINDS: dict[str, ModelKind] = {
    "pyramid_flux": ModelKind(
        name="pyramid_flux",
        hub_repo="rain1011/pyramid-flow-miniflux",
        dit_class="pyramid_dit.modeling_pyramid_flux:PyramidFluxTransformer",
        text_encoder_class="pyramid_dit.text_encoder:FluxTextEncoder",
        text_subfolders=("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"),
        variants=("diffusion_transformer_384p", "diffusion_transformer_768p", "diffusion_transformer_image"),
        normalization=LatentNormalization(image_shift=-0.04, image_scale=1 / 1.8726),
        lora_targets=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                      "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                      "ff_context.net.2",
                      "proj_mlp", "proj_out"),  # the last two: MLP of the single-stream blocks
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
        lora_targets=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                      "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                      "ff_context.net.2"),
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


def kind_of_dit(dit: torch.nn.Module) -> ModelKind:
    """The kind a DiT instance belongs to (for code handed a model rather than a name)."""
    return kind_of_class_name(type(dit).__name__)
