"""Every flag of ``train/train_pyramid_flow.py``, with its range, and the checks between flags: the one place where
training settings are validated.

The training scripts do not check anything themselves: their launcher (``train/launch.py``) turns the script's
variables into these flags (:data:`FLAG_VARS` says which variable sets which flag) and runs :func:`parse_and_check`
before any process starts, so every message names what the user set (``BATCH_SIZE=6`` from a script,
``--batch_size 6`` on the command line). Nothing here imports torch: ``--help`` and a rejected setting answer in
about a second.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

from pyramid_dit.kinds import MODEL_NAMES, kind_of_folder
from pyramid_dit.options import ATTENTION_SPLITS
from trainer_misc.data.annotation import default_empty_prompt_path, resolve_data_root
from trainer_misc.data.resolution import parse_resolution
from trainer_misc.runtime.arguments import CheckedParser, ConfigError, Naming, integer, number, parse_checked
from trainer_misc.runtime.slots import pack_choices, pack_slots_arg, process_slot_count

__all__ = ["FLAG_VARS", "SAMPLE_RATIOS", "VARIANTS", "build_parser", "check_args", "empty_prompt_file",
           "has_eval_set", "parse_and_check", "sp_size_of", "strategy_of"]

SAMPLE_RATIOS = (1, 2, 1)  # batch columns per pyramid stage (low, mid, high resolution)
VARIANTS = ("diffusion_transformer_384p", "diffusion_transformer_768p", "diffusion_transformer_image")
STRATEGIES = ("ddp", "zero2", "zero3")
MAX_STEPS = 10**9

# The training scripts' variables and the flag each one sets (scripts/train_pyramid_flow*.sh, train/launch.py).
FLAG_VARS: dict[str, str] = {
    "--task": "TASK", "--model_name": "MODEL_NAME", "--model_path": "MODEL_PATH", "--model_variant": "VARIANT",
    "--model_dtype": "MODEL_DTYPE", "--output_dir": "OUTPUT_DIR", "--anno_file": "ANNO_FILE",
    "--data_root": "DATA_ROOT", "--resolution": "RESOLUTION", "--max_frames": "NUM_FRAMES",
    "--batch_size": "BATCH_SIZE", "--gradient_accumulation_steps": "GRAD_ACCU_STEPS", "--lr": "LR",
    "--warmup_steps": "WARMUP_STEPS", "--warmup_epochs": "WARMUP_EPOCHS", "--epochs": "EPOCHS",
    "--iters_per_epoch": "ITERS_PER_EPOCH", "--save_ckpt_freq": "SAVE_CKPT_FREQ",
    "--save_every_steps": "SAVE_EVERY_STEPS", "--keep_last_checkpoints": "KEEP_CKPTS",
    "--num_workers": "NUM_WORKERS", "--shard_strategy": "SHARD_STRATEGY", "--video_sync_group": "VIDEO_SYNC_GROUP",
    "--sp_group_size": "SP_SIZE", "--lora_rank": "LORA_RANK", "--lora_alpha": "LORA_ALPHA",
    "--lora_targets": "LORA_TARGETS", "--lora_dropout": "LORA_DROPOUT", "--offload_optimizer": "OFFLOAD",
    "--gradient_checkpointing": "GRADIENT_CHECKPOINTING", "--load_text_encoder": "LOAD_TEXT_ENCODER",
    "--empty_prompt_fea": "EMPTY_PROMPT_FEA", "--eval_anno_file": "EVAL_ANNO_FILE", "--eval_fraction": "EVAL_FRACTION",
    "--eval_every": "EVAL_EVERY", "--eval_samples": "EVAL_SAMPLES", "--eval_timesteps": "EVAL_TIMESTEPS",
    "--eval_history_depths": "EVAL_HISTORY_DEPTHS", "--eval_degrade_margin": "EVAL_DEGRADE_MARGIN",
    "--eval_degrade_patience": "EVAL_DEGRADE_PATIENCE", "--eval_degrade_vs": "EVAL_DEGRADE_VS",
    "--eval_stop_on_degrade": "EVAL_STOP_ON_DEGRADE",
    "--pack_slots": "PACK_SLOTS",
}


def workers(text: str) -> str | int:
    """``--num_workers``: ``auto`` (up to 4, capped by the machine at start-up) or a count from 0 to 64."""
    if str(text).strip() == "auto":
        return "auto"
    return integer(0, 64, why=" or auto (the machine's CPUs and memory cap it further at start-up)")(text)


def build_parser() -> CheckedParser:
    p = CheckedParser(prog="train_pyramid_flow.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("task and model")
    g.add_argument("--task", default="t2v", choices=["t2v", "t2i"], help="video (t2v) or image (t2i) training")
    g.add_argument("--model_name", default="pyramid_flux", choices=list(MODEL_NAMES),
                   help="DiT kind: pyramid_flux (rain1011/pyramid-flow-miniflux) or pyramid_mmdit (sd3)")
    g.add_argument("--model_path", required=True,
                   help="downloaded checkpoint folder (holds causal_video_vae/, diffusion_transformer_*/, text_*)")
    g.add_argument("--model_variant", default="diffusion_transformer_384p", choices=VARIANTS,
                   help="DiT subfolder of --model_path to finetune")
    g.add_argument("--model_dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="mixed precision")
    g.add_argument("--dit_pretrained_weight", default="",
                   help="single-file DiT state dict to start from (.safetensors, or .pt/.bin read weights-only)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations (768p needs it)")
    g.add_argument("--gradient_checkpointing_ratio", type=number(0, 1), default=0.75,
                   help="fraction of transformer blocks that recompute activations")
    g.add_argument("--lora_rank", type=integer(0, 4096), default=0,
                   help="LoRA rank (0: full finetune). Only the adapters train; the export holds the merged DiT "
                        "(export/transformer) and the adapter in peft format (export/lora)")
    g.add_argument("--lora_alpha", type=number(0, 1e6, lo_open=True), default=None,
                   help="LoRA alpha (scale alpha/rank; default: the rank)")
    g.add_argument("--lora_targets", default="",
                   help="comma-separated layer names inside every block (default: the kind's attention q/k/v/out "
                        "and MLP linears, pyramid_dit/kinds.py lora_targets)")
    g.add_argument("--lora_dropout", type=number(0, 1, hi_open=True), default=0.0,
                   help="dropout on the LoRA branch input")
    g.add_argument("--use_flash_attn", action="store_true", help="accepted for compatibility; attention uses SDPA")
    g.add_argument("--attention_split", default="auto", choices=ATTENTION_SPLITS,
                   help="auto: flex on CUDA (one FlexAttention call per block over the packed sequence), frame on the "
                        "CPU (one SDPA call per frame); column: one masked SDPA call per column; same results. "
                        "tools/measure_gpu.py times them on a GPU")
    g.add_argument("--use_temporal_causal", action="store_true", default=True, help="accepted; always on")
    g.add_argument("--interp_condition_pos", action="store_true", default=True, help="accepted; always on")

    g = p.add_argument_group("objective")
    g.add_argument("--use_temporal_pyramid", action="store_true",
                   help="autoregressive temporal-pyramid training (else full-sequence pyramid flow)")
    g.add_argument("--max_frames", type=integer(1, 1024), default=16,
                   help="latent frames per training clip (16 = 121 video frames = 5 s at 24 fps)")
    g.add_argument("--frame_per_unit", type=integer(1, 1024), default=1, help="latent frames per autoregressive unit")
    g.add_argument("--schedule_shift", type=number(0, 100, lo_open=True), default=1.0,
                   help="flow-matching timestep shift")
    g.add_argument("--corrupt_ratio", type=number(0, 1), default=1 / 3, help="max noise level of the AR history clips")
    g.add_argument("--text_drop_rate", type=number(0, 1), default=0.1,
                   help="fraction of captions replaced by the empty prompt (classifier-free guidance)")
    g.add_argument("--sync_video_input", action="store_true",
                   help="ranks of one --video_sync_group read the same clip (needed for AR training)")
    g.add_argument("--video_sync_group", type=integer(1, 1024), default=8,
                   help="slots sharing one clip in AR training (4, 8 or 16; divides --max_frames; a divisor of the "
                        "world size, one process per slot, or a multiple of it: each process trains several slots)")

    g = p.add_argument_group("data")
    g.add_argument("--anno_file", required=True, help="annotation jsonl (see README: annotation format)")
    g.add_argument("--data_root", default=None,
                   help="root for relative paths in --anno_file (default: $PYRAMID_DATA_ROOT, else its folder)")
    g.add_argument("--resolution", default="384p",
                   help="384p, 768p, or WIDTHxHEIGHT (multiples of 64) for custom or tiny runs")
    g.add_argument("--load_text_encoder", action="store_true",
                   help="encode captions during training instead of reading text_fea files")
    g.add_argument("--load_vae", action="store_true",
                   help="encode pixels with the VAE during training (always on for --task t2i)")
    g.add_argument("--empty_prompt_fea", default="",
                   help="empty-prompt features for caption dropout (default: <data root>/"
                        "empty_prompt_text_fea.safetensors, written by tools/extract_text_features.py)")
    g.add_argument("--num_workers", type=workers, default="auto",
                   help="DataLoader workers per process: auto (up to 4) or 0..64; capped at start-up by the "
                        "machine's CPUs and memory, with a note")
    g.add_argument("--crop_mode", default="random", choices=["random", "center"],
                   help="t2i: where the bucket-sized crop is cut from the resized image (reference default: random)")
    g.add_argument("--no_shuffle", action="store_true",
                   help="read samples in annotation order instead of a seeded shuffle (to reproduce a data problem)")

    g = p.add_argument_group("held-out evaluation (docs/evaluation.md)")
    g.add_argument("--eval_anno_file", default="",
                   help="annotation jsonl of an evaluation set (same format as --anno_file; never trained on)")
    g.add_argument("--eval_fraction", type=number(0, 0.5), default=0.0,
                   help="hold this fraction of --anno_file's lines out of training for evaluation, chosen by a "
                        "split seeded with --seed (0: no held-out split)")
    g.add_argument("--eval_every", type=integer(0, MAX_STEPS), default=500,
                   help="with an evaluation set: its loss before the first step (the base model), every N optimizer "
                        "steps and after the last (0: only before the first and after the last)")
    g.add_argument("--eval_samples", type=integer(1, 4096), default=32,
                   help="evaluate at most this many samples of the evaluation set (its first ones): bounds the cost")
    g.add_argument("--eval_timesteps", type=integer(1, 64), default=4,
                   help="timesteps per pyramid stage in the evaluation grid (fixed midpoints of the training draw)")
    g.add_argument("--eval_history_depths", type=integer(1, 64), default=2,
                   help="AR runs: history depths (units already generated) in the evaluation grid")
    g.add_argument("--eval_degrade_margin", type=number(0, 10), default=0.02,
                   help="warn when the evaluation loss is more than this fraction above the reference (0.02 = 2%%)")
    g.add_argument("--eval_degrade_patience", type=integer(1, 1000), default=3,
                   help="... for this many evaluations in a row")
    g.add_argument("--eval_degrade_vs", default="best", choices=["best", "base"],
                   help="the reference: the best evaluation loss so far (base model included) or the base model's")
    g.add_argument("--eval_stop_on_degrade", action="store_true",
                   help="when the warning fires, checkpoint, export and end the run (EVAL_STOP_ON_DEGRADE=1)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=integer(4, 1024, multiple_of=sum(SAMPLE_RATIOS),
                                                why=" (each batch is split 1:2:1 over the 3 pyramid stages)"),
                   default=4, help="per-process batch; a multiple of 4 (columns 1:2:1)")
    g.add_argument("--gradient_accumulation_steps", type=integer(1, 4096), default=1)
    g.add_argument("--lr", type=number(0, 1, lo_open=True), default=5e-5)
    g.add_argument("--opt", default="adamw", choices=["adamw"])
    g.add_argument("--opt_beta1", type=number(0, 1, hi_open=True), default=0.9)
    g.add_argument("--opt_beta2", type=number(0, 1, hi_open=True), default=0.999)
    g.add_argument("--opt_eps", type=number(0, 1, lo_open=True), default=1e-8)
    g.add_argument("--weight_decay", type=number(0, 1e3), default=1e-4)
    g.add_argument("--clip_grad", type=number(0, 1e6), default=1.0, help="max grad norm (0: no clipping)")
    g.add_argument("--lr_scheduler", default="constant_with_warmup", choices=["constant_with_warmup", "cosine"])
    g.add_argument("--warmup_steps", type=integer(-1, MAX_STEPS), default=-1,
                   help="LR warmup steps; 0 or less falls back to --warmup_epochs epochs, as in the reference")
    g.add_argument("--warmup_epochs", type=integer(0, 10**6), default=1,
                   help="LR warmup in epochs of --iters_per_epoch steps, used when --warmup_steps <= 0 "
                        "(--warmup_epochs 0 --warmup_steps 0: no warmup)")
    g.add_argument("--warmup_lr", type=number(0, 1), default=None, help="LR at the start of warmup")
    g.add_argument("--min_lr", type=number(0, 1), default=1e-5, help="final LR of the cosine schedule")
    g.add_argument("--epochs", type=integer(1, 10**6), default=100)
    g.add_argument("--iters_per_epoch", type=integer(1, MAX_STEPS), default=2000, help="optimizer steps per epoch")
    g.add_argument("--max_steps", type=integer(0, MAX_STEPS), default=0,
                   help="total optimizer steps (0: epochs * iters_per_epoch)")
    g.add_argument("--skip_loss_threshold", type=number(0, None, lo_open=True), default=None,
                   help="drop updates whose loss (mean over ranks) reaches this value; the reference used 2.0")
    g.add_argument("--ema_update", action="store_true", help="keep an EMA of the DiT weights")
    g.add_argument("--ema_decay", type=number(0, 1, lo_open=True, hi_open=True), default=0.9999)
    g.add_argument("--ema_update_every", type=integer(1, MAX_STEPS), default=100,
                   help="steps between EMA updates (reference: 100)")
    g.add_argument("--seed", type=integer(0, 2**31 - 1), default=42)

    g = p.add_argument_group("parallelism")
    g.add_argument("--use_fsdp", action="store_true", help="accepted: shard with --fsdp_shard_strategy")
    g.add_argument("--fsdp_shard_strategy", default=None, choices=["zero2", "zero3"],
                   help="alias of --shard_strategy (reference flag name)")
    g.add_argument("--shard_strategy", default=None, choices=list(STRATEGIES),
                   help="ddp (replicated), zero2 (optimizer+gradients sharded), zero3 (parameters too)")
    g.add_argument("--use_sequence_parallel", action="store_true",
                   help="split each sample's tokens over --sp_group_size processes (Ulysses all-to-all over heads; "
                        "they read the same batch)")
    g.add_argument("--sp_group_size", type=integer(1, 1024), default=1,
                   help="processes per sequence-parallel group (with --use_sequence_parallel; divides the number "
                        "of processes and the DiT's head count)")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    g.add_argument("--grad_reduce_dtype", default="fp32", choices=["fp32", "model"],
                   help="dtype of the cross-rank gradient reduction and of the accumulation over micro-batches: "
                        "fp32 (default, exact enough for many ranks) or model (the training dtype, e.g. bf16: "
                        "half the gradient traffic, as the reference)")
    g.add_argument("--pack_slots", type=pack_slots_arg, default=1,
                   help="AR with a virtual sync group: slots of this process run per forward/backward pass, their "
                        "columns packed into one micro-batch (same losses and gradients, fewer and bigger kernels, "
                        "their activations held at once): a divisor of VIDEO_SYNC_GROUP / processes, or auto (the "
                        "most the planner predicts to fit in the GPU's memory; 1 on the CPU)")
    g.add_argument("--offload_optimizer", action="store_true",
                   help="zero2/zero3: keep fp32 master weights, gradients and AdamW state in CPU memory and update "
                        "them there with DeepSpeed's CPU Adam (less GPU memory, slower steps; OFFLOAD=1)")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", required=True, help="checkpoints, tensorboard logs and the exported DiT")
    g.add_argument("--save_ckpt_freq", type=integer(0, 10**6), default=20,
                   help="checkpoint every N epochs (of --iters_per_epoch steps), as in the reference; 0: only at the "
                        "end (the last step is always checkpointed)")
    g.add_argument("--save_every_steps", type=integer(0, MAX_STEPS), default=0,
                   help="checkpoint every N optimizer steps instead of every --save_ckpt_freq epochs (0: off)")
    g.add_argument("--keep_last_checkpoints", type=integer(0, 10**6), default=0,
                   help="keep only the newest N checkpoints (0: keep all)")
    g.add_argument("--export_dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="dtype of the exported DiT in <output_dir>/export/transformer (default: the training dtype)")
    g.add_argument("--resume", default="auto", help="auto (newest complete checkpoint), never, or a folder")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none"])
    g.add_argument("--print_freq", type=integer(1, MAX_STEPS), default=20,
                   help="accepted for compatibility (progress is printed as the run goes)")
    g.add_argument("--validation_every", type=integer(0, MAX_STEPS), default=0,
                   help="every N optimizer steps rank 0 samples videos of fixed prompts (EMA weights with "
                        "--ema_update) into <output_dir>/samples/ and tensorboard; 0 = off")
    g.add_argument("--validation_prompts", type=integer(1, 64), default=2,
                   help="how many prompts: the captions of the first N annotation lines")
    g.add_argument("--validation_temp", type=integer(0, 1024), default=2,
                   help="latent frames per sample (2 = 9 video frames; 0: --max_frames); kept short, it runs on a "
                        "training GPU while the other ranks wait")
    g.add_argument("--validation_steps", type=integer(1, 1000), nargs=3, default=[5, 5, 5], metavar="N",
                   help="Euler steps per stage (the later frames use half, at least 1)")
    g.add_argument("--validation_offload", action="store_true",
                   help="keep the sampling DiT and VAE on the CPU between validations (saves GPU memory)")
    g.add_argument("--trace_batches", action="store_true",
                   help="each rank writes logs/trace_rank<r>.jsonl: per micro-batch the clip paths, its sync-group "
                        "position and the AR units trained, and finally its sharding report (to check a setup)")
    return p


def sp_size_of(args: argparse.Namespace) -> int:
    """Processes per sequence-parallel group (the reference's flag pair: ``--use_sequence_parallel
    --sp_group_size N``)."""
    return args.sp_group_size if args.use_sequence_parallel else 1


def strategy_of(args: argparse.Namespace) -> str:
    """``--shard_strategy``, else the reference's ``--fsdp_shard_strategy`` / ``--use_fsdp``, else ddp."""
    if args.shard_strategy:
        return args.shard_strategy
    if args.fsdp_shard_strategy:
        return args.fsdp_shard_strategy
    return "zero2" if args.use_fsdp else "ddp"


