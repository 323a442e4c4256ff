"""LoRA adapters on the DiT with peft: add them, merge them, and apply a saved adapter folder.

``add_lora`` injects peft LoRA layers into the DiT in place (the class and its config stay the same; peft freezes
every base parameter, so the optimizer, the EMA and the gradient reduction only see the adapters). A state dict of
such a model has peft's keys (``<layer>.base_layer.weight``, ``<layer>.lora_A.default.weight``, ...);
``merged_state_dict`` turns it back into the official keys with ``W = W0 + (alpha / rank) * B @ A``, which is what
validation samples and ``export/transformer`` use. The trainer writes the adapter as peft's
``PeftModel.save_pretrained`` does (``adapter_config.json`` + ``adapter_model.safetensors`` with
``base_model.model.`` keys; ``trainer_misc.state.export.save_adapter``); ``load_adapter`` applies such a folder to
any DiT without merging (generation's ``--lora_path``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from pyramid_dit.tensor_files import load_tensor_file

__all__ = ["ADAPTER", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraSettings", "adapter_state_dict", "add_lora",
           "has_lora", "load_adapter", "lora_scalings", "merged_state_dict", "target_pattern"]

ADAPTER = "default"
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def target_pattern(targets: Sequence[str]) -> str:
    """peft ``target_modules`` regex: the named layers inside every (single or joint) transformer block only, so a
    suffix like ``proj_out`` never matches the model's final projection."""
    if not targets:
        raise ValueError("LORA_TARGETS is empty: name at least one layer (e.g. attn.to_q)")
    return r".*blocks\.\d+\.(?:" + "|".join(re.escape(t) for t in targets) + ")"


@dataclass(frozen=True)
class LoraSettings:
    """``LORA_RANK`` (> 0), ``LORA_ALPHA`` (scale = alpha / rank), ``LORA_TARGETS``, ``LORA_DROPOUT``."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=target_pattern(self.targets),
                          lora_dropout=self.dropout, bias="none", init_lora_weights=True)


def _lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def has_lora(module: nn.Module) -> bool:
    return any(name.endswith(".lora_A") for name, _ in module.named_modules())


def add_lora(dit: nn.Module, settings: LoraSettings, seed: int = 0) -> dict[str, int]:
    """Inject adapters in place; returns ``{"adapted_layers", "trainable", "frozen"}`` parameter counts.

    peft draws the ``A`` matrices from torch's global generator; they are drawn here from ``seed`` (the global
    stream is left as it was), so every launch of a run, and every process count, starts from the same adapters.
    """
    from peft import inject_adapter_in_model

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_adapter_in_model(settings.peft_config(), dit, adapter_name=ADAPTER)
    except ValueError as e:
        raise ValueError(f"LORA_TARGETS {list(settings.targets)} matched no layer of {type(dit).__name__}: {e}") from None
    trainable = sum(p.numel() for p in dit.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in dit.parameters() if not p.requires_grad)
    bad = [n for n, p in dit.named_parameters() if p.requires_grad and ".lora_" not in n]
    if bad:
        raise RuntimeError(f"LoRA left base parameters trainable: {bad[:5]}")
    return {"adapted_layers": len(_lora_layers(dit)), "trainable": trainable, "frozen": frozen}


def lora_scalings(module: nn.Module) -> dict[str, float]:
    """Layer name -> ``alpha / rank`` (times any scale set on it)."""
    return {name: float(layer.scaling[ADAPTER]) for name, layer in _lora_layers(module).items()}


def merged_state_dict(state: Mapping[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Official-key state dict with every adapter merged: ``W0 + scaling * B @ A`` (computed in fp32)."""
    scalings = lora_scalings(module)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        name = key.replace(".base_layer.", ".")
        layer = key.split(".base_layer.")[0] if ".base_layer." in key else None
        if layer is not None and key.endswith(".base_layer.weight"):
            a = state[f"{layer}.lora_A.{ADAPTER}.weight"].float()
            b = state[f"{layer}.lora_B.{ADAPTER}.weight"].float()
            value = (value.float() + scalings[layer] * (b @ a)).to(value.dtype)
        out[name] = value
    return out


def adapter_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a peft-keyed state dict, with the keys peft's ``save_pretrained`` writes."""
    return {PEFT_PREFIX + k.replace(f".{ADAPTER}.", "."): v.contiguous() for k, v in state.items()
            if ".lora_A." in k or ".lora_B." in k}


def load_adapter(dit: nn.Module, path: os.PathLike | str, scale: float = 1.0) -> int:
    """Apply the adapter folder ``path`` to ``dit`` without merging, output scaled by ``scale``; returns layers."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    path = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"--lora_path {path}: no {name} (expected a folder written to export/lora)")
    config = LoraConfig.from_pretrained(str(path))
    inject_adapter_in_model(config, dit, adapter_name=ADAPTER)
    raw = load_tensor_file(path / ADAPTER_WEIGHTS)
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in raw.items()}
    result = set_peft_model_state_dict(dit, state, adapter_name=ADAPTER)
    if result.unexpected_keys:
        raise KeyError(f"{path / ADAPTER_WEIGHTS}: adapter keys not in {type(dit).__name__}: "
                       f"{sorted(result.unexpected_keys)[:5]}; was it trained for another model kind?")
    layers = _lora_layers(dit)
    missing = [n for n in layers if f"{n}.lora_A.weight" not in state]
    if missing:
        raise KeyError(f"{path / ADAPTER_WEIGHTS}: no weights for adapted layers {missing[:5]}")
    for layer in layers.values():
        layer.set_scale(ADAPTER, scale)
    return len(layers)
