"""Media I/O for generation: images in, video files out.

:func:`image_to_tensor` turns an input image into the pipeline's float layout; :func:`to_uint8` and
:func:`save_video` write a generated video as mp4 (H.264 through imageio-ffmpeg), gif or a png strip of frames,
atomically (temporary name in the same folder, then rename).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from pyramid_dit.progress import progress as progress_of

ImageInput = Union["PIL.Image.Image", torch.Tensor]  # noqa: F821 (PIL is imported lazily)


def image_to_tensor(image: ImageInput) -> torch.Tensor:
    """A PIL image, ``[3, H, W]`` or ``[B, 3, H, W]`` float tensor in [0, 1] -> ``[B, 3, H, W]`` float32 in [0, 1]."""
    if isinstance(image, torch.Tensor):
        x = image.unsqueeze(0) if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"image tensor must be float [3, H, W] or [B, 3, H, W] in [0, 1], got "
                             f"{x.dtype} {tuple(image.shape)}")
        return x.float()
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a tensor, got {type(image).__name__}")
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Float video in [0, 1] -> uint8 (``round(255 x)``; the reference truncates instead, at most 1 level lower)."""
    return (video * 255).round().clamp(0, 255).to(torch.uint8)


def _frames_hwc(video: torch.Tensor) -> np.ndarray:
    """``[3, F, H, W]`` (uint8, or float in [0, 1]) -> ``[F, H, W, 3]`` uint8 numpy."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"save_video takes one video [3, frames, height, width], got {tuple(video.shape)}; "
                         "index the batch first")
    if video.dtype != torch.uint8:
        video = to_uint8(video.float())
    return np.ascontiguousarray(video.permute(1, 2, 3, 0).cpu().numpy())


def _write_mp4(frames: np.ndarray, path: Path, fps: float, bar: Any) -> None:
    import imageio_ffmpeg

    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"mp4 (H.264, yuv420p) needs an even height and width, got {w}x{h}; write a .gif or .png")
    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24",
                                         pix_fmt_out="yuv420p", macro_block_size=1, quality=8,
                                         ffmpeg_log_level="error")
    writer.send(None)  # start the encoder
    for frame in frames:
        writer.send(frame)
        bar.update(1)
    writer.close()


def _write_gif(frames: np.ndarray, path: Path, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def _write_png_strip(frames: np.ndarray, path: Path, max_frames: int) -> None:
    from PIL import Image

    picks = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
    Image.fromarray(np.concatenate([frames[i] for i in picks], axis=1)).save(path, format="PNG")


VIDEO_SUFFIXES = (".mp4", ".gif", ".png")


def save_video(video: torch.Tensor, path: Union[str, os.PathLike], fps: float = 24,
               strip_frames: int = 8, progress: bool = False) -> Path:
    """Write one video ``[3, F, H, W]`` (uint8, or float in [0, 1]) to ``path``; the suffix picks the format.

    ``.mp4``: H.264 (yuv420p) through imageio-ffmpeg; ``.gif``: looping animation; ``.png``: a horizontal
    strip of ``strip_frames`` evenly spaced frames (first and last included). The file appears atomically: it is
    written under a temporary name in the same folder, then renamed. ``progress`` shows a bar over the frames
    (an mp4 is encoded frame by frame; a gif or png counts its frames when the file is written).
    """
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: unsupported video suffix {path.suffix!r}; use one of {VIDEO_SUFFIXES}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = _frames_hwc(video)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name keeps the suffix: ffmpeg picks the container from it.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        with progress_of(total=len(frames), desc=f"writing {path.name}", unit="frame", disable=not progress) as bar:
            suffix = path.suffix.lower()
            if suffix == ".mp4":
                _write_mp4(frames, tmp, fps, bar)
            else:
                if suffix == ".gif":
                    _write_gif(frames, tmp, fps)
                else:
                    _write_png_strip(frames, tmp, strip_frames)
                bar.update(len(frames))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
