"""The one resize-and-crop helper (pyramid_dit.resize) and the one device resolver."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pyramid_dit.device import resolve_device
from pyramid_dit.resize import cover_size, crop_offset, resize_crop_image


def test_t2i_rule_is_the_reference_shorter_edge_rule():
    # Same orientation: shorter side max(ceil(640 * 500 / 1000), 384) = 384, longer int(384 * 1000 / 500) = 768.
    assert cover_size(1000, 500, 640, 384, rule="t2i") == (768, 384)
    # Shorter side max(ceil(512 * 333 / 1000), 512) = 512; the longer one truncated: int(512 * 1000 / 333) = 1537.
    assert cover_size(1000, 333, 512, 512, rule="t2i") == (1537, 512)
    assert cover_size(333, 1000, 512, 512, rule="t2i") == (512, 1537)
    # Across orientations the reference zooms in: max(ceil(384 * 1000 / 500), 640) = 768 on the shorter side.
    assert cover_size(1000, 500, 384, 640, rule="t2i") == (1536, 768)
    # The video / i2v rule: one factor, rounded (a minimal cover).
    assert cover_size(1000, 500, 384, 640) == (1280, 640)
    with pytest.raises(ValueError, match="unknown size rule"):
        cover_size(10, 10, 8, 8, rule="floor")


def test_center_offset_matches_pil_crop_of_the_reference_fractional_box():
    """The reference's i2v demo crops the box ((w - W) / 2, ...) with PIL; PIL rounds it half to even, as
    torchvision's center_crop does. Odd margins 1, 3, 5, 7 pin the rounding (0, 2, 2, 4)."""
    rng = np.random.default_rng(0)
    for margin in (1, 3, 5, 7, 8):
        image = Image.fromarray(rng.integers(0, 256, (8, 64 + margin, 3), dtype=np.uint8))
        ref = image.crop((margin / 2, 0, 64 + margin / 2, 8))
        left = crop_offset(64 + margin, 64)
        assert np.array_equal(np.asarray(ref), np.asarray(image)[:, left:left + 64]), margin
    assert [crop_offset(64 + m, 64) for m in (1, 3, 5, 7)] == [0, 2, 2, 4]


def test_random_crop_is_seeded_and_covers_every_offset():
    offsets = [crop_offset(70, 64, "random", torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(offsets) == set(range(7))
    assert crop_offset(70, 64, "random", torch.Generator().manual_seed(3)) == offsets[3]
    with pytest.raises(ValueError, match="cannot crop 65 pixels out of 64"):
        crop_offset(64, 65)


def test_resize_crop_image_sizes_and_filters():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 160, 3), dtype=np.uint8))
    for rule in ("round", "t2i"):
        for resample in ("lanczos", "bicubic"):
            out = resize_crop_image(image, 64, 128, rule=rule, resample=resample)
            assert out.size == (64, 128)
    # i2v: Lanczos to round(160 * 128 / 90) = 228 x 128, then the centre 64 columns (offset 82).
    expected = image.resize((228, 128), resample=Image.LANCZOS).crop((82, 0, 146, 128))
    assert np.array_equal(np.asarray(resize_crop_image(image, 64, 128)), np.asarray(expected))


def test_t2i_dataset_uses_the_reference_rule(tmp_path):
    from trainer_misc.data.annotation import ImageEntry
    from trainer_misc.data.datasets import ImageDataset

    array = np.random.default_rng(2).integers(0, 256, (50, 100, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    entry = ImageEntry(index=0, line=1, image=tmp_path / "a.png", text="x", text_fea=None)
    item = ImageDataset([SimpleNamespace(entry=entry, bucket=0)], [(64, 128)], crop_mode="center")[0]
    # Across orientations: shorter side max(ceil(64 * 100 / 50), 128) = 128 -> 256 x 128, centre 64 columns.
    expected = Image.fromarray(array).resize((256, 128), resample=Image.BICUBIC).crop((96, 0, 160, 128))
    pixels = torch.from_numpy(np.asarray(expected, dtype=np.float32) / 255).permute(2, 0, 1) * 2 - 1
    assert item["pixels"].shape == (3, 1, 128, 64)
    assert torch.equal(item["pixels"][:, 0], pixels)


def test_one_device_resolver():
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("cuda:3") == torch.device("cuda", 3)  # explicit indices are kept (no GPU needed)
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or a torch device"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch.cuda.is_available"):
            resolve_device(torch.device("cuda"))
