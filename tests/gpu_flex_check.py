"""On a CUDA GPU: what the CPU cannot check about FlexAttention and the step's host syncs (``tools/gpu_check.sh`` runs
it; a minute or two on one H100, most of it compiling).

0. Golden: the reference-written vectors of tests/golden (both kinds, every case) through the CUDA path (fused RMS
   norm, gathered per-column ops, FlexAttention; and per-frame SDPA), float32 without TF32: the largest output
   difference relative to the largest reference output (the CPU tests' bound is 1e-5).
   Kernels: the fused RMS norm against torch's composite one, and the per-column ops' gather + indicator-product
   form against their per-segment form, outputs and gradients.
1. Parity: the tiny model of each kind (the tests' configs), float32 without TF32, AR columns with padded prompts
   (batch 2; once with the prompts' lengths on the host, once with a prompt that has a hole, so the kernel reads
   the device mask): outputs and every gradient with ``attention_split="flex"`` against ``"frame"`` (per-frame
   SDPA), as the largest difference relative to the largest value.
2. Compilations: forward + backward of the tiny miniFLUX model (bfloat16) on 14 varied AR and full-sequence
   layouts (the CPU test's list); how many times TorchDynamo compiled FlexAttention.
3. Host syncs: one training micro-batch as the trainer runs it (caption dropout, the objective's noising on the
   GPU, forward, loss, backward), the batch's text features moved from page-locked host memory with their
   lengths, under ``torch.cuda.set_sync_debug_mode("warn")``: the number of synchronising CUDA calls (after one
   warm-up micro-batch, which compiles).

    python3 tests/gpu_flex_check.py --json runs/gpu_flex_check.json
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _to(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype) if t.is_floating_point() and t.ndim > 1 else t.to(device)
    return {k: ([[cast(c) for c in col] for col in v] if k == "sample" else cast(v) if isinstance(v, torch.Tensor)
                else v) for k, v in inputs.items()}


def golden(device: torch.device) -> dict:
    """Largest relative output difference to the reference-written golden vectors, per kind, case and split."""
    from safetensors.torch import load_file

    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    from pyramid_dit.modeling_pyramid_mmdit import PyramidDiffusionMMDiT

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = {}
    for folder, cls in (("flux_tiny", PyramidFluxTransformer), ("mmdit_tiny", PyramidDiffusionMMDiT)):
        root = REPO / "tests" / "golden" / folder
        model = cls.from_pretrained(root).to(device)
        specs = json.loads((root / "cases.json").read_text())
        for case in ("case_nonar", "case_ar", "case_infer"):
            spec = specs[case]
            data = load_file(root / spec["file"])
            n = spec["n_columns"]
            sample = [[data[f"sample.{c}.{k}"].to(device) for k in range(len(spec["clip_shapes"][c]))]
                      for c in range(n)]
            model.train(spec["mode"] == "train")
            for split in ("flex", "frame"):
                model.attention_split = split
                with torch.no_grad():
                    out = model(sample=sample, **{k: data[k].to(device) for k in (
                        "encoder_hidden_states", "encoder_attention_mask", "pooled_projections", "timestep_ratio")})
                results[f"{folder}/{case}/{split}"] = max(_rel(out[c].cpu(), data[f"out.{c}"]) for c in range(n))
    return results


def kernels(device: torch.device) -> dict:
    """The CUDA forms of the RMS norm and of the per-column ops against the plain ones, outputs and gradients."""
    import torch.nn.functional as F

    from pyramid_dit.packed_ops import gated_residual, modulate, rms_norm
    from pyramid_dit.packing import Segments

    g = torch.Generator(device=device).manual_seed(0)
    results = {}
    x = torch.randn(2, 300, 4, 64, device=device, generator=g, requires_grad=True)
    w = torch.randn(64, device=device, generator=g, requires_grad=True)
    up = torch.randn(2, 300, 4, 64, device=device, generator=g)
    fused = rms_norm(x, w, 1e-6)
    plain = F.rms_norm(x, (64,), w, 1e-6)
    grads = [torch.autograd.grad((y * up).sum(), (x, w)) for y in (fused, plain)]
    results["rms_norm"] = {"outputs": _rel(fused, plain), "gradients": max(_rel(a, b) for a, b in zip(*grads))}
    lens = [300, 0, 1200, 37, 900]
    for name, fn in (("modulate", modulate), ("gated_residual", gated_residual)):
        a = torch.randn(2, sum(lens), 96, device=device, generator=g, dtype=torch.float64, requires_grad=True)
        b, c = (torch.randn(2, len(lens), 96, device=device, generator=g, dtype=torch.float64, requires_grad=True)
                for _ in range(2))
        up = torch.randn(2, sum(lens), 96, device=device, generator=g, dtype=torch.float64)
        if name == "gated_residual":  # x, gate [B, n, D], y
            b, c = c, torch.randn(2, sum(lens), 96, device=device, generator=g, dtype=torch.float64,
                                  requires_grad=True)
        outs, grads = [], []
        for batched in (True, False):
            out = fn(a, b, c, Segments.build(lens, device, batched=batched))
            outs.append(out)
            grads.append(torch.autograd.grad((out * up).sum(), (a, b, c)))
        results[name] = {"outputs": _rel(*outs), "gradients": max(_rel(p, q) for p, q in zip(*grads))}
    return results


def parity(device: torch.device) -> dict:
    """Largest relative differences, flex vs frame, outputs and gradients, per kind, case and dtype."""
    from test_dit import AR_COLUMNS, make_inputs, outputs_and_grads
    from test_dit import tiny_model as flux
    from test_mmdit import tiny_model as sd3

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = {}
    for kind, build in (("pyramid_flux", flux), ("pyramid_mmdit", sd3)):
        for case in ("host_lengths", "device_mask"):
            inputs = make_inputs(AR_COLUMNS, batch=2, seed=1)
            if case == "device_mask":
                inputs["encoder_attention_mask"][0, 2] = 0  # a hole: the host cannot trim it
            else:
                inputs["text_lengths"] = tuple(int(v) for v in inputs["encoder_attention_mask"].sum(1))
            g = torch.Generator().manual_seed(2)
            weights = [torch.randn(col[-1].shape, generator=g) for col in inputs["sample"]]
            for dtype in (torch.float32,):
                model = build().to(device, dtype).train()
                on_device = _to(inputs, device, dtype)
                w = [x.to(device, dtype) for x in weights]
                got = {}
                for split in ("frame", "flex"):
                    model.attention_split = split
                    got[split] = outputs_and_grads(model, dict(on_device), w)
                (out_f, grad_f), (out_x, grad_x) = got["frame"], got["flex"]
                results[f"{kind}/{case}/{str(dtype).split('.')[1]}"] = {
                    "outputs": max(_rel(a, b) for a, b in zip(out_x, out_f)),
                    "gradients": max(_rel(grad_x[k], grad_f[k]) for k in grad_f),
                    "n_gradients": len(grad_f)}
    return results


LAYOUTS = [
    ("ar", 1, (0, 3, 1)), ("ar", 2, (2, 0)), ([[(1, 4, 6)] * 2, [(1, 4, 6), (1, 8, 12)]], 1, (5,)),
    ([[(2, 4, 6), (1, 8, 12), (1, 8, 12)]], 1, (0,)), ([[(1, 4, 6)] * 4, [(3, 4, 6), (1, 16, 24)]], 2, (1, 4)),
    ([[(3, 8, 8)]], 1, (0,)), ([[(5, 4, 6)], [(2, 8, 12)], [(1, 16, 24)]], 1, (6, 0, 2)),
    ([[(4, 16, 24)]], 2, (9, 0)), ([[(2, 6, 6)], [(2, 12, 12)]], 1, (0, 7)),
    ([[(1, 8, 12)] * 3, [(1, 8, 12), (1, 16, 24), (1, 16, 24)]], 1, (2, 2)),
    ("ar", 2, (0, 1, 8)), ([[(7, 8, 12)]], 1, (3,)), ([[(1, 2, 4), (2, 4, 6)], [(1, 16, 16)]], 1, (1, 1)),
    ([[(2, 4, 6)] * 2, [(2, 4, 6), (1, 8, 12)]], 2, (0, 0)),
]


def compilations(device: torch.device) -> dict:
    """FlexAttention compilations over varied layouts (forward + backward each, bfloat16)."""
    from test_dit import AR_COLUMNS, make_inputs
    from test_dit import tiny_model as flux
    from torch._dynamo.utils import counters

    model = flux().to(device, torch.bfloat16).train()
    model.attention_split = "flex"
    before, start = counters["stats"]["unique_graphs"], time.perf_counter()
    for columns, batch, pad in LAYOUTS:
        inputs = _to(make_inputs(AR_COLUMNS if columns == "ar" else columns, batch=batch, pad=pad), device,
                     torch.bfloat16)
        torch.stack([o.float().pow(2).mean() for o in model(**inputs)]).sum().backward()
    torch.cuda.synchronize(device)
    return {"layouts": len(LAYOUTS), "compiled_graphs": counters["stats"]["unique_graphs"] - before,
            "seconds": time.perf_counter() - start}


def host_syncs(device: torch.device) -> dict:
    """Synchronising CUDA calls in one training micro-batch (after a warm-up one), per kind."""
    from test_dit import tiny_model as flux
    from test_mmdit import tiny_model as sd3

    from pyramid_dit.objective import PyramidFlowObjective
    from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler
    from pyramid_dit.text_features import TextFeatures
    from trainer_misc.loop.tree import to_device

    results = {}
    for kind, build in (("pyramid_flux", flux), ("pyramid_mmdit", sd3)):
        scheduler = PyramidFlowMatchEulerDiscreteScheduler(shift=1.0, stages=3, stage_range=(0, 1 / 3, 2 / 3, 1))
        null = TextFeatures(torch.zeros(10, 32), torch.tensor([1] + [0] * 9), torch.zeros(24))
        objective = PyramidFlowObjective(scheduler, kind, sample_ratios=(1, 2, 1), max_temporal_length=8,
                                         video_sync_group=4, text_drop_rate=0.5, null_text=null)
        model = build().to(device, torch.bfloat16).train()
        mask = torch.ones(8, 10, dtype=torch.int64)
        mask[::3, 6:] = 0
        host = TextFeatures(torch.randn(8, 10, 32), mask, torch.randn(8, 24))
        pinned = TextFeatures(*(t.pin_memory() for t in host), host.host_lengths)
        latents_host = torch.randn(8, 16, 8, 16, 24).pin_memory()

        def micro_batch() -> None:
            text = to_device(pinned, device, non_blocking=True)
            latents = latents_host.to(device, non_blocking=True)
            text, _ = objective.drop_text(text)
            step = objective.noise_latents(latents, use_temporal_pyramid=True, rank=1)
            step.text = text
            inputs = {k: ([[c.bfloat16() for c in col] for col in v] if k == "sample" else
                          v.bfloat16() if k in ("encoder_hidden_states", "pooled_projections") else v)
                      for k, v in step.dit_inputs().items()}
            objective.loss(model(**inputs), step.targets).backward()

        micro_batch()  # compiles
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                micro_batch()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
        results[kind] = {"synchronizing_calls": len(syncs), "first": syncs[:3]}
    return results


def _timed(name: str, fn: Callable[[], dict], report: dict) -> None:
    start = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as e:  # noqa: BLE001 - reported, the other checks still run
        report[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    report[name + "_s"] = round(time.perf_counter() - start, 1)
    print(f"{name}: {json.dumps(report[name])[:1500]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here")
    checks = {"golden": golden, "kernels": kernels, "parity": parity, "compilations": compilations,
              "host_syncs": host_syncs}
    p.add_argument("--checks", nargs="+", default=list(checks), choices=list(checks))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_flex_check.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    device = torch.device("cuda", 0)
    report: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    print(f"{report['device']}, torch {report['torch']}", flush=True)
    for name in args.checks:
        _timed(name, lambda: checks[name](device), report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    errors = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
