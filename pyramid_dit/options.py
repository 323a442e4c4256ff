"""Names and defaults of the model package's run-time options, importable without torch (argument parsers and
launch checks use them before anything heavy loads). What each option does is documented where it is used."""
from __future__ import annotations

__all__ = ["AESTHETIC_SUFFIX", "ATTENTION_SPLITS", "DEFAULT_NEGATIVE_PROMPT", "TEXT_TOKENS"]

# How attention runs (pyramid_dit/packing.py's docstring): ``flex``, one FlexAttention call per block over the
# packed micro-batch with a block-sparse mask; ``frame``, one SDPA call per frame; ``column``, one masked SDPA call
# per column. Same outputs; speed depends on the device. ``auto``: ``flex`` on CUDA (and on meta tensors, which
# trace what CUDA runs) when this torch has FlexAttention, ``frame`` elsewhere.
ATTENTION_SPLITS = ("auto", "flex", "frame", "column")

# T5 prompt length of both released kinds: the text encoders pad (and cut) every prompt to it.
TEXT_TOKENS = 128

# The released demo's negative prompt (the reference pipeline's default).
DEFAULT_NEGATIVE_PROMPT = (
    "cartoon style, worst quality, low quality, blurry, absolute black, absolute white, low res, extra limbs, "
    "extra digits, misplaced objects, mutated anatomy, monochrome, horror"
)
# The reference appends this to every prompt ("to improve aesthetics"); the pipeline leaves prompts as given and
# tools/generate.py appends it by default (--prompt_suffix).
AESTHETIC_SUFFIX = ", hyper quality, Ultra HD, 8K"
