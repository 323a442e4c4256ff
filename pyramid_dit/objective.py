"""The Pyramid Flow training objective: DiT inputs and targets for one step, and the loss.

One batch is split into *columns* (``sample_ratios`` of them per stage, row ``r`` in column ``r % columns``);
every column trains one pyramid stage. For a column at stage ``k`` with clean latent ``x_k`` (the latent
bilinearly halved ``S - 1 - k`` times) and one shared noise draw ``n`` (halved the same way, rescaled to unit
variance):

* start point: ``n_0`` at stage 0, else ``s_k * n_k + (1 - s_k) * up(x_{k-1})`` (``s_k`` = corrected start
  sigma, ``up`` = nearest 2x);
* end point: ``x_k`` at the last stage, else ``e_k * n_k + (1 - e_k) * x_k``;
* a per-row ratio ``r`` from the scheduler's float64 table gives the DiT input ``r * start + (1 - r) * end``
  (computed in float64, cast to the latent dtype) and the target velocity ``start - end``.

Two ways to train with it, sharing that one routine (:meth:`PyramidFlowObjective._noise_column`, whose arithmetic is
:meth:`PyramidFlowObjective._flow_pair`):

* full sequence (``use_temporal_pyramid=False``): every frame of the column is noised and trained at once;
* autoregressive temporal pyramid (``use_temporal_pyramid=True``): the column trains a single unit (a group of
  ``frame_per_unit`` latent frames) conditioned on the units before it, which are shown clean but slightly
  corrupted (noise level uniform in ``[0, corrupt_ratio)``) and at decreasing resolution the older they are.
  Which unit a rank trains is decided by its position in its ``video_sync_group`` and the step counter.

and one way to evaluate with it (:meth:`PyramidFlowObjective.eval_columns`): one clip at fixed grid points (every
stage, fixed timestep-table indices, for AR a fixed history depth), through the same ``_flow_pair`` arithmetic and
history construction, with every draw from a caller's seeded ``torch.Generator`` instead of the global streams
below (the held-out loss, ``trainer_misc.loop.pyramid_eval``).

Random draws, all from torch's global generators, in this order (identical to the reference implementation
jy0205/Pyramid-Flow, so the same seed gives the same batch):

1. text dropout (:meth:`~PyramidFlowObjective.sample_text_dropout`, called by the training loss
   ``trainer_misc.loop.pyramid_loss.PyramidFlowLoss`` before it calls :meth:`~PyramidFlowObjective.noise_latents`):
   ``torch.rand(batch)`` on the CPU, a row is dropped when its draw is ``<= text_drop_rate``;
2. ``torch.randn_like(latents)``: the noise, on the latents' device;
3. per column, lowest stage first: ``torch.rand(rows)`` on the CPU (timestep index), then
   ``torch.rand(rows)`` on the latents' device (history corruption level; drawn in both modes), then in AR
   mode one ``torch.randn_like`` per condition clip, newest first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch

from pyramid_dit.kinds import MODEL_NAMES, get_kind
from pyramid_dit.packing import to_device_async
from pyramid_dit.pyramid import (
    column_stages,
    history_plan,
    noise_pyramid,
    num_units,
    sample_stage_length,
    spatial_pyramid,
    unit_frames,
    upsample_nearest,
)
from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler
from pyramid_dit.text_features import FIELDS as TEXT_FIELDS
from pyramid_dit.text_features import TextFeatures, prefix_lengths


@dataclass
class PyramidTrainingBatch:
    """Everything one training step feeds the DiT, plus the targets.

    Attributes:
        sample: one list of clips per column, oldest clip first, the clip being trained last.
        timestep_ratio: ``[B]`` timesteps on the 0..1000 scale; row ``r`` belongs to column ``r % columns``.
        targets: per column, the flow-matching velocity for the column's last clip.
        text: text features (after dropout, if any), rows in batch order, which is the DiT's row order too.
        text_dropped: ``[B]`` bool, rows whose caption was replaced by the empty prompt (None if no dropout).
        units_per_stage: AR mode only: units ``[low, ..., high]`` trained this step.
    """

    sample: List[List[torch.Tensor]]
    timestep_ratio: torch.Tensor
    targets: List[torch.Tensor]
    text: Optional[TextFeatures] = None
    text_dropped: Optional[torch.Tensor] = None
    units_per_stage: Optional[List[int]] = None

    def dit_inputs(self) -> Dict[str, Any]:
        """Keyword arguments for the DiT forward: ``preds = dit(**batch.dit_inputs())``."""
        if self.text is None:
            raise ValueError("this batch has no text yet: set batch.text (see trainer_misc.loop.pyramid_loss)")
        return {"sample": self.sample, "timestep_ratio": self.timestep_ratio, **self.text.dit_kwargs(),
                **self.text.dit_text_lengths()}

    @staticmethod
    def cat(batches: Sequence["PyramidTrainingBatch"]) -> "PyramidTrainingBatch":
        """One batch holding the columns of ``batches``, in order: one DiT call for several training slots.

        Why: a process that trains several slots of a virtual sync group would otherwise run one small forward
        and backward per slot; one call over all their columns runs the same arithmetic in bigger kernels. The
        DiT never mixes columns (attention, modulation, text trimming and positions are per column), so each
        column gets the prediction it gets alone, and the first ``len(batches[0].sample)`` predictions are the
        first batch's, and so on.

        The per-row inputs are re-interleaved for the DiT's rule (row ``r`` belongs to column ``r % columns``,
        i.e. rows are ``[rows_per_column, columns]``): every batch's rows are viewed that way, joined on the
        column axis and flattened. Every batch needs as many rows per column and the same text length.
        ``units_per_stage`` is per slot and not merged (None). One batch is returned as it is.
        """
        if not batches:
            raise ValueError("PyramidTrainingBatch.cat needs at least one batch")
        if len(batches) == 1:
            return batches[0]
        if any(b.text is None for b in batches):
            raise ValueError("set .text on every batch before merging (see trainer_misc.loop.pyramid_loss)")
        counts = [len(b.sample) for b in batches]
        rows = {b.timestep_ratio.shape[0] // n for b, n in zip(batches, counts)}
        if len(rows) != 1 or any(b.timestep_ratio.shape[0] % n for b, n in zip(batches, counts)):
            raise ValueError(f"batches with {[b.timestep_ratio.shape[0] for b in batches]} rows over {counts} "
                             "columns: every batch needs the same number of rows per column to share one DiT call")
        per_column = rows.pop()

        def interleave(parts: Sequence[torch.Tensor]) -> torch.Tensor:
            """Rows ``[per_column * n_i, ...]`` of each part -> rows of the joined columns, column-minor."""
            views = [p.reshape(per_column, n, *p.shape[1:]) for p, n in zip(parts, counts)]
            joined = torch.cat(views, dim=1)
            return joined.reshape(-1, *joined.shape[2:])

        texts = [b.text for b in batches]
        lengths = None
        if all(t.host_lengths is not None for t in texts):
            lengths = tuple(v for r in range(per_column) for t, n in zip(texts, counts)
                            for v in t.host_lengths[r * n:(r + 1) * n])
        text = TextFeatures(*(interleave(fields) for fields in zip(*texts)), lengths)
        dropped = None
        if all(b.text_dropped is not None for b in batches):
            dropped = interleave([b.text_dropped for b in batches])
        return PyramidTrainingBatch(
            sample=[col for b in batches for col in b.sample],
            timestep_ratio=interleave([b.timestep_ratio for b in batches]),
            targets=[t for b in batches for t in b.targets],
            text=text, text_dropped=dropped, units_per_stage=None,
        )


def flow_matching_loss(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over all rows (of every column, equally weighted) of each row's mean squared error, in float32."""
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions for {len(targets)} target columns")
    per_row = []
    for column, (pred, target) in enumerate(zip(preds, targets)):
        if pred.shape != target.shape:
            raise ValueError(f"column {column}: prediction {tuple(pred.shape)} vs target {tuple(target.shape)}")
        squared = (pred.float() - target.float()) ** 2
        per_row.append(squared.reshape(target.shape[0], -1).mean(dim=1))
    return torch.cat(per_row).mean()


