"""Piecewise flow-matching Euler scheduler for Pyramid Flow.

Pyramid Flow splits the flow from pure noise (sigma = 1) to data (sigma = 0) into ``stages`` pieces, one per
spatial resolution, lowest resolution first. Stage ``k`` runs its own complete 0..1 flow between a start point
and an end point:

* end point of stage ``k`` (not the last): ``end_sigma * noise + (1 - end_sigma) * x_k``;
* start point of stage ``k > 0``: the previous stage's end point upsampled 2x (nearest) and *re-noised* with
  correlated 2x2 block noise (correlation ``-gamma``) so that it again looks like an isotropic noisy latent.
  Re-noising shrinks the signal weight ``s = 1 - ori_start_sigma`` by
  ``alpha = 1 / (sqrt(1 + 1/gamma) * (1 - s) + s)``, so the stage's effective start sigma is
  ``1 - alpha * s``; that corrected value is ``start_sigmas[k]`` (the uncorrected one is
  ``ori_start_sigmas[k]``).

Within a stage the interpolation ratio runs linearly from 1 to 0 (``sigmas_per_stage``), and the DiT is told
a timestep on the global 0..1000 scale (``timesteps_per_stage``): each stage gets a share of the global
timestep range proportional to the flow length ``start_sigma - end_sigma`` it covers (``timestep_ratios``).

Every table reproduces the reference implementation (jy0205/Pyramid-Flow) value for value, including its
dtypes: the global tables and ``timesteps_per_stage`` are float32 (the latter built with float32 ``linspace``
arithmetic), ``sigmas_per_stage`` and the inference tables of :meth:`set_timesteps` are float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


@dataclass
class FlowMatchEulerDiscreteSchedulerOutput(BaseOutput):
    """Output of :meth:`PyramidFlowMatchEulerDiscreteScheduler.step`.

    Args:
        prev_sample: the sample after one Euler step, in ``model_output``'s dtype.
    """

    prev_sample: torch.Tensor


def _linspace_float32(start: float, stop: float, num: int) -> np.ndarray:
    """``numpy.linspace`` evaluated in float32, whatever numpy's scalar promotion rules are.

    The reference calls ``np.linspace`` on two float32 scalars, which NumPy >= 2 evaluates in float32. Spelling
    out numpy's own recipe (float32 step, ``arange * step + start``, exact last point) gives the same bits on
    NumPy 1.x too, where that call would silently be evaluated in float64.
    """
    if num < 2:
        raise ValueError(f"_linspace_float32 needs at least 2 points, got {num}")
    start32, stop32 = np.float32(start), np.float32(stop)
    step = (stop32 - start32) / np.float32(num - 1)
    points = np.arange(num, dtype=np.float32) * step
    points += start32
    points[-1] = stop32
    return points


class PyramidFlowMatchEulerDiscreteScheduler(SchedulerMixin, ConfigMixin):
    """Euler sampler and training tables for piecewise (pyramidal) flow matching.

    Args:
        num_train_timesteps: resolution of the training tables (and the global timestep scale, 0..N).
        shift: SD3-style timestep shift of the global sigma table; > 1 spends more of it at high noise.
        stages: number of pyramid stages (resolutions).
        stage_range: ``stages + 1`` increasing fractions of the global table, from 0 to 1; stage ``k`` covers
            global indices ``[stage_range[k], stage_range[k+1]) * num_train_timesteps``.
        gamma: correlation strength of the re-noising block noise used at each stage jump (see module doc).

    Attributes (per stage ``k``, plain Python lists indexed by stage):
        start_sigmas, end_sigmas, ori_start_sigmas: floats described in the module docstring.
        timestep_ratios: ``(start, end)`` fraction of the global timestep range given to the stage.
        timesteps_per_stage: float32 ``[N]`` training timesteps (global scale) of the stage, high to low.
        sigmas_per_stage: float64 ``[N]`` interpolation ratios ``1, 1 - 1/N, ..., 1/N``.
        timesteps, sigmas: the global float32 tables after construction; the stage's inference schedule
            after :meth:`set_timesteps` (float64, ``sigmas`` with a trailing 0).
    """

    _compatibles: List[str] = []
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        stages: int = 3,
        stage_range: Sequence[float] = (0, 1 / 3, 2 / 3, 1),
        gamma: float = 1 / 3,
    ):
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0 (it divides the re-noising correction), got {gamma}")
        stage_range = list(stage_range)
        if len(stage_range) != stages + 1:
            raise ValueError(f"stage_range needs stages + 1 = {stages + 1} entries, got {stage_range}")
        if stage_range[0] != 0 or stage_range[-1] != 1 or any(a >= b for a, b in zip(stage_range, stage_range[1:])):
            raise ValueError(f"stage_range must increase strictly from 0 to 1, got {stage_range}")

        self.gamma = gamma
        self._init_global_tables()
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()
        self._init_stage_tables()

    # ------------------------------------------------------------------ tables
    def _init_global_tables(self) -> None:
        """Global float32 tables: timesteps N..1 and their (shifted) sigmas; resets the step counter."""
        n = self.config.num_train_timesteps
        shift = self.config.shift
        timesteps = torch.arange(n, 0, -1, dtype=torch.float32)
        sigmas = timesteps / n
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = sigmas * n
        self.sigmas = sigmas
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None

    def _init_stage_tables(self) -> None:
        n = self.config.num_train_timesteps
        gamma = self.config.gamma
        stage_range = self.config.stage_range

        self.start_sigmas: List[float] = []
        self.end_sigmas: List[float] = []
        self.ori_start_sigmas: List[float] = []
        for k in range(self.config.stages):
            start_index = max(int(stage_range[k] * n), 0)
            end_index = min(int(stage_range[k + 1] * n), n)
            start_sigma = self.sigmas[start_index].item()
            end_sigma = self.sigmas[end_index].item() if end_index < n else 0.0
            self.ori_start_sigmas.append(start_sigma)
            if k > 0:
                signal = 1 - start_sigma
                alpha = 1 / (math.sqrt(1 + (1 / gamma)) * (1 - signal) + signal)
                start_sigma = 1 - alpha * signal
            self.start_sigmas.append(start_sigma)
            self.end_sigmas.append(end_sigma)

        # Each stage's share of the global timestep range is proportional to the flow length it covers.
        lengths = [s - e for s, e in zip(self.start_sigmas, self.end_sigmas)]
        total = sum(lengths)
        last = self.config.stages - 1
        self.timestep_ratios: List[Tuple[float, float]] = [
            (0.0 if k == 0 else sum(lengths[:k]) / total, 1.0 if k == last else sum(lengths[: k + 1]) / total)
            for k in range(self.config.stages)
        ]

        self.timesteps_per_stage: List[torch.Tensor] = []
        self.sigmas_per_stage: List[torch.Tensor] = []
        stage_sigmas = torch.from_numpy(np.linspace(1.0, 0.0, n + 1)[:-1])
        for ratio_start, ratio_end in self.timestep_ratios:
            t_max = self.timesteps[int(ratio_start * n)].item()
            t_min = self.timesteps[min(int(ratio_end * n), n - 1)].item()
            self.timesteps_per_stage.append(torch.from_numpy(_linspace_float32(t_max, t_min, n + 1)[:-1]))
            self.sigmas_per_stage.append(stage_sigmas.clone())

    # --------------------------------------------------------------- inference
    @property
    def step_index(self) -> Optional[int]:
        """Index of the next :meth:`step` into ``sigmas``; ``None`` before the first step."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """First step index, if a pipeline set one with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def set_timesteps(
        self, num_inference_steps: int, stage_index: int, device: Union[str, torch.device, None] = None
    ) -> None:
        """Prepare ``num_inference_steps`` Euler steps across stage ``stage_index``.

        Sets ``timesteps`` (float64, the stage's training timestep range evenly divided) and ``sigmas`` (float64,
        the stage's ratios 1 .. 1/N evenly divided, then a final 0), and resets the step counter.
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not 0 <= stage_index < self.config.stages:
            raise ValueError(f"stage_index must be in [0, {self.config.stages}), got {stage_index}")
        self.num_inference_steps = num_inference_steps
        self._init_global_tables()

        stage_timesteps = self.timesteps_per_stage[stage_index]
        timesteps = np.linspace(stage_timesteps[0].item(), stage_timesteps[-1].item(), num_inference_steps)
        self.timesteps = torch.from_numpy(timesteps).to(device=device)

        stage_sigmas = self.sigmas_per_stage[stage_index]
        sigmas = np.linspace(stage_sigmas[0].item(), stage_sigmas[-1].item(), num_inference_steps)
        sigmas = torch.from_numpy(sigmas).to(device=device)
        self.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype, device=sigmas.device)])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[FlowMatchEulerDiscreteSchedulerOutput, Tuple[torch.Tensor]]:
        """One Euler step ``sample + (sigma_next - sigma) * model_output`` along the current stage.

        ``model_output`` is the predicted velocity (noise minus data direction). The step index advances by one
        per call; ``timestep`` is only checked for type (the schedule is followed in order), and ``generator``
        is accepted for diffusers pipeline compatibility (the Euler step is deterministic).
        """
        if isinstance(timestep, int) or (
            isinstance(timestep, torch.Tensor) and not torch.is_floating_point(timestep)
        ):
            raise ValueError(
                "step() got an integer timestep (e.g. a loop index from enumerate(timesteps)); pass the value "
                "taken from scheduler.timesteps instead."
            )
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else 0
        if self._step_index + 1 >= len(self.sigmas):
            raise IndexError(
                f"step() called {self._step_index + 1} times but set_timesteps prepared only "
                f"{len(self.sigmas) - 1} steps; call set_timesteps again for the next stage."
            )

        # Upcast for the update; the sigma difference stays a float64 scalar, the result is cast back.
        sample = sample.to(torch.float32)
        sigma = self.sigmas[self._step_index]
        sigma_next = self.sigmas[self._step_index + 1]
        prev_sample = (sample + (sigma_next - sigma) * model_output).to(model_output.dtype)
        self._step_index += 1

        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
