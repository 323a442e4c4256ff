"""The held-out split (``EVAL_FRACTION``): which annotation lines are kept out of training for the evaluation loss.

Decided here only, from the annotation's line count and the run's seed, and read by the data check
(:func:`trainer_misc.data.check.check_data`), which hands the two parts to the dataset builders (``train/run.py``):
training never sees a held-out line, and the split is the same on every rank, in every resume and for every
process count, because it depends on nothing else.

Every non-blank line ``i`` (the annotation's ``index``, invalid lines included, so a line that breaks later moves no
other line) gets a key, the ``i``-th number of one seeded stream (:func:`line_keys`): a pure function of
``(seed, i)``. The ``round(fraction * lines)`` lines with the smallest keys are held out (at least one when the
fraction is above 0). Compared with a per-line coin flip this holds out exactly the fraction asked for, which
matters on small data sets (2 of 8 clips, not "0 to 5"); appending lines to the file moves at most the lines at the
margin of the split.

Importable without torch.
"""
from __future__ import annotations

import numpy as np

__all__ = ["held_out_count", "held_out_lines", "line_keys"]

_STREAM = 0x4556414C  # "EVAL": keeps the split's stream apart from the sampler's [seed, epoch] streams


def line_keys(seed: int, num_lines: int) -> np.ndarray:
    """``[num_lines]`` keys in [0, 1); key ``i`` depends only on ``(seed, i)`` (a prefix of one stream)."""
    return np.random.default_rng([_STREAM, int(seed)]).random(int(num_lines))


def held_out_count(num_lines: int, fraction: float) -> int:
    """How many of ``num_lines`` lines ``fraction`` holds out: rounded half up, at least 1 when ``fraction > 0``."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"held-out fraction must be in [0, 1], got {fraction}")
    if fraction == 0 or num_lines == 0:
        return 0
    return min(num_lines, max(1, int(fraction * num_lines + 0.5)))


def held_out_lines(num_lines: int, fraction: float, seed: int) -> frozenset[int]:
    """The line indices (0-based, non-blank lines) held out for evaluation; see the module docstring."""
    count = held_out_count(num_lines, fraction)
    if count == 0:
        return frozenset()
    order = np.argsort(line_keys(seed, num_lines), kind="stable")
    return frozenset(int(i) for i in order[:count])
