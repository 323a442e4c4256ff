"""The output folder, checked at start-up: every process sees the same one, and it writes fast enough for a
checkpoint to finish inside the time a stop signal leaves.

* **Shared.** Checkpoints are written by every rank into one folder and verified by rank 0, so ``OUTPUT_DIR`` must be
  one folder for all nodes (network storage), not a path that exists separately on each. Each rank writes a token
  file there; rank 0 must see all of them, or the launch stops at once naming the hosts whose files it cannot see --
  instead of failing at the first checkpoint, hours in.
* **Fast enough.** The token is a probe of :data:`PROBE_BYTES` written with fsync by every rank at once, which
  measures the folder's write rate under the same contention a checkpoint meets. With the bytes each rank will
  write per checkpoint (its share of the fp32 weights, AdamW moments and EMA), that predicts how long a checkpoint
  takes; when that is more than half of the stop window (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``: after a SIGTERM,
  torchrun kills the workers that have not finished by then) a warning says what to raise.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trainer_misc.files import free_space
from trainer_misc.runtime.distributed import all_gather_object, barrier, broadcast_object, get_rank

logger = logging.getLogger(__name__)

__all__ = ["PROBE_BYTES", "StorageProbe", "check_output_dir", "stop_window_note", "stop_window_s"]

PROBE_BYTES = 16 << 20
PROBE_FOLDER = ".probe"


@dataclass(frozen=True)
class StorageProbe:
    """What the start-up probe found: bytes per second each rank could write (the slowest rank's, all writing at
    once)."""

    write_bytes_per_s: float


def check_output_dir(output_dir: Path) -> StorageProbe:
    """Refuse an ``output_dir`` that the processes do not share, and measure its write rate. Collective."""
    output_dir = Path(output_dir)
    run = broadcast_object(uuid.uuid4().hex if get_rank() == 0 else None)
    folder = output_dir / PROBE_FOLDER / run
    folder.mkdir(parents=True, exist_ok=True)
    rank, host = get_rank(), socket.gethostname()
    payload = os.urandom(1 << 20)
    start = time.monotonic()
    try:
        with open(folder / f"rank_{rank:05d}", "wb") as f:
            for _ in range(PROBE_BYTES // len(payload)):
                f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        failed = None
    except OSError as e:  # every rank must still reach the gather below
        failed = f"{e.strerror or e} ({free_space(output_dir)} free there)"
    seconds = max(time.monotonic() - start, 1e-6)
    reports = all_gather_object((rank, host, seconds, failed))
    barrier()
    problem = next((f"OUTPUT_DIR={output_dir}: rank {r} on {h} cannot write a {PROBE_BYTES >> 20} MiB test file "
                    f"there: {why}. Checkpoints need much more: free space or set OUTPUT_DIR elsewhere"
                    for r, h, _, why in reports if why), None)
    if rank == 0 and problem is None:
        seen = {int(p.name.split("_")[1]) for p in folder.iterdir() if p.name.startswith("rank_")}
        unseen = [(r, h) for r, h, _, _ in reports if r not in seen]
        if unseen:
            where = ", ".join(f"rank {r} on {h}" for r, h in unseen[:8]) + (" ..." if len(unseen) > 8 else "")
            problem = (f"OUTPUT_DIR={output_dir} is not one folder for every process: rank 0 on {host} cannot see "
                       f"the files that {where} wrote there. Checkpoints need a folder every node mounts (network "
                       "storage): set OUTPUT_DIR to such a path on every node")
    problem = broadcast_object(problem)
    barrier()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one per node: the folders of unshared storage too
        shutil.rmtree(output_dir / PROBE_FOLDER, ignore_errors=True)
    if problem:
        raise ValueError(problem)
    slowest = max(s for _, _, s, _ in reports)
    return StorageProbe(write_bytes_per_s=PROBE_BYTES / slowest)


def stop_window_note(checkpoint_bytes: int, probe: StorageProbe, window_s: Optional[float]) -> Optional[str]:
    """A warning when a checkpoint of ``checkpoint_bytes`` per rank is predicted to take more than half of the stop
    window ``window_s`` (None: not under torchrun, no window)."""
    seconds = checkpoint_bytes / probe.write_bytes_per_s
    if window_s is None or seconds <= window_s / 2:
        return None
    return (f"a checkpoint writes {checkpoint_bytes / 2**30:.1f} GiB per process, about {seconds:.0f} s at the "
            f"{probe.write_bytes_per_s / 2**20:.0f} MiB/s measured in OUTPUT_DIR, but a stop signal (a scheduler's "
            f"preemption) leaves TORCH_ELASTIC_SHUTDOWN_TIMEOUT={window_s:g} s before the workers are killed: raise "
            "it to at least twice that, and the scheduler's grace period with it (Slurm: KillWait, or sbatch "
            "--signal=TERM@<seconds>), or write checkpoints to faster storage")


def stop_window_s() -> Optional[float]:
    """The seconds torchrun gives its workers after a stop signal (None when not launched by torchrun)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        return float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
    except ValueError:
        return None
