"""Starting a script's processes and watching them until they end: the one launcher behind every ``scripts/*.sh``.

A script sets its variables and runs ``python3 -m train.launch ...`` or ``python3 -m tools.launch ...``; those turn the
variables into the entry point's flags and check them (seconds, before anything heavy loads), then call
:func:`launch` here, which

* decides the processes of this node: ``GPUS`` (default: the visible GPUs, 1 without), ``NNODES``, ``NODE_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``, taken from Slurm's variables when the job runs under Slurm and they are not set
  (:func:`node_layout`), and, across nodes, the network interface that reaches ``MASTER_ADDR`` for gloo and NCCL
  (:func:`pick_interface`);
* runs one process directly (it *becomes* the entry point: signals reach it as they would), or several under
  ``torchrun``, supervised (:class:`Supervisor`):

  - SIGTERM, SIGINT, SIGHUP and SIGUSR1 sent to the launcher are passed to torchrun once, which passes them to
    the workers (they finish the step, write a checkpoint and exit);
  - a launcher that dies (``kill -9``) takes its workers with it: torchrun gets a SIGTERM from the kernel
    (``PR_SET_PDEATHSIG``) and forwards it, and each worker gets one too if torchrun dies
    (``trainer_misc.runtime.failures.run_main``);
  - when every worker of this node has ended but torchrun does not return (stopped, hung), the launcher ends it
    after :data:`STRAGGLER_GRACE_S` and returns the workers' status;
  - the last line of a failed launch is the first failing rank's one-line reason (workers leave it in
    ``$PYRAMID_STATUS_DIR``), not torchrun's summary.

Importable without torch; torch is only asked for the GPU count on machines with an NVIDIA driver.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NoReturn, Optional, Sequence

from trainer_misc.runtime.arguments import ConfigError, integer
from trainer_misc.runtime.status import STATUS_DIR_ENV, exit_codes, first_failure

__all__ = ["FORWARDED_SIGNALS", "NodeLayout", "STRAGGLER_GRACE_S", "Supervisor", "count_local_gpus", "launch",
           "launch_command", "node_layout", "pick_interface", "slurm_first_host"]

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
STRAGGLER_GRACE_S = 15.0  # how long torchrun may outlive all of this node's workers before it is ended
DEFAULT_PORT = 29500


def say(prog: str, message: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ processes per node

def count_local_gpus() -> int:
    """The NVIDIA GPUs this process may use. Without an NVIDIA driver (no ``nvidia-smi``, no ``/dev/nvidiactl``)
    the answer is 0 without importing torch (seconds on a busy machine); otherwise torch counts them, honouring
    ``CUDA_VISIBLE_DEVICES``."""
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidiactl").exists():
        return 0
    import torch

    return torch.cuda.device_count()


@dataclass(frozen=True)
class NodeLayout:
    """The processes of one launch as this node sees them."""

    gpus: int                 # processes on this node (GPUS)
    nnodes: int               # NNODES
    node_rank: int            # NODE_RANK
    master_addr: str          # MASTER_ADDR (127.0.0.1 on one node)
    master_port: int          # MASTER_PORT
    have_gpu: bool            # this node has an NVIDIA GPU
    source: str               # where the layout came from, for the launch line ("the environment", "Slurm", ...)

    @property
    def world_size(self) -> int:
        return self.gpus * self.nnodes


def _env(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def _int_var(env: Mapping[str, str], name: str, lo: int, hi: int) -> Optional[int]:
    raw = _env(env, name)
    if not raw:
        return None
    try:
        return integer(lo, hi)(raw)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"{name}={raw}: {e}") from None


def slurm_first_host(nodelist: str) -> str:
    """The first host name of a Slurm node list (``SLURM_JOB_NODELIST``): ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    first = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not first:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read its first host; set MASTER_ADDR")
    prefix, ranges = first.groups()
    if not ranges:
        return prefix
    start = re.split(r"[-,]", ranges)[0]
    return prefix + start


