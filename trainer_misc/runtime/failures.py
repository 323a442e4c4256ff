"""How a process ends: normally, on a fatal error on any rank, or on a stop signal, and what it leaves for its
launcher to report.

**Fatal errors** (:func:`run_main`): the entry point runs inside it. An exception on any rank prints one line,
``<prog>: rank <r>: <reason>``, and ends that process at once with exit status 1 -- without the ``finally:``
barrier of a normal shutdown, which would wait forever for ranks stuck in another collective. The other ranks then
fail fast too: gloo raises as soon as a peer's connection closes, torchrun stops the remaining workers when one
fails, and a rank that stops responding altogether is caught by the collective timeout
(``COLLECTIVE_TIMEOUT_MIN``, ``trainer_misc.runtime.distributed.collective_timeout``). Errors whose message says what
to do (bad files, flags, checkpoints, disk full, ...) print just that line; unexpected ones print their traceback
first.

**What the launcher reads** (``$PYRAMID_STATUS_DIR``, set by :mod:`trainer_misc.runtime.launcher`): each failure
line, so that the *first* failing rank's reason is the last line on the screen, after torchrun's own summary; and
one exit marker per process with its status, so that a launcher whose torchrun never returns (stopped, hung) knows
its workers are done.

**Stop signals** (:class:`StopSignals`): SIGTERM (what cluster schedulers send), SIGINT (Ctrl-C), SIGHUP and SIGUSR1
ask the loop to finish its current step, write a checkpoint with all ranks, and exit (status ``128 + signal``, as a
shell reports a signal). The ranks agree through one tiny all-reduce per step, on whether to stop and on which
signal asked, so a signal that reached only some of them stops all of them at the same step, and every rank names
it. A second signal, more than a second after the first (torchrun and schedulers forward one signal several times
within milliseconds), exits at once without a checkpoint. A torchrun worker also gets a SIGTERM from the kernel
when torchrun dies (:func:`exit_with_parent`), so no worker trains on unsupervised.

Importable without torch (entry points wrap ``main`` in :func:`run_main` before their flags are parsed); the
process-group helpers are imported where they are used.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from typing import Callable, NoReturn, Optional

from trainer_misc.runtime.status import mark_exit, record_failure

__all__ = ["RunStopped", "StopSignals", "exit_process", "exit_with_parent", "fatal_line", "run_main"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
REPEAT_WINDOW_S = 1.0

# Raised with a message that already says what is wrong and what to do: no traceback unless PYRAMID_TRACEBACK=1.
_CLEAR_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
                 IsADirectoryError, TimeoutError, FloatingPointError)


class RunStopped(Exception):
    """The loop stopped early on a signal after writing a checkpoint; ``exit_code`` is ``128 + signal``."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _peer_failure(text: str) -> bool:
    text = text.lower()
    return any(s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe",
                                   "communicator was aborted", "socket closed"))


def _timeout(text: str) -> bool:
    text = text.lower()
    return "timed out" in text or ("timeout" in text and ("collective" in text or "gloo" in text or "nccl" in text))


def _out_of_memory(exc: BaseException) -> bool:
    """torch's ``OutOfMemoryError`` (CUDA's caching allocator), recognised without importing torch."""
    return type(exc).__name__ == "OutOfMemoryError" or str(exc).startswith("CUDA out of memory")


def fatal_line(exc: BaseException, prog: str, rank: Optional[int] = None, oom_hint: str = "") -> str:
    """The one-line reason for ``exc`` on ``rank``: what happened and, for distributed failures, where to look;
    for running out of GPU memory, the allocator's figures and ``oom_hint`` (the entry point's levers)."""
    rank = _rank() if rank is None else rank
    text = " ".join(str(exc).split()) or type(exc).__name__
    if _out_of_memory(exc):
        # torch's message: "CUDA out of memory. Tried to allocate X. GPU 0 has a total capacity of Y of which Z is
        # free. ... (allocator advice)": keep the figures, drop the advice (the hint says what to change here).
        figures = ". ".join(text.split(". ")[:3]).rstrip(".")
        reason = f"out of GPU memory ({figures})." + (f" {oom_hint}" if oom_hint else "")
    elif _peer_failure(text):
        reason = f"stopped because another rank failed or was killed (its reason is above): {text[:200]}"
    elif _timeout(text) and isinstance(exc, RuntimeError):
        reason = (f"a collective timed out: another rank stopped responding (hung, stopped, or far slower than "
                  f"this one). If a slow phase is expected, raise COLLECTIVE_TIMEOUT_MIN. ({text[:300]})")
    elif isinstance(exc, SystemExit):
        reason = text
    else:
        reason = f"{type(exc).__name__}: {text}" if not isinstance(exc, _CLEAR_ERRORS + (OSError,)) else text
    return f"{prog}: rank {rank}: {reason}"


