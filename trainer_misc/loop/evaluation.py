"""The held-out evaluation: a loss that is a deterministic function of the weights, when to compute it, and the
warning when it degrades.

Why: the training loss of pyramidal flow matching is too noisy to tell whether a finetune helps (every sample
draws its stage, timestep, noise and AR unit), and a finetune that drifts away from what the released model could
do is otherwise only found by eye, after the run. So the loop evaluates a fixed *held-out set* at fixed grid points
with fixed noise, once before the first step (the base weights) and every ``eval_every`` steps, and compares.

What is evaluated is a :class:`HeldOutSet` (``trainer_misc.loop.pyramid_eval`` is Pyramid Flow's): ``len(set)``
samples, each scored by ``score(model, index, ctx)`` into one loss per *part* (a pyramid stage), a function of the
weights and the sample only. :func:`evaluate` makes the figure independent of how the work is spread:

* sample ``i`` is scored by data-parallel rank ``i % D`` (``D`` = processes / ``SP_SIZE``; the ranks of a
  sequence-parallel group score the same samples together, as they train them), and every rank scores the same
  number of samples (a rank with fewer repeats one and discards it), so every forward has all its ranks (ZeRO-3
  gathers parameters in the forward, sequence parallelism exchanges tokens);
* each score goes into row ``i`` of a ``[samples, parts]`` table that is zero elsewhere, and one all-reduce sums
  the tables: every entry has a single contributor, so the sum is exact, and the means are then taken in the same
  order on every rank. The figure is the same for 1 or 8 processes, any strategy, LoRA or not, up to the float
  differences of the forward itself (none between runs of one set-up).

It runs under ``torch.no_grad()`` with the model in eval mode (LoRA dropout off) and draws nothing from the global
random streams (the set draws from its own seeded generators), so turning evaluation on changes no training number
and a resume continues the same loss curve.

:class:`EvalTracker` keeps the base figure (the first evaluation of a fresh run), the best one and the degradation
streak; its state goes into every checkpoint's trainer state, so ``eval/loss_vs_base`` continues after a resume
without evaluating the base with resumed weights. A figure more than ``margin`` above the reference (the best so
far, or the base) for ``patience`` evaluations in a row logs one warning line with the figures and the levers, and
with ``stop`` the loop checkpoints and ends the run there.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import torch
from torch import nn

from trainer_misc.optim.engine import TrainEngine
from trainer_misc.runtime.distributed import ParallelLayout, all_reduce_host, all_reduce_sum

logger = logging.getLogger(__name__)

__all__ = ["DEGRADE_REFERENCES", "DegradeRule", "EvalContext", "EvalFigures", "EvalOutcome", "EvalTracker",
           "Evaluation", "HeldOutSet", "evaluate", "evaluation_due", "evaluation_steps"]

DEGRADE_REFERENCES = ("best", "base")


@dataclass(frozen=True)
class EvalContext:
    """What ``HeldOutSet.score`` needs besides the model: where to run, the parameters' dtype (cast float inputs
    to it; bf16 under DeepSpeed bf16), the unwrapped module (attribute access; call the model for the forward)."""

    device: torch.device
    dtype: torch.dtype
    module: nn.Module


class HeldOutSet(Protocol):
    """A fixed evaluation set and its per-sample, deterministic score (see the module docstring)."""

    parts: Sequence[str]      # names of the figures each sample gets, e.g. ("stage_0", "stage_1", "stage_2")
    weights: Sequence[float]  # weight of each part in the total (e.g. the training batch's stage ratios)

    def __len__(self) -> int: ...

    def load(self, index: int, device: torch.device) -> Optional[tuple[str, str]]:
        """Read sample ``index`` once (kept for later evaluations); ``(path, reason)`` when it is unreadable."""

    def score(self, model: nn.Module, index: int, ctx: EvalContext) -> torch.Tensor:
        """``[len(parts)]`` float64 losses of sample ``index`` on ``ctx.device`` (called under no_grad)."""

    def describe(self) -> str:
        """The cost of one evaluation in words (samples x grid points, DiT calls)."""

    def fingerprint(self) -> str:
        """Changes whenever the samples or the grid change: figures of another fingerprint are not comparable."""


@dataclass(frozen=True)
class EvalFigures:
    """One evaluation: the weighted total, the per-part means over the samples, and what it cost."""

    step: int
    loss: float
    parts: dict[str, float]
    samples: int
    seconds: float
    seconds_per_sample: float  # on one process (each process scores ceil(samples / data ranks) samples)


def _rounds(samples: int, data_world: int) -> int:
    return -(-samples // data_world)


def _my_indices(samples: int, layout: ParallelLayout) -> list[int]:
    """The sample indices this data rank scores, real ones first; past the end it repeats ``i % samples``."""
    return [(layout.data_rank + j * layout.data_world) for j in range(_rounds(samples, layout.data_world))]


def prepare(held_out: HeldOutSet, layout: ParallelLayout, device: torch.device) -> None:
    """Load this rank's samples once. Collective: when any rank meets an unreadable sample, every rank stops with
    the reason (its own paths, or a pointer to the rank that has them)."""
    n = len(held_out)
    bad = [(i % n, *reason) for i in _my_indices(n, layout) if (reason := held_out.load(i % n, device))]
    total = int(all_reduce_host([len(bad)])[0])
    if total:
        mine = "; ".join(f"sample {i}: {path}: {why}" for i, path, why in bad[:3]) or \
            "another rank found them (its line says which)"
        raise ValueError(f"the evaluation set has {total} unreadable sample(s) ({mine}); fix or remove them from "
                         "EVAL_ANNO_FILE / ANNO_FILE (the data check accepted their headers: changed since?)")


def evaluate(held_out: HeldOutSet, engine: TrainEngine, layout: ParallelLayout, step: int) -> EvalFigures:
    """Score every sample of ``held_out`` with the current weights; the same figures on every rank. Collective."""
    n, parts = len(held_out), list(held_out.parts)
    weights = torch.tensor([float(w) for w in held_out.weights], dtype=torch.float64)
    if n == 0 or len(weights) != len(parts):
        raise ValueError(f"held-out set: {n} samples, {len(parts)} parts, {len(weights)} weights")
    ctx = EvalContext(engine.device, engine.param_dtype, engine.module)
    table = torch.zeros(n, len(parts), dtype=torch.float64, device=engine.device)
    start = time.perf_counter()
    indices = _my_indices(n, layout)
    was_training = engine.model.training
    engine.model.eval()
    try:
        with torch.no_grad():
            for i in indices:
                scores = held_out.score(engine.model, i % n, ctx)
                if i < n and layout.sp_rank == 0:  # one contributor per row: the sum below is exact
                    table[i] = scores.to(device=engine.device, dtype=torch.float64)
    finally:
        engine.model.train(was_training)
    table = all_reduce_sum(table).cpu()  # the host sync of the evaluation
    means = table.mean(dim=0)
    total = float((means * weights).sum() / weights.sum())
    seconds = time.perf_counter() - start
    return EvalFigures(step=step, loss=total, parts={name: float(v) for name, v in zip(parts, means)}, samples=n,
                       seconds=seconds, seconds_per_sample=seconds / len(indices))


# ------------------------------------------------------------------------------------------------ the tracker

@dataclass(frozen=True)
class DegradeRule:
    """When a figure counts as degraded: more than ``margin`` (relative: 0.02 = 2 %) above the reference, the best
    figure so far (``against="best"``, base included) or the base model's (``"base"``); ``patience`` such figures in
    a row warn; ``stop`` ends the run there (with a checkpoint)."""

    margin: float = 0.02
    patience: int = 3
    against: str = "best"
    stop: bool = False

    def __post_init__(self) -> None:
        if self.margin < 0 or self.patience < 1 or self.against not in DEGRADE_REFERENCES:
            raise ValueError(f"degrade rule: margin >= 0, patience >= 1, against in {DEGRADE_REFERENCES}; got "
                             f"{self.margin}, {self.patience}, {self.against!r}")


@dataclass
class EvalOutcome:
    """What one evaluation means: the scalars to log, the info line, the warning (if degrading), whether to stop."""

    figures: EvalFigures
    scalars: dict[str, float]
    line: str
    warning: Optional[str] = None
    stop: bool = False


def _relative(value: float, reference: float) -> float:
    return value / reference - 1 if reference > 0 else math.inf


def _parts_text(parts: dict[str, float]) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {value:.5f}" for name, value in parts.items())


@dataclass
class EvalTracker:
    """Base, best and degradation streak over a run's evaluations (see the module docstring)."""

    rule: DegradeRule
    fingerprint: str
    base: Optional[dict[str, Any]] = None  # {"step", "loss", "parts"} of the base weights
    best_loss: Optional[float] = None
    best_step: Optional[int] = None
    streak: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # (step, loss) of every evaluation so far

    @property
    def last_step(self) -> Optional[int]:
        """The step of the latest evaluation (None before the first)."""
        return self.history[-1]["step"] if self.history else None

    @classmethod
    def restore(cls, rule: DegradeRule, fingerprint: str, state: Optional[dict]) -> "EvalTracker":
        """The tracker of a resumed run (``state`` from its checkpoint), or a fresh one. A checkpoint evaluated on
        another set or grid (another fingerprint) keeps nothing: its figures are not comparable."""
        if not state:
            return cls(rule, fingerprint)
        if state.get("fingerprint") != fingerprint:
            logger.warning("the evaluation set or grid changed since the checkpoint (EVAL_* settings or files): its "
                           "base and best held-out figures are dropped; eval/loss_vs_base is not available in this "
                           "run, the degradation check starts over")
            return cls(rule, fingerprint)
        return cls(rule, fingerprint, base=state.get("base"), best_loss=state.get("best_loss"),
                   best_step=state.get("best_step"), streak=int(state.get("streak", 0)),
                   history=list(state.get("history", [])))

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "base": self.base, "best_loss": self.best_loss,
                "best_step": self.best_step, "streak": self.streak, "last_step": self.last_step,
                "history": self.history}

    def record(self, fig: EvalFigures, *, lr: Optional[float] = None, lora: bool = False) -> EvalOutcome:
        """Take one evaluation into account; see :class:`EvalOutcome`."""
        is_base = fig.step == 0 and self.base is None and not self.history
        if is_base:
            self.base = {"step": fig.step, "loss": fig.loss, "parts": dict(fig.parts)}
        scalars = {"eval/loss": fig.loss, "eval/seconds": fig.seconds,
                   **{f"eval/loss_{name}": value for name, value in fig.parts.items()}}
        previous_best, previous_best_step = self.best_loss, self.best_step
        if self.base is not None:
            scalars["eval/loss_vs_base"] = _relative(fig.loss, self.base["loss"])
            scalars.update({f"eval/loss_vs_base_{name}": _relative(value, self.base["parts"][name])
                            for name, value in fig.parts.items() if name in self.base["parts"]})
        if self.rule.against == "base" and self.base is not None:
            reference, reference_step = self.base["loss"], self.base["step"]
        else:
            reference, reference_step = previous_best, previous_best_step
        degraded = reference is not None and fig.loss > reference * (1 + self.rule.margin)
        self.streak = self.streak + 1 if degraded else 0
        if self.best_loss is None or fig.loss < self.best_loss:
            self.best_loss, self.best_step = fig.loss, fig.step
        self.history.append({"step": fig.step, "loss": fig.loss})

        cost = f"{fig.samples} samples, {fig.seconds:.2f} s ({fig.seconds_per_sample:.3f} s per sample per process)"
        if is_base:
            line = (f"eval step {fig.step} (base weights): held-out loss {fig.loss:.5f} [{_parts_text(fig.parts)}]; "
                    f"{cost}")
        else:
            against = []
            if self.base is not None:
                against.append(f"{100 * _relative(fig.loss, self.base['loss']):+.2f}% vs base {self.base['loss']:.5f}")
            if previous_best is not None:
                against.append(f"best {previous_best:.5f} at step {previous_best_step}")
            line = (f"eval step {fig.step}: held-out loss {fig.loss:.5f}"
                    + (f" ({'; '.join(against)})" if against else "") + f" [{_parts_text(fig.parts)}]; {cost}")
        outcome = EvalOutcome(figures=fig, scalars=scalars, line=line)
        if self.streak >= self.rule.patience:
            outcome.stop = self.rule.stop
            outcome.warning = self._warning(fig, reference, reference_step, lr, lora)
        return outcome

    def _warning(self, fig: EvalFigures, reference: float, reference_step: int, lr: Optional[float],
                 lora: bool) -> str:
        what = "the base model's" if self.rule.against == "base" else "the best"
        base = (f"; base {self.base['loss']:.5f}, {100 * _relative(fig.loss, self.base['loss']):+.2f}%"
                if self.base is not None and self.rule.against == "best" else "")
        lr_text = f" (LR is {lr:.3g} now)" if lr is not None else ""
        lora_text = "a smaller LORA_RANK" if lora else "a LoRA finetune (LORA_RANK=16) instead of the full DiT"
        end = (f"stopping with a checkpoint of step {fig.step} (EVAL_STOP_ON_DEGRADE=1)" if self.rule.stop
               else "EVAL_STOP_ON_DEGRADE=1 stops a run here with a checkpoint")
        return (f"eval step {fig.step}: DEGRADING: held-out loss {fig.loss:.5f} has been more than "
                f"{100 * self.rule.margin:.1f}% above {what} ({reference:.5f}, step {reference_step}) for "
                f"{self.streak} evaluations in a row{base}. Likely levers: a lower learning rate{lr_text}, "
                f"{lora_text}, more or more varied training data (ANNO_FILE); {end}")


