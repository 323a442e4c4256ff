"""Finetune a Pyramid Flow DiT: autoregressive temporal pyramid (``--use_temporal_pyramid``) or full sequence.

Launch with torchrun (the scripts in ``scripts/`` do it for you)::

    torchrun --nproc_per_node 8 train/train_pyramid_flow.py --model_path /PATH/pyramid-flow-miniflux \\
        --model_variant diffusion_transformer_384p --anno_file annotation/video_text.jsonl --output_dir out \\
        --use_temporal_pyramid --sync_video_input --video_sync_group 8 --max_frames 16 --batch_size 4

This file only wires the pieces together, top to bottom in :func:`main`: flags and their checks, the dataset
(``trainer_misc.datasets``), the model side by kind (:func:`build_model_side`), the loss
(``trainer_misc.pyramid_loss`` over ``pyramid_dit.objective``), validation samples (``trainer_misc.validation``)
and the loop (``trainer_misc.trainer``). The reference's flags are accepted
(``--use_fsdp`` and ``--fsdp_shard_strategy`` select the sharding strategy, which is ZeRO through DeepSpeed here).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pyramid_dit.objective import PyramidFlowObjective  # noqa: E402
from pyramid_dit.packing import ATTENTION_SPLITS  # noqa: E402
from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler  # noqa: E402
from pyramid_dit.text_features import TextFeatures  # noqa: E402
from pyramid_dit.training_record import TRAINING_RECORD, training_record  # noqa: E402
from trainer_misc.annotation import resolve_data_root  # noqa: E402
from trainer_misc.data_check import DataSpec, image_buckets, is_dry_run, run_data_check  # noqa: E402
from trainer_misc.datasets import ImageDataset, VideoLatentDataset, collate, parse_resolution  # noqa: E402
from trainer_misc.distributed import get_world_size, resolve_device  # noqa: E402
from trainer_misc.failures import run_main  # noqa: E402
from trainer_misc.engine import EngineConfig  # noqa: E402
from trainer_misc.io_utils import default_empty_prompt_path, load_text_features  # noqa: E402
from trainer_misc.metrics import BatchTrace  # noqa: E402
from trainer_misc.pyramid_loss import PyramidFlowLoss  # noqa: E402
from trainer_misc.trainer import TrainConfig, train  # noqa: E402

logger = logging.getLogger("train_pyramid_flow")

SAMPLE_RATIOS = (1, 2, 1)  # batch columns per pyramid stage (low, mid, high resolution)
VARIANTS = ("diffusion_transformer_384p", "diffusion_transformer_768p", "diffusion_transformer_image")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("task and model")
    g.add_argument("--task", default="t2v", choices=["t2v", "t2i"], help="video (t2v) or image (t2i) training")
    g.add_argument("--model_name", default="pyramid_flux", choices=["pyramid_flux", "pyramid_mmdit"],
                   help="DiT kind: pyramid_flux (rain1011/pyramid-flow-miniflux) or pyramid_mmdit (sd3)")
    g.add_argument("--model_path", required=True,
                   help="downloaded checkpoint folder (holds causal_video_vae/, diffusion_transformer_*/, text_*)")
    g.add_argument("--model_variant", default="diffusion_transformer_384p", choices=VARIANTS,
                   help="DiT subfolder of --model_path to finetune")
    g.add_argument("--model_dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="mixed precision")
    g.add_argument("--dit_pretrained_weight", default="",
                   help="single-file DiT state dict to start from (.safetensors, or .pt/.bin read weights-only)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations (768p needs it)")
    g.add_argument("--gradient_checkpointing_ratio", type=float, default=0.75,
                   help="fraction of transformer blocks that recompute activations")
    g.add_argument("--lora_rank", type=int, default=0,
                   help="LoRA rank (0: full finetune). Only the adapters train; the export holds the merged DiT "
                        "(export/transformer) and the adapter in peft format (export/lora)")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (scale alpha/rank; default: the rank)")
    g.add_argument("--lora_targets", default="",
                   help="comma-separated layer names inside every block (default: the kind's attention q/k/v/out "
                        "and MLP linears, pyramid_dit/kinds.py lora_targets)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA branch input")
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
    g.add_argument("--max_frames", type=int, default=16,
                   help="latent frames per training clip (16 = 121 video frames = 5 s at 24 fps)")
    g.add_argument("--frame_per_unit", type=int, default=1, help="latent frames per autoregressive unit")
    g.add_argument("--schedule_shift", type=float, default=1.0, help="flow-matching timestep shift")
    g.add_argument("--corrupt_ratio", type=float, default=1 / 3, help="max noise level of the AR history clips")
    g.add_argument("--text_drop_rate", type=float, default=0.1,
                   help="fraction of captions replaced by the empty prompt (classifier-free guidance)")
    g.add_argument("--sync_video_input", action="store_true",
                   help="ranks of one --video_sync_group read the same clip (needed for AR training)")
    g.add_argument("--video_sync_group", type=int, default=8,
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
    g.add_argument("--num_workers", type=int, default=4, help="DataLoader workers per process")
    g.add_argument("--crop_mode", default="random", choices=["random", "center"],
                   help="t2i: where the bucket-sized crop is cut from the resized image (reference default: random)")
    g.add_argument("--no_shuffle", action="store_true",
                   help="read samples in annotation order instead of a seeded shuffle (to reproduce a data problem)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=4, help="per-process batch; a multiple of 4 (columns 1:2:1)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--opt", default="adamw", choices=["adamw"])
    g.add_argument("--opt_beta1", type=float, default=0.9)
    g.add_argument("--opt_beta2", type=float, default=0.999)
    g.add_argument("--opt_eps", type=float, default=1e-8)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--clip_grad", type=float, default=1.0, help="max grad norm (0: no clipping)")
    g.add_argument("--lr_scheduler", default="constant_with_warmup", choices=["constant_with_warmup", "cosine"])
    g.add_argument("--warmup_steps", type=int, default=-1,
                   help="LR warmup steps; 0 or less falls back to --warmup_epochs epochs, as in the reference")
    g.add_argument("--warmup_epochs", type=int, default=1,
                   help="LR warmup in epochs of --iters_per_epoch steps, used when --warmup_steps <= 0 "
                        "(--warmup_epochs 0 --warmup_steps 0: no warmup)")
    g.add_argument("--warmup_lr", type=float, default=None, help="LR at the start of warmup")
    g.add_argument("--min_lr", type=float, default=1e-5, help="final LR of the cosine schedule")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--iters_per_epoch", type=int, default=2000, help="optimizer steps per epoch")
    g.add_argument("--max_steps", type=int, default=0, help="total optimizer steps (0: epochs * iters_per_epoch)")
    g.add_argument("--skip_loss_threshold", type=float, default=None,
                   help="drop updates whose loss (mean over ranks) reaches this value; the reference used 2.0")
    g.add_argument("--ema_update", action="store_true", help="keep an EMA of the DiT weights")
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--ema_update_every", type=int, default=100, help="steps between EMA updates (reference: 100)")
    g.add_argument("--seed", type=int, default=42)

    g = p.add_argument_group("parallelism")
    g.add_argument("--use_fsdp", action="store_true", help="accepted: shard with --fsdp_shard_strategy")
    g.add_argument("--fsdp_shard_strategy", default=None, choices=["zero2", "zero3"],
                   help="alias of --shard_strategy (reference flag name)")
    g.add_argument("--shard_strategy", default=None, choices=["ddp", "zero2", "zero3"],
                   help="ddp (replicated), zero2 (optimizer+gradients sharded), zero3 (parameters too)")
    g.add_argument("--use_sequence_parallel", action="store_true",
                   help="split each sample's tokens over --sp_group_size processes (Ulysses all-to-all over heads; "
                        "they read the same batch)")
    g.add_argument("--sp_group_size", type=int, default=1,
                   help="processes per sequence-parallel group (with --use_sequence_parallel; divides the number "
                        "of processes and the DiT's head count)")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    g.add_argument("--grad_reduce_dtype", default="fp32", choices=["fp32", "model"],
                   help="dtype of the cross-rank gradient reduction and of the accumulation over micro-batches: "
                        "fp32 (default, exact enough for many ranks) or model (the training dtype, e.g. bf16: "
                        "half the gradient traffic, as the reference)")
    g.add_argument("--offload_optimizer", action="store_true",
                   help="zero2/zero3: keep fp32 master weights, gradients and AdamW state in CPU memory and update "
                        "them there with DeepSpeed's CPU Adam (less GPU memory, slower steps; OFFLOAD=1)")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", required=True, help="checkpoints, tensorboard logs and the exported DiT")
    g.add_argument("--save_ckpt_freq", type=int, default=20,
                   help="checkpoint every N epochs (of --iters_per_epoch steps), as in the reference; 0: only at the "
                        "end (the last step is always checkpointed)")
    g.add_argument("--save_every_steps", type=int, default=0,
                   help="checkpoint every N optimizer steps instead of every --save_ckpt_freq epochs (0: off)")
    g.add_argument("--keep_last_checkpoints", type=int, default=None)
    g.add_argument("--export_dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="dtype of the exported DiT in <output_dir>/export/transformer (default: the training dtype)")
    g.add_argument("--resume", default="auto", help="auto (newest complete checkpoint), never, or a folder")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none"])
    g.add_argument("--print_freq", type=int, default=20, help="accepted for compatibility (tqdm shows progress)")
    g.add_argument("--validation_every", type=int, default=0,
                   help="every N optimizer steps rank 0 samples videos of fixed prompts (EMA weights with "
                        "--ema_update) into <output_dir>/samples/ and tensorboard; 0 = off")
    g.add_argument("--validation_prompts", type=int, default=2,
                   help="how many prompts: the captions of the first N annotation lines")
    g.add_argument("--validation_temp", type=int, default=2,
                   help="latent frames per sample (2 = 9 video frames; 0: --max_frames); kept short, it runs on a "
                        "training GPU while the other ranks wait")
    g.add_argument("--validation_steps", type=int, nargs=3, default=[5, 5, 5], metavar="N",
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


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Fail before loading anything, with a message that says which flag to change."""
    if args.use_sequence_parallel and args.sp_group_size < 2:
        raise SystemExit(f"--use_sequence_parallel needs --sp_group_size > 1, got {args.sp_group_size}")
    if args.sp_group_size != 1 and not args.use_sequence_parallel:
        raise SystemExit(f"--sp_group_size {args.sp_group_size} without --use_sequence_parallel: add the flag (or "
                         "drop --sp_group_size)")
    sp = sp_size_of(args)
    if world_size % sp:
        raise SystemExit(f"--sp_group_size {sp} must divide the number of processes ({world_size}): set SP_SIZE to a "
                         "divisor of GPUS*NNODES")
    for flag in ("epochs", "iters_per_epoch"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag} {getattr(args, flag)}: must be >= 1")
    for flag in ("warmup_epochs", "save_ckpt_freq", "save_every_steps", "max_steps"):
        if getattr(args, flag) < 0:
            raise SystemExit(f"--{flag} {getattr(args, flag)}: must be >= 0")
    columns = sum(SAMPLE_RATIOS)
    if args.batch_size % columns:
        raise SystemExit(f"--batch_size {args.batch_size}: must be a multiple of {columns} "
                         f"(each batch is split {':'.join(map(str, SAMPLE_RATIOS))} over the 3 pyramid stages)")
    variant_dir = Path(args.model_path) / args.model_variant
    if not (variant_dir / "config.json").is_file():
        raise SystemExit(f"--model_path {args.model_path}: no {args.model_variant}/config.json there; point "
                         "--model_path at the downloaded checkpoint folder and --model_variant at one of its "
                         f"diffusion_transformer_* subfolders")
    n_heads = json.loads((variant_dir / "config.json").read_text()).get("num_attention_heads")
    if sp > 1 and isinstance(n_heads, int) and n_heads % sp:
        raise SystemExit(f"--sp_group_size {sp} must divide the DiT's {n_heads} attention heads (all-to-all over "
                         "heads): choose SP_SIZE among its divisors")
    try:
        parse_resolution(args.resolution)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.lora_rank < 0:
        raise SystemExit(f"--lora_rank {args.lora_rank}: must be 0 (full finetune) or a positive rank")
    if args.lora_rank and strategy_of(args) == "zero3":
        raise SystemExit("--lora_rank with zero3 is not supported (untested); LoRA state is small, use "
                         "SHARD_STRATEGY=zero2 or ddp")
    if args.offload_optimizer and strategy_of(args) == "ddp":
        raise SystemExit("--offload_optimizer is DeepSpeed's optimizer CPU offload: use SHARD_STRATEGY=zero2 or zero3")
    if args.task == "t2i" and args.use_temporal_pyramid:
        raise SystemExit("--task t2i trains single frames: drop --use_temporal_pyramid")
    if args.use_temporal_pyramid:
        if args.max_frames % args.video_sync_group:
            raise SystemExit(f"--max_frames {args.max_frames} must be a multiple of --video_sync_group "
                             f"{args.video_sync_group} (NUM_FRAMES % VIDEO_SYNC_GROUP == 0)")
        if not args.sync_video_input:
            raise SystemExit("--use_temporal_pyramid needs --sync_video_input: the ranks of a sync group train "
                             "different units of the same clip")
    data_world = world_size // sp  # data-parallel ranks: the processes of an SP group count once
    if args.sync_video_input and data_world % args.video_sync_group and args.video_sync_group % data_world:
        raise SystemExit(f"{data_world} data-parallel ranks ({world_size} processes / SP_SIZE {sp}) and "
                         f"--video_sync_group {args.video_sync_group} must divide one another: GPUS * NNODES / SP_SIZE "
                         "a multiple of VIDEO_SYNC_GROUP (one slot per rank), or VIDEO_SYNC_GROUP a multiple of it (a "
                         "virtual group: each rank trains VIDEO_SYNC_GROUP / ranks slots of the clip in turn, the "
                         "same update)")


