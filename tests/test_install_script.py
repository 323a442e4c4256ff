"""scripts/install.sh chooses the torch build before installing the repository (``pip install -e .``, which brings
requirements.txt; dry run: the pip commands it would run). A CPU-only machine must not get the default index's CUDA
build (~6 GB); a GPU machine keeps it."""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9/whl/cpu"  # the discard port: connection refused at once


@pytest.fixture()
def bin_dir(tmp_path) -> Path:
    """A PATH folder with a python3 that has no torch (every other command goes to the real interpreter)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    python = folder / "python3"
    python.write_text(f'#!/bin/sh\ncase "$*" in *"import torch"*) exit 1 ;; esac\n'
                      f'exec "{os.path.realpath(sys.executable)}" "$@"\n')
    python.chmod(0o755)
    return folder


def _gpu(folder: Path) -> None:
    smi = folder / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"\n')
    smi.chmod(0o755)


def _install(folder: Path, *args: str, **env: str) -> list[str]:
    full = {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(folder / "python3"),
            "INSTALL_DRY_RUN": "1", **env}
    result = subprocess.run(["sh", str(REPO / "scripts" / "install.sh"), *args], env=full, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _pip_commands(lines: list[str]) -> list[str]:
    return [line.split("would run: pip install ", 1)[1] for line in lines if "would run: pip install" in line]


@pytest.fixture()
def cpu_index(tmp_path):
    """A local stand-in for PyTorch's CPU wheel index (only reachability is probed in a dry run)."""
    root = tmp_path / "index"
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "index.html").write_text("<html></html>")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_gpu_machine_installs_requirements_as_before(bin_dir):
    _gpu(bin_dir)
    lines = _install(bin_dir, TORCH_CPU_INDEX=UNREACHABLE)
    assert any("an NVIDIA GPU is present" in line for line in lines)
    assert _pip_commands(lines) == [f"-e {REPO}"]


def test_cpu_machine_takes_the_cpu_index(bin_dir, cpu_index):
    lines = _install(bin_dir, "--constraints", str(REPO / ".ci" / "constraints.txt"), TORCH_CPU_INDEX=cpu_index)
    constraint = f"-c {REPO}/.ci/constraints.txt"
    assert any("no NVIDIA GPU: installing the CPU build of torch" in line for line in lines)
    assert _pip_commands(lines) == [f"torch --index-url {cpu_index} {constraint}",
                                    f"-e {REPO} {constraint}"]


def test_cpu_machine_without_the_cpu_index_tries_local_wheels_first(bin_dir):
    lines = _install(bin_dir, TORCH_CPU_INDEX=UNREACHABLE)
    assert any(f"PyTorch's CPU index {UNREACHABLE} is unreachable" in line for line in lines)
    assert _pip_commands(lines) == ["--no-index --no-deps torch", f"-e {REPO}"]


def test_installed_torch_is_kept(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "python3").symlink_to(os.path.realpath(sys.executable))
    lines = _install(folder)
    assert any(line.startswith("[install] keeping the installed torch ") for line in lines)
    assert _pip_commands(lines) == [f"-e {REPO}"]


def test_test_tools_come_as_the_test_extra(tmp_path):
    """pytest and pytest-xdist are not runtime requirements: ``--test`` installs the package's [test] extra."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "python3").symlink_to(os.path.realpath(sys.executable))
    assert _pip_commands(_install(folder, "--test")) == [f"-e {REPO}[test]"]
    requirements = (REPO / "requirements.txt").read_text()
    assert "pytest" not in requirements
