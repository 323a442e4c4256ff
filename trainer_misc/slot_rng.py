"""Per-slot random streams of a virtual sync group.

In a real sync group every slot is its own process, seeded ``seed + rank`` (``distributed.seed_everything``), and
the objective draws its noise, timesteps, stage and caption dropout from torch's global generators. When one
process trains several slots in turn (``VIDEO_SYNC_GROUP`` a multiple of the process count), each slot must still
see the stream its own process would have had, or the two set-ups could not be compared number for number.
``SlotStreams`` keeps one torch CPU (and CUDA) generator state per slot, seeded as that slot's rank would be, and
swaps it into the global generators around the slot's forward and backward. The objective code stays unaware of it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch

__all__ = ["SlotStreams"]


class SlotStreams:
    """Global-generator states for ``slots`` (group slots this process trains; slot ``p`` of the one virtual group
    is what rank ``p`` of a real group would be, so its stream is seeded ``seed + p``)."""

    def __init__(self, slots: Sequence[int], seed: int, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.cpu: dict[int, torch.Tensor] = {}
        self.gpu: dict[int, torch.Tensor] = {}
        for slot in slots:
            self.cpu[slot] = torch.Generator().manual_seed(seed + slot).get_state()
            if self.cuda:
                self.gpu[slot] = torch.Generator(device=self.device).manual_seed(seed + slot).get_state()

    @contextlib.contextmanager
    def use(self, slot: int) -> Iterator[None]:
        """Run the body on ``slot``'s stream; the process's own stream is put back afterwards."""
        outer_cpu = torch.get_rng_state()
        outer_gpu = torch.cuda.get_rng_state(self.device) if self.cuda else None
        torch.set_rng_state(self.cpu[slot])
        if self.cuda:
            torch.cuda.set_rng_state(self.gpu[slot], self.device)
        try:
            yield
        finally:
            self.cpu[slot] = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if self.cuda:
                self.gpu[slot] = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_gpu, self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every slot's states, for this rank's checkpoint files."""
        out = {f"cpu.{slot}": state.clone() for slot, state in self.cpu.items()}
        out.update({f"cuda.{slot}": state.clone() for slot, state in self.gpu.items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "slot RNG state") -> None:
        for slot in self.cpu:
            if f"cpu.{slot}" not in state:
                raise KeyError(f"{source}: no RNG state for sync-group slot {slot}; resume with the same "
                               "VIDEO_SYNC_GROUP and number of processes")
            self.cpu[slot] = state[f"cpu.{slot}"].clone()
            if self.cuda:
                if f"cuda.{slot}" not in state:
                    raise KeyError(f"{source}: no CUDA RNG state for slot {slot} (checkpoint written by a CPU run?)")
                self.gpu[slot] = state[f"cuda.{slot}"].clone()