def strategy_of(args: argparse.Namespace) -> str:
    if args.shard_strategy:
        return args.shard_strategy
    if args.fsdp_shard_strategy:
        return args.fsdp_shard_strategy
    return "zero2" if args.use_fsdp else "ddp"


def load_null_text(args: argparse.Namespace) -> Optional[TextFeatures]:
    """The extracted empty-prompt features: the replacement for dropped captions, and the negative prompt of
    validation samples. None when the text encoder runs during training (it encodes "" itself) or nothing needs
    them."""
    needed_by = [what for what, on in (("caption dropout (--text_drop_rate > 0)", args.text_drop_rate > 0),
                                       ("validation samples (--validation_every)", args.validation_every > 0)) if on]
    if args.load_text_encoder or not needed_by:
        return None
    path = Path(args.empty_prompt_fea) if args.empty_prompt_fea else default_empty_prompt_path(
        resolve_data_root(args.anno_file, args.data_root))
    if not path.is_file():
        raise SystemExit(f"{' and '.join(needed_by)} need(s) the empty prompt's features, not found at {path}; run "
                         "tools/extract_text_features.py (it writes them), pass --empty_prompt_fea, "
                         "use --load_text_encoder, or set --text_drop_rate 0")
    return TextFeatures.from_file(load_text_features(path))