def node_layout(env: Mapping[str, str], *, default_gpus: Optional[int] = None) -> NodeLayout:
    """Read and check ``GPUS``, ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.

    Unset ones come from Slurm when the job runs under it (``SLURM_JOB_NUM_NODES``, ``SLURM_NODEID``, the first
    host of ``SLURM_JOB_NODELIST``, ``SLURM_GPUS_ON_NODE``; one task per node), else: one node, the visible GPU
    count (``default_gpus`` when given, e.g. generation's 1), port 29500. With several nodes a missing
    ``MASTER_ADDR`` or ``NODE_RANK`` is refused: a guessed one would make a node wait on itself, a hang rather than
    an error.
    """
    slurm = bool(_env(env, "SLURM_JOB_ID")) and bool(_env(env, "SLURM_JOB_NUM_NODES") or _env(env, "SLURM_NNODES"))
    derived: list[str] = []
    gpu_count = count_local_gpus()

    def pick(name: str, slurm_names: Sequence[str], lo: int, hi: int) -> Optional[int]:
        value = _int_var(env, name, lo, hi)
        if value is None and slurm:
            for s in slurm_names:
                raw = _env(env, s)
                if raw:
                    value = _int_var({name: raw.split("(")[0]}, name, lo, hi)
                    derived.append(f"{name}={value} from {s}")
                    break
        return value

    nnodes = pick("NNODES", ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"), 1, 100_000) or 1
    node_rank = pick("NODE_RANK", ("SLURM_NODEID",), 0, 100_000)
    gpus = pick("GPUS", ("SLURM_GPUS_ON_NODE",), 1, 1024)
    if gpus is None:
        gpus = default_gpus or max(gpu_count, 1)
    port = _int_var(env, "MASTER_PORT", 1, 65535) or DEFAULT_PORT
    addr = _env(env, "MASTER_ADDR")
    if not addr and slurm and nnodes > 1:
        addr = slurm_first_host(_env(env, "SLURM_JOB_NODELIST") or _env(env, "SLURM_NODELIST"))
        derived.append(f"MASTER_ADDR={addr} (first host of the Slurm node list)")
    if slurm and nnodes > 1:
        tasks = _env(env, "SLURM_NTASKS_PER_NODE")
        if tasks and tasks.split("(")[0] != "1":
            raise ConfigError(f"SLURM_NTASKS_PER_NODE={tasks}: run the script as one task per node (srun "
                              "--ntasks-per-node=1); it starts GPUS processes on each node itself")
    if nnodes > 1:
        if not addr or node_rank is None:
            raise ConfigError(f"NNODES={nnodes} needs MASTER_ADDR (address of the node with NODE_RANK=0, reachable "
                              f"from every node) and NODE_RANK (0..{nnodes - 1}, different on each node) set on every "
                              f"node; got MASTER_ADDR='{addr}' NODE_RANK='{'' if node_rank is None else node_rank}'")
        if node_rank >= nnodes:
            raise ConfigError(f"NODE_RANK={node_rank} must be in 0..{nnodes - 1} (NNODES={nnodes})")
    source = "Slurm (" + ", ".join(derived) + ")" if derived else "the environment"
    return NodeLayout(gpus=gpus, nnodes=nnodes, node_rank=node_rank or 0, master_addr=addr or "127.0.0.1",
                      master_port=port, have_gpu=gpu_count > 0, source=source)


# ------------------------------------------------------------------------------------------------ network interface

def _interface_of(ip: str) -> Optional[str]:
    """The interface holding the local address ``ip`` (Linux, from ``ip -o addr``); None if unknown."""
    try:
        out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[3].split("/")[0] == ip:
            return parts[1].rstrip(":").split("@")[0]
    return None


def pick_interface(master_addr: str, master_port: int) -> tuple[Optional[str], str]:
    """``(interface, local address)`` this host uses to reach ``master_addr``: the one a datagram socket connected
    there would send from (no packet is sent). ``interface`` is None when it cannot be named."""
    try:
        target = socket.getaddrinfo(master_addr, master_port, proto=socket.IPPROTO_UDP)[0]
    except socket.gaierror as e:
        raise ConfigError(f"MASTER_ADDR={master_addr}: cannot resolve it on this node ({e}); set it to an address "
                          "every node can reach") from None
    with socket.socket(target[0], socket.SOCK_DGRAM) as s:
        try:
            s.connect(target[4])
            local = s.getsockname()[0]
        except OSError as e:
            raise ConfigError(f"MASTER_ADDR={master_addr}: no route to it from this node ({e})") from None
    return _interface_of(local), local


def network_env(layout: NodeLayout, env: Mapping[str, str], prog: str) -> dict[str, str]:
    """Across nodes: ``GLOO_SOCKET_IFNAME`` (the host group every step uses) and ``NCCL_SOCKET_IFNAME`` set to the
    interface that routes to ``MASTER_ADDR``, unless the user set them; said on the launch line. Without it gloo
    binds to whatever this host's name resolves to, often a loopback address (Debian's ``127.0.1.1``) the other
    nodes cannot reach."""
    if layout.nnodes == 1:
        return {}
    interface, local = pick_interface(layout.master_addr, layout.master_port)
    if ipaddress.ip_address(local).is_loopback:
        say(prog, f"MASTER_ADDR={layout.master_addr} is reached through loopback ({local}): right when every node runs "
                  "on this host; across hosts set MASTER_ADDR to node 0's address on the network they share")
    out: dict[str, str] = {}
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if _env(env, var):
            say(prog, f"{var}={env[var]} (yours)")
        elif interface:
            out[var] = interface
    if out:
        say(prog, f"network interface {interface} ({local}) reaches MASTER_ADDR={layout.master_addr}: "
                  + ", ".join(f"{k}={v}" for k, v in out.items()) + " (set them yourself to choose another)")
    return out


# ------------------------------------------------------------------------------------------------ running

def _die_with_parent(parent: int) -> None:
    """In the child, before exec: ask the kernel for a SIGTERM when the launcher dies (Linux), and stop at once if
    it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(143)


class Supervisor:
    """Runs torchrun in its own session and watches it and this node's workers (see the module docstring)."""

    def __init__(self, cmd: Sequence[str], env: Mapping[str, str], local_workers: int, prog: str,
                 status_dir: Path) -> None:
        self.cmd, self.env, self.local_workers, self.prog = list(cmd), dict(env), local_workers, prog
        self.status_dir = status_dir
        self.proc: Optional[subprocess.Popen] = None
        self.signals: list[int] = []

    def _forward(self, signum: int, frame) -> None:
        self.signals.append(signum)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def run(self) -> int:
        parent = os.getpid()
        previous = {sig: signal.signal(sig, self._forward) for sig in FORWARDED_SIGNALS}
        try:
            self.proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True,
                                         preexec_fn=lambda: _die_with_parent(parent))
            return self._wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _wait(self) -> int:
        """torchrun's end, or this node's workers' when torchrun outlives them; the status is the workers' own
        when all of them left one (a worker stopped by a signal exits ``128 + signal`` after its checkpoint, which
        torchrun reports as a plain failure), else torchrun's."""
        assert self.proc is not None
        all_ended_at: Optional[float] = None
        while True:
            try:
                code = self.proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if len(exit_codes(self.status_dir)) < self.local_workers:
                all_ended_at = None
                continue
            all_ended_at = all_ended_at or time.monotonic()
            if time.monotonic() - all_ended_at < STRAGGLER_GRACE_S:
                continue
            say(self.prog, f"all {self.local_workers} workers of this node ended {STRAGGLER_GRACE_S:.0f} s ago but "
                           "torchrun did not return (stopped or hung); ending it")
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
            code = self.proc.wait()
            break
        workers = exit_codes(self.status_dir)
        if len(workers) >= self.local_workers:
            return max(workers.values())
        return code


