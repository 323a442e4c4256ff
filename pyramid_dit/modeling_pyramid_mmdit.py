"""Pyramid Flow's video DiT, SD3 kind: ``PyramidDiffusionMMDiT`` (``rain1011/pyramid-flow-sd3``).

Same call as the miniFLUX kind (:class:`pyramid_dit.PyramidFluxTransformer`): a list of columns of clips,
interleaved text rows, one prediction per column for its last clip. The columns are packed and attended
exactly as there (:mod:`pyramid_dit.packing`); what differs is the block stack and the positions:

* a stack of SD3 joint blocks (:class:`pyramid_dit.dit_layers.JointTransformerBlock`, qk RMS-norm with
  epsilon 1e-5); the last one updates only the video stream;
* patches are embedded by a 2x2 convolution (``pos_embed.proj``) plus a fixed 2-D sin-cos table
  (``pos_embed.pos_embed``, ``pos_embed_max_size``\\ :sup:`2` entries) cropped around its centre to the
  column's last-clip grid; a lower-resolution history clip gets that crop resized bilinearly to its size
  (``interp_condition_pos``), so it covers the same image area as the frame being predicted;
* rotary positions over the frame index only, spanning the whole head width (``add_temp_pos_embed`` with
  ``temp_pos_embed_type="rope"``), text at frame 0.

The config keys, parameter names and numerics follow the released checkpoint, loaded with the options the
reference pipeline adds (``use_t5_mask``, ``add_temp_pos_embed``, ``temp_pos_embed_type="rope"``,
``use_temporal_causal``, ``interp_condition_pos``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging
from torch import nn
from torch.utils.checkpoint import checkpoint

from pyramid_dit.dit_layers import AdaNorm, JointTransformerBlock
from pyramid_dit.embeddings import TimestepTextEmbedding, sincos_table_2d
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


class PatchProjection(nn.Module):
    """The checkpoint's 2x2 patch convolution (``weight`` ``[D, C, p, p]``), applied as the linear map of flattened
    patches that a stride-``p`` convolution is, so all clips of a call go through one matrix multiply."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, in_channels, patch, patch))
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.xavier_uniform_(self.weight.view(dim, -1))  # as the linear map it is (the reference does the same)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``[B, N, p*p*C]`` patches (channels ordered row-in-patch, col-in-patch, C, as ``patchify``) -> ``[B, N, D]``."""
        return F.linear(patches, self.weight.permute(0, 2, 3, 1).flatten(1), self.bias)


class PatchEmbed(nn.Module):
    """Patch projection plus the fixed sin-cos position table (checkpoint names ``pos_embed.proj``,
    ``pos_embed.pos_embed``).

    Called once per forward with every clip, whatever the number of columns and clips: under ZeRO-3 each module
    call gathers parameters, so the number of calls must not depend on the data (ranks would disagree).
    """

    def __init__(self, in_channels: int, dim: int, patch: int, table_size: int, base_size: int):
        super().__init__()
        self.patch, self.table_size = patch, table_size
        self.proj = PatchProjection(in_channels, dim, patch)
        self.register_buffer("pos_embed", sincos_table_2d(dim, table_size, base_size)[None], persistent=True)

    def positions(self, h: int, w: int, grid_h: int, grid_w: int) -> torch.Tensor:
        """``[h*w, D]`` positions of an ``h x w``-token clip in a column whose last clip has ``grid_h x grid_w``.

        The table is cropped around its centre to the grid, then resized (bilinear, half-pixel) to the clip
        when it is coarser.
        """
        if max(grid_h, grid_w, h, w) > self.table_size:
            raise ValueError(f"a clip of {h}x{w} tokens (grid {grid_h}x{grid_w}) does not fit the {self.table_size}"
                             f"x{self.table_size} sin-cos position table (pos_embed_max_size); use a smaller "
                             "resolution")
        top, left = (self.table_size - grid_h) // 2, (self.table_size - grid_w) // 2
        table = self.pos_embed.view(self.table_size, self.table_size, -1)
        crop = table[top:top + grid_h, left:left + grid_w]
        if (h, w) != (grid_h, grid_w):
            crop = F.interpolate(crop.permute(2, 0, 1)[None], size=(h, w), mode="bilinear")[0].permute(1, 2, 0)
        return crop.reshape(h * w, -1)

    def forward(self, clips: list[tuple[torch.Tensor, int, int]]) -> torch.Tensor:
        """``(clip [B, C, t, H, W], grid_h, grid_w)`` per clip -> their tokens ``[B, sum(t*h*w), D]`` (row-major
        t-h-w, clip after clip) with spatial positions added."""
        tokens = self.proj(torch.cat([patchify(clip, self.patch) for clip, _, _ in clips], dim=1))
        out, start = [], 0
        for clip, grid_h, grid_w in clips:
            t, h, w = clip.shape[2], clip.shape[3] // self.patch, clip.shape[4] // self.patch
            part = tokens[:, start:start + t * h * w].unflatten(1, (t, h * w))
            out.append((part + self.positions(h, w, grid_h, grid_w).to(tokens.dtype)).flatten(1, 2))
            start += t * h * w
        return torch.cat(out, dim=1)