def build_dataset(args: argparse.Namespace, verbose: bool):
    """The up-front data check (file headers only; prints its summary, exits 2 when nothing is usable), then
    the dataset of the usable lines."""
    dit_config = json.loads((Path(args.model_path) / args.model_variant / "config.json").read_text())
    dims = (dit_config.get("joint_attention_dim"), dit_config.get("pooled_projection_dim"))
    report = run_data_check(DataSpec(
        anno_file=args.anno_file, task=args.task, resolution=args.resolution, num_frames=args.max_frames,
        data_root=args.data_root, load_text_encoder=args.load_text_encoder, text_drop_rate=args.text_drop_rate,
        empty_prompt_fea=args.empty_prompt_fea or None, text_dims=dims if None not in dims else None),
        verbose=verbose)
    if args.task == "t2i":
        return ImageDataset(report.usable, image_buckets(args.resolution), load_text_fea=not args.load_text_encoder,
                            crop_mode=args.crop_mode, seed=args.seed)
    if args.load_vae:
        raise SystemExit("--load_vae for video training is not supported yet: extract latents first with "
                         "scripts/extract_vae_latent.sh")
    width, height = parse_resolution(args.resolution)
    return VideoLatentDataset(report.usable, args.max_frames, (height // 8, width // 8),
                              load_text_fea=not args.load_text_encoder)


@dataclass
class ModelSide:
    """What the model kind decides: the DiT to train and the encoders that run during training (None when their
    outputs were extracted beforehand)."""

    dit: torch.nn.Module
    vae: Optional[torch.nn.Module] = None
    text_encoder: Optional[object] = None


def build_model_side(args: argparse.Namespace, device: torch.device, engine: EngineConfig) -> ModelSide:
    """Load the DiT (and the VAE / text encoder when they run during training) for ``--model_name``.

    What differs between kinds (DiT class, text encoder) comes from :mod:`pyramid_dit.kinds`.
    """
    from pyramid_dit.kinds import get_kind
    from trainer_misc.model_loading import load_pretrained_for_training

    kind = get_kind(args.model_name)
    # Under ZeRO-3 the DiT is built and loaded already partitioned (no rank ever holds all of it).
    dit = load_pretrained_for_training(kind.dit(), args.model_path, args.model_variant, engine,
                                       weights_file=args.dit_pretrained_weight or None)
    if args.lora_rank:
        from trainer_misc.lora import LoraSettings, add_lora

        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) or kind.lora_targets
        counts = add_lora(dit, LoraSettings(args.lora_rank, args.lora_alpha or float(args.lora_rank), targets,
                                            args.lora_dropout), seed=args.seed)
        logger.info("LoRA rank %d on %d layers: %d trainable parameters, %d frozen", args.lora_rank,
                    counts["adapted_layers"], counts["trainable"], counts["frozen"])
    if args.gradient_checkpointing:
        dit.enable_gradient_checkpointing(args.gradient_checkpointing_ratio)
    dit.attention_split = args.attention_split

    side = ModelSide(dit)
    encode_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.model_dtype]
    if args.load_vae or args.task == "t2i":
        from video_vae.modeling_causal_vae import CausalVideoVAE
        # dtype at load, not .to(dtype): diffusers warns on every .to(dtype) of a model
        side.vae = CausalVideoVAE.from_pretrained(Path(args.model_path) / "causal_video_vae",
                                                  torch_dtype=encode_dtype).to(device).eval()
        side.vae.requires_grad_(False)
    if args.load_text_encoder:
        side.text_encoder = kind.load_text_encoder(args.model_path, torch_dtype=encode_dtype).to(device)
    return side


