"""Plan a finetuning launch before spending a GPU-hour: parameters, FLOPs per optimizer step, predicted peak
memory per GPU (params / grads / optimizer / activations), whether it fits, and the cheapest change if not.

No weights are loaded and no GPU is needed: the real DiT runs forward and backward on meta tensors
(``trainer_misc/planner.py`` says how, and what is arithmetic rather than traced). Figures are predictions.

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
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_misc.planner import GIB, Launch, measure_step, plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RELEASED = {  # key listings of the released checkpoints, with their configs (tests/golden/keys/README.md)
    "released-miniflux": ("pyramid_flux", REPO / "tests/golden/keys/pyramid_flux_miniflux.json"),
    "released-sd3": ("pyramid_mmdit", REPO / "tests/golden/keys/pyramid_mmdit_sd3.json"),
}
KINDS = {"PyramidFluxTransformer": "pyramid_flux", "PyramidDiffusionMMDiT": "pyramid_mmdit"}
# A small config that trains on this CPU in seconds, for --measure.
MEASURE_CONFIG = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                      axes_dims_rope=[4, 6, 6])


def load_model_config(model: str, variant: Optional[str] = None) -> tuple[str, dict]:
    """(kind, config) of ``released-miniflux`` / ``released-sd3`` or a folder holding a DiT ``config.json``."""
    if model in RELEASED:
        kind, listing = RELEASED[model]
        return kind, json.loads(listing.read_text())["model_config"]
    folder = Path(model)
    candidates = [folder / variant / "config.json"] if variant else []
    candidates += [folder / "config.json", folder / "diffusion_transformer_384p" / "config.json"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise SystemExit(f"--model {model}: expected released-miniflux, released-sd3, or a folder with a DiT "
                         f"config.json (tried {', '.join(map(str, candidates))})")
    config = json.loads(path.read_text())
    kind = KINDS.get(config.get("_class_name", ""))
    if kind is None:
        raise SystemExit(f"{path}: _class_name {config.get('_class_name')!r} is not a DiT this repository "
                         f"trains ({', '.join(KINDS)})")
    return kind, {k: v for k, v in config.items() if not k.startswith("_")}


def default_gpu_memory_gib() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return 80.0


def pixel_size(resolution: str, task: str) -> tuple[int, int]:
    """(width, height) in pixels; for images the largest aspect-ratio bucket of the resolution."""
    from trainer_misc.datasets import IMAGE_BUCKETS, parse_resolution
    try:
        if task == "t2i" and resolution in IMAGE_BUCKETS:
            return max(IMAGE_BUCKETS[resolution], key=lambda wh: wh[0] * wh[1])
        return parse_resolution(resolution)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def default_sync_group(gpus: int, num_frames: int) -> int:
    """The scripts' default 8 when it fits NUM_FRAMES and the process count (a divisor or a multiple: a virtual
    group on fewer GPUs), else the largest of 4, 2, 1 that does."""
    return next(g for g in (8, 4, 2, 1) if num_frames % g == 0 and (gpus % g == 0 or g % gpus == 0))


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
    p.add_argument("--num_frames", type=int, default=16, help="latent frames per clip (NUM_FRAMES)")
    p.add_argument("--batch_size", type=int, default=4, help="per GPU, a multiple of 4 (BATCH_SIZE)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step (GRAD_ACCU_STEPS)")
    p.add_argument("--gpus", type=int, default=8, help="processes in all (GPUS x NNODES)")
    p.add_argument("--shard_strategy", default="zero2", choices=["ddp", "zero2", "zero3"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--gradient_checkpointing_ratio", type=float, default=0.75)
    p.add_argument("--video_sync_group", type=int, default=None,
                   help="AR only (default: the largest of 8, 4, 2, 1 dividing --gpus and --num_frames)")
    p.add_argument("--lora_rank", type=int, default=0, help="LoRA rank (LORA_RANK); 0: full finetune. Gradients and "
                   "optimizer state are then counted for the adapters only")
    p.add_argument("--lora_targets", default="", help="comma-separated LoRA target layers (LORA_TARGETS; default: "
                   "the kind's, pyramid_dit/kinds.py)")
    p.add_argument("--offload_optimizer", action="store_true", help="OFFLOAD=1 (zero2/zero3): master weights, AdamW "
                   "state and gradient partition in host memory")
    p.add_argument("--gpu_memory", type=float, default=None,
                   help="GiB per GPU to fit in (default: the visible GPU's, else 80)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--measure", action="store_true",
                   help="instead of planning: compare the prediction with the live bytes of a real training "
                        "step of a small config on this CPU, and print the error")
    return p


def launch_from_args(args: argparse.Namespace) -> Launch:
    kind, config = load_model_config(args.model, args.model_variant)
    width, height = pixel_size(args.resolution, args.task)
    if args.batch_size < 4 or args.batch_size % 4:
        raise SystemExit(f"--batch_size {args.batch_size}: a positive multiple of 4 (1:2:1 over 3 stages)")
    if min(args.gpus, args.num_frames, args.grad_accum) < 1:
        raise SystemExit("--gpus, --num_frames and --grad_accum must be >= 1")
    if args.offload_optimizer and args.shard_strategy == "ddp":
        raise SystemExit("--offload_optimizer is DeepSpeed's optimizer offload: --shard_strategy zero2 or zero3")
    if args.lora_rank < 0 or (args.lora_rank and args.shard_strategy == "zero3"):
        raise SystemExit(f"--lora_rank {args.lora_rank}: must be >= 0, and LoRA runs with ddp or zero2 (the "
                         "trainer refuses zero3)")
    group = args.video_sync_group or default_sync_group(args.gpus, args.num_frames)
    if args.task == "ar" and ((args.gpus % group and group % args.gpus) or args.num_frames % group):
        raise SystemExit(f"--video_sync_group {group} must divide --num_frames {args.num_frames} and divide or be "
                         f"a multiple of --gpus {args.gpus} (a virtual group: slots run one after the other)")
    return Launch(model_kind=kind, model_config=config, task=args.task, width=width, height=height,
                  num_frames=args.num_frames, batch_size=args.batch_size, gpus=args.gpus,
                  shard_strategy=args.shard_strategy, dtype=args.dtype, grad_accum=args.grad_accum,
                  gradient_checkpointing=args.gradient_checkpointing,
                  gradient_checkpointing_ratio=args.gradient_checkpointing_ratio, video_sync_group=group,
                  lora_rank=args.lora_rank, lora_targets=_targets(args.lora_targets),
                  offload_optimizer=args.offload_optimizer)


def _targets(text: str) -> tuple[str, ...]:
    """``LORA_TARGETS`` as the trainer parses it (empty: the kind's default)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e6:.2f} MFLOP"


def _gib(x: float) -> str:
    return f"{x:.1f} GiB" if x >= 0.1 else f"{x * 1024:.2f} MiB"


def format_plan(result: dict) -> str:
    b = {k: v / GIB for k, v in result["peak_breakdown_bytes"].items()}
    lines = [
        f"model: {result['params']:,} parameters ({result['trainable_params']:,} trainable)",
        f"FLOPs per optimizer step: {_flops(result['flops_per_step'])} ({result['flops_per_step_note']})",
        f"most tokens on one GPU: {result['max_tokens_per_gpu']:,}",
        f"predicted peak per GPU: {_gib(sum(b.values()))} = params {_gib(b['params'])} + grads {_gib(b['grads'])} "
        f"+ optimizer {_gib(b['optimizer'])} + activations/workspace {_gib(b['activations'])}",
        f"  ({result['sharding']})",
        f"fits in {result['gpu_memory_gib']:.0f} GiB: {'yes' if result['fits'] else 'NO'}",
    ]
    if not result["fits"]:
        lines.append(f"cheapest change that fits: {result.get('cheapest_fix') or 'none found (fewer frames, more GPUs)'}")
    lines.append(result["prediction"])
    return "\n".join(lines)


def plan_training_launch(args: argparse.Namespace, world_size: int) -> str:
    """``DRY_RUN=1``: the plan of the exact launch ``train/train_pyramid_flow.py`` was given (its parsed flags)."""
    kind, config = load_model_config(args.model_path, args.model_variant)
    task = "t2i" if args.task == "t2i" else ("ar" if args.use_temporal_pyramid else "t2v")
    width, height = pixel_size(args.resolution, task)
    strategy = args.shard_strategy or args.fsdp_shard_strategy or ("zero2" if args.use_fsdp else "ddp")
    launch = Launch(model_kind=kind, model_config=config, task=task, width=width, height=height,
                    num_frames=args.max_frames, batch_size=args.batch_size, gpus=world_size,
                    shard_strategy=strategy, dtype=args.model_dtype, grad_accum=args.gradient_accumulation_steps,
                    gradient_checkpointing=args.gradient_checkpointing,
                    gradient_checkpointing_ratio=args.gradient_checkpointing_ratio,
                    video_sync_group=args.video_sync_group if task == "ar" else 1,
                    lora_rank=args.lora_rank, lora_targets=_targets(args.lora_targets),
                    offload_optimizer=args.offload_optimizer)
    print(f"DRY_RUN: planning this launch ({kind}, {task}, {args.resolution}, NUM_FRAMES={args.max_frames}, "
          f"{world_size} process(es), {strategy}) on meta tensors ...", flush=True)
    result = plan(launch, default_gpu_memory_gib())
    text = format_plan(result)
    sp = args.sp_group_size if getattr(args, "use_sequence_parallel", False) else 1
    if sp > 1:
        text += (f"\nSP_SIZE={sp}: this plan counts one whole sample's activations per process; sequence parallelism "
                 f"keeps about 1/{sp} of them per process (measured 0.54x at SP_SIZE=2 on CPU, "
                 "tests/test_sequence_parallel.py); parameters and optimizer state are as planned")
    return text + "\nDRY_RUN: nothing trained, no checkpoint written."


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
    launch = launch_from_args(args)
    start = time.time()
    if not args.json:
        print(f"planning {args.model} {args.task} {args.resolution} NUM_FRAMES={args.num_frames} on {args.gpus} "
              f"GPU(s), {args.shard_strategy}: tracing the DiT on meta tensors (seconds to a minute) ...",
              file=sys.stderr)
    result = plan(launch, args.gpu_memory or default_gpu_memory_gib())
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
