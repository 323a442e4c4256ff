"""The training loop, shared by every model, objective and sharding strategy.

``train(model, compute_loss, dataset, config)`` runs ``config.max_steps`` optimizer steps of
``grad_accum_steps`` micro-batches each and knows nothing about the model: the objective is the callable
``compute_loss(model, batch, ctx) -> (loss, stats)``, with ``ctx`` a ``StepContext`` (step counters, rank, sync-group
position, device, dtype). ``stats`` is a dict of numbers; a ``"tokens"`` entry (tokens in this micro-batch on this
rank) turns on the tokens/s scalar, every other entry is logged as ``train/<name>`` (rank 0's value).

What one optimizer step does:

1. set the learning rate for this step (``LRSchedule``);
2. for each micro-batch: fetch, move to the device, ``compute_loss``, average the loss over ranks (one small
   all-reduce, also used for logging), then backward;
3. at the last micro-batch: clip (``max_grad_norm``), step, zero the gradients; update the EMA on schedule;
4. log, checkpoint on schedule.

**Abnormal-loss skip** (the reference hard-codes: no update when the step's loss is >= 2.0): with
``skip_loss_threshold`` set, a micro-batch whose loss averaged over ranks reaches the threshold gets no backward; a
window whose micro-batches were all dropped makes no optimizer step at all (parameters, Adam moments and step count
untouched; the learning-rate schedule still advances, as in the reference). Each drop is logged with the step and
loss, counted in ``train/dropped_micro_batches`` and ``train/skipped_updates``, and kept in the checkpoint. All ranks
decide on the same averaged value, so they stay in step. When only some micro-batches of a window are dropped, the
update is made from the others (a dropped micro-batch contributes zero gradient), which with one micro-batch per
step is exactly the reference's behaviour. A non-finite averaged loss stops the run with an error (as the
reference does).

**Resume**: the newest complete checkpoint under ``output_dir/checkpoints`` (or ``config.resume``) restores model,
optimizer, EMA, RNG states of every rank and the data position, so the run continues the same loss curve.
``metrics.jsonl`` (rank 0) holds one record per step; on resume, records past the checkpoint are dropped.

**Data**: a map-style dataset read through ``ResumableBatchSampler`` (``batch_size`` per rank; with
``video_sync_group = k`` the ranks of a group read identical batches). ``group_keys`` (optional, one per sample)
keep equal-shape samples together. The DataLoader gets its own seeded generator, so building it never moves the
global RNG; randomness inside ``dataset[i]`` should derive from ``i`` for resumes to be exact with workers.

Call ``trainer_misc.distributed.destroy_process_group()`` when the script is done with distributed work.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .checkpoint import export_model, gather_full_weights, find_latest_checkpoint, load_checkpoint, restore_rank_rng, save_checkpoint
from .distributed import all_reduce_sum, barrier, seed_everything, sync_group_position
from .ema import ShardedEMA
from .engine import PRECISIONS, STRATEGIES, EngineConfig, TrainEngine
from .optim import LRSchedule, build_adamw
from .sampler import ResumableBatchSampler

logger = logging.getLogger(__name__)

__all__ = ["StepContext", "StepRecord", "TrainConfig", "TrainResult", "train", "ComputeLoss"]

_EXPORT_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainConfig:
    """Everything the loop needs. Reference flag names in brackets.

    Sizes: ``batch_size`` is per rank and per micro-batch [--batch_size]; an optimizer step uses
    ``batch_size * world_size * grad_accum_steps`` samples [--gradient_accumulation_steps]; ``max_steps`` counts
    optimizer steps [--epochs * --iters_per_epoch].
    """

    output_dir: str
    max_steps: int
    batch_size: int
    strategy: str = "ddp"                      # [--fsdp_shard_strategy] ddp | zero2 | zero3
    mixed_precision: str = "bf16"              # [--model_dtype] bf16 | fp16 | fp32
    grad_reduce_dtype: str = "fp32"            # fp32 | model: gradient reduction/accumulation (EngineConfig)
    device: str = "auto"                       # auto | cuda | cpu
    grad_accum_steps: int = 1
    # optimizer [--lr --opt_beta1 --opt_beta2 --opt_eps --weight_decay]
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    # schedule [--lr_scheduler --warmup_steps --warmup_lr --min_lr]
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0
    warmup_start_lr: Optional[float] = None    # None: reference value (1e-6 constant_with_warmup, 0 cosine)
    min_lr: float = 1e-5
    max_grad_norm: Optional[float] = 1.0       # [--clip_grad]; None or 0: no clipping (norm still reported)
    skip_loss_threshold: Optional[float] = None  # reference behaviour: 2.0
    # EMA [--ema_update --ema_decay]; None disables
    ema_decay: Optional[float] = None
    ema_update_every: int = 100                # the reference updates its EMA every 100 steps
    ema_on_cpu: bool = False
    # data
    seed: int = 0
    video_sync_group: int = 1                  # [--video_sync_group], 1 = every rank reads its own batches
    shuffle: bool = True
    num_workers: int = 0
    pin_memory: bool = False
    # checkpoints and export
    checkpoint_every: int = 0                  # steps; 0 = only at the end [--save_ckpt_freq, in steps here]
    keep_last_checkpoints: Optional[int] = None
    resume: str = "auto"                       # auto | never | path to a checkpoint folder [--resume]
    export: bool = True
    export_name: str = "transformer"           # folder under output_dir/export (EMA: <name>_ema)
    export_dtype: Optional[str] = None         # None keeps the training dtype; bf16 | fp16 | fp32
    # validation samples: every N steps (0 = off) train() calls its ``validate`` on rank 0 with the weights
    validate_every: int = 0
    # logging
    tensorboard: bool = True
    progress_bar: bool = True
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        for name in ("max_steps", "batch_size", "grad_accum_steps", "video_sync_group", "ema_update_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.export_dtype not in _EXPORT_DTYPES:
            raise ValueError(f"export_dtype must be one of {list(_EXPORT_DTYPES)}, got {self.export_dtype!r}")
        if self.skip_loss_threshold is not None and not self.skip_loss_threshold > 0:
            raise ValueError(f"skip_loss_threshold must be > 0 or None, got {self.skip_loss_threshold}")
        self.betas = tuple(self.betas)

    def schedule(self) -> LRSchedule:
        return LRSchedule(self.lr_scheduler, self.lr, self.max_steps, self.warmup_steps, self.warmup_start_lr,
                          self.min_lr)


@dataclass(frozen=True)
class StepContext:
    """Passed to ``compute_loss`` with every micro-batch.

    ``step``: 0-based index of the optimizer step being accumulated (the reference's ``global_step``; also the LR
    schedule index). ``micro_step``: 0-based index of this micro-batch since the start of training (continues across
    resumes; the AR objective's call counter). ``micro_index``: position inside the accumulation window.
    ``sync_rank`` / ``sync_group``: this rank's position inside its video sync group and the group size.
    ``dtype``: the dtype of the model's parameters (bf16 under DeepSpeed bf16: cast inputs to it).
    ``module``: the unwrapped model, for attribute access (call ``model`` for the forward).
    """

    step: int
    micro_step: int
    micro_index: int
    rank: int
    world_size: int
    sync_rank: int
    sync_group: int
    sync_group_index: int
    device: torch.device
    dtype: torch.dtype
    module: nn.Module


ComputeLoss = Callable[[nn.Module, Any, StepContext], "tuple[torch.Tensor, dict[str, Any]]"]


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


def _to_device(obj: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to_device(getattr(obj, f.name), device, non_blocking)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: _to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device, non_blocking) for v in obj)
    return obj


def _number(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"compute_loss stats[{name!r}] must be a number or a one-element tensor, "
                             f"got shape {tuple(value.shape)}")
        return float(value.detach().item())
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"compute_loss stats[{name!r}] must be a number, got {type(value).__name__}")


class _MetricsLog:
    """Rank 0's ``metrics.jsonl`` and tensorboard writer."""

    def __init__(self, output_dir: Path, start_step: int, tensorboard: bool) -> None:
        self.path = output_dir / "metrics.jsonl"
        if self.path.exists():  # keep the curve consistent after a resume: drop records past the checkpoint
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

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _resolve_resume(config: TrainConfig, checkpoint_root: Path) -> Optional[Path]:
    if config.resume == "never":
        return None
    if config.resume == "auto":
        return find_latest_checkpoint(checkpoint_root)
    path = Path(config.resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume={config.resume!r}: no such checkpoint folder")
    return path


class _StepRunner:
    """Runs one optimizer step (its ``grad_accum_steps`` micro-batches) and keeps the run's counters."""

    def __init__(self, engine: TrainEngine, compute_loss: ComputeLoss, data_iter, config: TrainConfig, sync,
                 micro_step: int, skipped_total: int, dropped_total: int, data_position: int,
                 bad_samples: int) -> None:
        self.engine, self.compute_loss, self.data_iter, self.config, self.sync = (engine, compute_loss, data_iter,
                                                                                  config, sync)
        self.micro_step, self.skipped_total, self.dropped_total = micro_step, skipped_total, dropped_total
        self.data_position, self.bad_samples = data_position, bad_samples
        self.schedule = config.schedule()

    def _context(self, step: int, k: int) -> StepContext:
        e, sync = self.engine, self.sync
        return StepContext(step=step, micro_step=self.micro_step, micro_index=k, rank=e.rank,
                           world_size=e.world_size, sync_rank=sync.position, sync_group=sync.group_size,
                           sync_group_index=sync.group_index, device=e.device, dtype=e.param_dtype, module=e.module)

    def _next_batch(self, step: int) -> Any:
        """The next batch in which every sample loaded, skipping bad batches on all ranks together.

        A batch object with a non-empty ``bad`` list of ``(path, reason)`` (see ``trainer_misc.datasets``) had
        unreadable samples. Its paths are logged and counted, and *every* rank moves on to its next batch: one
        all-reduce per micro-batch decides, so ranks never disagree on how many forward/backward passes a step
        has (a rank that skipped alone would leave the others waiting in the gradient reduction), and the data
        position (batches consumed) stays the same on all ranks.
        """
        for _ in range(self.MAX_CONSECUTIVE_BAD):
            batch = next(self.data_iter)
            self.data_position += 1
            bad = list(getattr(batch, "bad", None) or [])
            for path, reason in bad:
                logger.warning("rank %d step %d: bad sample %s: %s; skipping its batch", self.engine.rank, step,
                               path, reason)
            n_bad = int(all_reduce_sum(torch.tensor([float(len(bad))], dtype=torch.float64,
                                                    device=self.engine.device)).item())
            if n_bad == 0:
                return batch
            self.bad_samples += n_bad
        raise RuntimeError(f"{self.MAX_CONSECUTIVE_BAD} consecutive batches had unreadable samples; the data set "
                           "is broken (see the warnings above for the paths)")

    MAX_CONSECUTIVE_BAD = 50

    def _forward(self, step: int, k: int) -> tuple[torch.Tensor, float, Optional[float], dict[str, float]]:
        """Fetch a micro-batch, compute its loss, and average the loss (and sum the tokens) over ranks."""
        batch = _to_device(self._next_batch(step), self.engine.device, non_blocking=self.config.pin_memory)
        loss, stats = self.compute_loss(self.engine.model, batch, self._context(step, k))
        self.micro_step += 1
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not isinstance(stats, dict):
            raise TypeError("compute_loss must return (a one-element loss tensor, a dict of stats), got "
                            f"({type(loss).__name__}, {type(stats).__name__})")
        tokens = _number(stats["tokens"], "tokens") if "tokens" in stats else None
        reduced = all_reduce_sum(torch.tensor([loss.detach().float().item(), tokens or 0.0], dtype=torch.float64,
                                              device=self.engine.device))
        global_loss = float(reduced[0]) / self.engine.world_size
        if not math.isfinite(global_loss):
            raise FloatingPointError(f"loss is {global_loss} (mean over ranks) at step {step}, micro-batch {k}; "
                                     "stopping. Lower the learning rate or check the data.")
        others = {name: _number(value, name) for name, value in stats.items() if name != "tokens"}
        return loss, global_loss, (float(reduced[1]) if tokens is not None else None), others

    def run(self, step: int) -> StepRecord:
        cfg, engine, ga = self.config, self.engine, self.config.grad_accum_steps
        t0 = time.perf_counter()
        lr = self.schedule(step)
        engine.set_lr(lr)
        loss_sum, tokens_sum, kept, outcome = 0.0, None, 0, None
        stats: dict[str, float] = {}
        for k in range(ga):
            last = k == ga - 1
            with engine.accumulate():
                loss, global_loss, tokens, micro_stats = self._forward(step, k)
                loss_sum += global_loss
                if tokens is not None:
                    tokens_sum = (tokens_sum or 0.0) + tokens
                for name, value in micro_stats.items():
                    stats[name] = stats.get(name, 0.0) + value / ga
                if cfg.skip_loss_threshold is not None and global_loss >= cfg.skip_loss_threshold:
                    self.dropped_total += 1
                    logger.warning("step %d micro-batch %d: loss %.4f (mean over ranks) >= skip_loss_threshold "
                                   "%.4g, no update from this micro-batch", step, k, global_loss,
                                   cfg.skip_loss_threshold)
                    if last and kept > 0:
                        # The boundary backward makes DDP / DeepSpeed reduce and apply the kept micro-batches.
                        engine.backward(loss * 0.0)
                else:
                    engine.backward(loss)
                    kept += 1
                if last and kept > 0:
                    outcome = engine.step()
        if kept == 0:
            self.skipped_total += 1
            logger.warning("step %d: every micro-batch dropped, optimizer step skipped (%d so far)", step,
                           self.skipped_total)
        elif not outcome.applied:
            logger.warning("step %d: update not applied (fp16 loss-scale overflow)", step)
        elapsed = time.perf_counter() - t0
        samples = cfg.batch_size * engine.world_size * ga
        return StepRecord(step=step + 1, loss=loss_sum / ga, lr=lr,
                          grad_norm=outcome.grad_norm if outcome is not None else None, skipped=kept == 0,
                          applied=outcome is not None and outcome.applied, dropped_micro_batches=ga - kept,
                          step_time=elapsed, samples_per_sec=samples / elapsed,
                          tokens_per_sec=tokens_sum / elapsed if tokens_sum is not None else None,
                          bad_samples=self.bad_samples, stats=stats)


def _build_loader(dataset: Dataset, config: TrainConfig, sync, start_batch: int, collate_fn, group_keys,
                  device: torch.device) -> tuple[ResumableBatchSampler, DataLoader]:
    sampler = ResumableBatchSampler(len(dataset), config.batch_size, num_replicas=sync.num_groups,
                                    replica=sync.group_index, seed=config.seed, shuffle=config.shuffle,
                                    group_keys=group_keys, start_batch=start_batch)
    # Its own generator: creating the iterator then draws no number from the global RNG.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=config.num_workers,
                        pin_memory=config.pin_memory and device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.seed))
    return sampler, loader


