"""The training scripts refuse bad settings before launching anything, with a message naming what to change."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_model(tmp_path_factory) -> dict[str, str]:
    """A folder that passes the layout checks (config.json present); nothing is ever loaded from it."""
    root = tmp_path_factory.mktemp("model")
    for variant in ("diffusion_transformer_384p", "diffusion_transformer_768p", "diffusion_transformer_image"):
        (root / variant).mkdir()
        (root / variant / "config.json").write_text('{"num_attention_heads": 24}')
    anno = root / "anno.jsonl"
    anno.write_text('{"video": "a.mp4", "text": "t", "latent": "a.safetensors", "text_fea": "t.safetensors"}\n')
    return {"MODEL_PATH": str(root), "ANNO_FILE": str(anno), "OUTPUT_DIR": str(root / "out")}


def run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "GPUS": "8", **env}
    return subprocess.run(["sh", str(REPO / "scripts" / script)], env=full_env, capture_output=True, text=True,
                          timeout=120)


AR = "train_pyramid_flow.sh"
NON_AR = "train_pyramid_flow_without_ar.sh"

CASES = [
    (AR, {"BATCH_SIZE": "6"}, "BATCH_SIZE=6 must be a positive multiple of 4"),
    (NON_AR, {"BATCH_SIZE": "2"}, "BATCH_SIZE=2 must be a positive multiple of 4"),
    (AR, {"NUM_FRAMES": "12", "VIDEO_SYNC_GROUP": "8"}, "NUM_FRAMES=12 must be a multiple of VIDEO_SYNC_GROUP=8"),
    (AR, {"GPUS": "6", "VIDEO_SYNC_GROUP": "4"},
     "GPUS*NNODES/SP_SIZE=6 data-parallel ranks and VIDEO_SYNC_GROUP=4 must divide one another"),
    # Sequence parallelism: SP groups count once in the sync-group layout; SP_SIZE divides processes and heads.
    (AR, {"GPUS": "6", "SP_SIZE": "2", "VIDEO_SYNC_GROUP": "4"},
     "GPUS*NNODES/SP_SIZE=3 data-parallel ranks and VIDEO_SYNC_GROUP=4 must divide one another"),
    (NON_AR, {"SP_SIZE": "3"}, "SP_SIZE=3 must divide GPUS*NNODES=8"),
    (AR, {"GPUS": "16", "SP_SIZE": "16"}, "SP_SIZE=16 must divide the DiT's 24 attention heads"),
    (NON_AR, {"SP_SIZE": "0"}, "SP_SIZE=0 must be a positive integer"),
    (AR, {"VARIANT": "diffusion_transformer_999p"}, "has no diffusion_transformer_999p/config.json"),
    (NON_AR, {"MODEL_PATH": ""}, "set MODEL_PATH"),
    (AR, {"RESOLUTION": "768p"}, "RESOLUTION=768p does not match VARIANT=diffusion_transformer_384p"),
    (NON_AR, {"RESOLUTION": "384p"}, "RESOLUTION=384p does not match VARIANT=diffusion_transformer_image"),
    (NON_AR, {"TASK": "i2v"}, "TASK=i2v must be t2i or t2v"),
    (AR, {"SHARD_STRATEGY": "fsdp"}, "SHARD_STRATEGY=fsdp must be ddp, zero2 or zero3"),
    (AR, {"ANNO_FILE": "/nonexistent.jsonl"}, "ANNO_FILE=/nonexistent.jsonl not found"),
    (AR, {"MODEL_NAME": "sd3"}, "MODEL_NAME=sd3 must be pyramid_flux (rain1011/pyramid-flow-miniflux) or pyramid_mmdit"),
    (AR, {"OFFLOAD": "1", "SHARD_STRATEGY": "ddp"}, "OFFLOAD=1 is DeepSpeed's optimizer CPU offload: set SHARD_STRATEGY=zero2"),
    (NON_AR, {"OFFLOAD": "yes"}, "OFFLOAD=yes must be 0 or 1"),
    ("generate.sh", {"PROMPT": "x", "LORA_PATH": "/nonexistent"}, "LORA_PATH=/nonexistent has no adapter_config.json"),
    ("generate.sh", {"PROMPT": "x", "LORA_SCALE": "0.5"}, "LORA_SCALE=0.5 scales an adapter: set LORA_PATH too"),
]


@pytest.mark.parametrize("script,env,message", CASES, ids=[f"{s.split('.')[0]}-{m[:30]}" for s, _, m in CASES])
def test_constraint_violation_stops_before_launch(fake_model, script, env, message):
    result = run_script(script, {**fake_model, **env})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.startswith(script + ":")
    assert "torch.distributed" not in result.stderr and "Traceback" not in result.stderr


def test_python_entrypoint_help_documents_reference_flags():
    out = subprocess.run(["python3", str(REPO / "train" / "train_pyramid_flow.py"), "--help"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for flag in ("--use_fsdp", "--fsdp_shard_strategy", "--video_sync_group", "--sync_video_input",
                 "--use_temporal_pyramid", "--load_text_encoder", "--load_vae", "--max_frames", "--frame_per_unit",
                 "--gradient_checkpointing", "--dit_pretrained_weight", "--ema_update", "--iters_per_epoch",
                 "--save_ckpt_freq", "--schedule_shift", "--corrupt_ratio", "--clip_grad", "--opt_beta2",
                 "--use_sequence_parallel", "--sp_group_size"):
        assert flag in out, flag


@pytest.mark.parametrize("flags,message", [
    (["--resolution", "65x64"], "must be positive multiples of 64"),
    (["--batch_size", "6"], "must be a multiple of 4"),
    (["--use_temporal_pyramid", "--sync_video_input", "--max_frames", "12", "--video_sync_group", "8"],
     "--max_frames 12 must be a multiple of --video_sync_group 8"),
    (["--use_temporal_pyramid", "--max_frames", "8", "--video_sync_group", "4"], "needs --sync_video_input"),
    (["--task", "t2i", "--use_temporal_pyramid"], "drop --use_temporal_pyramid"),
    (["--sp_group_size", "2"], "without --use_sequence_parallel"),
    (["--use_sequence_parallel"], "needs --sp_group_size > 1"),
    (["--use_sequence_parallel", "--sp_group_size", "2"], "must divide the number of processes (1)"),
])
def test_entrypoint_rejects_bad_flags_before_loading(fake_model, flags, message):
    from train.train_pyramid_flow import main
    with pytest.raises(SystemExit) as info:
        main(["--model_path", fake_model["MODEL_PATH"], "--anno_file", fake_model["ANNO_FILE"],
              "--output_dir", fake_model["OUTPUT_DIR"], *flags])
    assert message in str(info.value)


@pytest.fixture()
def fake_torchrun(tmp_path) -> Path:
    """A ``torchrun`` first on PATH that records its arguments instead of launching."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "torchrun_args"
    script = bin_dir / "torchrun"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{log}"\n')
    script.chmod(0o755)
    return log


