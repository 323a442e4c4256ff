"""The plan of one launch, for ``DRY_RUN=1`` and ``tools/plan.py``: which DiT configuration, which sizes, and the
planner's figures (:mod:`trainer_misc.planning.planner`) as text.

``released-miniflux`` / ``released-sd3`` name the released DiTs' configurations, which ship with the model package
(:attr:`pyramid_dit.kinds.ModelKind.dit_config`): a plan at released size needs no download.
"""
from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Union

from pyramid_dit.kinds import get_kind, kind_of_class_name
from trainer_misc.data.resolution import IMAGE_BUCKETS, parse_resolution
from trainer_misc.planning.planner import GIB, Launch, choose_pack_slots, packed_peak_bytes, plan

__all__ = ["RELEASED", "auto_pack", "default_gpu_memory_gib", "default_sync_group", "format_plan", "load_model_config",
           "lora_targets", "pack_peak_predictor", "pixel_size", "plan_text", "with_pack"]

RELEASED = {"released-miniflux": "pyramid_flux", "released-sd3": "pyramid_mmdit"}  # --model names -> kind


def load_model_config(model: str, variant: Optional[str] = None) -> tuple[str, dict]:
    """(kind, config) of ``released-miniflux`` / ``released-sd3`` or a folder holding a DiT ``config.json``."""
    if model in RELEASED:
        kind = get_kind(RELEASED[model])
        return kind.name, dict(kind.dit_config)
    folder = Path(model)
    candidates = [folder / variant / "config.json"] if variant else []
    candidates += [folder / "config.json", folder / "diffusion_transformer_384p" / "config.json"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ValueError(f"--model {model}: expected released-miniflux, released-sd3, or a folder with a DiT "
                         f"config.json (tried {', '.join(map(str, candidates))})")
    config = json.loads(path.read_text())
    try:
        kind = kind_of_class_name(config.get("_class_name", ""))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return kind.name, {k: v for k, v in config.items() if not k.startswith("_")}


def default_gpu_memory_gib() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return 80.0


def pixel_size(resolution: str, task: str) -> tuple[int, int]:
    """(width, height) in pixels; for images the largest aspect-ratio bucket of the resolution."""
    if task == "t2i" and resolution in IMAGE_BUCKETS:
        return max(IMAGE_BUCKETS[resolution], key=lambda wh: wh[0] * wh[1])
    return parse_resolution(resolution)


def default_sync_group(gpus: int, num_frames: int) -> int:
    """The scripts' default 8 when it fits NUM_FRAMES and the process count (a divisor or a multiple: a virtual
    group on fewer GPUs), else the largest of 4, 2, 1 that does."""
    return next(g for g in (8, 4, 2, 1) if num_frames % g == 0 and (gpus % g == 0 or g % gpus == 0))


def lora_targets(text: str) -> tuple[str, ...]:
    """``LORA_TARGETS`` as the trainer parses it (empty: the kind's default)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e6:.2f} MFLOP"


def _gib(x: float) -> str:
    return f"{x:.1f} GiB" if x >= 0.1 else f"{x * 1024:.2f} MiB"


_PART_NAMES = {"params": "params", "grads": "grads", "optimizer": "optimizer", "ema": "EMA",
               "comm_buffers": "reduce buffers", "activations": "activations/workspace",
               "encoders": "text encoders/VAE", "validation": "validation DiT+VAE (rank 0)",
               "cuda_context": "CUDA context", "nccl": "NCCL", "fragmentation": "fragmentation"}


def _passes_lines(result: dict) -> list[str]:
    """Passes per optimizer step and the attention kernels they launch; with PACK_SLOTS > 1, against one slot per
    pass, and the packed pass's activations against one slot's (the price of the saving)."""
    p = result.get("passes")
    if not p or p["slots_per_process"] == 1:
        return []
    line = (f"forward/backward passes per optimizer step per GPU: {p['per_step']} of {p['pack_slots']} slot(s) each "
            f"(PACK_SLOTS={p['pack_slots']} of {p['slots_per_process']} slots per process), "
            f"{p['attention_calls_per_step']:,} attention kernel calls")
    unpacked = p.get("unpacked")
    if unpacked is None:
        return [line + "; PACK_SLOTS=k runs k slots per pass (fewer, bigger kernels) if memory allows"]
    saved = unpacked["attention_calls_per_step"] - p["attention_calls_per_step"]
    return [line + f"; one slot per pass: {unpacked['per_step']} passes, {unpacked['attention_calls_per_step']:,} "
                   f"calls ({saved:,} calls and {unpacked['per_step'] - p['per_step']} passes saved per step)",
            f"  activations of the heaviest packed pass: {_gib(p['activation_bytes'] / GIB)}, one slot's: "
            f"{_gib(unpacked['activation_bytes'] / GIB)} (included in the peak above)"]


def format_plan(result: dict) -> str:
    b = {k: v / GIB for k, v in result["peak_breakdown_bytes"].items()}
    parts = " + ".join(f"{_PART_NAMES.get(k, k)} {_gib(v)}" for k, v in b.items() if v)
    comm = result["comm_bytes_per_step"]
    lines = [
        f"model: {result['params']:,} parameters ({result['trainable_params']:,} trainable)",
        f"FLOPs per optimizer step: {_flops(result['flops_per_step'])} ({result['flops_per_step_note']})",
        f"most tokens on one GPU: {result['max_tokens_per_gpu']:,}",
        f"predicted peak per GPU: {_gib(sum(b.values()))} = {parts}",
        f"  ({result['sharding']})",
        f"fits in {result['gpu_memory_gib']:.0f} GiB: {'yes' if result['fits'] else 'NO'}",
    ]
    lines += _passes_lines(result)
    if "eval_flops" in result:
        share = result["eval_share_of_run"]
        lines.append(f"evaluation: {result['eval_samples']:,} held-out "
                     f"sample(s) x {result['eval_rows_per_sample']} grid points (DiT rows, forward only, "
                     f"{result['eval_calls_per_sample']} call(s) per sample) = {_flops(result['eval_flops'])} per "
                     f"evaluation ({_flops(result['eval_flops_per_sample'])} per sample, "
                     f"{result['eval_flops'] / result['flops_per_step']:.2f}x one optimizer step); "
                     f"{result['evaluations']} evaluation(s) in the run"
                     + (f" = {100 * share:.2f}% of its training FLOPs" if share is not None else ""))
    if not result["fits"]:
        lines.append(f"cheapest change that fits: {result.get('cheapest_fix') or 'none found (fewer frames, more GPUs)'}")
    if sum(comm.values()):
        sent = f"sent per GPU per optimizer step: {_gib(sum(comm.values()) / GIB)} (gradients " \
               f"{_gib(comm['gradients'] / GIB)}, weights {_gib(comm['weights'] / GIB)}; {result['comm_note']})"
        if "comm_seconds_per_step" in result:
            sent += f"; at {result['interconnect_gbps']:g} Gbit/s per GPU: {result['comm_seconds_per_step']:.2f} s"
            if "comm_seconds_per_step_model_dtype" in result:
                sent += (f", {result['comm_seconds_per_step_model_dtype']:.2f} s with --grad_reduce_dtype model")
        lines.append(sent)
    lines.append(f"checkpoint: {_gib(result['checkpoint_bytes_per_process'] / GIB)} written by each process, "
                 f"{_gib(result['checkpoint_bytes_total'] / GIB)} in all (fp32 master weights + AdamW moments"
                 f"{' + EMA' if result['launch'].get('ema') else ''})")
    lines.append(result["prediction"])
    return "\n".join(lines)


def auto_pack(launch: Launch, gpu_memory_gib: float) -> tuple[Launch, str]:
    """``PACK_SLOTS=auto`` for a plan: ``launch`` with the slots per pass the trainer would choose on a GPU of
    ``gpu_memory_gib`` (:func:`~trainer_misc.planning.planner.choose_pack_slots`), and a line saying so."""
    if launch.slots_per_process == 1:
        return launch, "PACK_SLOTS=auto: one slot per process, nothing to pack"
    k, peaks = choose_pack_slots(launch.slots_per_process, int(gpu_memory_gib * GIB),
                                 lambda slots: packed_peak_bytes(launch, slots))
    said = ", ".join(f"{_gib(peaks[n] / GIB)} for {n}" for n in sorted(peaks, reverse=True))
    return replace(launch, pack_slots=k), (
        f"PACK_SLOTS=auto: {k} slot(s) per pass on a {gpu_memory_gib:.0f} GiB GPU (predicted peaks {said} slot(s) "
        "per pass; on a machine without a GPU the trainer runs one slot per pass)")


def with_pack(launch: Launch, pack_slots: Union[int, str], gpu_memory_gib: float) -> tuple[Launch, str]:
    """``launch`` with ``PACK_SLOTS`` (a count, or ``auto``: :func:`auto_pack`), and a line when it says something.
    A count that does not divide the plan's slots per process (the plan counts an SP group's processes as data
    ranks) is planned as one slot per pass, and said."""
    if pack_slots == "auto":
        return auto_pack(launch, gpu_memory_gib)
    if launch.slots_per_process % int(pack_slots):
        return launch, (f"PACK_SLOTS={pack_slots}: planned as one slot per pass (the plan has "
                        f"{launch.slots_per_process} slot(s) per process)")
    return replace(launch, pack_slots=int(pack_slots)), ""


def pack_peak_predictor(launch: Callable[[], Launch], pack_slots: Union[int, str]
                        ) -> Optional[Callable[[int], int]]:
    """For the trainer's ``PACK_SLOTS=auto`` (``trainer_misc.loop.step.slots_per_pass``): ``k -> predicted peak
    bytes per GPU`` of the launch (built by ``launch()`` on first use) with ``k`` slots per pass, traced when asked
    (only rank 0 on a GPU asks); None when the slots per pass were given as a count."""
    if pack_slots != "auto":
        return None
    built = functools.cache(launch)
    return lambda k: packed_peak_bytes(built(), k)


def plan_text(launch: Launch, sp_size: int = 1, gpu_memory_gib: Optional[float] = None,
              interconnect_gbps: Optional[float] = None, pack_slots: Union[int, str] = 1) -> str:
    """The plan of ``launch`` as the lines ``DRY_RUN=1`` and ``tools/plan.py`` print (``sp_size``: processes per
    sequence-parallel group, which the plan counts as whole samples; ``pack_slots``: PACK_SLOTS, see
    :func:`with_pack`)."""
    gpu = gpu_memory_gib or default_gpu_memory_gib()
    launch, note = with_pack(launch, pack_slots, gpu)
    text = format_plan(plan(launch, gpu, interconnect_gbps)) + (f"\n{note}" if note else "")
    if sp_size > 1:
        text += (f"\nSP_SIZE={sp_size}: this plan counts one whole sample's activations per process; sequence "
                 f"parallelism keeps about 1/{sp_size} of them per process (measured 0.54x at SP_SIZE=2 on CPU, "
                 "tests/test_sequence_parallel.py); parameters and optimizer state are as planned")
    return text
