"""How both DiT kinds pack pyramid columns into one token sequence (the ops that work on that sequence are in
:mod:`pyramid_dit.packed_ops`).

A DiT forward call carries several *columns* (pyramid stages, or autoregressive units) at once. A column is a
list of latent clips ``[B, C, t, h, w]``: compressed history first (possibly at lower resolutions), the clip
being denoised last. Each column has its own text rows and timestep; rows are interleaved, row ``r`` belonging
to column ``r % n_columns``. The call returns, per column, the prediction for its last clip only.

Tokens of all columns are packed along the sequence axis (so the linear layers run as few large matrix
multiplies); the column-dependent steps (adaptive-norm modulation, gated residuals) broadcast each column's vector
over its segment with one gather (:class:`Segments`). Attention inside a column follows the released models:

* text padding is hidden from every query;
* with ``use_temporal_causal`` a token sees the text and the tokens of its own and earlier frames (text counts
  as frame 0);
* text is trimmed, per column, to the longest prompt among the column's rows (the rest is padding everywhere),
  when the prompt lengths are known on the host (a CPU mask, or ``text_lengths``); a mask that lives only on
  the device is never read back (that would stall the host on the device): its text is kept whole and masked.

Three ways to run that attention, the same function (``attention_split``, :data:`ATTENTION_SPLITS`):

* ``flex`` (the CUDA default): one FlexAttention call per block over the whole packed sequence of every column,
  with one block-sparse mask per forward call built on the host from the packing (:class:`FlexMask`): tiles of
  128 x 128 (query, key) pairs that no query may see are skipped, tiles every query sees fully run unmasked;
* ``frame`` (the CPU default, and where FlexAttention is unavailable): per column, one SDPA call per frame over
  the key *prefix* ending with that frame (tokens are sorted by frame): keys a frame may not see are skipped, and
  the only mask is a compact ``[B, 1, 1, K]`` text-padding row;
* ``column``: per column, one SDPA call with the rule as an ``L x L`` mask.

Rotary positions are (frame, row, col) per token: the frame index runs over the column's clips, history
first; a lower-resolution clip's row/col positions are the last clip's grid resized to it (half-pixel linear).
The miniFLUX kind rotates by all three axes, the SD3 kind by the frame index alone.

:class:`PackedDiTMixin` holds what both model classes share around this: input checks, strict loading and
ratio gradient checkpointing.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake

from pyramid_dit.embeddings import clip_positions, rope_tables
from pyramid_dit.options import ATTENTION_SPLITS
from pyramid_dit.sequence_parallel import SequenceParallel, StreamShard

Column = Union[torch.Tensor, Sequence[torch.Tensor]]

FLEX_BLOCK = 128  # FlexAttention's sparse tile (queries x keys); packed lengths are padded to a multiple of it


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


def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch >= 2.5) and, for CUDA, the Triton compiler it generates with."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention_split(split: str, device: torch.device) -> str:
    """The concrete attention form ``split`` means on ``device`` (``auto``: see :data:`ATTENTION_SPLITS`).

    Meta tensors resolve like CUDA: the planner and ``tools/benchmark_dit.py --count_ops`` trace on them what a
    GPU would run.
    """
    if split not in ATTENTION_SPLITS:
        raise ValueError(f"attention split {split!r}: expected one of {ATTENTION_SPLITS}")
    if split != "auto":
        return split
    if device.type == "meta" or (device.type == "cuda" and flex_available() and _has_triton()):
        return "flex"
    return "frame"


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def ship(parts: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host int32 arrays -> device tensors of the same shapes, in one copy that does not make the host wait.

    The arrays are packed into one buffer (page-locked for CUDA, so ``non_blocking`` really overlaps with the
    device's queued work instead of synchronising the stream first) and copied once; the results are views of
    the device copy. Built with numpy so that neither a ``torch.device`` context nor a fake-tensor mode around the
    forward call turns these host values into shape-only tensors.
    """
    flat = np.concatenate([np.ascontiguousarray(a, dtype=np.int32).reshape(-1) for a in parts]) if parts else \
        np.zeros(0, dtype=np.int32)
    host = torch.from_numpy(flat)
    if device.type == "cuda":
        host = host.pin_memory()
    buffer = host.to(device, non_blocking=True) if device.type != "cpu" else host
    out, start = [], 0
    for a in parts:
        out.append(buffer[start:start + a.size].view(a.shape))
        start += a.size
    return out


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without making the host wait for the device's queued work (a plain
    ``.to(device)`` from pageable memory synchronises the CUDA stream first)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass(frozen=True)