class PyramidDiffusionMMDiT(PackedDiTMixin, ModelMixin, ConfigMixin):
    """SD3-style MMDiT over packed pyramid columns.

    Args (names and meaning as in the released ``config.json`` and the reference pipeline's overrides):
        sample_size: latent size the sin-cos table is scaled for (table coordinates are
            ``i / (pos_embed_max_size / (sample_size / patch_size))``).
        patch_size: spatial patch (2 in the released model).
        in_channels: latent channels (16).
        num_layers: joint blocks; the last one does not update the text.
        attention_head_dim, num_attention_heads: width is their product.
        caption_projection_dim: width of the projected text tokens; must equal the width.
        pooled_projection_dim: width of the pooled text embedding (CLIP-L + CLIP-G, 768 + 1280).
        pos_embed_max_size: side of the sin-cos table (a clip may be at most this many tokens high and wide).
        max_num_frames: accepted for config compatibility (sizes the reference's unused sin-cos time table).
        qk_norm: must be ``"rms_norm"`` (the released models).
        pos_embed_type: must be ``"sincos"`` (the reference raises for ``"rope"`` too).
        temp_pos_embed_type, add_temp_pos_embed: ``"rope"`` with ``True`` (released) rotates by the frame
            index; ``add_temp_pos_embed=False`` uses no temporal positions.
        joint_attention_dim: width of the T5 features.
        use_flash_attn: accepted for config compatibility; attention always goes through
            ``scaled_dot_product_attention`` with the exact masks.
        use_temporal_causal: block-causal attention by frame (released models use it).
        use_t5_mask: accepted for config compatibility; text padding is always masked (as in the reference's
            non-flash attention; with flash attention it dropped padding, which is the same thing).
        interp_condition_pos: resize the last clip's position crop onto lower-resolution history clips.
        use_gradient_checkpointing, gradient_checkpointing_ratio: as in the reference, blocks from index
            ``int(ratio * n)`` on are recomputed in the backward pass (training mode only).
    """

    _supports_gradient_checkpointing = True
    # Forward inputs a trainer must not cast to a low-precision parameter dtype: the timestep is embedded through
    # sinusoids, and bf16 would round it (999 -> 1000).
    fp32_inputs = ("timestep_ratio",)

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 24,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        pos_embed_max_size: int = 192,
        max_num_frames: int = 200,
        qk_norm: str = "rms_norm",
        pos_embed_type: str = "rope",
        temp_pos_embed_type: str = "sincos",
        joint_attention_dim: int = 4096,
        use_gradient_checkpointing: bool = False,
        use_flash_attn: bool = True,
        use_temporal_causal: bool = False,
        use_t5_mask: bool = False,
        add_temp_pos_embed: bool = False,
        interp_condition_pos: bool = False,
        gradient_checkpointing_ratio: float = 0.6,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        if pos_embed_type != "sincos":
            raise NotImplementedError(f"pos_embed_type={pos_embed_type!r}: only 'sincos' is supported (the released "
                                      "config; the reference cannot run 'rope' for video either)")
        if add_temp_pos_embed and temp_pos_embed_type != "rope":
            raise NotImplementedError(f"temp_pos_embed_type={temp_pos_embed_type!r} with add_temp_pos_embed: only "
                                      "'rope' is supported (what the reference pipeline passes when loading)")
        if qk_norm != "rms_norm":
            raise NotImplementedError(f"qk_norm={qk_norm!r}: only 'rms_norm' (the released models) is supported")
        if caption_projection_dim != dim:
            raise ValueError(f"caption_projection_dim={caption_projection_dim} must equal num_attention_heads x "
                             f"attention_head_dim = {dim}: text and video tokens share the joint attention")
        if attention_head_dim % 2:
            raise ValueError(f"attention_head_dim={attention_head_dim} must be even (rotary pairs)")
        if not 0.0 <= gradient_checkpointing_ratio <= 1.0:
            raise ValueError(f"gradient_checkpointing_ratio={gradient_checkpointing_ratio} must be in [0, 1]")
        if use_flash_attn:
            logger.warning("use_flash_attn=True is accepted for config compatibility only: attention runs through "
                           "torch scaled_dot_product_attention with the exact padding and temporal-causal masks.")

        self.out_channels = self.latent_channels = in_channels
        self.patch_size = patch_size
        self.inner_dim = dim
        self.rope_axes = [attention_head_dim] if add_temp_pos_embed else None  # frame index over the whole head
        self.use_temporal_causal = use_temporal_causal
        self.interp_condition_pos = interp_condition_pos
        self.gradient_checkpointing = use_gradient_checkpointing
        self.gradient_checkpointing_ratio = gradient_checkpointing_ratio

        self.pos_embed = PatchEmbed(in_channels, dim, patch_size, pos_embed_max_size, sample_size // patch_size)
        self.time_text_embed = TimestepTextEmbedding(dim, pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([
            JointTransformerBlock(dim, num_attention_heads, attention_head_dim, qk_norm_eps=1e-5, text_norm="norm_add",
                                  context_pre_only=i == num_layers - 1)
            for i in range(num_layers)])
        self.norm_out = AdaNorm(dim, 2)  # chunks are (scale, shift), in that order
        self.proj_out = nn.Linear(dim, patch_size * patch_size * in_channels)

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Training-from-scratch init: Xavier linears and patch projection, N(0, 0.02) conditioning, zeroed
        adaLN and output."""
        if any(hasattr(p, "ds_id") for p in self.parameters()):
            # Built under DeepSpeed ZeRO-3's partitioned init (trainer_misc.optim.zero3): each rank holds only a
            # slice of every weight, and the pretrained weights are loaded right after, so there is nothing to do.
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, PatchProjection)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
        for emb in (self.time_text_embed.timestep_embedder, self.time_text_embed.text_embedder):
            nn.init.normal_(emb.linear_1.weight, std=0.02)
            nn.init.normal_(emb.linear_2.weight, std=0.02)
        nn.init.normal_(self.context_embedder.weight, std=0.02)
        zeroed = [self.norm_out.linear, self.proj_out]
        zeroed += [n for blk in self.transformer_blocks for n in (blk.norm1.linear, blk.norm1_context.linear)]
        for lin in zeroed:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _checkpointed_blocks(self, n_blocks: int) -> range:
        """Blocks ``int(ratio * n)`` to ``n - 1``, as the reference SD3 model does."""
        return range(int(n_blocks * self.gradient_checkpointing_ratio), n_blocks)

    def _check_inputs(self, sample: Sequence[Column], encoder_hidden_states: torch.Tensor,
                      encoder_attention_mask: torch.Tensor, pooled_projections: torch.Tensor,
                      timestep_ratio: torch.Tensor) -> list[list[torch.Tensor]]:
        return check_columns(sample, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                             timestep_ratio, latent_channels=self.latent_channels, patch=self.patch_size,
                             text_dim=self.config.joint_attention_dim, pooled_dim=self.config.pooled_projection_dim)

    def _pack(self, columns: Sequence[Column], text_mask: torch.Tensor,
              text_lengths: Optional[Sequence[int]] = None) -> PackedSequence:
        """Temporal rotary tables, segments and attention masks of the packed sequence (see ``packing``)."""
        columns = [[col] if isinstance(col, torch.Tensor) else list(col) for col in columns]
        return pack_columns(columns, text_mask, patch=self.patch_size, rope_axes=self.rope_axes, joint_rope=False,
                            interp_condition_pos=self.interp_condition_pos,
                            temporal_causal=self.use_temporal_causal, sp=self.sequence_parallel,
                            attention_split=self.attention_split, text_lengths=text_lengths)

    def _clip_grids(self, columns: list[list[torch.Tensor]]) -> list[tuple[torch.Tensor, int, int]]:
        """Each clip with the token grid its positions are cropped at: the column's last clip's grid
        (``interp_condition_pos``) or its own."""
        p, out = self.patch_size, []
        for clips in columns:
            for clip in clips:
                ref = clips[-1] if self.interp_condition_pos else clip
                out.append((clip, ref.shape[3] // p, ref.shape[4] // p))
        return out

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
                ``h``, ``w`` multiples of ``patch_size``). A bare tensor counts as a one-clip column.
            encoder_hidden_states: T5 tokens ``[B*n, T, joint_attention_dim]``, row r -> column r % n.
            encoder_attention_mask: ``[B*n, T]``, 1 = token, 0 = padding.
            pooled_projections: ``[B*n, pooled_projection_dim]``.
            timestep_ratio: ``[B*n]`` timesteps on the 0-1000 scale.
            text_lengths: optional, per text row the number of its leading valid tokens, known on the host
                (``TextFeatures.host_lengths``), as for the miniFLUX kind.

        Returns:
            One tensor per column, shaped like the column's last clip.
        """
        columns = self._check_inputs(sample, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                                     timestep_ratio)
        seq = self._pack(columns, encoder_attention_mask, text_lengths)

        temb = self.time_text_embed(timestep_ratio, pooled_projections)
        text = seq.split("text", self.context_embedder(packed_text(encoder_hidden_states, seq)))
        video = seq.split("video", self.pos_embed(self._clip_grids(columns)))

        n = len(self.transformer_blocks)
        for i, block in enumerate(self.transformer_blocks):
            # Only the last clips are returned: the final block computes just their tokens.
            args = (video, text, temb, seq, self._last_only(i == n - 1))
            video, text = checkpoint(block, *args, use_reentrant=False) if self._checkpointed(i, n) else block(*args)
        if not self._last_only(n > 0):
            video = seq.tails("video", seq.gather("video", video))

        scale, shift = (per_column(c, seq.batch) for c in self.norm_out.chunks(temb))
        x = self.proj_out(modulate(self.norm_out.norm(video), scale, shift, seq.segs("last")))
        p = self.patch_size
        last_shapes = [(clips[-1].shape[2], clips[-1].shape[3] // p, clips[-1].shape[4] // p) for clips in columns]
        return [unpatchify(tok, *shape, patch=p) for tok, shape in zip(x.split(seq.last_lens, dim=1), last_shapes)]
