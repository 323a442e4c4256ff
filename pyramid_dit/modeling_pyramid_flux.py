"""Pyramid Flow's video DiT, miniFLUX kind: ``PyramidFluxTransformer``.

One forward call predicts the flow-matching velocity for several *columns* at once. A column is a list of
latent clips ``[B, 16, t, h, w]``: compressed history first (possibly at lower resolutions), the clip being
denoised last. Each column has its own text rows and timestep; rows are interleaved, row ``r`` belonging to
column ``r % n_columns``. The call returns, per column, the prediction for its last clip only.

Inside, every clip is cut into 2x2 patches, all columns' tokens are packed into one sequence (so the linear
layers run as few large matrix multiplies), and attention runs per column with

* rotary positions over (frame, row, col): the frame index runs over the column's clips, history first;
  a lower-resolution clip's row/col positions are the last clip's grid resized to it (half-pixel linear),
  text tokens sit at (0, 0, 0);
* text padding hidden from every query;
* a block-causal mask by frame (``use_temporal_causal``): a token sees the text and the tokens of its own
  and earlier frames. Since tokens are sorted by frame, each frame's queries simply get the key prefix that
  ends with their frame: keys they may not see are skipped, not masked, and the only mask is a compact
  ``[B, 1, 1, K]`` text-padding row (no ``L x L`` mask is ever built).
* text trimmed, per column, to the longest prompt among the column's rows (the rest is padding everywhere).

Because only the last clips are returned, the final single-stream block computes queries, MLP and output for
their tokens alone (keys and values still come from the whole column); outputs and gradients are unchanged.

The parameter names, config keys and numerics follow the released checkpoint
(``rain1011/pyramid-flow-miniflux``) so it loads unchanged with ``from_pretrained``.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.checkpoint import checkpoint

from pyramid_dit.embeddings import TimestepTextEmbedding, clip_positions, rope_tables
from pyramid_dit.flux_blocks import (
    AdaNorm,
    AttentionGroup,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    PackedSequence,
    modulate,
    per_column,
    tails,
)

logger = logging.get_logger(__name__)

PATCH = 2  # the model always patchifies 2x2; `in_channels` counts latent channels x 4

Column = Union[torch.Tensor, Sequence[torch.Tensor]]


def _has_no_data(t: torch.Tensor) -> bool:
    """True for meta and fake tensors (shape-only tracing), whose values cannot be copied to the host."""
    return t.is_meta or is_fake(t)


def patchify(clip: torch.Tensor) -> torch.Tensor:
    """``[B, C, t, H, W] -> [B, t*(H/2)*(W/2), 4*C]``, channels ordered (row-in-patch, col-in-patch, C)."""
    B, C, t, H, W = clip.shape
    x = clip.reshape(B, C, t, H // PATCH, PATCH, W // PATCH, PATCH)
    return x.permute(0, 2, 3, 5, 4, 6, 1).reshape(B, t * (H // PATCH) * (W // PATCH), PATCH * PATCH * C)


def unpatchify(tokens: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a clip of ``t x h x w`` tokens."""
    B = tokens.shape[0]
    x = tokens.reshape(B, t, h, w, PATCH, PATCH, -1)
    return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(B, -1, t, h * PATCH, w * PATCH)


