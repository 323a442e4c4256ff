"""End-to-end training on the tiny checkpoint and the demo clips, through the real scripts.

Two-process launches (AR with ZeRO-3, full-sequence t2v with ZeRO-2, t2i with ZeRO-3) check what silently goes wrong
in distributed runs: the world size, that the two ranks of a sync group read the same clip while training
different units, that parameters / optimizer state are really sharded, that a latent corrupted after start-up is
reported and counted while the run goes on, and that the exported DiT reloads. Single-process runs check resume
equality with the real objective (N steps in one go vs N/2 + resume) and that the export equals the trained weights.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from demo_workspace import build_demo_workspace, run_train_script
from safetensors.torch import load_file

from pyramid_dit.training_record import read_training_record

REPO = Path(__file__).resolve().parents[1]

LAUNCH_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """Tiny model + 8 demo clips (25 frames, 64x64) with latents (4 latent frames) and text features."""
    return build_demo_workspace(tmp_path_factory.mktemp("train_e2e"))


def run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_train_script(script, {"LR": "1e-4", **env}, timeout=LAUNCH_TIMEOUT_S)


def traces(out: Path) -> dict[int, list[dict]]:
    by_rank = {}
    for path in sorted((out / "logs").glob("trace_rank*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        by_rank[int(path.stem[len("trace_rank"):])] = lines
    return by_rank


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def poison_latent(path: Path) -> None:
    """Overwrite the tensor data with NaN but keep a valid header: start-up accepts it, loading it later fails."""
    from trainer_misc.files import atomic_save_safetensors
    latent = load_file(str(path))["latent"]
    atomic_save_safetensors({"latent": torch.full_like(latent, float("nan"))}, path)


def assert_reloads(export_dir: Path, model_dir: Path, variant: str) -> None:
    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    trained = PyramidFluxTransformer.from_pretrained(export_dir)
    initial = PyramidFluxTransformer.from_pretrained(model_dir, subfolder=variant)
    assert set(trained.state_dict()) == set(initial.state_dict())
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, initial.state_dict()[k])]
    assert len(changed) > len(trained.state_dict()) // 2, "training did not change the exported weights"


def test_ar_zero3_two_ranks_share_clip_train_different_units(workspace):
    out = workspace["root"] / "ar_zero3"
    latents = sorted((workspace["data"] / "latents").glob("*.safetensors"))
    # Poison a copy so the other tests keep clean data: a second annotation points one line at the copy.
    bad = workspace["root"] / "poisoned" / latents[0].name
    bad.parent.mkdir()
    shutil.copy(latents[0], bad)
    anno = workspace["data"] / "video_text_poisoned.jsonl"
    lines = [json.loads(x) for x in workspace["anno"].read_text().splitlines()]
    lines[0]["latent"] = str(bad)
    anno.write_text("".join(json.dumps(x) + "\n" for x in lines))
    poison_latent(bad)

    result = run_script("train_pyramid_flow.sh", {
        "GPUS": "2", "VIDEO_SYNC_GROUP": "2", "SHARD_STRATEGY": "zero3", "MODEL_PATH": str(workspace["model"]),
        "OUTPUT_DIR": str(out), "ANNO_FILE": str(anno), "RESOLUTION": "64x64", "NUM_FRAMES": "4",
        "BATCH_SIZE": "4", "GRAD_ACCU_STEPS": "2", "ITERS_PER_EPOCH": "2", "SAVE_EVERY_STEPS": "2",
        "EXTRA_ARGS": "--trace_batches --validation_every 1 --validation_prompts 1 --validation_temp 2 "
                      "--validation_steps 1 1 1"})
    by_rank = traces(out)
    assert sorted(by_rank) == [0, 1]
    steps = {r: [x for x in lines if "micro_step" in x] for r, lines in by_rank.items()}
    assert all(x["world_size"] == 2 for r in steps for x in steps[r])
    assert len(steps[0]) == len(steps[1]) == 4
    for a, b in zip(steps[0], steps[1]):
        assert a["paths"] == b["paths"], "ranks of one sync group must read the same clips"
        assert a["sync_group_index"] == b["sync_group_index"] == 0
        assert (a["sync_rank"], b["sync_rank"]) == (0, 1)
        assert a["units_per_stage"] != b["units_per_stage"], "ranks of a group must train different units"
    # The AR unit each (rank, micro-batch) trains is the reference's rule, written out here on its own: a per-process
    # call counter c (1 on the first forward, +1 per forward, gradient accumulation included); with 4 units per clip
    # and sync groups of 2 there are 4 // 2 = 2 turns, turn = c % 2, the top stage trains unit
    # (rank % 2) + 1 + 2 * turn and the lower stages 1 + 4 - that.
    for r in (0, 1):
        for k, x in enumerate(steps[r]):
            c = k + 1
            high = r % 2 + 1 + 2 * (c % 2)
            low = max(1 + 4 - high, 1)
            assert (x["micro_step"], x["step"]) == (k, k // 2), x
            assert x["units_per_stage"] == [low, low, high], (r, k, x["units_per_stage"])
    # Sharding: each rank holds a partition of the parameters and of the Adam state.
    for r in (0, 1):
        report = by_rank[r][-1]["sharding"]
        assert report["world_size"] == 2 and report["strategy"] == "zero3" and report["zero3_partitioned"]
        assert report["param_numel_local"] < report["param_numel_total"]
        assert 0 < report["optim_state_numel_local"] < report["param_numel_total"]
    # The poisoned latent was met after start-up, reported with its path, counted, and training went on.
    assert f"bad sample {bad}" in result.stderr
    assert all(str(bad) not in x["paths"] for r in steps for x in steps[r])
    log = metrics(out)
    # Counted once per read of the file by its sync group, not once per rank of the group.
    reads = sum("rank 0 step " in line and f"bad sample {bad}" in line for line in result.stderr.splitlines())
    assert [m["step"] for m in log] == [1, 2] and log[-1]["bad_samples"] == reads >= 1
    assert all(math.isfinite(m["loss"]) for m in log)
    assert_reloads(out / "export" / "transformer", workspace["model"], "diffusion_transformer_384p")
    assert read_training_record(out / "export" / "transformer")[:2] == ("t2v", "ar")  # generation's default
    # Validation samples from the gathered ZeRO-3 weights, before the first step (the base) and every step, as mp4,
    # as base-above-current PNGs and in tensorboard.
    import decord
    for folder in ("base", "step-000001", "step-000002"):
        video = decord.VideoReader(str(out / "samples" / folder / "prompt0.mp4"))
        assert (len(video), *video[0].shape) == (9, 64, 64, 3)
    assert (out / "samples" / "step-000002" / "before_after_prompt0.png").stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set()
    for events in (out / "logs").glob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["images"])
    assert {"validation/prompt0", "validation/before_after/prompt0"} <= tags


def test_full_sequence_t2v_zero2(workspace):
    out = workspace["root"] / "t2v_zero2"
    run_script("train_pyramid_flow_without_ar.sh", {
        "GPUS": "2", "TASK": "t2v", "SHARD_STRATEGY": "zero2", "MODEL_PATH": str(workspace["model"]),
        "VARIANT": "diffusion_transformer_384p", "OUTPUT_DIR": str(out), "ANNO_FILE": str(workspace["anno"]),
        "RESOLUTION": "64x64", "NUM_FRAMES": "4", "BATCH_SIZE": "4", "ITERS_PER_EPOCH": "2", "LOAD_TEXT_ENCODER": "0",
        "EXTRA_ARGS": "--trace_batches"})
    by_rank = traces(out)
    steps = {r: [x for x in lines if "micro_step" in x] for r, lines in by_rank.items()}
    assert sorted(steps) == [0, 1] and all(len(v) == 2 for v in steps.values())
    for a, b in zip(steps[0], steps[1]):
        assert a["units_per_stage"] is None and a["world_size"] == 2
        assert not set(a["paths"]) & set(b["paths"]), "without sync groups the ranks read different clips"
    for r in (0, 1):
        report = by_rank[r][-1]["sharding"]
        assert report["strategy"] == "zero2" and report["world_size"] == 2
        assert report["param_numel_local"] == report["param_numel_total"]  # ZeRO-2 keeps full parameters ...
        assert report["optim_state_numel_local"] < report["param_numel_total"]  # ... and shards Adam state
    assert_reloads(out / "export" / "transformer", workspace["model"], "diffusion_transformer_384p")
    assert read_training_record(out / "export" / "transformer")[:2] == ("t2v", "full_sequence")


# Log lines that used to bury what matters, each printed by every process: DeepSpeed guessing the accelerator,
# diffusers warning about an (empty) list of fp32 modules on .to(dtype), and torch deprecating ZeRO's collectives.
LOG_NOISE = ("Setting accelerator to CPU", "should be kept in float32", "is deprecated. Please use `torch.distributed")


def test_t2i_zero3_encodes_images_and_text_on_the_fly(workspace):
    out = workspace["root"] / "t2i_zero3"
    result = run_script("train_pyramid_flow_without_ar.sh", {
        "GPUS": "2", "TASK": "t2i", "SHARD_STRATEGY": "zero3", "MODEL_PATH": str(workspace["model"]),
        "VARIANT": "diffusion_transformer_image", "OUTPUT_DIR": str(out), "ANNO_FILE": str(workspace["images"]),
        "RESOLUTION": "64x64", "BATCH_SIZE": "4", "ITERS_PER_EPOCH": "1", "EXTRA_ARGS": "--trace_batches"})
    by_rank = traces(out)
    steps = [x for r in (0, 1) for x in by_rank[r] if "micro_step" in x]
    assert len(steps) == 2 and all(p.endswith(".png") for x in steps for p in x["paths"])
    assert all(by_rank[r][-1]["sharding"]["zero3_partitioned"] for r in (0, 1))
    assert_reloads(out / "export" / "transformer", workspace["model"], "diffusion_transformer_image")
    assert read_training_record(out / "export" / "transformer")[:2] == ("t2i", "full_sequence")
    assert not [line for line in (result.stdout + result.stderr).splitlines() if any(n in line for n in LOG_NOISE)]


def _single_process(workspace, out: Path, steps: int, extra: str = "") -> None:
    run_script("train_pyramid_flow.sh", {
        "GPUS": "1", "VIDEO_SYNC_GROUP": "1", "SHARD_STRATEGY": "ddp", "MODEL_PATH": str(workspace["model"]),
        "OUTPUT_DIR": str(out), "ANNO_FILE": str(workspace["anno"]), "RESOLUTION": "64x64", "NUM_FRAMES": "4",
        "BATCH_SIZE": "4", "GRAD_ACCU_STEPS": "1", "ITERS_PER_EPOCH": str(steps), "SAVE_EVERY_STEPS": "2",
        "EXTRA_ARGS": extra})


def test_resume_reproduces_the_uninterrupted_loss_curve(workspace):
    straight, resumed = workspace["root"] / "straight", workspace["root"] / "resumed"
    _single_process(workspace, straight, 4)
    _single_process(workspace, resumed, 2)
    _single_process(workspace, resumed, 4)
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=1e-7), (x["step"], x["loss"], y["loss"])
    # The export equals the trained weights: the checkpoint's fp32 master weights of every trainable parameter.
    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    from trainer_misc.state.fragments import FragmentReader
    exported = PyramidFluxTransformer.from_pretrained(resumed / "export" / "transformer").state_dict()
    reader = FragmentReader(resumed / "checkpoints" / "checkpoint-4" / "weights")
    saved = {key.split("::")[0] for key in reader.keys()}
    assert saved == set(exported)
    assert all(torch.equal(reader.read_full(f"{k}::fp32").float(), v.float()) for k, v in exported.items())


def _dry_run(workspace, script: str, out: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "DRY_RUN": "1", "GPUS": "1", "VIDEO_SYNC_GROUP": "1", "MODEL_PATH": str(workspace["model"]),
            "OUTPUT_DIR": str(out), "ANNO_FILE": str(workspace["anno"]), "RESOLUTION": "64x64", "NUM_FRAMES": "4",
            "BATCH_SIZE": "4", "NUM_WORKERS": "0", "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", **env}
    return subprocess.run(["sh", str(REPO / "scripts" / script)], env=full, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)


@pytest.mark.parametrize("script,env", [("train_pyramid_flow.sh", {}),
                                        ("train_pyramid_flow_without_ar.sh", {"TASK": "t2v"})])
def test_dry_run_prints_data_summary_and_plan_and_trains_nothing(workspace, tmp_path, script, env):
    result = _dry_run(workspace, script, tmp_path / "out", **env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data check: " in result.stdout and "8 lines, 8 usable, 0 excluded" in result.stdout
    assert "model: 125,760 parameters" in result.stdout and "predicted peak per GPU" in result.stdout
    assert ("ar," if script == "train_pyramid_flow.sh" else "t2v,") in result.stdout
    assert not (tmp_path / "out").exists()


def test_wrong_resolution_stops_before_weights_with_one_grouped_summary(workspace, tmp_path):
    result = _dry_run(workspace, "train_pyramid_flow.sh", tmp_path / "out", DRY_RUN="0", RESOLUTION="128x128")
    assert result.returncode == 2
    assert result.stdout.count("data check: ") == 1
    assert "8 x latent size does not match RESOLUTION=128x128" in result.stdout
    assert "bad sample" not in result.stderr and "PyramidFlux" not in result.stderr
    assert not (tmp_path / "out").exists()


def _sp_pair(workspace, name: str, script: str, env: dict[str, str], sp_env: dict[str, str]
             ) -> tuple[list[dict], list[dict], dict[int, list[dict]]]:
    """The same short run on 1 process and on 2 processes forming one sequence-parallel group (SP_SIZE=2)."""
    base = {"MODEL_PATH": str(workspace["model"]), "ANNO_FILE": str(workspace["anno"]), "RESOLUTION": "64x64",
            "NUM_FRAMES": "4", "BATCH_SIZE": "4", "GRAD_ACCU_STEPS": "1", "ITERS_PER_EPOCH": "3", "LR": "1e-3",
            "EXTRA_ARGS": "--trace_batches", **env}
    one, two = workspace["root"] / f"{name}_sp1", workspace["root"] / f"{name}_sp2"
    run_script(script, {**base, "GPUS": "1", "SHARD_STRATEGY": "ddp", "OUTPUT_DIR": str(one)})
    run_script(script, {**base, "GPUS": "2", "SP_SIZE": "2", "OUTPUT_DIR": str(two), **sp_env})
    return metrics(one), metrics(two), traces(two)


@pytest.mark.parametrize("name,script,env,sp_env", [
    ("ar", "train_pyramid_flow.sh", {"VIDEO_SYNC_GROUP": "1"}, {"SHARD_STRATEGY": "zero3"}),
    ("full", "train_pyramid_flow_without_ar.sh",
     {"TASK": "t2v", "VARIANT": "diffusion_transformer_384p", "LOAD_TEXT_ENCODER": "0"}, {"SHARD_STRATEGY": "zero2"}),
])
def test_sequence_parallel_training_equals_one_process(workspace, name, script, env, sp_env):
    """SP_SIZE=2 on 2 processes (ZeRO-3 for the AR path, ZeRO-2 for the full sequence) trains the same samples with
    the same noise as 1 process: the same losses and gradient norms, step after step (weights updated in between)."""
    one, two, by_rank = _sp_pair(workspace, name, script, env, sp_env)
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        print(f"{name} step {a['step']}: loss {a['loss']:.7f} vs {b['loss']:.7f}, grad norm {a['grad_norm']:.7f} vs "
              f"{b['grad_norm']:.7f}")
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]
    steps = {r: [x for x in lines if "micro_step" in x] for r, lines in by_rank.items()}
    assert sorted(steps) == [0, 1] and len(steps[0]) == len(steps[1]) == 3
    for a, b in zip(steps[0], steps[1]):
        assert (a["sp_size"], a["sp_rank"], b["sp_size"], b["sp_rank"]) == (2, 0, 2, 1), "the model was not split"
        assert a["paths"] == b["paths"], "the processes of an SP group must read the same samples"
        assert a["loss"] == b["loss"]
    assert all(m["samples_per_sec"] > 0 for m in two)
