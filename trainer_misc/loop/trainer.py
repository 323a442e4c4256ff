"""The training loop, shared by every model, objective and sharding strategy.

``train(model, compute_loss, dataset, config)`` runs ``config.max_steps`` optimizer steps of ``grad_accum_steps``
micro-batches each and knows nothing about the model: the objective is the callable
``compute_loss(model, batch, ctx) -> (loss, stats)``, with ``ctx`` a ``StepContext`` (step counters, rank, the slot's
group and position, device, dtype). ``stats`` is a dict of numbers; a ``"tokens"`` entry (tokens in this micro-batch on this
rank) turns on the tokens/s scalar, every other entry is logged as ``train/<name>`` (rank 0's value).

Where each part lives:

* ``config.py``   — ``TrainConfig``, every setting;
* ``step.py``     — one optimizer step (micro-batches, bad-batch skip, abnormal-loss skip, the update);
* ``resume.py``   — which checkpoint to continue from and the counters it restores;
* ``metrics.py``  — ``metrics.jsonl``, tensorboard, the batch trace;
* ``optim/`` / ``state/`` / ``data/`` — the engine, EMA and master weights; checkpoints, exports, random streams;
  the batch order.

**Resume**: the newest complete checkpoint under ``output_dir/checkpoints`` (or ``config.resume``) restores the
weights, optimizer, EMA, every slot's random stream and the data position, so the run continues the same loss curve,
on this launch's process count and strategy, whatever those were when the checkpoint was written.
``metrics.jsonl`` (rank 0) holds one record per step; on resume, records past the checkpoint are dropped.

**Slots and data**: a run trains ``num_groups * video_sync_group`` *slots* per micro-batch, fixed at its first
launch (``distributed.SlotLayout``): the slots of a video sync group read the same batch (the autoregressive
objective trains a different unit of the clip in each), the groups read different ones. Each process trains a
contiguous run of slots, one *lane* (a map-style dataset read through its own ``ResumableBatchSampler`` replica) per
group it touches, each slot on its own random stream (``rng.SlotStreams``), accumulated into one step
(``step.StepRunner.run``). With ``sp_size = S`` (sequence parallelism) the ``S`` consecutive ranks of an SP group
share their slots, read the same batches and draw the same noise, and the model splits each sample's tokens over
them (``model.enable_sequence_parallel``, ``distributed.parallel_layout``). ``group_keys`` (optional, one per
sample) keep equal-shape samples together. The DataLoader gets its own seeded generator, so building it never moves
the global RNG; randomness inside ``dataset[i]`` should derive from ``i`` for resumes to be exact with workers.

**Start-up**: the process group first, then the output folder is checked to be one folder for every node and its
write rate measured (``state/storage.py``: a warning when a checkpoint would not fit the stop window), locked for
this run, and the checkpoint to resume from chosen before the engine is built (its slot layout decides the
accumulation).

Call ``trainer_misc.runtime.distributed.destroy_process_group()`` when the script is done with distributed work.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from pyramid_dit.device import resolve_device
from pyramid_dit.lora import has_lora, merged_state_dict
from pyramid_dit.progress import progress as progress_bar
from trainer_misc.data.sampler import ResumableBatchSampler
from trainer_misc.data.workers import data_workers
from trainer_misc.loop.config import EXPORT_DTYPES, TrainConfig
from trainer_misc.loop.evaluation import EvalFigures, Evaluation, HeldOutSet
from trainer_misc.loop.metrics import MetricsLog, StepRecord
from trainer_misc.loop.resume import (
    check_data_layout,
    load_resume_state,
    resolve_resume,
    restore_streams,
    saved_layout,
    trainer_state,
)
from trainer_misc.loop.step import ComputeLoss, StepContext, StepRunner, slots_per_pass
from trainer_misc.optim.adamw import build_adamw
from trainer_misc.optim.ema import ShardedEMA
from trainer_misc.optim.engine import TrainEngine
from trainer_misc.optim.master import PARTS, held_elements
from trainer_misc.runtime.distributed import (
    all_reduce_host,
    barrier,
    init_process_group,
    parallel_layout,
    sequence_parallel_group,
)
from trainer_misc.runtime.failures import RunStopped, StopSignals
from trainer_misc.state.checkpoint import remove_interrupted_saves, save_checkpoint
from trainer_misc.state.export import export_lora, export_model, gather_full_weights
from trainer_misc.state.rng import SlotStreams
from trainer_misc.state.run_lock import lock_output_dir
from trainer_misc.state.storage import check_output_dir, stop_window_note, stop_window_s

logger = logging.getLogger(__name__)

__all__ = ["StepContext", "StepRecord", "TrainConfig", "TrainResult", "train", "ComputeLoss"]

EXPORT_NAME = "transformer"  # output_dir/export/transformer (and transformer_ema)


def checkpoint_bytes(engine: TrainEngine, ema: Optional[ShardedEMA]) -> int:
    """What this rank writes per checkpoint: its fp32 master weights and AdamW moments (and EMA), the most of any
    rank (they write at once)."""
    mine = sum(h.numel for h in held_elements(engine)) * 4 * (len(PARTS) + (ema is not None))
    return int(all_reduce_host([mine], op="max")[0])


@dataclass
class TrainResult:
    records: list[StepRecord]          # steps run by this call (after any resume)
    start_step: int                    # steps already done when this call started (0, or the resumed step)
    final_step: int
    skipped_updates: int
    dropped_micro_batches: int
    bad_samples: int                   # unreadable samples met in the whole run (all ranks, resumes included)
    resumed_from: Optional[Path]
    checkpoints: list[Path]
    exported: list[Path]
    engine: TrainEngine
    evaluations: list[EvalFigures] = dataclasses.field(default_factory=list)  # held-out figures of this call
    eval_base: Optional[float] = None  # the base model's held-out loss (kept across resumes), when known
    stopped_early: Optional[str] = None  # why the run ended before max_steps (the degradation stop)


def _build_loader(dataset: Dataset, config: TrainConfig, num_groups: int, group: int, lanes: int, start_batch: int,
                  collate_fn, group_keys, device: torch.device) -> tuple[ResumableBatchSampler, DataLoader]:
    """The loader of one lane: sampler replica ``group`` of ``num_groups``; the workers the machine allows this
    process are shared by its ``lanes``."""
    sampler = ResumableBatchSampler(len(dataset), config.batch_size, num_replicas=num_groups,
                                    replica=group, seed=config.seed, shuffle=config.shuffle,
                                    group_keys=group_keys, start_batch=start_batch,
                                    with_epoch=getattr(dataset, "keyed_by_epoch", False))
    workers, note = data_workers(config.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * lanes)
    if note and int(os.environ.get("RANK", "0")) == 0 and group == 0:
        logger.info("%s", note)
    # Its own generator: creating the iterator then draws no number from the global RNG. Pinned host batches on
    # CUDA, so their copy to the GPU (non_blocking in the step) overlaps with compute.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(config.seed))
    return sampler, loader


def train(model: nn.Module, compute_loss: ComputeLoss, dataset: Dataset, config: TrainConfig, *,
          collate_fn: Optional[Callable] = None, group_keys: Optional[Sequence[Hashable]] = None,
          on_step_end: Optional[Callable[[StepRecord], None]] = None,
          validate: Optional[Callable[[int, dict[str, torch.Tensor]], None]] = None,
          held_out: Optional[HeldOutSet] = None) -> TrainResult:
    """Train ``model`` with ``compute_loss`` on ``dataset``; see the module docstring.

    ``model`` should be on the CPU or its device already, with pretrained weights loaded (``load_dit_weights``)
    and gradient checkpointing configured. ``on_step_end`` is called on every rank after each step. Returns the
    per-step records of this call and what was written. ``validate(step, state_dict)`` runs on rank 0 every
    ``config.validate_every`` steps with the full weights (the EMA's when EMA is on) while the other ranks wait,
    and once with ``step`` 0 and the base weights before the first step of a fresh run (the "before" of the
    before/after samples); only rank 0 needs to pass it. ``held_out``: the evaluation set
    (``trainer_misc.loop.evaluation``), scored by every rank before the first step, every ``config.eval_every``
    steps and after the last; its figures go to the log and the checkpoints, and with
    ``config.eval_stop_on_degrade`` a degrading run ends early (checkpointed and exported).
    """
    if isinstance(dataset, IterableDataset):
        raise TypeError("train() needs a map-style dataset (len + __getitem__) so the data position can be "
                        "checkpointed; batch grouping goes through group_keys")
    output_dir = Path(config.output_dir)
    checkpoint_root = output_dir / "checkpoints"
    config.schedule()  # validate the schedule before any process group exists
    if config.sp_size > 1 and not hasattr(model, "enable_sequence_parallel"):
        raise TypeError(f"sp_size={config.sp_size}: {type(model).__name__} has no enable_sequence_parallel (only the "
                        "Pyramid Flow DiTs split their sequence)")

    # The process group first (accelerate and DeepSpeed join it): the checks below are collective.
    launched_rank, launched_world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    init_process_group(resolve_device(config.device))
    if launched_rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    probe = check_output_dir(output_dir)  # one folder for every node, and how fast it writes
    lock = lock_output_dir(output_dir)  # one run per output folder
    if launched_rank == 0:  # a killed or failed save's leftovers: ours now, and space a full disk needs back
        remove_interrupted_saves(checkpoint_root)
    resumed_from, saved = resolve_resume(config, checkpoint_root)

    # The slots this process trains (the run's, fixed at its first launch) decide the accumulation: one backward
    # pass per slot and micro-batch.
    layout = parallel_layout(launched_rank, launched_world, config.video_sync_group, config.sp_size,
                             num_groups=saved_layout(saved))
    slots = layout.slots
    # Slots per forward/backward pass (PACK_SLOTS; "auto" asks the planner on rank 0), decided before the engine
    # is built: its accumulation counts one backward per pass.
    pack = slots_per_pass(config.pack_slots, slots.virtual, compute_loss, model, resolve_device(config.device))
    config = dataclasses.replace(config, pack_slots=pack.slots)
    if launched_rank == 0 and slots.virtual > 1:
        logger.info("%d of this process's %d slots per forward/backward pass: %s", pack.slots, slots.virtual,
                    pack.reason)
    optimizer = build_adamw(model, config.lr, config.betas, config.eps, config.weight_decay,
                            cpu_offload=config.offload_optimizer)
    engine = TrainEngine(model, optimizer,
                         dataclasses.replace(config.engine_config(),
                                             grad_accum_steps=config.grad_accum_steps * slots.virtual // pack.slots))
    rank, world = engine.rank, engine.world_size
    if (rank, world) != (launched_rank, launched_world):
        raise RuntimeError(f"launcher said rank {launched_rank} of {launched_world}, the engine runs rank {rank} of "
                           f"{world}")
    if config.sp_size > 1:  # after the engine: its process group exists now (new_group is collective)
        engine.module.enable_sequence_parallel(sequence_parallel_group(config.sp_size))
        if engine.is_main:
            logger.info("sequence parallelism: %d groups of %d processes; each process holds 1/%d of every sample's "
                        "tokens and %d data-parallel ranks read different batches", layout.data_world,
                        config.sp_size, config.sp_size, layout.data_world)
    if engine.is_main and slots.virtual > 1:
        logger.info("each process trains %d slots per micro-batch (%d data stream(s) x VIDEO_SYNC_GROUP=%d over %d "
                    "data-parallel processes): the update of %d processes, %dx the time per step", slots.virtual,
                    slots.num_groups, slots.group_size, layout.data_world, slots.total_slots, slots.virtual)
    lora = has_lora(engine.module)  # adapters only train; validation and export see the merged weights
    streams = SlotStreams(slots.slots, config.seed, engine.device)
    ema = None
    if config.ema_decay is not None:
        ema = ShardedEMA(held_elements(engine), decay=config.ema_decay, update_every=config.ema_update_every)
    note = stop_window_note(checkpoint_bytes(engine, ema), probe, stop_window_s())
    if note and engine.is_main:
        logger.warning("%s", note)

    # Where to start: fresh, or a checkpoint's weights, counters and data position.
    start_step, counters = load_resume_state(resumed_from, engine, ema)
    loaders = [_build_loader(dataset, config, slots.num_groups, lane.group, len(slots.lanes), counters.data_position,
                             collate_fn, group_keys, engine.device) for lane in slots.lanes]
    check_data_layout(resumed_from, saved, loaders[0][0], config)
    runner = StepRunner(engine, compute_loss, [iter(loader) for _, loader in loaders], config, slots, counters,
                        streams, sp_rank=layout.sp_rank)
    # Random streams last, so nothing above (model wrapping, DataLoader set-up) shifts what the objective draws.
    restore_streams(resumed_from, saved, streams, layout, config.seed, rank, world)

    log = MetricsLog(output_dir, start_step, config.tensorboard) if engine.is_main else None
    progress = progress_bar(total=config.max_steps, initial=start_step, desc="train", unit="step") \
        if engine.is_main else None

    records: list[StepRecord] = []
    checkpoints: list[Path] = []
    stopped_early: Optional[str] = None
    engine.model.train()
    evaluation = None
    if held_out is not None:  # draws nothing from the RNG streams restored above: the training curve is unchanged
        evaluation = Evaluation(held_out, engine, layout, config.degrade_rule(), config.eval_every, saved, lora)
        evaluation.announce(start_step, config.max_steps)

    def state_of(done: int) -> dict:
        return trainer_state(done, counters, config, layout, world, loaders[0][0],
                             evaluation.state_dict() if evaluation is not None else None)

    stopper = StopSignals().install()  # SIGTERM/SIGINT/SIGHUP/SIGUSR1: finish the step, checkpoint, stop
    try:
        if evaluation is not None and evaluation.due_at_start(start_step, config.max_steps):
            evaluation.run(start_step, log)  # step 0: the base model's figures
        if config.validate_every and start_step == 0 and start_step < config.max_steps:
            _validate(engine, ema, lora, validate, 0)  # the base weights' samples: the "before" of before/after
        for step in range(start_step, config.max_steps):
            record = runner.run(step)
            if ema is not None and ema.should_update(step):
                ema.update()
            records.append(record)
            if log is not None:
                log.write(record, counters.skipped_updates, counters.dropped_micro_batches)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{record.loss:.4f}", lr=f"{record.lr:.2e}")
            if on_step_end is not None:
                on_step_end(record)
            done = step + 1
            stop = stopper.should_stop()  # collective: every rank stops after the same step
            degraded = False
            # Before the checkpoint, so it holds this evaluation; skipped on a stop signal before the last step (the
            # checkpoint must come fast), and then made up for when the run resumes (evaluation_steps).
            if evaluation is not None and (not stop or done == config.max_steps) \
                    and evaluation.due(done, config.max_steps):
                degraded = evaluation.run(done, log, lr=record.lr).stop  # the same decision on every rank
            if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.max_steps or stop \
                    or degraded:
                checkpoints.append(save_checkpoint(checkpoint_root, done, engine, state_of(done), ema,
                                                   config.keep_last_checkpoints, streams))
            if stop and done < config.max_steps:
                raise RunStopped(f"stopped by {stopper.signal_name} after step {done}: wrote {checkpoints[-1]}; "
                                 "rerun the same command to resume from it", stopper.agreed or 0)
            if config.validate_every and done % config.validate_every == 0:
                _validate(engine, ema, lora, validate, done)
            if degraded and done < config.max_steps:
                stopped_early = (f"stopped after step {done} of {config.max_steps}: the held-out loss degraded "
                                 f"(EVAL_STOP_ON_DEGRADE=1); wrote {checkpoints[-1]}")
                if engine.is_main:
                    logger.warning("%s", stopped_early)
                break
    finally:
        stopper.restore()
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()

    if lora:  # export/transformer (merged, official keys) + export/lora (peft format)
        exported = export_lora(engine, output_dir / "export", ema, dtype=EXPORT_DTYPES[config.export_dtype],
                               files=config.export_files)
    else:
        exported = export_model(engine, output_dir / "export" / EXPORT_NAME, ema,
                                dtype=EXPORT_DTYPES[config.export_dtype], files=config.export_files)
    if lock is not None:
        lock.release()
    final_step = records[-1].step if stopped_early else max(start_step, config.max_steps)
    return TrainResult(records=records, start_step=start_step, final_step=final_step,
                       skipped_updates=counters.skipped_updates, dropped_micro_batches=counters.dropped_micro_batches,
                       bad_samples=counters.bad_samples, resumed_from=resumed_from, checkpoints=checkpoints,
                       exported=exported, engine=engine,
                       evaluations=evaluation.results if evaluation is not None else [], stopped_early=stopped_early,
                       eval_base=evaluation.base_loss if evaluation is not None else None)


def _validate(engine: TrainEngine, ema: Optional[ShardedEMA], lora: bool,
              validate: Optional[Callable[[int, dict[str, torch.Tensor]], None]], step: int) -> None:
    """Gather the full weights (collective: every rank takes part) and hand them to rank 0's ``validate``."""
    weights, ema_weights = gather_full_weights(engine, ema)
    if engine.is_main and validate is not None:
        weights = ema_weights if ema_weights is not None else weights
        validate(step, merged_state_dict(weights, engine.module) if lora else weights)
    barrier()
