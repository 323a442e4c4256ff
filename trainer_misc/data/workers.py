"""How many data-loading worker processes a process may start: what was asked for, capped by the machine.

Every DataLoader worker is a forked process (a few hundred MB each once it has touched the parent's pages), so a
count nobody bounded (``NUM_WORKERS=99999999``) would fork until the host runs out of memory. The cap is the CPUs
this process may run on shared by the processes of its node, and the memory available shared the same way at
:data:`WORKER_BUDGET_BYTES` each; ``auto`` asks for :data:`AUTO_WORKERS`. A cap that changes the request is said in
one line.
"""
from __future__ import annotations

import os
from typing import Optional, Union

__all__ = ["AUTO_WORKERS", "WORKER_BUDGET_BYTES", "data_workers"]

AUTO_WORKERS = 4
WORKER_BUDGET_BYTES = 1 << 30  # memory planned per worker when capping by what the machine has available


def _available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def data_workers(requested: Union[int, str], processes_on_node: int, *, what: str = "NUM_WORKERS"
                 ) -> tuple[int, Optional[str]]:
    """``(workers per process, note or None)`` for ``requested`` (a count or ``"auto"``) when
    ``processes_on_node`` processes share this machine."""
    processes = max(1, processes_on_node)
    cap = _cpus() // processes
    available = _available_bytes()
    if available is not None:
        cap = min(cap, available // 2 // (WORKER_BUDGET_BYTES * processes))
    cap = max(0, cap)
    want = AUTO_WORKERS if requested == "auto" else int(requested)
    if want <= cap:
        return want, None
    memory = f", {available / 2**30:.0f} GiB available" if available is not None else ""
    return cap, (f"{what}={requested}: {cap} data-loading worker(s) per process ({_cpus()} CPUs{memory}, "
                 f"{processes} process(es) on this node)")