def exit_process(code: int) -> NoReturn:
    """End a process whose run finished (or stopped) normally on every rank, with exit status ``code``.

    A distributed process tears its group down (``destroy_process_group``), flushes, and leaves with ``os._exit``:
    gloo's worker threads can still abort the interpreter's own teardown now and then, after all the work is
    written (seen in CI: SIGABRT on one rank after the extraction report), and torchrun would report that as a failed
    run. Everything that matters is on disk by now (files are written to temp names and renamed). A single process
    exits the ordinary way.
    """
    distributed = False
    if "torch.distributed" in sys.modules:  # otherwise no process group can exist (e.g. after --help)
        from trainer_misc.runtime.distributed import destroy_process_group, get_world_size, is_dist_initialized

        distributed = is_dist_initialized() and get_world_size() > 1
        destroy_process_group()
    mark_exit(code)
    if not distributed:
        sys.exit(code)
    _flush()
    os._exit(code)


def exit_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent (torchrun) dies.

    ``torchrun`` starts each worker in its own session, so killing the launch's process group (or ``kill -9`` of
    torchrun) would leave the workers training with nobody supervising them. With this, they get a SIGTERM instead,
    which the training loop turns into "checkpoint and exit" (and which ends them at once before the loop starts).
    No-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent already died before we asked
        os.kill(os.getpid(), sig)


def _flush() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream: nothing left to flush into it


def run_main(main: Callable[[], int], prog: str, oom_hint: str = "") -> NoReturn:
    """Run an entry point's ``main()`` and exit with its status; see the module docstring for failures
    (``oom_hint``: what to change when the GPU runs out of memory, for the one-line reason).

    A normal return tears the process group down cleanly (every rank got there). :class:`RunStopped` exits with
    its code after the same clean teardown (all ranks stopped together). Anything else ends this process now.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: a dead torchrun means "stop"
        exit_with_parent(signal.SIGTERM)
    try:
        code = main()
    except RunStopped as stop:
        line = f"{prog}: {stop}"
        _say(line)
        if _rank() == 0:
            record_failure(line, primary=True)
        _flush()
        exit_process(stop.exit_code)
    except SystemExit as e:
        if e.code in (None, 0):
            exit_process(0)
        if not isinstance(e.code, str):  # argparse and friends printed their message already
            reason = getattr(e, "reason", None)  # e.g. the data check's verdict, after its summary
            if reason:
                line = f"{prog}: rank {_rank()}: {reason}"
                _say(line)
                record_failure(line, primary=True)
            _flush()
            mark_exit(e.code if isinstance(e.code, int) else 1)
            os._exit(e.code if isinstance(e.code, int) else 1)
        _die(f"{prog}: rank {_rank()}: {e.code}", e, show_traceback=False)
    except BaseException as e:  # noqa: BLE001 - every failure must end the process, loudly and at once
        text = str(e)
        clear = isinstance(e, _CLEAR_ERRORS) or _peer_failure(text) or _timeout(text) or _out_of_memory(e) or \
            type(e).__module__.startswith("trainer_misc")
        _die(fatal_line(e, prog, oom_hint=oom_hint), e,
             show_traceback=not clear or os.environ.get("PYRAMID_TRACEBACK") == "1")
    _flush()
    exit_process(code)


def _say(line: str) -> None:
    """Print ``line`` to stderr in one write: ranks fail at the same moment, and ``print``'s separate newline let
    two ranks' lines run into one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _die(line: str, exc: BaseException, show_traceback: bool) -> NoReturn:
    if show_traceback:
        traceback.print_exception(exc, file=sys.stderr)
    _say(line)
    record_failure(line, primary=not (_peer_failure(str(exc)) or _timeout(str(exc))))
    _flush()
    mark_exit(1)
    os._exit(1)


class StopSignals:
    """SIGTERM / SIGINT / SIGUSR1 handlers for the training loop (see the module docstring).

    ``install()`` in the main thread; ``should_stop()`` once per step on every rank (collective); ``restore()`` when
    the loop ends. Forked children (DataLoader workers) keep the default behaviour: their parent decides.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None  # the signal this process received
        self.agreed: Optional[int] = None  # the signal the ranks stop for (set by should_stop; the same on all)
        self._first_at = 0.0
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread; the caller's handlers stay
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def signal_name(self) -> str:
        """The signal the ranks stopped for (whichever rank received it), e.g. ``SIGTERM``."""
        signum = self.agreed if self.agreed is not None else self.signum
        return signal.Signals(signum).name if signum is not None else "none"

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001 - signal handler signature
        if os.getpid() != self._pid:  # a forked DataLoader worker: behave as if we were not there
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self._first_at = signum, now
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                print(f"rank {_rank()}: {name} received: finishing the current step, then writing a checkpoint "
                      "(send it again to exit at once, without one)", file=sys.stderr, flush=True)
        elif now - self._first_at > REPEAT_WINDOW_S:
            print(f"rank {_rank()}: second signal ({name}): exiting now without a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)

    def should_stop(self) -> bool:
        """True on every rank when any rank received a stop signal, and then :attr:`signal_name` names that signal
        on every rank. Collective (one host-side all-reduce): call on all ranks each step."""
        signum = self.signum or 0
        if "torch.distributed" in sys.modules:  # otherwise there is no process group to agree with
            from trainer_misc.runtime.distributed import all_reduce_host

            signum = int(all_reduce_host([signum], op="max")[0])
        if signum:
            self.agreed = signum
        return bool(signum)
