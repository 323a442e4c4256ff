"""Regenerate the README table "Which GPUs do I need" (predictions from tools/plan.py's planner, no GPU).

    python3 tools/gpu_table.py [--models released-miniflux released-sd3] [--resolutions 384p 768p]

Per row: predicted peak GiB per GPU for 8 x ZeRO-2, 8 x ZeRO-3 (bf16, batch 4 per GPU, no gradient
checkpointing) and 1 GPU full finetune (ZeRO-2 on one process) with gradient checkpointing -- everything resident
counted, as `tools/plan.py` counts it: the text encoders for full-sequence rows (the script's LOAD_TEXT_ENCODER=1),
the reduce buffers and the CUDA-context / NCCL / fragmentation margins -- then PFLOP per optimizer step and GiB each
GPU sends per step on 8 GPUs (ZeRO-2, fp32 gradient reduction). Minutes on a 2-core CPU (every row traces the
released DiT on meta tensors).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from trainer_misc.planning.plan import default_sync_group, load_model_config, pixel_size
from trainer_misc.planning.planner import (
    GIB,
    Launch,
    comm_bytes_per_step,
    flops_per_step,
    memory_parts,
    model_size,
    trace_heaviest_pass,
)

HEADER = ("| model | resolution | NUM_FRAMES | mode | 8xZeRO-2 GiB/GPU | 8xZeRO-3 GiB/GPU | 1 GPU + ckpt GiB | "
          "PFLOP/step (8 GPUs) | GiB sent/GPU/step (8xZeRO-2) |", "|---|---|---|---|---|---|---|---|---|")
DEFAULTS = {"models": ["released-miniflux", "released-sd3"], "resolutions": ["384p", "768p"], "num_frames": [16, 32],
            "tasks": ["ar", "t2v"]}
MODE = {"ar": "AR", "t2v": "full-seq"}


def row_key(model: str, resolution: str, frames: int, task: str) -> str:
    """The first four cells of a row (what it is a prediction for)."""
    return f"| {model.removeprefix('released-')} | {resolution} | {frames} | {MODE[task]} |"


def grid(models=DEFAULTS["models"], resolutions=DEFAULTS["resolutions"], num_frames=DEFAULTS["num_frames"],
         tasks=DEFAULTS["tasks"]) -> list[tuple[str, str, int, str]]:
    """The rows, in table order; with the defaults, the README's table."""
    return [(m, r, f, t) for m in models for r in resolutions for f in num_frames for t in tasks]


def row(model: str, resolution: str, frames: int, task: str) -> str:
    kind, config = load_model_config(model)
    width, height = pixel_size(resolution, task)
    base = Launch(kind, config, task=task, width=width, height=height, num_frames=frames, gpus=8,
                  video_sync_group=default_sync_group(8, frames), text_encoder=task != "ar")
    n, n_train = model_size(base)
    traced, _ = trace_heaviest_pass(base)
    peaks = [sum(memory_parts(replace(base, shard_strategy=s), n, n_train, traced).values()) / GIB
             for s in ("zero2", "zero3")]
    single = replace(base, gpus=1, gradient_checkpointing=True)  # AR: a virtual sync group of 8 slots
    traced1, _ = trace_heaviest_pass(single)
    peaks.append(sum(memory_parts(single, n, n_train, traced1).values()) / GIB)
    flops = flops_per_step(base) / 1e15
    sent = sum(comm_bytes_per_step(base, n, n_train).values()) / GIB
    return (f"{row_key(model, resolution, frames, task)} {peaks[0]:.1f} | {peaks[1]:.1f} | {peaks[2]:.1f} | "
            f"{flops:.2f} | {sent:.1f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULTS["models"])
    p.add_argument("--resolutions", nargs="+", default=DEFAULTS["resolutions"])
    p.add_argument("--num_frames", nargs="+", type=int, default=DEFAULTS["num_frames"])
    p.add_argument("--tasks", nargs="+", default=DEFAULTS["tasks"], choices=list(MODE))
    args = p.parse_args(argv)
    print("\n".join(HEADER))
    for key in grid(args.models, args.resolutions, args.num_frames, args.tasks):
        print(row(*key), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
