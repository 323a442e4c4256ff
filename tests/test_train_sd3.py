"""Training the SD3 kind (MODEL_NAME=pyramid_mmdit) through the real scripts, two CPU processes each:

* AR path, ZeRO-3: parameters really partitioned over 2 ranks; resuming from the step-1 checkpoint reproduces the
  uninterrupted run's step-2 loss; the export reloads as a ``PyramidDiffusionMMDiT``;
* full-sequence path, ZeRO-2: Adam state sharded; validation samples from the gathered weights; export reloads.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from demo_workspace import build_demo_workspace
from test_train_integration import metrics, run_script, traces

from pyramid_dit.training_record import read_training_record


@pytest.fixture(scope="module")
def sd3_workspace(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD3-layout model + 8 demo clips (25 frames, 64x64) with latents and SD3 text features."""
    return build_demo_workspace(tmp_path_factory.mktemp("train_sd3"), kind="pyramid_mmdit")


def _assert_reloads(export_dir: Path, model_dir: Path) -> None:
    from pyramid_dit.modeling_pyramid_mmdit import PyramidDiffusionMMDiT

    trained = PyramidDiffusionMMDiT.from_pretrained(export_dir).state_dict()
    initial = PyramidDiffusionMMDiT.from_pretrained(model_dir, subfolder="diffusion_transformer_384p").state_dict()
    assert set(trained) == set(initial)
    changed = [k for k, v in trained.items() if not torch.equal(v, initial[k])]
    assert len(changed) > len(trained) // 2, "training did not change the exported weights"
    frozen = [k for k in trained if ".attn.add_q_proj." in k or ".attn.norm_add_q." in k][-3:]  # last block's
    assert all(torch.equal(trained[k], initial[k]) for k in frozen)  # no gradient reaches them, none is applied


def _ar_zero3(ws, out: Path, extra: str = "") -> None:
    run_script("train_pyramid_flow.sh", {
        "MODEL_NAME": "pyramid_mmdit", "GPUS": "2", "VIDEO_SYNC_GROUP": "2", "SHARD_STRATEGY": "zero3",
        "MODEL_PATH": str(ws["model"]), "OUTPUT_DIR": str(out), "ANNO_FILE": str(ws["anno"]), "RESOLUTION": "64x64",
        "NUM_FRAMES": "4", "BATCH_SIZE": "4", "GRAD_ACCU_STEPS": "1", "ITERS_PER_EPOCH": "2", "SAVE_EVERY_STEPS": "1",
        "EXTRA_ARGS": "--trace_batches " + extra})


def test_ar_zero3_resume_and_export(sd3_workspace):
    straight, resumed = sd3_workspace["root"] / "ar_straight", sd3_workspace["root"] / "ar_resumed"
    _ar_zero3(sd3_workspace, straight)
    _ar_zero3(sd3_workspace, resumed, f"--resume {straight / 'checkpoints' / 'checkpoint-1'}")
    by_rank = traces(straight)
    assert sorted(by_rank) == [0, 1]
    for r in (0, 1):
        report = by_rank[r][-1]["sharding"]
        assert report["world_size"] == 2 and report["strategy"] == "zero3" and report["zero3_partitioned"]
        assert report["param_numel_local"] < report["param_numel_total"]
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in a] == [1, 2] and [m["step"] for m in b] == [2]
    assert b[0]["loss"] == pytest.approx(a[1]["loss"], rel=1e-6, abs=1e-7), (a, b)
    _assert_reloads(straight / "export" / "transformer", sd3_workspace["model"])


def test_full_sequence_zero2_with_validation_samples(sd3_workspace):
    out = sd3_workspace["root"] / "t2v_zero2"
    run_script("train_pyramid_flow_without_ar.sh", {
        "MODEL_NAME": "pyramid_mmdit", "GPUS": "2", "TASK": "t2v", "SHARD_STRATEGY": "zero2",
        "MODEL_PATH": str(sd3_workspace["model"]), "VARIANT": "diffusion_transformer_384p", "OUTPUT_DIR": str(out),
        "ANNO_FILE": str(sd3_workspace["anno"]), "RESOLUTION": "64x64", "NUM_FRAMES": "4", "BATCH_SIZE": "4",
        "ITERS_PER_EPOCH": "2", "LOAD_TEXT_ENCODER": "0",
        "EXTRA_ARGS": "--trace_batches --validation_every 2 --validation_prompts 1 --validation_temp 2 "
                      "--validation_steps 1 1 1"})
    by_rank = traces(out)
    for r in (0, 1):
        report = by_rank[r][-1]["sharding"]
        assert report["strategy"] == "zero2" and report["world_size"] == 2
        assert report["optim_state_numel_local"] < report["param_numel_total"]
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert (out / "samples" / "step-000002" / "prompt0.mp4").stat().st_size > 0
    _assert_reloads(out / "export" / "transformer", sd3_workspace["model"])
    # validation sampled the full sequence (the run's objective), and generation will too
    assert read_training_record(out / "export" / "transformer")[:2] == ("t2v", "full_sequence")