class HostText:
    """What the packing knows on the host about the text rows of one call.

    ``kept[c]``: text positions kept for column ``c`` (1 + the last valid position among its rows, or all of
    them when unknown); ``fully_valid[c]``: no kept position of column ``c`` is padding in any row;
    ``row_lengths[b][c]``: the valid (leading) tokens of batch item ``b``'s row of column ``c``, or ``None`` when
    the host does not know them exactly (then attention reads the device mask).
    """

    kept: list[int]
    fully_valid: list[bool]
    row_lengths: Optional[list[list[int]]]


def host_text(text_mask: torch.Tensor, batch: int, n_columns: int,
              text_lengths: Optional[Sequence[int]] = None) -> HostText:
    """Host facts about the text rows (``[B*n, T]`` mask, row ``b*n + c``), without reading the device.

    ``text_lengths``: per row, its number of leading valid tokens (rows are valid then padding), known on the
    host (``TextFeatures.host_lengths``). Without it a CPU mask is read directly (it is host memory); a mask on
    a device (or a meta / fake one) is not: all ``T`` positions are kept and always masked.
    """
    T = text_mask.shape[1]
    if text_lengths is not None:
        lengths = [int(v) for v in text_lengths]
        if len(lengths) != batch * n_columns or not all(0 <= v <= T for v in lengths):
            raise ValueError(f"text_lengths must give one count in [0, {T}] per text row ({batch * n_columns} "
                             f"rows), got {list(text_lengths)}")
        rows = [[lengths[b * n_columns + c] for c in range(n_columns)] for b in range(batch)]
        kept = [max(rows[b][c] for b in range(batch)) for c in range(n_columns)]
        fully_valid = [all(rows[b][c] == kept[c] for b in range(batch)) for c in range(n_columns)]
        return HostText(kept, fully_valid, rows)
    if text_mask.device.type != "cpu" or _has_no_data(text_mask):
        return HostText([T] * n_columns, [False] * n_columns, None)
    valid = text_mask.numpy().reshape(batch, n_columns, T) != 0  # host memory: no op is dispatched
    ends = np.where(valid.any(-1), T - np.argmax(valid[..., ::-1], axis=-1), 0)  # [B, n]: 1 + last valid
    counts = valid.sum(-1)
    kept = [int(ends[:, c].max()) for c in range(n_columns)]
    fully_valid = [bool(valid[:, c, :kept[c]].all()) for c in range(n_columns)]
    prefix = bool((counts == ends).all())  # every row is valid tokens then padding
    rows = [[int(v) for v in counts[b]] for b in range(batch)] if prefix else None
    return HostText(kept, fully_valid, rows)


# --------------------------------------------------------------------------------------------------------
# Column segments of a packed stream
# --------------------------------------------------------------------------------------------------------

