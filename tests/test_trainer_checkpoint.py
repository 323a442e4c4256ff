"""Checkpoint building blocks: RNG and optimizer state round trips, lookup of complete checkpoints, export as a
diffusers folder, and loading single-file DiT weights."""
from __future__ import annotations

import argparse
import errno
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_trainer_toy import ToyModel

from pyramid_dit.weights import load_dit_weights
from trainer_misc.state.export import export_pretrained
from trainer_misc.state.rng import capture_rng_state, restore_rng_state
from trainer_misc.state.trust import COMPLETE_MARKER, _write_failed, find_latest_checkpoint


def _draw():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)], np.random.randn()


def test_rng_state_round_trip():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    tensors, meta = capture_rng_state()
    first = _draw()
    _draw()
    restore_rng_state(tensors, meta)
    assert _draw() == first


def test_find_latest_ignores_incomplete_and_temporary_checkpoints(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-8.tmp").mkdir()
    (tmp_path / "checkpoint-8.tmp" / COMPLETE_MARKER).write_text("{}")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert find_latest_checkpoint(tmp_path / "absent") is None


def test_a_rank_that_fails_to_write_removes_only_its_own_files(tmp_path):
    """Another rank may still be writing into the shared ``.tmp`` folder: pulling the folder from under it made that
    rank fail with "file not found", and its message could hide the real cause (a flaky fault test caught it)."""
    tmp = tmp_path / "checkpoint-4.tmp"
    mine, theirs = tmp / "rng" / "slot_00001.safetensors", tmp / "weights" / "rank_00000.safetensors"
    for path in (mine, theirs):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    error = _write_failed(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), tmp_path, tmp, [mine])
    assert error.errno == errno.ENOSPC and "no space left on device" in str(error)
    assert not mine.exists() and theirs.read_bytes() == b"x"
    assert find_latest_checkpoint(tmp_path) is None  # the leftover folder is never taken for a checkpoint


# ----------------------------------------------------------------------------------------------------- DiT weights

def test_load_dit_weights_from_safetensors_and_pt(tmp_path):
    torch.manual_seed(0)
    src = ToyModel()
    state = src.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    # a reference-style full-pipeline checkpoint: "dit." prefixes, plus VAE / text encoder entries to ignore
    torch.save({**{f"dit.{k}": v for k, v in state.items()}, "vae.x": torch.zeros(1),
                "text_encoder.y": torch.zeros(1)}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        dst = ToyModel()
        load_dit_weights(dst, tmp_path / name)
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in state.items())


def test_load_dit_weights_reports_bad_files(tmp_path):
    state = ToyModel().state_dict()
    partial = {k: v for k, v in state.items() if k != "mid.weight"}
    save_file({**partial, "extra.weight": torch.zeros(2)}, str(tmp_path / "keys.safetensors"))
    with pytest.raises(KeyError, match=r"keys.safetensors.*missing 1 \['mid.weight'\].*unexpected 1"):
        load_dit_weights(ToyModel(), tmp_path / "keys.safetensors")
    save_file({**state, "mid.weight": torch.zeros(3, 3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match="shape mismatch.*mid.weight"):
        load_dit_weights(ToyModel(), tmp_path / "shape.safetensors")
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="pickled.pt"):  # refused by weights_only=True, named in the message
        load_dit_weights(ToyModel(), tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_dit_weights(ToyModel(), tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------------- export

def _toy_diffusers_class():
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class ToyTransformer(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, width: int = 8):
            super().__init__()
            self.proj = torch.nn.Linear(width, width)
            self.norm = torch.nn.LayerNorm(width)

        def forward(self, x):
            return self.norm(self.proj(x))

    return ToyTransformer


def test_export_pretrained_is_a_diffusers_folder(tmp_path):
    cls = _toy_diffusers_class()
    torch.manual_seed(0)
    model = cls(width=6)
    state = {k: v + 1.0 for k, v in model.state_dict().items()}  # e.g. EMA weights: not the module's own
    out = export_pretrained(model, state, tmp_path / "transformer")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = cls.from_pretrained(out)
    assert loaded.config.width == 6
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    # re-export replaces the folder atomically, no temp folder left behind
    export_pretrained(model, model.state_dict(), tmp_path / "transformer")
    assert not (tmp_path / "transformer.tmp").exists()
    assert torch.equal(cls.from_pretrained(out).proj.weight, model.proj.weight)


def test_exported_folder_honours_the_umask(tmp_path):
    import os

    cls = _toy_diffusers_class()
    model = cls(width=6)
    old = os.umask(0o022)
    try:
        out = export_pretrained(model, model.state_dict(), tmp_path / "transformer")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "config.json": 0o644, "diffusion_pytorch_model.safetensors": 0o644}
