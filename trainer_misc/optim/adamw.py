"""AdamW with decay / no-decay parameter groups, and the learning-rate schedules of the reference trainer.

Weight decay follows the reference (``get_parameter_groups``): a parameter is exempt from decay when it is 1-D (norm
scales, biases, embeddings' scalars), when its name ends in ``.bias``, or when the model lists it in
``no_weight_decay()``. Frozen parameters (``requires_grad=False``) are left out of the optimizer.

The schedules are pure functions of the optimizer step, so the scheduler "state" in a checkpoint is just the step
number, and a resumed run gets the same values with no object to restore.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

__all__ = ["LRSchedule", "build_adamw", "split_decay_groups"]

logger = logging.getLogger(__name__)


def split_decay_groups(model: nn.Module, weight_decay: float,
                       skip_names: Optional[Iterable[str]] = None) -> list[dict]:
    """Two AdamW parameter groups, ``decay`` first then ``no_decay``; empty groups are dropped.

    Each group carries a ``names`` list (parameter names in the same order as ``params``) for logging and checks;
    torch keeps extra group keys untouched.
    """
    if skip_names is None:
        skip_names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    skip = set(skip_names)
    groups = {"decay": {"params": [], "names": [], "weight_decay": weight_decay},
              "no_decay": {"params": [], "names": [], "weight_decay": 0.0}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "no_decay" if (param.ndim <= 1 or name.endswith(".bias") or name in skip) else "decay"
        groups[kind]["params"].append(param)
        groups[kind]["names"].append(name)
    out = [g for g in groups.values() if g["params"]]
    if not out:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    return out


def build_adamw(model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 1e-4, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over ``split_decay_groups(model, weight_decay)`` (reference flags: --opt_beta1/2, --opt_eps,
    --weight_decay).

    ``cpu_offload`` (``OFFLOAD=1``): DeepSpeed's ``DeepSpeedCPUAdam`` in AdamW mode, the same update computed by a
    vectorised C++ kernel on the CPU-resident fp32 partitions; DeepSpeed refuses a torch optimizer with optimizer
    offload. Its C++ op is compiled on first use (g++ and ninja; about 2.5 minutes on 2 cores, then cached in
    ``~/.cache/torch_extensions``); a failed build is reported with the way out.
    """
    groups = split_decay_groups(model, weight_decay)
    if not cpu_offload:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0)
    return _cpu_adamw(groups, lr, tuple(betas), eps)


def _cpu_adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    import subprocess

    from deepspeed.ops.op_builder import CPUAdamBuilder

    builder = CPUAdamBuilder()
    if not builder.is_compatible(verbose=False):
        raise RuntimeError("OFFLOAD=1 needs DeepSpeed's CPU Adam op, which DeepSpeed reports as not buildable here "
                           "(see `ds_report`); set OFFLOAD=0")
    # The first use compiles a C++ op (minutes on a small CPU, silent otherwise); later runs load it from the cache.
    logger.info("OFFLOAD=1: loading DeepSpeed's CPU Adam op (the first time it is compiled with g++: about 2-3 min "
                "on 2 cores, then cached under %s)", os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions"))
    try:
        builder.load(verbose=False)
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"OFFLOAD=1: building DeepSpeed's CPU Adam op failed ({type(e).__name__}: {e}); it needs "
                           "g++ and ninja (pip install ninja), or a DeepSpeed installed with DS_BUILD_CPU_ADAM=1; "
                           "or set OFFLOAD=0") from e
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    # weight_decay lives in the groups (0 for no_decay); adamw_mode: decoupled decay, as torch.optim.AdamW.
    return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, adamw_mode=True)


_SCHEDULES = ("constant", "constant_with_warmup", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate at each optimizer step ``s`` (0-based; the value used *for* step ``s``).

    * ``constant_with_warmup``: ``linspace(warmup_start_lr, base_lr, warmup_steps)[s]`` during warmup, then
      ``base_lr``; reference default ``warmup_start_lr = 1e-6``.
    * ``cosine``: the same linear warmup (reference default start 0), then
      ``min_lr + (base_lr - min_lr) * (1 + cos(pi * i / (total_steps - warmup_steps))) / 2`` with
      ``i = s - warmup_steps``.
    * ``constant``: ``base_lr`` throughout.

    These are the values of the reference's ``constant_scheduler`` / ``cosine_scheduler`` arrays; steps past
    ``total_steps`` keep the last value. A warmup longer than the run (short test runs) just never completes.
    """

    kind: str
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start_lr: Optional[float] = None
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _SCHEDULES:
            raise ValueError(f"lr_scheduler must be one of {_SCHEDULES}, got {self.kind!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.kind == "cosine" and self.warmup_steps >= self.total_steps:
            raise ValueError(f"cosine schedule needs total_steps ({self.total_steps}) > warmup_steps "
                             f"({self.warmup_steps})")

    @property
    def start_lr(self) -> float:
        if self.warmup_start_lr is not None:
            return self.warmup_start_lr
        return 0.0 if self.kind == "cosine" else 1e-6

    def __call__(self, step: int) -> float:
        step = min(max(int(step), 0), self.total_steps - 1)
        if self.kind == "constant":
            return self.base_lr
        warm = self.warmup_steps
        if step < warm:
            if warm == 1:
                return self.start_lr
            if step == warm - 1:  # numpy's linspace pins the last point to the stop value
                return self.base_lr
            return step * ((self.base_lr - self.start_lr) / (warm - 1)) + self.start_lr
        if self.kind == "constant_with_warmup":
            return self.base_lr
        i = step - warm
        span = self.total_steps - warm
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * i / span))
