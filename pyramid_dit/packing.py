"""How both DiT kinds pack pyramid columns into one token sequence (the ops that work on that sequence are in
:mod:`pyramid_dit.packed_ops`).

A DiT forward call carries several *columns* (pyramid stages, or autoregressive units) at once. A column is a
list of latent clips ``[B, C, t, h, w]``: compressed history first (possibly at lower resolutions), the clip
being denoised last. Each column has its own text rows and timestep; rows are interleaved, row ``r`` belonging
to column ``r % n_columns``. The call returns, per column, the prediction for its last clip only.

Tokens of all columns are packed along the sequence axis (so the linear layers run as few large matrix
multiplies); only the column-dependent steps (adaptive-norm modulation, attention) loop over columns. Attention
inside a column follows the released models:

* text padding is hidden from every query;
* with ``use_temporal_causal`` a token sees the text and the tokens of its own and earlier frames (text counts
  as frame 0). Tokens are sorted by frame, so each frame's queries get the key *prefix* ending with their frame:
  keys they may not see are skipped, not masked, and the only mask is a compact ``[B, 1, 1, K]`` text-padding
  row (no ``L x L`` mask is ever built);
* text is trimmed, per column, to the longest prompt among the column's rows (the rest is padding everywhere).

Rotary positions are (frame, row, col) per token: the frame index runs over the column's clips, history
first; a lower-resolution clip's row/col positions are the last clip's grid resized to it (half-pixel linear).
The miniFLUX kind rotates by all three axes, the SD3 kind by the frame index alone.

:class:`PackedDiTMixin` holds what both model classes share around this: input checks, strict loading and
ratio gradient checkpointing.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake

from pyramid_dit.embeddings import clip_positions, rope_tables
from pyramid_dit.options import ATTENTION_SPLITS
from pyramid_dit.sequence_parallel import SequenceParallel, StreamShard

Column = Union[torch.Tensor, Sequence[torch.Tensor]]


def patchify(clip: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """``[B, C, t, H, W] -> [B, t*(H/p)*(W/p), p*p*C]``, channels ordered (row-in-patch, col-in-patch, C)."""
    B, C, t, H, W = clip.shape
    x = clip.reshape(B, C, t, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 3, 5, 4, 6, 1).reshape(B, t * (H // patch) * (W // patch), patch * patch * C)


def unpatchify(tokens: torch.Tensor, t: int, h: int, w: int, patch: int = 2) -> torch.Tensor:
    """Inverse of :func:`patchify` for a clip of ``t x h x w`` tokens."""
    B = tokens.shape[0]
    x = tokens.reshape(B, t, h, w, patch, patch, -1)
    return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(B, -1, t, h * patch, w * patch)


def _has_no_data(t: torch.Tensor) -> bool:
    """True for meta and fake tensors (shape-only tracing), whose values cannot be copied to the host."""
    return t.is_meta or is_fake(t)


# --------------------------------------------------------------------------------------------------------
# Packed-sequence bookkeeping, built once per forward call
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionGroup:
    """The next ``n_queries`` queries of a column segment attend keys ``[0, k_end)`` of that segment.

    ``mask`` is ``None`` (all those keys visible) or a boolean ``[B, 1, 1, k_end]`` (True = visible: not text
    padding), shared by every layer of the forward call.
    """

    n_queries: int
    k_end: int
    mask: Optional[torch.Tensor]


@dataclass
class PackedSequence:
    """Everything the blocks need to know about how the columns are packed (no parameters, no grads).

    ``groups[c]`` splits column ``c``'s queries (text first, then video) into consecutive runs with their key
    prefix and mask. ``last_groups[c]`` is the same for the queries of the column's last clip alone
    (``last_lens[c]`` tokens, at the end of the segment): the final block computes only those, since nothing
    else is returned. Rotary tables are ``None`` for a model without rotary positions.

    Under sequence parallelism (:mod:`pyramid_dit.sequence_parallel`) ``shards`` maps each stream (``"text"``,
    ``"video"``, ``"joint"``) to this process's part of it. The blocks ask for a stream's token-wise lengths and
    rotary tables with :meth:`lens` / :meth:`rope` (this process's part when sharded, the whole stream otherwise)
    and go to and from whole-sequence attention with :meth:`to_heads` / :meth:`from_heads` (identities without
    SP); groups and the ``*_lens`` fields always describe the whole sequence.
    """

    batch: int
    text_lens: list[int]
    video_lens: list[int]
    last_lens: list[int]
    groups: list[list[AttentionGroup]]
    last_groups: list[list[AttentionGroup]]
    rope_video: Optional[tuple[torch.Tensor, torch.Tensor]]  # rope_tables() of the packed video tokens
    rope_joint: Optional[tuple[torch.Tensor, torch.Tensor]]  # ... of the text-then-video layout (text: angle 0)
    rope_last: Optional[tuple[torch.Tensor, torch.Tensor]]  # ... of the last clips' tokens
    shards: dict[str, StreamShard] = field(default_factory=dict)
    _local_rope: dict[str, Optional[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    @property
    def n_columns(self) -> int:
        return len(self.video_lens)

    @property
    def joint_lens(self) -> list[int]:
        return [t + v for t, v in zip(self.text_lens, self.video_lens)]

    @property
    def sharded(self) -> bool:
        """True under sequence parallelism: the streams the blocks get are this process's parts."""
        return bool(self.shards)

    def lens(self, stream: str) -> list[int]:
        """Per-column token counts of the tensor a block holds for ``stream`` (this process's part under SP)."""
        full = {"text": self.text_lens, "video": self.video_lens, "joint": self.joint_lens}[stream]
        return self.shards[stream].local_lens(full) if self.sharded else full

    def rope(self, stream: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Rotary tables of the tokens a block holds for ``stream`` (``None`` for text: it sits at angle 0)."""
        if stream == "text":
            return None
        if self.sharded:
            if stream not in self._local_rope:
                self._local_rope[stream] = self.shards[stream].rope(getattr(self, f"rope_{stream}"))
            return self._local_rope[stream]
        return getattr(self, f"rope_{stream}")

    def to_heads(self, stream: str, x: torch.Tensor) -> torch.Tensor:
        """``[B, l, H, d]`` held tokens -> whole-stream attention inputs (``[B, L, H/S, d]`` under SP)."""
        return self.shards[stream].to_heads(x) if self.sharded else x

    def from_heads(self, stream: str, y: torch.Tensor) -> torch.Tensor:
        """Whole-stream attention output ``[B, L, h*d]`` -> the held tokens with all heads ``[B, l, H*d]``."""
        return self.shards[stream].from_heads(y) if self.sharded else y

    def split(self, stream: str, x: torch.Tensor) -> torch.Tensor:
        """The whole stream (same on every process) -> the tokens this process holds (itself without SP)."""
        return self.shards[stream].split(x) if self.sharded else x

    def gather(self, stream: str, x: torch.Tensor) -> torch.Tensor:
        """The tokens this process holds -> the whole stream on every process (itself without SP)."""
        return self.shards[stream].gather(x) if self.sharded else x




def attention_groups(T: int, text_valid: Optional[torch.Tensor], frame_sizes: list[int], temporal_causal: bool,
                     split: str = "frame", device: Optional[torch.device] = None) -> list[AttentionGroup]:
    """How one column's queries attend: its ``T`` text tokens (``text_valid`` ``[B, T]``, or ``None`` when none
    is padding) followed by frames of ``frame_sizes`` tokens.

    A query sees a key when the key is not text padding and, with ``temporal_causal``, the key's frame is not
    later than the query's (text counts as frame 0). For padding text queries this differs from the reference,
    which lets them see only each other; no valid token ever reads them, so outputs are equal.

    ``split`` (temporal-causal columns only): ``"frame"`` gives one group per frame, whose keys end at that
    frame, so keys no query of the group may see are skipped, not computed; ``"column"`` gives one group for the
    whole column with the rule as a ``[B or 1, 1, L, L]`` mask, one attention call instead of one per frame for
    more arithmetic (the masked keys are computed). Which is faster depends on the device and the sizes:
    ``tools/benchmark_dit.py`` and ``tools/measure_gpu.py`` time both (``--attention_split``).
    """
    if split not in ATTENTION_SPLITS:
        raise ValueError(f"attention split {split!r}: expected one of {ATTENTION_SPLITS}")
    key_valid = None
    if text_valid is not None:
        key_valid = torch.cat([text_valid, text_valid.new_ones(text_valid.shape[0], sum(frame_sizes))], dim=1)
    ends = [T + s for s in itertools.accumulate(frame_sizes)]
    if temporal_causal and split == "column" and len(ends) > 1:
        sizes = torch.tensor([T + frame_sizes[0], *frame_sizes[1:]])
        frame = torch.repeat_interleave(torch.arange(len(frame_sizes)), sizes).to(device)
        mask = (frame[None, :] <= frame[:, None])[None, None]
        if key_valid is not None:
            mask = mask & key_valid[:, None, None, :]
        return [AttentionGroup(n_queries=ends[-1], k_end=ends[-1], mask=mask)]
    if not temporal_causal:
        ends = ends[-1:]
    return [AttentionGroup(n_queries=end - start, k_end=end,
                           mask=None if key_valid is None else key_valid[:, None, None, :end])
            for start, end in zip([0] + ends[:-1], ends)]


def queries_from(groups: list[AttentionGroup], first: int) -> list[AttentionGroup]:
    """The groups restricted to queries ``first`` onwards (a key-only mask carries over, a per-query one loses
    the rows of the dropped queries)."""
    out, start = [], 0
    for g in groups:
        end = start + g.n_queries
        if end > first:
            mask = g.mask
            if mask is not None and mask.shape[2] > 1:
                mask = mask[:, :, max(start, first) - start:]
            out.append(AttentionGroup(n_queries=end - max(start, first), k_end=g.k_end, mask=mask))
        start = end
    return out


@torch.no_grad()
def pack_columns(columns: list[list[torch.Tensor]], text_mask: torch.Tensor, *, patch: int,
                 rope_axes: Optional[Sequence[int]], joint_rope: bool, interp_condition_pos: bool,
                 temporal_causal: bool, sp: Optional[SequenceParallel] = None,
                 attention_split: str = "frame") -> PackedSequence:
    """Positions, rotary tables and attention groups of the packed sequence (built once per call).

    ``rope_axes``: rotary channels per position axis, over the first ``len(rope_axes)`` of (frame, row, col);
    ``None`` for no rotary positions. ``joint_rope`` also builds the table of the text-then-video layout (the
    single-stream blocks need it).

    ``sp``: split every stream over this sequence-parallel group (see :class:`PackedSequence`).
    ``attention_split``: one attention call per frame or per column (:func:`attention_groups`).

    Each column keeps its text up to the last valid token of its longest row: later positions are padding in
    every row of the column, and padding never influences a valid token, so dropping them changes no output and
    saves their compute (T5 prompts are mostly padding).
    """
    device = text_mask.device
    batch, n, T = columns[0][-1].shape[0], len(columns), text_mask.shape[1]
    if _has_no_data(text_mask):
        # Meta / fake tensors (FLOP counting, memory planning) have no values to read: keep all T text tokens
        # and always apply the mask, so the traced cost is that of untrimmed text.
        kept, fully_valid = [T] * n, [False] * n
    else:
        valid_host = text_mask.view(batch, n, T).bool().cpu()  # the call's only device -> host copy
        kept = (valid_host * torch.arange(1, T + 1)).amax(dim=(0, 2)).tolist()  # per column: 1 + last valid
        fully_valid = [bool(valid_host[:, c, :kept[c]].all()) for c in range(n)]
    n_axes = len(rope_axes) if rope_axes is not None else 0
    video_pos, last_pos, groups, last_groups = [], [], [], []
    for c, clips in enumerate(columns):
        grid_h, grid_w = clips[-1].shape[3] // patch, clips[-1].shape[4] // patch
        pos, frame_sizes = [], []
        for clip in clips:
            t, h, w = clip.shape[2], clip.shape[3] // patch, clip.shape[4] // patch
            gh, gw = (grid_h, grid_w) if interp_condition_pos else (h, w)
            pos.append(clip_positions(t, h, w, gh, gw, len(frame_sizes), device)[:, :n_axes])
            frame_sizes += [h * w] * t
        video_pos.append(torch.cat(pos))
        last_pos.append(pos[-1])
        text_valid = None if fully_valid[c] else text_mask.view(batch, n, T)[:, c, :kept[c]].bool()
        groups.append(attention_groups(kept[c], text_valid, frame_sizes, temporal_causal, attention_split, device))
        first_last = kept[c] + video_pos[-1].shape[0] - last_pos[-1].shape[0]  # where the last clip starts
        last_groups.append(queries_from(groups[-1], first_last))

    video_lens, last_lens = [p.shape[0] for p in video_pos], [p.shape[0] for p in last_pos]
    rope_video = rope_joint = rope_last = None
    if n_axes:
        # Angles (float64) are formed once, for the video tokens. The other layouts reuse those rows: a column's
        # last clip is the end of its video rows, and text sits at angle 0 (cos 1, sin 0).
        rope_video = rope_tables(torch.cat(video_pos), rope_axes)
        per_column = [table.split(video_lens) for table in rope_video]
        rope_last = tuple(torch.cat([rows[-n_last:] for rows, n_last in zip(parts, last_lens)])
                          for parts in per_column)
        if joint_rope:
            cos = rope_video[0]
            text_cos, text_sin = cos.new_ones(max(kept), cos.shape[1]), cos.new_zeros(max(kept), cos.shape[1])
            rope_joint = tuple(torch.cat([r for rows, t in zip(parts, kept) for r in (text[:t], rows)])
                               for parts, text in zip(per_column, (text_cos, text_sin)))

    seq = PackedSequence(
        batch=batch, text_lens=kept, video_lens=video_lens, last_lens=last_lens, groups=groups,
        last_groups=last_groups, rope_video=rope_video, rope_joint=rope_joint, rope_last=rope_last,
    )
    if sp is not None and sp.size > 1:
        seq.shards = {"text": StreamShard(sp, sum(seq.text_lens)), "video": StreamShard(sp, sum(seq.video_lens)),
                      "joint": StreamShard(sp, sum(seq.joint_lens))}
    return seq


# --------------------------------------------------------------------------------------------------------
# Ops on the packed layout
# --------------------------------------------------------------------------------------------------------

def check_columns(sample: Sequence[Column], encoder_hidden_states: torch.Tensor,
                  encoder_attention_mask: torch.Tensor, pooled_projections: torch.Tensor,
                  timestep_ratio: torch.Tensor, *, latent_channels: int, patch: int, text_dim: int,
                  pooled_dim: int) -> list[list[torch.Tensor]]:
    """Validate a forward call's inputs (see the module docstring); returns the columns as lists of clips."""
    if isinstance(sample, torch.Tensor) or len(sample) == 0:
        raise ValueError("sample must be a non-empty list of columns, each a list of clips [B, C, t, h, w]")
    columns = [[col] if isinstance(col, torch.Tensor) else list(col) for col in sample]
    batch = columns[0][-1].shape[0]
    for c, clips in enumerate(columns):
        if not clips:
            raise ValueError(f"sample column {c} has no clips")
        for k, clip in enumerate(clips):
            if clip.ndim != 5 or clip.shape[0] != batch or clip.shape[1] != latent_channels:
                raise ValueError(f"sample[{c}][{k}] has shape {tuple(clip.shape)}; expected "
                                 f"[{batch}, {latent_channels}, t, h, w] (same batch in every clip)")
            if clip.shape[3] % patch or clip.shape[4] % patch:
                raise ValueError(f"sample[{c}][{k}]: height and width {tuple(clip.shape[3:])} must be multiples "
                                 f"of the patch size {patch} (even for 2x2 patches)")
    rows = batch * len(columns)
    T = encoder_hidden_states.shape[1] if encoder_hidden_states.ndim == 3 else -1
    expected = {
        "encoder_hidden_states": (encoder_hidden_states, (rows, T, text_dim)),
        "encoder_attention_mask": (encoder_attention_mask, (rows, T)),
        "pooled_projections": (pooled_projections, (rows, pooled_dim)),
        "timestep_ratio": (timestep_ratio, (rows,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}: {len(columns)} "
                             f"columns x batch {batch} = {rows} rows, row r belonging to column r % {len(columns)}")
    return columns


def packed_text(encoder_hidden_states: torch.Tensor, seq: PackedSequence) -> torch.Tensor:
    """Rows ``[B*n, T, D]`` -> the packed, per-column trimmed text ``[B, sum(text_lens), D]``."""
    text = encoder_hidden_states.view(seq.batch, seq.n_columns, *encoder_hidden_states.shape[1:])
    return torch.cat([text[:, c, :t] for c, t in enumerate(seq.text_lens)], dim=1)


class PackedDiTMixin:
    """Loading and gradient checkpointing shared by the DiT classes (mixed in before ``ModelMixin``).

    A class defines ``_checkpointed_blocks(n)``: the indices, among ``n`` blocks of one kind, that are
    recomputed in the backward pass at the current ``gradient_checkpointing_ratio`` (each kind follows the rule
    of its reference implementation).
    """

    gradient_checkpointing: bool
    gradient_checkpointing_ratio: float
    sequence_parallel: Optional[SequenceParallel] = None  # set by enable_sequence_parallel
    # One attention call per frame (keys past it skipped) or per column (one masked call): same outputs, see
    # packing.attention_groups. Not part of the config: it changes speed, not the model.
    attention_split: str = "frame"

    def enable_sequence_parallel(self, group: "Union[dist.ProcessGroup, SequenceParallel, None]") -> None:
        """Split each forward call's sequence over the processes of ``group`` (Ulysses,
        :mod:`pyramid_dit.sequence_parallel`); ``None`` or a group of one turns it off.

        Every process of the group must make the same calls with the same inputs (one sample, split by
        tokens); each returns the whole output. The model's head count must be a multiple of the group size.
        """
        sp = group if group is None or isinstance(group, SequenceParallel) else SequenceParallel.of(group)
        if sp is not None and sp.size > 1:
            n_heads = self.config.num_attention_heads
            if n_heads % sp.size:
                raise ValueError(f"sequence parallelism over {sp.size} processes needs a head count divisible by "
                                 f"it; the model has {n_heads} heads: choose SP_SIZE among the divisors of "
                                 f"{n_heads}")
        self.sequence_parallel = sp if sp is not None and sp.size > 1 else None

    def enable_gradient_checkpointing(self, ratio: Optional[float] = None) -> None:
        """Recompute a ``ratio`` share of the blocks during backward (training mode only).

        ``ratio`` defaults to the configured ``gradient_checkpointing_ratio``.
        """
        if ratio is not None:
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"gradient checkpointing ratio {ratio} must be in [0, 1]")
            self.gradient_checkpointing_ratio = float(ratio)
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def compile_blocks(self) -> None:
        """``torch.compile`` (inductor) every transformer block's forward, from the next call on.

        A block's graph is specialised to the packed layout of its call (clip shapes, trimmed text lengths,
        column segments), so each new layout compiles again (tens of seconds on a small CPU). Training changes the
        layout nearly every step (prompt lengths, AR stages), so the trainer does not offer it: measured on the
        tiny model, full-sequence training took 56-64 s per step compiled against 0.04-0.06 s eager, with equal
        losses. It is for fixed layouts: ``tools/benchmark_dit.py --compile`` times it on its fixed batch. Outputs
        and gradients match the eager blocks to float32 rounding (``tests/test_compile.py``). Module structure
        and state dict are unchanged (the bound ``forward`` methods are wrapped).
        """
        for name in ("transformer_blocks", "single_transformer_blocks"):
            for block in getattr(self, name, ()):
                block.forward = torch.compile(block.forward, dynamic=False)

    def _last_only(self, is_last: bool) -> bool:
        """Whether the final block may compute the last clips' tokens alone (not under sequence parallelism,
        where those tokens are spread over the processes: the whole stream is computed, then gathered)."""
        return is_last and self.sequence_parallel is None

    def _checkpointed_blocks(self, n_blocks: int) -> range:
        raise NotImplementedError

    def _checkpointed(self, index: int, n_blocks: int) -> bool:
        return (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                and index in self._checkpointed_blocks(n_blocks))

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
                             + f". Check that the folder holds a {cls.__name__} checkpoint and that config.json "
                             "matches it.")
        return (model, info) if want_info else model