def build_objective(args: argparse.Namespace, null_text: Optional[TextFeatures]) -> PyramidFlowObjective:
    scheduler = PyramidFlowMatchEulerDiscreteScheduler(shift=args.schedule_shift, stages=3,
                                                        stage_range=(0, 1 / 3, 2 / 3, 1))
    return PyramidFlowObjective(
        scheduler, args.model_name, sample_ratios=SAMPLE_RATIOS, corrupt_ratio=args.corrupt_ratio,
        frame_per_unit=args.frame_per_unit, max_temporal_length=args.max_frames,
        video_sync_group=args.video_sync_group if args.use_temporal_pyramid else 1,
        text_drop_rate=args.text_drop_rate, null_text=null_text)


def build_validation(args: argparse.Namespace, side: ModelSide, dataset, null_text: Optional[TextFeatures],
                     device: torch.device):
    """Rank 0's validation sampler: a second DiT of the trained kind and a VAE, both in the run's dtype."""
    from trainer_misc.validation import ValidationSampler, pick_validation_prompts
    from video_vae.modeling_causal_vae import CausalVideoVAE

    try:
        prompts = pick_validation_prompts(dataset, args.validation_prompts, side.text_encoder, device)
    except ValueError as e:
        raise SystemExit(f"--validation_every: {e}") from None
    if side.text_encoder is not None:
        with torch.no_grad():
            negative = side.text_encoder.encode([""], device).to(device="cpu")
    else:
        negative = null_text
    width, height = image_buckets(args.resolution)[0] if args.task == "t2i" else parse_resolution(args.resolution)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.model_dtype]
    return ValidationSampler(
        type(side.dit).from_config(side.dit.config),
        CausalVideoVAE.from_pretrained(Path(args.model_path) / "causal_video_vae", torch_dtype=dtype), prompts,
        negative,
        width=width, height=height, temp=1 if args.task == "t2i" else (args.validation_temp or args.max_frames),
        steps=args.validation_steps, dtype=dtype, device=device, output_dir=args.output_dir,
        offload=args.validation_offload, tensorboard=args.report_to == "tensorboard", model_name=args.model_name,
        mode=trained_as(args)["sampling_mode"])


