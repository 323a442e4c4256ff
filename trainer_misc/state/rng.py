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
    """The torch random streams of the slots this process trains (see :class:`trainer_misc.runtime.distributed.
    SlotLayout`): slot ``s`` is seeded ``seed + s``, as rank ``s`` of a one-slot-per-process run is.

    With one slot the process's own global generators are that slot's stream (``use`` does nothing). With several,
    each slot keeps its own CPU (and CUDA) generator state, swapped into the global generators around the slot's
    forward and backward, so the objective's draws are those its own process would have made. Either way
    :meth:`state_dict` gives each slot's state, so a checkpoint resumes on another process count.
    """

    def __init__(self, slots: Sequence[int], seed: int, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.slots = tuple(slots)
        self.cpu: dict[int, torch.Tensor] = {}
        self.gpu: dict[int, torch.Tensor] = {}
        if len(self.slots) > 1:
            for slot in self.slots:
                self.cpu[slot] = torch.Generator().manual_seed(seed + slot).get_state()
                if self.cuda:
                    self.gpu[slot] = torch.Generator(device=self.device).manual_seed(seed + slot).get_state()

    @property
    def shared(self) -> bool:
        """One slot: its stream is the process's global one."""
        return len(self.slots) == 1

    @contextlib.contextmanager
    def use(self, slot: int) -> Iterator[None]:
        """Run the body on ``slot``'s stream; the process's own stream is put back afterwards."""
        if self.shared:
            yield
            return
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

    def state_dict(self) -> dict[int, dict[str, torch.Tensor]]:
        """Each slot's torch states (``torch_cpu``, and ``torch_cuda`` on a GPU), for the checkpoint."""
        if self.shared:
            out = {"torch_cpu": torch.get_rng_state()}
            if self.cuda:
                out["torch_cuda"] = torch.cuda.get_rng_state(self.device)
            return {self.slots[0]: out}
        return {slot: {"torch_cpu": self.cpu[slot].clone(),
                       **({"torch_cuda": self.gpu[slot].clone()} if self.cuda else {})} for slot in self.slots}

    def load_state_dict(self, states: Mapping[int, Mapping[str, torch.Tensor]], source: str = "slot RNG state") -> None:
        for slot in self.slots:
            if slot not in states:
                raise KeyError(f"{source}: no RNG state for slot {slot}")
            state = states[slot]
            if self.cuda and "torch_cuda" not in state:
                raise KeyError(f"{source}: no CUDA RNG state for slot {slot} (checkpoint written by a CPU run?)")
            if self.shared:
                torch.set_rng_state(state["torch_cpu"])
                if self.cuda:
                    torch.cuda.set_rng_state(state["torch_cuda"], self.device)
            else:
                self.cpu[slot] = state["torch_cpu"].clone()
                if self.cuda:
                    self.gpu[slot] = state["torch_cuda"].clone()
