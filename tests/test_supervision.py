"""The launch supervises its workers, through the real training script on the tiny model (2 CPU processes):

* the launch shell killed (``kill -9``) or asked to stop (``kill -TERM``) mid-run: the workers write a checkpoint and
  exit, none is left running, and a rerun continues the uninterrupted run's loss curve;
* torchrun stopped (``SIGSTOP``) while the workers train: they finish and export, and the launch returns (it ends
  the stopped torchrun) instead of waiting forever;
* a bad number (``NUM_WORKERS``, ``LORA_RANK``, ...) never starts a process (``tests/test_train_scripts.py``), and a
  worker count the machine cannot take is capped with a note.

The processes of a launch are found by the ``--output_dir`` on their command lines.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
BOUNDED_S = 180  # generous for a loaded 2-core machine


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    from tools.build_tiny_checkpoint import build_tiny_checkpoint
    from tools.extract_text_features import main as extract_text
    from tools.extract_video_vae_latents import main as extract_latents
    from tools.make_demo_dataset import make_demo_dataset

    root = tmp_path_factory.mktemp("supervision")
    model = build_tiny_checkpoint(root / "model")
    data = root / "data"
    make_demo_dataset(data, num_clips=4, num_frames=25, width=64, height=64, images=False)
    anno = data / "video_text.jsonl"
    common = ["--anno_file", str(anno), "--no_progress"]
    assert extract_latents(["--model_path", str(model / "causal_video_vae"), "--width", "64", "--height", "64",
                            "--num_frames", "25", "--model_dtype", "fp32", "--num_workers", "0", *common]) == 0
    assert extract_text(["--model_path", str(model), "--model_dtype", "fp32", *common]) == 0
    return {"root": root, "model": model, "anno": anno}


def _env(workspace: dict, out: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PET_"))}
    env.update(GPUS="2", VIDEO_SYNC_GROUP="2", SHARD_STRATEGY="zero2", MODEL_PATH=str(workspace["model"]),
               OUTPUT_DIR=str(out), ANNO_FILE=str(workspace["anno"]), RESOLUTION="64x64", NUM_FRAMES="4",
               BATCH_SIZE="4", GRAD_ACCU_STEPS="1", EPOCHS="1", ITERS_PER_EPOCH=str(STEPS), SAVE_EVERY_STEPS="1000",
               NUM_WORKERS="0", WARMUP_STEPS="0", WARMUP_EPOCHS="0", LR="1e-4", OMP_NUM_THREADS="1",
               TORCHDYNAMO_DISABLE="1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="60", EXTRA_ARGS="--report_to none", **extra)
    return env


def _start(workspace: dict, out: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(["sh", str(REPO / "scripts" / "train_pyramid_flow.sh")], env=_env(workspace, out, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int) -> None:
    deadline = time.monotonic() + BOUNDED_S
    while _steps_done(out) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached in {BOUNDED_S} s"
        time.sleep(0.05)


def _processes_of(out: Path) -> list[int]:
    """Live (not zombie) processes whose command line names ``out``: the launcher, torchrun's workers."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(out) in cmdline and state != "Z" and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def _wait_until_gone(out: Path) -> float:
    start = time.monotonic()
    while _processes_of(out):
        assert time.monotonic() - start < BOUNDED_S, f"processes left behind: {_processes_of(out)}"
        time.sleep(0.2)
    return time.monotonic() - start


def _curve(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(workspace) -> list[float]:
    out = workspace["root"] / "uninterrupted"
    proc = _start(workspace, out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return _curve(out)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "kill-TERM"])
def test_stopping_the_launch_shell_stops_the_workers_with_a_checkpoint(workspace, uninterrupted, tmp_path, sig):
    out = tmp_path / "out"
    proc = _start(workspace, out)
    _wait_for_step(proc, out, 3)
    os.kill(proc.pid, sig)  # the script's own pid: `sh` replaced itself by the launcher
    _, err = proc.communicate(timeout=BOUNDED_S)
    _wait_until_gone(out)  # no worker trains on unsupervised
    stopped = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")
                     if (p / "complete").is_file())
    assert stopped and 3 <= stopped[-1] < STEPS, (stopped, err[-3000:])
    if sig == signal.SIGTERM:  # the launcher saw the signal: its last line is the workers' reason, its status 143
        assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
        assert f"stopped by SIGTERM after step {stopped[-1]}" in err.strip().splitlines()[-1]

    rerun = _start(workspace, out)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'checkpoint-{stopped[-1]}'}" in err
    assert _curve(out) == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)


def test_a_stopped_torchrun_does_not_keep_the_launch_waiting(workspace, tmp_path):
    out = tmp_path / "out"
    proc = _start(workspace, out, COLLECTIVE_TIMEOUT_MIN="1")
    _wait_for_step(proc, out, 3)
    torchrun = [pid for pid in _processes_of(out)
                if b"torch.distributed.run" in (Path("/proc") / str(pid) / "cmdline").read_bytes()]
    assert len(torchrun) == 1, torchrun
    os.kill(torchrun[0], signal.SIGSTOP)
    start = time.monotonic()
    try:
        _, err = proc.communicate(timeout=BOUNDED_S)
    finally:
        for pid in torchrun:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - start < BOUNDED_S
    assert "torchrun did not return (stopped or hung); ending it" in err
    assert _steps_done(out) == STEPS and (out / "export" / "transformer" / "config.json").is_file()
    _wait_until_gone(out)


def test_worker_counts_are_capped_by_the_machine(monkeypatch):
    from trainer_misc.data import workers

    monkeypatch.setattr(workers, "_cpus", lambda: 2)
    monkeypatch.setattr(workers, "_available_bytes", lambda: 24 * 2**30)
    assert workers.data_workers("auto", 2) == (1, "NUM_WORKERS=auto: 1 data-loading worker(s) per process "
                                                   "(2 CPUs, 24 GiB available, 2 process(es) on this node)")
    assert workers.data_workers(0, 2) == (0, None)
    assert workers.data_workers(1, 2) == (1, None)
    monkeypatch.setattr(workers, "_available_bytes", lambda: 3 * 2**30)  # memory is the tighter bound now
    assert workers.data_workers(64, 1)[0] == 1
