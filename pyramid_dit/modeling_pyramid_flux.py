"""Pyramid Flow's video DiT, miniFLUX kind: ``PyramidFluxTransformer``.

One forward call predicts the flow-matching velocity for several *columns* at once. A column is a list of
latent clips ``[B, 16, t, h, w]``: compressed history first (possibly at lower resolutions), the clip being
denoised last. Each column has its own text rows and timestep; rows are interleaved, row ``r`` belonging to
column ``r % n_columns``. The call returns, per column, the prediction for its last clip only.

Inside, every clip is cut into 2x2 patches and all columns' tokens are packed into one sequence; attention
runs per column with the text-padding and temporal-causal rules and the rotary positions over (frame, row, col)
described in :mod:`pyramid_dit.packing` (the packing is shared with the SD3 kind). Text tokens sit at (0, 0, 0).

Because only the last clips are returned, the final single-stream block computes queries, MLP and output for
their tokens alone (keys and values still come from the whole column); outputs and gradients are unchanged.

The parameter names, config keys and numerics follow the released checkpoint
(``rain1011/pyramid-flow-miniflux``) so it loads unchanged with ``from_pretrained``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging
from torch import nn
from torch.utils.checkpoint import checkpoint

from pyramid_dit.dit_layers import AdaNorm
from pyramid_dit.embeddings import TimestepTextEmbedding
from pyramid_dit.flux_blocks import FluxSingleTransformerBlock, FluxTransformerBlock
from pyramid_dit.packed_ops import modulate, per_column
from pyramid_dit.packing import (
    Column,
    PackedDiTMixin,
    PackedSequence,
    check_columns,
    pack_columns,
    packed_text,
    patchify,
    unpatchify,
)

logger = logging.get_logger(__name__)

PATCH = 2  # the model always patchifies 2x2; `in_channels` counts latent channels x 4

__all__ = ["PyramidFluxTransformer", "patchify", "unpatchify"]


class PyramidFluxTransformer(PackedDiTMixin, ModelMixin, ConfigMixin):
    """FLUX-style DiT (double-stream then single-stream blocks) over packed pyramid columns.

    Args (names and meaning as in the released ``config.json``):
        patch_size: must be 1; the checkpoint stores 1 although tokens are 2x2 patches (see ``in_channels``).
        in_channels: channels of a token, 4 x latent channels (64 for the 16-channel video VAE).
        num_layers / num_single_layers: number of double-stream / single-stream blocks.
        attention_head_dim, num_attention_heads: width is their product.
        joint_attention_dim: width of the text encoder's token embeddings.
        pooled_projection_dim: width of the pooled text embedding.
        axes_dims_rope: rotary channels for (frame, row, col); must sum to ``attention_head_dim``.
        use_flash_attn: accepted for config compatibility; attention always goes through
            ``torch.nn.functional.scaled_dot_product_attention`` (which picks fused kernels itself).
        use_temporal_causal: block-causal attention by frame (the released models use it).
        interp_condition_pos: resize lower-resolution clips' positions onto the last clip's grid. The
            reference implementation ignores this flag and always resizes; so does the released config.
        use_gradient_checkpointing, gradient_checkpointing_ratio: recompute blocks ``0 .. int(ratio * n)`` of
            each kind in the backward pass (training mode only), i.e. ``int(ratio * n) + 1`` of ``n`` blocks, as
            the reference does (at the training default 0.75 on the released 8 + 16 blocks: 7 + 13).
    """

    _supports_gradient_checkpointing = True
    # Forward inputs a trainer must not cast to a low-precision parameter dtype: the timestep is embedded through
    # sinusoids, and bf16 would round it (999 -> 1000).
    fp32_inputs = ("timestep_ratio",)

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        axes_dims_rope: Sequence[int] = (16, 24, 24),
        use_flash_attn: bool = False,
        use_temporal_causal: bool = True,
        interp_condition_pos: bool = True,
        use_gradient_checkpointing: bool = False,
        gradient_checkpointing_ratio: float = 0.6,
    ):
        super().__init__()
        if patch_size != 1:
            raise ValueError(f"patch_size={patch_size}: the miniFLUX DiT always uses 2x2 patches and its config "
                             "stores patch_size=1 (in_channels already counts the 4 patch positions)")
        if in_channels % (PATCH * PATCH):
            raise ValueError(f"in_channels={in_channels} must be 4 x latent channels (2x2 patches)")
        if sum(axes_dims_rope) != attention_head_dim or any(d % 2 for d in axes_dims_rope):
            raise ValueError(f"axes_dims_rope={list(axes_dims_rope)} must be even numbers summing to "
                             f"attention_head_dim={attention_head_dim}")
        if not 0.0 <= gradient_checkpointing_ratio <= 1.0:
            raise ValueError(f"gradient_checkpointing_ratio={gradient_checkpointing_ratio} must be in [0, 1]")
        if use_flash_attn:
            logger.warning("use_flash_attn=True is accepted for config compatibility only: attention runs through "
                           "torch scaled_dot_product_attention with the exact padding and temporal-causal masks.")

        self.out_channels = in_channels
        self.latent_channels = in_channels // (PATCH * PATCH)
        self.inner_dim = dim = num_attention_heads * attention_head_dim
        self.axes_dims_rope = [int(d) for d in axes_dims_rope]
        self.use_temporal_causal = use_temporal_causal
        self.interp_condition_pos = interp_condition_pos
        self.gradient_checkpointing = use_gradient_checkpointing
        self.gradient_checkpointing_ratio = gradient_checkpointing_ratio

        self.time_text_embed = TimestepTextEmbedding(dim, pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, dim)
        self.x_embedder = nn.Linear(in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleTransformerBlock(dim, num_attention_heads, attention_head_dim)
             for _ in range(num_single_layers)])
        self.norm_out = AdaNorm(dim, 2)  # chunks are (scale, shift), in that order
        self.proj_out = nn.Linear(dim, in_channels)

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Training-from-scratch init: Xavier linears, N(0, 0.02) conditioning, zeroed adaLN and output."""
        if any(hasattr(p, "ds_id") for p in self.parameters()):
            # Built under DeepSpeed ZeRO-3's partitioned init (trainer_misc.optim.zero3): each rank holds only a
            # slice of every weight, and the pretrained weights are loaded right after, so there is nothing to do.
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in (self.time_text_embed.timestep_embedder, self.time_text_embed.text_embedder):
            nn.init.normal_(emb.linear_1.weight, std=0.02)
            nn.init.normal_(emb.linear_2.weight, std=0.02)
        nn.init.normal_(self.context_embedder.weight, std=0.02)
        zeroed = [self.norm_out.linear, self.proj_out]
        zeroed += [n for blk in self.transformer_blocks for n in (blk.norm1.linear, blk.norm1_context.linear)]
        zeroed += [blk.norm.linear for blk in self.single_transformer_blocks]
        for lin in zeroed:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _checkpointed_blocks(self, n_blocks: int) -> range:
        """Blocks ``0 .. int(ratio * n)`` of each kind (double-stream, single-stream): the reference's rule."""
        return range(min(int(n_blocks * self.gradient_checkpointing_ratio) + 1, n_blocks))

    def _check_inputs(self, sample: Sequence[Column], encoder_hidden_states: torch.Tensor,
                      encoder_attention_mask: torch.Tensor, pooled_projections: torch.Tensor,
                      timestep_ratio: torch.Tensor) -> list[list[torch.Tensor]]:
        return check_columns(sample, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                             timestep_ratio, latent_channels=self.latent_channels, patch=PATCH,
                             text_dim=self.config.joint_attention_dim, pooled_dim=self.config.pooled_projection_dim)

    def _pack(self, columns: Sequence[Column], text_mask: torch.Tensor,
              text_lengths: Optional[Sequence[int]] = None) -> PackedSequence:
        """Positions, 3-axis rotary tables, segments and attention masks of the packed sequence (see ``packing``)."""
        columns = [[col] if isinstance(col, torch.Tensor) else list(col) for col in columns]
        return pack_columns(columns, text_mask, patch=PATCH, rope_axes=self.axes_dims_rope, joint_rope=True,
                            interp_condition_pos=self.interp_condition_pos,
                            temporal_causal=self.use_temporal_causal, sp=self.sequence_parallel,
                            attention_split=self.attention_split, text_lengths=text_lengths)

    def forward(
        self,
        sample: Sequence[Column],
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep_ratio: torch.Tensor,
        text_lengths: Optional[Sequence[int]] = None,
    ) -> list[torch.Tensor]:
        """Predict each column's last clip.

        Args:
            sample: columns, each a list of clips ``[B, C, t, h, w]`` (history first, predicted clip last;
                ``h``, ``w`` even). A bare tensor counts as a one-clip column.
            encoder_hidden_states: text tokens ``[B*n, T, joint_attention_dim]``, row r -> column r % n.
            encoder_attention_mask: ``[B*n, T]``, 1 = token, 0 = padding.
            pooled_projections: ``[B*n, pooled_projection_dim]``.
            timestep_ratio: ``[B*n]`` timesteps on the 0-1000 scale.
            text_lengths: optional, per text row the number of its leading valid tokens, known on the host
                (``TextFeatures.host_lengths``): lets a device-side mask's padding be trimmed without reading the
                mask back from the device. A CPU mask is read directly; without either, all text is kept.

        Returns:
            One tensor per column, shaped like the column's last clip.
        """
        columns = self._check_inputs(sample, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                                     timestep_ratio)
        seq = self._pack(columns, encoder_attention_mask, text_lengths)
        B = seq.batch

        temb = self.time_text_embed(timestep_ratio, pooled_projections)
        text = seq.split("text", self.context_embedder(packed_text(encoder_hidden_states, seq)))
        video = seq.split("video",
                          self.x_embedder(torch.cat([patchify(clip) for clips in columns for clip in clips], dim=1)))

        for i, block in enumerate(self.transformer_blocks):
            if self._checkpointed(i, len(self.transformer_blocks)):
                video, text = checkpoint(block, video, text, temb, seq, use_reentrant=False)
            else:
                video, text = block(video, text, temb, seq)

        # Single-stream layout: each column's text then its video (under SP: gathered, re-laid, split again).
        text, video = seq.gather("text", text), seq.gather("video", video)
        parts = [part for t, v in zip(text.split(seq.text_lens, dim=1), video.split(seq.video_lens, dim=1))
                 for part in (t, v)]
        if seq.joint_pad:  # FlexAttention's tile padding, carried by the stream (see PackedSequence)
            parts.append(seq.zeros(seq.joint_pad, video))
        x = seq.split("joint", torch.cat(parts, dim=1))
        n_single = len(self.single_transformer_blocks)
        for i, block in enumerate(self.single_transformer_blocks):
            # Only the last clips are returned: the final block computes just their tokens.
            args = (x, temb, seq, self._last_only(i == n_single - 1))
            x = checkpoint(block, *args, use_reentrant=False) if self._checkpointed(i, n_single) else block(*args)
        if not self._last_only(n_single > 0):
            x = seq.tails("joint", seq.gather("joint", x))

        scale, shift = (per_column(c, B) for c in self.norm_out.chunks(temb))
        x = self.proj_out(modulate(self.norm_out.norm(x), scale, shift, seq.segs("last")))
        last_shapes = [(clips[-1].shape[2], clips[-1].shape[3] // PATCH, clips[-1].shape[4] // PATCH)
                       for clips in columns]
        return [unpatchify(tok, *shape) for tok, shape in zip(x.split(seq.last_lens, dim=1), last_shapes)]
