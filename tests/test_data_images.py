"""t2i preprocessing: resize to cover the bucket, then a random (reference default) or centred crop."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from trainer_misc.data.annotation import ImageEntry
from trainer_misc.data.datasets import ImageDataset
from trainer_misc.data.sampler import ResumableBatchSampler


@pytest.fixture()
def wide_image(tmp_path) -> ImageEntry:
    """160x64 image, every column a different grey: a crop's horizontal offset is visible in its pixels."""
    columns = np.linspace(0, 255, 160).astype(np.uint8)
    Image.fromarray(np.repeat(np.tile(columns, (64, 1))[..., None], 3, axis=2)).save(tmp_path / "wide.png")
    return ImageEntry(index=0, line=1, image=tmp_path / "wide.png", text="a wide image")


def _resized(entry: ImageEntry) -> torch.Tensor:
    """The image as the dataset scales it for a 64x64 bucket: the reference's t2i rule keeps 160x64 as it is."""
    array = np.asarray(Image.open(entry.image).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0


def _offset(pixels: torch.Tensor, resized: torch.Tensor) -> int:
    """Horizontal offset of a 64-wide crop inside the resized image (asserting it is an exact window)."""
    matches = [x for x in range(resized.shape[-1] - 63) if torch.equal(pixels[:, 0], resized[:, :, x:x + 64])]
    assert len(matches) == 1, "the crop must be a window of the resized image"
    return matches[0]


def test_crop_mode_default_is_random_as_in_the_reference():
    from train.args import build_parser
    args = build_parser().parse_args(["--model_path", "m", "--anno_file", "a", "--output_dir", "o"])
    assert args.crop_mode == "random"
    import inspect
    assert inspect.signature(ImageDataset).parameters["crop_mode"].default == "random"


def test_center_crop_is_centred_and_random_crop_moves_per_epoch_reproducibly(wide_image):
    resized = _resized(wide_image)
    center = ImageDataset([SimpleNamespace(entry=wide_image, bucket=0)], [(64, 64)], crop_mode="center")
    assert _offset(center[(0, 0)]["pixels"], resized) == (160 - 64) // 2
    assert _offset(center[(5, 0)]["pixels"], resized) == (160 - 64) // 2

    random = ImageDataset([SimpleNamespace(entry=wide_image, bucket=0)], [(64, 64)], crop_mode="random", seed=3)
    offsets = [_offset(random[(epoch, 0)]["pixels"], resized) for epoch in range(12)]
    assert len(set(offsets)) >= 6, offsets  # 97 possible offsets: a new draw every epoch
    again = ImageDataset([SimpleNamespace(entry=wide_image, bucket=0)], [(64, 64)], crop_mode="random", seed=3)
    assert [_offset(again[(epoch, 0)]["pixels"], resized) for epoch in range(12)] == offsets  # resumable, any worker
    other_seed = ImageDataset([SimpleNamespace(entry=wide_image, bucket=0)], [(64, 64)], crop_mode="random", seed=4)
    assert [_offset(other_seed[(e, 0)]["pixels"], resized) for e in range(12)] != offsets
    with pytest.raises(ValueError, match="crop_mode"):
        ImageDataset([SimpleNamespace(entry=wide_image, bucket=0)], [(64, 64)], crop_mode="top")


def test_sampler_keys_items_by_epoch_for_the_image_dataset():
    sampler = ResumableBatchSampler(4, 2, seed=0, shuffle=False, with_epoch=True, start_batch=1)
    it = iter(sampler)
    assert [next(it) for _ in range(3)] == [[(0, 2), (0, 3)], [(1, 0), (1, 1)], [(1, 2), (1, 3)]]
    assert ImageDataset.keyed_by_epoch
