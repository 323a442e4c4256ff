"""What a finished (or validating) run hands over: the trained DiT, its EMA and its LoRA adapter as folders that
load with the usual ``from_pretrained`` calls.

* ``export/transformer`` (and ``transformer_ema``): a diffusers folder, ``config.json`` +
  ``diffusion_pytorch_model.safetensors`` with the official key names, written atomically (temp folder, rename);
* with LoRA, those hold the merged weights, and ``export/lora`` (``lora_ema``) the adapter in peft's format
  (``adapter_config.json`` + ``adapter_model.safetensors``), loadable by ``PeftModel.from_pretrained`` and by
  ``pyramid_dit.lora.load_adapter``.

All of it is collective: under ZeRO-3, and for the sharded EMA, the full weights are gathered to rank 0 first.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import nn

from pyramid_dit.lora import ADAPTER, ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_state_dict, merged_state_dict
from trainer_misc.files import atomic_save_safetensors, write_json_atomic
from trainer_misc.runtime.distributed import barrier

if TYPE_CHECKING:
    from trainer_misc.optim.ema import ShardedEMA
    from trainer_misc.optim.engine import TrainEngine

__all__ = ["adapter_config", "export_lora", "export_model", "export_pretrained", "gather_full_weights",
           "save_adapter"]


def _is_diffusers_model(module: nn.Module) -> bool:
    # A module can only be a diffusers ModelMixin if diffusers is already imported; checking sys.modules avoids
    # importing diffusers (seconds of CPU) just to answer "no" for other models.
    diffusers = sys.modules.get("diffusers")
    return diffusers is not None and isinstance(module, diffusers.ModelMixin)


def export_pretrained(module: nn.Module, state_dict: Mapping[str, torch.Tensor], out_dir: Path,
                      files: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``state_dict`` as a pretrained folder for ``module``'s class, atomically (temp folder, rename).

    A diffusers model (``ModelMixin``) gets what its ``save_pretrained`` writes for a single shard: ``config.json``
    plus ``diffusion_pytorch_model.safetensors`` with the state-dict key names, so ``from_pretrained`` loads it.
    (We write the two files ourselves because under ZeRO-3, and for the EMA, no module holds the full weights to
    call ``save_pretrained`` on.) Any other module gets a plain ``model.safetensors``. ``files`` (name -> JSON
    content) are written beside them, inside the temp folder, so a folder never appears without them.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if _is_diffusers_model(module):
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

        module.save_config(tmp)
        atomic_save_safetensors(state_dict, tmp / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
    else:
        atomic_save_safetensors(state_dict, tmp / "model.safetensors", metadata={"format": "pt"})
    for name, content in (files or {}).items():
        write_json_atomic(content, tmp / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def gather_full_weights(engine: "TrainEngine", ema: Optional["ShardedEMA"] = None
                        ) -> tuple[Optional[dict[str, torch.Tensor]], Optional[dict[str, torch.Tensor]]]:
    """``(model state dict, EMA state dict)`` on rank 0, ``(None, None)`` on the others. Collective.

    ZeRO-3 partitions and EMA chunks are gathered to rank 0. The EMA dict is the model's state dict with every
    EMA-tracked parameter replaced by its average, in the dtype of the model's tensor; None without ``ema``.
    """
    state = engine.full_state_dict()
    ema_full = ema.gather(comm_device=engine.device) if ema is not None else None
    if not engine.is_main:
        return None, None
    assert state is not None
    if ema_full is None:
        return state, None
    missing = sorted(set(ema_full) - set(state))
    if missing:
        raise KeyError(f"EMA parameters not in the model's state dict: {missing[:5]}")
    return state, {k: ema_full[k].to(v.dtype) if k in ema_full else v for k, v in state.items()}


def export_model(engine: "TrainEngine", out_dir: Path, ema: Optional["ShardedEMA"] = None,
                 dtype: Optional[torch.dtype] = None, files: Optional[Mapping[str, Any]] = None) -> list[Path]:
    """Export the trained model to ``out_dir`` and, with ``ema``, its EMA to ``out_dir`` + ``_ema``.

    Collective (see :func:`gather_full_weights`); rank 0 writes and returns the folders, other ranks return ``[]``.
    ``dtype`` casts floating tensors of both; ``files`` go into both (see :func:`export_pretrained`).
    """
    out_dir = Path(out_dir)
    state, ema_state = gather_full_weights(engine, ema)
    written: list[Path] = []
    if engine.is_main:
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        written.append(export_pretrained(engine.module, {k: cast(v) for k, v in state.items()}, out_dir, files))
        if ema_state is not None:
            written.append(export_pretrained(engine.module, {k: cast(v) for k, v in ema_state.items()},
                                             out_dir.with_name(out_dir.name + "_ema"), files))
    barrier()
    return written


# ------------------------------------------------------------------------------------------------- LoRA

# The adapter_config.json fields written: what a LoRA run sets, nothing else. peft's own save_pretrained writes every
# field its installed version knows (peft 0.21: 17 more), and an older peft refuses a config with a field it does not
# know (``LoraConfig.__init__() got an unexpected keyword argument ...``), so an adapter saved that way loads only with
# the peft that wrote it.
ADAPTER_CONFIG_FIELDS = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias",
                         "init_lora_weights")


def adapter_config(module: nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` content of ``module``'s adapter: :data:`ADAPTER_CONFIG_FIELDS` only."""
    config = module.peft_config[ADAPTER].to_dict()
    out = {name: config[name] for name in ADAPTER_CONFIG_FIELDS}
    out["peft_type"] = str(getattr(out["peft_type"], "value", out["peft_type"]))
    if isinstance(out["target_modules"], (set, frozenset)):
        out["target_modules"] = sorted(out["target_modules"])
    return out


def save_adapter(state: Mapping[str, torch.Tensor], module: nn.Module, out_dir: Path) -> Path:
    """Write ``out_dir/adapter_config.json`` + ``adapter_model.safetensors`` atomically (temp folder, rename)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_json_atomic(adapter_config(module), tmp / ADAPTER_CONFIG)
    atomic_save_safetensors(adapter_state_dict(state), tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def export_lora(engine: "TrainEngine", export_root: Path, ema: Optional["ShardedEMA"] = None,
                dtype: Optional[torch.dtype] = None, files: Optional[Mapping[str, Any]] = None) -> list[Path]:
    """``export_root/transformer`` (merged, official keys) and ``export_root/lora`` (the adapter), plus ``_ema``
    twins with EMA. Collective, like :func:`export_model`; rank 0 writes and returns the folders. ``files``
    (name -> JSON content) go into the merged DiT folders, as :func:`export_pretrained` writes them."""
    state, ema_state = gather_full_weights(engine, ema)
    written: list[Path] = []
    if engine.is_main:
        for suffix, weights in (("", state), ("_ema", ema_state)):
            if weights is None:
                continue
            merged = merged_state_dict(weights, engine.module)
            if dtype is not None:
                merged = {k: v.to(dtype) if v.is_floating_point() else v for k, v in merged.items()}
            written.append(export_pretrained(engine.module, merged, Path(export_root) / f"transformer{suffix}",
                                             files))
            written.append(save_adapter(weights, engine.module, Path(export_root) / f"lora{suffix}"))
    barrier()
    return written
