"""Random streams: seeding, saving and restoring every generator a rank draws from, and the per-slot streams of a
virtual sync group.

**Process streams.** Each rank seeds python, numpy and torch (CPU and CUDA) with ``seed + data rank``
(:func:`seed_everything`); a checkpoint saves every rank's states (:func:`capture_rng_state`) and a resume restores
them last, once nothing else can draw (:func:`restore_rng_state`), so the run continues the same noise.

**Slot streams.** In a real sync group every slot is its own process, and the objective draws its noise,
timesteps, stage and caption dropout from torch's global generators. When one process trains several slots in
turn (``VIDEO_SYNC_GROUP`` a multiple of the process count), each slot must still see the stream its own process
would have had, or the two set-ups could not be compared number for number. :class:`SlotStreams` keeps one torch
CPU (and CUDA) generator state per slot, seeded as that slot's rank would be, and swaps it into the global
generators around the slot's forward and backward. The objective code stays unaware of it.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = ["SlotStreams", "capture_rng_state", "restore_rng_state", "seed_everything"]


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) with ``seed + rank``.

    Each rank draws different noise, as the reference does (accelerate's ``set_seed(device_specific=True)``).
    """
    value = seed + rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def capture_rng_state(device: Optional[torch.device] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's torch (CPU and ``device`` when CUDA), numpy and python RNG states, as tensors + JSON."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {
        "torch_cpu": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
    }
    if device is not None and device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    meta = {"numpy": {"kind": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                      "cached_gaussian": float(np_state[4])},
            "python": {"version": py_state[0], "gauss_next": py_state[2]}}
    return tensors, meta


def restore_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping, device: Optional[torch.device] = None,
                      source: str = "RNG state") -> None:
    for key in ("torch_cpu", "numpy_keys", "python_state"):
        if key not in tensors:
            raise KeyError(f"{source}: missing {key!r}")
    torch.set_rng_state(tensors["torch_cpu"])
    if device is not None and device.type == "cuda":
        if "torch_cuda" not in tensors:
            raise KeyError(f"{source}: no CUDA RNG state (checkpoint written by a CPU run?)")
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    np_meta = meta["numpy"]
    np.random.set_state((np_meta["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), np_meta["pos"],
                         np_meta["has_gauss"], np_meta["cached_gaussian"]))
    py_meta = meta["python"]
    random.setstate((py_meta["version"], tuple(int(v) for v in tensors["python_state"].tolist()),
                     py_meta["gauss_next"]))


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
