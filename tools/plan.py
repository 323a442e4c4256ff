"""Plan a finetuning launch before spending a GPU-hour: parameters, FLOPs per optimizer step, predicted peak
memory per GPU (params / grads / optimizer / activations, the text encoders and VAE the launch keeps resident, and
margins for the CUDA context, NCCL and fragmentation), whether it fits and the cheapest change if not, the bytes
each GPU sends per step (and seconds, given ``--interconnect_gbps``) and writes per checkpoint.

No weights are loaded and no GPU is needed: the real DiT runs forward and backward on meta tensors
(``trainer_misc/planning/planner.py`` says how, and what is arithmetic rather than traced). Figures are predictions.

    python3 tools/plan.py --model released-miniflux --resolution 384p --num_frames 16 --gpus 8 \\
        --shard_strategy zero2 --json
    python3 tools/plan.py --model /data/pyramid-flow-miniflux/diffusion_transformer_768p --resolution 768p \\
        --num_frames 32 --gpus 1 --gradient_checkpointing
    python3 tools/plan.py --measure     # prediction vs live bytes of a real CPU training step (tiny config)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional

from trainer_misc.planning.plan import (
    default_gpu_memory_gib,
    default_sync_group,
    format_plan,
    load_model_config,
    lora_targets,
    pixel_size,
    with_pack,
)
from trainer_misc.planning.planner import Launch, measure_step, plan
from trainer_misc.runtime.arguments import integer, number
from trainer_misc.runtime.slots import pack_slots_arg

# A small config that trains on this CPU in seconds, for --measure.
MEASURE_CONFIG = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                      axes_dims_rope=[4, 6, 6])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="released-miniflux",
                   help="released-miniflux, released-sd3, or a folder with a DiT config.json (a checkpoint "
                        "folder works with --model_variant)")
    p.add_argument("--model_variant", default=None, help="DiT subfolder of --model (e.g. diffusion_transformer_768p)")
    p.add_argument("--task", default="ar", choices=["ar", "t2v", "t2i"],
                   help="ar: temporal pyramid (scripts/train_pyramid_flow.sh); t2v: full sequence "
                        "(train_pyramid_flow_without_ar.sh); t2i: images")
    p.add_argument("--resolution", default="384p", help="384p, 768p or WIDTHxHEIGHT")
    p.add_argument("--num_frames", type=integer(1, 1024), default=16, help="latent frames per clip (NUM_FRAMES)")
    p.add_argument("--batch_size", type=integer(4, 1024, multiple_of=4, why=" (1:2:1 over 3 stages)"), default=4,
                   help="per GPU, a multiple of 4 (BATCH_SIZE)")
    p.add_argument("--grad_accum", type=integer(1, 4096), default=1,
                   help="micro-batches per optimizer step (GRAD_ACCU_STEPS)")
    p.add_argument("--gpus", type=integer(1, 1 << 20), default=8, help="processes in all (GPUS x NNODES)")
    p.add_argument("--shard_strategy", default="zero2", choices=["ddp", "zero2", "zero3"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--gradient_checkpointing_ratio", type=number(0, 1), default=0.75)
    p.add_argument("--video_sync_group", type=integer(1, 1024), default=None,
                   help="AR only (default: the largest of 8, 4, 2, 1 dividing --gpus and --num_frames)")
    p.add_argument("--lora_rank", type=integer(0, 4096), default=0,
                   help="LoRA rank (LORA_RANK); 0: full finetune. Gradients and optimizer state are then counted "
                        "for the adapters only")
    p.add_argument("--lora_targets", default="", help="comma-separated LoRA target layers (LORA_TARGETS; default: "
                   "the kind's, pyramid_dit/kinds.py)")
    p.add_argument("--offload_optimizer", action="store_true", help="OFFLOAD=1 (zero2/zero3): master weights, AdamW "
                   "state and gradient partition in host memory")
    p.add_argument("--load_text_encoder", type=int, choices=[0, 1], default=None,
                   help="LOAD_TEXT_ENCODER: 1 keeps the text encoders on every GPU to encode captions during "
                        "training (default: 1 for t2v/t2i as the full-sequence script, 0 for ar, which reads "
                        "extracted features)")
    p.add_argument("--load_vae", action="store_true", help="--load_vae: the VAE on every GPU (t2i: always)")
    p.add_argument("--validation", action="store_true", help="--validation_every > 0: rank 0 keeps a sampling DiT "
                   "and VAE")
    p.add_argument("--validation_offload", action="store_true", help="--validation_offload")
    p.add_argument("--ema", action="store_true", help="--ema_update: an fp32 EMA of each GPU's share")
    p.add_argument("--grad_reduce_dtype", default="fp32", choices=["fp32", "model"])
    p.add_argument("--pack_slots", type=pack_slots_arg, default=1,
                   help="PACK_SLOTS (AR with a virtual sync group): slots per forward/backward pass, a divisor of "
                        "--video_sync_group / --gpus, or auto (the most that fit in --gpu_memory)")
    p.add_argument("--interconnect_gbps", type=float, default=None,
                   help="each GPU's network bandwidth in Gbit/s (e.g. 400 for one NDR InfiniBand NIC per GPU): "
                        "turns the bytes sent per step into seconds")
    p.add_argument("--eval_samples", type=integer(0, 4096), default=0,
                   help="held-out evaluation samples (EVAL_SAMPLES, capped by the evaluation set): adds the "
                        "evaluation's FLOPs to the plan (0: none)")
    p.add_argument("--eval_timesteps", type=integer(1, 64), default=4, help="EVAL_TIMESTEPS")
    p.add_argument("--eval_history_depths", type=integer(1, 64), default=2, help="EVAL_HISTORY_DEPTHS (AR)")
    p.add_argument("--eval_every", type=integer(0, 10**9), default=500, help="EVAL_EVERY")
    p.add_argument("--max_steps", type=integer(0, 10**9), default=40000,
                   help="optimizer steps of the run (EPOCHS x ITERS_PER_EPOCH), to count its evaluations")
    p.add_argument("--gpu_memory", type=float, default=None,
                   help="GiB per GPU to fit in (default: the visible GPU's, else 80)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--measure", action="store_true",
                   help="instead of planning: compare the prediction with the live bytes of a real training "
                        "step of a small config on this CPU, and print the error")
    return p


def launch_from_args(args: argparse.Namespace) -> Launch:
    """The launch these command-line flags describe. The rules between settings are the planner's ``Launch``'s own
    (a ``ValueError`` naming the variable and the flag), plus the sync group's fit, which the trainer checks
    against its data-parallel ranks."""
    kind, config = load_model_config(args.model, args.model_variant)
    width, height = pixel_size(args.resolution, args.task)
    group = args.video_sync_group or default_sync_group(args.gpus, args.num_frames)
    if args.task == "ar" and ((args.gpus % group and group % args.gpus) or args.num_frames % group):
        raise ValueError(f"--video_sync_group {group} must divide --num_frames {args.num_frames} and divide or be "
                         f"a multiple of --gpus {args.gpus} (a virtual group: slots run one after the other)")
    return Launch(model_kind=kind, model_config=config, task=args.task, width=width, height=height,
                  num_frames=args.num_frames, batch_size=args.batch_size, gpus=args.gpus,
                  shard_strategy=args.shard_strategy, dtype=args.dtype, grad_accum=args.grad_accum,
                  gradient_checkpointing=args.gradient_checkpointing,
                  gradient_checkpointing_ratio=args.gradient_checkpointing_ratio, video_sync_group=group,
                  lora_rank=args.lora_rank, lora_targets=lora_targets(args.lora_targets),
                  offload_optimizer=args.offload_optimizer,
                  text_encoder=bool(args.task != "ar" if args.load_text_encoder is None else args.load_text_encoder),
                  vae=args.load_vae, validation=args.validation, validation_offload=args.validation_offload,
                  ema=args.ema, grad_reduce_dtype=args.grad_reduce_dtype, eval_samples=args.eval_samples,
                  eval_timesteps=args.eval_timesteps, eval_history_depths=args.eval_history_depths,
                  eval_every=args.eval_every, max_steps=args.max_steps)


def run_measure(as_json: bool) -> int:
    rows = []
    for task in ("ar", "t2v"):
        for ckpt in (False, True):
            launch = Launch("pyramid_flux", MEASURE_CONFIG, task=task, width=128, height=128, num_frames=4,
                            gpus=1, shard_strategy="ddp", dtype="fp32", video_sync_group=1,
                            gradient_checkpointing=ckpt)
            r = measure_step(launch)
            err = {k: r["predicted"][k] / r["measured"][k] - 1 for k in r["measured"]}
            rows.append({"task": task, "gradient_checkpointing": ckpt, **r, "relative_error": err})
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    print("predicted vs measured bytes of one real fp32 training step on this CPU (tiny DiT, 128x128, 4 frames):")
    for row in rows:
        parts = ", ".join(f"{k} {row['predicted'][k]:,} vs {row['measured'][k]:,} ({row['relative_error'][k]:+.1%})"
                          for k in row["measured"])
        print(f"  {row['task']:3s} checkpointing={'on ' if row['gradient_checkpointing'] else 'off'}: {parts}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.measure:
        return run_measure(args.json)
    try:
        launch = launch_from_args(args)
    except ValueError as e:
        raise SystemExit(f"plan.py: {e}") from None
    start = time.time()
    if not args.json:
        print(f"planning {args.model} {args.task} {args.resolution} NUM_FRAMES={args.num_frames} on {args.gpus} "
              f"GPU(s), {args.shard_strategy}: tracing the DiT on meta tensors (seconds to a minute) ...",
              file=sys.stderr)
    gpu = args.gpu_memory or default_gpu_memory_gib()
    launch, note = with_pack(launch, args.pack_slots, gpu)
    result = plan(launch, gpu, interconnect_gbps=args.interconnect_gbps)
    result["seconds"] = round(time.time() - start, 1)
    if note:
        result["pack_note"] = note
    print(json.dumps(result, indent=1) if args.json else format_plan(result) + (f"\n{note}" if note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
