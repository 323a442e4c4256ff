"""Progress that reads well on a terminal and in a log file.

On a terminal it is tqdm's bar, redrawn in place. Redirected to a file or a pipe (``> run.log``, ``| tee``, a
cluster's job log), a redrawn bar is one line that grows until the job ends and shows nothing meanwhile; there a
plain line is printed at most every :data:`LOG_EVERY_S` seconds, and once at the end.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

__all__ = ["LOG_EVERY_S", "progress"]

LOG_EVERY_S = 30.0


class _Lines:
    """tqdm's interface (update, set_postfix, close, iteration) printing whole lines."""

    def __init__(self, iterable: Optional[Iterable], total: Optional[int], desc: str, unit: str, initial: int,
                 file: TextIO, every_s: float) -> None:
        self.iterable, self.total, self.desc, self.unit, self.n = iterable, total, desc, unit, initial
        self.file, self.every_s = file, every_s
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.initial, self.closed = initial, False

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "_Lines":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = self.n - self.initial
        rate = f", {done / elapsed:.2f} {self.unit}/s" if elapsed > 0 and done else ""
        total = f"/{self.total}" if self.total is not None else ""
        return f"{self.desc}: {self.n}{total} {self.unit}{rate}, {elapsed:.0f} s{self.postfix}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(self._line(), file=self.file, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = "".join(f", {k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            print(self._line(), file=self.file, flush=True)


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "", unit: str = "it",
             initial: int = 0, disable: bool = False, file: Optional[TextIO] = None,
             every_s: float = LOG_EVERY_S, **tqdm_kwargs: Any):
    """A progress reporter with tqdm's interface: tqdm on a terminal, a line every ``every_s`` seconds (and at the
    end) otherwise. ``disable`` turns both off."""
    file = file or sys.stderr
    if disable:
        from tqdm import tqdm

        return tqdm(iterable, total=total, disable=True)
    if file.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file, dynamic_ncols=True,
                    **tqdm_kwargs)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return _Lines(iterable, total, desc, unit, initial, file, every_s)