def launch_command(entry: Sequence[str], layout: NodeLayout) -> list[str]:
    """The command that runs ``entry`` (``[script.py, flags...]``) as ``layout`` says: the script itself for one
    process, else torchrun over ``GPUS`` processes (standalone on one node, the rendezvous across nodes)."""
    if layout.world_size == 1:
        return [sys.executable, *entry]
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if layout.nnodes == 1:
        cmd += ["--standalone", "--nproc_per_node", str(layout.gpus)]
    else:
        cmd += ["--nnodes", str(layout.nnodes), "--node_rank", str(layout.node_rank), "--master_addr",
                layout.master_addr, "--master_port", str(layout.master_port), "--nproc_per_node", str(layout.gpus)]
    return cmd + list(entry)


def launch(entry: Sequence[str], layout: NodeLayout, *, prog: str, env: Optional[Mapping[str, str]] = None,
           threads_per_process: Optional[int] = None) -> NoReturn:
    """Run ``entry`` (``[script.py, flags...]``) as the launch ``layout`` describes and exit with its status.

    One process on one node replaces this one (``exec``). Otherwise torchrun runs ``GPUS`` workers here,
    supervised (:class:`Supervisor`); a failure's last line is the first failing rank's reason. With
    ``PRINT_LAUNCH=1`` the command is printed (one argument per line) instead of run: what a script would start.
    """
    run_env = {k: v for k, v in (os.environ if env is None else env).items()
               if v or k not in ("GPUS", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}  # unset, not ""
    cmd = launch_command(entry, layout)
    if run_env.get("PRINT_LAUNCH", "") not in ("", "0"):
        print("\n".join(cmd), flush=True)
        sys.exit(0)
    if not layout.have_gpu:
        run_env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would guess it on every process and say so
    if layout.world_size == 1:
        sys.stdout.flush()
        os.execve(cmd[0], cmd, run_env)
    run_env.update(network_env(layout, run_env, prog))
    if layout.gpus > 1 and "OMP_NUM_THREADS" not in run_env:
        # torchrun's own default with several processes per node, set here so it does not print a 4-line banner.
        run_env["OMP_NUM_THREADS"] = str(threads_per_process or 1)
    run_env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")
    run_env["PET_SIGNALS_TO_HANDLE"] = run_env.get("PET_SIGNALS_TO_HANDLE") or "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    status_dir = Path(tempfile.mkdtemp(prefix="pyramid_status."))
    run_env[STATUS_DIR_ENV] = str(status_dir)
    try:
        code = Supervisor(cmd, run_env, layout.gpus, prog, status_dir).run()
        if code != 0:
            line = first_failure(status_dir)
            if line:
                print(f"\n{line}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)
    sys.exit(code if 0 <= code < 256 else 128 - code if code < 0 else 1)
