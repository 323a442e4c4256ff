"""Annotation files: one JSON object per line, validated once and shared by the extraction tools and the trainer.

Format
------
Video lines (``kind="video"``)::

    {"video": "clips/0001.mp4", "text": "a red ball rolls left",
     "latent": "latents/0001.safetensors", "text_fea": "text_fea/0001.safetensors",
     "frames": [0, 2, 4, 6, 8, 10, 12, 14, 16]}

``video`` and ``text`` are always required. ``latent`` (written by ``tools/extract_video_vae_latents.py``, read by
the trainer) and ``text_fea`` (written by ``tools/extract_text_features.py``) are required by whoever uses them:
callers pass ``require=``. ``frames`` is optional: explicit, strictly increasing frame indices to encode (default:
the first ``NUM_FRAMES`` frames).

Image lines (``kind="image"``)::

    {"image": "images/0001.jpg", "text": "a lighthouse at dusk"}

Other keys are allowed and ignored, so richer metadata can ride along. Blank lines are ignored.

Relative paths
--------------
Relative paths resolve against the *data root*, in this order: the ``data_root`` argument (the tools'
``--data_root`` flag), the ``PYRAMID_DATA_ROOT`` environment variable, else the directory holding the annotation
file. Absolute paths are used as they are; ``~`` is expanded.

Errors
------
Every bad line becomes an :class:`AnnotationIssue` naming the file, the 1-based line number and what is wrong.
:func:`parse_annotation` returns them next to the good entries (the extraction tools report and count them per
item); :func:`load_annotation` raises :class:`AnnotationError` listing all of them (the trainer must not start on a
partly broken file).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Union

DATA_ROOT_ENV = "PYRAMID_DATA_ROOT"
# Where tools/extract_text_features.py writes the empty-prompt features (classifier-free-guidance dropout),
# relative to the data root, unless told otherwise.
EMPTY_PROMPT_FILENAME = "empty_prompt_text_fea.safetensors"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})

Kind = Literal["video", "image"]


@dataclass(frozen=True)
class VideoEntry:
    """A validated video line. ``index`` counts non-blank lines from 0 (used to shard work across ranks)."""

    index: int
    line: int
    video: Path
    text: str
    latent: Path | None = None
    text_fea: Path | None = None
    frames: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ImageEntry:
    """A validated image line. ``index`` counts non-blank lines from 0."""

    index: int
    line: int
    image: Path
    text: str
    text_fea: Path | None = None


Entry = Union[VideoEntry, ImageEntry]


@dataclass(frozen=True)
class AnnotationIssue:
    """A line that could not be used, with the reason in words."""

    file: Path
    index: int
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass(frozen=True)
class ParsedAnnotation:
    entries: list[Entry]
    issues: list[AnnotationIssue]


class AnnotationError(ValueError):
    """Raised by :func:`load_annotation` when the file is missing or any line is invalid."""


def resolve_data_root(anno_file: str | os.PathLike, data_root: str | os.PathLike | None = None) -> Path:
    """The directory relative annotation paths resolve against (see module docstring for the order)."""
    if data_root is not None and str(data_root) != "":
        return Path(data_root).expanduser().resolve()
    env = os.environ.get(DATA_ROOT_ENV, "")
    if env:
        return Path(env).expanduser().resolve()
    return Path(anno_file).expanduser().resolve().parent


def default_empty_prompt_path(data_root: str | os.PathLike) -> Path:
    """Where the empty-prompt features live by default: ``<data root>/empty_prompt_text_fea.safetensors``."""
    return Path(data_root) / EMPTY_PROMPT_FILENAME


class _LineError(ValueError):
    pass


def _resolve(value: object, key: str, root: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise _LineError(f'"{key}" must be a non-empty string path, got {value!r}')
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def _text(obj: dict) -> str:
    text = obj["text"]
    if not isinstance(text, str):
        raise _LineError(f'"text" must be a string, got {type(text).__name__}')
    if not text.strip():
        raise _LineError('"text" is empty; give every clip a caption (empty-prompt features for classifier-free '
                         'guidance are written separately by tools/extract_text_features.py)')
    return text


def _frames(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise _LineError(f'"frames" must be a non-empty list of frame indices, got {value!r}')
    for f in value:
        # bool is an int subclass; true/false in a frame list is a mistake, not an index.
        if not isinstance(f, int) or isinstance(f, bool) or f < 0:
            raise _LineError(f'"frames" must hold non-negative integers, got {f!r}')
    if any(b <= a for a, b in zip(value, value[1:])):
        raise _LineError('"frames" must be strictly increasing (frames are decoded in video order)')
    return tuple(value)


def _parse_object(obj: object, *, index: int, line: int, kind: Kind, require: tuple[str, ...],
                  root: Path) -> Entry:
    if not isinstance(obj, dict):
        raise _LineError(f"expected a JSON object, got {type(obj).__name__}")
    if kind == "video":
        if "video" not in obj and "image" in obj:
            raise _LineError('this is an image line ("image" key) in a video annotation; video lines need "video"')
        needed = ("video", "text", *require)
    else:
        if "image" not in obj and "video" in obj:
            raise _LineError('this is a video line ("video" key) in an image annotation; image lines need "image"')
        needed = ("image", "text", *require)
    missing = [k for k in needed if k not in obj]
    if missing:
        raise _LineError(f"missing key(s) {', '.join(repr(k) for k in missing)}; present: {sorted(obj)}")

    text = _text(obj)
    text_fea = _resolve(obj["text_fea"], "text_fea", root) if "text_fea" in obj else None
    if kind == "image":
        return ImageEntry(index=index, line=line, image=_resolve(obj["image"], "image", root), text=text,
                          text_fea=text_fea)
    video = _resolve(obj["video"], "video", root)
    if video.suffix.lower() in IMAGE_SUFFIXES:
        raise _LineError(f'"video" points at an image file ({video.name}); put images on image lines '
                         '{"image", "text"} in an image annotation')
    return VideoEntry(
        index=index, line=line, video=video, text=text,
        latent=_resolve(obj["latent"], "latent", root) if "latent" in obj else None,
        text_fea=text_fea,
        frames=_frames(obj["frames"]) if "frames" in obj else None,
    )


def parse_lines(lines: Iterable[str], *, file: Path, kind: Kind, require: Iterable[str],
                root: Path) -> ParsedAnnotation:
    """Validate annotation text; see :func:`parse_annotation`. ``file`` is only used in messages."""
    require = tuple(require)
    entries: list[Entry] = []
    issues: list[AnnotationIssue] = []
    index = 0
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            try:
                obj = json.loads(raw.strip())
            except json.JSONDecodeError as e:
                raise _LineError(f"bad JSON ({e.msg} at column {e.colno})") from None
            entries.append(_parse_object(obj, index=index, line=line_no, kind=kind, require=require, root=root))
        except _LineError as e:
            issues.append(AnnotationIssue(file=file, index=index, line=line_no, message=str(e)))
        index += 1
    return ParsedAnnotation(entries=entries, issues=issues)


def parse_annotation(anno_file: str | os.PathLike, *, kind: Kind = "video", require: Iterable[str] = (),
                     data_root: str | os.PathLike | None = None) -> ParsedAnnotation:
    """Read and validate ``anno_file``; bad lines are returned as issues instead of raising.

    ``require`` names keys that must be present on every line besides the kind's own (``video``/``image`` and
    ``text``), e.g. ``("latent",)`` for latent extraction. Raises :class:`AnnotationError` only when the file
    itself cannot be read.
    """
    if kind not in ("video", "image"):
        raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
    path = Path(anno_file).expanduser()
    if not path.is_file():
        raise AnnotationError(f"annotation file {path} does not exist or is not a file; pass an existing .jsonl")
    root = resolve_data_root(path, data_root)
    try:
        with open(path, encoding="utf-8") as f:
            return parse_lines(f, file=path, kind=kind, require=require, root=root)
    except UnicodeDecodeError as e:
        raise AnnotationError(f"annotation file {path} is not UTF-8 text ({e})") from None


def load_annotation(anno_file: str | os.PathLike, *, kind: Kind = "video", require: Iterable[str] = (),
                    data_root: str | os.PathLike | None = None) -> list[Entry]:
    """Like :func:`parse_annotation` but strict: raises :class:`AnnotationError` listing every bad line."""
    parsed = parse_annotation(anno_file, kind=kind, require=require, data_root=data_root)
    if parsed.issues:
        shown = "\n  ".join(str(i) for i in parsed.issues[:20])
        more = f"\n  ... and {len(parsed.issues) - 20} more" if len(parsed.issues) > 20 else ""
        raise AnnotationError(f"{len(parsed.issues)} bad line(s) in {anno_file}:\n  {shown}{more}")
    if not parsed.entries:
        raise AnnotationError(f"annotation file {anno_file} has no entries")
    return parsed.entries
