"""Latent / text-feature files: atomic safetensors writes, reading ours and the reference's .pt files, clear errors."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pyramid_dit import tensor_files
from pyramid_dit.tensor_files import TensorFileError
from trainer_misc import files
from trainer_misc.data import features
from trainer_misc.data.annotation import EMPTY_PROMPT_FILENAME, default_empty_prompt_path
from trainer_misc.data.features import load_latent, load_text_features
from trainer_misc.files import atomic_save_safetensors, remove_stale_temps

REPO = Path(__file__).resolve().parents[1]


def _features(length: int = 8, width: int = 4, pooled: int = 3, tokens: int = 5) -> dict[str, torch.Tensor]:
    mask = torch.zeros(1, length, dtype=torch.int64)
    mask[:, :tokens] = 1
    return {"prompt_embed": torch.randn(1, length, width), "prompt_attention_mask": mask,
            "pooled_prompt_embed": torch.randn(1, pooled)}


def test_latent_round_trip_and_no_temp_left(tmp_path):
    latent = torch.randn(1, 16, 3, 6, 8).to(torch.bfloat16)
    path = tmp_path / "deep" / "dir" / "x.safetensors"
    atomic_save_safetensors({"latent": latent}, path, metadata={"video": "v.mp4"})
    loaded = load_latent(path)
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, latent)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.safetensors"]


def test_text_features_round_trip(tmp_path):
    fea = _features()
    atomic_save_safetensors(fea, tmp_path / "t.safetensors")
    loaded = load_text_features(tmp_path / "t.safetensors")
    assert list(loaded) == list(features.TEXT_FEATURE_KEYS)
    for k in fea:
        assert torch.equal(loaded[k], fea[k])


def test_reference_pt_files_load_with_weights_only(tmp_path):
    latent = torch.randn(1, 16, 2, 4, 6).to(torch.bfloat16)
    torch.save(latent, tmp_path / "ref-latent.pt")
    assert torch.equal(load_latent(tmp_path / "ref-latent.pt"), latent)
    fea = _features()
    torch.save(fea, tmp_path / "ref-text.pt")
    loaded = load_text_features(tmp_path / "ref-text.pt")
    assert all(torch.equal(loaded[k], fea[k]) for k in fea)


class _NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"latent": _NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(TensorFileError, match="refused to unpickle"):
        load_latent(tmp_path / "evil.pt")


@pytest.mark.parametrize("name,content,match", [
    ("missing.safetensors", None, "does not exist"),
    ("empty.safetensors", b"", "empty"),
    ("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":1}", "not a readable safetensors"),
    ("junk.pt", b"PK\x03\x04 not a zip", "not a readable torch file"),
    ("x.npy", b"\x93NUMPY", "unknown file type"),
])
def test_unreadable_files_name_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TensorFileError, match=match) as err:
        load_latent(path)
    assert str(path) in str(err.value)


def test_truncated_safetensors_is_detected(tmp_path):
    path = tmp_path / "x.safetensors"
    atomic_save_safetensors({"latent": torch.randn(1, 16, 3, 6, 8)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(TensorFileError, match="not a readable safetensors"):
        load_latent(path)


@pytest.mark.parametrize("tensors,match", [
    ({"other": torch.zeros(1, 16, 1, 2, 2)}, "no 'latent' tensor"),
    ({"latent": torch.zeros(16, 1, 2, 2)}, r"shape \[1, C, T, h, w\]"),
    ({"latent": torch.zeros(1, 4, 1, 2, 2)}, "16 latent channels"),
    ({"latent": torch.zeros(1, 16, 1, 2, 2, dtype=torch.int32)}, "floating point"),
    ({"latent": torch.full((1, 16, 1, 2, 2), float("nan"))}, "NaN"),
])
def test_bad_latent_content(tmp_path, tensors, match):
    atomic_save_safetensors(tensors, tmp_path / "x.safetensors")
    with pytest.raises(TensorFileError, match=match):
        load_latent(tmp_path / "x.safetensors")


def test_bad_text_feature_content(tmp_path):
    fea = _features()
    del fea["pooled_prompt_embed"]
    atomic_save_safetensors(fea, tmp_path / "a.safetensors")
    with pytest.raises(TensorFileError, match="missing"):
        load_text_features(tmp_path / "a.safetensors")
    fea = _features()
    fea["prompt_attention_mask"] = fea["prompt_attention_mask"][:, :4]
    atomic_save_safetensors(fea, tmp_path / "b.safetensors")
    with pytest.raises(TensorFileError, match="prompt_attention_mask"):
        load_text_features(tmp_path / "b.safetensors")
    torch.save(torch.zeros(1, 16, 1, 2, 2), tmp_path / "c.pt")
    with pytest.raises(TensorFileError, match="single tensor"):
        load_text_features(tmp_path / "c.pt")


def test_views_tied_and_strided_tensors_are_saved_and_plain_ones_are_not_copied(tmp_path):
    batch = torch.randn(3, 5, 4)
    weight = torch.randn(6, 2)
    tensors = {"row0": batch[0:1], "row2": batch[2:3], "a": weight, "tied": weight, "t": weight.t(),
               "empty1": torch.zeros(0), "empty2": torch.zeros(0, 3)}
    payload = files._independent_cpu_tensors(tensors)
    assert payload["a"].data_ptr() == weight.data_ptr()  # contiguous CPU tensor: saved without a copy
    atomic_save_safetensors(tensors, tmp_path / "x.safetensors")
    loaded = tensor_files.load_tensor_file(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k


def test_writer_refuses_non_safetensors_names(tmp_path):
    with pytest.raises(TensorFileError, match="safetensors"):
        atomic_save_safetensors({"latent": torch.zeros(1)}, tmp_path / "x.pt")


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    old = torch.randn(1, 16, 1, 2, 2)
    atomic_save_safetensors({"latent": old}, path)

    def broken_write(tensors, f, metadata=None):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(files, "write_safetensors", broken_write)
    with pytest.raises(OSError, match="disk full"):
        atomic_save_safetensors({"latent": torch.zeros(1, 16, 1, 2, 2)}, path)
    assert torch.equal(load_latent(path), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_process_killed_mid_write_never_leaves_a_corrupt_target(tmp_path):
    """A writer killed (os._exit, no cleanup) after the temp file is written but before the rename leaves only a
    temp file; the target is absent, and ``remove_stale_temps`` clears the leftover."""
    path = tmp_path / "x.safetensors"
    script = textwrap.dedent(f"""
        import os, torch
        from trainer_misc import files
        def die(src, dst):
            os._exit(9)
        files.os.replace = die
        files.atomic_save_safetensors({{"latent": torch.randn(1, 16, 3, 6, 8)}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 9
    assert not path.exists()
    leftovers = list(tmp_path.glob(".x.safetensors.*.tmp"))
    assert len(leftovers) == 1
    assert remove_stale_temps(path) == leftovers and not any(tmp_path.iterdir())


def test_sweep_removes_only_the_temps_of_the_given_outputs(tmp_path):
    """What a killed extraction leaves (a 0-byte temp next to an output it never finished) is swept at start-up,
    with one listing per folder; temps of outputs another process owns are left alone."""
    mine, other = tmp_path / "a.b.safetensors", tmp_path / "c.safetensors"
    leftovers = [tmp_path / ".a.b.safetensors.123.0a1b2c3d.tmp", tmp_path / ".c.safetensors.9.ffffffff.tmp"]
    for p in leftovers:
        p.write_bytes(b"")
    (tmp_path / "notes.tmp").write_text("x")
    assert files.sweep_stale_temps([mine, tmp_path / "missing" / "z.safetensors"]) == leftovers[:1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.safetensors.9.ffffffff.tmp", "notes.tmp"]
    assert other.name in leftovers[1].name


def test_default_empty_prompt_path(tmp_path):
    assert default_empty_prompt_path(tmp_path) == tmp_path / EMPTY_PROMPT_FILENAME


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_honour_the_umask(tmp_path, umask):
    # safetensors alone creates 0600 files: other users of a shared cluster could not read latents or features.
    old = os.umask(umask)
    try:
        assert files.process_umask() == umask
        path = tmp_path / "x.safetensors"
        atomic_save_safetensors({"latent": torch.zeros(1, 16, 1, 2, 2)}, path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_our_streaming_writer_is_read_by_safetensors_itself(tmp_path):
    """We write safetensors ourselves (to hash while writing); the official reader must see exactly what we wrote:
    every dtype we save, empty and non-contiguous tensors, tied storage and metadata."""
    import hashlib

    from safetensors import safe_open

    base = torch.randn(6, 4)
    tensors = {"f32": base, "bf16": torch.randn(3, 5).to(torch.bfloat16), "f16": torch.randn(7).half(),
               "i64": torch.arange(5), "bool": torch.tensor([True, False, True]), "u8": torch.arange(9, dtype=torch.uint8),
               "empty": torch.zeros(0, 3), "strided": base.t(), "tied": base, "scalar": torch.tensor(2.5)}
    path = tmp_path / "x.safetensors"
    digest = atomic_save_safetensors(tensors, path, metadata={"format": "pt", "step": 7})
    assert digest.size == path.stat().st_size
    assert digest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "step": "7"}
        assert set(f.keys()) == set(tensors)
        for key, want in tensors.items():
            got = f.get_tensor(key)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), key