class Segments:
    """How a packed token stream ``[B, S, D]`` splits into consecutive column segments.

    ``lens``: tokens per column (``S`` in all); ``spans``: ``(column, start, stop)`` of the non-empty ones.
    ``batched`` (GPU and meta tensors): ``index`` ``[S]`` is the column of every token and ``onehot`` ``[n, S]``
    the same as an indicator matrix (both on the device, ``None`` for a single column), and the per-column ops
    (:mod:`pyramid_dit.packed_ops`) broadcast a column's vector over its segment with one gather
    (``index_select``) and sum a segment's gradient with one matrix product (``onehot @ grad``), whatever the
    number of columns. Not batched (the CPU, where launches are free and those skinny products slow): they loop
    over ``spans``.
    """

    def __init__(self, lens: Sequence[int], index: Optional[torch.Tensor] = None,
                 onehot: Optional[torch.Tensor] = None, batched: bool = True):
        self.lens = tuple(int(v) for v in lens)
        self.index, self.onehot, self.batched = index, onehot, batched
        starts = itertools.accumulate([0] + list(self.lens[:-1]))
        self.spans = [(c, a, a + n) for c, (a, n) in enumerate(zip(starts, self.lens)) if n]
        self._indicator: dict[torch.dtype, torch.Tensor] = {}

    @property
    def total(self) -> int:
        return sum(self.lens)

    @property
    def single(self) -> bool:
        """Whether one column holds every token (the gather and the product are not needed)."""
        return sum(1 for v in self.lens if v) <= 1

    @property
    def column(self) -> int:
        """The column holding every token, for a :attr:`single` one."""
        return next((c for c, v in enumerate(self.lens) if v), 0)

    @staticmethod
    def host_arrays(lens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(``index``, ``onehot``) of ``lens``, int32 on the host (see :func:`ship`)."""
        index = np.repeat(np.arange(len(lens), dtype=np.int32), np.asarray(lens, dtype=np.int64))
        onehot = (np.arange(len(lens), dtype=np.int32)[:, None] == index[None, :]).astype(np.int32)
        return index, onehot

    @classmethod
    def build(cls, lens: Sequence[int], device: torch.device, batched: bool = True) -> "Segments":
        """Segments of ``lens`` with their device tensors shipped now (tests and one-off calls; a forward call
        ships all of its streams' segments in one copy, :func:`pack_columns`)."""
        seg = cls(lens, batched=batched)
        if batched and not seg.single:
            seg.index, seg.onehot = ship(cls.host_arrays(lens), device)
        return seg

    def indicator(self, dtype: torch.dtype) -> torch.Tensor:
        """``onehot`` in ``dtype`` (for the segment-sum product), converted once per dtype."""
        if dtype not in self._indicator:
            self._indicator[dtype] = self.onehot.to(dtype)
        return self._indicator[dtype]


# --------------------------------------------------------------------------------------------------------
# FlexAttention: one block-sparse mask per (key layout, query set), built on the host from the packing
# --------------------------------------------------------------------------------------------------------

@dataclass
class FlexMask:
    """A FlexAttention call's mask over the packed sequence, and its sizes.

    ``block_mask``: torch's ``BlockMask`` (tiles of :data:`FLEX_BLOCK`), on the device. ``q_len`` / ``kv_len``:
    real queries / keys; the call's tensors are padded to ``q_padded`` / ``kv_padded`` (multiples of the tile,
    so one compiled kernel serves every layout). ``pairs``: the (query, key) pairs the rule allows, summed over
    batch rows, counting text padding as allowed when the host does not know it (the FLOPs the frame split
    counts for the same call; shape-only tracing counts FlexAttention's FLOPs with it).
    """

    block_mask: object
    q_len: int
    q_padded: int
    kv_len: int
    kv_padded: int
    pairs: int


def _round_up(n: int, block: int = FLEX_BLOCK) -> int:
    """``n`` tokens padded to whole tiles, at least two: a dimension of size 1 would be specialised by the compiler
    (one more compilation for short sequences), and real layouts are far longer anyway."""
    return max(2 * block, -(-n // block) * block)


def _mask_mod(codes: torch.Tensor) -> Callable:
    """The rule as FlexAttention's ``mask_mod``: key code ``column * F + frame`` (``-1``: padding) within the
    query's ``[column * F, column * F + frame]``.

    ``codes`` ``[2 + B, W]`` holds the query range (rows 0 and 1) and each batch row's key codes (rows 2 on) in
    one tensor and nothing else is captured, so only tensor shapes (dynamic) differ between one call's closure
    and another's, and the compiled kernel is reused across layouts.
    """
    def mask_mod(b, h, q_idx, kv_idx):
        code = codes[b + 2, kv_idx]
        return (code >= codes[0, q_idx]) & (code <= codes[1, q_idx])
    return mask_mod


def _dense_to_ordered(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BlockMask's (count, indices) form of a boolean ``[..., rows, cols]`` tile matrix: per row, the number of
    set tiles and their column indices first (ascending), then the rest."""
    counts = dense.sum(-1).astype(np.int32)
    order = np.argsort(~dense, axis=-1, kind="stable").astype(np.int32)
    return counts, order


@dataclass(frozen=True)
class _ColumnLayout:
    """One column as the flex masks see it: kept text tokens, token counts of its frames (one frame for the whole
    video without temporal causality), how many of the last frames are the last clip, and its last clip's tokens."""

    text: int
    frames: list[int]
    last_frames: int
    last_tokens: int

    @property
    def video(self) -> int:
        return sum(self.frames)


class FlexPlan:
    """Builds the :class:`FlexMask` of each (key layout, query set) a forward call asks for, once.

    Key layouts: ``"double"`` is all columns' text then all columns' video (the double-stream / joint blocks hold
    the two streams apart), ``"joint"`` is each column's text then its video, column after column (miniFLUX's
    single-stream blocks). Query sets: ``"all"`` (the keys themselves), ``"video"`` (the video tokens of the
    ``"double"`` layout: SD3's text-frozen last block under sequence parallelism), ``"last"`` (the last clips'
    tokens, packed: a stack's final block).

    Each mask is computed on the host from the layout (numpy), exactly: for every 128 x 128 tile whether no
    query may see any key (skipped), every query sees every key (run without ``mask_mod``) or in between; the
    per-token codes ``mask_mod`` reads and the tile lists go to the device in one non-blocking copy.
    """

    def __init__(self, columns: list[_ColumnLayout], batch: int, row_lengths: Optional[list[list[int]]],
                 device: torch.device):
        self.columns, self.batch, self.row_lengths, self.device = columns, batch, row_lengths, device
        self.n_frames = max(len(c.frames) for c in columns) + 1
        self._masks: dict[tuple[str, str], FlexMask] = {}
        self.text_valid: Optional[torch.Tensor] = None  # [B, sum(text)] device mask, when the host lacks lengths

    def key_starts(self, order: str) -> tuple[list[int], list[int], int]:
        """Per column, where its text and its video start in the ``order`` layout, and the layout's length."""
        cols = self.columns
        if order == "double":
            t_total = sum(c.text for c in cols)
            t0 = list(itertools.accumulate([0] + [c.text for c in cols[:-1]]))
            v0 = [t_total + s for s in itertools.accumulate([0] + [c.video for c in cols[:-1]])]
            return t0, v0, t_total + sum(c.video for c in cols)
        if order == "joint":
            j0 = list(itertools.accumulate([0] + [c.text + c.video for c in cols[:-1]]))
            return j0, [s + c.text for s, c in zip(j0, cols)], sum(c.text + c.video for c in cols)
        raise ValueError(f"flex key layout {order!r}: expected 'double' or 'joint'")

    def query_runs(self, order: str, queries: str) -> tuple[list[tuple[int, int, int, int]], int]:
        """Runs ``(column, frame, start, length)`` of queries sharing their visible keys, and the query count."""
        t0, v0, total = self.key_starts(order)
        runs = []
        if queries == "all":
            for c, col in enumerate(self.columns):
                if col.text:
                    runs.append((c, 0, t0[c], col.text))
                starts = itertools.accumulate([v0[c]] + col.frames[:-1])
                runs += [(c, f, s, n) for f, (s, n) in enumerate(zip(starts, col.frames))]
            return runs, total
        if queries == "video" and order == "double":
            first = v0[0] if self.columns else 0
            for c, col in enumerate(self.columns):
                starts = itertools.accumulate([v0[c] - first] + col.frames[:-1])
                runs += [(c, f, s, n) for f, (s, n) in enumerate(zip(starts, col.frames))]
            return runs, sum(c.video for c in self.columns)
        if queries == "last":
            start = 0
            for c, col in enumerate(self.columns):
                first = len(col.frames) - col.last_frames
                sizes = col.frames[first:]
                if sum(sizes) != col.last_tokens:  # frames merged (no temporal causality): the tail of the one
                    sizes = [col.last_tokens]
                for f, n in enumerate(sizes, start=first):
                    runs.append((c, f, start, n))
                    start += n
            return runs, sum(c.last_tokens for c in self.columns)
        raise ValueError(f"flex query set {queries!r} with layout {order!r}")

    def mask(self, order: str, queries: str) -> FlexMask:
        key = (order, queries)
        if key not in self._masks:
            self._masks[key] = self._build(order, queries)
        return self._masks[key]

    def _build(self, order: str, queries: str) -> FlexMask:
        from torch.nn.attention.flex_attention import BlockMask

        cols, B, F_ = self.columns, self.batch, self.n_frames
        t0, v0, kv_len = self.key_starts(order)
        runs, q_len = self.query_runs(order, queries)
        kv_pad, q_pad = _round_up(kv_len), _round_up(q_len)
        nk, nq = kv_pad // FLEX_BLOCK, q_pad // FLEX_BLOCK

        # Per-token codes (see _mask_mod): rows 0-1 each query's range [column * F, column * F + frame] (padding:
        # the empty [1, 0]), rows 2.. each batch row's key codes column * F + frame (-1: padding).
        width = max(q_pad, kv_pad)
        codes = np.full((2 + B, width), -1, dtype=np.int32)
        codes[0], codes[1] = 1, 0
        for c, f, s, n in runs:
            codes[0, s:s + n], codes[1, s:s + n] = c * F_, c * F_ + f
        for c, col in enumerate(cols):
            for b in range(B):
                valid = col.text if self.row_lengths is None else self.row_lengths[b][c]
                codes[2 + b, t0[c]:t0[c] + valid] = c * F_
            starts = list(itertools.accumulate([v0[c]] + col.frames[:-1]))
            for f, (s, n) in enumerate(zip(starts, col.frames)):
                codes[2:, s:s + n] = c * F_ + f

        # Visible keys of each run: its column's text (valid part: known per row, or at most all of it) and the
        # column's video up to the end of the run's frame.
        R = len(runs)
        col_of = np.array([r[0] for r in runs], dtype=np.int64)
        frame_end = np.array([sum(cols[c].frames[:f + 1]) for c, f, _, _ in runs], dtype=np.int64)
        text_start = np.array(t0, dtype=np.int64)[col_of] if R else np.zeros(0, np.int64)
        video_start = np.array(v0, dtype=np.int64)[col_of] if R else np.zeros(0, np.int64)
        kept = np.array([c.text for c in cols], dtype=np.int64)[col_of] if R else np.zeros(0, np.int64)
        if self.row_lengths is None:
            upper, sure = np.broadcast_to(kept, (B, R)), np.zeros((B, R), dtype=np.int64)
        else:
            upper = sure = np.array([[self.row_lengths[b][c] for c in col_of] for b in range(B)], dtype=np.int64)
        lo = np.arange(nk, dtype=np.int64)[None, :] * FLEX_BLOCK
        hi = lo + FLEX_BLOCK

        def overlap(a: np.ndarray, e: np.ndarray) -> np.ndarray:  # [..., R] ranges vs key tiles -> [..., R, nk]
            return np.clip(np.minimum(e[..., None], hi) - np.maximum(a[..., None], lo), 0, None)

        video = overlap(video_start, video_start + frame_end)  # [R, nk]
        any_keys = overlap(text_start, text_start + upper) + video  # [B, R, nk]
        sure_keys = overlap(text_start, text_start + sure) + video
        q_starts = np.array([r[2] for r in runs], dtype=np.int64)
        q_ends = q_starts + np.array([r[3] for r in runs], dtype=np.int64)
        tiles = np.arange(nq, dtype=np.int64)[:, None] * FLEX_BLOCK
        in_tile = ((q_starts[None, :] < tiles + FLEX_BLOCK) & (q_ends[None, :] > tiles)).astype(np.float64)
        nonempty = (in_tile @ (any_keys > 0).astype(np.float64)) > 0  # [B, nq, nk]: a query sees a key of it
        partial_rows = (in_tile @ (sure_keys < FLEX_BLOCK).astype(np.float64)) > 0  # a query misses a key of it
        full, partial = nonempty & ~partial_rows, nonempty & partial_rows
        pairs = int(((upper + (frame_end[None, :] if R else 0)) * (q_ends - q_starts)[None, :]).sum()) if R else 0

        host = [codes]
        for dense in (partial, full, partial.transpose(0, 2, 1), full.transpose(0, 2, 1)):
            counts, order_ = _dense_to_ordered(dense[:, None])
            host += [counts, order_]
        codes_d, kv_n, kv_i, fkv_n, fkv_i, q_n, q_i, fq_n, fq_i = ship(host, self.device)
        if self.row_lengths is None and self.text_valid is not None:
            # The host does not know which text is padding: hide what the device mask hides.
            valid = self._with_text(torch.ones(B, width, dtype=torch.bool, device=self.device), order)
            codes_d = torch.cat([codes_d[:2], torch.where(valid, codes_d[2:], -1)])
        block_mask = BlockMask(seq_lengths=(q_pad, kv_pad), kv_num_blocks=kv_n, kv_indices=kv_i,
                               full_kv_num_blocks=fkv_n, full_kv_indices=fkv_i, q_num_blocks=q_n, q_indices=q_i,
                               full_q_num_blocks=fq_n, full_q_indices=fq_i, BLOCK_SIZE=(FLEX_BLOCK, FLEX_BLOCK),
                               mask_mod=_mask_mod(codes_d))
        return FlexMask(block_mask=block_mask, q_len=q_len, q_padded=q_pad, kv_len=kv_len, kv_padded=kv_pad,
                        pairs=pairs)

    def _with_text(self, valid: torch.Tensor, order: str) -> torch.Tensor:
        """``valid`` ``[B, W]`` with the device text mask written over each column's text positions."""
        t0, _, _ = self.key_starts(order)
        parts, pos, src = [], 0, 0
        for c, col in enumerate(self.columns):
            parts += [valid[:, pos:t0[c]], self.text_valid[:, src:src + col.text]]
            pos, src = t0[c] + col.text, src + col.text
        parts.append(valid[:, pos:])
        return torch.cat(parts, dim=1)


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

    ``attention`` is the attention form of this call (:data:`ATTENTION_SPLITS`, resolved). For ``frame`` and
    ``column``, ``groups[c]`` splits column ``c``'s queries (text first, then video) into consecutive runs with
    their key prefix and mask, and ``last_groups[c]`` is the same for the queries of the column's last clip alone
    (``last_lens[c]`` tokens, at the end of the segment): the final block computes only those, since nothing
    else is returned. For ``flex``, ``flex`` builds the whole-sequence masks (:class:`FlexPlan`) and the groups
    are empty. Rotary tables are ``None`` for a model without rotary positions.

    Under sequence parallelism (:mod:`pyramid_dit.sequence_parallel`) ``shards`` maps each stream (``"text"``,
    ``"video"``, ``"joint"``) to this process's part of it. The blocks ask for a stream's segments and rotations
    with :meth:`segs` / :meth:`rotation` (this process's part when sharded, the whole stream otherwise) and go
    to and from whole-sequence attention with :meth:`to_heads` / :meth:`from_heads` (identities without SP);
    groups and the ``*_lens`` fields always describe the whole sequence.

    ``joint_pad``: tokens of padding the miniFLUX kind appends to its single-stream sequence (``flex`` without
    SP), so the attention inputs are its projections themselves (no padded copy); they count in the last
    column's segment and are never read by a real token.
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
    attention: str = "frame"
    flex: Optional[FlexPlan] = None
    joint_pad: int = 0
    _segs: dict[str, Segments] = field(default_factory=dict)
    _last_index: dict[str, torch.Tensor] = field(default_factory=dict)
    _local_rope: dict[str, Optional[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    _rotation: dict[str, Optional[torch.Tensor]] = field(default_factory=dict)
    _zeros: dict[tuple, torch.Tensor] = field(default_factory=dict)

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

    def segs(self, stream: str) -> Segments:
        """The column segments of the tokens a block holds for ``stream`` (``"text"``, ``"video"``, ``"joint"``
        with its ``joint_pad``) or of the packed last clips (``"last"``)."""
        return self._segs[stream]

    def rope(self, stream: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Rotary tables of the tokens a block holds for ``stream`` (``None`` for text: it sits at angle 0)."""
        if stream == "text":
            return None
        if stream == "last":
            return self.rope_last
        if self.sharded:
            if stream not in self._local_rope:
                self._local_rope[stream] = self.shards[stream].rope(getattr(self, f"rope_{stream}"))
            return self._local_rope[stream]
        return getattr(self, f"rope_{stream}")

    def rotation(self, stream: str) -> Optional[torch.Tensor]:
        """The rotary tables of :meth:`rope` as one complex ``[L, 1, d/2]`` factor (built once per call), with
        identity rows for ``joint_pad``."""
        if stream not in self._rotation:
            tables = self.rope(stream)
            rot = None
            if tables is not None:
                rot = torch.complex(tables[0][:, 0::2], tables[1][:, 1::2])
                if stream == "joint" and self.joint_pad:
                    rot = torch.cat([rot, rot.new_ones(self.joint_pad, rot.shape[1])])
                rot = rot[:, None]
            self._rotation[stream] = rot
        return self._rotation[stream]

    def tails(self, stream: str, x: torch.Tensor) -> torch.Tensor:
        """The last clips' tokens (packed) of a whole ``"video"`` or ``"joint"`` stream ``x`` ``[B, L, ...]``:
        one gather (its backward one scatter), whatever the number of columns."""
        return x.index_select(1, self._last_index[stream])

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

    def zeros(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """Zeros of ``n`` tokens shaped like ``like`` ``[B, l, ...]`` (attention padding), made once per call."""
        key = (n, like.shape[0], *like.shape[2:], like.dtype, like.device)
        if key not in self._zeros:
            self._zeros[key] = like.new_zeros(like.shape[0], n, *like.shape[2:])
        return self._zeros[key]

    def flex_mask(self, order: str, queries: str) -> FlexMask:
        """The FlexAttention mask of the ``order`` key layout and ``queries`` query set (:class:`FlexPlan`)."""
        if self.flex is None:
            raise ValueError(f"this call's attention split is {self.attention!r}, not 'flex'")
        return self.flex.mask(order, queries)


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
    if split not in ("frame", "column"):
        raise ValueError(f"attention split {split!r}: expected one of ('frame', 'column') (per-column SDPA)")
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
                 attention_split: str = "auto", text_lengths: Optional[Sequence[int]] = None) -> PackedSequence:
    """Positions, rotary tables, segments and attention masks of the packed sequence (built once per call).

    ``rope_axes``: rotary channels per position axis, over the first ``len(rope_axes)`` of (frame, row, col);
    ``None`` for no rotary positions. ``joint_rope`` also builds the table of the text-then-video layout (the
    single-stream blocks need it).

    ``sp``: split every stream over this sequence-parallel group (see :class:`PackedSequence`).
    ``attention_split``: how attention runs (:data:`ATTENTION_SPLITS`; ``auto`` by the samples' device).
    ``text_lengths``: per text row, its leading valid tokens, known on the host (see :func:`host_text`).

    Each column keeps its text up to the last valid token of its longest row when the host knows where that is:
    later positions are padding in every row of the column, and padding never influences a valid token, so
    dropping them changes no output and saves their compute (T5 prompts are mostly padding). Nothing here reads
    the device: host facts come from the host, and what the device needs goes there in non-blocking copies.
    """
    device = columns[0][-1].device
    batch, n, T = columns[0][-1].shape[0], len(columns), text_mask.shape[1]
    attention = resolve_attention_split(attention_split, device)
    host = host_text(text_mask, batch, n, text_lengths)
    kept, fully_valid = host.kept, host.fully_valid
    mask = text_mask if _has_no_data(text_mask) else to_device_async(text_mask, device)
    rows = mask.view(batch, n, T)
    n_axes = len(rope_axes) if rope_axes is not None else 0
    video_pos, last_pos, groups, last_groups, layouts = [], [], [], [], []
    for c, clips in enumerate(columns):
        grid_h, grid_w = clips[-1].shape[3] // patch, clips[-1].shape[4] // patch
        pos, frame_sizes = [], []
        for clip in clips:
            t, h, w = clip.shape[2], clip.shape[3] // patch, clip.shape[4] // patch
            gh, gw = (grid_h, grid_w) if interp_condition_pos else (h, w)
            if n_axes:
                pos.append(clip_positions(t, h, w, gh, gw, len(frame_sizes), device)[:, :n_axes])
            frame_sizes += [h * w] * t
        last = clips[-1]
        last_tokens = last.shape[2] * (last.shape[3] // patch) * (last.shape[4] // patch)
        if n_axes:
            video_pos.append(torch.cat(pos))
            last_pos.append(pos[-1])
        layouts.append(_ColumnLayout(text=kept[c], frames=frame_sizes if temporal_causal else [sum(frame_sizes)],
                                     last_frames=last.shape[2] if temporal_causal else 1, last_tokens=last_tokens))
        if attention in ("frame", "column"):
            text_valid = None if fully_valid[c] else rows[:, c, :kept[c]].bool()
            groups.append(attention_groups(kept[c], text_valid, frame_sizes, temporal_causal, attention, device))
            last_groups.append(queries_from(groups[-1], kept[c] + sum(frame_sizes) - last_tokens))

    video_lens, last_lens = [lay.video for lay in layouts], [lay.last_tokens for lay in layouts]
    rope_video = rope_joint = rope_last = None
    if n_axes:
        # Angles (float64) are formed once, for the video tokens. The other layouts reuse those rows: a column's
        # last clip is the end of its video rows, and text sits at angle 0 (cos 1, sin 0).
        rope_video = rope_tables(torch.cat(video_pos), rope_axes)
        per_column = [table.split(video_lens) for table in rope_video]
        rope_last = tuple(torch.cat([rows_[-n_last:] for rows_, n_last in zip(parts, last_lens)])
                          for parts in per_column)
        if joint_rope:
            cos = rope_video[0]
            text_cos, text_sin = cos.new_ones(max(kept), cos.shape[1]), cos.new_zeros(max(kept), cos.shape[1])
            rope_joint = tuple(torch.cat([r for rows_, t in zip(parts, kept) for r in (text[:t], rows_)])
                               for parts, text in zip(per_column, (text_cos, text_sin)))

    seq = PackedSequence(
        batch=batch, text_lens=kept, video_lens=video_lens, last_lens=last_lens, groups=groups,
        last_groups=last_groups, rope_video=rope_video, rope_joint=rope_joint, rope_last=rope_last,
        attention=attention,
    )
    if sp is not None and sp.size > 1:
        seq.shards = {"text": StreamShard(sp, sum(seq.text_lens)), "video": StreamShard(sp, sum(seq.video_lens)),
                      "joint": StreamShard(sp, sum(seq.joint_lens))}
    if attention == "flex":
        seq.flex = FlexPlan(layouts, batch, host.row_lengths, device)
        if host.row_lengths is None and not all(fully_valid):
            seq.flex.text_valid = torch.cat([rows[:, c, :kept[c]] for c in range(n)], dim=1).bool()
        if joint_rope and not seq.sharded:
            seq.joint_pad = _round_up(sum(seq.joint_lens)) - sum(seq.joint_lens)
    _ship_segments(seq, device)
    return seq


def _ship_segments(seq: PackedSequence, device: torch.device) -> None:
    """Segments of every stream a block may hold, and the last clips' token indices, in one device copy."""
    lens = {stream: list(seq.lens(stream)) for stream in ("text", "video", "joint")}
    lens["joint"][-1] += seq.joint_pad
    lens["last"] = list(seq.last_lens)  # the last clips are whole (gathered) on every process
    batched = device.type != "cpu"  # see Segments
    segs = {stream: Segments(v, batched=batched) for stream, v in lens.items()}
    host, slots = [], []
    for stream, seg in segs.items():
        if batched and not seg.single:
            host += list(Segments.host_arrays(seg.lens))
            slots.append(stream)
    last_index = {}
    for stream, before in (("video", [0] * seq.n_columns), ("joint", seq.text_lens)):
        starts = itertools.accumulate([0] + [b + v for b, v in zip(before, seq.video_lens)][:-1])
        last_index[stream] = np.concatenate([np.arange(s + b + v - t, s + b + v) for s, b, v, t in
                                             zip(starts, before, seq.video_lens, seq.last_lens)])
        host.append(last_index[stream])
    shipped = ship(host, device)
    for i, stream in enumerate(slots):
        segs[stream].index, segs[stream].onehot = shipped[2 * i], shipped[2 * i + 1]
    seq._segs = segs
    seq._last_index = {"video": shipped[-2], "joint": shipped[-1]}


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
    # How attention runs (ATTENTION_SPLITS: "auto" = FlexAttention on CUDA, one SDPA call per frame elsewhere):
    # same outputs, see the module docstring. Not part of the config: it changes speed, not the model.
    attention_split: str = "auto"

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
