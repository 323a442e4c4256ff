"""The training scripts' launcher: ``scripts/train_pyramid_flow.sh`` and ``train_pyramid_flow_without_ar.sh`` set
their variables and run ``python3 -m train.launch ar`` or ``... full_sequence``.

Here the variables become ``train/train_pyramid_flow.py``'s flags (:func:`trainer_argv`: the one table of what each
variable means), the flags are parsed and checked by the trainer's own parser (:func:`train.args.parse_and_check`,
every message in the script's terms: ``BATCH_SIZE=6: must be a multiple of 4 ...``), and only then does
:func:`trainer_misc.runtime.launcher.launch` start the processes: a refused setting costs about a second, not a
torchrun start-up. Nothing here imports torch.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from train.args import FLAG_VARS, parse_and_check, strategy_of
from trainer_misc.runtime.arguments import ConfigError, number, switch
from trainer_misc.runtime.launcher import NodeLayout, launch, node_layout, say

__all__ = ["MODES", "SCRIPTS", "SCRIPT_VARIABLES", "trainer_argv", "main"]

TRAIN_ENTRY = Path(__file__).resolve().with_name("train_pyramid_flow.py")
MODES = ("ar", "full_sequence")
SCRIPTS = {"ar": "train_pyramid_flow.sh", "full_sequence": "train_pyramid_flow_without_ar.sh"}

# Every variable each training script reads (its header sets them all, most with a default); the launch layout
# variables (GPUS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT) are read by trainer_misc.runtime.launcher.
_COMMON = ("GPUS", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "SHARD_STRATEGY", "SP_SIZE", "MODEL_NAME",
           "MODEL_PATH", "VARIANT", "OUTPUT_DIR", "BATCH_SIZE", "GRAD_ACCU_STEPS", "RESOLUTION", "NUM_FRAMES",
           "ANNO_FILE", "DATA_ROOT", "EMPTY_PROMPT_FEA", "MODEL_DTYPE", "LR", "WARMUP_STEPS", "WARMUP_EPOCHS",
           "EPOCHS", "ITERS_PER_EPOCH", "SAVE_CKPT_FREQ", "SAVE_EVERY_STEPS", "KEEP_CKPTS", "LORA_RANK",
           "LORA_ALPHA", "LORA_TARGETS", "LORA_DROPOUT", "OFFLOAD", "GRADIENT_CHECKPOINTING", "NUM_WORKERS",
           "COLLECTIVE_TIMEOUT_MIN", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "EVAL_ANNO_FILE", "EVAL_FRACTION",
           "EVAL_EVERY", "EVAL_SAMPLES", "EVAL_TIMESTEPS", "EVAL_DEGRADE_MARGIN", "EVAL_DEGRADE_PATIENCE",
           "EVAL_DEGRADE_VS", "EVAL_STOP_ON_DEGRADE", "EXTRA_ARGS")
SCRIPT_VARIABLES = {"ar": _COMMON + ("VIDEO_SYNC_GROUP", "EVAL_HISTORY_DEPTHS", "PACK_SLOTS"),
                    "full_sequence": _COMMON + ("TASK", "LOAD_TEXT_ENCODER")}

# Fixed by the scripts, as the reference's scripts fix them.
_FIXED = ["--schedule_shift", "1.0", "--lr_scheduler", "constant_with_warmup", "--opt_beta1", "0.9", "--opt_beta2",
          "0.95", "--weight_decay", "1e-4", "--clip_grad", "1.0", "--seed", "42"]
# Variable -> flag, passed on as they are (the trainer's parser checks them).
_VALUES = ("MODEL_NAME", "MODEL_PATH", "VARIANT", "OUTPUT_DIR", "ANNO_FILE", "RESOLUTION", "NUM_FRAMES",
           "BATCH_SIZE", "GRAD_ACCU_STEPS", "LR", "WARMUP_STEPS", "WARMUP_EPOCHS", "EPOCHS", "ITERS_PER_EPOCH",
           "SAVE_CKPT_FREQ", "SAVE_EVERY_STEPS", "KEEP_CKPTS", "NUM_WORKERS", "SHARD_STRATEGY", "SP_SIZE")
_FLAG_OF = {var: flag for flag, var in FLAG_VARS.items()}
_OPTIONAL = ("DATA_ROOT", "EMPTY_PROMPT_FEA", "LORA_ALPHA", "LORA_TARGETS", "LORA_DROPOUT", "EVAL_ANNO_FILE",
             "EVAL_FRACTION", "EVAL_EVERY", "EVAL_SAMPLES", "EVAL_TIMESTEPS", "EVAL_HISTORY_DEPTHS",
             "EVAL_DEGRADE_MARGIN", "EVAL_DEGRADE_PATIENCE", "EVAL_DEGRADE_VS")


def _switch(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip()
    try:
        return switch(raw)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"{name}={raw}: {e}") from None


def trainer_argv(env: Mapping[str, str], mode: str, layout: NodeLayout) -> tuple[list[str], list[str]]:
    """``(flags, notes)``: the trainer's flags for a script's variables, and what was decided for the user (said on
    the launch line). Values are passed on unchecked; :func:`train.args.parse_and_check` checks them."""
    get = {name: env.get(name, "").strip() for name in SCRIPT_VARIABLES[mode]}
    notes: list[str] = []
    argv = ["--task", "t2v", "--use_temporal_pyramid", "--sync_video_input", "--video_sync_group",
            get["VIDEO_SYNC_GROUP"], "--frame_per_unit", "1", "--pack_slots", get["PACK_SLOTS"] or "1"] \
        if mode == "ar" else ["--task", get["TASK"]]
    if mode == "full_sequence" and _switch(env, "LOAD_TEXT_ENCODER"):
        argv.append("--load_text_encoder")
    if mode == "ar" and env.get("LOAD_TEXT_ENCODER", "").strip():
        notes.append("LOAD_TEXT_ENCODER is ignored: the AR script always reads the extracted text_fea files")
    for var in _VALUES:
        argv += [_FLAG_OF[var], get[var]]
    if get["SP_SIZE"].isdigit() and int(get["SP_SIZE"]) > 1:
        argv.append("--use_sequence_parallel")
    dtype = get["MODEL_DTYPE"] or ("bf16" if layout.have_gpu else "fp32")
    if not get["MODEL_DTYPE"]:
        notes.append(f"MODEL_DTYPE={dtype} ({'GPU' if layout.have_gpu else 'no GPU'})")
    argv += ["--model_dtype", dtype, *_FIXED]
    checkpointing = get["GRADIENT_CHECKPOINTING"]
    if checkpointing:
        if _switch(env, "GRADIENT_CHECKPOINTING"):
            argv.append("--gradient_checkpointing")
    elif get["RESOLUTION"] == "768p":
        argv.append("--gradient_checkpointing")
        notes.append("RESOLUTION=768p: gradient checkpointing on (GRADIENT_CHECKPOINTING=0 turns it off)")
    if _switch(env, "OFFLOAD"):
        argv.append("--offload_optimizer")
    argv += ["--lora_rank", get["LORA_RANK"] or "0"]
    if _switch(env, "EVAL_STOP_ON_DEGRADE"):
        argv.append("--eval_stop_on_degrade")
    for var in _OPTIONAL:
        if get.get(var):  # unset: the flag's default (EVAL_HISTORY_DEPTHS is the AR script's only)
            argv += [_FLAG_OF[var], get[var]]
    set_lora = [v for v in ("LORA_ALPHA", "LORA_TARGETS", "LORA_DROPOUT") if get[v]]
    if set_lora and get["LORA_RANK"] in ("", "0"):
        raise ConfigError(f"{', '.join(f'{v}={get[v]}' for v in set_lora)} set, but LORA_RANK={get['LORA_RANK'] or 0} "
                          "(a full finetune): set LORA_RANK (e.g. 16) to train LoRA adapters, or unset "
                          f"{' and '.join(set_lora)}")
    for name, check in (("COLLECTIVE_TIMEOUT_MIN", number(0, 7 * 24 * 60, lo_open=True)),
                        ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", number(1, 24 * 3600))):
        if get[name]:
            try:
                check(get[name])
            except argparse.ArgumentTypeError as e:
                raise ConfigError(f"{name}={get[name]}: {e} ({'minutes' if 'MIN' in name else 'seconds'})") from None
    try:
        extra = shlex.split(get["EXTRA_ARGS"])
    except ValueError as e:
        raise ConfigError(f"EXTRA_ARGS={get['EXTRA_ARGS']}: cannot split into flags ({e})") from None
    return argv + extra, notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] not in MODES:
        raise SystemExit(f"usage: python3 -m train.launch {{{','.join(MODES)}}} (the training scripts run it)")
    mode = argv[0]
    prog = SCRIPTS[mode]
    env = os.environ
    try:
        layout = node_layout(env)
        flags, notes = trainer_argv(env, mode, layout)
        values = {name: env.get(name, "").strip() for name in SCRIPT_VARIABLES[mode]}
        extra = set(shlex.split(values["EXTRA_ARGS"]))  # flags given there are named as flags, not as variables
        variables = {f: var for f, var in FLAG_VARS.items() if f not in extra}
        args = parse_and_check(flags, layout.world_size, variables, values)
    except ConfigError as e:
        say(prog, str(e))
        return 2
    where = "this node" if layout.nnodes == 1 else f"node {layout.node_rank} of {layout.nnodes}"
    rendezvous = "" if layout.nnodes == 1 else f", rendezvous {layout.master_addr}:{layout.master_port}"
    say(prog, f"{layout.gpus} process(es) on {where} ({layout.world_size} in all; layout from {layout.source}"
              f"{rendezvous}), {'GPU' if layout.have_gpu else 'CPU'}, {strategy_of(args)}, {args.model_dtype}"
              + (f"; {'; '.join(notes)}" if notes else ""))
    say(prog, "starting: each process imports torch and loads the model (tens of seconds on a small CPU)")
    launch([str(TRAIN_ENTRY), *flags], layout, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
