"""A virtual sync group (one process training every slot of a VIDEO_SYNC_GROUP) makes the update of a real one.

Through the real script on the tiny model and demo latents, fp32 AR training with VIDEO_SYNC_GROUP=2: GPUS=1 (both
slots on one process, each on the random stream its own rank would have) against GPUS=2 (one slot per process), for
DDP and ZeRO-2. After 2 optimizer steps the logged losses and the exported DiTs must agree, and the (slot, unit)
pairs trained per step must be the same set. The GPUS=1 DDP run is interrupted after step 1 and resumed, so the
slots' random streams are also checked to survive a checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAUNCH_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """Tiny model + 4 demo clips (25 frames, 64x64 -> 4 latent frames) with latents and text features."""
    from tools.build_tiny_checkpoint import build_tiny_checkpoint
    from tools.extract_text_features import main as extract_text
    from tools.extract_video_vae_latents import main as extract_latents
    from tools.make_demo_dataset import make_demo_dataset

    root = tmp_path_factory.mktemp("virtual_group")
    model = build_tiny_checkpoint(root / "model")
    data = root / "data"
    make_demo_dataset(data, num_clips=4, num_frames=25, width=64, height=64)
    common = ["--anno_file", str(data / "video_text.jsonl"), "--no_progress"]
    assert extract_latents(["--model_path", str(model / "causal_video_vae"), "--width", "64", "--height", "64",
                            "--num_frames", "25", "--model_dtype", "fp32", "--num_workers", "0", *common]) == 0
    assert extract_text(["--model_path", str(model), "--model_dtype", "fp32", *common]) == 0
    return {"root": root, "model": model, "anno": data / "video_text.jsonl"}


def _train(workspace, out: Path, gpus: int, strategy: str, steps: int) -> None:
    env = {**os.environ, "NUM_WORKERS": "0", "WARMUP_STEPS": "0", "EPOCHS": "1", "LR": "1e-3", "OMP_NUM_THREADS": "1",
           "TORCHDYNAMO_DISABLE": "1", "GPUS": str(gpus), "VIDEO_SYNC_GROUP": "2", "SHARD_STRATEGY": strategy,
           "MODEL_DTYPE": "fp32", "MODEL_PATH": str(workspace["model"]), "OUTPUT_DIR": str(out),
           "ANNO_FILE": str(workspace["anno"]), "RESOLUTION": "64x64", "NUM_FRAMES": "4", "BATCH_SIZE": "4",
           "GRAD_ACCU_STEPS": "1", "ITERS_PER_EPOCH": str(steps), "SAVE_CKPT_FREQ": "1",
           "EXTRA_ARGS": "--trace_batches --report_to none"}
    result = subprocess.run(["sh", str(REPO / "scripts" / "train_pyramid_flow.sh")], env=env, capture_output=True,
                            text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, f"GPUS={gpus} {strategy} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _units(out: Path) -> dict[int, set]:
    """Per optimizer step, the set of (slot, units per stage) trained by all ranks; also checks the world size."""
    per_step: dict[int, set] = {}
    for path in (out / "logs").glob("trace_rank*.jsonl"):
        for rec in map(json.loads, path.read_text().splitlines()):
            if "micro_step" in rec:
                per_step.setdefault(rec["step"], set()).add((rec["world_size"], rec["sync_rank"],
                                                             tuple(rec["units_per_stage"])))
    return per_step


def _dit(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "export" / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_one_process_virtual_group_equals_two_processes(workspace, strategy):
    one, two = workspace["root"] / f"{strategy}_gpus1", workspace["root"] / f"{strategy}_gpus2"
    if strategy == "ddp":  # stop after step 1 and resume: the slots' streams come back from the checkpoint
        _train(workspace, one, 1, strategy, 1)
    _train(workspace, one, 1, strategy, 2)
    _train(workspace, two, 2, strategy, 2)

    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 2
    assert a == pytest.approx(b, rel=1e-6, abs=0)
    units_one, units_two = _units(one), _units(two)
    assert sorted(units_one) == sorted(units_two) == [0, 1]
    for step in (0, 1):
        assert {w for w, _, _ in units_one[step]} == {1} and {w for w, _, _ in units_two[step]} == {2}
        drop_world = [{(s, u) for _, s, u in x[step]} for x in (units_one, units_two)]
        assert drop_world[0] == drop_world[1] and {s for s, _ in drop_world[0]} == {0, 1}
        assert len({u for _, u in drop_world[0]}) == 2, "the two slots must train different units"
    assert units_one[0] != units_one[1], "the units trained must move with the step counter"

    dit_one, dit_two = _dit(one), _dit(two)
    initial = load_file(str(workspace["model"] / "diffusion_transformer_384p" / "diffusion_pytorch_model.safetensors"))
    assert set(dit_one) == set(dit_two) == set(initial)
    worst = max(float((dit_one[k] - dit_two[k]).norm() / dit_two[k].norm().clamp_min(1e-30)) for k in dit_two)
    moved = max(float((dit_two[k] - initial[k]).norm() / initial[k].norm().clamp_min(1e-30)) for k in dit_two)
    print(f"{strategy}: losses {a} vs {b}; export max relative difference {worst:.3g} (training moved {moved:.3g})")
    assert worst <= 1e-6
    assert moved > 1e-3, "training did not change the weights"
