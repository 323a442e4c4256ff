"""Where a run starts: a fresh start, or the newest complete checkpoint with everything needed to continue the same
loss curve (weights, optimizer, EMA, every slot's random stream, the data position and the loop's counters), on
the process count and strategy of *this* launch.

The checkpoint files themselves are written and read by ``trainer_misc.state.checkpoint``; this module decides which
checkpoint, what the run's slot layout is (fixed at its first launch, so the global batch stays the same), turns the
trainer state into the loop's counters, and refuses a checkpoint whose data would now mean other samples.
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
from trainer_misc.runtime.distributed import ParallelLayout, broadcast_object, get_rank
from trainer_misc.state.checkpoint import load_checkpoint, read_trainer_state, restore_process_rng, slot_states
from trainer_misc.state.rng import SlotStreams, seed_everything
from trainer_misc.state.trust import choose_resume_checkpoint, note_changed_settings

logger = logging.getLogger(__name__)

__all__ = ["check_data_layout", "load_resume_state", "restore_streams", "resolve_resume", "saved_layout",
           "trainer_state"]


def resolve_resume(config: TrainConfig, checkpoint_root: Path) -> tuple[Optional[Path], dict]:
    """``(checkpoint folder or None, its trainer state or {})``: ``config.resume`` is auto | never | a folder.
    Collective: the newest checkpoint that verifies, chosen by rank 0 for every rank
    (``trust.choose_resume_checkpoint``); its state is read by rank 0 and broadcast."""
    path = choose_resume_checkpoint(checkpoint_root, config.resume)
    if path is None:
        return None, {}
    state = broadcast_object(read_trainer_state(path) if get_rank() == 0 else None)
    return path, state


def saved_layout(saved: dict) -> Optional[int]:
    """The run's number of data streams (sampler replicas) from a checkpoint's trainer state; None for a new run."""
    layout = saved.get("layout") or {}
    return layout.get("num_groups")


def load_resume_state(path: Optional[Path], engine: TrainEngine, ema: Optional[ShardedEMA]) -> tuple[int, RunCounters]:
    """``(start_step, counters)``; restores weights, optimizer and EMA in place (not the random streams: they come
    last, once nothing else can draw from them: :func:`restore_streams`)."""
    if path is None:
        return 0, RunCounters()
    state = load_checkpoint(path, engine, ema)
    logger.info("resumed from %s at step %d", path, state["step"])
    counters = RunCounters(micro_step=int(state["micro_step"]), data_position=int(state["data_position"]),
                           bad_samples=int(state.get("bad_samples", 0)), skipped_updates=int(state["skipped_updates"]),
                           dropped_micro_batches=int(state["dropped_micro_batches"]))
    return int(state["step"]), counters


def restore_streams(path: Optional[Path], saved: dict, streams: SlotStreams, layout: ParallelLayout, seed: int,
                    rank: int, world_size: int) -> None:
    """The random streams, last: a fresh run seeds this process as its first slot's rank would be seeded (``seed +
    slot``); a resumed one restores each of its slots' streams, and the process's own python/numpy/torch states
    when the checkpoint was written by as many processes (the slots' streams are all the training draws from)."""
    first_slot = layout.slots.slots[0]
    if path is None:
        seed_everything(seed, first_slot)  # the ranks of an SP group share their slots, so they draw the same noise
        return
    if not restore_process_rng(path, rank, world_size, int(saved["layout"]["world_size"]), streams.device):
        seed_everything(seed, first_slot)
    streams.load_state_dict(slot_states(path, streams.slots), source=str(path))


def check_data_layout(path: Optional[Path], saved: dict, sampler: ResumableBatchSampler,
                      config: Optional[TrainConfig] = None) -> None:
    """Refuse to resume when the data position of the checkpoint means other samples now; warn about changed
    settings (accumulation, learning rate, ...) that are allowed but change the loss curve."""
    if path is not None and config is not None:
        note_changed_settings(saved, dataclasses.asdict(config), path)
    if path is not None and saved.get("sampler") != sampler.state_dict():
        raise ValueError(f"{path}: the data layout changed since the checkpoint (saved {saved.get('sampler')}"
                         f", now {sampler.state_dict()}); the data position cannot be restored. Resume with the same "
                         "dataset, batch size and seed, or start a new OUTPUT_DIR.")


def trainer_state(step_done: int, counters: RunCounters, config: TrainConfig, layout: ParallelLayout,
                  world_size: int, sampler: ResumableBatchSampler, evaluation: Optional[dict] = None) -> dict:
    """The loop's part of a checkpoint (``trainer_state.json``), with the run's slot layout (what a resume on any
    process count must keep) and the process layout that wrote it; ``evaluation``: the held-out figures so far
    (base, best, degradation streak: ``EvalTracker.state_dict``), so a resumed run compares with the same base."""
    state = {"step": step_done, "micro_step": counters.micro_step, "data_position": counters.data_position,
             "bad_samples": counters.bad_samples, "skipped_updates": counters.skipped_updates,
             "dropped_micro_batches": counters.dropped_micro_batches,
             "layout": {"num_groups": layout.slots.num_groups, "group_size": layout.slots.group_size,
                        "world_size": world_size, "sp_size": layout.sp_size, "strategy": config.strategy},
             "mixed_precision": config.mixed_precision, "grad_accum_steps": config.grad_accum_steps,
             "sampler": sampler.state_dict(), "config": dataclasses.asdict(config)}
    if evaluation is not None:
        state["evaluation"] = evaluation
    return state
