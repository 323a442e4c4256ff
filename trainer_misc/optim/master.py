"""The fp32 master weights and AdamW moments of every trainable parameter, as the elements this rank holds, whatever
the sharding strategy: what checkpoints save and load and what the EMA averages.

Each trainable parameter is seen as a flat vector of ``numel`` elements. A rank *holds* a run of them,
``[start, start + numel)``:

* **DDP** replicates everything: the fp32 parameters are the master weights and AdamW keeps one moment per parameter.
  A rank holds all of it; for writing and averaging it takes its chunk (:func:`chunk_range`)
  so that the ranks share the work.
* **ZeRO-2** (and OFFLOAD=1) cuts each flat parameter group into equal partitions; DeepSpeed maps every parameter to
  the fragment of it inside this rank's fp32 partition (``param._hp_mapping``: where the fragment starts in the
  parameter, and views of the fp32 weights and moments). Ranks without a fragment of a parameter hold nothing of it.
* **ZeRO-3** partitions every parameter itself: rank ``r`` holds ``[r * part, (r + 1) * part)`` with
  ``part = ceil(numel / world)`` (``param.ds_tensor``), and the optimizer's fp32 copy of exactly that range.

:class:`Held` gives 1-D fp32 views of those elements in the master weights (``"fp32"``) and in each moment
(``"exp_avg"``, ``"exp_avg_sq"``), so they can be read and written in place. AdamW creates its moments at its first
step; :func:`ensure_optimizer_state` creates them (zero, at a given step count) when a resumed run needs to fill them
before that. The DeepSpeed attributes used here are the ones its own ``safe_get_full_*`` helpers use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from trainer_misc.optim.engine import TrainEngine

__all__ = ["MOMENTS", "PARTS", "Held", "chunk_range", "ensure_optimizer_state", "held_elements", "optimizer_steps",
           "set_model_weights"]

MOMENTS = ("exp_avg", "exp_avg_sq")
PARTS = ("fp32",) + MOMENTS


@dataclass
class Held:
    """Elements ``[start, start + numel)`` of trainable parameter ``name`` (full shape ``shape``) on this rank;
    ``views(part)`` returns them as a 1-D fp32 tensor sharing memory with the master weights or a moment."""

    name: str
    param: nn.Parameter
    shape: tuple[int, ...]
    start: int
    numel: int
    views: Callable[[str], torch.Tensor]

    @property
    def stop(self) -> int:
        return self.start + self.numel


def chunk_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``rank`` when ``numel`` elements are cut in ``world_size`` chunks of
    ``ceil(numel / world_size)`` (the last ones shorter or empty): how a replicated tensor is shared out."""
    size = math.ceil(numel / world_size) if numel else 0
    start = min(rank * size, numel)
    return start, min(start + size, numel)


def _full_shape(param: nn.Parameter) -> tuple[int, ...]:
    return tuple(param.ds_shape if hasattr(param, "ds_tensor") else param.shape)


def _zero_optimizer(engine: "TrainEngine"):
    return engine.optimizer.optimizer  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer


def _torch_optimizer(engine: "TrainEngine") -> torch.optim.Optimizer:
    """The optimizer whose ``state`` holds the moments: DeepSpeed's inner one over fp32 partitions, or the
    AdamW of DDP's fp32 parameters."""
    inner = engine.optimizer.optimizer
    return inner.optimizer if engine.is_deepspeed else inner


