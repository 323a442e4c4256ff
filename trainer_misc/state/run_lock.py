"""One run per output folder: an exclusive lock on ``<output_dir>/.lock`` held by rank 0 for the whole run.

Two runs in one ``OUTPUT_DIR`` would delete each other's half-written checkpoints and resume from different ones.
The lock is an OS lock (``flock``) on a file, so it disappears with the process that held it: a run killed with
``kill -9`` or a crashed node leaves no stale lock to clean up by hand (the file stays, unlocked, and says who held
it last). On a network filesystem without ``flock`` support the run goes on with a warning. Multi-node runs need
``OUTPUT_DIR`` on a filesystem every node sees anyway; rank 0 alone takes the lock.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from trainer_misc.runtime.distributed import broadcast_object, get_rank

__all__ = ["LOCK_NAME", "OutputDirLock", "RunLockedError", "lock_output_dir"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the output folder's lock."""


_HELD: dict[Path, "OutputDirLock"] = {}  # locks this process holds: a later run in the same process reuses them


class OutputDirLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/.lock``; released by :meth:`release` or process exit.

    Re-entrant within one process (a second ``train()`` call after a failed one gets the same lock); exclusive
    between processes.
    """

    def __init__(self, folder: os.PathLike | str) -> None:
        self.path = (Path(folder) / LOCK_NAME).resolve()
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputDirLock":
        import fcntl

        if self.path in _HELD:
            return _HELD[self.path]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(self.path)
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by another run ({holder}); two runs in one output "
                                 "folder would overwrite each other's checkpoints. Wait for it to finish, stop it, "
                                 "or choose another OUTPUT_DIR") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                logger.warning("cannot lock %s (%s): this filesystem has no flock support, so a second run in the "
                               "same output folder would not be detected", self.path, e.strerror)
                return self
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                 "command": " ".join(sys.argv)[:500]}).encode())
        os.fsync(fd)
        self._fd = fd
        _HELD[self.path] = self
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            _HELD.pop(self.path, None)

    @property
    def held(self) -> bool:
        return self._fd is not None


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on {info['host']}, started {started}: {info.get('command', '?')}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def lock_output_dir(folder: os.PathLike | str) -> Optional[OutputDirLock]:
    """Rank 0 locks ``folder``; every rank raises :class:`RunLockedError` when that fails. Collective."""
    lock: Optional[OutputDirLock] = None
    error: Optional[str] = None
    if get_rank() == 0:
        try:
            lock = OutputDirLock(folder).acquire()
        except RunLockedError as e:
            error = str(e)
    error = broadcast_object(error)
    if error is not None:
        raise RunLockedError(error)
    return lock
