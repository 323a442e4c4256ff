"""Checked command-line values: bounded argparse types, and messages that name a setting the way its user set it.

Every entry point (training, extraction, generation) declares its flags with these types, so each value is
checked once, with its range, where the flag is declared. The launch scripts do not check anything themselves:
their launcher (:mod:`trainer_misc.runtime.launcher`) turns the script's variables into these flags and parses
them with the entry point's own parser before any process starts, so a bad ``BATCH_SIZE`` is refused in about a
second, named ``BATCH_SIZE=6`` rather than ``--batch_size 6`` (:class:`Naming`).

Importable without torch: nothing heavy loads before the checks have passed.
"""
from __future__ import annotations

import argparse
import math
import re
from typing import Callable, Mapping, Optional, Sequence

__all__ = ["CheckedParser", "ConfigError", "Naming", "integer", "number", "parse_checked", "switch"]


class ConfigError(ValueError):
    """A setting that cannot run. The message names the setting (flag or script variable) and what to change."""


def integer(lo: int, hi: int, *, multiple_of: int = 1, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]`` (and a multiple of ``multiple_of``), else a message that says
    the allowed range (``why`` explains a multiple)."""
    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, {_range(lo, hi, multiple_of)}{why}") from None
        if not lo <= value <= hi or value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be {_range(lo, hi, multiple_of)}{why}")
        return value

    parse.__name__ = "integer"
    return parse


def _range(lo: int, hi: int, multiple_of: int) -> str:
    if multiple_of > 1:
        return f"a multiple of {multiple_of} from {max(lo, multiple_of)} to {hi}"
    return f"from {lo} to {hi}"


def number(lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float within the bounds (open or closed at each end)."""
    def describe() -> str:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi:g}")
        return "a number" + (" " + " and ".join(parts) if parts else "")

    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {describe()}") from None
        if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) or \
                (hi is not None and (value >= hi if hi_open else value > hi)):
            raise argparse.ArgumentTypeError(f"must be {describe()}")
        return value

    parse.__name__ = "number"
    return parse


def switch(text: str) -> bool:
    """A ``0`` / ``1`` script variable (``OFFLOAD``, ``LOAD_TEXT_ENCODER``, ...)."""
    if str(text).strip() not in ("0", "1"):
        raise argparse.ArgumentTypeError("must be 0 or 1")
    return str(text).strip() == "1"


class CheckedParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors can be raised as :class:`ConfigError` instead of exiting (the launcher
    reports them in terms of the script's variables). ``raise_errors`` is off for command-line use: argparse's usual
    usage line and exit status 2."""

    raise_errors = False

    def error(self, message: str):
        if self.raise_errors:
            raise ConfigError(message)
        super().error(message)


_ARGUMENT = re.compile(r"^argument (--[\w-]+)(?:/[^:]*)?: (.*)$", re.S)


class Naming:
    """How a message names a setting: ``--batch_size 6`` on the command line, ``BATCH_SIZE=6`` when a launch script
    set it from its variable (``variables`` maps flags to the script's variable names and ``values`` holds what each
    variable was)."""

    def __init__(self, args: argparse.Namespace, variables: Optional[Mapping[str, str]] = None,
                 values: Optional[Mapping[str, str]] = None) -> None:
        self.args = args
        self.variables = dict(variables or {})
        self.values = dict(values or {})

    def __call__(self, flag: str) -> str:
        var = self.variables.get(flag)
        if var is not None:
            return f"{var}={self.values.get(var, self._value(flag))}"
        return f"{flag} {self._value(flag)}".rstrip()

    def var(self, flag: str) -> str:
        """The name alone: the variable when a script set it, else the flag."""
        return self.variables.get(flag, flag)

    def _value(self, flag: str) -> str:
        value = getattr(self.args, flag.lstrip("-"), "")
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, (list, tuple)):
            return " ".join(map(str, value))
        return "" if value is None else str(value)

    def argparse_error(self, message: str) -> str:
        """argparse's ``argument --flag: reason`` said with the setting's own name."""
        match = _ARGUMENT.match(message)
        if not match:
            return message
        flag, reason = match.groups()
        var = self.variables.get(flag)
        if var is None:
            return message
        return f"{var}={self.values.get(var, '')}: {reason}"


def parse_checked(parser: CheckedParser, argv: Optional[Sequence[str]],
                  check: Callable[[argparse.Namespace, Naming], None],
                  variables: Optional[Mapping[str, str]] = None,
                  values: Optional[Mapping[str, str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with ``parser``, then run ``check(args, naming)``: the one way every entry point reads its flags.

    Without ``variables`` (the command line) a bad flag prints argparse's usage line and exits 2, and ``check``
    raises :class:`ConfigError` naming flags. With them (a launch script's launcher, ``variables`` mapping flags to
    the script's variable names and ``values`` holding what each was set to) every problem raises
    :class:`ConfigError` worded in the script's variables.
    """
    if variables is None:
        args = parser.parse_args(argv)
        check(args, Naming(args))
        return args
    naming = Naming(argparse.Namespace(), variables, values)
    parser.raise_errors = True
    try:
        try:
            args = parser.parse_args(list(argv or []))
        except argparse.ArgumentError as e:
            raise ConfigError(naming.argparse_error(str(e))) from None
        except ConfigError as e:
            raise ConfigError(naming.argparse_error(str(e))) from None
    finally:
        parser.raise_errors = False
    naming.args = args
    check(args, naming)
    return args
