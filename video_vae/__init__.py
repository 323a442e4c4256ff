"""The causal video VAE of Pyramid Flow (frozen here: used to encode training clips and decode samples)."""
from video_vae.modeling_causal_vae import CausalVideoVAE

__all__ = ["CausalVideoVAE"]
