"""Training datasets: pre-extracted video latents (t2v) and images bucketed by aspect ratio (t2i).

Every item is a plain dict; :func:`collate` stacks a list of them into a :class:`TrainBatch`. A sample that cannot
be read (missing, truncated or corrupt file, wrong shape) does not raise inside the DataLoader worker and is never
replaced by another sample: the item carries the path and the reason, the batch carries the list of bad items, and
the training loop (``trainer_misc.loop.trainer``) skips such a batch on every rank, logging each bad path and counting
it. Skipping the *whole* batch keeps every batch at the configured size (the objective needs
``batch % sum(sample_ratios) == 0``).

Batches only ever mix samples of equal shape: the sampler (:class:`trainer_misc.data.sampler.ResumableBatchSampler`)
gets :meth:`VideoLatentDataset.group_keys` (latent frame count) or :meth:`ImageDataset.group_keys` (bucket).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pyramid_dit.resize import CROP_MODES, resize_crop_image
from pyramid_dit.tensor_files import TensorFileError
from pyramid_dit.text_features import TextFeatures
from trainer_misc.data.annotation import ImageEntry, VideoEntry
from trainer_misc.data.features import load_latent, load_text_features

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------ batches


@dataclass
class TrainBatch:
    """What the objective needs for one step. Exactly one of ``latents`` / ``pixels`` is set.

    ``latents``: raw VAE latents ``[B, 16, T, h, w]``; ``pixels``: ``[B, 3, T, H, W]`` in [-1, 1] (encoded on the
    fly by the VAE); text: pre-extracted ``text_features`` or, when the text encoder runs during
    training, only ``captions``.
    """

    captions: list[str]
    paths: list[str]
    latents: Optional[torch.Tensor] = None
    pixels: Optional[torch.Tensor] = None
    text_features: Optional[TextFeatures] = None
    bad: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def pin_memory(self) -> "TrainBatch":
        """Page-locked copy, called by a DataLoader with ``pin_memory=True`` (the trainer sets it on CUDA), so the
        copy to the GPU can run asynchronously."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), (torch.Tensor, TextFeatures))})


def _bad(path: object, reason: str) -> dict:
    return {"bad": (str(path), reason)}


def collate(items: Sequence[dict]) -> TrainBatch:
    """Stack items into a :class:`TrainBatch`; if any item is bad, return a batch holding only the bad list."""
    bad = [item["bad"] for item in items if "bad" in item]
    if bad:
        return TrainBatch(captions=[], paths=[], bad=bad)
    batch = TrainBatch(captions=[it["text"] for it in items], paths=[it["path"] for it in items])
    for key in ("latents", "pixels"):
        if key in items[0]:
            setattr(batch, key, torch.stack([it[key] for it in items]))
    if "text_features" in items[0]:
        batch.text_features = TextFeatures.cat([it["text_features"] for it in items])
    return batch


# ------------------------------------------------------------------------------------------------ video latents


class VideoLatentDataset(Dataset):
    """Pre-extracted video latents (and text features), one item per usable annotation line.

    Clips are cut to their first ``max_frames`` latent frames; clips of equal (cut) length are batched together.
    Which lines are usable, and their latent frame counts, come from the start-up data check
    (``trainer_misc.data.check``, file headers only); files that break later are reported per batch (module
    docstring).

    Args:
        lines: the data check's usable lines (``.entry``: a validated ``VideoEntry``; ``.frames``: latent frames).
        max_frames: latent frames per training clip (``--max_frames``).
        latent_size: expected latent ``(h, w)``; ``None`` accepts any size.
        load_text_fea: read ``text_fea`` files (else only captions are returned, for on-the-fly encoding).
    """

    def __init__(self, lines: Sequence, max_frames: int, latent_size: Optional[tuple[int, int]],
                 load_text_fea: bool = True) -> None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        if not lines:
            raise ValueError("no usable video latents (the data check reports why)")
        self.max_frames = max_frames
        self.latent_size = latent_size
        self.load_text_fea = load_text_fea
        self.entries: list[VideoEntry] = [line.entry for line in lines]
        self.frames: list[int] = [min(line.frames, max_frames) for line in lines]

    def group_keys(self) -> list[int]:
        return list(self.frames)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        try:
            latent = load_latent(entry.latent, frames=self.max_frames)[0].float()  # reads only those frames
            if latent.shape[1] != self.frames[index]:
                raise TensorFileError(f"{entry.latent}: has {latent.shape[1]} latent frames, expected "
                                    f"{self.frames[index]} (file changed since start-up?)")
            if self.latent_size is not None and tuple(latent.shape[-2:]) != tuple(self.latent_size):
                raise TensorFileError(
                    f"{entry.latent}: latent is {tuple(latent.shape[-2:])} (h, w) but --resolution implies "
                    f"{tuple(self.latent_size)}; re-extract at the training resolution or change --resolution")
            item = {"latents": latent, "text": entry.text, "path": str(entry.latent)}
            if self.load_text_fea:
                item["text_features"] = TextFeatures.from_file(load_text_features(entry.text_fea))
            return item
        except TensorFileError as e:
            return _bad(entry.latent, str(e))


