"""Exponential moving average of the trainable parameters, over the fp32 master weights, sharded across ranks.

Design (the same for DDP, ZeRO-2 and ZeRO-3):

* Each rank averages the elements of each trainable parameter it *holds* (:mod:`trainer_misc.optim.master`): under
  ZeRO-2/3 the fragment of the fp32 master weights inside its optimizer partition, under DDP its chunk of the
  (fp32) parameters. The update reads those in place: **no communication and no gathered parameters**, and EMA
  memory per rank is ``4 * params / world_size`` bytes.
* It averages the fp32 master weights, as the reference (which keeps fp32 parameters under FSDP) does, not the
  bf16 working copies DeepSpeed computes with: a bf16 copy rounds away most of an update's effect at decay 0.9999.
  The average itself is float32 too.
* Update rule and timing follow the reference: ``ema = ema * decay + (1 - decay) * param`` with a fixed decay, after
  the optimizer steps whose 0-based index is a multiple of ``update_every`` (the reference updates every 100 steps).
* Checkpoints store each rank's fragments with their offsets (:mod:`trainer_misc.state.fragments`), so a resume on
  another process count or strategy reads the ranges it now holds. :meth:`ShardedEMA.gather` assembles full
  tensors on one rank for export.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from trainer_misc.optim.master import Held, chunk_range
from trainer_misc.runtime.distributed import get_world_size, is_dist_initialized

__all__ = ["ShardedEMA", "held_chunks"]


def held_chunks(named_params: Iterable[tuple[str, nn.Parameter]], rank: int, world_size: int) -> list[Held]:
    """Replicated parameters (DDP, or a model outside any engine) as rank ``rank``'s chunks of each."""
    out = []
    for name, p in named_params:
        start, stop = chunk_range(p.numel(), rank, world_size)

        def views(part: str, p: nn.Parameter = p, start: int = start, stop: int = stop) -> torch.Tensor:
            assert part == "fp32", part
            return p.data.view(-1)[start:stop]

        out.append(Held(name, p, tuple(p.shape), start, stop - start, views))
    return out


class ShardedEMA:
    """EMA of the elements in ``held`` (names are the model's state-dict keys).

    Args:
        held: what this rank holds of each trainable parameter (:func:`trainer_misc.optim.master.held_elements`,
            or :func:`held_chunks` for replicated parameters).
        decay: fixed EMA decay (reference ``--ema_decay``, default 0.9999).
        update_every: update after optimizer steps ``0, k, 2k, ...`` (reference: 100).
        device: where the averages live (default: the master weights' device; ``cpu`` to save accelerator memory).
    """

    def __init__(self, held: Sequence[Held], decay: float, update_every: int = 1,
                 device: Optional[torch.device] = None) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        if update_every < 1:
            raise ValueError(f"ema update_every must be >= 1, got {update_every}")
        self.decay = float(decay)
        self.update_every = int(update_every)
        self.held = {h.name: h for h in held}
        self.shadow: dict[str, torch.Tensor] = {}
        for name, h in self.held.items():
            current = h.views("fp32")
            self.shadow[name] = current.to(device=device or current.device, dtype=torch.float32, copy=True)

    @property
    def names(self) -> list[str]:
        return list(self.held)

    @torch.no_grad()
    def reset_to_params(self) -> None:
        """Set the average to the current master weights (a resume whose checkpoint holds no EMA state: the averages
        built at start-up hold the pretrained weights, not the resumed ones)."""
        for name, h in self.held.items():
            self.shadow[name].copy_(h.views("fp32"))

    def should_update(self, step: int) -> bool:
        return step % self.update_every == 0

    @torch.no_grad()
    def update(self) -> None:
        """``ema = ema * decay + (1 - decay) * master`` on the elements this rank holds (no communication)."""
        d = self.decay
        for name, h in self.held.items():
            ema = self.shadow[name]
            ema.mul_(d).add_(h.views("fp32").to(device=ema.device, dtype=torch.float32), alpha=1.0 - d)

    @torch.no_grad()
    def load(self, read: Callable[[str, int, int], torch.Tensor]) -> None:
        """Fill the averages from ``read(name, start, stop)`` (a checkpoint's EMA, whatever layout wrote it)."""
        for name, h in self.held.items():
            self.shadow[name].copy_(read(name, h.start, h.stop))

    @torch.no_grad()
    def gather(self, dst: int = 0, comm_device: Optional[torch.device] = None) -> Optional[dict[str, torch.Tensor]]:
        """Full float32 EMA tensors, in every trainable parameter's shape, on rank ``dst`` (None elsewhere).
        Collective: every rank calls it with the same parameters. Each rank adds its (disjoint) elements into a
        zero tensor and the sum is reduced to ``dst``; ``comm_device`` is where it travels (CUDA for NCCL)."""
        distributed = is_dist_initialized() and get_world_size() > 1
        rank = dist.get_rank() if distributed else 0
        out: Optional[dict[str, torch.Tensor]] = {} if rank == dst else None
        for name, h in self.held.items():
            full = torch.zeros(h.param.ds_numel if hasattr(h.param, "ds_tensor") else h.param.numel(),
                               dtype=torch.float32, device=comm_device or self.shadow[name].device)
            full[h.start:h.stop] = self.shadow[name].to(full.device)
            if distributed:
                dist.reduce(full, dst=dst)
            if out is not None:
                out[name] = full.cpu().reshape(h.shape)
        return out
