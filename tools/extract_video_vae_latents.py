"""Encode the videos of an annotation file into causal-VAE latents, one safetensors file per line.

Launch with ``sh scripts/extract_vae_latent.sh`` (torchrun over the visible GPUs, or CPU/gloo processes), or run
directly as a single process::

    python3 tools/extract_video_vae_latents.py --model_path PATH/causal_video_vae \
        --anno_file annotation/video_text.jsonl --width 640 --height 384 --num_frames 121

Per line: decode the needed frames with decord in one batched read (in DataLoader workers, so the next clip is
decoded while the current one is encoded), resize to cover ``width x height`` (bicubic, antialiased) and
center-crop (:func:`pyramid_dit.resize.resize_crop_frames`), keep ``8k+1`` frames (at most ``--num_frames``, at least 9), scale to [-1, 1], encode with temporal
chunking (window 16), and write the raw ``latent_dist.sample()`` ``[1, 16, T, h, w]`` under the key ``"latent"``
to the line's ``latent`` path. The trainer applies the latent shift/scale, as in the reference.

Resumable: outputs are written atomically and a rerun skips every output that already loads as a valid latent
(``--overwrite`` redoes them). Failures (missing, corrupt, too short or non-video inputs; bad annotation lines;
unwritable outputs) are reported per line, counted in the summary and in the jsonl report, and make the exit
status 1 without stopping the other items.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import decord
import torch
from torch.utils.data import DataLoader, Dataset

from pyramid_dit.progress import progress
from pyramid_dit.resize import resize_crop_frames
from pyramid_dit.tensor_files import TensorFileError, read_safetensors_metadata
from tools.cli import DefaultsHelp
from tools.extraction_common import (
    DONE,
    FAILED,
    SKIPPED,
    DistContext,
    ItemResult,
    announce_failures,
    default_report_path,
    issue_results,
    parse_dtype,
    run_extraction,
    shard,
)
from trainer_misc.data.annotation import (
    IMAGE_SUFFIXES,
    AnnotationError,
    VideoEntry,
    parse_annotation,
    resolve_data_root,
)
from trainer_misc.data.features import LATENT_KEY, load_latent
from trainer_misc.data.workers import data_workers
from trainer_misc.files import atomic_save_safetensors, remove_stale_temps, sweep_stale_temps
from trainer_misc.runtime.arguments import CheckedParser, ConfigError, Naming, integer, parse_checked

FRAME_GROUP = 8          # the VAE compresses time by 8 after the first frame: clips are 8k+1 frames long
SPATIAL_SCALE = 8        # ... and height and width by 8
MIN_FRAMES = FRAME_GROUP + 1
ENCODE_WINDOW = 16       # temporal chunk of the chunked encode (the reference tool's setting)


class ClipError(ValueError):
    """A video that cannot be turned into a clip; the message says why (reported per line, not raised out)."""


# --------------------------------------------------------------------------------------------- frames / pixels


def plan_frame_indices(num_available: int, num_frames: int, frames: Sequence[int] | None = None) -> list[int]:
    """Frame indices to decode: ``frames`` (or ``0..``), cut to ``num_frames`` and then to the longest ``8k+1``.

    Raises :class:`ClipError` when an explicit index is past the end or fewer than 9 frames are available.
    """
    if frames is None:
        wanted = list(range(min(num_frames, num_available)))
    else:
        wanted = list(frames[:num_frames])
        past = [f for f in wanted if f >= num_available]
        if past:
            raise ClipError(f"frame index {past[0]} is past the end of the video ({num_available} frames)")
    if len(wanted) < MIN_FRAMES:
        raise ClipError(f"only {len(wanted)} frame(s) available, need at least {MIN_FRAMES} "
                        f"(the first frame plus one group of {FRAME_GROUP})")
    keep = (len(wanted) - 1) // FRAME_GROUP * FRAME_GROUP + 1
    return wanted[:keep]


def read_frames(path: Path, num_frames: int, frames: Sequence[int] | None = None) -> torch.Tensor:
    """Decode the planned frames of ``path`` in one batched decord read: uint8 ``[T, H, W, 3]``."""
    if not path.exists():
        raise ClipError(f"video file {path} does not exist")
    if not path.is_file():
        raise ClipError(f"video path {path} is not a file")
    if path.stat().st_size == 0:
        raise ClipError(f"video file {path} is empty (zero bytes)")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise ClipError(f"{path} is an image, not a video; put it on an image line instead")
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
    except (RuntimeError, decord.DECORDError) as e:
        raise ClipError(f"cannot open {path} as a video (corrupt, truncated or not a video): "
                        f"{str(e).strip().splitlines()[0][:200]}") from None
    try:
        indices = plan_frame_indices(len(reader), num_frames, frames)
    except ClipError as e:
        raise ClipError(f"{path}: {e}") from None
    try:
        batch = reader.get_batch(indices).asnumpy()
    except (RuntimeError, IndexError, decord.DECORDError) as e:
        raise ClipError(f"decoding frames of {path} failed: {str(e).strip().splitlines()[0][:200]}") from None
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ClipError(f"{path} decoded to an unexpected array of shape {batch.shape}")
    return torch.from_numpy(batch)


def load_clip(path: Path, width: int, height: int, num_frames: int,
              frames: Sequence[int] | None = None) -> torch.Tensor:
    """The VAE input for one video: float ``[3, T, height, width]`` in [-1, 1], ``T = 8k+1``."""
    pixels = resize_crop_frames(read_frames(path, num_frames, frames), width, height)
    return (pixels * 2.0 - 1.0).permute(1, 0, 2, 3).contiguous()


# ----------------------------------------------------------------------------------------------------- dataset


def latent_metadata(entry: VideoEntry, width: int, height: int, num_frames: int) -> dict[str, str]:
    """The run settings a latent depends on, stored in its header so a rerun can tell whether it is still valid."""
    return {"video": str(entry.video), "width": str(width), "height": str(height), "max_frames": str(num_frames),
            "frames_spec": json.dumps(list(entry.frames)) if entry.frames is not None else ""}


def stale_reason(entry: VideoEntry, width: int, height: int, num_frames: int) -> str | None:
    """None when the existing latent of ``entry`` is valid for this run; else why it has to be redone."""
    try:
        latent = load_latent(entry.latent)
        meta = read_safetensors_metadata(entry.latent)
    except TensorFileError as e:
        return f"replaced an unreadable existing output ({e})"
    want = (height // SPATIAL_SCALE, width // SPATIAL_SCALE)
    if tuple(latent.shape[-2:]) != want:
        return (f"replaced an existing latent of another size ({latent.shape[-1]}x{latent.shape[-2]}; this run "
                f"makes {want[1]}x{want[0]} from {width}x{height})")
    expected = latent_metadata(entry, width, height, num_frames)
    changed = [k for k in ("max_frames", "frames_spec") if k in meta and meta[k] != expected[k]]
    if changed:
        return f"replaced an existing latent made with other settings ({', '.join(changed)} changed)"
    return None


class ClipDataset(Dataset):
    """Decodes one annotation entry per item in DataLoader workers; never raises for bad data.

    Returns ``{"entry", "action", "pixels", "reason", "decode_s"}`` where ``action`` is "encode" (``pixels`` is
    ``[3, T, H, W]``), "skip" (a valid output exists) or "fail" (``reason`` says why).
    """

    def __init__(self, entries: Sequence[VideoEntry], width: int, height: int, num_frames: int,
                 overwrite: bool = False):
        self.entries = list(entries)
        self.width, self.height, self.num_frames = width, height, num_frames
        self.overwrite = overwrite

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        entry = self.entries[i]
        item = {"entry": entry, "action": "encode", "pixels": None, "reason": None, "decode_s": 0.0}
        if not self.overwrite and entry.latent is not None and entry.latent.exists():
            item["reason"] = stale_reason(entry, self.width, self.height, self.num_frames)
            if item["reason"] is None:
                item["action"] = "skip"
                return item
        t0 = time.perf_counter()
        try:
            item["pixels"] = load_clip(entry.video, self.width, self.height, self.num_frames, entry.frames)
        except ClipError as e:
            item.update(action="fail", reason=str(e))
        item["decode_s"] = time.perf_counter() - t0
        return item


def _no_collate(item: dict) -> dict:
    return item


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decode workers run side by side with the encoder; keep them to one core each


def make_loader(dataset: ClipDataset, num_workers: int, prefetch: int = 2) -> DataLoader:
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_no_collate,
                      worker_init_fn=_worker_init if num_workers > 0 else None,
                      prefetch_factor=prefetch if num_workers > 0 else None,
                      persistent_workers=False)


# ----------------------------------------------------------------------------------------------------- encoding


def load_vae(model_path: str | Path, device: torch.device, dtype: torch.dtype, tiling: bool = False):
    """The frozen causal VAE in eval mode on ``device`` in ``dtype``."""
    from video_vae.modeling_causal_vae import CausalVideoVAE

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"VAE folder {path} has no config.json; pass the causal_video_vae folder of the "
                                "checkpoint (e.g. PATH/pyramid-flow-miniflux/causal_video_vae)")
    vae = CausalVideoVAE.from_pretrained(str(path), torch_dtype=dtype)
    vae = vae.to(device).eval().requires_grad_(False)
    if tiling:
        vae.enable_tiling()
    return vae


@torch.no_grad()
def encode_clip(vae, pixels: torch.Tensor, *, generator: torch.Generator | None = None, latent_kind: str = "sample",
                tile_sample_min_size: int = 256) -> torch.Tensor:
    """Raw latent ``[1, 16, T', h, w]`` of float ``pixels`` ``[1, 3, T, H, W]`` on the VAE's device.

    A half-precision VAE runs under autocast, as in the reference tool: convolutions in half precision, while
    autocast keeps numerically sensitive ops (group norm, softmax) in float32.
    """
    if latent_kind not in ("sample", "mean"):
        raise ValueError(f"latent_kind must be 'sample' or 'mean', got {latent_kind!r}")
    half = vae.dtype != torch.float32
    with torch.autocast(device_type=pixels.device.type, dtype=vae.dtype, enabled=half):
        dist = vae.encode(pixels, temporal_chunk=True, window_size=ENCODE_WINDOW,
                          tile_sample_min_size=tile_sample_min_size).latent_dist
        return dist.sample(generator=generator) if latent_kind == "sample" else dist.mean


def item_generator(seed: int, index: int) -> torch.Generator:
    """Per-line CPU generator: a line's latent does not depend on the number of ranks or the device."""
    return torch.Generator(device="cpu").manual_seed(seed + index)


# --------------------------------------------------------------------------------------------------------- main


def build_parser() -> CheckedParser:
    p = CheckedParser(prog="extract_video_vae_latents.py", description=__doc__.split("\n\n")[0],
                      formatter_class=DefaultsHelp)
    p.add_argument("--model_path", required=True, help="the causal_video_vae folder (holds config.json)")
    p.add_argument("--anno_file", required=True, help="video annotation jsonl (lines need video, text, latent)")
    p.add_argument("--data_root", default=None,
                   help="root for relative paths (default: $PYRAMID_DATA_ROOT, else the annotation file's folder)")
    p.add_argument("--width", type=integer(8, 16384, multiple_of=8, why=" (the VAE downsamples by 8)"),
                   default=640)
    p.add_argument("--height", type=integer(8, 16384, multiple_of=8, why=" (the VAE downsamples by 8)"),
                   default=384)
    p.add_argument("--num_frames", type=integer(MIN_FRAMES, 100_000), default=121,
                   help="at most this many frames per clip; must be 8k+1")
    p.add_argument("--model_dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="VAE weights/activations dtype; the latent is stored in this dtype")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--tiling", action="store_true", help="spatial tiling in the VAE encoder (less memory)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the VAE (inductor): each new clip shape first compiles (a minute or more); "
                        "not faster than eager on a 2-core CPU, may be elsewhere (tools/benchmark_vae.py --compile)")
    p.add_argument("--tile_sample_min_size", type=integer(64, 16384, multiple_of=8), default=256)
    p.add_argument("--latent_kind", default="sample", choices=["sample", "mean"],
                   help="store latent_dist.sample() (the reference) or its mean")
    p.add_argument("--seed", type=integer(0, 2**31 - 1), default=0, help="line i samples with seed + i")
    p.add_argument("--num_workers", type=decode_workers, default=2,
                   help="decode workers per rank (0: decode inline; auto: up to 4); capped by the machine's CPUs and "
                        "memory, with a note")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist and are valid")
    p.add_argument("--report", default=None,
                   help="jsonl report path (default: <annotation stem>.latents_report.jsonl in the deepest folder "
                        "holding all outputs)")
    p.add_argument("--no_progress", action="store_true")
    return p


def decode_workers(text: str) -> int | str:
    """``--num_workers``: ``auto`` or 0..64 (capped by the machine when the loader starts)."""
    return "auto" if str(text).strip() == "auto" else integer(0, 64, why=" or auto")(text)


def check_args(args: argparse.Namespace, n: Naming | None = None) -> None:
    """What the flags' ranges cannot say alone (:class:`ConfigError` naming the setting as its user set it)."""
    n = n or Naming(args)
    if (args.num_frames - 1) % FRAME_GROUP:
        raise ConfigError(f"{n('--num_frames')} must be 8k+1 with k >= 1 (9, 17, ..., 121): the VAE keeps the first "
                          f"frame and then groups of {FRAME_GROUP}")
    if not (Path(args.model_path) / "config.json").is_file():
        raise ConfigError(f"no config.json in {n('--model_path')}; point it at the causal_video_vae folder of the "
                          "checkpoint")
    if not Path(args.anno_file).is_file():
        raise ConfigError(f"annotation file {n('--anno_file')} not found; set it to your video_text.jsonl")


def plan_entries(entries: Sequence[VideoEntry]) -> tuple[list[VideoEntry], list[tuple[VideoEntry, str]]]:
    """Split entries into workable ones and per-line failures that need no decoding (bad output names, two lines
    writing the same latent)."""
    ok: list[VideoEntry] = []
    bad: list[tuple[VideoEntry, str]] = []
    first_line: dict[Path, int] = {}
    for e in entries:
        assert e.latent is not None  # parse_annotation(require=("latent",)) guarantees it
        if e.latent.suffix != ".safetensors":
            bad.append((e, f"latent path {e.latent} must end with .safetensors (this tool writes safetensors; "
                           "rename it in the annotation)"))
        elif e.latent in first_line:
            bad.append((e, f"latent path {e.latent} is also the output of line {first_line[e.latent]}; "
                           "give every line its own latent file"))
        else:
            first_line[e.latent] = e.line
            ok.append(e)
    return ok, bad


def run(args: argparse.Namespace, ctx: DistContext) -> tuple[list[ItemResult], Path]:
    dtype = parse_dtype(args.model_dtype)
    parsed = parse_annotation(args.anno_file, kind="video", require=("latent",), data_root=args.data_root)
    if not parsed.entries and not parsed.issues:
        raise AnnotationError(f"annotation file {args.anno_file} has no lines; nothing to extract")
    entries, bad = plan_entries(parsed.entries)  # type: ignore[arg-type]
    results = issue_results(parsed.issues, ctx.rank, ctx.world_size)
    results += [ItemResult(line=e.line, status=FAILED, input=str(e.video), output=str(e.latent), reason=r,
                           rank=ctx.rank) for e, r in shard(bad, ctx.rank, ctx.world_size, key=lambda b: b[0].index)]
    announce_failures(args.anno_file, results)
    report = Path(args.report) if args.report else default_report_path(
        [e.latent for e in entries], resolve_data_root(args.anno_file, args.data_root),
        f"{Path(args.anno_file).stem}.latents_report.jsonl")

    mine = shard(entries, ctx.rank, ctx.world_size)
    sweep_stale_temps([e.latent for e in mine])  # temp files a killed run left next to this rank's outputs
    vae = load_vae(args.model_path, ctx.device, dtype, tiling=args.tiling)
    if args.compile:
        print(f"rank {ctx.rank}: --compile: the VAE compiles on its first clip of each shape (a minute or more; "
              "nothing is printed meanwhile)", flush=True)
        vae.compile_for_inference()
    workers, note = data_workers(args.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if note and ctx.is_main:
        print(f"note: {note}", flush=True)
    loader = make_loader(ClipDataset(mine, args.width, args.height, args.num_frames, args.overwrite), workers)
    bar = progress(total=len(mine), desc=f"latents rank {ctx.rank}", position=ctx.rank, unit="clip",
                   disable=args.no_progress)
    for item in loader:
        entry: VideoEntry = item["entry"]
        base = dict(line=entry.line, input=str(entry.video), output=str(entry.latent), rank=ctx.rank)
        if item["action"] == "skip":
            results.append(ItemResult(status=SKIPPED, reason="output exists and is valid", **base))
        elif item["action"] == "fail":
            results.append(ItemResult(status=FAILED, reason=item["reason"], **base))
        else:
            results.append(encode_and_write(vae, item, args, ctx, dtype, base))
        announce_failures(args.anno_file, results[-1:])
        bar.update(1)
    bar.close()
    return results, report


def encode_and_write(vae, item: dict, args: argparse.Namespace, ctx: DistContext, dtype: torch.dtype,
                     base: dict) -> ItemResult:
    entry: VideoEntry = item["entry"]
    t0 = time.perf_counter()
    pixels = item["pixels"].unsqueeze(0).to(ctx.device)
    frames = int(pixels.shape[2])
    try:
        latent = encode_clip(vae, pixels, generator=item_generator(args.seed, entry.index),
                             latent_kind=args.latent_kind, tile_sample_min_size=args.tile_sample_min_size)
    except torch.cuda.OutOfMemoryError as e:
        del pixels
        torch.cuda.empty_cache()  # let the next (maybe smaller) clip start from a clean pool
        hint = "" if args.tiling else "; retry with --tiling, or lower --num_frames"
        return ItemResult(status=FAILED, reason=f"out of memory encoding a {args.width}x{args.height} clip of "
                          f"{frames} frames{hint}: {e}", **base)
    latent = latent.to(dtype)
    remove_stale_temps(entry.latent)
    meta = {**latent_metadata(entry, args.width, args.height, args.num_frames), "num_frames": str(frames),
            "latent_kind": args.latent_kind, "model_dtype": args.model_dtype}
    try:
        atomic_save_safetensors({LATENT_KEY: latent}, entry.latent, metadata=meta)
    except OSError as e:
        return ItemResult(status=FAILED, reason=f"cannot write latent {entry.latent}: {e}", **base)
    return ItemResult(status=DONE, reason=item["reason"], seconds=round(time.perf_counter() - t0 + item["decode_s"], 4),
                      extra={"frames": frames, "shape": list(latent.shape)}, **base)


def short_clips_note(results: Sequence[ItemResult], num_frames: int) -> str | None:
    """One line when clips gave fewer frames than ``--num_frames``, with the counts: their latents are shorter,
    and training (which uses each clip at its own length, up to NUM_FRAMES latent frames) gets fewer frames."""
    done = [r.extra["frames"] for r in results if r.status == DONE and "frames" in r.extra]
    short = [f for f in done if f < num_frames]
    if not short:
        return None
    latent = lambda frames: (frames - 1) // FRAME_GROUP + 1  # noqa: E731
    if len(short) == len(done):
        return (f"note: --num_frames (NUM_FRAMES) {num_frames} is more than every clip has: all {len(done)} clips "
                f"extracted were cut to {max(short)} frames at most, i.e. {latent(max(short))} latent frames, not "
                f"{latent(num_frames)}. Training gets at most {latent(max(short))} latent frames per clip.")
    return (f"note: {len(short)} of {len(done)} clips extracted have fewer than --num_frames (NUM_FRAMES) "
            f"{num_frames} frames (shortest: {min(short)} frames = {latent(min(short))} latent frames); their latents "
            "are shorter than the others'.")


def parse_and_check(argv: Sequence[str] | None, variables: dict[str, str] | None = None,
                    values: dict[str, str] | None = None) -> argparse.Namespace:
    """The flags, checked (:func:`trainer_misc.runtime.arguments.parse_checked`; ``variables``: the script's)."""
    return parse_checked(build_parser(), argv, check_args, variables, values)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_and_check(argv)
    except ConfigError as e:  # one clear line, exit status 2, as for a bad flag
        print(f"extract_video_vae_latents.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    return run_extraction(run, args, what="VAE latents", note=lambda rs: short_clips_note(rs, args.num_frames))


if __name__ == "__main__":
    sys.exit(main())
