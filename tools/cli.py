"""What the command-line tools share."""
from __future__ import annotations

import argparse

__all__ = ["DefaultsHelp"]


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default, except None: those flags' help says what happens without them."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)
