"""Shared fixtures.

`golden_dir` points at the reference-written vectors in ``tests/golden`` (see its README: they were produced by
running the public reference implementation on CPU; data only, no reference code). They ship with the repository,
so every clone runs the parity tests; a missing golden folder or file is a failure, never a skip.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    assert GOLDEN_DIR.is_dir(), (f"golden vectors missing at {GOLDEN_DIR}: they are part of the repository "
                                 "(restore them with `git checkout -- tests/golden`)")
    return GOLDEN_DIR


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The golden files were produced with 2 threads; fixed thread counts keep float reductions repeatable.
    torch.set_num_threads(2)
    yield
