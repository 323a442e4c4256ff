"""The up-front data check: every annotation line verified from file headers before any weights load.

Runs in every training launch (``train/train_pyramid_flow.py``) and alone with ``DRY_RUN=1``. For each line it
checks that the latent exists with 16 channels, the latent size the resolution implies and at least
``NUM_FRAMES`` latent frames; that the text features exist with the shapes the DiT takes; for images, that the
image opens. Only headers are read (safetensors headers; a reference ``.pt`` file is loaded once, weights-only;
an image's header). The result is one summary — usable lines, excluded lines grouped by reason with the first
few paths, clip lengths or image buckets, tokens per sample per stage — instead of one warning per bad sample
during training. A launch where no line is usable stops with that summary and exit status 2.

The evaluation set is checked here too: the lines ``EVAL_FRACTION`` holds out of the annotation (decided by
:mod:`trainer_misc.data.split`; they go to ``DataReport.eval_usable`` and never into ``DataReport.usable``, the
training lines) or every line of ``EVAL_ANNO_FILE`` (checked like the training file). The summary says how many
evaluation samples are usable; asking for an evaluation set that has none stops the launch.

This is the only start-up check: the datasets take the usable lines from here and read no file at start-up.
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from safetensors import SafetensorError, safe_open

from pyramid_dit.options import TEXT_TOKENS
from pyramid_dit.tensor_files import SAFETENSORS_SUFFIXES, TensorFileError, load_tensor_file
from trainer_misc.data.annotation import (
    AnnotationError,
    ImageEntry,
    VideoEntry,
    default_empty_prompt_path,
    parse_annotation,
    resolve_data_root,
)
from trainer_misc.data.datasets import closest_bucket
from trainer_misc.data.features import LATENT_CHANNELS, LATENT_KEY, TEXT_FEATURE_KEYS
from trainer_misc.data.resolution import IMAGE_BUCKETS, parse_resolution
from trainer_misc.data.split import held_out_lines

SHOWN_PATHS = 3  # example paths printed per exclusion reason
EXIT_NO_DATA = 2


class DataCheckFailed(SystemExit):
    """Training cannot start on this data: exit status 2, and ``reason`` says why in one line (the launcher's last
    line); the summary printed before it has the details."""

    def __init__(self, reason: str) -> None:
        super().__init__(EXIT_NO_DATA)
        self.reason = reason


@dataclass(frozen=True)
class DataSpec:
    """What the launch trains on; names follow the entry point's flags (script variables in messages)."""

    anno_file: str
    task: str = "t2v"  # t2v (video latents) | t2i (images)
    resolution: str = "384p"
    num_frames: int = 16  # latent frames per clip (NUM_FRAMES / --max_frames)
    data_root: Optional[str] = None
    load_text_encoder: bool = False
    text_drop_rate: float = 0.1
    empty_prompt_fea: Optional[str] = None
    text_dims: Optional[tuple[int, int]] = None  # DiT (joint_attention_dim, pooled_projection_dim)
    eval_anno_file: Optional[str] = None  # EVAL_ANNO_FILE: a separate evaluation set
    eval_fraction: float = 0.0  # EVAL_FRACTION: lines of anno_file held out of training for evaluation
    seed: int = 42  # the held-out split's seed (the run's --seed)

    @property
    def wants_eval(self) -> bool:
        return bool(self.eval_anno_file) or self.eval_fraction > 0


@dataclass(frozen=True)
class UsableLine:
    """A line that passed: its entry and what the dataset needs (latent frames, or the image's bucket)."""

    entry: Union[VideoEntry, ImageEntry]
    frames: int = 1
    bucket: int = 0


