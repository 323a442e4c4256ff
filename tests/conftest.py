"""Shared fixtures.

`golden_dir` points at the reference-written vectors in ``../shared/golden`` (see its README). A user's clone has
no ``../shared`` beside it; tests that need it skip with a reason instead of failing.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("PYRAMID_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN_DIR} (CI places ../shared beside the clone; "
                    "set PYRAMID_GOLDEN_DIR to point elsewhere)")
    return GOLDEN_DIR


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The golden files were produced with 2 threads; fixed thread counts keep float reductions repeatable.
    torch.set_num_threads(2)
    yield