def _trainable(engine: "TrainEngine") -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def held_elements(engine: "TrainEngine", replicated: Literal["chunk", "full"] = "chunk") -> list[Held]:
    """What this rank holds of each trainable parameter (see the module docstring), every trainable parameter in
    the same order on every rank (an empty hold where a rank has none of it). ``replicated`` decides what a DDP rank
    reports of its full copy: its ``chunk`` (to write or average its share) or all of it (to load it)."""
    out: list[Held] = []
    if not engine.is_deepspeed:
        opt = _torch_optimizer(engine)
        for name, p in _trainable(engine):
            numel = p.numel()
            start, stop = chunk_range(numel, engine.rank, engine.world_size) if replicated == "chunk" else (0, numel)

            def views(part: str, p: nn.Parameter = p, start: int = start, stop: int = stop) -> torch.Tensor:
                flat = p.data.view(-1) if part == "fp32" else opt.state[p][part].view(-1)
                return flat[start:stop]

            out.append(Held(name, p, tuple(p.shape), start, stop - start, views))
        return out
    zero = _zero_optimizer(engine)
    for name, p in _trainable(engine):
        shape = _full_shape(p)
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition of the parameter itself
            numel_all = p.ds_numel
            part_size = p.ds_tensor.ds_numel
            start = min(engine.rank * part_size, numel_all)
            numel = min(part_size, numel_all - start)

            def views(part: str, p: nn.Parameter = p, numel: int = numel) -> torch.Tensor:
                key = None if part == "fp32" else part
                return zero.get_local_fp32_param(p, key).view(-1)[:numel]

            out.append(Held(name, p, shape, start, numel, views))
        else:  # ZeRO-2: this rank's fragment of the parameter inside its fp32 partition, if any
            mapping = p._hp_mapping
            if mapping is None:  # nothing of it here: an empty hold, so every rank lists every parameter
                out.append(Held(name, p, shape, 0, 0, lambda part, p=p: p.new_empty(0, dtype=torch.float32)))
                continue

            def views(part: str, mapping=mapping) -> torch.Tensor:
                return mapping.get_hp_fragment(None if part == "fp32" else part).view(-1)

            address = mapping.lp_fragment_address
            out.append(Held(name, p, shape, address.start, address.numel, views))
    return out


def _flat_masters(engine: "TrainEngine") -> list[torch.Tensor]:
    """The tensors AdamW steps: DeepSpeed's fp32 partitions, or DDP's parameters."""
    if not engine.is_deepspeed:
        return [p for _, p in _trainable(engine)]
    zero = _zero_optimizer(engine)
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        return list(zero.fp32_partitioned_groups_flat)
    return list(zero.single_partition_of_fp32_groups)


def optimizer_steps(engine: "TrainEngine") -> int:
    """Optimizer steps applied so far (AdamW's bias-correction count; 0 before the first)."""
    opt = _torch_optimizer(engine)
    for tensor in _flat_masters(engine):
        state = opt.state.get(tensor)
        if state and "step" in state:
            step = state["step"]
            return int(step.item() if isinstance(step, torch.Tensor) else step)
    return 0


def ensure_optimizer_state(engine: "TrainEngine", steps: int) -> None:
    """Give AdamW its moments (zero where missing) and step count ``steps`` before its first step, so a resume can
    fill them in place; links them to ZeRO-2's fragments as DeepSpeed does after its first step."""
    opt = _torch_optimizer(engine)
    for tensor in _flat_masters(engine):
        state = opt.state[tensor]
        for key in MOMENTS:
            if key not in state:
                state[key] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
        old = state.get("step")
        if isinstance(old, torch.Tensor):
            state["step"] = torch.full_like(old, float(steps))
        elif old is not None or type(opt).__name__ == "DeepSpeedCPUAdam":
            state["step"] = int(steps)  # DeepSpeed's CPU Adam counts in a plain int
        else:
            state["step"] = torch.tensor(float(steps))  # torch AdamW's (non-capturable) step count
    if engine.is_deepspeed and hasattr(_zero_optimizer(engine), "single_partition_of_fp32_groups"):
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        zero = _zero_optimizer(engine)
        for lp_group, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(lp_group, flat, opt.state)


@torch.no_grad()
def set_model_weights(engine: "TrainEngine", read: Callable[[str, int, int], torch.Tensor]) -> None:
    """Make the model's own weights (the model dtype copies DeepSpeed trains) equal to fp32 master weights that
    ``read(name, start, stop)`` returns, cast as DeepSpeed casts them after a step. DDP's parameters are the master
    weights themselves (loaded with them)."""
    if not engine.is_deepspeed:
        return
    for name, p in _trainable(engine):
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition
            held = p.ds_tensor.view(-1)
            start = min(engine.rank * held.numel(), p.ds_numel)
            stop = min(start + held.numel(), p.ds_numel)
            held[:stop - start].copy_(read(name, start, stop).to(held.dtype))
        else:  # ZeRO-2: every rank holds the whole parameter in the model dtype
            p.data.copy_(read(name, 0, p.numel()).view(p.shape).to(p.dtype))
