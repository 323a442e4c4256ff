"""``compute_loss`` for Pyramid Flow: caption dropout -> VAE latents -> noise -> DiT -> flow-matching loss.

This is the one production path from a ``TrainBatch`` to a loss; the objective tests (tests/test_objective.py)
drive it as the trainer does. The random draws come in the reference's order: caption dropout, then the VAE
posterior sample (only when pixels are encoded during training), then the objective's noise (see
``pyramid_dit.objective``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from pyramid_dit.objective import PyramidFlowObjective, PyramidTrainingBatch
from pyramid_dit.text_features import TextFeatures
from trainer_misc.data.datasets import TrainBatch
from trainer_misc.loop.metrics import BatchTrace
from trainer_misc.loop.step import StepContext
from trainer_misc.loop.tree import cast_floats

__all__ = ["PreparedSlot", "PyramidFlowLoss", "dit_inputs_in_dtype"]


def dit_inputs_in_dtype(inputs: dict[str, Any], model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    """The DiT's keyword inputs with float tensors cast to ``dtype`` (the parameters' dtype: DeepSpeed bf16 needs
    it), except those the model lists in ``fp32_inputs``.

    Rule: an input the model embeds through sinusoids (the timestep) stays fp32. Rounded to bf16, timesteps near
    1000 move by up to 4 (999 -> 1000, 997 -> 996), so the model would train on other timesteps than the sampler
    (which keeps them fp32) uses; the embedding computes its sinusoids in fp32 itself.
    """
    keep = set(getattr(model, "fp32_inputs", ()))
    return {k: v if k in keep else cast_floats(v, dtype) for k, v in inputs.items()}


@dataclass
class PreparedSlot:
    """One slot's micro-batch after its random draws: the batch read, the DiT inputs and targets (text set), and
    the tokens the DiT will attend over (a host number, from shapes)."""

    batch: TrainBatch
    step: PyramidTrainingBatch
    tokens: int


class PyramidFlowLoss:
    """``compute_loss(model, batch, ctx) -> (loss, {"tokens": n})`` for ``trainer_misc.loop.trainer.train``.

    Args:
        objective: builds DiT inputs and targets (its ``null_text`` replaces dropped captions).
        use_temporal_pyramid: AR temporal-pyramid training (the unit trained follows ``ctx.sync_rank`` and
            ``ctx.micro_step``, the reference's per-call counter) or full-sequence training.
        vae: encodes ``batch.pixels`` when the batch carries pixels instead of latents (t2i, ``--load_vae``).
        text_encoder: encodes ``batch.captions`` (blanked when dropped) instead of pre-extracted features.
        trace: ``--trace_batches`` writer: one record per micro-batch (paths, units trained, loss).
        peak_bytes: ``slots -> bytes``, the planner's predicted device peak when each pass trains ``slots`` slots
            (``PACK_SLOTS=auto`` asks it, as ``packed_peak_bytes``).

    Besides the one-slot call it offers the step runner's packed protocol (``trainer_misc.loop.step``):
    :meth:`prepare` each slot on its own random stream, then :meth:`forward_packed` all of them in one DiT call.
    """

    def __init__(self, objective: PyramidFlowObjective, use_temporal_pyramid: bool, vae=None, text_encoder=None,
                 trace: Optional[BatchTrace] = None, peak_bytes: Optional[Callable[[int], int]] = None):
        self.objective = objective
        # The step runner's optional ``packed_peak_bytes(slots)`` (None: no prediction, PACK_SLOTS=auto packs nothing)
        self.packed_peak_bytes = peak_bytes
        self.use_temporal_pyramid = use_temporal_pyramid
        self.vae = vae
        self.text_encoder = text_encoder
        self.trace = trace

    def text(self, batch: TrainBatch, device: torch.device) -> TextFeatures:
        """The batch's caption features after caption dropout (draws one CPU ``rand(B)``)."""
        if self.text_encoder is not None:
            dropped = self.objective.sample_text_dropout(len(batch.captions))
            captions = ["" if d else c for c, d in zip(batch.captions, dropped.tolist())]
            return self.text_encoder.encode(captions, device).to(dtype=torch.float32)
        text, _ = self.objective.drop_text(batch.text_features)
        return text

    def latents(self, batch: TrainBatch) -> torch.Tensor:
        """Raw VAE latents, float32: the stored ones, or a posterior sample of the pixels' encoding."""
        if batch.latents is not None:
            return batch.latents.float()
        with torch.no_grad():
            return self.vae.encode(batch.pixels.to(self.vae.dtype)).latent_dist.sample().float()

    def prepare(self, model: torch.nn.Module, batch: TrainBatch, ctx: StepContext) -> PreparedSlot:
        """One slot's DiT inputs and targets: every random draw of its step (caption dropout, the VAE sample, the
        objective's noise), none of the DiT's work. Split from the forward so that a process training several
        slots can make each slot's draws on that slot's random stream and then run one forward for all of them
        (:meth:`forward_packed`)."""
        text = self.text(batch, ctx.device)
        latents = self.latents(batch)
        step = self.objective.noise_latents(latents, use_temporal_pyramid=self.use_temporal_pyramid,
                                            rank=ctx.sync_rank, step=ctx.micro_step)
        step.text = text
        # Tokens the DiT attended over: every row's text plus its clips' 2x2 patches.
        tokens = text.prompt_embeds.shape[0] * text.prompt_embeds.shape[1]
        tokens += sum(c.shape[0] * c.shape[2] * c.shape[3] * c.shape[4] // 4 for col in step.sample for c in col)
        return PreparedSlot(batch=batch, step=step, tokens=tokens)

    def forward_packed(self, model: torch.nn.Module, prepared: Sequence[PreparedSlot],
                       contexts: Sequence[StepContext]) -> list[tuple[torch.Tensor, dict]]:
        """One DiT forward over the columns of every prepared slot (``PyramidTrainingBatch.cat``), and each slot's
        loss from its own columns' predictions: the losses one forward per slot would give, so what is logged
        per slot stays per slot."""
        merged = PyramidTrainingBatch.cat([p.step for p in prepared])
        ctx = contexts[0]
        preds = model(**dit_inputs_in_dtype(merged.dit_inputs(), ctx.module, ctx.dtype))
        out, start = [], 0
        for slot, slot_ctx in zip(prepared, contexts):
            end = start + len(slot.step.sample)
            loss = self.objective.loss(preds[start:end], slot.step.targets)
            start = end
            self._trace(slot, slot_ctx, loss)
            out.append((loss, {"tokens": slot.tokens}))
        return out

    def _trace(self, slot: PreparedSlot, ctx: StepContext, loss: torch.Tensor) -> None:
        if self.trace is None:
            return
        sp = getattr(ctx.module, "sequence_parallel", None)
        self.trace.write({"step": ctx.step, "micro_step": ctx.micro_step, "rank": ctx.rank,
                          "sp_size": sp.size if sp is not None else 1, "sp_rank": sp.rank if sp is not None else 0,
                          "world_size": ctx.world_size, "sync_rank": ctx.sync_rank,
                          "sync_group_index": ctx.sync_group_index, "paths": slot.batch.paths,
                          "units_per_stage": slot.step.units_per_stage, "loss": float(loss.detach())})

    def __call__(self, model: torch.nn.Module, batch: TrainBatch, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """One slot: :meth:`prepare` then :meth:`forward_packed` of that slot alone."""
        return self.forward_packed(model, [self.prepare(model, batch, ctx)], [ctx])[0]
