"""Validation samples during training (``--validation_every``): rank 0 generates short clips of fixed prompts from
the current (EMA) weights into ``<output_dir>/samples/`` and tensorboard."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

import torch

from pyramid_dit.text_features import TextFeatures
from trainer_misc.datasets import IMAGE_BUCKETS, parse_resolution

logger = logging.getLogger(__name__)

__all__ = ["ValidationSampler"]


class ValidationSampler:
    """``--validation_every``: rank 0 samples the captions of the first annotation lines with the current weights.

    Writes ``<output_dir>/samples/step-<step>/prompt<i>.mp4`` and logs a frame strip per prompt to tensorboard
    (``validation/prompt<i>``). Runs on a fresh DiT built from the gathered weights, so the training model (and its
    ZeRO partitions) is never touched.
    """

    def __init__(self, args: argparse.Namespace, dit_config: dict, dataset, null_text: Optional[TextFeatures],
                 device: torch.device) -> None:
        from pyramid_dit.kinds import get_kind
        from video_vae.modeling_causal_vae import CausalVideoVAE

        self.args, self.dit_config, self.device = args, dit_config, device
        self.kind = get_kind(args.model_name)
        self.out = Path(args.output_dir) / "samples"
        self.width, self.height = (IMAGE_BUCKETS.get(args.resolution) or [parse_resolution(args.resolution)])[0] \
            if args.task == "t2i" else parse_resolution(args.resolution)
        self.temp = 1 if args.task == "t2i" else (args.validation_temp or args.max_frames)
        self.vae = CausalVideoVAE.from_pretrained(Path(args.model_path) / "causal_video_vae").to(device).eval()
        n = min(args.validation_prompts, len(dataset))
        items = [dataset[i] for i in range(n)]
        self.captions = [item.get("text", "") for item in items]
        if args.load_text_encoder or "text_features" not in items[0]:
            encoder = self.kind.load_text_encoder(args.model_path).to(device)
            self.prompts = [encoder.encode([c], device) for c in self.captions]
            self.negative = encoder.encode([""], device)
            del encoder
        else:
            self.prompts = [it["text_features"] for it in items]
            assert null_text is not None
            self.negative = null_text  # [1, L, D], [1, L], [1, P] as stored

    def __call__(self, step: int, state: dict[str, torch.Tensor]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from pyramid_dit.media import save_video
        from pyramid_dit.pipeline import PyramidFlowPipeline

        dit = self.kind.dit().from_config(self.dit_config)
        dit.load_state_dict({k: v.float() for k, v in state.items()})
        pipe = PyramidFlowPipeline(dit.to(self.device).eval(), vae=self.vae, model_name=self.kind.name,
                                   device=self.device, dtype=torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        folder = self.out / f"step-{step:06d}"
        writer = SummaryWriter(str(Path(self.args.output_dir) / "logs")) if self.args.report_to == "tensorboard" \
            else None
        for i, features in enumerate(self.prompts):
            video = pipe.generate(prompt_features=features, negative_features=self.negative, height=self.height,
                                  width=self.width, temp=self.temp, num_inference_steps=self.args.validation_steps,
                                  video_num_inference_steps=[max(1, n // 2) for n in self.args.validation_steps],
                                  seed=i, progress=False)[0]
            path = save_video(video, folder / f"prompt{i}.mp4" if self.temp > 1 else folder / f"prompt{i}.png")
            logger.info("validation sample for %r -> %s", self.captions[i], path)
            if writer is not None:
                strip = video[:, :: max(1, video.shape[1] // 8)]  # [3, F', H, W] -> frames side by side
                writer.add_image(f"validation/prompt{i}", strip.permute(0, 2, 1, 3).flatten(2), step)
        if writer is not None:
            writer.close()
