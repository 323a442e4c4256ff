"""The short table at the end of ``tools/gpu_check.sh``: reads the JSON files a run left in its output folder and
prints (and writes to ``summary.md`` there) what issue 23 asks for.

    python3 tools/gpu_check_report.py runs/gpu_check [--status steps.txt]

A file that is missing (its step failed, timed out or was skipped) shows as a line saying so; nothing is invented.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional


def _load(path: Path) -> Optional[object]:
    return json.loads(path.read_text()) if path.is_file() else None


def report(out: Path, status: Optional[Path] = None) -> str:
    lines = ["# GPU check (issue 23)", ""]
    if status is not None and status.is_file():
        lines += ["steps: " + "; ".join(status.read_text().split("\n")).strip("; "), ""]
    flex = _load(out / "flex_check.json")
    if flex is None:
        lines.append("flex_check: no results (see log.txt)")
    else:
        lines.append(f"device: {flex.get('device')}, torch {flex.get('torch')}")
        gold = flex.get("golden") or {}
        lines.append("golden vectors on CUDA (max rel. diff, bound 1e-5): " + (
            ", ".join(f"{k} {v:.1e}" for k, v in gold.items()) if "error" not in gold else str(gold)))
        kern = flex.get("kernels") or {}
        lines.append("CUDA kernels vs plain (outputs / gradients): " + (", ".join(
            f"{k} {v['outputs']:.1e} / {v['gradients']:.1e}" for k, v in kern.items()) if "error" not in kern
            else str(kern)))
        lines += ["", "| FlexAttention vs per-frame SDPA | outputs rel. diff | gradients rel. diff |", "|---|---|---|"]
        for name, r in (flex.get("parity") or {}).items():
            if name == "error":
                lines.append(f"| parity failed | {r} | |")
                continue
            lines.append(f"| {name} | {r['outputs']:.1e} | {r['gradients']:.1e} ({r['n_gradients']} tensors) |")
        comp = flex.get("compilations") or {}
        if "compiled_graphs" in comp:
            lines.append(f"\ncompilations: {comp['compiled_graphs']} over {comp['layouts']} layouts "
                         f"({comp['seconds']:.0f} s, forward + backward)")
        else:
            lines.append(f"\ncompilations: {comp}")
        syncs = flex.get("host_syncs") or {}
        lines.append("host syncs in a micro-batch (set_sync_debug_mode): " + ", ".join(
            f"{k} {v['synchronizing_calls']}" if isinstance(v, dict) and "synchronizing_calls" in v else f"{k} {v}"
            for k, v in syncs.items()))
    rows = []
    for name in ("measure_flux384.json", "measure_sd3_384.json", "measure_flux768.json"):
        data = _load(out / name)
        if data is None:
            lines.append(f"{name}: no results (see log.txt)")
        else:
            rows += data
    if rows:
        lines += ["", "| case | split | s/step | TFLOP/s | reference s/step | ours/ref | ref TFLOP/s | first step s | "
                  "act GiB predicted / measured |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ref = (f"{r['reference_step_s']:.3f} | {r['ratio_to_reference']:.2f} | {r['reference_tflops']:.0f}"
                   if "reference_step_s" in r else "- | - | -")
            lines.append(f"| {r['case']} | {r['attention_split']} | {r['step_s']:.3f} | {r['tflops']:.0f} | {ref} | "
                         f"{r.get('first_step_s', float('nan')):.0f} | {r['predicted_activation_gib']:.1f} / "
                         f"{r['measured_activation_gib']:.1f} ({r['activation_error']:+.0%}) |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--status", type=Path, help="the steps' status lines")
    args = p.parse_args(argv)
    print(report(args.out, args.status))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