class PyramidFluxTransformer(ModelMixin, ConfigMixin):
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
        use_gradient_checkpointing, gradient_checkpointing_ratio: recompute the first
            ``ceil(ratio * n)`` blocks of each kind in the backward pass (training mode only). The reference
            takes ``int(ratio * n) + 1``; the counts agree unless ``ratio * n`` is a whole number (0.6 of the
            released 8 + 16 blocks: 5 and 10 either way).
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

    # ----------------------------------------------------------------------------------------------------
    # Gradient checkpointing
    # ----------------------------------------------------------------------------------------------------

    def enable_gradient_checkpointing(self, ratio: Optional[float] = None) -> None:
        """Recompute the first ``ceil(ratio * n)`` double- and single-stream blocks during backward.

        ``ratio`` defaults to the configured ``gradient_checkpointing_ratio``. Only applies in training mode.
        """
        if ratio is not None:
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"gradient checkpointing ratio {ratio} must be in [0, 1]")
            self.gradient_checkpointing_ratio = float(ratio)
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def _checkpointed(self, index: int, n_blocks: int) -> bool:
        return (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                and index < math.ceil(self.gradient_checkpointing_ratio * n_blocks))

    # ----------------------------------------------------------------------------------------------------
    # Loading
    # ----------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers ``from_pretrained`` that refuses incomplete or foreign checkpoints.

        diffusers only logs a warning for missing or unexpected weights and leaves the missing ones at their
        random (or meta) init; a DiT silently half-loaded is worse than an error, so this raises instead.
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        problems = []
        if info["missing_keys"]:
            problems.append(f"missing from the checkpoint: {sorted(info['missing_keys'])}")
        if info["unexpected_keys"]:
            problems.append(f"in the checkpoint but not in the model: {sorted(info['unexpected_keys'])}")
        if problems:
            raise ValueError(f"{cls.__name__}.from_pretrained({pretrained_model_name_or_path!r}, "
                             f"subfolder={kwargs.get('subfolder')!r}): weights do not match the model; "
                             + "; ".join(problems)
                             + ". Check that the folder holds a miniFLUX DiT and that config.json matches it.")
        return (model, info) if want_info else model

    # ----------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------

    def _check_inputs(self, sample: Sequence[Column], encoder_hidden_states: torch.Tensor,
                      encoder_attention_mask: torch.Tensor, pooled_projections: torch.Tensor,
                      timestep_ratio: torch.Tensor) -> list[list[torch.Tensor]]:
        if isinstance(sample, torch.Tensor) or len(sample) == 0:
            raise ValueError("sample must be a non-empty list of columns, each a list of clips [B, C, t, h, w]")
        columns = [[col] if isinstance(col, torch.Tensor) else list(col) for col in sample]
        batch = columns[0][-1].shape[0]
        for c, clips in enumerate(columns):
            if not clips:
                raise ValueError(f"sample column {c} has no clips")
            for k, clip in enumerate(clips):
                if clip.ndim != 5 or clip.shape[0] != batch or clip.shape[1] != self.latent_channels:
                    raise ValueError(f"sample[{c}][{k}] has shape {tuple(clip.shape)}; expected "
                                     f"[{batch}, {self.latent_channels}, t, h, w] (same batch in every clip)")
                if clip.shape[3] % PATCH or clip.shape[4] % PATCH:
                    raise ValueError(f"sample[{c}][{k}]: height and width {tuple(clip.shape[3:])} must be even "
                                     "(2x2 patches)")
        rows = batch * len(columns)
        T = encoder_hidden_states.shape[1] if encoder_hidden_states.ndim == 3 else -1
        expected = {
            "encoder_hidden_states": (encoder_hidden_states, (rows, T, self.config.joint_attention_dim)),
            "encoder_attention_mask": (encoder_attention_mask, (rows, T)),
            "pooled_projections": (pooled_projections, (rows, self.config.pooled_projection_dim)),
            "timestep_ratio": (timestep_ratio, (rows,)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}: {len(columns)} "
                                 f"columns x batch {batch} = {rows} rows, row r belonging to column r % "
                                 f"{len(columns)}")
        return columns

    @torch.no_grad()
    def _pack(self, columns: list[list[torch.Tensor]], text_mask: torch.Tensor) -> PackedSequence:
        """Positions, rotary tables and attention groups of the packed sequence (built once per call).

        Each column keeps its text up to the last valid token of its longest row: later positions are padding
        in every row of the column, and padding never influences a valid token, so dropping them changes no
        output and saves their compute (T5 prompts are mostly padding).
        """
        device = text_mask.device
        batch, n, T = columns[0][-1].shape[0], len(columns), text_mask.shape[1]
        if _has_no_data(text_mask):
            # Meta / fake tensors (FLOP counting, memory planning) have no values to read: keep all T text
            # tokens and always apply the mask, so the traced cost is that of untrimmed text.
            kept, fully_valid = [T] * n, [False] * n
        else:
            valid_host = text_mask.view(batch, n, T).bool().cpu()  # the call's only device -> host copy
            kept = (valid_host * torch.arange(1, T + 1)).amax(dim=(0, 2)).tolist()  # per column: 1 + last valid
            fully_valid = [bool(valid_host[:, c, :kept[c]].all()) for c in range(n)]
        video_pos, joint_pos, last_pos, groups, last_groups = [], [], [], [], []
        for c, clips in enumerate(columns):
            grid_h, grid_w = clips[-1].shape[3] // PATCH, clips[-1].shape[4] // PATCH
            pos, frame_sizes = [], []
            for clip in clips:
                t, h, w = clip.shape[2], clip.shape[3] // PATCH, clip.shape[4] // PATCH
                gh, gw = (grid_h, grid_w) if self.interp_condition_pos else (h, w)
                pos.append(clip_positions(t, h, w, gh, gw, len(frame_sizes), device))
                frame_sizes += [h * w] * t
            video_pos.append(torch.cat(pos))
            last_pos.append(pos[-1])
            joint_pos += [torch.zeros(kept[c], 3, device=device), video_pos[-1]]
            text_valid = None if fully_valid[c] else text_mask.view(batch, n, T)[:, c, :kept[c]].bool()
            groups.append(self._attention_groups(kept[c], text_valid, frame_sizes))
            first_last = kept[c] + video_pos[-1].shape[0] - last_pos[-1].shape[0]  # where the last clip starts
            last_groups.append(self._queries_from(groups[-1], first_last))
        return PackedSequence(
            batch=batch, text_lens=kept, video_lens=[p.shape[0] for p in video_pos],
            last_lens=[p.shape[0] for p in last_pos], groups=groups, last_groups=last_groups,
            rope_video=rope_tables(torch.cat(video_pos), self.axes_dims_rope),
            rope_joint=rope_tables(torch.cat(joint_pos), self.axes_dims_rope),
            rope_last=rope_tables(torch.cat(last_pos), self.axes_dims_rope),
        )

    def _attention_groups(self, T: int, text_valid: Optional[torch.Tensor], frame_sizes: list[int]
                          ) -> list[AttentionGroup]:
        """How one column's queries attend: its ``T`` text tokens (``text_valid`` ``[B, T]``, or ``None`` when
        none is padding) followed by frames of ``frame_sizes`` tokens.

        A query sees a key when the key is not text padding and, with ``use_temporal_causal``, the key's frame
        is not later than the query's (text counts as frame 0). For padding text queries this differs from the
        reference, which lets them see only each other; no valid token ever reads them, so outputs are equal.

        Tokens are sorted by frame, so the temporal-causal rule is a key *prefix*: each frame's queries (the
        text joins frame 0) attend to the keys up to the end of their frame. No query-by-key mask is needed;
        the only mask is the ``[B, 1, 1, K]`` text-padding row, shared by all groups and layers.
        """
        key_valid = None
        if text_valid is not None:
            key_valid = torch.cat([text_valid, text_valid.new_ones(text_valid.shape[0], sum(frame_sizes))], dim=1)
        ends = [T + s for s in itertools.accumulate(frame_sizes)]
        if not self.use_temporal_causal:
            ends = ends[-1:]
        return [AttentionGroup(n_queries=end - start, k_end=end,
                               mask=None if key_valid is None else key_valid[:, None, None, :end])
                for start, end in zip([0] + ends[:-1], ends)]

    @staticmethod
    def _queries_from(groups: list[AttentionGroup], first: int) -> list[AttentionGroup]:
        """The groups restricted to queries ``first`` onwards (masks only depend on keys, so they carry over)."""
        out, start = [], 0
        for g in groups:
            end = start + g.n_queries
            if end > first:
                out.append(AttentionGroup(n_queries=end - max(start, first), k_end=g.k_end, mask=g.mask))
            start = end
        return out

    def forward(
        self,
        sample: Sequence[Column],
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep_ratio: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Predict each column's last clip.

        Args:
            sample: columns, each a list of clips ``[B, C, t, h, w]`` (history first, predicted clip last;
                ``h``, ``w`` even). A bare tensor counts as a one-clip column.
            encoder_hidden_states: text tokens ``[B*n, T, joint_attention_dim]``, row r -> column r % n.
            encoder_attention_mask: ``[B*n, T]``, 1 = token, 0 = padding.
            pooled_projections: ``[B*n, pooled_projection_dim]``.
            timestep_ratio: ``[B*n]`` timesteps on the 0-1000 scale.

        Returns:
            One tensor per column, shaped like the column's last clip.
        """
        columns = self._check_inputs(sample, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                                     timestep_ratio)
        seq = self._pack(columns, encoder_attention_mask)
        B, n = seq.batch, seq.n_columns

        temb = self.time_text_embed(timestep_ratio, pooled_projections)
        text = encoder_hidden_states.view(B, n, *encoder_hidden_states.shape[1:])
        text = self.context_embedder(torch.cat([text[:, c, :t] for c, t in enumerate(seq.text_lens)], dim=1))
        video = self.x_embedder(torch.cat([patchify(clip) for clips in columns for clip in clips], dim=1))

        for i, block in enumerate(self.transformer_blocks):
            if self._checkpointed(i, len(self.transformer_blocks)):
                video, text = checkpoint(block, video, text, temb, seq, use_reentrant=False)
            else:
                video, text = block(video, text, temb, seq)

        # Single-stream layout: each column's text then its video.
        x = torch.cat([part for t, v in zip(text.split(seq.text_lens, dim=1), video.split(seq.video_lens, dim=1))
                       for part in (t, v)], dim=1)
        n_single = len(self.single_transformer_blocks)
        for i, block in enumerate(self.single_transformer_blocks):
            # Only the last clips are returned: the final block computes just their tokens.
            args = (x, temb, seq, i == n_single - 1)
            x = checkpoint(block, *args, use_reentrant=False) if self._checkpointed(i, n_single) else block(*args)
        if n_single == 0:
            x = tails(x, seq.joint_lens, seq.last_lens)

        scale, shift = (per_column(c, B) for c in self.norm_out.chunks(temb))
        x = self.proj_out(modulate(self.norm_out.norm(x), scale, shift, seq.last_lens))
        last_shapes = [(clips[-1].shape[2], clips[-1].shape[3] // PATCH, clips[-1].shape[4] // PATCH)
                       for clips in columns]
        return [unpatchify(tok, *shape) for tok, shape in zip(x.split(seq.last_lens, dim=1), last_shapes)]
