"""Launch a test file's worker on 2 local processes with torchrun (gloo) and collect what each rank reported.

The worker writes ``rank<r>.json`` into a result folder; a launch without both files fails the test with the
launcher's output. (A rare gloo abort after all work is done, documented in the CPU notes, does not invalidate
the reports, so the exit status alone decides nothing.)
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("ACCELERATE_USE_CPU", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(worker: Path, arg: Path, result_dir: Path, *, timeout: float, what: str = "launch",
                  env: Optional[dict[str, str]] = None) -> list[dict]:
    """``torchrun --nproc_per_node 2 worker arg`` with a clean launcher environment (one thread per process,
    TorchDynamo off: nothing here compiles, and DeepSpeed would load inductor at import otherwise) plus ``env``;
    returns the two ranks' ``result_dir/rank<r>.json``."""
    run_env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    run_env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TORCHDYNAMO_DISABLE="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(worker), str(arg)]
    proc = subprocess.run(cmd, env=run_env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    reports = [result_dir / f"rank{r}.json" for r in range(2)]
    if not all(p.is_file() for p in reports):
        pytest.fail(f"{what} failed (rc {proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return [json.loads(p.read_text()) for p in reports]
