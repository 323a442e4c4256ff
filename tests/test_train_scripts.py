"""The launch scripts refuse bad settings before launching anything, with a message naming the variable to change,
and turn good ones into the right command (``PRINT_LAUNCH=1`` prints it instead of running it)."""
from __future__ import annotations

import json
import os
import subprocess
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
    (root / "empty_prompt_text_fea.safetensors").write_bytes(b"")  # present (the launch checks only that)
    return {"MODEL_PATH": str(root), "ANNO_FILE": str(anno), "OUTPUT_DIR": str(root / "out")}


def run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update({"GPUS": "8", **env})
    return subprocess.run(["sh", str(REPO / "scripts" / script)], env=full_env, capture_output=True, text=True,
                          timeout=120)


def launched(script: str, env: dict[str, str]) -> list[str]:
    """The command the script would run (``PRINT_LAUNCH=1``), one argument per item."""
    result = run_script(script, {**env, "PRINT_LAUNCH": "1"})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


AR = "train_pyramid_flow.sh"
NON_AR = "train_pyramid_flow_without_ar.sh"

CASES = [
    (AR, {"BATCH_SIZE": "6"}, "BATCH_SIZE=6: must be a multiple of 4 from 4 to 1024"),
    (NON_AR, {"BATCH_SIZE": "2"}, "BATCH_SIZE=2: must be a multiple of 4"),
    (AR, {"NUM_FRAMES": "12", "VIDEO_SYNC_GROUP": "8"}, "NUM_FRAMES=12 must be a multiple of VIDEO_SYNC_GROUP=8"),
    (AR, {"GPUS": "6", "VIDEO_SYNC_GROUP": "4"},
     "GPUS*NNODES/SP_SIZE=6 data-parallel ranks and VIDEO_SYNC_GROUP=4 must divide one another"),
    # Sequence parallelism: SP groups count once in the sync-group layout; SP_SIZE divides processes and heads.
    (AR, {"GPUS": "6", "SP_SIZE": "2", "VIDEO_SYNC_GROUP": "4"},
     "GPUS*NNODES/SP_SIZE=3 data-parallel ranks and VIDEO_SYNC_GROUP=4 must divide one another"),
    (NON_AR, {"SP_SIZE": "3"}, "SP_SIZE=3 must divide the number of processes (8 = GPUS*NNODES)"),
    (AR, {"GPUS": "16", "SP_SIZE": "16"}, "SP_SIZE=16 must divide the DiT's 24 attention heads"),
    (NON_AR, {"SP_SIZE": "0"}, "SP_SIZE=0: must be from 1 to 1024"),
    (AR, {"VARIANT": "diffusion_transformer_999p"}, "VARIANT=diffusion_transformer_999p: invalid choice"),
    (AR, {"VARIANT": "../.."}, "VARIANT=../..: invalid choice"),
    (NON_AR, {"MODEL_PATH": ""}, "set MODEL_PATH"),
    (AR, {"RESOLUTION": "768p"}, "RESOLUTION=768p does not match VARIANT=diffusion_transformer_384p"),
    (NON_AR, {"RESOLUTION": "384p"}, "RESOLUTION=384p does not match VARIANT=diffusion_transformer_image"),
    (AR, {"RESOLUTION": "65x64"}, "RESOLUTION=65x64: width and height must be positive multiples of 64"),
    (NON_AR, {"TASK": "i2v"}, "TASK=i2v: invalid choice"),
    (AR, {"SHARD_STRATEGY": "fsdp"}, "SHARD_STRATEGY=fsdp: invalid choice"),
    (AR, {"ANNO_FILE": "/nonexistent.jsonl"}, "ANNO_FILE=/nonexistent.jsonl: not found"),
    (AR, {"MODEL_NAME": "sd3"}, "MODEL_NAME=sd3: invalid choice"),
    (AR, {"OFFLOAD": "1", "SHARD_STRATEGY": "ddp"}, "OFFLOAD=1 is DeepSpeed's optimizer CPU offload: set SHARD_STRATEGY=zero2"),
    (NON_AR, {"OFFLOAD": "yes"}, "OFFLOAD=yes: must be 0 or 1"),
    (NON_AR, {"LOAD_TEXT_ENCODER": "2"}, "LOAD_TEXT_ENCODER=2: must be 0 or 1"),
    (AR, {"GRADIENT_CHECKPOINTING": "yes"}, "GRADIENT_CHECKPOINTING=yes: must be 0 or 1"),
    # Bounds: a number no machine can honour is refused with the range, not run (issue: NUM_WORKERS forked until
    # the host ran out of memory; LORA_RANK too large for dash's test ran a full finetune without a word).
    (AR, {"NUM_WORKERS": "99999999999999999999"}, "NUM_WORKERS=99999999999999999999: must be from 0 to 64 or auto"),
    (AR, {"LORA_RANK": "99999999999999999999"}, "LORA_RANK=99999999999999999999: must be from 0 to 4096"),
    (AR, {"LORA_RANK": "8", "LORA_ALPHA": "-1"}, "LORA_ALPHA=-1: must be a number > 0"),
    (AR, {"LORA_ALPHA": "16"}, "LORA_ALPHA=16 set, but LORA_RANK=0 (a full finetune): set LORA_RANK"),
    (AR, {"LORA_RANK": "8", "LORA_DROPOUT": "1"}, "LORA_DROPOUT=1: must be a number >= 0 and < 1"),
    (AR, {"LORA_RANK": "8", "SHARD_STRATEGY": "zero3"}, "LORA_RANK=8 needs SHARD_STRATEGY=zero2 or ddp"),
    (AR, {"LR": "abc"}, "LR=abc: must be a number > 0 and <= 1"),
    (AR, {"MODEL_DTYPE": "fp64"}, "MODEL_DTYPE=fp64: invalid choice"),
    (AR, {"EPOCHS": "1e3"}, "EPOCHS=1e3: must be a whole number, from 1 to 1000000"),
    (AR, {"SAVE_CKPT_FREQ": "-1"}, "SAVE_CKPT_FREQ=-1: must be from 0 to 1000000"),
    (AR, {"WARMUP_STEPS": "1k"}, "WARMUP_STEPS=1k: must be a whole number"),
    (AR, {"NNODES": "1+1"}, "NNODES=1+1: must be a whole number, from 1 to 100000"),
    (AR, {"NNODES": "0"}, "NNODES=0: must be from 1 to 100000"),
    (AR, {"GPUS": "0"}, "GPUS=0: must be from 1 to 1024"),
    (AR, {"MASTER_PORT": "70000"}, "MASTER_PORT=70000: must be from 1 to 65535"),
    (AR, {"COLLECTIVE_TIMEOUT_MIN": "0"}, "COLLECTIVE_TIMEOUT_MIN=0: must be a number > 0"),
    (AR, {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "x"}, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=x: must be a number >= 1"),
    (AR, {"EXTRA_ARGS": "--lr 2"}, "argument --lr: must be a number > 0 and <= 1"),
    # Held-out evaluation (docs/evaluation.md).
    (AR, {"EVAL_FRACTION": "0.6"}, "EVAL_FRACTION=0.6: must be a number >= 0 and <= 0.5"),
    (NON_AR, {"EVAL_EVERY": "-5"}, "EVAL_EVERY=-5: must be from 0 to"),
    (AR, {"EVAL_TIMESTEPS": "0"}, "EVAL_TIMESTEPS=0: must be from 1 to 64"),
    (AR, {"EVAL_DEGRADE_VS": "worst"}, "EVAL_DEGRADE_VS=worst: invalid choice"),
    (AR, {"EVAL_STOP_ON_DEGRADE": "yes"}, "EVAL_STOP_ON_DEGRADE=yes: must be 0 or 1"),
    (AR, {"EVAL_STOP_ON_DEGRADE": "1"}, "EVAL_STOP_ON_DEGRADE=1 needs an evaluation set: set EVAL_FRACTION"),
    (AR, {"EVAL_ANNO_FILE": "/nonexistent.jsonl"}, "EVAL_ANNO_FILE=/nonexistent.jsonl: not found"),
    (NON_AR, {"EVAL_FRACTION": "0.1", "EVAL_ANNO_FILE": "/etc/hostname"},
     "EVAL_ANNO_FILE=/etc/hostname and EVAL_FRACTION=0.1 both set"),
    ("generate.sh", {"PROMPT": "x", "LORA_PATH": "/nonexistent"}, "LORA_PATH=/nonexistent: no such folder"),
    ("generate.sh", {"PROMPT": "x", "LORA_SCALE": "0.5"}, "LORA_SCALE=0.5 scales an adapter: set LORA_PATH too"),
    ("generate.sh", {"PROMPT": "x", "HEIGHT": "100"}, "HEIGHT=100: must be a multiple of 64"),
    ("generate.sh", {"PROMPT": "x", "GPUS": "5"}, "GPUS=5 must divide the DiT's 24 attention heads"),
    ("generate.sh", {}, "give exactly one of PROMPT and PROMPT_FILE"),
    ("extract_vae_latent.sh", {"NUM_FRAMES": "10"}, "NUM_FRAMES=10 must be 8k+1"),
    ("extract_vae_latent.sh", {"WIDTH": "100"}, "WIDTH=100: must be a multiple of 8"),
    ("extract_vae_latent.sh", {"MODEL_PATH": "", "VAE_MODEL_PATH": ""}, "set MODEL_PATH (the model folder) or"),
    ("extract_text_feature.sh", {"BATCH_SIZE": "0"}, "BATCH_SIZE=0: must be from 1 to 4096"),
    ("extract_text_feature.sh", {"KIND": "audio"}, "KIND=audio: invalid choice"),
]


@pytest.mark.parametrize("script,env,message", CASES, ids=[f"{s.split('.')[0]}-{m[:30]}" for s, _, m in CASES])
def test_constraint_violation_stops_before_launch(fake_model, script, env, message):
    result = run_script(script, {**fake_model, **env})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.startswith(script + ":") and result.stderr.count("\n") == 1, result.stderr
    assert "torch.distributed" not in result.stderr and "Traceback" not in result.stderr


def test_a_model_folder_of_the_other_kind_is_named(tmp_path, fake_model):
    """MODEL_PATH of the SD3 kind with MODEL_NAME left at pyramid_flux: the message says which kind it is and what
    to set (it was a patch_size mismatch deep inside from_pretrained)."""
    variant = tmp_path / "diffusion_transformer_384p"
    variant.mkdir()
    (variant / "config.json").write_text(json.dumps({"_class_name": "PyramidDiffusionMMDiT",
                                                     "num_attention_heads": 24}))
    result = run_script(AR, {**fake_model, "MODEL_PATH": str(tmp_path)})
    assert result.returncode == 2
    assert "holds a pyramid_mmdit DiT (rain1011/pyramid-flow-sd3), but MODEL_NAME=pyramid_flux: set " \
           "MODEL_NAME=pyramid_mmdit" in result.stderr


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
    (["--use_temporal_pyramid", "--sync_video_input", "--max_frames", "12", "--video_sync_group", "8"],
     "--max_frames 12 must be a multiple of --video_sync_group 8"),
    (["--use_temporal_pyramid", "--max_frames", "8", "--video_sync_group", "4"], "needs --sync_video_input"),
    (["--task", "t2i", "--use_temporal_pyramid"], "drop --use_temporal_pyramid"),
    (["--sp_group_size", "2"], "without --use_sequence_parallel"),
    (["--use_sequence_parallel"], "needs --sp_group_size > 1"),
    (["--use_sequence_parallel", "--sp_group_size", "2"], "must divide the number of processes (1 = GPUS*NNODES)"),
])
def test_entrypoint_rejects_bad_flags_before_loading(fake_model, flags, message):
    from train.train_pyramid_flow import main
    with pytest.raises(SystemExit) as info:
        main(["--model_path", fake_model["MODEL_PATH"], "--anno_file", fake_model["ANNO_FILE"],
              "--output_dir", fake_model["OUTPUT_DIR"], *flags])
    assert message in str(info.value)