class _NoisedColumn(NamedTuple):
    noisy: torch.Tensor  # DiT input for the trained frames, latent dtype
    target: torch.Tensor  # start - end
    timestep: torch.Tensor  # [rows], latent dtype
    corrupt_sigma: torch.Tensor  # [rows], float32, history corruption level


class PyramidFlowObjective:
    """Builds the DiT inputs and targets of a training step, and the loss.

    Args:
        scheduler: gives the per-stage start/end sigmas and training tables (its ``stages`` must equal
            ``len(stages)``).
        model_name: ``"pyramid_flux"`` or ``"pyramid_mmdit"``; selects the latent normalisation.
        stages: spatial scale of each stage relative to the lowest, ``[1, 2, 4, ...]`` (each stage doubles).
        sample_ratios: columns per stage in a batch; the batch must be a multiple of ``sum(sample_ratios)``.
        corrupt_ratio: upper bound of the noise level mixed into AR history clips.
        frame_per_unit: latent frames per AR unit (the first frame is always a unit of its own).
        max_temporal_length: latent frames of a training clip (AR unit positions are cycled over these).
        video_sync_group: ranks that receive the same video in AR training.
        text_drop_rate: probability that a caption is replaced by the empty prompt (classifier-free guidance).
        null_text: empty-prompt features (``[L, D]`` or ``[1, L, D]``, ``[L]`` or ``[1, L]``, ``[P]`` or
            ``[1, P]``); required by :meth:`drop_text` when ``text_drop_rate > 0``.
    """

    def __init__(
        self,
        scheduler: PyramidFlowMatchEulerDiscreteScheduler,
        model_name: str,
        *,
        stages: Sequence[int] = (1, 2, 4),
        sample_ratios: Sequence[int] = (1, 2, 1),
        corrupt_ratio: float = 1 / 3,
        frame_per_unit: int = 1,
        max_temporal_length: int = 16,
        video_sync_group: int = 8,
        text_drop_rate: float = 0.1,
        null_text: Optional[TextFeatures] = None,
    ):
        if model_name not in MODEL_NAMES:
            raise ValueError(f"unknown model_name {model_name!r}; expected one of {MODEL_NAMES}")
        if list(stages) != [2**k for k in range(len(stages))]:
            raise ValueError(f"stages must be [1, 2, 4, ...] (each stage doubles the resolution), got {stages}")
        if scheduler.config.stages != len(stages):
            raise ValueError(f"scheduler has {scheduler.config.stages} stages but stages={list(stages)}")
        if len(sample_ratios) != len(stages):
            raise ValueError(f"sample_ratios {list(sample_ratios)} needs one entry per stage ({len(stages)})")
        if not 0 <= corrupt_ratio <= 1:
            raise ValueError(f"corrupt_ratio must be in [0, 1], got {corrupt_ratio}")
        if frame_per_unit < 1 or (max_temporal_length - 1) % frame_per_unit:
            raise ValueError(
                f"max_temporal_length - 1 ({max_temporal_length - 1}) must be a multiple of frame_per_unit "
                f"({frame_per_unit} >= 1): a clip is one first frame plus whole units"
            )
        if video_sync_group < 1:
            raise ValueError(f"video_sync_group must be >= 1, got {video_sync_group}")
        if not 0 <= text_drop_rate <= 1:
            raise ValueError(f"text_drop_rate must be in [0, 1], got {text_drop_rate}")

        self.scheduler = scheduler
        self.model_name = model_name
        self.normalization = get_kind(model_name).normalization
        self.num_stages = len(stages)
        self.sample_ratios = [int(r) for r in sample_ratios]
        self.column_stages = column_stages(self.sample_ratios)
        self.corrupt_ratio = corrupt_ratio
        self.frame_per_unit = frame_per_unit
        self.max_temporal_length = max_temporal_length
        self.video_sync_group = video_sync_group
        self.text_drop_rate = text_drop_rate
        self.null_text = _squeeze_null_text(null_text) if null_text is not None else None
        self._null_text_device: Optional[TextFeatures] = None
        # The empty prompt's valid tokens, read once here (not in a step): dropped rows keep the batch's lengths
        # known on the host (TextFeatures.host_lengths), so the DiT can trim text without reading the device.
        self._null_length: Optional[int] = None
        if self.null_text is not None:
            lengths = prefix_lengths(self.null_text.prompt_attention_mask.detach().to("cpu")[None])
            self._null_length = None if lengths is None else lengths[0]

    # ------------------------------------------------------------------------------------------ public API
    def sample_text_dropout(self, batch: int) -> torch.Tensor:
        """``[B]`` bool: which captions to replace by the empty prompt.

        Always draws one CPU ``torch.rand(B)`` (a row is dropped when its draw is ``<= text_drop_rate``), even at
        rate 0, so the noise draws that follow do not depend on the rate. When captions are encoded during
        training, blank the dropped ones (``""``) before encoding; with pre-extracted features use
        :meth:`drop_text`.
        """
        draws = torch.rand((batch,))
        if self.text_drop_rate == 0:
            return torch.zeros(batch, dtype=torch.bool)
        return draws <= self.text_drop_rate

    def drop_text(self, text: TextFeatures) -> tuple[TextFeatures, torch.Tensor]:
        """Replace the rows chosen by :meth:`sample_text_dropout` by ``null_text``.

        Returns the new features (the inputs are not modified) and the ``[B]`` bool mask of dropped rows.
        """
        dropped = self.sample_text_dropout(text.prompt_embeds.shape[0])
        if self.text_drop_rate == 0:
            return text, dropped
        if self.null_text is None:
            raise ValueError("text_drop_rate > 0 needs null_text (the empty prompt's features) at construction")
        replaced = []
        device = text.prompt_embeds.device
        keep_empty = to_device_async(dropped, device)  # drawn on the host: copied without stalling it
        for name, rows, empty in zip(TEXT_FIELDS, text, self._null_text_on(device)):
            if empty.shape != rows.shape[1:]:
                raise ValueError(
                    f"null_text.{name} has shape {tuple(empty.shape)} but one row of the batch's {name} is "
                    f"{tuple(rows.shape[1:])}; extract the empty prompt with the same text length and width"
                )
            replaced.append(torch.where(keep_empty.view(-1, *[1] * empty.ndim), empty.to(rows.dtype), rows))
        lengths = None
        if text.host_lengths is not None and self._null_length is not None:
            lengths = tuple(self._null_length if d else n for d, n in zip(dropped.tolist(), text.host_lengths))
        return TextFeatures(*replaced, lengths), dropped

    def _null_text_on(self, device: torch.device) -> TextFeatures:
        """``null_text`` on ``device``, copied there once (not at every step)."""
        if self._null_text_device is None or self._null_text_device.prompt_embeds.device != device:
            self._null_text_device = TextFeatures(*(to_device_async(t, device) for t in self.null_text))
        return self._null_text_device

    @torch.no_grad()
    def noise_latents(
        self, latents: torch.Tensor, *, use_temporal_pyramid: bool, rank: int = 0, step: int = 0
    ) -> PyramidTrainingBatch:
        """Normalise, build the pyramids, noise every column; the caller sets ``.text`` (after :meth:`drop_text`)."""
        latents = self.normalization.normalize(latents)
        batch, frames = latents.shape[0], latents.shape[2]
        columns = len(self.column_stages)
        if batch % columns:
            raise ValueError(
                f"batch size {batch} is not a multiple of sum(sample_ratios) = {columns} "
                f"(sample_ratios {self.sample_ratios}); every column needs the same number of rows"
            )
        pyramid = spatial_pyramid(latents, self.num_stages)
        noises = noise_pyramid(torch.randn_like(latents), self.num_stages)

        if not use_temporal_pyramid:
            noised = [self._noise_column(pyramid, noises, c, s, slice(None)) for c, s in enumerate(self.column_stages)]
            sample = [[col.noisy] for col in noised]
            units = None
        else:
            max_units = num_units(frames, self.frame_per_unit)
            units = self.units_per_stage(rank=rank, step=step, max_units=max_units)
            noised, sample = [], []
            for column, stage in enumerate(self.column_stages):
                n = units[stage]
                trained = unit_frames(n - 1, n, self.frame_per_unit)
                col = self._noise_column(pyramid, noises, column, stage, trained)
                rows = slice(column, None, len(self.column_stages))
                history = self._corrupted_history(pyramid, rows, stage, n, col.corrupt_sigma)
                noised.append(col)
                sample.append(history[::-1] + [col.noisy])

        timestep_ratio = torch.stack([col.timestep for col in noised], dim=1).reshape(-1)
        return PyramidTrainingBatch(
            sample=sample, timestep_ratio=timestep_ratio, targets=[col.target for col in noised],
            units_per_stage=units,
        )

    def units_per_stage(self, *, rank: int, step: int, max_units: Optional[int] = None) -> List[int]:
        """AR units ``[low, ..., high]`` this rank trains at ``step`` (see :func:`pyramid.sample_stage_length`)."""
        return sample_stage_length(
            num_stages=self.num_stages, step=step, rank=rank, max_temporal_length=self.max_temporal_length,
            frame_per_unit=self.frame_per_unit, video_sync_group=self.video_sync_group, max_units=max_units,
        )

    def loss(self, preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        """See :func:`flow_matching_loss`."""
        return flow_matching_loss(preds, targets)

    # ------------------------------------------------------------------------------------------- evaluation
    def timestep_grid(self, count: int) -> List[int]:
        """``count`` fixed indices into every stage's training table: the midpoints of ``count`` equal bins of the
        uniform draw :meth:`_noise_column` makes, so their mean is a midpoint-rule estimate of the expected loss
        over timesteps."""
        steps = self.scheduler.config.num_train_timesteps
        if not 1 <= count <= steps:
            raise ValueError(f"timestep grid size must be in [1, {steps}], got {count}")
        return [min(int((j + 0.5) * steps / count), steps - 1) for j in range(count)]

    def history_grid(self, count: int, frames: int) -> List[int]:
        """``count`` fixed AR unit counts ``n`` (the column trains unit ``n - 1`` after ``n - 1`` history units),
        midpoints of ``count`` equal bins of ``1 .. units`` (units of a ``frames``-frame clip); fewer when the clip
        has fewer units than ``count`` (duplicates dropped)."""
        units = num_units(frames, self.frame_per_unit)
        if count < 1:
            raise ValueError(f"history grid size must be >= 1, got {count}")
        return sorted({min(1 + int((d + 0.5) * units / count), units) for d in range(count)})

    @torch.no_grad()
    def eval_columns(
        self, latents: torch.Tensor, *, timestep_indices: Sequence[int], units: Optional[int],
        generator: torch.Generator,
    ) -> PyramidTrainingBatch:
        """One sample's DiT inputs and targets at fixed grid points, every draw from ``generator``.

        ``latents``: one raw clip ``[1, C, T, h, w]``. One column per stage (lowest first); the rows of every
        column are ``timestep_indices`` (indices into the stage's training table, see :meth:`timestep_grid`).
        ``units`` (AR): the column trains unit ``units - 1`` with the ``units - 1`` before it as corrupted
        history, exactly as :meth:`noise_latents` builds a training column; ``None``: the whole clip, as the
        full-sequence mode. The noisy input and target come from the same arithmetic as training
        (:meth:`_flow_pair`); only the draws differ: the noise (one ``randn`` of the clip's shape, then halved
        per stage as in training), the history corruption level (one ``rand`` per column, in
        ``[0, corrupt_ratio)``) and the history noise all come from ``generator`` (a CPU generator: the same
        numbers on any device), so the global random streams training draws from are never moved, and the
        same generator seed gives the same inputs on every run, resume and process count.
        """
        if latents.ndim != 5 or latents.shape[0] != 1:
            raise ValueError(f"eval_columns takes one clip [1, C, T, h, w], got shape {tuple(latents.shape)}")
        index = torch.as_tensor(list(timestep_indices), dtype=torch.long)
        if index.numel() == 0:
            raise ValueError("eval_columns needs at least one timestep index")
        latents = self.normalization.normalize(latents)
        pyramid = spatial_pyramid(latents, self.num_stages)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        noises = noise_pyramid(noise, self.num_stages)
        rows, every_row = index.numel(), slice(None)
        frames = slice(None) if units is None else unit_frames(units - 1, units, self.frame_per_unit)

        def draw_like(clean: torch.Tensor) -> torch.Tensor:
            return torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(clean.device)

        sample, targets, timesteps = [], [], []
        for stage in range(self.num_stages):
            noisy, target, timestep = self._flow_pair(pyramid, noises, every_row, stage, frames, index)
            column = [noisy]
            if units is not None:
                sigma = torch.rand((1,), generator=generator).to(latents.device) * self.corrupt_ratio
                history = self._corrupted_history(pyramid, every_row, stage, units, sigma, draw_like)
                column = [clip.expand(rows, *clip.shape[1:]) for clip in history[::-1]] + column
            sample.append(column)
            targets.append(target.expand(rows, *target.shape[1:]))
            timesteps.append(timestep)
        return PyramidTrainingBatch(
            sample=sample, timestep_ratio=torch.stack(timesteps, dim=1).reshape(-1), targets=targets,
            units_per_stage=None if units is None else [units] * self.num_stages,
        )

    # ------------------------------------------------------------------------------------------- internals
    def _noise_column(
        self,
        pyramid: List[torch.Tensor],
        noises: List[torch.Tensor],
        column: int,
        stage: int,
        frames: slice,
    ) -> _NoisedColumn:
        """Flow-matching pair, timestep draw and interpolation for one column's ``frames``.

        Draws, in order: the timestep index (CPU ``rand``), then the history corruption level (``rand`` on the
        latents' device; the full-sequence mode discards it but still draws it, like the reference).
        """
        rows = slice(column, None, len(self.column_stages))
        num_rows, device = pyramid[stage][rows].shape[0], pyramid[stage].device
        num_steps = self.scheduler.config.num_train_timesteps
        u = torch.rand(size=(num_rows,), device="cpu")
        index = (u * num_steps).long().clamp(0, num_steps - 1)
        noisy, target, timestep = self._flow_pair(pyramid, noises, rows, stage, frames, index)
        corrupt_sigma = torch.rand(size=(num_rows,), device=device) * self.corrupt_ratio
        return _NoisedColumn(noisy=noisy, target=target, timestep=timestep, corrupt_sigma=corrupt_sigma)

    def _flow_pair(
        self,
        pyramid: List[torch.Tensor],
        noises: List[torch.Tensor],
        rows: slice,
        stage: int,
        frames: slice,
        index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(noisy, target, timestep)`` of the ``rows`` at ``stage`` for the timestep-table ``index`` (one per
        row; a single clean row broadcasts over several indices): the one arithmetic of training and evaluation
        (draws none)."""
        noise = noises[stage][rows][:, :, frames]
        clean = pyramid[stage][rows][:, :, frames]
        dtype, device = clean.dtype, clean.device
        start_sigma = self.scheduler.start_sigmas[stage]
        end_sigma = self.scheduler.end_sigmas[stage]

        if stage == 0:
            start = noise
        else:
            previous = upsample_nearest(pyramid[stage - 1][rows][:, :, frames])
            start = start_sigma * noise + (1 - start_sigma) * previous
        if stage == self.num_stages - 1:
            end = clean
        else:
            end = end_sigma * noise + (1 - end_sigma) * clean

        # Looked up on the host (the scheduler's tables live there), then copied without making the host wait for
        # the device's queued work (a plain .to(device) would, once per column).
        timestep = to_device_async(self.scheduler.timesteps_per_stage[stage][index], device)
        ratio = to_device_async(self.scheduler.sigmas_per_stage[stage][index], device)  # float64
        ratio = ratio.view(-1, *[1] * (start.ndim - 1))
        noisy = (ratio * start + (1 - ratio) * end).to(dtype)
        return noisy, start - end, timestep.to(dtype)

    def _corrupted_history(
        self, pyramid: List[torch.Tensor], rows: slice, stage: int, units: int, corrupt_sigma: torch.Tensor,
        draw_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    ) -> List[torch.Tensor]:
        """Condition clips (newest first) for the ``rows`` of a column training unit ``units - 1``, each corrupted
        as ``sigma * eps + (1 - sigma) * clean`` with the row's ``sigma`` (one ``draw_like(clean)`` per clip:
        the global ``randn_like`` in training, a seeded generator in evaluation)."""
        sigma = corrupt_sigma.view(-1, 1, 1, 1, 1)
        clips = []
        for clip in history_plan(stage, units):
            # randn_like on this exact view (strides included) keeps the draws identical to the reference.
            clean = pyramid[clip.stage][rows][:, :, unit_frames(clip.first_unit, clip.end_unit, self.frame_per_unit)]
            corrupted = sigma * draw_like(clean) + (1 - sigma) * clean
            clips.append(corrupted.to(clean.dtype))
        return clips


def _squeeze_null_text(null_text: TextFeatures) -> TextFeatures:
    """Accept the empty prompt with or without a leading batch dimension of 1."""
    def one_row(t: torch.Tensor, ndim: int, name: str) -> torch.Tensor:
        if t.ndim == ndim + 1 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != ndim:
            raise ValueError(f"null_text.{name} must have {ndim} dims (one row), got shape {tuple(t.shape)}")
        return t

    return TextFeatures(
        one_row(null_text.prompt_embeds, 2, "prompt_embeds"),
        one_row(null_text.prompt_attention_mask, 1, "prompt_attention_mask"),
        one_row(null_text.pooled_prompt_embeds, 1, "pooled_prompt_embeds"),
    )