def _multinode_env(fake_model, fake_torchrun, **env) -> dict[str, str]:
    full = {**fake_model, "GPUS": "2", "NNODES": "2", "VIDEO_SYNC_GROUP": "4",
            "PATH": f"{fake_torchrun.parent / 'bin'}{os.pathsep}{os.environ['PATH']}", **env}
    return full


@pytest.mark.parametrize("env", [{}, {"MASTER_ADDR": "10.0.0.1"}, {"NODE_RANK": "1"}],
                         ids=["neither", "no-node-rank", "no-master-addr"])
def test_multinode_launch_refuses_without_master_addr_and_node_rank(fake_model, fake_torchrun, env, monkeypatch):
    for name in ("MASTER_ADDR", "NODE_RANK", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    result = run_script(AR, _multinode_env(fake_model, fake_torchrun, **env))
    assert result.returncode == 2, result.stderr
    assert "NNODES=2 needs MASTER_ADDR" in result.stderr and "NODE_RANK" in result.stderr
    assert not fake_torchrun.exists()  # nothing was launched


def test_multinode_launch_rejects_node_rank_out_of_range(fake_model, fake_torchrun, monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    result = run_script(AR, _multinode_env(fake_model, fake_torchrun, MASTER_ADDR="10.0.0.1", NODE_RANK="2"))
    assert result.returncode == 2 and "NODE_RANK=2 must be in 0..1" in result.stderr
    assert not fake_torchrun.exists()


def test_multinode_launch_passes_rendezvous_and_prints_it_once(fake_model, fake_torchrun, monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    result = run_script(AR, _multinode_env(fake_model, fake_torchrun, MASTER_ADDR="10.0.0.1", NODE_RANK="1"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("rendezvous") == 1
    assert "rendezvous 10.0.0.1:29500, this is node 1 of 2, 2 processes per node (4 in all)" in result.stderr
    args = fake_torchrun.read_text().split("\n")
    launcher = args[: args.index("--nproc_per_node") + 2]
    assert launcher == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29500",
                        "--nproc_per_node", "2"]
    assert args[args.index("--nproc_per_node") + 2].endswith("train/train_pyramid_flow.py")


@pytest.mark.parametrize("script", [AR, NON_AR])
def test_data_root_reaches_the_trainer(fake_model, tmp_path, script):
    # A python3 stand-in on PATH: answers the scripts' GPU probe (python3 -c ...) with the real interpreter and
    # records the launch command instead of training.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "launch_args"
    fake = bin_dir / "python3"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then exec "{os.path.realpath(sys.executable)}" "$@"; fi\n'
                    f'printf "%s\\n" "$@" > "{record}"\n')
    fake.chmod(0o755)
    env = {**fake_model, "GPUS": "1", "VIDEO_SYNC_GROUP": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    data_root = tmp_path / "data"
    data_root.mkdir()
    result = run_script(script, {**env, "DATA_ROOT": str(data_root)})
    assert result.returncode == 0, result.stderr
    args = record.read_text().splitlines()
    assert args[args.index("--data_root") + 1] == str(data_root)

    result = run_script(script, {**env, "DATA_ROOT": str(tmp_path / "missing")})
    assert result.returncode == 2
    assert f"DATA_ROOT={tmp_path / 'missing'} is not a folder" in result.stderr


def test_summary_of_a_rerun_that_had_nothing_to_train_quotes_no_loss():
    from types import SimpleNamespace

    from train.train_pyramid_flow import run_summary
    finished = SimpleNamespace(records=[], start_step=8, final_step=8, bad_samples=0, exported=["runs/x/export"])
    line = run_summary(finished, 2, "runs/x")
    assert "nan" not in line
    assert line.startswith("done: nothing to train: runs/x already holds a finished run of 8 steps")
    trained = SimpleNamespace(records=[SimpleNamespace(loss=1.5), SimpleNamespace(loss=1.25)], start_step=4,
                              final_step=8, bad_samples=1, exported=[])
    assert run_summary(trained, 2, "runs/x") == ("done: 8 steps (from 4), loss 1.5000 -> 1.2500, world size 2; "
                                                 "1 unreadable samples skipped; exported nothing")


@pytest.mark.parametrize("script,env,on", [
    (AR, {"RESOLUTION": "768p", "VARIANT": "diffusion_transformer_768p"}, True),
    (AR, {"RESOLUTION": "768p", "VARIANT": "diffusion_transformer_768p", "GRADIENT_CHECKPOINTING": "0"}, False),
    (AR, {}, False),  # 384p
    (AR, {"GRADIENT_CHECKPOINTING": "1"}, True),
    (NON_AR, {}, True),  # t2i at 768p by default
], ids=["768p-auto", "768p-disabled", "384p", "384p-forced", "t2i-768p"])
def test_gradient_checkpointing_defaults_on_at_768p(fake_model, fake_torchrun, script, env, on, monkeypatch):
    monkeypatch.delenv("GRADIENT_CHECKPOINTING", raising=False)
    path = f"{fake_torchrun.parent / 'bin'}{os.pathsep}{os.environ['PATH']}"
    result = run_script(script, {**fake_model, "GPUS": "2", "VIDEO_SYNC_GROUP": "2", "PATH": path, **env})
    assert result.returncode == 0, result.stderr
    assert ("--gradient_checkpointing" in fake_torchrun.read_text().split("\n")) == on
    announced = "gradient checkpointing on (GRADIENT_CHECKPOINTING=0 turns it off)" in result.stderr
    assert announced == (on and "GRADIENT_CHECKPOINTING" not in env)


def test_gradient_checkpointing_value_is_checked(fake_model, fake_torchrun):
    result = run_script(AR, {**fake_model, "GRADIENT_CHECKPOINTING": "yes"})
    assert result.returncode == 2 and "GRADIENT_CHECKPOINTING=yes must be 0 or 1" in result.stderr


def _train_config(*flags: str):
    from train.train_pyramid_flow import build_parser, train_config
    return train_config(build_parser().parse_args(["--model_path", "m", "--anno_file", "a", "--output_dir", "o",
                                                   *flags]))


@pytest.mark.parametrize("flags,warmup", [
    ((), 2000),                                            # reference defaults: -1 -> 1 epoch of 2000 steps
    (("--warmup_steps", "0"), 2000),                       # 0 also falls back to epochs, as in the reference
    (("--warmup_steps", "0", "--warmup_epochs", "2", "--iters_per_epoch", "30"), 60),
    (("--warmup_steps", "0", "--warmup_epochs", "0"), 0),  # how to get no warmup
    (("--warmup_steps", "1000"), 1000),
    (("--warmup_steps", "5", "--max_steps", "3"), 3),      # capped at the run length
])
def test_warmup_flags_keep_the_reference_meaning(flags, warmup):
    assert _train_config(*flags).warmup_steps == warmup


@pytest.mark.parametrize("flags,every", [
    ((), 20 * 2000),                                               # reference default: every 20 epochs
    (("--save_ckpt_freq", "1", "--iters_per_epoch", "50"), 50),    # the reference script's --save_ckpt_freq 1
    (("--save_ckpt_freq", "0"), 0),                                # only at the end
    (("--save_every_steps", "7", "--save_ckpt_freq", "1"), 7),     # our own flag counts steps
])
def test_save_ckpt_freq_counts_epochs_and_save_every_steps_counts_steps(flags, every):
    assert _train_config(*flags).checkpoint_every == every


@pytest.mark.parametrize("env,message", [
    ({"NNODES": "1+1"}, "NNODES=1+1 must be a positive integer"),  # was evaluated as 9 processes
    ({"NNODES": "0"}, "NNODES=0 must be a positive integer"),
    ({"EPOCHS": "1e3"}, "EPOCHS=1e3 must be a positive integer"),
    ({"SAVE_CKPT_FREQ": "-1"}, "SAVE_CKPT_FREQ=-1 must be a non-negative integer"),
    ({"WARMUP_STEPS": "1k"}, "WARMUP_STEPS=1k must be an integer"),
])
def test_scripts_check_every_number_before_shell_arithmetic(fake_model, env, message):
    for script in (AR, NON_AR):
        result = run_script(script, {**fake_model, **env})
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "arithmetic" not in result.stderr.lower()


def test_loss_spike_skip_is_opt_in():
    """The reference always drops updates whose loss reaches 2.0; here only with --skip_loss_threshold."""
    assert _train_config().skip_loss_threshold is None
    assert _train_config("--skip_loss_threshold", "2.0").skip_loss_threshold == 2.0


def test_dry_run_plans_the_lora_and_offload_launch_it_was_given(tmp_path):
    """DRY_RUN's plan (tools/plan.py plan_training_launch) is the one of the parsed flags: LORA_RANK and OFFLOAD
    reach it (in-process, tiny DiT config; the scripts' DRY_RUN path is tests/test_train_integration.py's)."""
    import json

    from tools.plan import plan_training_launch
    from train.train_pyramid_flow import build_parser

    tiny = dict(_class_name="PyramidFluxTransformer", patch_size=1, in_channels=64, num_layers=1,
                num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                pooled_projection_dim=24, axes_dims_rope=[4, 6, 6])
    (tmp_path / "diffusion_transformer_384p").mkdir()
    (tmp_path / "diffusion_transformer_384p" / "config.json").write_text(json.dumps(tiny))
    flags = ["--model_path", str(tmp_path), "--anno_file", "a", "--output_dir", "o", "--resolution", "64x64",
             "--max_frames", "4", "--batch_size", "4", "--shard_strategy", "zero2"]
    plain = plan_training_launch(build_parser().parse_args(flags), 1)
    lora = plan_training_launch(build_parser().parse_args(flags + ["--lora_rank", "4", "--offload_optimizer"]), 1)
    assert "LoRA" not in plain and "OFFLOAD" not in plain
    assert "LoRA rank 4: grads, master weights and AdamW state of the" in lora
    assert "OFFLOAD=1: master weights, AdamW state and fp32 gradient partition in host memory" in lora