def train(model: nn.Module, compute_loss: ComputeLoss, dataset: Dataset, config: TrainConfig, *,
          collate_fn: Optional[Callable] = None, group_keys: Optional[Sequence[Hashable]] = None,
          on_step_end: Optional[Callable[[StepRecord], None]] = None,
          validate: Optional[Callable[[int, dict[str, torch.Tensor]], None]] = None) -> TrainResult:
    """Train ``model`` with ``compute_loss`` on ``dataset``; see the module docstring.

    ``model`` should be on the CPU or its device already, with pretrained weights loaded (``load_dit_weights``)
    and gradient checkpointing configured. ``on_step_end`` is called on every rank after each step. Returns the
    per-step records of this call and what was written. ``validate(step, state_dict)`` runs on rank 0 every
    ``config.validate_every`` steps with the full weights (the EMA's when EMA is on) while the other ranks wait;
    only rank 0 needs to pass it.
    """
    if isinstance(dataset, IterableDataset):
        raise TypeError("train() needs a map-style dataset (len + __getitem__) so the data position can be "
                        "checkpointed; batch grouping goes through group_keys")
    output_dir = Path(config.output_dir)
    checkpoint_root = output_dir / "checkpoints"
    config.schedule()  # validate the schedule before any process group exists

    engine = TrainEngine(model, build_adamw(model, config.lr, config.betas, config.eps, config.weight_decay),
                         EngineConfig(strategy=config.strategy, mixed_precision=config.mixed_precision,
                                      device=config.device, grad_accum_steps=config.grad_accum_steps,
                                      max_grad_norm=config.max_grad_norm, micro_batch_size=config.batch_size,
                                      find_unused_parameters=config.find_unused_parameters,
                                      grad_reduce_dtype=config.grad_reduce_dtype))
    rank, world = engine.rank, engine.world_size
    sync = sync_group_position(rank, world, config.video_sync_group)
    if engine.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)

    ema = None
    if config.ema_decay is not None:
        ema = ShardedEMA([(n, p) for n, p in engine.module.named_parameters() if p.requires_grad],
                         decay=config.ema_decay, update_every=config.ema_update_every, rank=rank, world_size=world,
                         device=torch.device("cpu") if config.ema_on_cpu else None)

    resumed_from = _resolve_resume(config, checkpoint_root)
    state = {"step": 0, "micro_step": 0, "skipped_updates": 0, "dropped_micro_batches": 0, "data_position": 0,
             "bad_samples": 0}
    if resumed_from is not None:
        state = load_checkpoint(resumed_from, engine, ema, restore_rng=False)
        logger.info("resumed from %s at step %d", resumed_from, state["step"])
    start_step = int(state["step"])

    data_position = int(state.get("data_position", state["micro_step"]))
    sampler, loader = _build_loader(dataset, config, sync, data_position, collate_fn, group_keys, engine.device)
    if resumed_from is not None and state.get("sampler") != sampler.state_dict():
        raise ValueError(f"{resumed_from}: the data layout changed since the checkpoint (saved {state.get('sampler')}"
                         f", now {sampler.state_dict()}); the data position cannot be restored. Resume with the same "
                         "dataset, batch size, seed and number of processes, or start a new OUTPUT_DIR.")
    runner = _StepRunner(engine, compute_loss, iter(loader), config, sync, int(state["micro_step"]),
                         int(state["skipped_updates"]), int(state["dropped_micro_batches"]), data_position,
                         int(state.get("bad_samples", 0)))

    # RNG last, so nothing above (model wrapping, DataLoader set-up) shifts the streams the objective draws from.
    if resumed_from is not None:
        restore_rank_rng(resumed_from, rank, engine.device)
    else:
        seed_everything(config.seed, rank)

    def trainer_state(step_done: int) -> dict:
        return {"step": step_done, "micro_step": runner.micro_step, "data_position": runner.data_position,
                "bad_samples": runner.bad_samples, "skipped_updates": runner.skipped_total,
                "dropped_micro_batches": runner.dropped_total, "world_size": world, "strategy": config.strategy,
                "mixed_precision": config.mixed_precision, "grad_accum_steps": config.grad_accum_steps,
                "sampler": sampler.state_dict(), "config": dataclasses.asdict(config)}

    log = _MetricsLog(output_dir, start_step, config.tensorboard) if engine.is_main else None
    progress = None
    if config.progress_bar and engine.is_main:
        from tqdm.auto import tqdm
        progress = tqdm(total=config.max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    records: list[StepRecord] = []
    checkpoints: list[Path] = []
    engine.model.train()
    try:
        for step in range(start_step, config.max_steps):
            record = runner.run(step)
            if ema is not None and ema.should_update(step):
                ema.update()
            records.append(record)
            if log is not None:
                log.write(record, runner.skipped_total, runner.dropped_total)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{record.loss:.4f}", lr=f"{record.lr:.2e}")
            if on_step_end is not None:
                on_step_end(record)
            done = step + 1
            if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.max_steps:
                checkpoints.append(save_checkpoint(checkpoint_root, done, engine, trainer_state(done), ema,
                                                   config.keep_last_checkpoints))
            if config.validate_every and done % config.validate_every == 0:
                state, ema_state = gather_full_weights(engine, ema)  # collective: every rank takes part
                if engine.is_main and validate is not None:
                    validate(done, ema_state if ema_state is not None else state)
                barrier()
    finally:
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()

    exported: list[Path] = []
    if config.export:
        exported = export_model(engine, output_dir / "export" / config.export_name, ema,
                                dtype=_EXPORT_DTYPES[config.export_dtype])
    return TrainResult(records=records, start_step=start_step, final_step=max(start_step, config.max_steps),
                       skipped_updates=runner.skipped_total, dropped_micro_batches=runner.dropped_total,
                       bad_samples=runner.bad_samples,
                       resumed_from=resumed_from, checkpoints=checkpoints, exported=exported, engine=engine)
