"""Demo clips and the decode side of latent extraction: frame planning, resize-to-cover + crop, bad videos."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyramid_dit.resize import cover_size, resize_crop_frames
from tools.extract_video_vae_latents import ClipDataset, ClipError, load_clip, plan_frame_indices, read_frames
from tools.make_demo_dataset import clip_specs, make_demo_dataset, render_clip, write_mp4
from trainer_misc.data.annotation import VideoEntry, load_annotation


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(out, num_clips=4, num_frames=25, width=96, height=64)
    return out


def test_demo_dataset_files_and_annotation(demo):
    entries = load_annotation(demo / "video_text.jsonl", require=("latent", "text_fea"))
    assert len(entries) == 4
    assert len({e.text for e in entries}) == 4
    for e in entries:
        assert e.video.is_file() and e.video.suffix == ".mp4"
        assert e.latent.parent == demo / "latents" and e.text_fea.parent == demo / "text_fea"
    images = load_annotation(demo / "image_text.jsonl", kind="image")
    assert all(i.image.is_file() for i in images)
    # directions cycle: consecutive clips move differently
    assert len({s.direction for s in clip_specs(8)}) == 8


def test_demo_clips_decode_to_what_was_rendered(demo):
    frames = read_frames(demo / "videos" / "clip_00.mp4", num_frames=121)
    assert frames.shape == (25, 64, 96, 3) and frames.dtype == torch.uint8
    rendered = torch.from_numpy(render_clip(clip_specs(4)[0], 25, 96, 64))
    err = (frames.float() - rendered.float()).abs()
    assert err.mean() < 3.0  # H.264 at CRF 12: small, edge-only differences


def test_demo_shapes_move_in_their_direction(demo):
    for spec in clip_specs(4):
        frames = read_frames(demo / "videos" / f"{spec.name}.mp4", num_frames=25).float()
        # centroid of pixels that differ from the frame's median colour
        centroids = []
        for f in (frames[0], frames[-1]):
            diff = (f - f.reshape(-1, 3).median(0).values).abs().sum(-1) > 60
            ys, xs = torch.nonzero(diff, as_tuple=True)
            centroids.append(torch.stack([xs.float().mean(), ys.float().mean()]))
        motion = centroids[1] - centroids[0]
        assert torch.sign(motion.round()).tolist() == [float(d) for d in spec.direction], spec


@pytest.mark.parametrize("available,num_frames,frames,expected", [
    (25, 121, None, list(range(25))),
    (25, 17, None, list(range(17))),
    (20, 121, None, list(range(17))),
    (9, 121, None, list(range(9))),
    (40, 121, list(range(0, 40, 3)), list(range(0, 27, 3))),  # 14 indices -> 9
    (40, 9, list(range(1, 40, 2)), list(range(1, 18, 2))),
])
def test_plan_frame_indices(available, num_frames, frames, expected):
    assert plan_frame_indices(available, num_frames, frames) == expected


def test_plan_frame_indices_errors():
    with pytest.raises(ClipError, match="only 8 frame"):
        plan_frame_indices(8, 121)
    with pytest.raises(ClipError, match="only 5 frame"):
        plan_frame_indices(100, 121, [0, 1, 2, 3, 4])
    with pytest.raises(ClipError, match="frame index 27 is past the end of the video"):
        plan_frame_indices(25, 121, list(range(0, 31, 3)))
    # indices beyond the first num_frames are never decoded, so they may run past the end
    assert plan_frame_indices(25, 9, list(range(0, 100, 2))) == list(range(0, 18, 2))


def test_cover_size_uses_one_scale_for_both_sides():
    assert cover_size(96, 64, 64, 48) == (72, 48)
    assert cover_size(3840, 2160, 640, 384) == (683, 384)
    assert cover_size(640, 480, 640, 384) == (640, 480)
    assert cover_size(100, 300, 64, 48) == (64, 192)


def test_crop_without_resize_is_exact():
    frames = torch.randint(0, 256, (3, 48, 80, 3), dtype=torch.uint8)
    out = resize_crop_frames(frames, width=64, height=48)
    assert torch.equal(out, frames[:, :, 8:72].permute(0, 3, 1, 2).float() / 255)


def test_resize_matches_bicubic_antialias_and_center_crop():
    frames = torch.randint(0, 256, (5, 64, 96, 3), dtype=torch.uint8)
    out = resize_crop_frames(frames, width=64, height=48, chunk=2)
    full = F.interpolate(frames.permute(0, 3, 1, 2).float() / 255, size=(48, 72), mode="bicubic",
                         align_corners=False, antialias=True)
    assert torch.equal(out, full[:, :, :, 4:68])
    flat = torch.full((2, 100, 300, 3), 77, dtype=torch.uint8)
    assert torch.allclose(resize_crop_frames(flat, 48, 64), torch.full((2, 3, 64, 48), 77 / 255), atol=1e-6)


def test_load_clip_range_layout_and_explicit_frames(demo):
    path = demo / "videos" / "clip_01.mp4"
    clip = load_clip(path, 64, 48, 121)
    assert clip.shape == (3, 25, 48, 64) and clip.dtype == torch.float32
    assert -1.05 < clip.min() and clip.max() < 1.05
    picked = load_clip(path, 64, 48, 121, frames=[1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21])
    assert picked.shape == (3, 9, 48, 64)
    assert torch.equal(picked, clip[:, 1:18:2])


@pytest.fixture(scope="module")
def bad_inputs(demo) -> dict[str, Path]:
    d = demo / "bad"
    d.mkdir()
    good = (demo / "videos" / "clip_00.mp4").read_bytes()
    (d / "empty.mp4").write_bytes(b"")
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    (d / "truncated.mp4").write_bytes(good[: len(good) // 3])
    write_mp4(render_clip(clip_specs(1)[0], 5, 96, 64), d / "short.mp4")
    (d / "folder.mp4").mkdir()
    import imageio.v3 as iio
    iio.imwrite(d / "still.png", np.zeros((48, 64, 3), np.uint8))
    (d / "still_named.mp4").write_bytes((d / "still.png").read_bytes())
    return {"missing": d / "missing.mp4", "empty": d / "empty.mp4", "corrupt": d / "corrupt.mp4",
            "truncated": d / "truncated.mp4", "short": d / "short.mp4", "folder": d / "folder.mp4",
            "image": d / "still.png", "image_named_mp4": d / "still_named.mp4"}


BAD_REASONS = {
    "missing": "does not exist",
    "empty": "is empty (zero bytes)",
    "corrupt": "cannot open",
    "truncated": "cannot open",
    "short": "only 5 frame(s) available, need at least 9",
    "folder": "is not a file",
    "image": "is an image, not a video",
    "image_named_mp4": "cannot open",
}


def test_every_bad_video_gets_its_reason_and_the_good_one_still_decodes(demo, bad_inputs):
    names = list(BAD_REASONS)
    entries = [VideoEntry(index=i, line=i + 1, video=bad_inputs[n], text="t", latent=demo / f"{n}.safetensors")
               for i, n in enumerate(names)]
    entries.append(VideoEntry(index=len(names), line=len(names) + 1, video=demo / "videos" / "clip_02.mp4",
                              text="t", latent=demo / "good.safetensors"))
    dataset = ClipDataset(entries, 64, 48, 17)
    items = [dataset[i] for i in range(len(dataset))]
    for name, item in zip(names, items):
        assert item["action"] == "fail", name
        assert BAD_REASONS[name] in item["reason"], (name, item["reason"])
        assert str(bad_inputs[name]) in item["reason"], (name, item["reason"])
    assert items[-1]["action"] == "encode" and items[-1]["pixels"].shape == (3, 17, 48, 64)


def test_demo_generator_cli(tmp_path):
    from tools.make_demo_dataset import main

    assert main(["--out", str(tmp_path), "--num_clips", "2", "--num_frames", "9", "--no_images"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "video_text.jsonl").read_text().splitlines()]
    assert [r["video"] for r in rows] == ["videos/clip_00.mp4", "videos/clip_01.mp4"]
    assert not (tmp_path / "images").exists()
    assert read_frames(tmp_path / "videos" / "clip_01.mp4", 121).shape == (9, 64, 96, 3)
