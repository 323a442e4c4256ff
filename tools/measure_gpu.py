"""Measure, on the GPU at hand, what ``tools/plan.py`` predicts: activation memory and time of one training step
of the released-size DiT (random weights, bf16, batch 4), and, with ``--reference``, the reference's step time.

    python3 tools/measure_gpu.py                          # the default cases below, on cuda:0
    python3 tools/measure_gpu.py --cases pyramid_flux:ar:768p:16:ckpt --steps 5
    python3 tools/measure_gpu.py --reference /path/to/Pyramid-Flow --json runs/gpu_measure.json

A case is ``kind:task:resolution:frames[:ckpt]`` (task ``ar`` = temporal pyramid, ``t2v`` = full sequence;
``ckpt`` turns gradient checkpointing on at the training default ratio 0.75). For each case the micro-batch is
the heaviest one of a one-GPU launch (``VIDEO_SYNC_GROUP=8`` as a virtual group for ``ar``), built by the real
objective exactly as the planner builds it, and the DiT runs forward + backward on it:

* activations: peak bytes allocated during the step, less the parameters. Each gradient is dropped as soon as
  it is accumulated (what DeepSpeed ZeRO does once it has copied it into its reduce bucket), so the figure is
  what the planner calls activations (saved tensors, temporaries, inputs). ``reserved`` is the caching
  allocator's peak, fragmentation included. Optimizer state and DeepSpeed's buffers are the planner's
  arithmetic and are not measured here.
* time: median of ``--steps`` timed steps after one warm-up (CUDA-synchronised wall clock), and the achieved
  TFLOP/s over the planner's FLOP count (forward + backward, recompute not counted).
* ``--attention_split flex frame column``: each case with each way of calling attention (one FlexAttention call
  per block, one SDPA call per frame, one masked call per column; ``pyramid_dit.packing``), to see which is
  fastest on this GPU (``auto``, the default, is what training takes: ``flex`` on CUDA). ``first_step_s`` is the
  first step, FlexAttention's compilation included.
* ``--reference``: the reference's class of the same kind, from a Pyramid-Flow checkout, with the same weights
  and inputs, timed alternately with ours (no gradient checkpointing: the two implement it differently), and
  the largest output difference relative to the largest reference output.

Ours gets the prompts' lengths on the host (``text_lengths``), as in training; every prompt is full length.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]

import torch

from pyramid_dit.options import ATTENTION_SPLITS
from trainer_misc.planning.plan import load_model_config, pixel_size
from trainer_misc.planning.planner import (
    GIB,
    Launch,
    _loss,
    _tokens,
    build_model,
    count_flops,
    dit_inputs,
    rank_shapes,
    trace_memory,
)

MODELS = {"pyramid_flux": "released-miniflux", "pyramid_mmdit": "released-sd3"}
DEFAULT_CASES = ("pyramid_flux:ar:384p:16", "pyramid_flux:ar:384p:16:ckpt", "pyramid_flux:t2v:384p:16:ckpt",
                 "pyramid_flux:ar:768p:16:ckpt", "pyramid_mmdit:ar:384p:16", "pyramid_mmdit:ar:384p:16:ckpt",
                 "pyramid_mmdit:ar:768p:16:ckpt")


@dataclass(frozen=True)
class Case:
    kind: str
    task: str
    resolution: str
    frames: int
    checkpointing: bool

    @classmethod
    def parse(cls, text: str) -> "Case":
        parts = text.split(":")
        if len(parts) not in (4, 5) or parts[0] not in MODELS or parts[1] not in ("ar", "t2v") or \
                (len(parts) == 5 and parts[4] != "ckpt") or not parts[3].isdigit():
            raise SystemExit(f"--cases {text!r}: expected kind:task:resolution:frames[:ckpt], kind one of "
                             f"{sorted(MODELS)}, task ar or t2v (e.g. pyramid_flux:ar:384p:16:ckpt)")
        return cls(parts[0], parts[1], parts[2], int(parts[3]), len(parts) == 5)

    def __str__(self) -> str:
        return f"{self.kind}:{self.task}:{self.resolution}:{self.frames}" + (":ckpt" if self.checkpointing else "")

    def launch(self) -> Launch:
        _, config = load_model_config(MODELS[self.kind])
        width, height = pixel_size(self.resolution, self.task)
        return Launch(model_kind=self.kind, model_config=config, task=self.task, width=width, height=height,
                      num_frames=self.frames, batch_size=4, gpus=1, shard_strategy="zero2", dtype="bf16",
                      gradient_checkpointing=self.checkpointing, video_sync_group=8 if self.task == "ar" else 1)


def _heaviest(launch: Launch) -> list[list[tuple[int, ...]]]:
    """Clip shapes of the launch's micro-batch with the most tokens (the one that sets the peak)."""
    return max(rank_shapes(launch), key=_tokens)


