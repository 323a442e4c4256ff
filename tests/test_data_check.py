"""The up-front data check: file headers only, one grouped summary, exit 2 when nothing is usable."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer_misc.data.check import DataSpec, check_data, format_report, run_data_check
from trainer_misc.files import atomic_save_safetensors


def _latent(path: Path, shape) -> str:
    atomic_save_safetensors({"latent": torch.zeros(shape)}, path)
    return str(path)


def _text(path: Path, tokens: int = 6, dim: int = 32, pooled: int = 24) -> str:
    atomic_save_safetensors({"prompt_embed": torch.zeros(1, tokens, dim),
                             "prompt_attention_mask": torch.ones(1, tokens, dtype=torch.int64),
                             "pooled_prompt_embed": torch.zeros(1, pooled)}, path)
    return str(path)


@pytest.fixture()
def data(tmp_path) -> Path:
    """Lines: 2 good, 1 short clip, 1 wrong size, 1 wrong channels, 1 missing latent, 1 foreign text features,
    1 broken JSON; latents for RESOLUTION 64x64 (8x8) and NUM_FRAMES 4."""
    good_text = _text(tmp_path / "t.safetensors")
    torch.save(torch.zeros(1, 16, 5, 8, 8), tmp_path / "ref.pt")  # a reference-format latent, read weights-only
    lines = [
        {"latent": _latent(tmp_path / "ok.safetensors", (1, 16, 4, 8, 8)), "text_fea": good_text},
        {"latent": str(tmp_path / "ref.pt"), "text_fea": good_text},
        {"latent": _latent(tmp_path / "short.safetensors", (1, 16, 2, 8, 8)), "text_fea": good_text},
        {"latent": _latent(tmp_path / "big.safetensors", (1, 16, 4, 16, 16)), "text_fea": good_text},
        {"latent": _latent(tmp_path / "c4.safetensors", (1, 4, 4, 8, 8)), "text_fea": good_text},
        {"latent": str(tmp_path / "missing.safetensors"), "text_fea": good_text},
        {"latent": _latent(tmp_path / "ok2.safetensors", (1, 16, 4, 8, 8)),
         "text_fea": _text(tmp_path / "sd3.safetensors", pooled=2048)},
    ]
    anno = tmp_path / "anno.jsonl"
    anno.write_text("".join(json.dumps({"video": f"v{i}.mp4", "text": "a cat", **x}) + "\n"
                            for i, x in enumerate(lines)) + "{not json\n")
    _text(tmp_path / "empty_prompt_text_fea.safetensors")
    return anno


def spec(anno: Path, **kw) -> DataSpec:
    return DataSpec(**{"anno_file": str(anno), "resolution": "64x64", "num_frames": 4, "text_dims": (32, 24), **kw})


def test_every_line_checked_and_grouped_by_reason(data):
    report = check_data(spec(data))
    assert [Path(u.entry.latent).name for u in report.usable] == ["ok.safetensors", "ref.pt"]
    assert [u.frames for u in report.usable] == [4, 5]
    reasons = {reason.split(" (")[0].split(":")[0]: items for reason, items in report.excluded.items()}
    assert len(reasons) == 6 and sum(len(v) for v in reasons.values()) == 6
    assert report.short_lengths == {2: 1}
    text = format_report(report)
    assert "8 lines, 2 usable, 6 excluded" in text
    assert "RESOLUTION=64x64" in text and "big.safetensors: 16x16" in text
    assert "clip shorter than NUM_FRAMES=4" in text and "short.safetensors: 2 frames" in text
    assert "latent file missing" in text and "text_fea widths" in text and "line 8: bad JSON" in text
    assert "clip lengths used (latent frames: clips): 4: 2" in text
    assert "stage 2: 16/frame, 64/clip (+ 6 text tokens)" in text
    assert report.ok
    live = format_report(check_data(spec(data, load_text_encoder=True)))  # captions encoded during training
    assert "(+ 128 text tokens, captions encoded during training)" in live and "?" not in live


def test_nothing_usable_exits_2_with_one_summary(data, capsys):
    with pytest.raises(SystemExit) as stop:
        run_data_check(spec(data, num_frames=8))
    assert stop.value.code == 2
    out = capsys.readouterr().out
    assert out.count("data check:") == 1
    assert "every readable clip is shorter than NUM_FRAMES=8: the longest has 5 latent frames" in out


def test_missing_empty_prompt_stops_when_captions_drop(data, capsys):
    (data.parent / "empty_prompt_text_fea.safetensors").unlink()
    assert check_data(spec(data, text_drop_rate=0.0)).ok
    with pytest.raises(SystemExit):
        run_data_check(spec(data, text_drop_rate=0.1))
    assert "STOP: caption dropout (--text_drop_rate 0.1) needs the empty prompt's features" in capsys.readouterr().out
