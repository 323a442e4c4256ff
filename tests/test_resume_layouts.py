"""A checkpoint resumes on another process count and another sharding strategy, continuing the uninterrupted run's
loss curve, weights and EMA (toy model, CPU, gloo; the launches go through the scripts' supervisor).

Each case takes an uninterrupted 6-step run's step-3 checkpoint into a fresh output folder and resumes it with another
layout: what a preempted job that comes back with another allocation does. The run's slots stay what they were
(``SlotLayout``): 2 processes of a sync group of 2 become one process training both slots; 2 processes reading 2
data streams become one process with 2 lanes; ZeRO-3 partitions become ZeRO-2 fragments or DDP replicas.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
STEPS, AT = 6, 3
LAUNCH = ("import sys; from trainer_misc.runtime.launcher import NodeLayout, launch; "
          "launch(sys.argv[2:], NodeLayout(gpus=int(sys.argv[1]), nnodes=1, node_rank=0, master_addr='127.0.0.1', "
          "master_port=0, have_gpu=False, source='test'), prog='test')")


def _worker(spec: dict) -> int:
    import torch

    torch.set_num_threads(1)
    from test_trainer_toy import ToyDataset, ToyModel, toy_loss

    from trainer_misc.loop.config import TrainConfig
    from trainer_misc.loop.trainer import train

    torch.manual_seed(0)
    train(ToyModel(), toy_loss, ToyDataset(64), TrainConfig(**spec))
    return 0


def _run(tmp: Path, name: str, processes: int, **config) -> None:
    spec = dict(output_dir=str(tmp / name), max_steps=STEPS, batch_size=4, mixed_precision="fp32", device="cpu",
                lr=1e-2, warmup_steps=0, checkpoint_every=AT, tensorboard=False, seed=3, ema_decay=0.9,
                ema_update_every=1, **config)
    spec_file = tmp / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "ACCELERATE_USE_CPU")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", LAUNCH, str(processes), str(Path(__file__)), str(spec_file)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _export(out: Path, suffix: str = "") -> dict:
    return load_file(str(out / "export" / f"transformer{suffix}" / "model.safetensors"))


def _assert_continues(resumed: Path, baseline: Path) -> None:
    got, want = _losses(resumed), _losses(baseline)
    assert sorted(got) == list(range(AT + 1, STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-6, abs=1e-7), f"step {step}: {loss} vs {want[step]}"
    for suffix in ("", "_ema"):
        a, b = _export(resumed, suffix), _export(baseline, suffix)
        assert set(a) == set(b)
        for key in a:
            assert (a[key] - b[key]).abs().max().item() <= 1e-6, (suffix, key)


def _from_checkpoint(tmp: Path, baseline: Path, name: str) -> Path:
    out = tmp / name
    shutil.copytree(baseline / "checkpoints" / f"checkpoint-{AT}", out / "checkpoints" / f"checkpoint-{AT}")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("layouts")
    _run(tmp, "zero2_sync2", 2, strategy="zero2", video_sync_group=2)   # one sync group of 2 slots
    _run(tmp, "zero3_streams2", 2, strategy="zero3", video_sync_group=1)  # 2 data streams
    return tmp


def test_a_two_process_zero2_run_resumes_on_one_process(runs, tmp_path):
    resumed = _from_checkpoint(tmp_path, runs / "zero2_sync2", "one")
    _run(tmp_path, "one", 1, strategy="zero2", video_sync_group=2)
    _assert_continues(resumed, runs / "zero2_sync2")


def test_a_zero3_run_resumes_under_zero2(runs, tmp_path):
    resumed = _from_checkpoint(tmp_path, runs / "zero3_streams2", "zero2")
    _run(tmp_path, "zero2", 2, strategy="zero2", video_sync_group=1)
    _assert_continues(resumed, runs / "zero3_streams2")


def test_two_data_streams_resume_on_one_ddp_process(runs, tmp_path):
    resumed = _from_checkpoint(tmp_path, runs / "zero3_streams2", "ddp")
    _run(tmp_path, "ddp", 1, strategy="ddp", video_sync_group=1)
    _assert_continues(resumed, runs / "zero3_streams2")


def test_a_layout_that_cannot_share_the_slots_is_refused(runs, tmp_path):
    """One data stream of 2 slots cannot be shared by 3 processes: refused before training, naming the counts."""
    _from_checkpoint(tmp_path, runs / "zero2_sync2", "three")
    spec = dict(output_dir=str(tmp_path / "three"), max_steps=STEPS, batch_size=4, mixed_precision="fp32",
                device="cpu", strategy="zero2", video_sync_group=2, tensorboard=False, seed=3)
    spec_file = tmp_path / "three.json"
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", LAUNCH, "3", str(Path(__file__)), str(spec_file)], env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0
    assert "trains 2 slots (1 data stream(s) x VIDEO_SYNC_GROUP=2) per optimizer step; 3 data-parallel processes " \
           "cannot share them equally" in proc.stderr.strip().splitlines()[-1]


if __name__ == "__main__":
    from trainer_misc.runtime.failures import run_main

    run_main(lambda: _worker(json.loads(Path(sys.argv[1]).read_text())), "layout_worker")