def predict(case: Case) -> dict:
    """The planner's activation bytes and FLOPs of the case's heaviest micro-batch (meta tensors, no GPU)."""
    launch = case.launch()
    shapes = _heaviest(launch)
    traced = trace_memory(launch, shapes, torch.bfloat16)
    return {"tokens": _tokens(shapes), "activation_bytes": traced.activation_bytes,
            "flops": count_flops(launch, shapes)}


def _build_on(device: torch.device, launch: Launch, seed: int) -> torch.nn.Module:
    """The released-size DiT, built on ``device`` (buffers computed there), bf16, weights N(0, 0.02)."""
    torch.manual_seed(seed)
    model = build_model(launch.model_kind, launch.model_config, torch.bfloat16, device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.train()


def _inputs(launch: Launch, device: torch.device, seed: int) -> dict:
    inputs = dit_inputs(launch, _heaviest(launch), torch.bfloat16, device=str(device))
    g = torch.Generator(device=device).manual_seed(seed)
    for col in inputs["sample"]:
        for clip in col:
            clip.normal_(generator=g)
    inputs["encoder_hidden_states"].normal_(generator=g)
    inputs["pooled_projections"].normal_(generator=g)
    inputs["timestep_ratio"].uniform_(0, 1000, generator=g)
    return inputs


def _with_lengths(inputs: dict) -> dict:
    """Our DiT's inputs: the same tensors, and the prompts' lengths on the host, as the trainer passes them."""
    mask = inputs["encoder_attention_mask"]
    return {**inputs, "text_lengths": (mask.shape[1],) * mask.shape[0]}


def _step(model: torch.nn.Module, inputs: dict) -> list[torch.Tensor]:
    out = model(**inputs)
    _loss(out).backward()
    return [o.detach() for o in out]


def _drop_gradients(model: torch.nn.Module) -> list:
    """Free every gradient the moment it is accumulated (ZeRO copies it into its bucket and frees it too)."""
    def drop(p: torch.nn.Parameter) -> None:
        p.grad = None
    return [p.register_post_accumulate_grad_hook(drop) for p in model.parameters() if p.requires_grad]


def _timed(device: torch.device, fn) -> float:
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(case: Case, prediction: dict, device: torch.device, steps: int, reference_root: Optional[Path],
            split: str = "frame") -> dict:
    launch = case.launch()
    model = _build_on(device, launch, seed=0)
    model.attention_split = split
    if case.checkpointing:
        model.enable_gradient_checkpointing(launch.gradient_checkpointing_ratio)
    hooks = _drop_gradients(model)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    param_bytes = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    inputs = _inputs(launch, device, seed=1)
    ours = _with_lengths(inputs)
    start = time.perf_counter()
    out = _step(model, ours)  # the measured step is the first (nothing cached from an earlier one)
    torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - param_bytes
    reserved = torch.cuda.max_memory_reserved(device) - param_bytes
    times = [_timed(device, partial(_step, model, ours)) for _ in range(steps)]
    row = {"case": str(case), "attention_split": split, "tokens": prediction["tokens"], "first_step_s": first,
           "predicted_activation_gib": prediction["activation_bytes"] / GIB,
           "measured_activation_gib": peak / GIB, "reserved_gib": reserved / GIB,
           "param_gib": param_bytes / GIB,
           "activation_error": prediction["activation_bytes"] / peak - 1,
           "step_s": statistics.median(times), "tflops": prediction["flops"] / statistics.median(times) / 1e12}
    if reference_root is not None and not case.checkpointing:
        row.update(_against_reference(launch, model, inputs, out, device, steps, reference_root,
                                      prediction["flops"]))
    for h in hooks:
        h.remove()
    del model, inputs, out
    torch.cuda.empty_cache()
    return row


def _against_reference(launch: Launch, ours: torch.nn.Module, inputs: dict, ours_out: list[torch.Tensor],
                       device: torch.device, steps: int, root: Path, flops: int) -> dict:
    """The reference's step on the same weights and inputs, timed alternately with ours; its TFLOP/s over the same
    FLOP count (the model's, ours)."""
    from tools.reference_dit import load_reference_class

    config = launch.model_config
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            ref = load_reference_class(root, launch.model_kind)(**config)
    finally:
        torch.set_default_dtype(previous)
    ref.load_state_dict(ours.state_dict())
    ref.to(device, torch.bfloat16).train()
    hooks = _drop_gradients(ref)
    ref_out = _step(ref, inputs)
    err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(ours_out, ref_out))
    ours_t, ref_t = [], []
    ours_inputs = _with_lengths(inputs)
    for _ in range(steps):  # alternate, so both see the same clocks
        ours_t.append(_timed(device, partial(_step, ours, ours_inputs)))
        ref_t.append(_timed(device, partial(_step, ref, inputs)))
    for h in hooks:
        h.remove()
    del ref
    return {"reference_step_s": statistics.median(ref_t), "ours_step_s_alternating": statistics.median(ours_t),
            "ratio_to_reference": statistics.median(ours_t) / statistics.median(ref_t), "output_rel_diff": err,
            "reference_tflops": flops / statistics.median(ref_t) / 1e12}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="kind:task:resolution:frames[:ckpt]")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (median reported)")
    p.add_argument("--reference", type=Path, help="Pyramid-Flow checkout: time its DiT class as well (with the "
                                                  "first --attention_split)")
    p.add_argument("--attention_split", nargs="+", choices=ATTENTION_SPLITS, default=["auto"],
                   help="our attention (each is measured): auto (flex on CUDA), flex, frame, column")
    p.add_argument("--predictions", type=Path,
                   help="JSON of the planner's predictions per case: read if present, else written (tracing is CPU "
                        "work: do it once, on any machine, with --predict_only)")
    p.add_argument("--predict_only", action="store_true", help="write --predictions and stop (no GPU needed)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    cases = [Case.parse(c) for c in args.cases]

    cached = json.loads(args.predictions.read_text()) if args.predictions and args.predictions.is_file() else {}
    for case in cases:
        if str(case) not in cached:
            print(f"tracing {case} on meta tensors (planner prediction) ...", flush=True)
            cached[str(case)] = predict(case)
    if args.predictions:
        args.predictions.write_text(json.dumps(cached, indent=1))
    if args.predict_only:
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("measure_gpu.py measures on a CUDA GPU and none is visible (torch.cuda.is_available() is "
                         "False); --predict_only writes the predictions without one")
    device = torch.device("cuda", 0)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    rows = []
    for case in cases:
        for i, split in enumerate(args.attention_split):
            print(f"measuring {case}, attention split {split} ...", flush=True)
            rows.append(measure(case, cached[str(case)], device, args.steps, None if i else args.reference, split))
            print("  " + json.dumps(rows[-1]), flush=True)
            if args.json:  # after every row: a run stopped by a time limit keeps what it measured
                args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    print("\n| case | split | tokens | predicted act GiB | measured act GiB | error | reserved GiB | first step s | "
          "s/step | TFLOP/s | reference s/step | ours/reference |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = (f"{r['reference_step_s']:.3f} | {r['ratio_to_reference']:.2f}" if "reference_step_s" in r else "- | -")
        print(f"| {r['case']} | {r['attention_split']} | {r['tokens']:,} | {r['predicted_activation_gib']:.2f} | "
              f"{r['measured_activation_gib']:.2f} | {r['activation_error']:+.1%} | {r['reserved_gib']:.2f} | "
              f"{r.get('first_step_s', float('nan')):.1f} | {r['step_s']:.3f} | {r['tflops']:.0f} | {ref} |")


if __name__ == "__main__":
    raise SystemExit(main())
