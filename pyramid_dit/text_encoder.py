"""Frozen text conditioning of the miniFLUX DiT: CLIP-L pooled embedding + T5 sequence features.

The DiT takes three text inputs per prompt (as FLUX does), returned as one
:class:`~pyramid_dit.text_features.TextFeatures`:

* ``prompt_embeds`` — T5 encoder last hidden states, padded to ``max_sequence_length`` tokens (128 for
  Pyramid Flow), the DiT's ``encoder_hidden_states``;
* ``prompt_attention_mask`` — 1 for real tokens (the prompt and its ``</s>``), 0 for padding. The DiT uses it to
  keep padding out of attention, so outputs do not depend on how far a prompt was padded;
* ``pooled_prompt_embeds`` — CLIP text model ``pooler_output`` (the end-of-text token's final state), which
  joins the timestep in the DiT's adaptive norms.

Tokenizer settings follow the released pipeline exactly (T5: pad to ``max_length``, truncate; CLIP: pad and
truncate to the tokenizer's ``model_max_length``, 77), so features equal those the released DiT was trained on.
Prompts longer than the limits are truncated, as in the original pipeline.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pyramid_dit.options import TEXT_TOKENS
from pyramid_dit.text_features import TextFeatures, prefix_lengths

# Subfolders of an official model folder (e.g. rain1011/pyramid-flow-miniflux) holding the text side.
TEXT_SUBFOLDERS: dict[str, str] = {
    "tokenizer": "CLIPTokenizer",
    "text_encoder": "CLIPTextModel",
    "tokenizer_2": "T5TokenizerFast",
    "text_encoder_2": "T5EncoderModel",
}


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56 (the old name only warns in 5.x)."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def check_prompts(prompts: str | list[str]) -> list[str]:
    """One prompt or a non-empty list of strings -> the list (an empty string is a valid prompt)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("encode() needs at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings; item {bad[0]} is {type(prompts[bad[0]]).__name__}")
    return list(prompts)


def require_subfolders(model_path: str | Path, subfolders: dict[str, str], release: str, build_hint: str) -> Path:
    """``model_path`` as a Path, or a FileNotFoundError naming the missing text subfolders and the layout."""
    model_path = Path(model_path)
    missing = [name for name in subfolders if not (model_path / name).is_dir()]
    if missing:
        layout = ", ".join(f"{name}/ ({kind})" for name, kind in subfolders.items())
        raise FileNotFoundError(
            f"text encoder folder(s) {', '.join(m + '/' for m in missing)} not found in {model_path}; the model "
            f"folder needs the official layout of {release}: {layout} (build a tiny one with {build_hint})")
    return model_path


class FrozenTextEncoder(nn.Module):
    """What every text encoder of a DiT kind shares: frozen weights, always in eval mode (``train()`` keeps it
    there: dropout in T5 would make the features of a prompt random), ``device`` of the sequence encoder named by
    ``sequence_encoder``, ``module(prompts)`` = :meth:`encode`, and loading from the official subfolders.

    A subclass names its parts in ``subfolders`` (subfolder -> transformers class, optionally followed by a note),
    which are also its constructor's keyword arguments, and the release it comes from."""

    sequence_encoder: str
    subfolders: dict[str, str]
    release: str
    build_hint: str

    @classmethod
    def from_pretrained(cls, model_path: str | Path, torch_dtype: torch.dtype = torch.float32,
                        max_sequence_length: int = TEXT_TOKENS) -> FrozenTextEncoder:
        """Load every part from its official subfolder. ``torch_dtype`` goes to the transformers loaders rather
        than a ``.to()`` afterwards, as in the original pipelines: in float16, T5 keeps its ``wo`` layers in
        float32."""
        import transformers

        model_path = require_subfolders(model_path, cls.subfolders, cls.release, cls.build_hint)
        dtype = _dtype_kwarg(torch_dtype)
        parts = {name: getattr(transformers, kind.split()[0]).from_pretrained(
                     model_path / name, **({} if name.startswith("tokenizer") else dtype))
                 for name, kind in cls.subfolders.items()}
        return cls(**parts, max_sequence_length=max_sequence_length)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return getattr(self, self.sequence_encoder).device

    def encode(self, prompts: str | list[str], device: torch.device | str | None = None) -> TextFeatures:
        raise NotImplementedError

    def forward(self, prompts: str | list[str], device: torch.device | str | None = None) -> TextFeatures:
        return self.encode(prompts, device)


class FluxTextEncoder(FrozenTextEncoder):
    """CLIP + T5 text encoders, frozen and always in eval mode.

    Build with :meth:`from_pretrained`; call :meth:`encode` (or the module itself) with a list of prompts.
    """

    sequence_encoder = "text_encoder_2"
    subfolders = TEXT_SUBFOLDERS
    release = "rain1011/pyramid-flow-miniflux"
    build_hint = "tools/build_tiny_checkpoint.py"

    def __init__(self, tokenizer, text_encoder: nn.Module, tokenizer_2, text_encoder_2: nn.Module,
                 max_sequence_length: int = TEXT_TOKENS) -> None:
        super().__init__()
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be positive, got {max_sequence_length}")
        clip_positions = text_encoder.config.max_position_embeddings
        if tokenizer.model_max_length > clip_positions:
            raise ValueError(
                f"the CLIP tokenizer pads to model_max_length={tokenizer.model_max_length} tokens but the CLIP text "
                f"model has {clip_positions} positions; set model_max_length to {clip_positions} in "
                "tokenizer/tokenizer_config.json")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.max_sequence_length = max_sequence_length
        self.requires_grad_(False)
        self.train(False)

    @torch.no_grad()
    def encode(self, prompts: str | list[str], device: torch.device | str | None = None) -> TextFeatures:
        """Encode ``prompts`` (an empty string is a valid prompt: it is the unconditional input for
        classifier-free guidance). ``device`` is where the token ids go and must hold the weights; it defaults to
        the weights' device."""
        prompts = check_prompts(prompts)
        device = self.device if device is None else torch.device(device)

        t5_inputs = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                                     truncation=True, return_tensors="pt")
        mask = t5_inputs.attention_mask.to(device=device, dtype=torch.int64)
        prompt_embeds = self.text_encoder_2(t5_inputs.input_ids.to(device), attention_mask=mask)[0]

        clip_inputs = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt")
        pooled = self.text_encoder(clip_inputs.input_ids.to(device)).pooler_output

        return TextFeatures(
            prompt_embeds=prompt_embeds.to(dtype=self.text_encoder_2.dtype),
            prompt_attention_mask=mask,
            pooled_prompt_embeds=pooled.to(dtype=self.text_encoder.dtype),
            host_lengths=prefix_lengths(t5_inputs.attention_mask),  # the tokenizer's mask is in host memory
        )
