"""Shared fixtures.

`golden_dir` points at the reference-written vectors in ``tests/golden`` (see its README: they were produced by
running the public reference implementation on CPU; data only, no reference code). They ship with the repository,
so every clone runs the parity tests; a missing golden folder or file is a failure, never a skip.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


# Every process a test starts (scripts, tools, torchrun workers) imports this checkout, whichever checkout
# `pip install -e .` points python3 at.
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

# Parallel workers (pytest-xdist): each launches 2-process runs through the scripts, whose rendezvous port defaults to
# 29500; give every worker its own so two concurrent launches never meet.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["MASTER_PORT"] = str(29500 + 10 * (1 + int(os.environ["PYTEST_XDIST_WORKER"].lstrip("gw") or 0)))


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pytest.ini): at most 4 workers, at most one per core. Most tests wait on process start-up and
    2-process launches, so 2 workers on a 2-core machine take about half the wall time of one."""
    return max(1, min(4, os.cpu_count() or 1))


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


# A tiny miniFLUX checkpoint folder (tools/build_tiny_checkpoint.py) and the generation pipeline loaded from it, once
# per test module (a module may change the pipeline's state).
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tools.build_tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_model: Path):
    from pyramid_dit.pipeline import PyramidFlowPipeline

    return PyramidFlowPipeline.from_pretrained(tiny_model, device="cpu")