def test_entrypoint_refuses_an_out_of_range_flag_with_argparse_usage(fake_model, capsys):
    from train.train_pyramid_flow import main
    with pytest.raises(SystemExit) as info:
        main(["--model_path", fake_model["MODEL_PATH"], "--anno_file", fake_model["ANNO_FILE"],
              "--output_dir", fake_model["OUTPUT_DIR"], "--batch_size", "6"])
    assert info.value.code == 2
    assert "argument --batch_size: must be a multiple of 4 from 4 to 1024" in capsys.readouterr().err


def _multinode_env(fake_model, **env) -> dict[str, str]:
    return {**fake_model, "GPUS": "2", "NNODES": "2", "VIDEO_SYNC_GROUP": "4", "MASTER_ADDR": "", "NODE_RANK": "",
            "MASTER_PORT": "", **env}


@pytest.mark.parametrize("env", [{}, {"MASTER_ADDR": "10.0.0.1"}, {"NODE_RANK": "1"}],
                         ids=["neither", "no-node-rank", "no-master-addr"])
def test_multinode_launch_refuses_without_master_addr_and_node_rank(fake_model, env):
    result = run_script(AR, {**_multinode_env(fake_model, **env), "PRINT_LAUNCH": "1"})
    assert result.returncode == 2, result.stderr
    assert "NNODES=2 needs MASTER_ADDR" in result.stderr and "NODE_RANK" in result.stderr
    assert result.stdout == ""  # nothing was launched


