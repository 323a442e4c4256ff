"""Where a run starts: a fresh start, or the newest complete checkpoint with everything needed to continue the same
loss curve (model, optimizer, EMA, every rank's RNG, the data position and the loop's counters).

The checkpoint files themselves are written and read by ``trainer_misc.state.checkpoint``; this module decides which
checkpoint, turns its trainer state into the loop's counters, and refuses a checkpoint whose data layout differs.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

from trainer_misc.data.sampler import ResumableBatchSampler
from trainer_misc.loop.config import TrainConfig
from trainer_misc.loop.step import RunCounters
from trainer_misc.optim.ema import ShardedEMA
from trainer_misc.optim.engine import TrainEngine
from trainer_misc.state.checkpoint import load_checkpoint
from trainer_misc.state.trust import choose_resume_checkpoint, note_changed_settings

logger = logging.getLogger(__name__)

__all__ = ["resolve_resume", "load_resume_state", "check_data_layout", "trainer_state"]


def resolve_resume(config: TrainConfig, checkpoint_root: Path) -> Optional[Path]:
    """The checkpoint folder to resume from (``config.resume``: auto | never | a folder), or None. Collective: the
    newest checkpoint that verifies, chosen by rank 0 for every rank (``checkpoint.choose_resume_checkpoint``)."""
    return choose_resume_checkpoint(checkpoint_root, config.resume)


def load_resume_state(path: Optional[Path], engine: TrainEngine, ema: Optional[ShardedEMA]
                      ) -> tuple[int, RunCounters, dict]:
    """``(start_step, counters, saved trainer state)``; restores model/optimizer/EMA in place (not the RNG: that
    comes last, once nothing else can draw from it)."""
    if path is None:
        return 0, RunCounters(), {}
    state = load_checkpoint(path, engine, ema, restore_rng=False)
    logger.info("resumed from %s at step %d", path, state["step"])
    counters = RunCounters(micro_step=int(state["micro_step"]),
                           data_position=int(state.get("data_position", state["micro_step"])),
                           bad_samples=int(state.get("bad_samples", 0)),
                           skipped_updates=int(state["skipped_updates"]),
                           dropped_micro_batches=int(state["dropped_micro_batches"]))
    return int(state["step"]), counters, state


def check_data_layout(path: Optional[Path], saved: dict, sampler: ResumableBatchSampler,
                      config: Optional[TrainConfig] = None) -> None:
    """Refuse to resume when the data position of the checkpoint means other samples now; warn about changed
    settings (accumulation, learning rate, ...) that are allowed but change the loss curve."""
    if path is not None and config is not None:
        note_changed_settings(saved, dataclasses.asdict(config), path)
    if path is not None and saved.get("sampler") != sampler.state_dict():
        raise ValueError(f"{path}: the data layout changed since the checkpoint (saved {saved.get('sampler')}"
                         f", now {sampler.state_dict()}); the data position cannot be restored. Resume with the same "
                         "dataset, batch size, seed and number of processes, or start a new OUTPUT_DIR.")


def trainer_state(step_done: int, counters: RunCounters, config: TrainConfig, world_size: int,
                  sampler: ResumableBatchSampler, evaluation: Optional[dict] = None) -> dict:
    """The loop's part of a checkpoint (``trainer_state.json``); ``evaluation``: the held-out figures so far (base,
    best, degradation streak: ``EvalTracker.state_dict``), so a resumed run compares with the same base."""
    state = {"step": step_done, "micro_step": counters.micro_step, "data_position": counters.data_position,
             "bad_samples": counters.bad_samples, "skipped_updates": counters.skipped_updates,
             "dropped_micro_batches": counters.dropped_micro_batches, "world_size": world_size,
             "strategy": config.strategy, "mixed_precision": config.mixed_precision,
             "grad_accum_steps": config.grad_accum_steps, "sampler": sampler.state_dict(),
             "config": dataclasses.asdict(config)}
    if evaluation is not None:
        state["evaluation"] = evaluation
    return state