def empty_prompt_file(args: argparse.Namespace) -> tuple[Optional[Path], list[str]]:
    """``(path, what needs it)``: the extracted empty-prompt features this run reads (the replacement for dropped
    captions and the negative prompt of validation samples), or ``(None, [])`` when none is needed (the text encoder
    runs during training and encodes "" itself, or nothing drops captions or samples)."""
    needed_by = [what for what, on in (("caption dropout (--text_drop_rate > 0)", args.text_drop_rate > 0),
                                       ("validation samples (--validation_every)", args.validation_every > 0)) if on]
    if args.load_text_encoder or not needed_by:
        return None, []
    if args.empty_prompt_fea:
        return Path(args.empty_prompt_fea), needed_by
    return default_empty_prompt_path(resolve_data_root(args.anno_file, args.data_root)), needed_by


def _resolution_matches_variant(resolution: str, variant: str) -> bool:
    if resolution == "384p":
        return variant == "diffusion_transformer_384p"
    if resolution == "768p":
        return variant in ("diffusion_transformer_768p", "diffusion_transformer_image")
    return True  # WIDTHxHEIGHT: custom and tiny runs


def check_args(args: argparse.Namespace, world_size: int, n: Optional[Naming] = None) -> None:
    """The checks between flags, before anything loads: raises :class:`ConfigError` naming what to change
    (``n`` names each setting as its user set it)."""
    n = n or Naming(args)
    sp = sp_size_of(args)
    if args.use_sequence_parallel and args.sp_group_size < 2:
        raise ConfigError(f"--use_sequence_parallel needs --sp_group_size > 1, got {args.sp_group_size}")
    if args.sp_group_size != 1 and not args.use_sequence_parallel:
        raise ConfigError(f"--sp_group_size {args.sp_group_size} without --use_sequence_parallel: add the flag (or "
                          "drop --sp_group_size)")
    if world_size % sp:
        raise ConfigError(f"{n('--sp_group_size')} must divide the number of processes ({world_size} = GPUS*NNODES): "
                          f"each sample is split over {n.var('--sp_group_size')} processes; use a divisor of "
                          f"{world_size}")
    try:
        parse_resolution(args.resolution)
    except ValueError as e:
        raise ConfigError(f"{n('--resolution')}: {str(e).split(': ', 1)[-1]}") from None
    if not _resolution_matches_variant(args.resolution, args.model_variant):
        raise ConfigError(f"{n('--resolution')} does not match {n('--model_variant')}: use 384p with "
                          "diffusion_transformer_384p, 768p with diffusion_transformer_768p or "
                          "diffusion_transformer_image")
    _check_model_folder(args, n, sp)
    if not Path(args.anno_file).is_file():
        raise ConfigError(f"{n('--anno_file')}: not found; set {n.var('--anno_file')} to your annotation jsonl")
    _check_evaluation(args, n)
    if args.data_root and not Path(args.data_root).is_dir():
        raise ConfigError(f"{n('--data_root')} is not a folder; set it to the folder the relative paths in "
                          f"{n.var('--anno_file')} start from")
    empty, needed_by = empty_prompt_file(args)
    if empty is not None and not empty.is_file():
        raise ConfigError(f"{' and '.join(needed_by)} need(s) the empty prompt's features, not found at {empty}: run "
                          "scripts/extract_text_feature.sh (it writes them), set "
                          f"{n.var('--empty_prompt_fea')}, use --load_text_encoder, or set --text_drop_rate 0")
    if not str(args.output_dir).strip():
        raise ConfigError(f"set {n.var('--output_dir')} (checkpoints, logs and the exported DiT go there)")
    strategy = strategy_of(args)
    if args.lora_rank and strategy == "zero3":
        raise ConfigError(f"{n('--lora_rank')} needs {n.var('--shard_strategy')}=zero2 or ddp (LoRA with zero3 is "
                          "not supported: LoRA state is small, zero2 shards it)")
    if args.offload_optimizer and strategy == "ddp":
        raise ConfigError(f"{n.var('--offload_optimizer')}=1 is DeepSpeed's optimizer CPU offload: set "
                          f"{n.var('--shard_strategy')}=zero2 or zero3")
    if args.task == "t2i" and args.use_temporal_pyramid:
        raise ConfigError("--task t2i trains single frames: drop --use_temporal_pyramid")
    if args.load_vae and args.task != "t2i":
        raise ConfigError("--load_vae for video training is not supported: extract latents first with "
                          "scripts/extract_vae_latent.sh")
    if (args.max_frames - 1) % args.frame_per_unit:
        raise ConfigError(f"{n('--max_frames')} minus 1 must be a multiple of --frame_per_unit "
                          f"{args.frame_per_unit}: a clip is one first frame plus whole units")
    if args.use_temporal_pyramid:
        _check_sync_group(args, world_size // sp, n)
    _check_pack_slots(args, world_size // sp, n)


def slots_per_process(args: argparse.Namespace, data_world: int) -> int:
    """Slots each data-parallel process of a new run trains per micro-batch: VIDEO_SYNC_GROUP / processes for a
    virtual AR group, else 1 (``trainer_misc.runtime.distributed.slot_layout`` decides it at start)."""
    if not (args.use_temporal_pyramid and args.sync_video_input):
        return 1
    return process_slot_count(args.video_sync_group, data_world)


def _check_pack_slots(args: argparse.Namespace, data_world: int, n: Naming) -> None:
    """``--pack_slots`` divides the slots each process trains, and no forward draws random numbers (a packed pass
    would draw them for all its slots from one stream, not each slot's own)."""
    if args.pack_slots == "auto":
        return
    slots = slots_per_process(args, data_world)
    allowed = pack_choices(slots)
    if args.pack_slots not in allowed:
        where = (f"{n('--video_sync_group')} over {data_world} data-parallel process(es)" if slots > 1 else
                 "one slot per process: packing needs an AR run with VIDEO_SYNC_GROUP larger than the processes")
        raise ConfigError(f"{n('--pack_slots')}: each process trains {slots} slot(s) per micro-batch ({where}); "
                          f"set {n.var('--pack_slots')} to one of {allowed} or auto")
    if args.pack_slots > 1 and args.lora_dropout > 0:
        raise ConfigError(f"{n('--pack_slots')} with {n('--lora_dropout')}: LoRA dropout draws random numbers in "
                          "the forward, which a packed pass would draw for all its slots at once (not the losses of "
                          f"one slot at a time); set {n.var('--pack_slots')}=1 or auto, or "
                          f"{n.var('--lora_dropout')}=0")


def has_eval_set(args: argparse.Namespace) -> bool:
    """Whether the run evaluates a held-out set (``--eval_anno_file`` or ``--eval_fraction``)."""
    return bool(str(args.eval_anno_file).strip()) or args.eval_fraction > 0


def _check_evaluation(args: argparse.Namespace, n: Naming) -> None:
    if str(args.eval_anno_file).strip() and args.eval_fraction > 0:
        raise ConfigError(f"{n('--eval_anno_file')} and {n('--eval_fraction')} both set: evaluate either a separate "
                          f"file or a held-out part of {n.var('--anno_file')}; unset one of them")
    if str(args.eval_anno_file).strip():
        if not Path(args.eval_anno_file).is_file():
            raise ConfigError(f"{n('--eval_anno_file')}: not found; set {n.var('--eval_anno_file')} to an annotation "
                              "jsonl of evaluation clips (same format as the training one), or unset it")
        if Path(args.eval_anno_file).resolve() == Path(args.anno_file).resolve():
            raise ConfigError(f"{n('--eval_anno_file')} is the training annotation: a loss on trained data is not "
                              f"held out; use another file, or {n.var('--eval_fraction')} to hold lines out of it")
    if args.eval_stop_on_degrade and not has_eval_set(args):
        raise ConfigError(f"{n.var('--eval_stop_on_degrade')}=1 needs an evaluation set: set "
                          f"{n.var('--eval_fraction')} (e.g. 0.02) or {n.var('--eval_anno_file')}")


def _check_model_folder(args: argparse.Namespace, n: Naming, sp: int) -> None:
    """The DiT folder exists, holds the kind ``--model_name`` says, and its head count fits ``SP_SIZE``."""
    folder = Path(args.model_path) / args.model_variant
    if not str(args.model_path).strip():
        raise ConfigError(f"set {n.var('--model_path')} to the downloaded checkpoint folder (e.g. "
                          "/data/pyramid-flow-miniflux)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{n('--model_path')} has no {args.model_variant}/config.json; set "
                          f"{n.var('--model_path')} to the checkpoint folder and {n.var('--model_variant')} to one "
                          "of its diffusion_transformer_* subfolders")
    found = kind_of_folder(folder)
    if found is not None and found.name != args.model_name:
        raise ConfigError(f"{folder} holds a {found.name} DiT ({found.hub_repo}), but {n('--model_name')}: set "
                          f"{n.var('--model_name')}={found.name}")
    try:
        heads = json.loads(config_file.read_text(encoding="utf-8")).get("num_attention_heads")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config_file}: not a readable config ({e})") from None
    if sp > 1 and isinstance(heads, int) and heads % sp:
        raise ConfigError(f"{n('--sp_group_size')} must divide the DiT's {heads} attention heads (all-to-all over "
                          f"heads; {config_file}): choose a divisor of {heads}")


def _check_sync_group(args: argparse.Namespace, data_world: int, n: Naming) -> None:
    group = args.video_sync_group
    if not args.sync_video_input:
        raise ConfigError("--use_temporal_pyramid needs --sync_video_input: the ranks of a sync group train "
                          "different units of the same clip")
    if args.max_frames % group:
        raise ConfigError(f"{n('--max_frames')} must be a multiple of {n('--video_sync_group')} (change either)")
    if args.frame_per_unit > 1:  # with one frame per unit the multiple above already fits the clip's units
        from pyramid_dit.pyramid import num_units

        units = num_units(args.max_frames, args.frame_per_unit)
        if units < group:
            raise ConfigError(f"{n('--video_sync_group')} exceeds the {units} units of a {n('--max_frames')} clip "
                              f"with --frame_per_unit {args.frame_per_unit}: lower {n.var('--video_sync_group')}")
    if data_world % group and group % data_world:
        raise ConfigError(
            f"GPUS*NNODES/SP_SIZE={data_world} data-parallel ranks and {n('--video_sync_group')} must divide one "
            "another: a multiple of the group gives each rank one slot of a group, a divisor of it makes each rank "
            "train group/ranks slots of the clip in turn (same update, more time per step)")
    if args.skip_loss_threshold is not None and group > data_world:
        raise ConfigError("--skip_loss_threshold needs every slot's loss before the first backward, which a virtual "
                          f"sync group ({n('--video_sync_group')} > {data_world} data-parallel ranks) does not have; "
                          "drop --skip_loss_threshold or use one process per slot")


def parse_and_check(argv: Optional[Sequence[str]], world_size: int, variables: Optional[Mapping[str, str]] = None,
                    values: Optional[Mapping[str, str]] = None) -> argparse.Namespace:
    """Parse ``argv`` and check it for a launch of ``world_size`` processes
    (:func:`trainer_misc.runtime.arguments.parse_checked`: on the command line argparse's usage line and exit 2 for a
    bad flag; from the launcher every problem worded in the script's variables)."""
    return parse_checked(build_parser(), argv, lambda args, n: check_args(args, world_size, n), variables, values)
