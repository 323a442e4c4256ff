"""Print a run's held-out evaluation next to its training loss, one row per evaluation (docs/evaluation.md says
how to read it):

    python3 tools/eval_report.py OUTPUT_DIR            # or OUTPUT_DIR/metrics.jsonl

Columns: the step; the held-out loss (``eval/loss``, step 0 = the base model); its change against the base
(``eval/loss_vs_base``); the per-stage figures; and the mean training loss of the steps since the previous
evaluation (the noisy ``train/loss`` averaged over the same span). A finetune that helps moves both down; training
falling while the held-out loss rises is overfitting or drift.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

__all__ = ["eval_rows", "format_rows", "main"]


def eval_rows(metrics: Path) -> list[dict]:
    """One dict per evaluation: step, loss, vs_base, stage figures, train (mean training loss since the previous
    evaluation, None before any step)."""
    rows, window = [], []
    for number, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise SystemExit(f"{metrics}:{number}: not a JSON line (cut off by a crash? the next resume drops it)")
        if "eval" not in record:
            window.append(record["loss"])
            continue
        figures = record["eval"]
        rows.append({"step": record["step"], "loss": figures["loss"], "vs_base": figures.get("loss_vs_base"),
                     "stages": {k.removeprefix("loss_"): v for k, v in figures.items()
                                if k.startswith("loss_") and not k.startswith("loss_vs_")},
                     "train": sum(window) / len(window) if window else None})
        window = []
    return rows


def format_rows(rows: list[dict]) -> str:
    if not rows:
        return "no evaluation in this run: set EVAL_FRACTION (e.g. 0.02) or EVAL_ANNO_FILE (docs/evaluation.md)"
    stages = list(rows[0]["stages"])
    head = f"{'step':>8}  {'held-out':>9}  {'vs base':>8}  " + "  ".join(f"{s.replace('_', ' '):>8}" for s in stages) \
        + f"  {'train (mean since previous)':>27}"
    out = [head]
    for r in rows:
        vs = "base" if r["step"] == 0 and r["vs_base"] == 0 else (
            f"{100 * r['vs_base']:+.2f}%" if r["vs_base"] is not None else "-")
        train = f"{r['train']:.5f}" if r["train"] is not None else "-"
        out.append(f"{r['step']:>8}  {r['loss']:>9.5f}  {vs:>8}  "
                   + "  ".join(f"{r['stages'][s]:>8.5f}" for s in stages) + f"  {train:>27}")
    best = min(rows, key=lambda r: r["loss"])
    out.append(f"best held-out loss {best['loss']:.5f} at step {best['step']}")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a training OUTPUT_DIR, or its metrics.jsonl")
    args = p.parse_args(argv)
    path = Path(args.run)
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.is_file():
        raise SystemExit(f"eval_report.py: {metrics} not found (give a training OUTPUT_DIR)")
    print(format_rows(eval_rows(metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
