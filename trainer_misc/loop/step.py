"""One optimizer step: ``grad_accum_steps`` micro-batches of fetch -> ``compute_loss`` -> backward, then the update.

**Bad batches**: a batch with unreadable samples is skipped by *every* rank together (one all-reduce decides), so
ranks never disagree on the number of forward/backward passes, and the data position stays equal on all ranks.

**Abnormal-loss skip** (the reference hard-codes: no update when the step's loss is >= 2.0; opt-in here): with
``skip_loss_threshold`` set, a micro-batch whose loss averaged over ranks reaches the threshold gets no backward; a
window whose micro-batches were all dropped makes no optimizer step at all (parameters, Adam moments and step count
untouched; the learning-rate schedule still advances, as in the reference). All ranks decide on the same averaged
value, so they stay in step. When only some micro-batches of a window are dropped, the update is made from the
others (a dropped micro-batch contributes zero gradient), which with one micro-batch per step is exactly the
reference's behaviour. A non-finite averaged loss stops the run with an error (as the reference does).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from trainer_misc.loop.config import TrainConfig
from trainer_misc.loop.metrics import StepRecord, check_stat
from trainer_misc.loop.tree import to_device
from trainer_misc.optim.engine import StepOutcome, TrainEngine
from trainer_misc.runtime.distributed import SlotLayout, all_reduce_host, all_reduce_sum
from trainer_misc.state.rng import SlotStreams

logger = logging.getLogger(__name__)

__all__ = ["StepContext", "ComputeLoss", "StepRunner"]


@dataclass(frozen=True)
class StepContext:
    """Passed to ``compute_loss`` with every micro-batch.

    ``step``: 0-based index of the optimizer step being accumulated (the reference's ``global_step``; also the LR
    schedule index). ``micro_step``: 0-based index of this micro-batch since the start of training (continues across
    resumes; the AR objective's call counter). ``micro_index``: position inside the accumulation window.
    ``sync_rank`` / ``sync_group``: the sync-group slot being trained (this rank's position in a real group; one
    of its slots in a virtual group) and the group size.
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
class RunCounters:
    """What the loop counts across steps; all of it is saved in checkpoints and restored on resume."""

    micro_step: int = 0        # micro-batches trained (the AR objective's call counter)
    data_position: int = 0     # batches consumed from the sampler (bad ones included)
    bad_samples: int = 0       # unreadable samples met (all ranks)
    skipped_updates: int = 0   # optimizer steps skipped for an abnormal loss
    dropped_micro_batches: int = 0


class StepRunner:
    """Runs one optimizer step (its ``grad_accum_steps`` micro-batches) and keeps the run's counters.

    ``lanes`` are this process's data streams, one iterator per :class:`~trainer_misc.runtime.distributed.Lane` of
    ``slots``: each micro-batch reads one batch per lane and trains every slot of that lane on it.
    """

    MAX_CONSECUTIVE_BAD = 50

    def __init__(self, engine: TrainEngine, compute_loss: ComputeLoss, lanes: list[Iterator], config: TrainConfig,
                 slots: SlotLayout, counters: RunCounters, streams: SlotStreams, sp_rank: int = 0) -> None:
        if len(lanes) != len(slots.lanes):
            raise ValueError(f"{len(lanes)} data iterators for {len(slots.lanes)} lanes")
        self.engine, self.compute_loss, self.lanes, self.config, self.slots = (engine, compute_loss, lanes, config,
                                                                               slots)
        self.sp_rank = sp_rank  # position in the sequence-parallel group (its config.sp_size ranks share a batch)
        self.counters = counters
        self.streams = streams
        if slots.virtual > 1 and config.skip_loss_threshold is not None:
            raise ValueError("skip_loss_threshold needs every slot's loss before the first backward, which a process "
                             "training several slots (VIDEO_SYNC_GROUP > processes, or fewer processes than the run "
                             "started with) does not have; drop --skip_loss_threshold or use one process per slot")
        if engine.cfg.grad_accum_steps != config.grad_accum_steps * slots.virtual:
            raise ValueError(f"the engine accumulates {engine.cfg.grad_accum_steps} backward passes per step, expected "
                             f"grad_accum_steps ({config.grad_accum_steps}) x slots per process ({slots.virtual})")
        self.schedule = config.schedule()

    def _context(self, step: int, k: int, group: int, position: int) -> StepContext:
        e = self.engine
        return StepContext(step=step, micro_step=self.counters.micro_step, micro_index=k, rank=e.rank,
                           world_size=e.world_size, sync_rank=position, sync_group=self.slots.group_size,
                           sync_group_index=group, device=e.device, dtype=e.param_dtype, module=e.module)

    def _next_batch(self, step: int) -> list[Any]:
        """The next batch of every lane, in which every sample loaded, skipping bad batches on all ranks together.

        A batch object with a non-empty ``bad`` list of ``(path, reason)`` (see ``trainer_misc.data.datasets``) had
        unreadable samples. Its paths are logged and counted, and *every* rank moves every lane on to its next
        batch: one host-side all-reduce per micro-batch decides (no device sync), so ranks never disagree on how
        many forward/backward passes a step has (a rank that skipped alone would leave the others waiting in the
        gradient reduction), and all lanes keep one data position.
        """
        for _ in range(self.MAX_CONSECUTIVE_BAD):
            batches = [next(it) for it in self.lanes]
            self.counters.data_position += 1
            bad, counted = 0, 0
            for lane, batch in zip(self.slots.lanes, batches):
                found = list(getattr(batch, "bad", None) or [])
                for path, reason in found:
                    logger.warning("rank %d step %d: bad sample %s: %s; skipping its batch", self.engine.rank, step,
                                   path, reason)
                bad += len(found)
                # The slots of a group (and the ranks of an SP group) read the same batch: its bad files are counted
                # once, by the group's first slot.
                counted += len(found) if lane.positions[0] == 0 and self.sp_rank == 0 else 0
            n_bad, n_counted = all_reduce_host([bad, counted])
            if n_bad == 0:
                return batches
            self.counters.bad_samples += int(n_counted)
        raise RuntimeError(f"{self.MAX_CONSECUTIVE_BAD} consecutive batches had unreadable samples; the data set "
                           "is broken (see the warnings above for the paths)")

    def _forward(self, batch: Any, step: int, k: int, group: int, position: int
                 ) -> tuple[torch.Tensor, Optional[float], dict[str, Any]]:
        """One slot's loss on a micro-batch, its token count (a host number, None if not given) and its other
        stats (tensors not read yet)."""
        loss, stats = self.compute_loss(self.engine.model, batch, self._context(step, k, group, position))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not isinstance(stats, dict):
            raise TypeError("compute_loss must return (a one-element loss tensor, a dict of stats), got "
                            f"({type(loss).__name__}, {type(stats).__name__})")
        tokens = stats.get("tokens")
        if tokens is not None and (isinstance(tokens, torch.Tensor) or not isinstance(tokens, (int, float))):
            raise TypeError("compute_loss stats['tokens'] must be a host number (from shapes), not a tensor: "
                            "reading a tensor here would be a host sync per micro-batch")
        others = {name: check_stat(value, name) for name, value in stats.items() if name != "tokens"}
        return loss, (float(tokens) if tokens is not None else None), others

    def _mean_loss_now(self, loss: torch.Tensor) -> float:
        """The loss averaged over ranks, read now: the one host sync between forward and backward, and only with
        ``skip_loss_threshold`` (whether to run the backward depends on the value)."""
        return all_reduce_sum(loss.detach().double().reshape(1)).item() / self.engine.world_size

    def run(self, step: int) -> StepRecord:
        """One optimizer step: ``grad_accum_steps`` micro-batches, each trained on every slot of this process.

        With one slot per process this is a plain data-parallel step. A process with several slots trains them one
        after the other, each on that slot's batch (its lane's) and random stream, all accumulated into this step
        (the engine accumulates ``grad_accum_steps * slots`` backward passes), which is the update of one process
        per slot. The logged loss is the mean over every slot of the run.

        **Host syncs**: the losses, token counts, stats and gradient norm stay on the device until the step's
        end, where one all-reduce and one device-to-host copy read them all (the forward and backward of every
        micro-batch are queued without waiting). Only ``skip_loss_threshold`` adds one sync per micro-batch. A
        non-finite loss therefore stops the run at the end of its step, before any checkpoint of that step.
        """
        cfg, engine, ga, counters = self.config, self.engine, self.config.grad_accum_steps, self.counters
        per_pass = [(i, lane.group, p) for i, lane in enumerate(self.slots.lanes) for p in lane.positions]
        passes = ga * len(per_pass)
        t0 = time.perf_counter()
        lr = self.schedule(step)
        engine.set_lr(lr)
        losses: list[torch.Tensor] = []   # per pass, local
        tokens_local, has_tokens, kept, outcome = 0.0, False, 0, None
        stats: dict[str, Any] = {}
        for k in range(ga):
            batches = [to_device(b, engine.device, non_blocking=engine.device.type == "cuda")  # pinned by the loader
                       for b in self._next_batch(step)]
            for j, (lane, group, position) in enumerate(per_pass):
                last = k == ga - 1 and j == len(per_pass) - 1
                slot = group * self.slots.group_size + position
                with engine.accumulate(), self.streams.use(slot):
                    loss, tokens, micro_stats = self._forward(batches[lane], step, k, group, position)
                    losses.append(loss.detach().double().reshape(()))
                    if tokens is not None:
                        tokens_local, has_tokens = tokens_local + tokens, True
                    for name, value in micro_stats.items():
                        stats[name] = stats.get(name, 0.0) + value / passes
                    # Only with one slot per process (checked in __init__): the decision needs every slot's loss.
                    if cfg.skip_loss_threshold is not None and \
                            (global_loss := self._mean_loss_now(loss)) >= cfg.skip_loss_threshold:
                        counters.dropped_micro_batches += 1
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
            counters.micro_step += 1  # the AR objective's call counter: one per micro-batch, whatever the slots
        pass_losses, tokens_sum, stats, grad_norm = self._read_step(losses, tokens_local, stats, outcome)
        for i, value in enumerate(pass_losses):
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} (mean over ranks) at step {step}, micro-batch "
                                         f"{i // len(per_pass)}; stopping. Lower the learning rate or check the data.")
        if kept == 0:
            counters.skipped_updates += 1
            logger.warning("step %d: every micro-batch dropped, optimizer step skipped (%d so far)", step,
                           counters.skipped_updates)
        elif not outcome.applied:
            logger.warning("step %d: update not applied (fp16 loss-scale overflow)", step)
        elapsed = time.perf_counter() - t0
        samples = cfg.batch_size * (engine.world_size // cfg.sp_size) * passes  # SP groups count once
        return StepRecord(step=step + 1, loss=sum(pass_losses) / passes, lr=lr, grad_norm=grad_norm,
                          skipped=kept == 0, applied=outcome is not None and outcome.applied,
                          dropped_micro_batches=passes - kept, step_time=elapsed, samples_per_sec=samples / elapsed,
                          tokens_per_sec=tokens_sum / elapsed if has_tokens else None,
                          bad_samples=counters.bad_samples, stats=stats)

    def _read_step(self, losses: list[torch.Tensor], tokens_local: float, stats: dict[str, Any],
                   outcome: Optional[StepOutcome]) -> tuple[list[float], float, dict[str, float], Optional[float]]:
        """The step's one device-to-host copy: per-pass losses averaged over ranks (one all-reduce on the device),
        this rank's tensor stats and the gradient norm; token counts and number stats never leave the host (the
        tokens are summed over ranks through the host group). No host value is copied to the device: a copy from
        pageable memory would wait for the GPU stream too.

        The ranks of an SP group compute the same loss on the same tokens: the mean over ranks is the mean over
        data-parallel ranks, and their tokens are counted once."""
        device = self.engine.device
        on_device = [n for n, v in stats.items() if isinstance(v, torch.Tensor) and v.device.type == device.type]
        host_stats = {n: float(v) for n, v in stats.items() if n not in on_device}  # numbers, or CPU tensors
        norm = outcome.grad_norm if outcome is not None else None
        norm_on_device = norm is not None and norm.device.type == device.type
        parts = [all_reduce_sum(torch.stack(losses))] + [stats[n].double().reshape(1) for n in on_device]
        if norm_on_device:
            parts.append(norm.double().reshape(1))
        values = torch.cat(parts).tolist()  # the host sync of the step
        n = len(losses)
        pass_losses = [v / self.engine.world_size for v in values[:n]]
        read_stats = {**host_stats, **dict(zip(on_device, values[n:n + len(on_device)]))}
        grad_norm = values[-1] if norm_on_device else (float(norm) if norm is not None else None)
        tokens = all_reduce_host([tokens_local])[0] / self.config.sp_size
        return pass_losses, tokens, {name: read_stats[name] for name in stats}, grad_norm
