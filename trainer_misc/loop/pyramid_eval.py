"""Pyramid Flow's held-out set (``trainer_misc.loop.evaluation.HeldOutSet``): the flow-matching loss of each
evaluation sample at a fixed grid of pyramid stages x timesteps (x AR history depths), with fixed noise.

The grid, per sample:

* every pyramid stage (the 3 spatial stages), one DiT column each;
* ``EVAL_TIMESTEPS`` indices into each stage's timestep table, the midpoints of equal bins of the uniform draw
  training makes (:meth:`PyramidFlowObjective.timestep_grid`), as the rows of every column;
* AR runs only: ``EVAL_HISTORY_DEPTHS`` unit counts (the column predicts unit ``n - 1`` after ``n - 1`` corrupted
  history units, :meth:`PyramidFlowObjective.history_grid`), one DiT call each; a full-sequence (or image) run
  predicts the whole clip in one call.

So a sample costs ``depths`` DiT forwards of ``stages x timesteps`` rows (``grid_points`` rows in all). The inputs
come from the objective the run trains (:meth:`PyramidFlowObjective.eval_columns`: the same flow-matching pair,
history construction and normalisation), with the caption's features (no dropout), in the parameters' dtype with
fp32 timesteps (``dit_inputs_in_dtype``). Every random number (the clip's noise, the history corruption level and
noise, an image's VAE posterior sample) comes from a CPU ``torch.Generator`` seeded by ``(seed, sample, depth)``, so
the figure is a function of the weights alone and the run's own random streams are never touched.

A sample's score is, per stage, the mean over its timesteps and depths of the per-row mean squared error; the total
weighs the stages like a training batch (``sample_ratios``, 1:2:1), so ``eval/loss`` estimates the same expectation
as ``train/loss`` without its sampling noise.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from pyramid_dit.objective import PyramidFlowObjective, flow_matching_loss
from pyramid_dit.text_features import TextFeatures
from trainer_misc.loop.evaluation import EvalContext
from trainer_misc.loop.pyramid_loss import dit_inputs_in_dtype

__all__ = ["PyramidHeldOutLoss", "sample_seed"]


VAE_STREAM = 0  # stream 0 of a sample: its VAE posterior sample (images); stream d + 1: history depth d


def sample_seed(seed: int, sample: int, stream: int) -> int:
    """The generator seed of one stream of one evaluation sample: a pure function of the three."""
    return int(np.random.default_rng([int(seed), int(sample), int(stream)]).integers(2**62))


@dataclass
class _Loaded:
    latents: torch.Tensor  # raw VAE latents [1, C, T, h, w], float32, CPU
    text: TextFeatures  # one row, float32, CPU
    path: str


class PyramidHeldOutLoss:
    """The held-out set of a Pyramid Flow run; see the module docstring.

    Args:
        objective: the run's objective (scheduler, stages, normalisation, AR settings).
        dataset: the evaluation samples (``VideoLatentDataset``, or ``ImageDataset`` with centre crops), in order.
        use_temporal_pyramid: AR (grid over history depths) or full sequence.
        timesteps: grid points per stage (``EVAL_TIMESTEPS``). history_depths: AR grid points (``EVAL_HISTORY_DEPTHS``).
        frames: latent frames of an evaluation clip (``NUM_FRAMES``; 1 for images).
        seed: the noise seed (the run's ``--seed``).
        vae: encodes image samples (t2i) once, with a seeded posterior sample. text_encoder: encodes captions once
            when the run has no extracted features.
    """

    def __init__(self, objective: PyramidFlowObjective, dataset: Dataset, *, use_temporal_pyramid: bool,
                 timesteps: int, history_depths: int, frames: int, seed: int, vae: Optional[nn.Module] = None,
                 text_encoder=None) -> None:
        self.objective, self.dataset, self.seed = objective, dataset, seed
        self.vae, self.text_encoder = vae, text_encoder
        self.parts = tuple(f"stage_{k}" for k in range(objective.num_stages))
        self.weights = tuple(float(r) for r in objective.sample_ratios)
        self.timestep_indices = objective.timestep_grid(timesteps)
        self.units: list[Optional[int]] = (list(objective.history_grid(history_depths, frames))
                                           if use_temporal_pyramid else [None])
        self._cache: dict[int, _Loaded] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def grid_points(self) -> int:
        """DiT rows per sample: stages x timesteps x depths."""
        return len(self.parts) * len(self.timestep_indices) * len(self.units)

    def describe(self) -> str:
        depths = (f" x {len(self.units)} history depth(s) (units {self.units})" if self.units != [None] else "")
        return (f"{len(self)} held-out sample(s) x {self.grid_points} grid points ({len(self.parts)} stages x "
                f"{len(self.timestep_indices)} timesteps (table indices {self.timestep_indices}){depths}) = "
                f"{len(self) * self.grid_points} DiT rows forward per evaluation, in {len(self.units)} call(s) of "
                f"{len(self.parts) * len(self.timestep_indices)} rows per sample")

    def fingerprint(self) -> str:
        paths = [str(e.latent if hasattr(e, "latent") else e.image) for e in getattr(self.dataset, "entries", [])]
        spec = {"paths": paths, "timesteps": self.timestep_indices, "units": self.units, "seed": self.seed,
                "model": self.objective.model_name, "stages": len(self.parts), "samples": len(self)}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------------------------------ loading

    def load(self, index: int, device: torch.device) -> Optional[tuple[str, str]]:
        """Read sample ``index`` (encode it when the run encodes on the fly) and keep it on the CPU."""
        if index in self._cache:
            return None
        item = self.dataset[index]
        if "bad" in item:
            return tuple(item["bad"])
        with torch.no_grad():
            if "latents" in item:
                latents = item["latents"][None].float()
            else:
                if self.vae is None:
                    raise ValueError("image evaluation samples need the VAE (the run encodes pixels on the fly)")
                generator = torch.Generator().manual_seed(sample_seed(self.seed, index, VAE_STREAM))
                pixels = item["pixels"][None].to(device=device, dtype=self.vae.dtype)
                latents = self.vae.encode(pixels).latent_dist.sample(generator=generator).float()
            if "text_features" in item:
                text = item["text_features"]
            elif self.text_encoder is not None:
                text = self.text_encoder.encode([item["text"]], device)
            else:
                raise ValueError("evaluation samples carry no text features and no text encoder runs in this "
                                 "training; extract text features (scripts/extract_text_feature.sh) or use "
                                 "--load_text_encoder")
        self._cache[index] = _Loaded(latents.cpu(), text.to(device="cpu", dtype=torch.float32), item["path"])
        return None

    # ------------------------------------------------------------------------------------------ scoring

    def score(self, model: nn.Module, index: int, ctx: EvalContext) -> torch.Tensor:
        """``[stages]`` float64: each stage's loss on sample ``index``, averaged over its timesteps and depths."""
        sample = self._cache[index]
        latents = sample.latents.to(ctx.device)
        rows = len(self.timestep_indices) * len(self.parts)
        text = sample.text.to(device=ctx.device).expand_rows(rows)
        total = torch.zeros(len(self.parts), dtype=torch.float64, device=ctx.device)
        for depth, units in enumerate(self.units):
            generator = torch.Generator().manual_seed(sample_seed(self.seed, index, depth + 1))
            inputs = self.objective.eval_columns(latents, timestep_indices=self.timestep_indices, units=units,
                                                 generator=generator)
            inputs.text = text
            preds = model(**dit_inputs_in_dtype(inputs.dit_inputs(), ctx.module, ctx.dtype))
            total += torch.stack([flow_matching_loss([p], [t]).double() for p, t in zip(preds, inputs.targets)])
        return total / len(self.units)
