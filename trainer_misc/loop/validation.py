"""Validation samples during training (``--validation_every``): rank 0 generates short clips of fixed prompts from
the current (EMA) weights into ``<output_dir>/samples/`` and tensorboard, while the other ranks wait.

Kept cheap because it runs on a training GPU: the sampling DiT and VAE are built once, in the run's dtype, and
only their weights are refreshed at each validation; the clips are short (few latent frames, few Euler steps);
``offload`` keeps both on the CPU between validations; the CUDA cache is emptied afterwards. The prompts come from
the extracted text features (or the training run's own text encoder), and the negative prompt is the extracted
empty-prompt features: no text encoder is ever loaded just for validation.

Samples use the sampler that matches what the run trains (``mode``): autoregressive for the temporal pyramid,
full-sequence (all latent frames jointly, no history) for training without it and for images; a sample from the
other loop would judge the weights on a task they are not learning.

**Before / after.** The loop calls the sampler once with step 0 and the base weights before the first step of a
fresh run: those samples go to ``samples/base/`` (same prompts, same seeds as every later validation), and their
frame strips to ``samples/base/strips.safetensors`` so a resumed run still has them. Every later validation also
writes ``samples/step-<step>/before_after_prompt<i>.png`` (the base strip above the current one) and logs the same
image to tensorboard as ``validation/before_after/prompt<i>``: a change in what the model draws is seen at a glance.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from pyramid_dit.text_features import TextFeatures

logger = logging.getLogger(__name__)

__all__ = ["BASE_FOLDER", "ValidationPrompt", "ValidationSampler", "frame_strip", "pick_validation_prompts"]


BASE_FOLDER = "base"  # samples/base/: the base weights' samples (step 0 of a fresh run)
STRIPS_FILE = "strips.safetensors"


def frame_strip(video: torch.Tensor) -> torch.Tensor:
    """``[3, F, H, W]`` (uint8, or float in [0, 1]) -> up to 8 of its frames side by side, ``[3, H, F' * W]``
    float in [0, 1]."""
    video = video.float() / 255 if video.dtype == torch.uint8 else video.float()
    strip = video[:, :: max(1, video.shape[1] // 8)]
    return strip.permute(0, 2, 1, 3).flatten(2)


def _save_png(image: torch.Tensor, path: Path) -> Path:
    """``[3, H, W]`` in [0, 1] as a PNG (atomically, through ``save_video``'s one-frame strip)."""
    from pyramid_dit.media import save_video
    return save_video(image[:, None], path)


@dataclass
class ValidationPrompt:
    caption: str
    features: TextFeatures  # one row


def pick_validation_prompts(dataset, count: int, text_encoder=None, device: Optional[torch.device] = None,
                            max_scanned: int = 1000) -> list[ValidationPrompt]:
    """The first ``count`` *readable* items' captions and features (unreadable items are skipped, not a reason to
    load a text encoder). ``text_encoder``: the training run's own encoder, used when items carry no features."""
    prompts: list[ValidationPrompt] = []
    for index in range(min(len(dataset), max_scanned)):
        if len(prompts) == count:
            break
        item = dataset[index]
        if "bad" in item:
            logger.warning("validation prompts: skipping unreadable item %s (%s)", *item["bad"])
            continue
        if "text_features" in item:
            features = item["text_features"]
        elif text_encoder is not None:
            with torch.no_grad():
                features = text_encoder.encode([item["text"]], device).to(device="cpu")
        else:
            raise ValueError("validation prompts: items carry no text features and no text encoder runs in this "
                             "training; extract text features (scripts/extract_text_feature.sh) or use "
                             "--load_text_encoder")
        prompts.append(ValidationPrompt(item.get("text", ""), features))
    if not prompts:
        raise ValueError(f"validation prompts: none of the first {min(len(dataset), max_scanned)} items is readable")
    return prompts


def _in_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    # Only when needed: diffusers warns on a model's .to(dtype); load the VAE with torch_dtype instead.
    return module if next(module.parameters()).dtype == dtype else module.to(dtype)


class ValidationSampler:
    """``validate(step, full_state_dict)`` for ``trainer_misc.loop.trainer.train``; see the module docstring.

    Args:
        dit: a DiT of the trained kind (its weights are replaced at every call); moved to ``dtype``.
        vae: the causal video VAE (for decoding); moved to ``dtype``.
        prompts / negative: what to sample, and the classifier-free-guidance negative (one row).
        width, height, temp: pixel size and latent frames of each sample (``temp`` 1 writes a png).
        steps: Euler steps per pyramid stage of the first frame (later frames use half, at least 1).
        dtype: the run's dtype (bf16 / fp16 / fp32). device: this rank's device.
        offload: keep the DiT and VAE on the CPU between validations (moved to ``device`` only while sampling).
        output_dir: samples go to ``<output_dir>/samples/step-<step>/`` (step 0, the base weights:
            ``samples/base/``); tensorboard to ``<output_dir>/logs``.
        model_name: the DiT's kind (``pyramid_flux`` / ``pyramid_mmdit``; selects the latent normalisation).
        mode: ``"ar"`` or ``"full_sequence"``: the sampling mode of the trained objective
            (:func:`pyramid_dit.training_record.training_record`).
    """

    def __init__(self, dit: nn.Module, vae: nn.Module, prompts: Sequence[ValidationPrompt], negative: TextFeatures,
                 *, width: int, height: int, temp: int, steps: Sequence[int], dtype: torch.dtype,
                 device: torch.device, output_dir: str, offload: bool = False, tensorboard: bool = True,
                 model_name: str = "pyramid_flux", mode: str = "ar") -> None:
        from pyramid_dit.training_record import SAMPLING_MODES

        if mode not in SAMPLING_MODES:
            raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
        self.dtype, self.device, self.offload, self.model_name, self.mode = dtype, device, offload, model_name, mode
        home = torch.device("cpu") if offload else device
        self.dit, self.vae = (_in_dtype(m, dtype).to(home).eval().requires_grad_(False) for m in (dit, vae))
        self.prompts, self.negative = list(prompts), negative
        self.width, self.height, self.temp, self.steps = width, height, temp, list(steps)
        self.output_dir, self.tensorboard = Path(output_dir), tensorboard
        self.base_strips: Optional[list[torch.Tensor]] = None  # [3, H, W'] per prompt, from samples/base/

    def _base(self) -> Optional[list[torch.Tensor]]:
        """The base weights' strips: sampled by this run, or read back from ``samples/base/`` after a resume."""
        if self.base_strips is None:
            path = self.output_dir / "samples" / BASE_FOLDER / STRIPS_FILE
            if path.is_file():
                from pyramid_dit.tensor_files import load_tensor_file
                saved = load_tensor_file(path)
                strips = [saved.get(f"prompt{i}") for i in range(len(self.prompts))]
                if all(s is not None for s in strips):
                    self.base_strips = [s.float() / 255 for s in strips]
        return self.base_strips

    @torch.no_grad()
    def __call__(self, step: int, state: dict[str, torch.Tensor]) -> list[Path]:
        from pyramid_dit.media import save_video
        from pyramid_dit.pipeline import PyramidFlowPipeline

        self.dit.load_state_dict(state)  # copies into the existing tensors (and their dtype)
        self.dit.to(self.device)
        self.vae.to(self.device)
        pipe = PyramidFlowPipeline(self.dit, vae=self.vae, model_name=self.model_name, device=self.device,
                                   dtype=self.dtype)
        base = step == 0
        folder = self.output_dir / "samples" / (BASE_FOLDER if base else f"step-{step:06d}")
        before = None if base else self._base()
        strips: list[torch.Tensor] = []
        writer = None
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(self.output_dir / "logs"))
        written = []
        try:
            for i, prompt in enumerate(self.prompts):
                video = pipe.generate(prompt_features=prompt.features, negative_features=self.negative,
                                      height=self.height, width=self.width, temp=self.temp, mode=self.mode,
                                      num_inference_steps=self.steps,
                                      video_num_inference_steps=[max(1, n // 2) for n in self.steps],
                                      seed=i, progress=False)[0]
                path = save_video(video, folder / (f"prompt{i}.mp4" if self.temp > 1 else f"prompt{i}.png"))
                written.append(path)
                logger.info("validation sample%s for %r -> %s", " (base weights)" if base else "", prompt.caption,
                            path)
                strip = frame_strip(video)
                strips.append(strip)
                if before is not None:
                    pair = torch.cat([before[i], strip], dim=1)  # base above, current below
                    written.append(_save_png(pair, folder / f"before_after_prompt{i}.png"))
                if writer is not None:
                    writer.add_image(f"validation/prompt{i}", strip, step)
                    if before is not None:
                        writer.add_image(f"validation/before_after/prompt{i}", pair, step)
            if base:
                from trainer_misc.files import atomic_save_safetensors
                self.base_strips = strips
                atomic_save_safetensors({f"prompt{i}": (s.clamp(0, 1) * 255).round().to(torch.uint8)
                                         for i, s in enumerate(strips)}, folder / STRIPS_FILE)
        finally:
            if writer is not None:
                writer.close()
            del pipe
            if self.offload:
                self.dit.to("cpu")
                self.vae.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return written
