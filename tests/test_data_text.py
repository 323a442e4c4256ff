"""Text-feature extraction end to end: 2 processes (torchrun, gloo) on the tiny checkpoint, bad lines in the same
annotation, the empty-prompt features, equality with a direct encode, and a resumed single-process rerun."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tools.extract_text_features import load_text_encoder, main
from trainer_misc.data.annotation import EMPTY_PROMPT_FILENAME, parse_annotation
from trainer_misc.data.features import load_text_features

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "a red circle moving from left to right on a black background",
    "a blue square moving upwards",
    "two dogs running on the beach at sunset, aerial view",
    "a green diamond",
    "a yellow ball falling slowly through the water while the camera pans left",
]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from tools.build_tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def _row(text: str, text_fea: str) -> str:
    return json.dumps({"video": "unused.mp4", "text": text, "latent": "unused.safetensors", "text_fea": text_fea})


def _lines() -> list[tuple[str, str, str | None]]:
    good = [(_row(t, f"text_fea/{i}.safetensors"), "done", None) for i, t in enumerate(CAPTIONS)]
    return good + [
        (_row(CAPTIONS[0], "text_fea/0.safetensors"), "skipped", "same text and text_fea as line 1"),
        (_row("another caption", "text_fea/1.safetensors"), "failed", "also the output of line 2"),
        (_row("   ", "text_fea/empty.safetensors"), "failed", '"text" is empty'),
        (json.dumps({"video": "v.mp4", "text": "no output"}), "failed", "missing key(s) 'text_fea'"),
        ("{not json", "failed", "bad JSON"),
        (_row("a caption", "blocker/x.safetensors"), "failed", "cannot write text features"),
        (_row("a caption", "text_fea/x.pt"), "failed", "must end with .safetensors"),
    ]


def test_two_processes_then_resume(tiny_ckpt, tmp_path):
    data = tmp_path
    (data / "blocker").write_text("a file where a folder is expected")
    lines = _lines()
    (data / "anno.jsonl").write_text("\n".join(line for line, _, _ in lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYRAMID_DATA_ROOT="", MODEL_PATH=str(tiny_ckpt),
               ANNO_FILE=str(data / "anno.jsonl"), GPUS="2", MODEL_DTYPE="fp32", BATCH_SIZE="2",
               EXTRA_ARGS="--no_progress")
    proc = subprocess.run(["sh", str(REPO / "scripts" / "extract_text_feature.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log
    n_bad = sum(s == "failed" for _, s, _ in lines)
    assert f"text features: {len(CAPTIONS) + 1} done, 1 skipped, {n_bad} failed" in log, log

    records = [json.loads(x) for x in (data / "anno.text_fea_report.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(len(lines) + 1))  # line 0: the empty prompt
    assert records[0]["status"] == "done" and records[0]["output"] == str(data / EMPTY_PROMPT_FILENAME)
    for n, ((_, status, words), r) in enumerate(zip(lines, records[1:]), start=1):
        assert r["status"] == status, (n, r)
        if words:
            assert words in r["reason"], (n, r)
        if status == "failed":
            assert f"FAILED {data / 'anno.jsonl'}:{n}: " in log
    assert {r["rank"] for r in records} == {0, 1}

    # outputs: shapes, dtypes, and equality with a direct (unbatched) encode
    encoder = load_text_encoder(tiny_ckpt, torch.device("cpu"), torch.float32)
    for i, text in enumerate(CAPTIONS + [""]):
        path = data / (f"text_fea/{i}.safetensors" if text else EMPTY_PROMPT_FILENAME)
        fea = load_text_features(path)
        assert fea["prompt_embed"].shape == (1, 128, 32) and fea["prompt_embed"].dtype == torch.float32
        assert fea["prompt_attention_mask"].shape == (1, 128) and fea["prompt_attention_mask"].dtype == torch.int64
        assert fea["pooled_prompt_embed"].shape == (1, 24)
        direct = encoder.encode([text], "cpu")
        assert torch.equal(fea["prompt_attention_mask"], direct.prompt_attention_mask)
        for key, ref in (("prompt_embed", direct.prompt_embeds), ("pooled_prompt_embed", direct.pooled_prompt_embeds)):
            err = (fea[key] - ref).abs().max() / ref.abs().max()
            assert err < 1e-5, (text, key, err)
    # the empty prompt is a real encoding of "", not zeros: a couple of tokens (</s>) and non-trivial features
    empty = load_text_features(data / EMPTY_PROMPT_FILENAME)
    assert 1 <= int(empty["prompt_attention_mask"].sum()) <= 2 and empty["pooled_prompt_embed"].abs().max() > 0
    assert not list(data.rglob("*.tmp"))

    # a single-process rerun (no torchrun) skips everything valid, redoes a broken file and a changed caption,
    # and still reports the bad lines
    (data / "text_fea" / "3.safetensors").write_bytes(b"")
    new_caption = "a purple cube rotating slowly"
    lines[4] = (_row(new_caption, "text_fea/4.safetensors"), "done", None)
    (data / "anno.jsonl").write_text("\n".join(line for line, _, _ in lines) + "\n")
    rc = main(["--model_path", str(tiny_ckpt), "--anno_file", str(data / "anno.jsonl"), "--model_dtype", "fp32",
               "--no_progress"])
    assert rc == 1
    records = [json.loads(x) for x in (data / "anno.text_fea_report.jsonl").read_text().splitlines()]
    statuses = [r["status"] for r in records[: len(CAPTIONS) + 1]]
    assert statuses == ["skipped", "skipped", "skipped", "skipped", "done", "done"]
    assert "replaced an unreadable existing output" in records[4]["reason"]
    assert "different caption" in records[5]["reason"]
    assert load_text_features(data / "text_fea" / "3.safetensors")["prompt_embed"].shape == (1, 128, 32)
    redone = load_text_features(data / "text_fea" / "4.safetensors")["prompt_embed"]
    direct = encoder.encode([new_caption], "cpu").prompt_embeds
    assert (redone - direct).abs().max() / direct.abs().max() < 1e-5


def test_image_annotation_and_custom_empty_prompt_path(tiny_ckpt, tmp_path):
    (tmp_path / "img.jsonl").write_text(
        json.dumps({"image": "a.png", "text": "a cat", "text_fea": "fea/a.safetensors"}) + "\n")
    empty = tmp_path / "elsewhere" / "null.safetensors"
    rc = main(["--model_path", str(tiny_ckpt), "--anno_file", str(tmp_path / "img.jsonl"), "--kind", "image",
               "--model_dtype", "fp32", "--empty_prompt_fea", str(empty), "--no_progress"])
    assert rc == 0
    assert load_text_features(tmp_path / "fea" / "a.safetensors")["prompt_embed"].shape == (1, 128, 32)
    assert load_text_features(empty)["prompt_attention_mask"].shape == (1, 128)
    assert parse_annotation(tmp_path / "img.jsonl", kind="image", require=("text_fea",)).issues == []


def test_missing_model_folder_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text(_row("t", "f.safetensors") + "\n")
    assert main(["--model_path", str(tmp_path), "--anno_file", str(tmp_path / "a.jsonl"), "--no_progress"]) == 2
    assert "text_encoder" in capsys.readouterr().err


def test_the_report_lands_beside_the_features_as_the_latent_report_does(tiny_ckpt, tmp_path, monkeypatch):
    """Both extraction reports sit in the folder of their per-line outputs (data/text_fea/, data/latents/), not one
    of them at the data root because the empty prompt's features live there."""
    monkeypatch.setenv("PYRAMID_DATA_ROOT", "")
    (tmp_path / "anno.jsonl").write_text(_row(CAPTIONS[0], "text_fea/0.safetensors") + "\n" +
                                         _row(CAPTIONS[1], "text_fea/1.safetensors") + "\n")
    assert main(["--model_path", str(tiny_ckpt), "--anno_file", str(tmp_path / "anno.jsonl"), "--model_dtype",
                 "fp32", "--no_progress"]) == 0
    assert (tmp_path / "text_fea" / "anno.text_fea_report.jsonl").is_file()
    assert (tmp_path / EMPTY_PROMPT_FILENAME).is_file() and not (tmp_path / "anno.text_fea_report.jsonl").exists()