def trained_as(args: argparse.Namespace) -> dict:
    """What this run teaches (task, sampling mode): recorded in the export for generation, used by validation."""
    return training_record(args.task, args.use_temporal_pyramid)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The loop's settings from the flags (step counts resolved from epochs where the flags say so)."""
    max_steps = args.max_steps or args.epochs * args.iters_per_epoch
    # The reference's rule: a positive --warmup_steps wins, anything else means --warmup_epochs epochs.
    warmup = args.warmup_steps if args.warmup_steps > 0 else args.warmup_epochs * args.iters_per_epoch
    checkpoint_every = args.save_every_steps or args.save_ckpt_freq * args.iters_per_epoch
    return TrainConfig(
        output_dir=args.output_dir, max_steps=max_steps, batch_size=args.batch_size, strategy=strategy_of(args),
        mixed_precision=args.model_dtype, grad_reduce_dtype=args.grad_reduce_dtype, device=args.device,
        offload_optimizer=args.offload_optimizer, grad_accum_steps=args.gradient_accumulation_steps,
        lr=args.lr, betas=(args.opt_beta1, args.opt_beta2), eps=args.opt_eps, weight_decay=args.weight_decay,
        lr_scheduler=args.lr_scheduler, warmup_steps=min(warmup, max_steps), warmup_start_lr=args.warmup_lr,
        min_lr=args.min_lr, max_grad_norm=args.clip_grad or None, skip_loss_threshold=args.skip_loss_threshold,
        ema_decay=args.ema_decay if args.ema_update else None, ema_update_every=args.ema_update_every,
        seed=args.seed, video_sync_group=args.video_sync_group if args.sync_video_input else 1,
        sp_size=sp_size_of(args),
        shuffle=not args.no_shuffle, num_workers=args.num_workers, checkpoint_every=checkpoint_every,
        keep_last_checkpoints=args.keep_last_checkpoints, resume=args.resume, export_dtype=args.export_dtype,
        tensorboard=args.report_to == "tensorboard", validate_every=args.validation_every,
        export_files={TRAINING_RECORD: trained_as(args)})


