"""Frozen text conditioning of the SD3-kind DiT (``rain1011/pyramid-flow-sd3``): CLIP-L + CLIP-G + T5.

It returns the project's one text-feature type, filled the way the released pipeline's SD3 encoder fills it
(which is not stock SD3: no CLIP token features are mixed into the sequence):

* ``prompt_embeds`` — T5 last hidden states, padded to ``max_sequence_length`` (128) tokens;
* ``prompt_attention_mask`` — 1 for real T5 tokens (the prompt and its ``</s>``), 0 for padding;
* ``pooled_prompt_embeds`` — the *projected* pooled embeddings (``text_embeds``) of CLIP-L and of CLIP-G,
  concatenated in that order (768 + 1280 = 2048 = the DiT's ``pooled_projection_dim``).

Both CLIP tokenizers pad and truncate to the first tokenizer's ``model_max_length`` (77), as the release does.
"""
from __future__ import annotations

import torch
from torch import nn

from pyramid_dit.options import TEXT_TOKENS
from pyramid_dit.text_encoder import FrozenTextEncoder, check_prompts
from pyramid_dit.text_features import TextFeatures, prefix_lengths

# Subfolders of an official SD3-kind model folder holding the text side, and what each holds.
SD3_TEXT_SUBFOLDERS: dict[str, str] = {
    "tokenizer": "CLIPTokenizer (CLIP-L)",
    "text_encoder": "CLIPTextModelWithProjection (CLIP-L)",
    "tokenizer_2": "CLIPTokenizer (CLIP-G)",
    "text_encoder_2": "CLIPTextModelWithProjection (CLIP-G)",
    "tokenizer_3": "T5TokenizerFast",
    "text_encoder_3": "T5EncoderModel",
}


class SD3TextEncoder(FrozenTextEncoder):
    """CLIP-L, CLIP-G and T5 encoders, frozen and always in eval mode (see the module docstring).

    Build with :meth:`from_pretrained`; call :meth:`encode` (or the module itself) with a list of prompts.
    """

    sequence_encoder = "text_encoder_3"
    subfolders = SD3_TEXT_SUBFOLDERS
    release = "rain1011/pyramid-flow-sd3"
    build_hint = "tools/build_tiny_checkpoint.py --kind pyramid_mmdit"

    def __init__(self, tokenizer, text_encoder: nn.Module, tokenizer_2, text_encoder_2: nn.Module, tokenizer_3,
                 text_encoder_3: nn.Module, max_sequence_length: int = TEXT_TOKENS) -> None:
        super().__init__()
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be positive, got {max_sequence_length}")
        self.clip_length = tokenizer.model_max_length
        for name, encoder in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
            if self.clip_length > encoder.config.max_position_embeddings:
                raise ValueError(f"the CLIP tokenizer pads to model_max_length={self.clip_length} tokens but "
                                 f"{name} has {encoder.config.max_position_embeddings} positions; set "
                                 "model_max_length in tokenizer/tokenizer_config.json to match")
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.tokenizer_3, self.text_encoder_3 = tokenizer_3, text_encoder_3
        self.max_sequence_length = max_sequence_length
        self.requires_grad_(False)
        self.train(False)

    @torch.no_grad()
    def encode(self, prompts: str | list[str], device: torch.device | str | None = None) -> TextFeatures:
        """Encode ``prompts`` (an empty string is valid: the unconditional input for classifier-free guidance).
        ``device`` is where the token ids go and must hold the weights; it defaults to the weights' device."""
        prompts = check_prompts(prompts)
        device = self.device if device is None else torch.device(device)

        t5_inputs = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length,
                                     truncation=True, return_tensors="pt")
        mask = t5_inputs.attention_mask.to(device=device, dtype=torch.int64)
        prompt_embeds = self.text_encoder_3(t5_inputs.input_ids.to(device), attention_mask=mask)[0]

        pooled = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=self.clip_length, truncation=True,
                            return_tensors="pt").input_ids
            pooled.append(encoder(ids.to(device)).text_embeds.to(dtype=self.text_encoder.dtype))

        return TextFeatures(
            prompt_embeds=prompt_embeds.to(dtype=self.text_encoder_3.dtype),
            prompt_attention_mask=mask,
            pooled_prompt_embeds=torch.cat(pooled, dim=-1),
            host_lengths=prefix_lengths(t5_inputs.attention_mask),  # the tokenizer's mask is in host memory
        )
