"""Loading the modules of :meth:`pyramid_dit.pipeline.PyramidFlowPipeline.from_pretrained` from the official model
folder (``rain1011/pyramid-flow-miniflux`` / ``-sd3`` layout), optionally with a finetuned DiT.

Kept apart from the sampler so that the question "which DiT folder does this command use" has one answer
(:func:`resolve_dit_folder`), shared by the loader and by ``tools/generate.py``, which reads that folder's training
record (:mod:`pyramid_dit.training_record`) before anything is loaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from pyramid_dit.device import resolve_device

PathLike = Union[str, os.PathLike]


class LoadedModules(NamedTuple):
    dit: nn.Module
    vae: Optional[nn.Module]
    text_encoder: Optional[nn.Module]
    device: torch.device
    dtype: torch.dtype


def resolve_dit_folder(model_path: PathLike, variant: str, dit_path: Optional[PathLike] = None) -> Path:
    """The DiT folder a run uses: ``dit_path`` (a finetuned export) when given, else ``model_path / variant``.
    Raises ``FileNotFoundError`` naming what is missing (and the variants that exist)."""
    model_path = Path(model_path)
    if dit_path is not None:
        folder = Path(dit_path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"dit_path {folder} has no config.json; point it at a DiT folder "
                                    "exported by the trainer (config.json + diffusion_pytorch_model.safetensors)")
        return folder
    folder = model_path / variant
    if not (folder / "config.json").is_file():
        found = sorted(p.name for p in model_path.glob("diffusion_transformer_*") if p.is_dir())
        raise FileNotFoundError(f"DiT variant folder {folder} (config.json) not found; variants in "
                                f"{model_path}: {found or 'none'}")
    return folder


def load_modules(model_path: PathLike, *, variant: str, dit_path: Optional[PathLike], dit_weight: Optional[PathLike],
                 device: Union[str, torch.device], lora_path: Optional[PathLike] = None, lora_scale: float = 1.0, dtype: Optional[torch.dtype], cpu_offload: bool,
                 load_text_encoder: bool, load_vae: bool, model_name: str) -> LoadedModules:
    """DiT (finite weights checked), VAE and text encoder in eval mode, frozen; on ``device`` unless
    ``cpu_offload``. See ``PyramidFlowPipeline.from_pretrained`` for the arguments."""
    from pyramid_dit.kinds import get_kind
    from pyramid_dit.weights import check_finite_weights, load_dit_weights

    kind = get_kind(model_name)
    model_path = Path(model_path)
    device = resolve_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if cpu_offload and device.type != "cuda":
        raise ValueError("cpu_offload moves modules between the CPU and a CUDA device; it needs device='cuda'")
    if dit_path is not None and dit_weight is not None:
        raise ValueError("give either dit_path (a finetuned DiT folder) or dit_weight (a state-dict file), "
                         "not both")
    if not model_path.is_dir():
        raise FileNotFoundError(f"model folder {model_path} does not exist; download {kind.hub_repo} there, "
                                f"or build a tiny one with tools/build_tiny_checkpoint.py --kind {kind.name}")

    dit_folder = resolve_dit_folder(model_path, variant, dit_path)
    dit = kind.dit().from_pretrained(dit_folder, torch_dtype=dtype)
    if dit_weight is not None:
        load_dit_weights(dit, dit_weight)  # refuses NaN / inf tensors, naming them
    else:
        check_finite_weights(dit, str(dit_folder))
    if lora_path is not None:
        from pyramid_dit.lora import load_adapter

        load_adapter(dit, lora_path, scale=lora_scale)  # peft's layers, in the base layers' dtype, not merged
    dit.requires_grad_(False).eval()

    vae = None
    if load_vae:
        from video_vae.modeling_causal_vae import CausalVideoVAE

        vae_folder = model_path / "causal_video_vae"
        if not (vae_folder / "config.json").is_file():
            raise FileNotFoundError(f"VAE folder {vae_folder} (config.json) not found in the model folder")
        vae = CausalVideoVAE.from_pretrained(vae_folder, torch_dtype=dtype).requires_grad_(False).eval()

    text_encoder = kind.load_text_encoder(model_path, torch_dtype=dtype) if load_text_encoder else None
    if not cpu_offload:
        for module in (dit, vae, text_encoder):
            if module is not None:
                module.to(device)
    return LoadedModules(dit, vae, text_encoder, device, dtype)