@dataclass
class DataReport:
    spec: DataSpec
    lines: int = 0
    usable: list[UsableLine] = field(default_factory=list)
    excluded: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason -> "path: detail"
    fatal: list[str] = field(default_factory=list)  # problems that stop the launch whatever the lines say
    lengths: Counter = field(default_factory=Counter)  # latent frames of usable clips / image buckets
    short_lengths: Counter = field(default_factory=Counter)  # latent frames of clips shorter than NUM_FRAMES
    text_tokens: int = 0
    eval_usable: list[UsableLine] = field(default_factory=list)  # the evaluation set (never trained on)
    eval_lines: int = 0  # lines held out (EVAL_FRACTION) or in EVAL_ANNO_FILE
    eval_report: Optional["DataReport"] = None  # EVAL_ANNO_FILE's own check
    eval_overlap: list[str] = field(default_factory=list)  # EVAL_ANNO_FILE samples that ANNO_FILE also trains on

    @property
    def ok(self) -> bool:
        return bool(self.usable) and not self.fatal


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes stored in ``path``: the safetensors header, or a ``.pt`` file loaded once (weights-only)."""
    if not path.is_file():
        raise FileNotFoundError(str(path))
    if path.suffix in SAFETENSORS_SUFFIXES:
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise TensorFileError(f"not a readable safetensors file ({e})") from None
    obj = load_tensor_file(path)
    if isinstance(obj, dict):
        return {k: tuple(v.shape) for k, v in obj.items()}
    return {LATENT_KEY: tuple(obj.shape)}


def _check_text(path: Optional[Path], spec: DataSpec) -> tuple[Optional[str], str, int]:
    """(reason or None, detail, text tokens) for a text-feature file."""
    if path is None:
        return "no \"text_fea\" on the line (run tools/extract_text_features.py, or train with --load_text_encoder)", \
            "", 0
    try:
        shapes = _shapes(path)
    except FileNotFoundError:
        return "text_fea file missing (run tools/extract_text_features.py)", str(path), 0
    except TensorFileError as e:
        return "text_fea file unreadable", f"{path}: {e}", 0
    missing = [k for k in TEXT_FEATURE_KEYS if k not in shapes]
    if missing:
        return "text_fea file lacks prompt_embed / prompt_attention_mask / pooled_prompt_embed", \
            f"{path}: missing {missing}", 0
    emb, mask, pooled = (shapes[k] for k in TEXT_FEATURE_KEYS)
    if len(emb) != 3 or emb[0] != 1 or mask != emb[:2] or len(pooled) != 2 or pooled[0] != 1:
        return "text_fea shapes are not prompt_embed [1, L, D], mask [1, L], pooled [1, P]", \
            f"{path}: {emb}, {mask}, {pooled}", 0
    if spec.text_dims is not None and (emb[2], pooled[1]) != tuple(spec.text_dims):
        return (f"text_fea widths (D, P) do not match the DiT's {tuple(spec.text_dims)} (features of another text "
                "encoder / model kind?)"), f"{path}: D={emb[2]}, P={pooled[1]}", 0
    return None, "", emb[1]


def _video_problem(entry: VideoEntry, spec: DataSpec, latent_hw: tuple[int, int],
                   report: DataReport) -> tuple[Optional[tuple[str, str]], int]:
    if entry.latent is None:
        return ("no \"latent\" on the line (run tools/extract_video_vae_latents.py)", str(entry.video)), 0
    try:
        shape = _shapes(entry.latent).get(LATENT_KEY)
    except FileNotFoundError:
        return ("latent file missing (run tools/extract_video_vae_latents.py)", str(entry.latent)), 0
    except TensorFileError as e:
        return ("latent file unreadable", f"{entry.latent}: {e}"), 0
    if shape is None or len(shape) != 5 or shape[0] != 1 or shape[1] != LATENT_CHANNELS:
        return (f"latent is not [1, {LATENT_CHANNELS}, T, h, w]", f"{entry.latent}: {shape}"), 0
    if tuple(shape[3:]) != latent_hw:
        return ((f"latent size does not match RESOLUTION={spec.resolution} (--resolution), which needs "
                f"{latent_hw[0]}x{latent_hw[1]} latents: re-extract at that resolution or set RESOLUTION to "
                "the data's"), f"{entry.latent}: {shape[3]}x{shape[4]}"), 0
    if shape[2] < spec.num_frames:
        report.short_lengths[shape[2]] += 1
        return (f"clip shorter than NUM_FRAMES={spec.num_frames} (--max_frames) latent frames",
                f"{entry.latent}: {shape[2]} frames"), 0
    return None, shape[2]


def _check_image(entry: ImageEntry, buckets: Sequence[tuple[int, int]]) -> tuple[Optional[tuple[str, str]], int]:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(entry.image) as im:  # reads the header only
            w, h = im.size
    except FileNotFoundError:
        return ("image file missing", str(entry.image)), 0
    except (OSError, UnidentifiedImageError) as e:
        return ("image unreadable", f"{entry.image}: {e}"), 0
    return None, closest_bucket(w, h, buckets)


def image_buckets(resolution: str) -> list[tuple[int, int]]:
    return IMAGE_BUCKETS.get(resolution) or [parse_resolution(resolution)]


def check_data(spec: DataSpec) -> DataReport:
    """Check every line of ``spec.anno_file``; never raises for data problems (they go in the report)."""
    report = DataReport(spec=spec)
    kind = "image" if spec.task == "t2i" else "video"
    try:
        parsed = parse_annotation(spec.anno_file, kind=kind, data_root=spec.data_root)
    except AnnotationError as e:
        report.fatal.append(str(e))
        return report
    report.lines = len(parsed.entries) + len(parsed.issues)
    for issue in parsed.issues:
        report.excluded["annotation line invalid"].append(f"line {issue.line}: {issue.message}")
    width, height = parse_resolution(spec.resolution)
    latent_hw, buckets = (height // 8, width // 8), image_buckets(spec.resolution)
    text_lengths: Counter = Counter()
    for entry in parsed.entries:
        problem, frames, bucket = None, 1, 0
        if isinstance(entry, VideoEntry):
            problem, frames = _video_problem(entry, spec, latent_hw, report)
        else:
            problem, bucket = _check_image(entry, buckets)
        if problem is None and not spec.load_text_encoder:
            reason, detail, tokens = _check_text(entry.text_fea, spec)
            problem = (reason, detail) if reason else None
            if reason is None:
                text_lengths[tokens] += 1
        if problem is not None:
            report.excluded[problem[0]].append(problem[1])
            continue
        report.usable.append(UsableLine(entry=entry, frames=frames, bucket=bucket))
    if len(text_lengths) > 1:
        report.fatal.append(f"text features of different lengths {dict(text_lengths)} cannot share a batch: "
                            "extract them all with the same max_sequence_length")
    report.text_tokens = next(iter(text_lengths), 0)
    _check_empty_prompt(spec, report)
    if spec.wants_eval:
        _split_off_eval(spec, report)
    # What training reads, after the held-out split: clip lengths in latent frames, or image buckets.
    report.lengths = Counter(min(line.frames, spec.num_frames) if isinstance(line.entry, VideoEntry)
                             else buckets[line.bucket] for line in report.usable)
    return report


def _sample_path(line: UsableLine) -> Path:
    entry = line.entry
    return entry.latent if isinstance(entry, VideoEntry) else entry.image


def _split_off_eval(spec: DataSpec, report: DataReport) -> None:
    """The evaluation set: the held-out lines of the annotation (moved out of ``usable``), or EVAL_ANNO_FILE's
    usable lines (checked as the training file is)."""
    if spec.eval_fraction > 0:
        held = held_out_lines(report.lines, spec.eval_fraction, spec.seed)
        report.eval_lines = len(held)
        report.eval_usable = [line for line in report.usable if line.entry.index in held]
        report.usable = [line for line in report.usable if line.entry.index not in held]
        if report.eval_usable and not report.usable:
            report.fatal.append(f"EVAL_FRACTION={spec.eval_fraction} (--eval_fraction) holds out every usable line "
                                "of ANNO_FILE: nothing is left to train on; lower EVAL_FRACTION or add data")
    else:
        # Its own lines, checked as the training file's (the empty prompt is the training file's concern).
        sub = check_data(dataclasses.replace(spec, anno_file=str(spec.eval_anno_file), eval_anno_file=None,
                                             eval_fraction=0.0, text_drop_rate=0.0))
        report.eval_report, report.eval_lines, report.eval_usable = sub, sub.lines, sub.usable
        report.fatal += [f"EVAL_ANNO_FILE (--eval_anno_file): {reason}" for reason in sub.fatal]
        trained = {_sample_path(line) for line in report.usable}
        report.eval_overlap = [str(_sample_path(line)) for line in sub.usable if _sample_path(line) in trained]
    if not report.eval_usable:
        source = (f"EVAL_FRACTION={spec.eval_fraction} (--eval_fraction) held out {report.eval_lines} line(s)"
                  if spec.eval_fraction > 0 else f"EVAL_ANNO_FILE={spec.eval_anno_file} (--eval_anno_file)")
        report.fatal.append(f"the evaluation set is empty: {source}, none usable (reasons above); fix those "
                            "lines, raise EVAL_FRACTION or unset the evaluation set")


def _check_empty_prompt(spec: DataSpec, report: DataReport) -> None:
    if spec.load_text_encoder or spec.text_drop_rate == 0:
        return
    path = Path(spec.empty_prompt_fea) if spec.empty_prompt_fea else default_empty_prompt_path(
        resolve_data_root(spec.anno_file, spec.data_root))
    reason, detail, tokens = _check_text(path, spec)
    if reason is None and report.text_tokens and tokens != report.text_tokens:
        reason, detail = f"has {tokens} text tokens, the captions {report.text_tokens}", str(path)
    if reason is not None:
        report.fatal.append(f"caption dropout (--text_drop_rate {spec.text_drop_rate}) needs the empty prompt's "
                            f"features: {reason} ({detail or path}); run tools/extract_text_features.py (it writes "
                            "them), pass --empty_prompt_fea, use --load_text_encoder, or set --text_drop_rate 0")


def _tokens_per_stage(spec: DataSpec, report: DataReport) -> str:
    if spec.task == "t2i":
        sizes = sorted({b for b in report.lengths}) or image_buckets(spec.resolution)
        return "; ".join(f"{w}x{h}: " + ", ".join(
            f"stage {k} {(h // 8 >> (2 - k)) // 2 * ((w // 8 >> (2 - k)) // 2)}" for k in range(3)) for w, h in sizes)
    width, height = parse_resolution(spec.resolution)
    h, w = height // 8, width // 8
    per_frame = [((h >> (2 - k)) // 2) * ((w >> (2 - k)) // 2) for k in range(3)]
    return ", ".join(f"stage {k}: {n:,}/frame, {n * spec.num_frames:,}/clip" for k, n in enumerate(per_frame)) + \
        (f" (+ {TEXT_TOKENS} text tokens, captions encoded during training)" if spec.load_text_encoder
         else f" (+ {report.text_tokens} text tokens)" if report.text_tokens else "")


def format_report(report: DataReport) -> str:
    spec = report.spec
    n_excluded = sum(len(v) for v in report.excluded.values())
    out = [f"data check: {spec.anno_file}: {report.lines} lines, {len(report.usable)} usable, {n_excluded} excluded"]
    for reason, items in sorted(report.excluded.items(), key=lambda kv: -len(kv[1])):
        out.append(f"  {len(items)} x {reason}")
        out += [f"      {item}" for item in items[:SHOWN_PATHS]]
        if len(items) > SHOWN_PATHS:
            out.append(f"      ... and {len(items) - SHOWN_PATHS} more")
    if report.short_lengths and not report.usable:
        longest = max(report.short_lengths)
        out.append(f"  every readable clip is shorter than NUM_FRAMES={spec.num_frames}: the longest has {longest} "
                   f"latent frames; set NUM_FRAMES (--max_frames) <= {longest} or extract longer clips")
    if report.usable:
        if spec.task == "t2i":
            hist = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(report.lengths.items()))
            out.append(f"  image buckets: {hist}")
        else:
            hist = ", ".join(f"{t}: {n}" for t, n in sorted(report.lengths.items()))
            out.append(f"  clip lengths used (latent frames: clips): {hist}")
        out.append(f"  tokens per sample per stage: {_tokens_per_stage(spec, report)}")
    if spec.wants_eval:
        out += _eval_summary(report)
    out += [f"  STOP: {f}" for f in report.fatal]
    if not report.usable and not report.fatal:
        out.append("  STOP: no usable line; fix the reasons above (nothing was loaded)")
    return "\n".join(out)


def _eval_summary(report: DataReport) -> list[str]:
    spec = report.spec
    if spec.eval_fraction > 0:
        out = [f"  evaluation set: {len(report.eval_usable)} usable of the {report.eval_lines} line(s) EVAL_FRACTION="
               f"{spec.eval_fraction} holds out of {report.lines} (seed {spec.seed}); training uses the other "
               f"{len(report.usable)}"]
    else:
        sub = report.eval_report
        excluded = sum(len(v) for v in sub.excluded.values()) if sub is not None else 0
        out = [f"  evaluation set: EVAL_ANNO_FILE={spec.eval_anno_file}: {report.eval_lines} lines, "
               f"{len(report.eval_usable)} usable, {excluded} excluded"]
        if sub is not None:
            for reason, items in sorted(sub.excluded.items(), key=lambda kv: -len(kv[1])):
                out.append(f"    {len(items)} x {reason}")
                out += [f"        {item}" for item in items[:SHOWN_PATHS]]
    if report.eval_overlap:
        out.append(f"  NOTE: {len(report.eval_overlap)} evaluation sample(s) are also in ANNO_FILE (trained on), e.g. "
                   f"{report.eval_overlap[0]}: their loss is not a held-out figure")
    return out


def run_data_check(spec: DataSpec, *, verbose: bool = True) -> DataReport:
    """Check, print the summary (when ``verbose``: rank 0), and exit with status 2 when training cannot start."""
    report = check_data(spec)
    if verbose:
        print(format_report(report), flush=True)
    if not report.ok:
        why = report.fatal[0] if report.fatal else "no usable line; the data check above lists why"
        raise DataCheckFailed(f"data check of {spec.anno_file}: {len(report.usable)} of {report.lines} lines "
                              f"usable; {why}")
    return report


def is_dry_run() -> bool:
    """``DRY_RUN=1`` (or any value but empty/0): check data and plan, then exit 0 without training."""
    return os.environ.get("DRY_RUN", "") not in ("", "0")
