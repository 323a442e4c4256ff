"""Exponential moving average of the trainable parameters, sharded across ranks.

Design (the same for DDP, ZeRO-2 and ZeRO-3):

* Each parameter is viewed as a flat vector split into ``world_size`` equal chunks of ``ceil(numel / world_size)``
  elements (the last one zero-padded). Rank ``r`` keeps the float32 EMA of chunk ``r`` only. This is exactly the
  partition DeepSpeed ZeRO-3 keeps in ``param.ds_tensor``, so under ZeRO-3 the update reads the local partition
  directly and needs **no communication and no gathered parameters**; under DDP / ZeRO-2 (full parameters on every
  rank) the rank slices its chunk out of the full tensor. EMA memory per rank is ``4 * numel / world_size`` bytes.
* The EMA is float32 even when the model trains in bf16: with decay 0.9999 a bf16 average would stop moving
  (the reference keeps its EMA copy in the model dtype).
* Update rule and timing follow the reference: ``ema = ema * decay + (1 - decay) * param`` with a fixed decay, after
  the optimizer steps whose 0-based index is a multiple of ``update_every`` (the reference updates every 100 steps).
  Under bf16 DeepSpeed the parameters read are the bf16 working copies (the fp32 master weights live inside the
  ZeRO optimizer and are not a public interface).
* Checkpoints store each rank's chunks (``state_dict``); resuming needs the same world size, as DeepSpeed's own
  ZeRO checkpoints do. ``gather`` assembles full tensors on one rank for export.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from trainer_misc.runtime.distributed import get_world_size, is_dist_initialized

__all__ = ["ShardedEMA", "local_chunk"]


def _full_shape(param: nn.Parameter) -> torch.Size:
    # ZeRO-3 replaces param.data by an empty tensor and keeps the real shape in ds_shape.
    return param.ds_shape if hasattr(param, "ds_tensor") else param.shape


def local_chunk(param: nn.Parameter, rank: int, world_size: int) -> torch.Tensor:
    """This rank's flat chunk of ``param`` (a view when possible), ``ceil(numel / world_size)`` long."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.detach().reshape(-1)
    flat = param.detach().reshape(-1)
    size = math.ceil(flat.numel() / world_size)
    chunk = flat[rank * size:(rank + 1) * size]
    if chunk.numel() < size:
        chunk = torch.cat([chunk, chunk.new_zeros(size - chunk.numel())])
    return chunk


class ShardedEMA:
    """EMA over ``named_params`` (names are the model's state-dict keys).

    Args:
        named_params: trainable parameters of the *unwrapped* model, e.g.
            ``[(n, p) for n, p in module.named_parameters() if p.requires_grad]``.
        decay: fixed EMA decay (reference ``--ema_decay``, default 0.9999).
        update_every: update after optimizer steps ``0, k, 2k, ...`` (reference: 100).
        rank, world_size: this rank's place; default to the current process group.
        device: where the EMA chunks live (default: the parameters' device; ``cpu`` to save accelerator memory).
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], decay: float, update_every: int = 1,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 device: Optional[torch.device] = None) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        if update_every < 1:
            raise ValueError(f"ema update_every must be >= 1, got {update_every}")
        self.decay = float(decay)
        self.update_every = int(update_every)
        self.world_size = get_world_size() if world_size is None else world_size
        self.rank = (dist.get_rank() if is_dist_initialized() else 0) if rank is None else rank
        self.params: dict[str, nn.Parameter] = dict(named_params)
        if not self.params:
            raise ValueError("ShardedEMA got no parameters")
        self.shapes = {n: torch.Size(_full_shape(p)) for n, p in self.params.items()}
        self.shadow: dict[str, torch.Tensor] = {}
        for name, param in self.params.items():
            chunk = local_chunk(param, self.rank, self.world_size)
            self.shadow[name] = chunk.to(device=device or chunk.device, dtype=torch.float32, copy=True)

    @torch.no_grad()
    def reset_to_params(self) -> None:
        """Set the average to the parameters' current values (a resume whose checkpoint holds no EMA state: the
        shadow built at start-up holds the pretrained weights, not the resumed ones)."""
        for name, param in self.params.items():
            ema = self.shadow[name]
            ema.copy_(local_chunk(param, self.rank, self.world_size).to(device=ema.device, dtype=torch.float32))

    def should_update(self, step: int) -> bool:
        return step % self.update_every == 0

    @torch.no_grad()
    def update(self) -> None:
        """``ema = ema * decay + (1 - decay) * param`` on this rank's chunks (no communication)."""
        d = self.decay
        for name, param in self.params.items():
            ema = self.shadow[name]
            current = local_chunk(param, self.rank, self.world_size).to(device=ema.device, dtype=torch.float32)
            ema.mul_(d).add_(current, alpha=1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's chunks, keyed by parameter name."""
        return {name: t.detach().cpu().contiguous() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "EMA state") -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"{source}: EMA parameter names differ from the model's (missing {missing[:5]}"
                           f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                           f"{'...' if len(unexpected) > 5 else ''}); was the checkpoint written for another model?")
        for name, ema in self.shadow.items():
            value = state[name]
            if value.shape != ema.shape:
                raise ValueError(f"{source}: EMA chunk {name!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(ema.shape)}; resuming requires the same model and number of processes")
            ema.copy_(value)

    @torch.no_grad()
    def gather(self, dst: int = 0, comm_device: Optional[torch.device] = None) -> Optional[dict[str, torch.Tensor]]:
        """Full float32 EMA tensors on rank ``dst`` (None elsewhere). Collective: every rank must call it.

        ``comm_device`` is where chunks travel (CUDA for NCCL); default the EMA's own device.
        """
        if self.world_size == 1:
            return {n: t.detach().cpu().reshape(self.shapes[n]).clone() for n, t in self.shadow.items()}
        out: Optional[dict[str, torch.Tensor]] = {} if self.rank == dst else None
        for name, ema in self.shadow.items():
            send = ema.to(comm_device) if comm_device is not None else ema
            bucket = [torch.empty_like(send) for _ in range(self.world_size)] if self.rank == dst else None
            dist.gather(send, bucket, dst=dst)
            if out is not None:
                numel = self.shapes[name].numel()
                out[name] = torch.cat([b.cpu() for b in bucket])[:numel].reshape(self.shapes[name])
        return out
