"""Shared pieces of the extraction tools: sharding, per-rank ownership of bad lines, summary and report."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tools.extraction_common import (
    DONE,
    FAILED,
    SKIPPED,
    ItemResult,
    default_report_path,
    init_distributed,
    issue_results,
    shard,
    summary_text,
    write_report,
)
from trainer_misc.data.annotation import AnnotationIssue, VideoEntry


def _entry(i: int) -> VideoEntry:
    return VideoEntry(index=i, line=i + 1, video=Path(f"{i}.mp4"), text="t")


def test_shard_is_a_partition_by_index_modulo_world():
    entries = [_entry(i) for i in range(10)]
    shards = [shard(entries, r, 3) for r in range(3)]
    assert [[e.index for e in s] for s in shards] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert shard(entries, 0, 1) == entries


def test_bad_lines_are_reported_once_by_their_owner():
    issues = [AnnotationIssue(file=Path("a.jsonl"), index=i, line=i + 2, message="bad") for i in range(5)]
    owned = [issue_results(issues, r, 2) for r in range(2)]
    assert [[r.line for r in o] for o in owned] == [[2, 4, 6], [3, 5]]
    assert all(r.status == FAILED and r.reason == "bad" for o in owned for r in o)


def test_summary_and_report(tmp_path):
    results = [ItemResult(line=1, status=DONE, output="a"), ItemResult(line=2, status=SKIPPED, output="b"),
               ItemResult(line=3, status=FAILED, reason="video missing.mp4 does not exist", rank=1)]
    text = summary_text(results, "VAE latents", "anno.jsonl")
    assert text.splitlines() == ["VAE latents: 1 done, 1 skipped, 1 failed (3 items)",
                                 "  FAILED anno.jsonl:3: video missing.mp4 does not exist"]
    write_report(tmp_path / "r.jsonl", results)
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows[2] == {"line": 3, "status": "failed", "reason": "video missing.mp4 does not exist", "rank": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]


def test_default_report_path_is_the_deepest_common_folder_inside_the_data_root(tmp_path):
    root = tmp_path / "root"
    outs = [root / "a" / "x" / "1.safetensors", root / "a" / "y" / "2.safetensors"]
    assert default_report_path(outs, root, "r.jsonl") == root / "a" / "r.jsonl"
    assert default_report_path([], root, "r.jsonl") == root / "r.jsonl"
    # Outputs spread beyond the data root (their common folder could be "/"): the report stays in the data root.
    spread = [tmp_path / "a" / "1.safetensors", Path("/") / "elsewhere" / "2.safetensors"]
    assert default_report_path(spread, root, "r.jsonl") == root / "r.jsonl"


def test_without_torchrun_the_world_is_one(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.device.type) == (0, 1, False, "cpu")


def test_scripts_check_their_variables_before_launching(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    vae = tmp_path / "ckpt" / "causal_video_vae"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text("{}")
    anno = tmp_path / "a.jsonl"
    anno.write_text("")
    ok = {"MODEL_PATH": str(tmp_path / "ckpt"), "ANNO_FILE": str(anno), "WIDTH": "64", "HEIGHT": "48",
          "NUM_FRAMES": "17", "MODEL_DTYPE": "fp32"}
    cases = [
        ({"MODEL_PATH": ""}, "set MODEL_PATH"),
        ({"MODEL_PATH": str(tmp_path)}, "no config.json"),
        ({"ANNO_FILE": str(tmp_path / "nope.jsonl")}, "ANNO_FILE"),
        ({"WIDTH": "60"}, "WIDTH=60: must be a multiple of 8"),
        ({"HEIGHT": "abc"}, "HEIGHT=abc: must be a whole number, a multiple of 8"),
        ({"NUM_FRAMES": "16"}, "NUM_FRAMES=16 must be 8k+1"),
        ({"GPUS": "0"}, "GPUS=0: must be from 1 to 1024"),
    ]
    for override, message in cases:
        env = {**os.environ, **ok, **override}
        proc = subprocess.run(["sh", str(repo / "scripts" / "extract_vae_latent.sh")], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (override, proc.stderr)
    text_cases = [({"MODEL_PATH": ""}, "set MODEL_PATH"), ({"MODEL_PATH": str(tmp_path)}, "text_encoder/, tokenizer_2/, text_encoder_2/ (the pyramid_flux text encoders)"),
                  ({"BATCH_SIZE": "0"}, "BATCH_SIZE=0"), ({"KIND": "audio"}, "KIND=audio")]
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (tmp_path / "ckpt" / sub).mkdir()
    for override, message in text_cases:
        env = {**os.environ, **ok, **override}
        proc = subprocess.run(["sh", str(repo / "scripts" / "extract_text_feature.sh")], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (override, proc.stderr)
