"""``CausalVideoVAE``: Pyramid Flow's causal 3-D conv VAE, loadable from the released ``causal_video_vae/`` folder.

Video ``[b, 3, 1 + 8k, H, W]`` in [-1, 1] <-> latent ``[b, 16, 1 + k, H/8, W/8]`` (released configuration). The first
frame is encoded as an image on its own (every conv is causal in time), each further latent frame covers 8 frames.

Besides whole-clip encode/decode there are two memory savers that the reference pipeline and tools use, with the
reference's arguments and numerics:

* temporal chunking (``temporal_chunk=True``): the clip goes through in windows (first ``window_size + 1`` frames,
  then ``window_size`` each) with every causal conv's context carried between windows, so the result equals the
  whole-clip one up to float rounding. Inference only.
* spatial tiling (``enable_tiling()``): inputs larger than the tile are split into overlapping tiles that are
  processed separately and linearly blended; this changes the result slightly near tile borders.

The VAE is used frozen here (only the DiT is finetuned); the training-only parts of the reference (losses,
discriminator, context parallelism) are not part of this class.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from video_vae.causal_conv import CausalConv3d, ConvCache, conv_layout
from video_vae.modeling_enc_dec import CausalVaeDecoder, CausalVaeEncoder, DiagonalGaussianDistribution

TILE_OVERLAP_FACTOR = 0.25  # fraction of a tile shared with its neighbour, encode and decode alike


def _temporal_chunks(num_frames: int, window_size: int) -> list[tuple[int, int]]:
    """Frame ranges ``[start, end)``: the first window has ``window_size + 1`` frames, later ones ``window_size``."""
    bounds = [(0, min(num_frames, window_size + 1))]
    start = window_size + 1
    while start < num_frames:
        bounds.append((start, min(start + window_size, num_frames)))
        start += window_size
    return bounds


def _blend(prev: Tensor, tile: Tensor, extent: int, dim: int) -> Tensor:
    """Cross-fade the first ``extent`` rows (along ``dim``) of ``tile`` from the last rows of ``prev``.

    Row ``y`` becomes ``prev[-extent + y] * (1 - y / extent) + tile[y] * (y / extent)``.
    """
    extent = min(prev.shape[dim], tile.shape[dim], extent)
    if extent <= 0:
        return tile
    shape = [1] * tile.ndim
    shape[dim] = extent
    ramp = [y / extent for y in range(extent)]
    w_tile = torch.tensor(ramp, dtype=tile.dtype, device=tile.device).view(shape)
    w_prev = torch.tensor([1 - r for r in ramp], dtype=tile.dtype, device=tile.device).view(shape)
    head = prev.narrow(dim, prev.shape[dim] - extent, extent) * w_prev + tile.narrow(dim, 0, extent) * w_tile
    return torch.cat([head, tile.narrow(dim, extent, tile.shape[dim] - extent)], dim=dim)


def _tiled_apply(
    x: Tensor, fn: Callable[[Tensor], Tensor], tile_in: int, tile_out: int, stride_in: int, blend_out: int
) -> Tensor:
    """Apply ``fn`` to overlapping ``tile_in``-sized spatial tiles of ``x`` and stitch the results.

    Tiles start every ``stride_in`` input pixels. Each output tile is blended with its (already blended) upper and
    left neighbours over ``blend_out`` output pixels and cropped to ``tile_out - blend_out`` before stitching.
    """
    rows = [
        [fn(x[:, :, :, i : i + tile_in, j : j + tile_in]) for j in range(0, x.shape[4], stride_in)]
        for i in range(0, x.shape[3], stride_in)
    ]
    keep = tile_out - blend_out
    for i, row in enumerate(rows):
        for j in range(len(row)):
            tile = row[j]
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, blend_out, dim=3)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend_out, dim=4)
            row[j] = tile
    return torch.cat([torch.cat([t[:, :, :, :keep, :keep] for t in row], dim=4) for row in rows], dim=3)


class CausalVideoVAE(ModelMixin, ConfigMixin):
    """Causal video VAE with the configuration keys and state-dict keys of the released Pyramid Flow checkpoint.

    Only the released architecture is implemented: ``*BlockCausal3D`` blocks, a Gaussian posterior
    (``encoder_double_z``), a post-quant conv, and depth-to-space upsampling (``interpolate=False``). Other values
    are rejected instead of being silently ignored. ``encoder_type``, ``decoder_type``, ``sample_size`` and
    ``scaling_factor`` are stored for compatibility; the Pyramid Flow pipeline normalises latents with its own
    constants, not ``scaling_factor``.
    """

    @register_to_config
    def __init__(
        self,
        encoder_in_channels: int = 3,
        encoder_out_channels: int = 4,
        encoder_layers_per_block: Sequence[int] = (2, 2, 2, 2),
        encoder_down_block_types: Sequence[str] = ("DownEncoderBlockCausal3D",) * 4,
        encoder_block_out_channels: Sequence[int] = (128, 256, 512, 512),
        encoder_spatial_down_sample: Sequence[bool] = (True, True, True, False),
        encoder_temporal_down_sample: Sequence[bool] = (True, True, True, False),
        encoder_block_dropout: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        encoder_act_fn: str = "silu",
        encoder_norm_num_groups: int = 32,
        encoder_double_z: bool = True,
        encoder_type: str = "causal_vae_conv",
        decoder_in_channels: int = 4,
        decoder_out_channels: int = 3,
        decoder_layers_per_block: Sequence[int] = (3, 3, 3, 3),
        decoder_up_block_types: Sequence[str] = ("UpDecoderBlockCausal3D",) * 4,
        decoder_block_out_channels: Sequence[int] = (128, 256, 512, 512),
        decoder_spatial_up_sample: Sequence[bool] = (True, True, True, False),
        decoder_temporal_up_sample: Sequence[bool] = (True, True, True, False),
        decoder_block_dropout: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        decoder_act_fn: str = "silu",
        decoder_norm_num_groups: int = 32,
        decoder_type: str = "causal_vae_conv",
        sample_size: int = 256,
        scaling_factor: float = 0.18215,
        add_post_quant_conv: bool = True,
        interpolate: bool = False,
        downsample_scale: int = 8,
    ) -> None:
        super().__init__()
        _check_supported(
            encoder_down_block_types=encoder_down_block_types,
            decoder_up_block_types=decoder_up_block_types,
            encoder_layers_per_block=encoder_layers_per_block,
            decoder_layers_per_block=decoder_layers_per_block,
            encoder_block_out_channels=encoder_block_out_channels,
            decoder_block_out_channels=decoder_block_out_channels,
            encoder_spatial_down_sample=encoder_spatial_down_sample,
            encoder_temporal_down_sample=encoder_temporal_down_sample,
            decoder_spatial_up_sample=decoder_spatial_up_sample,
            decoder_temporal_up_sample=decoder_temporal_up_sample,
            encoder_block_dropout=encoder_block_dropout,
            decoder_block_dropout=decoder_block_dropout,
            encoder_double_z=encoder_double_z,
            add_post_quant_conv=add_post_quant_conv,
            interpolate=interpolate,
            encoder_type=encoder_type,
            decoder_type=decoder_type,
            encoder_out_channels=encoder_out_channels,
            decoder_in_channels=decoder_in_channels,
        )
        self.encoder = CausalVaeEncoder(
            in_channels=encoder_in_channels,
            latent_channels=encoder_out_channels,
            block_out_channels=encoder_block_out_channels,
            layers_per_block=encoder_layers_per_block,
            spatial_down_sample=encoder_spatial_down_sample,
            temporal_down_sample=encoder_temporal_down_sample,
            block_dropout=encoder_block_dropout,
            norm_num_groups=encoder_norm_num_groups,
            act_fn=encoder_act_fn,
        )
        self.decoder = CausalVaeDecoder(
            latent_channels=decoder_in_channels,
            out_channels=decoder_out_channels,
            block_out_channels=decoder_block_out_channels,
            layers_per_block=decoder_layers_per_block,
            spatial_up_sample=decoder_spatial_up_sample,
            temporal_up_sample=decoder_temporal_up_sample,
            block_dropout=decoder_block_dropout,
            norm_num_groups=decoder_norm_num_groups,
            act_fn=decoder_act_fn,
        )
        self.quant_conv = CausalConv3d(2 * encoder_out_channels, 2 * encoder_out_channels, kernel_size=1)
        self.post_quant_conv = CausalConv3d(encoder_out_channels, encoder_out_channels, kernel_size=1)
        # Frames per latent frame after the first: each temporal downsampler halves the frame count.
        self.temporal_compression = 2 ** sum(bool(t) for t in encoder_temporal_down_sample)
        self.use_tiling = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Fresh-model init of the reference (truncated normal, std 0.02); checkpoints overwrite it."""
        if isinstance(module, (nn.Linear, nn.Conv3d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "CausalVideoVAE":
        """diffusers' ``from_pretrained``, but a checkpoint that lacks any model weight is an error.

        diffusers only logs a warning for missing keys and leaves those weights freshly initialised (or on the meta
        device), which would silently produce garbage latents. Unexpected extra keys are still only warned about.
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        missing = sorted(info["missing_keys"])
        if missing:
            shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
            raise ValueError(
                f"{cls.__name__}.from_pretrained({os.fspath(pretrained_model_name_or_path)!r}): the checkpoint has "
                f"no value for {len(missing)} model weight(s): {shown}. Check that the folder holds the full "
                "causal_video_vae weights and that its config.json matches them."
            )
        return (model, info) if want_info else model

    # ------------------------------------------------------------------ compiled inference

    def compile_for_inference(self) -> None:
        """Run the encoder and decoder through ``torch.compile`` (inductor) from the next call on.

        For extraction and generation only (no autograd): inductor's ``freezing`` is turned on for this process,
        which folds the weights into the compiled graphs as constants (on CPU that is what lets it use oneDNN's
        prepacked convolutions). Each new input shape compiles once (a minute or more on a small CPU; a clip of
        one resolution has two: the first temporal window and the others). Outputs match the eager model to
        float32 rounding (``tests/test_vae.py``); ``tools/benchmark_vae.py --compile`` says what it saves.
        The module structure and state dict are unchanged (the bound ``forward`` methods are wrapped).
        """
        import torch._inductor.config as inductor_config

        if self.training:
            raise RuntimeError("compile_for_inference: call .eval() first (the compiled graphs freeze the weights)")
        inductor_config.freezing = True
        for part in (self.encoder, self.decoder):
            part.forward = torch.compile(part.forward, dynamic=False)

    # ------------------------------------------------------------------ tiling switches

    def enable_tiling(self, use_tiling: bool = True) -> None:
        """Encode/decode inputs larger than ``tile_sample_min_size`` pixels in overlapping, blended tiles."""
        self.use_tiling = use_tiling

    def disable_tiling(self) -> None:
        self.enable_tiling(False)

    # ------------------------------------------------------------------ encode

    def encode(
        self,
        x: Tensor,
        return_dict: bool = True,
        is_init_image: bool = True,
        temporal_chunk: bool = False,
        window_size: int = 16,
        tile_sample_min_size: int = 256,
    ) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        """Encode pixels ``[b, c, t, h, w]`` (values in [-1, 1]) into the latent posterior ``.latent_dist``.

        Args:
            x: video or image batch; an image is ``t = 1``.
            return_dict: return ``AutoencoderKLOutput`` (else a 1-tuple).
            is_init_image: kept for call-site compatibility with the reference; ``x`` always starts a clip when
                encoding, so only ``True`` is accepted.
            temporal_chunk: encode in temporal windows with carried context (inference only; needs ``1 + 8k``
                frames and ``window_size`` a multiple of 8 for the released config).
            window_size: frames per window after the first window of ``window_size + 1``.
            tile_sample_min_size: tile size in pixels when tiling is enabled.
        """
        if not is_init_image:
            raise ValueError(
                "encode(is_init_image=False) is not supported: the input of an encode always starts a clip "
                "(the reference ignores this flag when encoding)"
            )
        self._check_input(x, self.config.encoder_in_channels, "x")
        encode_fn: Callable[[Tensor], Tensor] = self._encode_moments
        if temporal_chunk:
            self._check_chunked_encode(x.shape[2], window_size)
            encode_fn = partial(self._encode_chunked, window_size=window_size)

        if self.use_tiling and max(x.shape[-2:]) > tile_sample_min_size:
            tile_latent = self._tile_latent_size(tile_sample_min_size)
            blend = int(tile_latent * TILE_OVERLAP_FACTOR)
            stride = int(tile_sample_min_size * (1 - TILE_OVERLAP_FACTOR))
            moments = _tiled_apply(x, encode_fn, tile_sample_min_size, tile_latent, stride, blend)
        else:
            moments = encode_fn(x)

        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _encode_moments(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        # Channels-last inside (see ``conv_layout``), a plain contiguous tensor out.
        return self.quant_conv(self.encoder(conv_layout(x), cache), cache).contiguous()

    @torch.no_grad()
    def _encode_chunked(self, x: Tensor, window_size: int) -> Tensor:
        cache: ConvCache = {}  # lives for this clip only
        chunks = [self._encode_moments(x[:, :, a:b], cache) for a, b in _temporal_chunks(x.shape[2], window_size)]
        return torch.cat(chunks, dim=2)

    def _check_chunked_encode(self, num_frames: int, window_size: int) -> None:
        self._check_inference("temporal_chunk=True")
        step = self.temporal_compression
        if (num_frames - 1) % step != 0:
            raise ValueError(
                f"chunked encode needs 1 + {step}k frames (the first frame is encoded as an image, then {step} "
                f"frames per latent frame); got {num_frames}. Trim the clip or use temporal_chunk=False."
            )
        if window_size <= 0 or window_size % step != 0:
            raise ValueError(
                f"chunked encode needs window_size to be a positive multiple of {step} (frames per latent frame), "
                f"got {window_size}; other windows would split a latent frame between chunks."
            )

    # ------------------------------------------------------------------ decode

    def decode(
        self,
        z: Tensor,
        is_init_image: bool = True,
        temporal_chunk: bool = False,
        return_dict: bool = True,
        window_size: int = 2,
        tile_sample_min_size: int = 256,
        progress: Callable[[int, int], None] | None = None,
    ) -> DecoderOutput | tuple[Tensor]:
        """Decode latents ``[b, 16, t, h, w]`` into pixels ``.sample`` ``[b, 3, 1 + 8(t-1), 8h, 8w]``.

        Args:
            z: latents (unnormalised, i.e. as the encoder produced them).
            is_init_image: ``z`` starts a clip, so its first latent frame is an image (one output frame, not 8).
                ``False`` decodes every latent frame into 8 frames (a clip continued from elsewhere).
            temporal_chunk: decode in windows of latent frames with carried context (inference only).
            return_dict: return ``DecoderOutput`` (else a 1-tuple).
            window_size: latent frames per window after the first window of ``window_size + 1``.
            tile_sample_min_size: output tile size in pixels when tiling is enabled.
            progress: called as ``progress(done, total)`` after each decoded piece (a temporal window of a spatial
                tile), so a long decode can report how far it is.
        """
        self._check_input(z, self.config.decoder_in_channels, "z")
        if temporal_chunk:
            self._check_inference("temporal_chunk=True")
            if window_size <= 0:
                raise ValueError(f"decode window_size must be positive, got {window_size}")
        windows = len(_temporal_chunks(z.shape[2], window_size)) if temporal_chunk else 1
        tile_latent = self._tile_latent_size(tile_sample_min_size) if self.use_tiling else 0
        tiled = self.use_tiling and max(z.shape[-2:]) > tile_latent
        stride = int(tile_latent * (1 - TILE_OVERLAP_FACTOR)) if tiled else 1
        total = windows * (len(range(0, z.shape[3], stride)) * len(range(0, z.shape[4], stride)) if tiled else 1)
        done = 0

        def report() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        def decode_fn(x: Tensor) -> Tensor:
            if temporal_chunk:
                return self._decode_chunked(x, window_size, is_init_image, on_window=report)
            out = self._decode_frames(x, cache=None, is_init_image=is_init_image)
            report()
            return out

        if tiled:
            blend = int(tile_sample_min_size * TILE_OVERLAP_FACTOR)
            dec = _tiled_apply(z, decode_fn, tile_latent, tile_sample_min_size, stride, blend)
        else:
            dec = decode_fn(z)
        return DecoderOutput(sample=dec) if return_dict else (dec,)

    def _decode_frames(self, z: Tensor, cache: ConvCache | None, is_init_image: bool) -> Tensor:
        # Channels-last inside (see ``conv_layout``), a plain contiguous tensor out.
        x = self.decoder(self.post_quant_conv(conv_layout(z), cache), cache, is_init_image=is_init_image)
        return x.contiguous()

    @torch.no_grad()
    def _decode_chunked(self, z: Tensor, window_size: int, is_init_image: bool,
                        on_window: Callable[[], None] = lambda: None) -> Tensor:
        cache: ConvCache = {}  # lives for this clip only
        chunks = []
        for a, b in _temporal_chunks(z.shape[2], window_size):
            chunks.append(self._decode_frames(z[:, :, a:b], cache, is_init_image=is_init_image and a == 0))
            on_window()
        return torch.cat(chunks, dim=2)

    # ------------------------------------------------------------------ misc

    def forward(
        self,
        sample: Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
        is_init_image: bool = True,
        temporal_chunk: bool = False,
    ) -> tuple[DiagonalGaussianDistribution, Tensor]:
        """Reconstruct ``sample``: returns ``(posterior, decoded)`` like the reference."""
        posterior = self.encode(sample, is_init_image=is_init_image, temporal_chunk=temporal_chunk).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        dec = self.decode(z, is_init_image=is_init_image, temporal_chunk=temporal_chunk).sample
        return posterior, dec

    def _tile_latent_size(self, tile_sample_min_size: int) -> int:
        tile_latent = int(tile_sample_min_size / self.config.downsample_scale)
        if tile_latent < 2:
            raise ValueError(
                f"tile_sample_min_size={tile_sample_min_size} is too small for tiling: tiles must span at least 2 "
                f"latent pixels ({2 * self.config.downsample_scale} pixels); the pipeline uses 256 or 512"
            )
        return tile_latent

    def _check_inference(self, what: str) -> None:
        if self.training:
            raise RuntimeError(
                f"{what} is an inference-only path (it runs without gradients); call .eval() on the VAE first, "
                "or use temporal_chunk=False"
            )

    @staticmethod
    def _check_input(x: Tensor, channels: int, name: str) -> None:
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(
                f"{name} must be [batch, {channels}, frames, height, width], got shape {tuple(x.shape)}"
                + (" (add a frame axis with .unsqueeze(2) for images)" if x.ndim == 4 else "")
            )


_BLOCK_LISTS = (
    "encoder_layers_per_block", "encoder_block_out_channels", "encoder_spatial_down_sample",
    "encoder_temporal_down_sample", "encoder_block_dropout", "encoder_down_block_types",
)
_DECODER_BLOCK_LISTS = (
    "decoder_layers_per_block", "decoder_block_out_channels", "decoder_spatial_up_sample",
    "decoder_temporal_up_sample", "decoder_block_dropout", "decoder_up_block_types",
)


def _check_supported(**cfg: Any) -> None:
    """Reject configurations the reference accepts but ignores or cannot run, naming the config key."""
    for group in (_BLOCK_LISTS, _DECODER_BLOCK_LISTS):
        lengths = {key: len(cfg[key]) for key in group}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"CausalVideoVAE config: per-block lists must have equal lengths, got {lengths}")
    expected = {
        "encoder_down_block_types": "DownEncoderBlockCausal3D",
        "decoder_up_block_types": "UpDecoderBlockCausal3D",
    }
    for key, block in expected.items():
        if any(t != block for t in cfg[key]):
            raise ValueError(f"CausalVideoVAE config: {key} must all be {block!r}, got {list(cfg[key])}")
    for key, value in (("encoder_type", "causal_vae_conv"), ("decoder_type", "causal_vae_conv")):
        if cfg[key] != value:
            raise ValueError(f"CausalVideoVAE config: {key} must be {value!r}, got {cfg[key]!r}")
    for key, value in (("encoder_double_z", True), ("add_post_quant_conv", True), ("interpolate", False)):
        if bool(cfg[key]) != value:
            raise ValueError(
                f"CausalVideoVAE config: {key}={cfg[key]!r} is not supported (only {value} is implemented, "
                "as in the released checkpoint)"
            )
    if cfg["encoder_out_channels"] != cfg["decoder_in_channels"]:
        raise ValueError(
            "CausalVideoVAE config: encoder_out_channels and decoder_in_channels must match (the latent width), got "
            f"{cfg['encoder_out_channels']} and {cfg['decoder_in_channels']}"
        )
