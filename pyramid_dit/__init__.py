"""Pyramid Flow DiT: model, scheduler, training objective, text encoder and sampling pipeline.

``from pyramid_dit import PyramidFluxTransformer`` etc. work; submodules are imported on first use so that light
users (the objective, the scripts' ``--help``) do not pay for importing transformers.
"""
from importlib import import_module

_EXPORTS = {
    "PyramidFluxTransformer": "pyramid_dit.modeling_pyramid_flux",
    "PyramidDiffusionMMDiT": "pyramid_dit.modeling_pyramid_mmdit",
    "SD3TextEncoder": "pyramid_dit.text_encoder_sd3",
    "get_kind": "pyramid_dit.kinds",
    "PyramidFlowMatchEulerDiscreteScheduler": "pyramid_dit.scheduler",
    "PyramidFlowObjective": "pyramid_dit.objective",
    "flow_matching_loss": "pyramid_dit.objective",
    "LatentNormalization": "pyramid_dit.kinds",
    "FluxTextEncoder": "pyramid_dit.text_encoder",
    "TextFeatures": "pyramid_dit.text_features",
    "PyramidFlowPipeline": "pyramid_dit.pipeline",
    "save_video": "pyramid_dit.media",
    "sample_block_noise": "pyramid_dit.block_noise",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyramid_dit' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
