"""The one type for a batch of text conditioning, shared by every text encoder, tool, dataset, objective and sampler.

A DiT takes three text inputs per prompt (as FLUX / SD3 do):

* ``prompt_embeds`` ``[B, L, D]`` — sequence features (T5 for miniFLUX), the DiT's ``encoder_hidden_states``;
* ``prompt_attention_mask`` ``[B, L]`` int64 — 1 for real tokens, 0 for padding (padding at the end);
* ``pooled_prompt_embeds`` ``[B, P]`` — the pooled embedding (CLIP for miniFLUX) joining the timestep.

Features files on disk (``tools/extract_text_features.py``, ``trainer_misc.data.features.load_text_features``) keep
the reference's key names, singular and with a batch dimension of 1: :meth:`TextFeatures.from_file` and
:meth:`TextFeatures.file_row` are the only translation between the two spellings.

Kept free of transformers so that the objective and the data pipeline can import it cheaply.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch

# Field names, and the key names in a features file, in the same order.
FIELDS = ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")
FILE_KEYS = ("prompt_embed", "prompt_attention_mask", "pooled_prompt_embed")


@dataclasses.dataclass(frozen=True)
class TextFeatures:
    """Text conditioning of ``B`` prompts (see the module docstring).

    A dataclass (so generic batch movers such as the trainer's device transfer rebuild it field by field) that
    also iterates over its three tensors in field order (``TextFeatures(*feats)``, ``zip(FIELDS, feats)``).

    ``host_lengths``: per prompt, its number of valid tokens, known on the host; filled in when the features are
    made from a mask in host memory whose rows are valid tokens then padding (``None`` otherwise). It is a tuple
    of ints, not a tensor, so it stays on the host when the batch moves to the device, and the DiT trims the
    prompts' padding from it (``text_lengths``) instead of copying the mask back from the device (a stall).
    """

    prompt_embeds: torch.Tensor  # [B, L, D]
    prompt_attention_mask: torch.Tensor  # [B, L] int64, 1 = token, 0 = padding
    pooled_prompt_embeds: torch.Tensor  # [B, P]
    host_lengths: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if self.host_lengths is None:
            object.__setattr__(self, "host_lengths", prefix_lengths(self.prompt_attention_mask))
        elif len(self.host_lengths) != self.prompt_attention_mask.shape[0]:
            raise ValueError(f"host_lengths has {len(self.host_lengths)} entries for "
                             f"{self.prompt_attention_mask.shape[0]} prompts")

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.prompt_embeds, self.prompt_attention_mask, self.pooled_prompt_embeds))

    @classmethod
    def from_file(cls, fea: Mapping[str, torch.Tensor]) -> TextFeatures:
        """From a features file's dict (``prompt_embed`` ...); float32 embeddings, int64 mask."""
        return cls(fea[FILE_KEYS[0]].float(), fea[FILE_KEYS[1]].long(), fea[FILE_KEYS[2]].float())

    def file_row(self, row: int) -> dict[str, torch.Tensor]:
        """Row ``row`` as a features file's dict (each tensor keeps a batch dimension of 1, mask int64)."""
        one = self.rows(slice(row, row + 1))
        return {FILE_KEYS[0]: one.prompt_embeds, FILE_KEYS[1]: one.prompt_attention_mask.to(torch.int64),
                FILE_KEYS[2]: one.pooled_prompt_embeds}

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, device: Union[torch.device, str, None] = None, dtype: Optional[torch.dtype] = None) -> TextFeatures:
        """Move to ``device``; ``dtype`` applies to the two embeddings (the mask stays int64)."""
        return TextFeatures(self.prompt_embeds.to(device=device, dtype=dtype),
                            self.prompt_attention_mask.to(device=device, dtype=torch.int64),
                            self.pooled_prompt_embeds.to(device=device, dtype=dtype), self.host_lengths)

    def pin_memory(self) -> TextFeatures:
        """Page-locked copies (a DataLoader with ``pin_memory=True`` calls it through the batch), so the copy to
        the GPU does not make the host wait."""
        return TextFeatures(*(t.pin_memory() for t in self), self.host_lengths)

    def rows(self, index: Union[slice, torch.Tensor, Sequence[int]]) -> TextFeatures:
        """The rows ``index`` selects (a slice keeps views)."""
        lengths = None
        if self.host_lengths is not None and not (isinstance(index, torch.Tensor) and index.device.type != "cpu"):
            where = index if isinstance(index, slice) else \
                (index.numpy() if isinstance(index, torch.Tensor) else np.asarray(index))
            lengths = tuple(int(v) for v in np.asarray(self.host_lengths)[where])
        return TextFeatures(*(t[index] for t in self), lengths)

    def expand_rows(self, rows: int, name: str = "text features") -> TextFeatures:
        """``rows`` rows: unchanged when it already has them, a broadcast view of a single row otherwise."""
        have = self.batch_size
        if have == rows:
            return self
        if have != 1:
            raise ValueError(f"{name} has {have} rows; expected 1 (shared) or {rows} (one per prompt)")
        lengths = None if self.host_lengths is None else self.host_lengths * rows
        return TextFeatures(*(t.expand(rows, *t.shape[1:]) for t in self), lengths)

    @staticmethod
    def cat(features: Sequence[TextFeatures]) -> TextFeatures:
        """Rows of several batches, in order (same text length and widths)."""
        known = all(f.host_lengths is not None for f in features)
        lengths = tuple(v for f in features for v in f.host_lengths) if known else None
        return TextFeatures(*(torch.cat(parts) for parts in zip(*features)), lengths)

    def dit_kwargs(self) -> dict[str, torch.Tensor]:
        """The DiT forward's text keyword arguments (see :meth:`dit_text_lengths` for the host lengths)."""
        return {"encoder_hidden_states": self.prompt_embeds, "encoder_attention_mask": self.prompt_attention_mask,
                "pooled_projections": self.pooled_prompt_embeds}

    def dit_text_lengths(self) -> dict[str, tuple[int, ...]]:
        """``{"text_lengths": host_lengths}`` for the DiT forward when they are known (empty otherwise)."""
        return {} if self.host_lengths is None else {"text_lengths": self.host_lengths}


def prefix_lengths(mask: torch.Tensor) -> Optional[tuple[int, ...]]:
    """Per row of a ``[B, L]`` mask in host memory, its count of valid tokens, when every row is valid tokens then
    padding; ``None`` for a mask on a device (reading it would stall the host), a shape-only one, or one with holes.
    Reads host memory directly (no torch op)."""
    from torch._subclasses.fake_tensor import is_fake

    if mask.device.type != "cpu" or mask.ndim != 2 or is_fake(mask) or mask.requires_grad:
        return None
    valid = mask.numpy() != 0
    counts = valid.sum(1)
    if (valid != (np.arange(mask.shape[1])[None, :] < counts[:, None])).any():
        return None
    return tuple(int(v) for v in counts)
