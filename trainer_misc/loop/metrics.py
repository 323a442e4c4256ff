"""What a run writes about itself: one ``StepRecord`` per optimizer step and one line per held-out evaluation, in
``metrics.jsonl`` and tensorboard (rank 0), and the optional per-rank batch trace (``--trace_batches``)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

logger = logging.getLogger(__name__)

__all__ = ["StepRecord", "MetricsLog", "BatchTrace", "check_stat"]


@dataclass
class StepRecord:
    """One optimizer step as logged (``step`` = number of optimizer steps done, 1-based).

    ``loss``: mean over micro-batches of the loss averaged over ranks. ``skipped``: every micro-batch was dropped
    for an abnormal loss, no optimizer step. ``applied``: the optimizer really changed the weights (False when
    skipped, or when fp16 loss scaling hit an overflow). ``stats``: rank 0's ``compute_loss`` stats, averaged over
    micro-batches.
    """

    step: int
    loss: float
    lr: float
    grad_norm: Optional[float]
    skipped: bool
    applied: bool
    dropped_micro_batches: int
    step_time: float
    samples_per_sec: float
    tokens_per_sec: Optional[float]
    bad_samples: int  # unreadable samples so far (all ranks); their batches were skipped
    stats: dict[str, float] = field(default_factory=dict)


def check_stat(value: Any, name: str) -> Union[float, torch.Tensor]:
    """A ``compute_loss`` stat checked (a number or a one-element tensor) but not read: a tensor stays on its
    device until the step's one host copy (``trainer_misc.loop.step``)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"compute_loss stats[{name!r}] must be a number or a one-element tensor, "
                             f"got shape {tuple(value.shape)}")
        return value.detach().double().reshape(())
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"compute_loss stats[{name!r}] must be a number, got {type(value).__name__}")


class MetricsLog:
    """Rank 0's ``metrics.jsonl`` and tensorboard writer.

    On resume, records past the checkpoint's step are dropped (and a line cut off by a crash), so the file stays one
    continuous curve; tensorboard gets ``purge_step`` for the same reason.
    """

    def __init__(self, output_dir: Path, start_step: int, tensorboard: bool) -> None:
        self.path = output_dir / "metrics.jsonl"
        if self.path.exists():
            kept = []
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    step = json.loads(line)["step"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s line %d is not a step record (cut off by a crash?); dropped", self.path,
                                   number)
                    continue
                if step <= start_step:
                    kept.append(line)
            tmp = self.path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(output_dir / "logs"), purge_step=start_step + 1)

    def write(self, record: StepRecord, skipped_total: int, dropped_total: int) -> None:
        self.file.write(json.dumps(dataclasses.asdict(record)) + "\n")
        self.file.flush()
        if self.writer is None:
            return
        scalars = {"train/loss": record.loss, "train/lr": record.lr, "train/samples_per_sec": record.samples_per_sec,
                   "train/skipped_updates": skipped_total, "train/dropped_micro_batches": dropped_total,
                   "train/step_time": record.step_time, "train/bad_samples": record.bad_samples}
        if record.grad_norm is not None:
            scalars["train/grad_norm"] = record.grad_norm
        if record.tokens_per_sec is not None:
            scalars["train/tokens_per_sec"] = record.tokens_per_sec
        scalars.update({f"train/{k}": v for k, v in record.stats.items()})
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, record.step)

    def write_eval(self, step: int, scalars: dict[str, float]) -> None:
        """One evaluation (``trainer_misc.loop.evaluation``): a ``{"step", "eval": {...}}`` line (told apart from step
        records by its ``eval`` key; the step-0 line is the base model's) and the ``eval/*`` scalars."""
        record = {name.removeprefix("eval/"): value for name, value in scalars.items()}
        self.file.write(json.dumps({"step": step, "eval": record}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


class BatchTrace:
    """``--trace_batches``: one jsonl file per rank under ``<output_dir>/logs/`` (appended to across resumes)."""

    def __init__(self, output_dir: str, rank: int) -> None:
        self.path = Path(output_dir) / "logs" / f"trace_rank{rank:05d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
