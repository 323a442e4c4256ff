"""Video generation with a (finetuned) Pyramid Flow DiT: text-to-video and image-to-video.

How a video is sampled (the inference counterpart of :mod:`pyramid_dit.objective`):

* The video is a sequence of *units* in latent time (:func:`pyramid_dit.sampling_plan.frame_units`). In the
  autoregressive mode (``mode="ar"``, the released video models) they are the first latent frame alone, then groups
  of ``frame_per_unit`` frames (1 for the released models), generated one after another; text-to-video generates
  unit 0 as an image with ``guidance_scale``, image-to-video takes the VAE latent of the given image as unit 0.
  Later units use ``video_guidance_scale``. In the full-sequence mode (``mode="full_sequence"``, DiTs trained
  without the temporal pyramid, and text-to-image) all latent frames are one unit with no history, denoised
  jointly with ``num_inference_steps`` and ``guidance_scale``, as that objective trained them.
* Each unit runs through the spatial pyramid, lowest resolution first. Within a stage the scheduler takes plain
  flow-matching Euler steps. Between stages the latent is upsampled 2x (nearest) and re-noised:
  ``alpha * latent + beta * block_noise`` (correlated 2x2 noise, :mod:`pyramid_dit.block_noise`), which puts it
  back on the next stage's flow at that stage's corrected start sigma.
* While denoising a unit at stage ``k``, the DiT sees the already generated units as history clips, laid out by
  :func:`pyramid_dit.pyramid.history_plan` exactly as in training: the newest unit at stage ``k``'s resolution,
  older ones at one stage lower each, everything older at the lowest resolution. The history is clean here (the
  training-time corruption only teaches robustness to the model's own errors).
* Classifier-free guidance batches the negative prompt (first half) with the prompt (second half).

Every random number comes from a :class:`pyramid_dit.noise.NoiseSource` (a seed, or recorded draws replayed).

The pipeline takes modules, not paths, so the trainer can sample validation videos from its in-memory DiT (live
or EMA weights); :meth:`PyramidFlowPipeline.from_pretrained` builds one from the official model folder,
optionally with a finetuned DiT. :func:`pyramid_dit.media.save_video` writes the result as mp4, gif or png.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from pyramid_dit.block_noise import renoise_coefficients
from pyramid_dit.device import resolve_device
from pyramid_dit.kinds import get_kind, kind_of_dit
from pyramid_dit.media import ImageInput, image_to_tensor, to_uint8
from pyramid_dit.noise import GeneratorNoise, NoiseSource
from pyramid_dit.options import DEFAULT_NEGATIVE_PROMPT
from pyramid_dit.progress import progress as progress_of
from pyramid_dit.pyramid import history_plan, noise_pyramid, spatial_pyramid, unit_frames, upsample_nearest
from pyramid_dit.sampling_plan import VAE_DOWNSAMPLE, check_pixel_size, frame_units, per_stage_steps
from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler
from pyramid_dit.text_features import TextFeatures

OUTPUT_TYPES = ("latent", "pt", "uint8")


# ------------------------------------------------------------------------------------------------- helpers
def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# ------------------------------------------------------------------------------------------------ pipeline
class PyramidFlowPipeline:
    """Samples videos from a Pyramid Flow DiT (see the module docstring for the algorithm).

    Args:
        dit: the DiT (``PyramidFluxTransformer`` or ``PyramidDiffusionMMDiT``); may be the trainer's live or EMA
            model.
        vae: the causal video VAE; needed to decode videos and for image-to-video, not for latents.
        text_encoder: the kind's text encoder; needed only when prompts are given as strings.
        model_name: the model kind (selects the latent normalisation); default: the kind of ``dit``.
        scheduler: the pyramid scheduler (default: 3 stages, shift 1, gamma 1/3, as the released models).
        device: where sampling runs (default: the DiT's device).
        dtype: compute dtype. Anything but float32 runs the DiT and VAE under ``torch.autocast`` with it; the
            latents and Euler updates always stay float32. A DiT with bfloat16 / float16 weights needs that dtype
            here (float32 would feed float32 inputs to low-precision weights).
        cpu_offload: keep the modules on the CPU and move each to ``device`` only while it is used (text encoder,
            then DiT, then VAE), trading transfer time for memory.
        frame_per_unit: latent frames per autoregressive unit after the first (1 for the released models).

    Modules are not moved at construction; without ``cpu_offload`` they must already be on ``device``.
    """

    def __init__(
        self,
        dit: nn.Module,
        vae: Optional[nn.Module] = None,
        text_encoder: Optional[nn.Module] = None,
        *,
        model_name: Optional[str] = None,
        scheduler: Optional[PyramidFlowMatchEulerDiscreteScheduler] = None,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        cpu_offload: bool = False,
        frame_per_unit: int = 1,
    ):
        if frame_per_unit < 1:
            raise ValueError(f"frame_per_unit must be >= 1, got {frame_per_unit}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.float32, bfloat16 or float16, got {dtype}")
        if dtype == torch.float32 and _dtype_of(dit) != torch.float32:
            raise ValueError(f"the DiT's weights are {_dtype_of(dit)} but dtype is float32; pass that dtype (the "
                             "pipeline then runs it under autocast) or convert the DiT with .float()")
        self.dit = dit
        self.vae = vae
        self.text_encoder = text_encoder
        self.normalization = (kind_of_dit(dit) if model_name is None else get_kind(model_name)).normalization
        self.scheduler = scheduler or PyramidFlowMatchEulerDiscreteScheduler()
        self.num_stages = self.scheduler.config.stages
        self.device = resolve_device(device if device is not None else _device_of(dit))
        self.dtype = dtype
        self.cpu_offload = cpu_offload
        self.frame_per_unit = frame_per_unit
        self.latent_channels = getattr(dit, "latent_channels", None) or dit.config.in_channels // 4

    # ---------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        model_path: Union[str, os.PathLike],
        *,
        variant: str = "diffusion_transformer_384p",
        dit_path: Union[str, os.PathLike, None] = None,
        dit_weight: Union[str, os.PathLike, None] = None,
        lora_path: Union[str, os.PathLike, None] = None,
        lora_scale: float = 1.0,
        device: Union[str, torch.device] = "auto",
        dtype: Optional[torch.dtype] = None,
        cpu_offload: bool = False,
        load_text_encoder: bool = True,
        load_vae: bool = True,
        model_name: str = "pyramid_flux",
    ) -> "PyramidFlowPipeline":
        """Load the official model folder (``rain1011/pyramid-flow-miniflux`` layout).

        Args:
            model_path: folder with ``causal_video_vae/``, the text encoders and ``diffusion_transformer_*/``.
            variant: DiT subfolder of ``model_path``, e.g. ``diffusion_transformer_384p`` / ``_768p``.
            dit_path: a finetuned DiT folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, as the
                trainer exports) used instead of the variant.
            dit_weight: a single-file DiT state dict (``.safetensors``; ``.pt``/``.pth``/``.bin`` are read with
                ``weights_only=True``) loaded into the variant's architecture. Not together with ``dit_path``.
            lora_path: a peft-format LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
                the trainer's ``export/lora``) applied on top of whichever DiT was loaded, without merging, so one
                base DiT serves several adapters and ``lora_scale`` can weaken or strengthen one.
            lora_scale: multiplies the adapter's ``alpha / rank``; 1 reproduces the merged export, 0 the base DiT.
            device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or a torch device.
            dtype: weight and compute dtype; default bfloat16 on CUDA, float32 on the CPU.
            cpu_offload: see the class docstring; needs a CUDA device.
        """
        from pyramid_dit.pipeline_loading import load_modules

        modules = load_modules(model_path, variant=variant, dit_path=dit_path, dit_weight=dit_weight,
                               lora_path=lora_path, lora_scale=lora_scale, device=device, dtype=dtype,
                               cpu_offload=cpu_offload, load_text_encoder=load_text_encoder, load_vae=load_vae,
                               model_name=model_name)
        return cls(modules.dit, modules.vae, modules.text_encoder, model_name=model_name, device=modules.device,
                   dtype=modules.dtype, cpu_offload=cpu_offload)

    # ----------------------------------------------------------------------------------- module handling
    @contextlib.contextmanager
    def _using(self, module: Optional[nn.Module], what: str) -> Iterator[nn.Module]:
        """``module`` on ``self.device`` and in eval mode for the block; restores its mode (and, with cpu_offload,
        moves it back to the CPU) afterwards, so a training DiT is left as it was found."""
        if module is None:
            raise ValueError(f"this pipeline has no {what}; construct it with one (from_pretrained loads it unless "
                             f"told not to)")
        if self.cpu_offload:
            module.to(self.device)
        elif _device_of(module) != self.device:
            raise RuntimeError(f"the {what} is on {_device_of(module)} but the pipeline runs on {self.device}; move "
                               "it there or enable cpu_offload")
        was_training = module.training
        module.eval()
        try:
            yield module
        finally:
            module.train(was_training)
            if self.cpu_offload:
                module.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # ------------------------------------------------------------------------------------------- text
    def encode_prompt(self, prompts: Union[str, Sequence[str]]) -> TextFeatures:
        """Text features of ``prompts`` on the pipeline's device (float32 embeddings, int64 mask)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self._using(self.text_encoder, "text encoder") as encoder:
            feats = encoder.encode(prompts, self.device)
        return self._prepare_text(feats, "prompt features")

    def _prepare_text(self, feats: TextFeatures, name: str) -> TextFeatures:
        dims = (feats.prompt_embeds.ndim, feats.prompt_attention_mask.ndim, feats.pooled_prompt_embeds.ndim)
        if dims != (3, 2, 2):
            raise ValueError(f"{name}: expected prompt_embeds [B, L, D], prompt_attention_mask [B, L], "
                             f"pooled_prompt_embeds [B, P], got {tuple(feats.prompt_embeds.shape)}, "
                             f"{tuple(feats.prompt_attention_mask.shape)}, {tuple(feats.pooled_prompt_embeds.shape)}")
        return TextFeatures(*feats, feats.host_lengths).to(self.device, torch.float32)

    def _text_inputs(self, prompt, prompt_features, negative_prompt, negative_features
                     ) -> tuple[TextFeatures, TextFeatures]:
        """(prompt, negative) features with the same rows; strings are encoded in one text-encoder pass."""
        if (prompt is None) == (prompt_features is None):
            raise ValueError("give exactly one of prompt (strings) and prompt_features (pre-computed TextFeatures)")
        prompts = ([prompt] if isinstance(prompt, str) else list(prompt)) if prompt is not None else []
        negatives = []
        if negative_features is None:
            negative_prompt = negative_prompt or ""
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if (prompts or negatives) and self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_features and negative_features "
                             "(e.g. the empty-prompt features that tools/extract_text_features.py writes)")
        encoded = self.encode_prompt(prompts + negatives) if prompts or negatives else None

        def rows(start: int, stop: int) -> TextFeatures:
            return encoded.rows(slice(start, stop))

        if prompt is not None:
            positive = rows(0, len(prompts))
        else:
            positive = self._prepare_text(prompt_features, "prompt_features")
        if negative_features is None:
            negative = rows(len(prompts), len(prompts) + len(negatives))
        else:
            negative = self._prepare_text(negative_features, "negative_features")
        negative = negative.expand_rows(positive.batch_size, "the negative prompt")
        if negative.prompt_embeds.shape[1:] != positive.prompt_embeds.shape[1:]:
            raise ValueError(f"negative prompt features {tuple(negative.prompt_embeds.shape)} do not match the "
                             f"prompt features {tuple(positive.prompt_embeds.shape)} (same text length and width)")
        return positive, negative

    # -------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        prompt: Union[str, Sequence[str], None] = None,
        *,
        prompt_features: Optional[TextFeatures] = None,
        negative_prompt: Union[str, Sequence[str], None] = DEFAULT_NEGATIVE_PROMPT,
        negative_features: Optional[TextFeatures] = None,
        image: Optional[ImageInput] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        temp: int = 16,
        mode: str = "ar",
        num_inference_steps: Union[int, Sequence[int]] = (20, 20, 20),
        video_num_inference_steps: Union[int, Sequence[int]] = (10, 10, 10),
        guidance_scale: float = 7.0,
        video_guidance_scale: float = 5.0,
        seed: Optional[int] = None,
        noise: Optional[NoiseSource] = None,
        output_type: str = "uint8",
        decode_window: int = 1,
        vae_tile_size: Optional[int] = 256,
        progress: bool = True,
    ) -> torch.Tensor:
        """Generate a batch of videos (text-to-video, or image-to-video when ``image`` is given).

        Args:
            prompt: one prompt or a list (the batch), encoded with the text encoder; or instead
            prompt_features: pre-computed ``TextFeatures`` (``[B, L, D]``, ``[B, L]``, ``[B, P]``).
            negative_prompt / negative_features: the classifier-free-guidance negative (one row is shared by the
                batch). ``None`` or ``""`` means the empty prompt.
            image: image-to-video input (PIL image, or float tensor ``[3, H, W]`` / ``[B, 3, H, W]`` in [0, 1]) of
                exactly ``height x width`` (default: its size); it becomes the first frame.
            height, width: pixels, multiples of 64 (``8 * 2**stages``).
            temp: latent frames, first frame included: the video has ``1 + 8 * (temp - 1)`` frames (1: an image).
            mode: ``"ar"`` (unit by unit, for temporal-pyramid DiTs) or ``"full_sequence"`` (all frames jointly, for
                DiTs trained without it; no image-to-video). See the module docstring.
            num_inference_steps: Euler steps per stage for the first frame, or for the whole clip in the
                full-sequence mode (one int for all stages, or a list).
            video_num_inference_steps: Euler steps per stage for every later unit (autoregressive mode).
            guidance_scale / video_guidance_scale: guidance of the first frame / of later units. Guidance runs
                when the scale is > 1; at <= 1 only the conditional prediction is used (scale 1 is equivalent).
            seed: seeds a :class:`GeneratorNoise`; or give ``noise`` (any :class:`NoiseSource`), not both. With
                neither, torch's global generator is used.
            output_type: ``"latent"``: the normalised DiT latents ``[B, 16, temp, H/8, W/8]`` (float32, on the
                pipeline device); ``"pt"``: decoded video ``[B, 3, F, H, W]`` float32 in [0, 1] on the CPU;
                ``"uint8"``: the same as uint8 in [0, 255].
            decode_window, vae_tile_size: see :meth:`decode_latents`.
            progress: show progress bars over units and over the VAE decode.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if seed is not None and noise is not None:
            raise ValueError("give seed or noise, not both (a NoiseSource carries its own randomness)")
        noise = noise or GeneratorNoise(seed)
        units = frame_units(temp, mode, self.frame_per_unit)
        image_pixels = None
        if image is not None:
            if mode != "ar":
                raise ValueError("image-to-video needs mode='ar': a full-sequence DiT was never shown a clean first "
                                 "frame to continue (its objective has no history)")
            image_pixels = image_to_tensor(image)
            img_h, img_w = image_pixels.shape[-2:]
            height, width = height or img_h, width or img_w
            if (img_h, img_w) != (height, width):
                raise ValueError(f"image is {img_w}x{img_h} but height x width is {width}x{height}; resize it "
                                 "first (e.g. pyramid_dit.resize.resize_crop_image)")
        if height is None or width is None:
            raise ValueError("height and width are required for text-to-video")
        check_pixel_size(height, width, self.num_stages)
        first_steps = per_stage_steps(num_inference_steps, self.num_stages, "num_inference_steps")
        video_steps = per_stage_steps(video_num_inference_steps, self.num_stages, "video_num_inference_steps")

        positive, negative = self._text_inputs(prompt, prompt_features, negative_prompt, negative_features)
        batch = positive.prompt_embeds.shape[0]
        cfg_text = TextFeatures.cat([negative, positive])

        shape = (batch, self.latent_channels, temp, height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE)
        initial = noise.initial(shape).to(self.device, torch.float32)
        lowest = noise_pyramid(initial, self.num_stages)[0]

        generated: List[torch.Tensor] = []
        if image_pixels is not None:
            if image_pixels.shape[0] not in (1, batch):
                raise ValueError(f"image batch {image_pixels.shape[0]} must be 1 or the prompt batch {batch}")
            generated.append(self.encode_image(image_pixels.expand(batch, -1, -1, -1), noise))

        with self._using(self.dit, "DiT"):
            for unit in progress_of(range(len(generated), len(units)), desc="units", unit="unit", disable=not progress):
                first = unit == 0
                latents = lowest[:, :, units[unit]]
                history = self._history(generated, unit) if generated else [[] for _ in range(self.num_stages)]
                generated.append(self._denoise_unit(
                    latents, history, positive, cfg_text, first_steps if first else video_steps,
                    guidance_scale if first else video_guidance_scale, noise,
                ))
        latents = torch.cat(generated, dim=2)
        if not bool(torch.isfinite(latents).all()):  # else NaN decodes to a black video, silently
            raise ValueError("the generated latents contain NaN or inf values: the DiT weights or the sampling "
                             "settings are broken (check the weights you loaded; try --dtype fp32)")
        if output_type == "latent":
            return latents
        video = self.decode_latents(latents, window_size=decode_window, tile_size=vae_tile_size, progress=progress)
        if not bool(torch.isfinite(video).all()):
            raise ValueError("the decoded video contains NaN or inf values: the VAE weights or --dtype are broken")
        if output_type == "pt":
            return video
        return to_uint8(video)

    def _history(self, generated: List[torch.Tensor], unit: int) -> List[List[torch.Tensor]]:
        """Per stage, the clean history clips (oldest first) the DiT sees while denoising ``unit``."""
        pyramid = spatial_pyramid(torch.cat(generated, dim=2), self.num_stages)
        history = []
        for stage in range(self.num_stages):
            plan = history_plan(stage, unit + 1)  # newest first
            clips = [pyramid[c.stage][:, :, unit_frames(c.first_unit, c.end_unit, self.frame_per_unit)]
                     for c in reversed(plan)]
            history.append(clips)
        return history

    def _denoise_unit(self, latents: torch.Tensor, history: List[List[torch.Tensor]], positive: TextFeatures,
                      cfg_text: TextFeatures, steps: List[int], scale: float, noise: NoiseSource) -> torch.Tensor:
        """Run one unit (one latent frame, a group of them, or the whole clip) through every stage, starting from its
        lowest-stage noise; returns the clean latent."""
        cfg = scale > 1
        text = cfg_text if cfg else positive
        rows = text.prompt_embeds.shape[0]
        gamma = self.scheduler.config.gamma
        for stage in range(self.num_stages):
            if stage > 0:
                alpha, beta = renoise_coefficients(self.scheduler, stage)
                latents = upsample_nearest(latents)
                block = noise.block(tuple(latents.shape), gamma).to(self.device, torch.float32)
                latents = alpha * latents + beta * block
            clips = [torch.cat([c, c]) if cfg else c for c in history[stage]]
            self.scheduler.set_timesteps(steps[stage], stage, device=self.device)
            for t in self.scheduler.timesteps:
                model_input = torch.cat([latents, latents]) if cfg else latents
                with self._autocast():
                    pred = self.dit(
                        sample=[clips + [model_input]],
                        **text.dit_kwargs(), **text.dit_text_lengths(),
                        timestep_ratio=t.expand(rows).to(torch.float32),
                    )[0].float()
                if cfg:
                    uncond, cond = pred.chunk(2)
                    pred = uncond + scale * (cond - uncond)
                latents = self.scheduler.step(pred, t, latents).prev_sample
        return latents

    # --------------------------------------------------------------------------------------------- VAE
    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        """Normalised DiT latent ``[B, 16, 1, H/8, W/8]`` of images ``[B, 3, H, W]`` in [0, 1]: a sample of the
        VAE posterior (as training latents are), with ``eps`` from ``noise.posterior``."""
        with self._using(self.vae, "VAE") as vae, self._autocast():
            x = (pixels * 2 - 1).unsqueeze(2).to(self.device, _dtype_of(vae))
            posterior = vae.encode(x).latent_dist
            eps = noise.posterior(tuple(posterior.mean.shape)).to(self.device, torch.float32)
            latent = posterior.mean.float() + posterior.std.float() * eps
        return self.normalization.normalize(latent)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, *, window_size: int = 1,
                       tile_size: Optional[int] = 256, progress: bool = False) -> torch.Tensor:
        """Decode normalised DiT latents ``[B, 16, T, h, w]`` into video ``[B, 3, 1 + 8(T-1), 8h, 8w]`` float32 in
        [0, 1], on the CPU.

        The VAE runs in temporal chunks of ``window_size`` latent frames (1 is the reference's low-memory
        setting, 2 its fast one) and, when ``tile_size`` is set, in blended spatial tiles of that many pixels
        (only frames larger than a tile are tiled; ``None`` or 0 disables tiling). ``progress`` shows a bar over
        those pieces: at 121 frames of 640x384 the decode takes minutes.
        """
        z = self.normalization.denormalize(latents.float())
        bar = progress_of(desc="VAE decode", unit="piece", disable=not progress)

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        with bar, self._using(self.vae, "VAE") as vae, self._autocast():
            previous_tiling = vae.use_tiling
            vae.enable_tiling(bool(tile_size))
            try:
                pixels = vae.decode(z.to(self.device, _dtype_of(vae)), temporal_chunk=True, window_size=window_size,
                                    tile_sample_min_size=tile_size or 256, progress=advance).sample
            finally:
                vae.enable_tiling(previous_tiling)
        return ((pixels.float().cpu() + 1) / 2).clamp(0, 1)
