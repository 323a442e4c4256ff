"""Ulysses-style sequence parallelism for the packed DiT sequence: the DiT side (the process group itself is made
in :func:`trainer_misc.runtime.distributed.sequence_parallel_group`, the one module that owns process groups).

The ``S`` processes of a sequence-parallel (SP) group hold the *same* sample. Each keeps a contiguous ``1/S`` of the
tokens of every stream (the packed text, the packed video and, in the miniFLUX single-stream blocks, the joint
text-then-video layout), so every token-wise layer (adaptive norms, projections, MLPs) runs on ``L/S`` tokens.
Attention needs the whole sequence: around it an all-to-all trades the sequence split for a head split (each
process gets all ``L`` tokens of ``H/S`` heads), the unchanged per-column attention runs with the exact
text-padding and temporal-causal groups of :mod:`pyramid_dit.packing`, and a second all-to-all trades back.
Text is split like video (as the reference does: its text is also sequence-split and all-to-all'd over heads),
but a stream whose length is not a multiple of ``S`` is padded at its end instead of being refused; padding
tokens are computed and dropped, never attended to.

Gradients. Every SP process computes the same loss from the same gathered output. The collectives' backward
passes make the *sum over the SP group* of each process's parameter gradients equal ``S`` times the gradient of
one process running the whole sequence: a gather's backward sums the (identical) output gradients of the group
and keeps this process's part, an all-to-all's backward is the reverse all-to-all. Data-parallel averaging over
all ``D x S`` processes (DDP, ZeRO) then yields exactly the average over the ``D`` data-parallel samples, as
without SP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["SequenceParallel", "StreamShard", "all_to_all", "gather_sequence"]


@dataclass(frozen=True)
class SequenceParallel:
    """This process's SP group: ``size`` processes holding one sample, this one being ``rank`` among them."""

    group: dist.ProcessGroup
    size: int
    rank: int

    def __deepcopy__(self, memo: dict) -> "SequenceParallel":
        return self  # a process group is shared, never copied (an EMA copy of the model uses the same group)

    @classmethod
    def of(cls, group: dist.ProcessGroup) -> "SequenceParallel":
        return cls(group=group, size=dist.get_world_size(group), rank=dist.get_rank(group))


