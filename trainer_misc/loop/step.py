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

**Packed slots** (``pack_slots`` > 1, a process training several slots of a virtual sync group): ``pack_slots`` slots
run as one forward/backward whose micro-batch holds all their columns, when ``compute_loss`` offers the packed
protocol (:data:`ComputeLoss`); each slot's random draws are still made on its own stream, and each slot's loss is
still recorded, so the losses, gradients and streams are those of one slot per pass (:func:`slots_per_pass` decides
how many, once, before the engine is built).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from trainer_misc.loop.config import TrainConfig
from trainer_misc.loop.metrics import StepRecord, check_stat
from trainer_misc.loop.tree import to_device
from trainer_misc.optim.engine import StepOutcome, TrainEngine
from trainer_misc.runtime.distributed import (
    SlotLayout,
    all_reduce_host,
    all_reduce_sum,
    broadcast_object,
    get_rank,
)
from trainer_misc.runtime.slots import pack_choices
from trainer_misc.state.rng import SlotStreams

logger = logging.getLogger(__name__)

__all__ = ["StepContext", "ComputeLoss", "PackChoice", "StepRunner", "random_in_forward", "slots_per_pass",
           "supports_packing"]


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
"""``compute_loss(model, batch, ctx) -> (loss, stats)`` for one slot's micro-batch.

Optional packed protocol, for a process that trains several slots per micro-batch (a virtual sync group): with
``prepare(model, batch, ctx) -> prepared`` (every random draw of the slot, no forward) and
``forward_packed(model, [prepared, ...], [ctx, ...]) -> [(loss, stats), ...]`` (one forward over all of them, each
slot's loss from its own outputs), ``pack_slots`` slots run as one forward/backward pass; ``packed_peak_bytes(k)``
(predicted device bytes of a step whose passes train ``k`` slots, or None) lets ``pack_slots="auto"`` choose. A
``compute_loss`` without ``prepare``/``forward_packed`` trains one slot at a time.
"""


def supports_packing(compute_loss: ComputeLoss) -> bool:
    """Whether ``compute_loss`` offers the packed protocol (see :data:`ComputeLoss`)."""
    return callable(getattr(compute_loss, "prepare", None)) and callable(getattr(compute_loss, "forward_packed", None))


@dataclass(frozen=True)
class PackChoice:
    """Slots per forward/backward pass, and why: said once at start, so a run's speed is never a mystery."""

    slots: int
    reason: str


