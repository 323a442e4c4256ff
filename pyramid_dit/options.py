"""Names and defaults of the model package's run-time options, importable without torch (argument parsers and
launch checks use them before anything heavy loads). What each option does is documented where it is used."""
from __future__ import annotations

__all__ = ["AESTHETIC_SUFFIX", "ATTENTION_SPLITS", "DEFAULT_NEGATIVE_PROMPT"]

# How the temporal-causal attention of a column is split into kernel calls (pyramid_dit.packing.attention_groups):
# one call per frame, or one masked call per column. Same outputs; speed depends on the device.
ATTENTION_SPLITS = ("frame", "column")

# The released demo's negative prompt (the reference pipeline's default).
DEFAULT_NEGATIVE_PROMPT = (
    "cartoon style, worst quality, low quality, blurry, absolute black, absolute white, low res, extra limbs, "
    "extra digits, misplaced objects, mutated anatomy, monochrome, horror"
)
# The reference appends this to every prompt ("to improve aesthetics"); the pipeline leaves prompts as given and
# tools/generate.py appends it by default (--prompt_suffix).
AESTHETIC_SUFFIX = ", hyper quality, Ultra HD, 8K"