def run_summary(result, world_size: int, output_dir: str) -> str:
    """The closing line; a run that resumed at its last step says so instead of quoting losses it never had."""
    exported = ", ".join(map(str, result.exported)) or "nothing"
    if not result.records:
        return (f"done: nothing to train: {output_dir} already holds a finished run of {result.final_step} steps "
                f"(resumed at step {result.start_step}); exported {exported}. Use a new OUTPUT_DIR to train again, "
                "or raise EPOCHS / ITERS_PER_EPOCH to train further.")
    return (f"done: {result.final_step} steps (from {result.start_step}), loss {result.records[0].loss:.4f} -> "
            f"{result.records[-1].loss:.4f}, world size {world_size}; {result.bad_samples} unreadable samples "
            f"skipped; exported {exported}")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    check_args(args, world_size)
    config = train_config(args)

    dataset = build_dataset(args, verbose=rank == 0)
    if is_dry_run():  # DRY_RUN=1: data summary (above) and the plan of this launch, no weights, no training
        if rank == 0:
            from tools.plan import plan_training_launch
            print(plan_training_launch(args, world_size), flush=True)
        return 0
    null_text = load_null_text(args)
    device = resolve_device(args.device)  # this rank's GPU (LOCAL_RANK), as the engine uses
    side = build_model_side(args, device, config.engine_config())
    trace = BatchTrace(args.output_dir, rank) if args.trace_batches else None
    compute_loss = PyramidFlowLoss(build_objective(args, null_text), args.use_temporal_pyramid, vae=side.vae,
                                   text_encoder=side.text_encoder, trace=trace)
    validate = build_validation(args, side, dataset, null_text, device) if args.validation_every and rank == 0 \
        else None
    result = train(side.dit, compute_loss, dataset, config, collate_fn=collate, group_keys=dataset.group_keys(),
                   validate=validate)
    if trace is not None:
        trace.write({"sharding": result.engine.sharding_report()})
    if result.engine.is_main:
        logger.info("%s", run_summary(result, get_world_size(), args.output_dir))
    return 0


if __name__ == "__main__":
    # Any failure on any rank: one line naming the rank and the reason, and every rank ends within seconds.
    run_main(main, "train_pyramid_flow.py")
