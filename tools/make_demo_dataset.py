"""Write a small synthetic captioned video set: real mp4 clips of coloured shapes moving in distinct directions.

This is the data the quickstart and the tests use, so it is deterministic for a given seed and small::

    python3 tools/make_demo_dataset.py --out data/demo

writes ``data/demo/videos/clip_00.mp4 ...``, ``data/demo/video_text.jsonl`` (video lines with ``latent`` and
``text_fea`` paths relative to the annotation file's folder), and, unless ``--no_images``, one still per clip in
``data/demo/images/`` with ``data/demo/image_text.jsonl``. Every file is written under a temporary name and
renamed, so an interrupted run never leaves a half-written clip behind.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

COLORS = {
    "red": (220, 40, 40), "green": (40, 200, 70), "blue": (50, 90, 230), "yellow": (235, 215, 40),
    "magenta": (210, 50, 200), "cyan": (40, 210, 220), "white": (240, 240, 240), "orange": (245, 140, 30),
}
BACKGROUNDS = {"black": (10, 10, 10), "dark blue": (15, 25, 70), "dark green": (15, 55, 25), "grey": (90, 90, 90)}
SHAPES = ("circle", "square", "diamond")
# (dx, dy) per unit of the clip's duration, in fractions of the frame size, and the caption's words for it.
DIRECTIONS = (
    ((1, 0), "from left to right"), ((-1, 0), "from right to left"), ((0, 1), "downwards"), ((0, -1), "upwards"),
    ((1, 1), "diagonally down and to the right"), ((-1, -1), "diagonally up and to the left"),
    ((1, -1), "diagonally up and to the right"), ((-1, 1), "diagonally down and to the left"),
)


@dataclass(frozen=True)
class ClipSpec:
    name: str
    shape: str
    color: str
    background: str
    direction: tuple[int, int]
    caption: str

    @property
    def still_caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


def clip_specs(num_clips: int, seed: int = 0) -> list[ClipSpec]:
    """Captioned specs; directions cycle so consecutive clips always move differently."""
    rng = np.random.default_rng(seed)
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    specs = []
    for i in range(num_clips):
        (direction, words) = DIRECTIONS[i % len(DIRECTIONS)]
        shape = SHAPES[i % len(SHAPES)]
        color = colors[int(rng.integers(len(colors)))]
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        specs.append(ClipSpec(name=f"clip_{i:02d}", shape=shape, color=color, background=background,
                              direction=direction,
                              caption=f"a {color} {shape} moving {words} on a {background} background"))
    return specs


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        d = np.sqrt(dx ** 2 + dy ** 2) - r
    elif shape == "square":
        d = np.maximum(np.abs(dx), np.abs(dy)) - r
    elif shape == "diamond":
        d = (np.abs(dx) + np.abs(dy)) / np.sqrt(2) - r * 0.8
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - d, 0.0, 1.0)  # one pixel of soft edge: fewer compression artefacts than a hard edge


def render_clip(spec: ClipSpec, num_frames: int, width: int, height: int) -> np.ndarray:
    """uint8 ``[T, H, W, 3]``: the shape crosses the middle of the frame along its direction."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    r = 0.18 * min(width, height)
    bg = np.array(BACKGROUNDS[spec.background], np.float32)
    fg = np.array(COLORS[spec.color], np.float32)
    # a faint diagonal gradient so the background is not perfectly flat
    shade = ((xx / width + yy / height) * 12.0 - 12.0)[..., None]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        p = t / max(num_frames - 1, 1) - 0.5           # -0.5 .. 0.5 over the clip
        cx = width / 2 + spec.direction[0] * p * 0.6 * width
        cy = height / 2 + spec.direction[1] * p * 0.6 * height
        m = _shape_mask(spec.shape, xx, yy, cx, cy, r)[..., None]
        frames[t] = np.clip(bg + shade + m * (fg - bg - shade), 0, 255).round().astype(np.uint8)
    return frames


def write_mp4(frames: np.ndarray, path: Path, fps: int = 8) -> None:
    """H.264 mp4 (yuv420p, near-lossless CRF) via imageio-ffmpeg, written to a temp name then renamed."""
    import imageio_ffmpeg

    t, h, w, _ = frames.shape
    if w % 2 or h % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {w}x{h}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # ffmpeg picks the muxer by suffix
    writer = imageio_ffmpeg.write_frames(str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         quality=None, macro_block_size=1,
                                         output_params=["-crf", "12", "-preset", "medium"])
    try:
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def write_png(image: np.ndarray, path: Path) -> None:
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    iio.imwrite(tmp, image)
    os.replace(tmp, path)


def write_jsonl(rows: Sequence[dict], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def make_demo_dataset(out_dir: str | os.PathLike, *, num_clips: int = 6, num_frames: int = 25, width: int = 96,
                      height: int = 64, fps: int = 8, seed: int = 0, images: bool = True) -> Path:
    """Write the demo set under ``out_dir``; returns the path of ``video_text.jsonl``."""
    if num_clips < 1 or num_frames < 1:
        raise ValueError(f"need at least one clip of one frame, got {num_clips} clips of {num_frames} frames")
    out = Path(out_dir)
    video_rows, image_rows = [], []
    for spec in clip_specs(num_clips, seed):
        frames = render_clip(spec, num_frames, width, height)
        write_mp4(frames, out / "videos" / f"{spec.name}.mp4", fps=fps)
        video_rows.append({"video": f"videos/{spec.name}.mp4", "text": spec.caption,
                           "latent": f"latents/{spec.name}.safetensors",
                           "text_fea": f"text_fea/{spec.name}.safetensors"})
        if images:
            write_png(frames[num_frames // 2], out / "images" / f"{spec.name}.png")
            image_rows.append({"image": f"images/{spec.name}.png", "text": spec.still_caption})
    anno = out / "video_text.jsonl"
    write_jsonl(video_rows, anno)
    if images:
        write_jsonl(image_rows, out / "image_text.jsonl")
    return anno


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num_clips", type=int, default=6)
    p.add_argument("--num_frames", type=int, default=25)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_images", action="store_true", help="skip the stills and image_text.jsonl")
    args = p.parse_args(argv)
    anno = make_demo_dataset(args.out, num_clips=args.num_clips, num_frames=args.num_frames, width=args.width,
                             height=args.height, fps=args.fps, seed=args.seed, images=not args.no_images)
    print(f"wrote {args.num_clips} clips and {anno}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