def _all_to_all(x: torch.Tensor, sp: SequenceParallel, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """One ``all_to_all_single`` on one contiguous buffer (no per-part copies, no concatenation of received parts).

    The parts to send are laid out rank-major (``[S, ...]``: a view when the scattered axis is the outermost one
    that is not of size 1, a single copy otherwise); what arrives, rank-major too, is put back along ``gather_dim``
    (a view when only size-1 axes lie before it, a single copy otherwise). With one batch row that is one copy
    per call, where sending a list of parts and concatenating the received list made two.
    """
    S = sp.size
    shape = list(x.shape)
    # Send buffer [S, *shape with scatter_dim divided by S]: rank j's part is x's j-th chunk along scatter_dim.
    split = shape[:scatter_dim] + [S, shape[scatter_dim] // S] + shape[scatter_dim + 1:]
    send = x.reshape(split).movedim(scatter_dim, 0).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=sp.group)
    # received[j] came from rank j: it is the j-th block of the gathered axis.
    part = list(received.shape[1:])
    out = received.movedim(0, gather_dim)  # [..., S, l, ...] with S just before the gathered axis
    return out.reshape(part[:gather_dim] + [S * part[gather_dim]] + part[gather_dim + 1:])


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        ctx.sp, ctx.dims = sp, (scatter_dim, gather_dim)
        return _all_to_all(x, sp, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.sp, gather_dim, scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, sp: SequenceParallel, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into ``sp.size`` equal parts along ``scatter_dim``, send part ``j`` to process ``j``, and
    concatenate what arrives along ``gather_dim`` in process order. Differentiable (backward: the reverse)."""
    if x.shape[scatter_dim] % sp.size:
        raise ValueError(f"all_to_all: dimension {scatter_dim} of shape {tuple(x.shape)} is not divisible by the "
                         f"sequence-parallel size {sp.size}")
    return _AllToAll.apply(x, sp, scatter_dim, gather_dim)


def _has_reduce_scatter(sp: SequenceParallel) -> bool:
    """Whether the group's backend has a reduce-scatter (NCCL does; gloo, the CPU backend, does not)."""
    return dist.get_backend(sp.group) != dist.Backend.GLOO


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp = sp
        # [S, B, l, ...] rank-major, gathered in place; then the ranks' parts side by side along the tokens (a view
        # for one batch row).
        gathered = x.new_empty((sp.size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(gathered, x.contiguous(), group=sp.group)
        return gathered.unflatten(0, (sp.size, -1)).movedim(0, 1).flatten(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every process used the gathered tensor: the gradient of its own part is the sum over the group of that
        # part's gradients. A reduce-scatter moves half the bytes of an all-reduce; gloo has none, so there the
        # whole gradient is all-reduced and this part kept.
        sp = ctx.sp
        parts = grad.unflatten(1, (sp.size, -1)).movedim(1, 0)  # [S, B, l, ...]
        if _has_reduce_scatter(sp):
            out = grad.new_empty(parts.shape[1:])
            dist.reduce_scatter_tensor(out, parts.contiguous().flatten(0, 1), group=sp.group)
            return out, None
        grad = grad.contiguous()
        dist.all_reduce(grad, group=sp.group)
        return grad.chunk(sp.size, dim=1)[sp.rank], None


def gather_sequence(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """``[B, l, ...]`` parts of the group, in process order -> ``[B, S*l, ...]`` on every process (differentiable)."""
    return _GatherSequence.apply(x, sp)


@dataclass(frozen=True)
class StreamShard:
    """This process's part of one packed stream of ``total`` tokens: positions ``[start, start + chunk)`` of the
    stream padded to ``S * chunk`` tokens (``chunk = ceil(total / S)``)."""

    sp: SequenceParallel
    total: int

    @property
    def chunk(self) -> int:
        return -(-self.total // self.sp.size)

    @property
    def start(self) -> int:
        return self.sp.rank * self.chunk

    @property
    def padded(self) -> int:
        return self.chunk * self.sp.size

    def local_lens(self, seg_lens: list[int]) -> list[int]:
        """How many tokens of each consecutive segment (columns) lie in this part; padding counts in the last
        segment, so the lengths add up to ``chunk`` (the per-segment ops split the local tensor by them)."""
        out, pos, stop = [], 0, self.start + self.chunk
        for length in seg_lens:
            out.append(max(0, min(pos + length, stop) - max(pos, self.start)))
            pos += length
        out[-1] += self.chunk - sum(out)
        return out

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """The full stream ``[B, total, ...]`` (the same on every process) -> this part ``[B, chunk, ...]``.

        Backward keeps only this part's gradient: the group's sum is the whole gradient."""
        if x.shape[1] != self.total:
            raise ValueError(f"stream has {x.shape[1]} tokens, expected {self.total}")
        return self._pad(x)[:, self.start:self.start + self.chunk]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This part ``[B, chunk, ...]`` -> the full stream ``[B, total, ...]`` on every process."""
        return gather_sequence(x, self.sp)[:, : self.total]

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Queries/keys/values of this part ``[B, chunk, H, d]`` -> the whole stream for this process's heads,
        ``[B, total, H/S, d]`` (head block ``rank``)."""
        return all_to_all(x, self.sp, scatter_dim=2, gather_dim=1)[:, : self.total]

    def from_heads(self, y: torch.Tensor) -> torch.Tensor:
        """Attention output of this process's heads over the whole stream ``[B, total, (H/S)*d]`` -> this part
        with all heads, ``[B, chunk, H*d]`` (heads in their original order)."""
        return all_to_all(self._pad(y), self.sp, scatter_dim=1, gather_dim=2)

    def rope(self, tables: Optional[tuple[torch.Tensor, torch.Tensor]]
             ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """This part's rows of rotary tables ``[total, d]`` (zeros for padding)."""
        if tables is None:
            return None
        return tuple(self._pad(t[None])[0, self.start:self.start + self.chunk] for t in tables)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.padded - x.shape[1]
        if extra == 0:
            return x
        return F.pad(x, (0, 0) * (x.ndim - 2) + (0, extra))
