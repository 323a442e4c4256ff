"""Process-group helpers: launcher environment, backend choice, rank helpers, video sync groups.

Training is launched with ``torchrun`` (or ``python -m torch.distributed.run``); accelerate/DeepSpeed then create the
default process group from the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_*`` variables. This module keeps
the few facts every other module needs in one place:

* which backend a device needs (``nccl`` for CUDA, ``gloo`` for CPU);
* a single-process run (plain ``python train.py``) gets a complete one-rank environment, because DeepSpeed refuses to
  start without one;
* how long a collective may wait for a peer before the run fails (``COLLECTIVE_TIMEOUT_MIN``, see
  :func:`collective_timeout`);
* small collectives that let rank 0 decide for everyone (:func:`broadcast_object`, :func:`any_rank`);
* the *slots* of a run (:class:`SlotLayout`): the autoregressive path's video sync groups (the slots of a group read
  the same clip, and a slot's position in its group picks the temporal unit it trains), fixed for the run's life so
  that a resume on another process count trains the same global batch;
* the *sequence-parallel* (SP) groups: ``sp_size`` consecutive ranks hold one sample and split its tokens
  (:mod:`pyramid_dit.sequence_parallel`). The layout is data parallel x sync group x sequence parallel: rank
  ``r`` is SP rank ``r % sp_size`` of data rank ``r // sp_size``, and the sync-group layout above applies to data
  ranks (:func:`parallel_layout`, :func:`sequence_parallel_group`).
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "Lane",
    "ParallelLayout",
    "SlotLayout",
    "backend_for_device",
    "barrier",
    "destroy_process_group",
    "ensure_launcher_env",
    "get_rank",
    "get_world_size",
    "init_process_group",
    "is_dist_initialized",
    "is_main_process",
    "parallel_layout",
    "sequence_parallel_group",
    "all_gather_object",
    "all_reduce_sum",
    "all_reduce_host",
    "any_rank",
    "broadcast_object",
    "collective_timeout",
    "host_group",
    "slot_layout",
]


def is_dist_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 when no process group exists."""
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 when no process group exists."""
    return dist.get_world_size() if is_dist_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_initialized() and get_world_size() > 1:
        _barrier()


def _barrier() -> None:
    """``dist.barrier`` on this rank's GPU under NCCL: without ``device_ids`` NCCL guesses the device from the rank
    and warns that the guess can hang (seen at the end of every training run on a GPU)."""
    nccl = dist.get_backend() == "nccl"
    dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)


def destroy_process_group() -> None:
    """Tear down the default group if one exists. Only for a run that finished normally on every rank.

    Leaving it to interpreter exit makes gloo abort now and then *after* all work is done
    (``terminate called without an active exception``), which a launcher reports as a failure. A rank that failed
    must not call this: its barrier would wait for ranks that are stuck in another collective (the entry points
    exit through ``trainer_misc.runtime.failures.run_main`` and ``exit_process`` instead).
    """
    global _HOST_GROUP
    if is_dist_initialized():
        _barrier()
        dist.destroy_process_group()  # every group, the host group too
        _HOST_GROUP = None


COLLECTIVE_TIMEOUT_ENV = "COLLECTIVE_TIMEOUT_MIN"
DEFAULT_COLLECTIVE_TIMEOUT_MIN = 10.0


def collective_timeout(minutes: Optional[float] = None) -> datetime.timedelta:
    """How long a collective (all-reduce, barrier, ...) waits for the slowest rank before the run fails.

    ``minutes``, else ``$COLLECTIVE_TIMEOUT_MIN``, else 10 minutes: long enough for rank 0 to write a checkpoint or
    a validation sample while the others wait, short enough that a rank that stopped responding (a hung GPU, a
    ``SIGSTOP``) ends the run in minutes instead of torch's default 30-60. Applies to gloo and NCCL (torch's NCCL
    watchdog aborts a collective that exceeds it), and becomes the default of every process group created
    afterwards.
    """
    if minutes is None:
        raw = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "")
        try:
            minutes = float(raw) if raw else DEFAULT_COLLECTIVE_TIMEOUT_MIN
        except ValueError:
            raise ValueError(f"{COLLECTIVE_TIMEOUT_ENV}={raw!r} must be a number of minutes (e.g. 10 or 0.5)") from None
    if not minutes > 0:
        raise ValueError(f"the collective timeout must be > 0 minutes, got {minutes} ({COLLECTIVE_TIMEOUT_ENV})")
    timeout = datetime.timedelta(minutes=minutes)
    # Groups created later without a timeout (DeepSpeed's data-parallel group, accelerate's) take torch's module
    # defaults (30 min, NCCL 10 min), not the default group's: make them ours too.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if is_dist_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (a picklable value made by our own code: paths, numbers, messages)."""
    if not (is_dist_initialized() and get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


_HOST_GROUP: Optional[dist.ProcessGroup] = None


def host_group() -> Optional[dist.ProcessGroup]:
    """A gloo group over every rank, for small decisions made from host-side values (bad batches, stop signals).

    On a CUDA run the default group is NCCL, whose collectives take GPU tensors: reading the result back is a host
    sync that stalls the CPU until every queued kernel has run. A gloo group reduces CPU tensors without touching
    the GPU stream, so these decisions cost no sync. Created on first use (every rank reaches the same first use:
    the callers are collectives); the default group itself when that is gloo already.
    """
    global _HOST_GROUP
    if not is_dist_initialized():
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo", timeout=collective_timeout())
    return _HOST_GROUP


def all_reduce_host(values: Sequence[float], op: str = "sum") -> List[float]:
    """Sum (or max, ``op="max"``) a few host-side numbers over all ranks through :func:`host_group`."""
    out = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if is_dist_initialized() and get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=host_group())
    return out.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (small picklable values made by our own code)."""
    if not (is_dist_initialized() and get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (one tiny host-side all-reduce)."""
    return all_reduce_host([1.0 if flag else 0.0], op="max")[0] > 0


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over all ranks (in place on a copy) and return it; identity on one process."""
    out = values.detach().clone()
    if is_dist_initialized() and get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def backend_for_device(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors (NCCL cannot move CPU tensors)."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(device: torch.device, timeout_min: Optional[float] = None) -> tuple[int, int]:
    """For scripts that do not go through accelerate (e.g. data tools): create the default group from the
    ``torchrun`` environment and return ``(rank, world_size)``.

    A plain single-process run (no ``WORLD_SIZE``) creates no group and returns ``(0, 1)``. On CUDA the rank's local
    device is selected first, as NCCL requires. ``timeout_min``: see :func:`collective_timeout`. Pair with
    ``destroy_process_group()``.
    """
    if is_dist_initialized():
        return get_rank(), get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend_for_device(device), timeout=collective_timeout(timeout_min))
    return get_rank(), get_world_size()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_launcher_env() -> bool:
    """Make a plain ``python script.py`` look like a one-process ``torchrun`` launch.

    DeepSpeed (and accelerate's DeepSpeed path) only start when ``LOCAL_RANK`` etc. are set; without them accelerate
    silently reports a non-distributed run. Returns True when the variables were filled in here. A partial
    environment (some variables set, others not) is a launcher bug and raises.
    """
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    present = [k for k in keys if k in os.environ]
    if len(present) == len(keys):
        return False
    if present:
        raise RuntimeError(f"incomplete launcher environment: {present} set but not "
                           f"{[k for k in keys if k not in os.environ]}; launch with torchrun or set none of them")
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    os.environ["MASTER_ADDR"] = os.environ.get("MASTER_ADDR") or "127.0.0.1"  # set but empty counts as unset
    os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(_free_port())
    return True


@dataclass(frozen=True)
class Lane:
    """One data stream a process reads: sampler replica ``group`` (a video sync group: its slots read the same
    batches) and the ``positions`` of that group's slots this process trains, in order."""

    group: int
    positions: tuple[int, ...]


@dataclass(frozen=True)
class SlotLayout:
    """Which training *slots* a process trains: the unit of the run's global batch.

    A run has ``num_groups * group_size`` slots, fixed when it starts (``num_groups`` data streams, i.e. sampler
    replicas, of ``group_size`` = ``VIDEO_SYNC_GROUP`` slots each; 1 without the temporal pyramid). Slot ``s`` is
    position ``s % group_size`` of group ``s // group_size``, draws its noise from the stream seeded ``seed + s``,
    and is what rank ``s`` trains when there is one process per slot. With fewer processes each trains a
    contiguous run of slots in turn, accumulated into the same optimizer step: the same update, more time per step
    (a *virtual* group). So a checkpoint resumes on any process count that divides the slot count, with the same
    global batch and the same random streams.
    """

    group_size: int
    num_groups: int
    lanes: tuple[Lane, ...]

    def slot(self, group: int, position: int) -> int:
        """The global index of position ``position`` of group ``group`` (its random stream's offset)."""
        return group * self.group_size + position

    @property
    def slots(self) -> tuple[int, ...]:
        """This process's slots, as global slot indices (:meth:`slot`)."""
        return tuple(self.slot(lane.group, p) for lane in self.lanes for p in lane.positions)

    @property
    def virtual(self) -> int:
        """Slots this process trains per micro-batch (1: one process per slot)."""
        return len(self.slots)

    @property
    def total_slots(self) -> int:
        return self.num_groups * self.group_size


def slot_layout(rank: int, world_size: int, group_size: int, num_groups: Optional[int] = None) -> SlotLayout:
    """The slots data-parallel rank ``rank`` of ``world_size`` trains: the one place that decides it.

    ``num_groups`` is the run's number of data streams; a new run takes ``max(1, world_size // group_size)`` (one
    slot per process when the processes are a multiple of the group, one virtual group otherwise) and keeps it for
    its whole life, whatever the process count of a resumed launch. The slot count must be a multiple of the
    process count (every process trains as many slots).
    """
    if group_size < 1:
        raise ValueError(f"video_sync_group must be >= 1, got {group_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    if num_groups is None:
        if world_size % group_size and group_size % world_size:
            raise ValueError(f"the number of processes ({world_size}) and video_sync_group ({group_size}) must divide "
                             "one another: a multiple of the group gives real groups (one slot per process), a divisor "
                             "of it a virtual group (each process trains group/processes slots in turn); set "
                             f"VIDEO_SYNC_GROUP to a divisor or a multiple of GPUS*NNODES={world_size}")
        num_groups = max(1, world_size // group_size)
    total = num_groups * group_size
    if total % world_size:
        raise ValueError(f"this run trains {total} slots ({num_groups} data stream(s) x VIDEO_SYNC_GROUP={group_size}) "
                         f"per optimizer step; {world_size} data-parallel processes cannot share them equally: use a "
                         f"process count (GPUS*NNODES/SP_SIZE) that divides {total}, or a new OUTPUT_DIR")
    per_process = total // world_size
    mine = range(rank * per_process, (rank + 1) * per_process)
    lanes: dict[int, list[int]] = {}
    for s in mine:
        lanes.setdefault(s // group_size, []).append(s % group_size)
    return SlotLayout(group_size=group_size, num_groups=num_groups,
                      lanes=tuple(Lane(group, tuple(positions)) for group, positions in lanes.items()))


@dataclass(frozen=True)
class ParallelLayout:
    """Where a rank sits in data parallel x slots x sequence parallel.

    ``sp_rank``/``sp_size``: this rank's place in its SP group (the ranks sharing one sample's tokens).
    ``data_rank``/``data_world``: the rank and count of *data-parallel* ranks, i.e. SP groups; everything that
    decides what a rank reads or draws (sampler replicas, slots, noise seeds) uses these, so the ranks of an SP group
    read the same batches and draw the same noise. ``slots``: the slots this data rank trains.
    """

    sp_size: int
    sp_rank: int
    data_rank: int
    data_world: int
    slots: SlotLayout


def parallel_layout(rank: int, world_size: int, video_sync_group: int = 1, sp_size: int = 1,
                    num_groups: Optional[int] = None) -> ParallelLayout:
    """The one place that checks and decides the rank layout (see the module docstring).

    Constraints: ``sp_size`` divides the number of processes; the data ranks (processes / ``sp_size``) share the
    run's slots equally (:func:`slot_layout`; ``num_groups``: the run's data streams, None for a new run).
    """
    if sp_size < 1:
        raise ValueError(f"SP_SIZE (sequence-parallel size) must be >= 1, got {sp_size}")
    if world_size % sp_size:
        raise ValueError(f"SP_SIZE={sp_size} must divide the number of processes GPUS*NNODES={world_size}: each "
                         f"sample is split over SP_SIZE consecutive processes")
    data_world = world_size // sp_size
    return ParallelLayout(sp_size=sp_size, sp_rank=rank % sp_size, data_rank=rank // sp_size, data_world=data_world,
                          slots=slot_layout(rank // sp_size, data_world, video_sync_group, num_groups))


def sequence_parallel_group(sp_size: int) -> Optional[dist.ProcessGroup]:
    """This rank's SP group (ranks ``[k*sp_size, (k+1)*sp_size)``), or ``None`` for ``sp_size`` 1.

    Collective: every rank of the default group must call it (``new_group`` is), with the same ``sp_size``.
    """
    layout = parallel_layout(get_rank(), get_world_size(), 1, sp_size)
    if sp_size == 1:
        return None
    if not is_dist_initialized():
        raise RuntimeError(f"SP_SIZE={sp_size} needs a distributed launch (torchrun with {sp_size}+ processes)")
    mine = None
    for start in range(0, get_world_size(), sp_size):
        group = dist.new_group(list(range(start, start + sp_size)))
        if start == layout.data_rank * sp_size:
            mine = group
    return mine