# ------------------------------------------------------------------------------------------------------- images


def closest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio (w / h) is closest to the image's."""
    ratio = width / height
    return int(np.argmin([abs(ratio - bw / bh) for bw, bh in buckets]))


class ImageDataset(Dataset):
    """Images for text-to-image training, each resized and cropped to its closest aspect-ratio bucket with the
    reference's t2i size rule and bicubic filter (:func:`pyramid_dit.resize.resize_crop_image`).

    Items are ``pixels [3, 1, H, W]`` in [-1, 1] (one frame, so the VAE encodes them as the first frame of a
    video); the trainer encodes them with the VAE on the fly. Which images are usable, and their buckets, come from the
    start-up data check (``trainer_misc.data.check``).

    ``crop_mode``: ``random`` (the reference's default; the offset is drawn from ``(seed, epoch, index)``, so every
    epoch crops anew and a resumed run crops as the uninterrupted one) or ``center``. Items are read by
    ``(epoch, index)`` keys (``keyed_by_epoch``; the trainer's sampler provides them); a bare index means epoch 0.
    """

    keyed_by_epoch = True

    def __init__(self, lines: Sequence, buckets: Sequence[tuple[int, int]], load_text_fea: bool = False,
                 crop_mode: str = "random", seed: int = 0) -> None:
        if not lines:
            raise ValueError("no usable images (the data check reports why)")
        if crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
        self.crop_mode, self.seed = crop_mode, seed
        self.buckets = list(buckets)
        self.load_text_fea = load_text_fea
        self.entries: list[ImageEntry] = [line.entry for line in lines]
        self.bucket_of: list[int] = [line.bucket for line in lines]

    def group_keys(self) -> list[int]:
        return list(self.bucket_of)

    def _crop_generator(self, epoch: int, index: int) -> Optional[torch.Generator]:
        """The random crop's own generator, seeded from ``(seed, epoch, index)`` (None for centre crops)."""
        if self.crop_mode != "random":
            return None
        return torch.Generator().manual_seed(int(np.random.default_rng([self.seed, epoch, index]).integers(2**62)))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key) -> dict:
        from PIL import Image, UnidentifiedImageError

        epoch, index = key if isinstance(key, tuple) else (0, key)
        entry = self.entries[index]
        width, height = self.buckets[self.bucket_of[index]]
        try:
            with Image.open(entry.image) as im:
                image = resize_crop_image(im.convert("RGB"), width, height, rule="t2i", resample="bicubic",
                                          crop=self.crop_mode, generator=self._crop_generator(epoch, index))
            array = np.asarray(image, dtype=np.float32) / 255.0
            pixels = torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0
            item = {"pixels": pixels[:, None], "text": entry.text, "path": str(entry.image)}
            if self.load_text_fea:
                item["text_features"] = TextFeatures.from_file(load_text_features(entry.text_fea))
            return item
        except (OSError, UnidentifiedImageError, TensorFileError) as e:
            return _bad(entry.image, str(e))