def test_multinode_launch_rejects_node_rank_out_of_range(fake_model):
    result = run_script(AR, {**_multinode_env(fake_model, MASTER_ADDR="10.0.0.1", NODE_RANK="2"), "PRINT_LAUNCH": "1"})
    assert result.returncode == 2 and "NODE_RANK=2 must be in 0..1" in result.stderr
    assert result.stdout == ""


def test_multinode_launch_passes_rendezvous_and_prints_it_once(fake_model):
    result = run_script(AR, {**_multinode_env(fake_model, MASTER_ADDR="10.0.0.1", NODE_RANK="1"), "PRINT_LAUNCH": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("rendezvous") == 1
    assert "2 process(es) on node 1 of 2 (4 in all; layout from the environment, rendezvous 10.0.0.1:29500)" \
        in result.stderr
    args = result.stdout.splitlines()
    assert args[1:3] == ["-m", "torch.distributed.run"]
    assert args[3:args.index("--nproc_per_node") + 2] == ["--nnodes", "2", "--node_rank", "1", "--master_addr",
                                                           "10.0.0.1", "--master_port", "29500", "--nproc_per_node", "2"]
    assert args[args.index("--nproc_per_node") + 2].endswith("train/train_pyramid_flow.py")


@pytest.mark.parametrize("script", [AR, NON_AR])
def test_data_root_reaches_the_trainer(fake_model, tmp_path, script):
    env = {**fake_model, "GPUS": "1", "VIDEO_SYNC_GROUP": "1"}
    data_root = tmp_path / "data"
    data_root.mkdir()
    (data_root / "empty_prompt_text_fea.safetensors").write_bytes(b"")
    args = launched(script, {**env, "DATA_ROOT": str(data_root)})
    assert args[0].endswith("python3") or "python" in args[0]
    assert args[1].endswith("train/train_pyramid_flow.py")  # one process: the trainer itself, no torchrun
    assert flag(args, "--data_root") == str(data_root)

    result = run_script(script, {**env, "DATA_ROOT": str(tmp_path / "missing")})
    assert result.returncode == 2
    assert f"DATA_ROOT={tmp_path / 'missing'} is not a folder" in result.stderr


def test_empty_prompt_features_are_checked_before_launch(fake_model, tmp_path):
    """Caption dropout needs the extracted empty prompt: its absence is a launch error (it used to surface in the
    workers' data check, after torch and the model had loaded)."""
    anno = tmp_path / "anno.jsonl"
    anno.write_text(Path(fake_model["ANNO_FILE"]).read_text())
    result = run_script(AR, {**fake_model, "ANNO_FILE": str(anno), "GPUS": "1", "VIDEO_SYNC_GROUP": "1"})
    assert result.returncode == 2
    assert f"need(s) the empty prompt's features, not found at {tmp_path / 'empty_prompt_text_fea.safetensors'}" \
        in result.stderr
    assert "set EMPTY_PROMPT_FEA" in result.stderr


def test_summary_of_a_rerun_that_had_nothing_to_train_quotes_no_loss():
    from types import SimpleNamespace

    from train.run import run_summary
    no_eval = {"evaluations": [], "eval_base": None, "stopped_early": None}  # TrainResult's, without evaluation
    finished = SimpleNamespace(records=[], start_step=8, final_step=8, bad_samples=0, exported=["runs/x/export"],
                               **no_eval)
    line = run_summary(finished, 2, "runs/x")
    assert "nan" not in line
    assert line.startswith("done: nothing to train: runs/x already holds a finished run of 8 steps")
    trained = SimpleNamespace(records=[SimpleNamespace(loss=1.5), SimpleNamespace(loss=1.25)], start_step=4,
                              final_step=8, bad_samples=1, exported=[], **no_eval)
    assert run_summary(trained, 2, "runs/x") == ("done: 8 steps (from 4), loss 1.5000 -> 1.2500, world size 2; "
                                                 "1 unreadable samples skipped; exported nothing")


@pytest.mark.parametrize("script,env,on", [
    (AR, {"RESOLUTION": "768p", "VARIANT": "diffusion_transformer_768p"}, True),
    (AR, {"RESOLUTION": "768p", "VARIANT": "diffusion_transformer_768p", "GRADIENT_CHECKPOINTING": "0"}, False),
    (AR, {}, False),  # 384p
    (AR, {"GRADIENT_CHECKPOINTING": "1"}, True),
    (NON_AR, {}, True),  # t2i at 768p by default
], ids=["768p-auto", "768p-disabled", "384p", "384p-forced", "t2i-768p"])
def test_gradient_checkpointing_defaults_on_at_768p(fake_model, script, env, on, monkeypatch):
    monkeypatch.delenv("GRADIENT_CHECKPOINTING", raising=False)
    result = run_script(script, {**fake_model, "GPUS": "2", "VIDEO_SYNC_GROUP": "2", "PRINT_LAUNCH": "1", **env})
    assert result.returncode == 0, result.stderr
    assert ("--gradient_checkpointing" in result.stdout.splitlines()) == on
    announced = "gradient checkpointing on (GRADIENT_CHECKPOINTING=0 turns it off)" in result.stderr
    assert announced == (on and "GRADIENT_CHECKPOINTING" not in env)


def test_every_script_variable_is_read_by_its_launcher():
    """The variables a script sets (its header) are exactly those its launcher reads: none is set and then
    ignored, none is read without a documented default."""
    import re

    from tools.launch import SCRIPTS
    from train.launch import SCRIPT_VARIABLES

    expected = {AR: set(SCRIPT_VARIABLES["ar"]), NON_AR: set(SCRIPT_VARIABLES["full_sequence"])}
    expected.update({s.name: set(s.variables) for s in SCRIPTS.values()})
    for script, names in expected.items():
        text = (REPO / "scripts" / script).read_text()
        assert set(re.findall(r'^: "\$\{(\w+):=', text, re.M)) == names, script


def _args_and_config(*flags: str):
    from train.args import build_parser
    from train.run import train_config
    args = build_parser().parse_args(["--model_path", "m", "--anno_file", "a", "--output_dir", "o", *flags])
    return args, train_config(args)


def _train_config(*flags: str):
    return _args_and_config(*flags)[1]


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
    from train.run import warmup_note

    note = warmup_note(*_args_and_config(*flags))
    if "--warmup_steps" in flags and flags[flags.index("--warmup_steps") + 1] == "0" and warmup:
        assert note.startswith(f"LR warmup: {warmup} steps = WARMUP_EPOCHS=")
        assert "WARMUP_STEPS=0 is not positive" in note
    elif flags and warmup in (0, 1000, 3):
        assert note is None  # given in steps, or no warmup asked for: nothing to explain


@pytest.mark.parametrize("flags,every", [
    ((), 20 * 2000),                                               # reference default: every 20 epochs
    (("--save_ckpt_freq", "1", "--iters_per_epoch", "50"), 50),    # the reference script's --save_ckpt_freq 1
    (("--save_ckpt_freq", "0"), 0),                                # only at the end
    (("--save_every_steps", "7", "--save_ckpt_freq", "1"), 7),     # our own flag counts steps
])
def test_save_ckpt_freq_counts_epochs_and_save_every_steps_counts_steps(flags, every):
    assert _train_config(*flags).checkpoint_every == every


def test_loss_spike_skip_is_opt_in():
    """The reference always drops updates whose loss reaches 2.0; here only with --skip_loss_threshold."""
    assert _train_config().skip_loss_threshold is None
    assert _train_config("--skip_loss_threshold", "2.0").skip_loss_threshold == 2.0


def test_dry_run_plans_the_lora_and_offload_launch_it_was_given(tmp_path):
    """DRY_RUN's plan (train/run.py dry_run_text) is the one of the parsed flags: LORA_RANK and OFFLOAD
    reach it (in-process, tiny DiT config; the scripts' DRY_RUN path is tests/test_train_integration.py's)."""
    import json

    from train.args import build_parser
    from train.run import dry_run_text as plan_training_launch

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


def test_the_ar_script_reads_extracted_text_features_and_never_encodes_captions(fake_model):
    """Divergence: the reference's AR script passes --load_text_encoder; ours never does (T5-XXL would sit on every
    GPU for features that are extracted once), and LOAD_TEXT_ENCODER is not one of its variables."""
    ar = launched(AR, {**fake_model, "LOAD_TEXT_ENCODER": "1"})
    assert "--load_text_encoder" not in ar and "--use_temporal_pyramid" in ar
    said = run_script(AR, {**fake_model, "LOAD_TEXT_ENCODER": "1", "PRINT_LAUNCH": "1"}).stderr
    assert "LOAD_TEXT_ENCODER is ignored: the AR script always reads the extracted text_fea files" in said
    full = launched(NON_AR, fake_model)  # the full-sequence script encodes live by default, as the reference's
    assert "--load_text_encoder" in full


def test_the_entry_point_defaults_are_the_reference_scripts_values():
    """Divergence: train/train_pyramid_flow.py without a script trains like the scripts (seed 42, gradients clipped
    at 1.0, as the reference's scripts pass them), not like the reference's argparse defaults (seed 0, no clipping,
    10 workers per process: 80 on 8 GPUs); workers are `auto` (at most 4, capped by the machine)."""
    from train.args import build_parser

    args = build_parser().parse_args(["--model_path", "m", "--anno_file", "a", "--output_dir", "o"])
    assert (args.seed, args.clip_grad, args.num_workers) == (42, 1.0, "auto")