def evaluation_due(step: int, max_steps: int, every: int) -> bool:
    """Whether the loop evaluates after optimizer step ``step``: every ``every`` steps (0: never) and after the
    last."""
    return (bool(every) and step % every == 0) or step == max_steps


def evaluation_steps(start_step: int, max_steps: int, every: int, last_evaluated: Optional[int]) -> list[int]:
    """The steps a run evaluates at: ``start_step`` (when it is 0 or a multiple of ``every`` not evaluated yet:
    the base, or an evaluation a stop signal skipped), then every step after it that :func:`evaluation_due`."""
    steps = [s for s in range(start_step + 1, max_steps + 1) if evaluation_due(s, max_steps, every)]
    if last_evaluated != start_step and (start_step == 0 or (every and start_step % every == 0)):
        steps.insert(0, start_step)
    return steps


class Evaluation:
    """The loop's side of evaluation: when, the collective figures, logging, and the state for checkpoints.

    ``rule``, ``every``: see :class:`DegradeRule` and :func:`evaluation_steps`. ``saved``: the trainer state of the
    checkpoint resumed from (its ``"evaluation"`` entry), or empty.
    """

    def __init__(self, held_out: HeldOutSet, engine: TrainEngine, layout: ParallelLayout, rule: DegradeRule,
                 every: int, saved: Optional[dict], lora: bool) -> None:
        self.held_out, self.engine, self.layout, self.every, self.lora = held_out, engine, layout, every, lora
        self.tracker = EvalTracker.restore(rule, held_out.fingerprint(), (saved or {}).get("evaluation"))
        self.prepared = False
        self.results: list[EvalFigures] = []

    def plan(self, start_step: int, max_steps: int) -> list[int]:
        return evaluation_steps(start_step, max_steps, self.every, self.tracker.last_step)

    def announce(self, start_step: int, max_steps: int) -> None:
        """The cost line at start-up (rank 0)."""
        if not self.engine.is_main:
            return
        steps = self.plan(start_step, max_steps)
        shown = ", ".join(map(str, steps[:6])) + (", ..." if len(steps) > 6 else "")
        logger.info("evaluation: %s; %d evaluation(s) in this launch (steps %s), on %d data-parallel rank(s)",
                    self.held_out.describe(), len(steps), shown or "none", self.layout.data_world)

    def due(self, done: int, max_steps: int) -> bool:
        return evaluation_due(done, max_steps, self.every)

    def due_at_start(self, start_step: int, max_steps: int) -> bool:
        steps = self.plan(start_step, max_steps)
        return bool(steps) and steps[0] == start_step

    def run(self, step: int, log, lr: Optional[float] = None) -> EvalOutcome:
        """Evaluate now (collective), log on rank 0, and return what it means."""
        if not self.prepared:
            prepare(self.held_out, self.layout, self.engine.device)
            self.prepared = True
        figures = evaluate(self.held_out, self.engine, self.layout, step)
        outcome = self.tracker.record(figures, lr=lr, lora=self.lora)
        self.results.append(figures)
        if self.engine.is_main:
            logger.info("%s", outcome.line)
            if outcome.warning:
                logger.warning("%s", outcome.warning)
            if log is not None:
                log.write_eval(step, outcome.scalars)
        return outcome

    @property
    def base_loss(self) -> Optional[float]:
        return self.tracker.base["loss"] if self.tracker.base is not None else None

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()
