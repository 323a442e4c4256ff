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
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

LAUNCH_TIMEOUT_S = 600


def _workspace(root: Path, kind: str) -> dict[str, Path]:
    """Tiny model of ``kind`` + 4 demo clips (25 frames, 64x64 -> 4 latent frames) with latents and text
    features."""
    from tools.build_tiny_checkpoint import build_tiny_checkpoint
    from tools.extract_text_features import main as extract_text
    from tools.extract_video_vae_latents import main as extract_latents
    from tools.make_demo_dataset import make_demo_dataset

    model = build_tiny_checkpoint(root / "model", kind=kind)
    data = root / "data"
    make_demo_dataset(data, num_clips=4, num_frames=25, width=64, height=64)
    common = ["--anno_file", str(data / "video_text.jsonl"), "--no_progress"]
    assert extract_latents(["--model_path", str(model / "causal_video_vae"), "--width", "64", "--height", "64",
                            "--num_frames", "25", "--model_dtype", "fp32", "--num_workers", "0", *common]) == 0
    assert extract_text(["--model_name", kind, "--model_path", str(model), "--model_dtype", "fp32", *common]) == 0
    return {"root": root, "model": model, "anno": data / "video_text.jsonl", "env": {"MODEL_NAME": kind}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    return _workspace(tmp_path_factory.mktemp("virtual_group"), "pyramid_flux")


def _train(workspace, out: Path, gpus: int, strategy: str, steps: int, extra: str = "",
           env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "NUM_WORKERS": "0", "WARMUP_STEPS": "0", "WARMUP_EPOCHS": "0", "EPOCHS": "1", "LR": "1e-3",
           "OMP_NUM_THREADS": "1",
           "TORCHDYNAMO_DISABLE": "1", "GPUS": str(gpus), "VIDEO_SYNC_GROUP": "2", "SHARD_STRATEGY": strategy,
           "MODEL_DTYPE": "fp32", "MODEL_PATH": str(workspace["model"]), "OUTPUT_DIR": str(out),
           "ANNO_FILE": str(workspace["anno"]), "RESOLUTION": "64x64", "NUM_FRAMES": "4", "BATCH_SIZE": "4",
           "GRAD_ACCU_STEPS": "1", "ITERS_PER_EPOCH": str(steps), "SAVE_EVERY_STEPS": "1",
           "EXTRA_ARGS": "--trace_batches --report_to none " + extra, **workspace["env"], **(env_extra or {})}
    result = subprocess.run(["sh", str(REPO / "scripts" / "train_pyramid_flow.sh")], env=env, capture_output=True,
                            text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, f"GPUS={gpus} {strategy} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


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


@pytest.mark.parametrize("kind,strategy", [("pyramid_flux", "ddp"), ("pyramid_flux", "zero2"),
                                           ("pyramid_mmdit", "ddp")])
def test_packed_slots_train_like_one_slot_per_pass(workspace, tmp_path_factory, kind, strategy):
    """PACK_SLOTS=2: the virtual group's two slots run as one forward/backward per micro-batch (their columns in
    one DiT call) and log the losses and export the DiT of one slot per pass (GPUS=1, PACK_SLOTS=1), training the
    same (slot, unit) pairs; stopped after step 1 and resumed with PACK_SLOTS=1, a packed run continues the same
    curve. Both DiT kinds; DDP and ZeRO-2 (DeepSpeed counts one backward per pass)."""
    if kind != "pyramid_flux":
        workspace = _workspace(tmp_path_factory.mktemp(f"virtual_group_{kind}"), kind)
    plain, packed, switched = (workspace["root"] / f"{strategy}_gpus1{suffix}"
                               for suffix in ("", "_packed", "_pack_then_not"))
    if not (plain / "metrics.jsonl").is_file():
        _train(workspace, plain, 1, strategy, 2, env_extra={"PACK_SLOTS": "1"})
    result = _train(workspace, packed, 1, strategy, 2, env_extra={"PACK_SLOTS": "2"})
    assert "2 of this process's 2 slots per forward/backward pass: PACK_SLOTS=2" in result.stderr, result.stderr
    _train(workspace, switched, 1, strategy, 1, env_extra={"PACK_SLOTS": "2"})
    result = _train(workspace, switched, 1, strategy, 2, env_extra={"PACK_SLOTS": "1"})
    assert "resumed from" in result.stderr and "PACK_SLOTS=1" in result.stderr, result.stderr

    want, dit_want = _losses(plain), _dit(plain)
    for out in (packed, switched):
        got = _losses(out)
        assert len(got) == 2 and got == pytest.approx(want, rel=1e-6, abs=0), (got, want)
        assert _units(out) == _units(plain)
        dit = _dit(out)
        worst = max(float((dit[k] - dit_want[k]).norm() / dit_want[k].norm().clamp_min(1e-30)) for k in dit_want)
        print(f"{kind} {strategy} {out.name}: losses {got} vs {want}; export max relative difference {worst:.3g}")
        assert set(dit) == set(dit_want) and worst <= 1e-6


LORA = "--lora_rank 4 --lora_alpha 8 --ema_update --ema_update_every 1 --ema_decay 0.5"


def test_lora_trains_only_adapters_resumes_exactly_and_exports_merged(workspace):
    """LoRA rank 4 with EMA: GPUS=2 ZeRO-2 straight vs GPUS=1 DDP (virtual group) stopped after step 1 and resumed."""
    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer

    two, one = workspace["root"] / "lora_zero2_gpus2", workspace["root"] / "lora_ddp_gpus1"
    _train(workspace, two, 2, "zero2", 2, LORA)
    _train(workspace, one, 1, "ddp", 1, LORA)
    _train(workspace, one, 1, "ddp", 2, LORA)
    a, b = _losses(one), _losses(two)
    assert a == pytest.approx(b, rel=1e-6, abs=0) and a[0] != a[1]

    initial = load_file(str(workspace["model"] / "diffusion_transformer_384p" / "diffusion_pytorch_model.safetensors"))
    # Only the adapters train: the checkpoint holds their state and nothing of the frozen base.
    from trainer_misc.state.fragments import FragmentReader
    trained = {key.split("::")[0] for key in FragmentReader(one / "checkpoints" / "checkpoint-2" / "weights").keys()}
    assert trained and all(".lora_A." in k or ".lora_B." in k for k in trained)

    for out in (one, two):
        config = json.loads((out / "export" / "lora" / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        adapter = load_file(str(out / "export" / "lora" / "adapter_model.safetensors"))
        merged = PyramidFluxTransformer.from_pretrained(out / "export" / "transformer").state_dict()
        assert set(merged) == set(initial)
        layers = {k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in adapter}
        assert layers and all(torch.count_nonzero(adapter[f"base_model.model.{n}.lora_B.weight"]) for n in layers)
        for n in layers:
            lora_a = adapter[f"base_model.model.{n}.lora_A.weight"]
            lora_b = adapter[f"base_model.model.{n}.lora_B.weight"]
            want = initial[f"{n}.weight"] + scale * lora_b @ lora_a
            assert torch.allclose(merged[f"{n}.weight"], want, rtol=0, atol=1e-6), n
        untouched = [k for k in initial if k.rsplit(".", 1)[0] not in layers]
        assert untouched and all(torch.equal(merged[k], initial[k]) for k in untouched)
        assert (out / "export" / "lora_ema" / "adapter_model.safetensors").is_file()
        assert (out / "export" / "transformer_ema" / "config.json").is_file()
    lora_one = load_file(str(one / "export" / "lora" / "adapter_model.safetensors"))
    lora_two = load_file(str(two / "export" / "lora" / "adapter_model.safetensors"))
    worst = max(float((lora_one[k] - lora_two[k]).norm() / lora_two[k].norm().clamp_min(1e-30)) for k in lora_two)
    print(f"LoRA: losses {a} vs {b}; adapter max relative difference {worst:.3g}")
    assert worst <= 1e-6


def test_zero2_optimizer_cpu_offload_trains_like_zero2(workspace):
    """OFFLOAD=1: DeepSpeed keeps master weights and AdamW state on the CPU and updates them with its CPU Adam (C++
    op, compiled on first use); stopped after step 1 and resumed, it gives the same losses and export as an
    uninterrupted ZeRO-2 run with torch's AdamW (lost or reset Adam moments would move step 2 differently)."""
    plain, offload = workspace["root"] / "zero2_gpus1", workspace["root"] / "zero2_offload_gpus1"
    if not (plain / "metrics.jsonl").is_file():
        _train(workspace, plain, 1, "zero2", 2)
    _train(workspace, offload, 1, "zero2", 1, env_extra={"OFFLOAD": "1"})
    result = _train(workspace, offload, 1, "zero2", 2, env_extra={"OFFLOAD": "1"})
    assert "optimizer offload on (DeepSpeedCPUAdam on the CPU)" in result.stderr, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "checkpoint-1" in result.stderr, result.stderr[-3000:]
    a, b = _losses(offload), _losses(plain)
    assert len(a) == len(b) == 2
    assert a == pytest.approx(b, rel=1e-5, abs=0)
    dit_a, dit_b = _dit(offload), _dit(plain)
    initial = load_file(str(workspace["model"] / "diffusion_transformer_384p" / "diffusion_pytorch_model.safetensors"))
    worst = max(float((dit_a[k] - dit_b[k]).norm() / dit_b[k].norm().clamp_min(1e-30)) for k in dit_b)
    moved = max(float((dit_b[k] - initial[k]).norm() / initial[k].norm().clamp_min(1e-30)) for k in dit_b)
    print(f"offload: losses {a} vs {b}; export max relative difference {worst:.3g} (training moved {moved:.3g})")
    assert worst <= 1e-6 and moved > 1e-3