def random_in_forward(model: nn.Module) -> Optional[str]:
    """The first module of ``model`` that draws random numbers in its training forward (dropout with ``p > 0``,
    LoRA dropout included), or None. Packed slots share one forward, so such draws would come from one stream
    for all of them instead of each slot's own: the losses would no longer be those of one slot at a time."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{name or type(model).__name__} ({type(module).__name__}, p={module.p:g})"
    return None


def slots_per_pass(requested: Union[int, str], slots_per_process: int, compute_loss: ComputeLoss,
                   model: nn.Module, device: torch.device) -> PackChoice:
    """How many of this process's ``slots_per_process`` slots each forward/backward pass trains.

    ``requested`` is ``pack_slots``: a divisor of ``slots_per_process`` (anything else raises, naming the allowed
    values), or ``"auto"``: the largest divisor whose predicted peak (``compute_loss.packed_peak_bytes``, the
    planner's) fits this GPU's memory, decided by rank 0 and broadcast, so every rank runs as many passes (a
    collective: every rank calls it). On the CPU there is no GPU memory to fit and ``auto`` means 1. Packing
    needs the packed protocol, and a model that draws nothing in its forward (:func:`random_in_forward`); without
    the protocol the slots run one at a time, whatever was asked.
    """
    allowed = pack_choices(slots_per_process)
    if requested != "auto" and (not isinstance(requested, int) or requested not in allowed):
        raise ValueError(f"PACK_SLOTS (--pack_slots) {requested!r}: this process trains {slots_per_process} slot(s) "
                         f"per micro-batch, so slots per pass must be one of {allowed} or auto")
    if slots_per_process == 1 or requested == 1:
        return PackChoice(1, "one slot per process" if slots_per_process == 1 else "PACK_SLOTS=1")
    if not supports_packing(compute_loss):
        return PackChoice(1, f"PACK_SLOTS={requested}, but compute_loss has no packed forward (prepare / "
                             "forward_packed): one slot per pass")
    drawn = random_in_forward(model)
    if drawn is not None:
        if requested != "auto":
            raise ValueError(f"PACK_SLOTS={requested}: {drawn} draws random numbers in the forward, which a packed "
                             "pass would draw for all its slots from one stream; set PACK_SLOTS=1 (or the dropout "
                             "to 0)")
        return PackChoice(1, f"PACK_SLOTS=auto: {drawn} draws random numbers in the forward, one slot per pass")
    if requested != "auto":
        return PackChoice(requested, f"PACK_SLOTS={requested}")
    choice = None
    if get_rank() == 0:
        choice = _auto_pack(slots_per_process, compute_loss, device)
    return broadcast_object(choice)


def _auto_pack(slots_per_process: int, compute_loss: ComputeLoss, device: torch.device) -> PackChoice:
    """``PACK_SLOTS=auto`` on this rank (rank 0): see :func:`slots_per_pass`."""
    from trainer_misc.planning.planner import GIB, choose_pack_slots

    if device.type != "cuda":
        return PackChoice(1, f"PACK_SLOTS=auto on {device.type}: no GPU memory to fit, one slot per pass")
    predict = getattr(compute_loss, "packed_peak_bytes", None)
    if predict is None:
        return PackChoice(1, "PACK_SLOTS=auto without a memory prediction (compute_loss.packed_peak_bytes): one "
                             "slot per pass")
    gpu = torch.cuda.get_device_properties(device).total_memory
    print(f"PACK_SLOTS=auto: predicting the peak memory of 1 to {slots_per_process} slot(s) per pass on meta tensors "
          "(the planner's trace; seconds to a minute, once per launch) ...", flush=True)
    try:
        slots, peaks = choose_pack_slots(slots_per_process, gpu, predict)
    except ValueError as e:  # the planner's launch has another slot count (a resume on fewer processes)
        return PackChoice(1, f"PACK_SLOTS=auto: the planner cannot plan this layout ({e}): one slot per pass")
    said = ", ".join(f"{peaks[k] / GIB:.1f} GiB for {k}" for k in sorted(peaks, reverse=True))
    verdict = "fits" if peaks[slots] <= gpu else "is the least, and even it does not fit"
    return PackChoice(slots, f"PACK_SLOTS=auto: the planner predicts a peak of {said} slot(s) per pass on this "
                             f"{gpu / GIB:.1f} GiB GPU; {slots} {verdict} (PREDICTION, meta-device trace)")


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
        self.pack = config.pack_slots
        if not isinstance(self.pack, int) or self.pack < 1 or slots.virtual % self.pack:
            raise ValueError(f"pack_slots={self.pack!r}: expected a divisor of the {slots.virtual} slot(s) this process "
                             "trains per micro-batch (resolve 'auto' with slots_per_pass first)")
        if self.pack > 1 and not supports_packing(compute_loss):
            raise TypeError(f"pack_slots={self.pack} needs compute_loss.prepare and compute_loss.forward_packed")
        if engine.cfg.grad_accum_steps != config.grad_accum_steps * slots.virtual // self.pack:
            raise ValueError(f"the engine accumulates {engine.cfg.grad_accum_steps} backward passes per step, expected "
                             f"grad_accum_steps ({config.grad_accum_steps}) x slots per process ({slots.virtual}) / "
                             f"slots per pass ({self.pack})")
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
        return self._checked(loss, stats)

    @staticmethod
    def _checked(loss: Any, stats: Any) -> tuple[torch.Tensor, Optional[float], dict[str, Any]]:
        """``compute_loss``'s (loss, stats) checked: the loss, the token count (a host number or None) and the other
        stats (tensors not read yet)."""
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
        (the engine accumulates ``grad_accum_steps * slots / pack`` backward passes), which is the update of one
        process per slot. The logged loss is the mean over every slot of the run.

        **Packing** (``config.pack_slots`` = ``pack`` > 1): the slots run ``pack`` at a time, as one forward and
        one backward over all their columns (bigger kernels; see :meth:`_packed`). The losses, the gradient and
        the random streams are those of one slot at a time, and every slot's loss is still recorded on its own.

        **Host syncs**: the losses, token counts, stats and gradient norm stay on the device until the step's
        end, where one all-reduce and one device-to-host copy read them all (the forward and backward of every
        micro-batch are queued without waiting). Only ``skip_loss_threshold`` adds one sync per micro-batch. A
        non-finite loss therefore stops the run at the end of its step, before any checkpoint of that step.
        """
        cfg, engine, ga, counters = self.config, self.engine, self.config.grad_accum_steps, self.counters
        per_pass = [(i, lane.group, p) for i, lane in enumerate(self.slots.lanes) for p in lane.positions]
        packs = [per_pass[i:i + self.pack] for i in range(0, len(per_pass), self.pack)]
        passes = ga * len(per_pass)  # slot passes: what the logged loss and the stats average over
        t0 = time.perf_counter()
        lr = self.schedule(step)
        engine.set_lr(lr)
        losses: list[torch.Tensor] = []   # per slot pass, local
        tokens_local, has_tokens, kept, outcome = 0.0, False, 0, None
        stats: dict[str, Any] = {}

        def record(loss: torch.Tensor, tokens: Optional[float], micro_stats: dict[str, Any]) -> None:
            nonlocal tokens_local, has_tokens
            losses.append(loss.detach().double().reshape(()))
            if tokens is not None:
                tokens_local, has_tokens = tokens_local + tokens, True
            for name, value in micro_stats.items():
                stats[name] = stats.get(name, 0.0) + value / passes

        for k in range(ga):
            batches = [to_device(b, engine.device, non_blocking=engine.device.type == "cuda")  # pinned by the loader
                       for b in self._next_batch(step)]
            for j, pack in enumerate(packs):
                last = k == ga - 1 and j == len(packs) - 1
                if len(pack) > 1:
                    with engine.accumulate():
                        results = self._packed(batches, pack, step, k)
                        for loss, tokens, micro_stats in results:
                            record(loss, tokens, micro_stats)
                        # The mean of the pack's losses, scaled by 1/passes-per-step by the engine: each slot's
                        # loss enters the gradient with the weight it has when it is a pass of its own.
                        engine.backward(torch.stack([loss for loss, _, _ in results]).mean())
                        kept += len(pack)
                        if last:
                            outcome = engine.step()
                    continue
                lane, group, position = pack[0]
                with engine.accumulate(), self.streams.use(self.slots.slot(group, position)):
                    loss, tokens, micro_stats = self._forward(batches[lane], step, k, group, position)
                    record(loss, tokens, micro_stats)
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

    def _packed(self, batches: list[Any], pack: list[tuple[int, int, int]], step: int, k: int
                ) -> list[tuple[torch.Tensor, Optional[float], dict[str, Any]]]:
        """The slots of ``pack`` as one forward: each slot's random draws made by ``compute_loss.prepare`` on that
        slot's own stream (so every stream advances exactly as when the slot runs alone), then one
        ``compute_loss.forward_packed`` over all of them, which returns each slot's (loss, stats).

        The forward and backward run on no slot's stream: they must draw nothing (LoRA dropout would; the
        trainer's flags refuse packing with it), or the slots' draws would depend on the packing."""
        prepared, contexts = [], []
        for lane, group, position in pack:
            ctx = self._context(step, k, group, position)
            with self.streams.use(self.slots.slot(group, position)):
                prepared.append(self.compute_loss.prepare(self.engine.model, batches[lane], ctx))
            contexts.append(ctx)
        results = self.compute_loss.forward_packed(self.engine.model, prepared, contexts)
        if len(results) != len(pack):
            raise TypeError(f"compute_loss.forward_packed returned {len(results)} results for {len(pack)} slots")
        return [self._checked(loss, stats) for loss, stats in results]

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
