"""What a launched process leaves for its launcher in ``$PYRAMID_STATUS_DIR``: its failure line, if any, and its
exit status. The launcher (:mod:`trainer_misc.runtime.launcher`) repeats the first failure as the last line of a
failed launch, and uses the exit markers to notice when every worker has ended but torchrun does not return.
Importable without torch (the launcher reads these files before anything heavy loads)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["STATUS_DIR_ENV", "exit_codes", "first_failure", "mark_exit", "record_failure"]

STATUS_DIR_ENV = "PYRAMID_STATUS_DIR"


def _status_file(name: str, text: str) -> None:
    """Leave ``text`` as ``$PYRAMID_STATUS_DIR/name`` (set by the launcher; nothing to do without one)."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder:
        return
    try:
        tmp = os.path.join(folder, f".{name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(folder, name))
    except OSError as e:
        print(f"note: could not leave {name} for the launcher in {folder}: {e}", file=sys.stderr, flush=True)


def record_failure(line: str, primary: bool) -> None:
    """A failure line for the launcher; names sort primary failures first, then by time."""
    _status_file(f"fail-{0 if primary else 1}-{time.time_ns():020d}-rank{int(os.environ.get('RANK', '0')):05d}.txt",
                 line + "\n")


def mark_exit(code: int) -> None:
    """This process's exit status for the launcher (one marker per local rank)."""
    _status_file(f"exit-local{int(os.environ.get('LOCAL_RANK', '0')):05d}", str(int(code)))


def exit_codes(folder: Path) -> dict[str, int]:
    """The exit markers in a status folder: local rank marker -> exit status."""
    out = {}
    for path in Path(folder).glob("exit-local*"):
        try:
            out[path.name] = int(path.read_text().strip())
        except (OSError, ValueError):
            continue  # being replaced right now: read again on the next poll
    return out


def first_failure(folder: Path) -> Optional[str]:
    """The line of the first failure that is not a consequence of another (primary first, then by time)."""
    lines = sorted(Path(folder).glob("fail-*.txt"))
    return lines[0].read_text(encoding="utf-8").strip() if lines else None
