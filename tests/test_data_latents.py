"""Latent extraction end to end: 2 processes (torchrun, gloo) on the tiny checkpoint and demo clips, with every kind
of bad input in the same annotation, killed part-way and rerun; then checked against a direct VAE encode."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pyramid_dit.tensor_files import TensorFileError
from tools.extract_video_vae_latents import item_generator, load_clip, load_vae, main
from tools.make_demo_dataset import make_demo_dataset
from trainer_misc.data.annotation import parse_annotation
from trainer_misc.data.features import load_latent
from trainer_misc.files import atomic_save_safetensors

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, NUM_FRAMES = 64, 48, 17


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from tools.build_tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def _row(video: str, latent: str, text: str = "a shape moving", **extra) -> str:
    return json.dumps({"video": video, "text": text, "latent": latent, "text_fea": "unused.safetensors", **extra})


# (annotation line, expected status, words expected in the reason); the line number is the position + 1.
def _lines(data: Path) -> list[tuple[str, str, str | None]]:
    good = [(_row(f"videos/clip_{i % 4:02d}.mp4", f"latents/good_{i}.safetensors"), "done", None) for i in range(6)]
    return good + [
        (_row("videos/clip_01.mp4", "latents/frames.safetensors", frames=list(range(0, 24, 2))), "done", None),
        (_row("videos/clip_02.mp4", "latents/was_corrupt.safetensors"), "done", "replaced an unreadable"),
        (_row("videos/missing.mp4", "latents/missing.safetensors"), "failed", "does not exist"),
        (_row("bad/empty.mp4", "latents/empty.safetensors"), "failed", "is empty (zero bytes)"),
        (_row("bad/corrupt.mp4", "latents/corrupt.safetensors"), "failed", "cannot open"),
        (_row("bad/short.mp4", "latents/short.safetensors"), "failed", "only 5 frame(s) available, need at least 9"),
        (_row("images/clip_00.png", "latents/image.safetensors"), "failed", "points at an image file"),
        (_row("videos/clip_03.mp4", "blocker/sub/x.safetensors"), "failed", "cannot write latent"),
        (_row("videos/clip_03.mp4", "latents/good_0.safetensors"), "failed", "also the output of line 1"),
        (_row("videos/clip_03.mp4", "latents/ref_style.pt"), "failed", "must end with .safetensors"),
        ('{"video": "videos/clip_00.mp4", "text": "x", ', "failed", "bad JSON"),
        (json.dumps({"video": "videos/clip_00.mp4", "text": "x"}), "failed", "missing key(s) 'latent'"),
        (_row("videos/clip_00.mp4", "latents/notext.safetensors", text=" "), "failed", '"text" is empty'),
    ]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[tuple[str, str, str | None]]]:
    data = tmp_path_factory.mktemp("data")
    make_demo_dataset(data, num_clips=4, num_frames=25, width=96, height=64)
    bad = data / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    make_demo_dataset(data / "short", num_clips=1, num_frames=5, images=False)
    os.replace(data / "short" / "videos" / "clip_00.mp4", bad / "short.mp4")
    (data / "blocker").write_text("a file where a folder is expected")
    (data / "latents").mkdir()
    (data / "latents" / "was_corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"trunc")
    lines = _lines(data)
    (data / "anno.jsonl").write_text("\n".join(line for line, _, _ in lines) + "\n")
    return data, lines


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYRAMID_DATA_ROOT="")
    return env


def _script(ckpt: Path, data: Path, gpus: int, *extra: str) -> list[str]:
    return ["env", f"MODEL_PATH={ckpt}", f"ANNO_FILE={data / 'anno.jsonl'}", f"WIDTH={WIDTH}", f"HEIGHT={HEIGHT}",
            f"NUM_FRAMES={NUM_FRAMES}", f"GPUS={gpus}", "MODEL_DTYPE=fp32", "NUM_WORKERS=1",
            f"EXTRA_ARGS=--no_progress {' '.join(extra)}", "sh", str(REPO / "scripts" / "extract_vae_latent.sh")]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _all_outputs(data: Path) -> list[Path]:
    return sorted((data / "latents").glob("*.safetensors"))


@pytest.fixture(scope="module")
def killed_then_rerun(tiny_ckpt, dataset, tmp_path_factory) -> dict:
    """Extraction killed part-way (single process), then rerun to completion with 2 ranks. Shared by the tests
    below, so each of them runs alone as well as in the suite (no test depends on another's order)."""
    data, lines = dataset
    tmp_path = tmp_path_factory.mktemp("killed")
    # 1) start a single process (the script runs it without torchrun) and kill it and its decode workers
    #    (SIGKILL, no cleanup) once the first latent lands
    with open(tmp_path / "killed.log", "wb") as log_file:
        proc = subprocess.Popen(_script(tiny_ckpt, data, 1), env=_env(), cwd=REPO, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not any(p.name.startswith("good_") for p in _all_outputs(data)) and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            time.sleep(0.02)
        still_running = proc.poll() is None
        for pid in reversed(_descendants(proc.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
    after_kill = {}
    for p in _all_outputs(data):  # what is there when the processes died, readable or not
        try:
            after_kill[p] = tuple(load_latent(p).shape)
        except TensorFileError as e:
            after_kill[p] = str(e)
    # 2) rerun to completion with 2 ranks (torchrun, gloo)
    rerun = subprocess.run(_script(tiny_ckpt, data, 2), env=_env(), cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    return {"still_running": still_running, "after_kill": after_kill, "rerun": rerun,
            "killed_log": (tmp_path / "killed.log").read_text()}


def test_killed_then_rerun_with_two_processes(killed_then_rerun, dataset):
    data, lines = dataset
    run = killed_then_rerun
    assert run["still_running"], "extraction finished before it could be killed; the kill was not exercised"
    valid = []
    for p, shape in run["after_kill"].items():  # complete when the processes died (the corrupt plant aside)
        if p.name == "was_corrupt.safetensors" and isinstance(shape, str):
            continue
        assert not isinstance(shape, str) and shape[1] == 16, (p, shape)
        valid.append(p)
    num_ok = sum(status == "done" for _, status, _ in lines)
    assert 0 < len(valid) < num_ok, valid

    # the rerun: bad items fail with their reason, the rest finish, existing outputs are skipped
    rerun = run["rerun"]
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode != 0, log  # some items failed
    records = [json.loads(x) for x in (data / "anno.latents_report.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(1, len(lines) + 1)), log
    for n, ((_, status, words), r) in enumerate(zip(lines, records), start=1):
        if status == "done":
            assert r["status"] in ("done", "skipped"), r
            assert (r["status"] == "skipped") == (Path(r["output"]) in valid), r
        else:
            assert r["status"] == "failed", r
            assert f"FAILED {data / 'anno.jsonl'}:{n}: " in log, (n, log)
        if words and r["status"] != "skipped":
            assert words in r["reason"], (n, r)
    assert {r["rank"] for r in records} == {0, 1}
    num_bad = len(lines) - num_ok
    assert f"VAE latents: {num_ok - len(valid)} done, {len(valid)} skipped, {num_bad} failed" in log, log

    # every output is valid and has the expected shape: 17 frames at 64x48 -> [1, 16, 3, 6, 8]
    for i in range(6):
        assert load_latent(data / "latents" / f"good_{i}.safetensors").shape == (1, 16, 3, 6, 8)
    assert load_latent(data / "latents" / "frames.safetensors").shape == (1, 16, 2, 6, 8)  # 12 frames -> 9
    assert load_latent(data / "latents" / "was_corrupt.safetensors").shape == (1, 16, 3, 6, 8)
    assert not list(data.rglob("*.tmp")), list(data.rglob("*.tmp"))


def test_latents_equal_a_direct_encode(tiny_ckpt, dataset, killed_then_rerun):
    data, _ = dataset
    vae = load_vae(tiny_ckpt / "causal_video_vae", torch.device("cpu"), torch.float32)
    entries = {e.line: e for e in parse_annotation(data / "anno.jsonl", require=("latent",)).entries}
    for line in (2, 6, 7):  # rank 1, rank 1 (clip_01 again), explicit frames
        e = entries[line]
        pixels = load_clip(e.video, WIDTH, HEIGHT, NUM_FRAMES, e.frames)[None]
        with torch.no_grad():
            dist = vae.encode(pixels, temporal_chunk=True, window_size=16).latent_dist
            expected = dist.sample(generator=item_generator(0, e.index))
        stored = load_latent(e.latent)
        assert stored.dtype == torch.float32
        err = (stored - expected).abs().max() / expected.abs().max()
        assert err < 1e-5, (line, err)
        # the per-line seed matters: a different draw is far away
        other = dist.sample(generator=item_generator(1, e.index))
        assert (stored - other).abs().max() / expected.abs().max() > 1e-2


def test_single_process_skip_overwrite_and_changed_settings(tiny_ckpt, tmp_path):
    data = tmp_path
    make_demo_dataset(data, num_clips=2, num_frames=17, width=64, height=48, images=False)

    def run(width: int = 64, num_frames: int = 17, *extra: str) -> list[tuple[str, str]]:
        args = ["--model_path", str(tiny_ckpt / "causal_video_vae"), "--anno_file", str(data / "video_text.jsonl"),
                "--width", str(width), "--height", "48", "--num_frames", str(num_frames), "--model_dtype", "fp32",
                "--num_workers", "0", "--no_progress", "--latent_kind", "mean", "--report", str(data / "r.jsonl"),
                *extra]
        assert main(args) == 0
        rows = [json.loads(x) for x in (data / "r.jsonl").read_text().splitlines()]
        return [(r["status"], r.get("reason", "")) for r in rows]

    assert [st for st, _ in run()] == ["done", "done"]
    out = data / "latents" / "clip_00.safetensors"
    first = load_latent(out)
    # a rerun skips valid outputs (even ones it did not write); --overwrite redoes them
    marker = torch.full_like(first, 7.0)
    atomic_save_safetensors({"latent": marker}, out)
    assert [st for st, _ in run()] == ["skipped", "skipped"]
    assert torch.equal(load_latent(out), marker)
    assert [st for st, _ in run(64, 17, "--overwrite")] == ["done", "done"]
    assert torch.equal(load_latent(out), first)  # the mean is deterministic
    # outputs made with other settings are not mistaken for finished work
    statuses = run(64, 9)
    assert all(st == "done" and "max_frames changed" in why for st, why in statuses), statuses
    assert load_latent(out).shape == (1, 16, 2, 6, 8)
    statuses = run(48, 9)
    assert all(st == "done" and "another size" in why for st, why in statuses), statuses
    assert load_latent(out).shape == (1, 16, 2, 6, 6)
    # and the stored mean is what a direct encode gives
    run(64, 17)
    vae = load_vae(tiny_ckpt / "causal_video_vae", torch.device("cpu"), torch.float32)
    with torch.no_grad():
        pixels = load_clip(data / "videos" / "clip_00.mp4", 64, 48, 17)[None]
        mean = vae.encode(pixels, temporal_chunk=True, window_size=16).latent_dist.mean
    assert ((load_latent(out) - mean).abs().max() / mean.abs().max()) < 1e-5


def test_bf16_latents_are_stored_in_bf16_and_close_to_fp32(tiny_ckpt, tmp_path):
    make_demo_dataset(tmp_path, num_clips=1, num_frames=17, width=64, height=48, images=False)
    assert main(["--model_path", str(tiny_ckpt / "causal_video_vae"), "--anno_file", str(tmp_path / "video_text.jsonl"),
                 "--width", "64", "--height", "48", "--num_frames", "17", "--model_dtype", "bf16",
                 "--num_workers", "0", "--no_progress", "--latent_kind", "mean"]) == 0
    stored = load_latent(tmp_path / "latents" / "clip_00.safetensors")
    assert stored.dtype == torch.bfloat16 and stored.shape == (1, 16, 3, 6, 8)
    vae = load_vae(tiny_ckpt / "causal_video_vae", torch.device("cpu"), torch.float32)
    with torch.no_grad():
        pixels = load_clip(tmp_path / "videos" / "clip_00.mp4", 64, 48, 17)[None]
        mean = vae.encode(pixels, temporal_chunk=True, window_size=16).latent_dist.mean
    assert (stored.float() - mean).abs().max() / mean.abs().max() < 5e-2


def test_run_level_errors_are_one_clear_line(tiny_ckpt, tmp_path, capsys):
    assert main(["--model_path", str(tmp_path), "--anno_file", str(tmp_path / "a.jsonl"), "--no_progress"]) == 2
    assert "no config.json in --model_path" in capsys.readouterr().err
    (tmp_path / "a.jsonl").write_text(_row("v.mp4", "l.safetensors") + "\n")
    assert main(["--model_path", str(tiny_ckpt / "causal_video_vae"), "--anno_file", str(tmp_path / "b.jsonl"),
                 "--no_progress"]) == 2
    assert f"annotation file --anno_file {tmp_path / 'b.jsonl'} not found" in capsys.readouterr().err
    assert main(["--model_path", str(tiny_ckpt / "causal_video_vae"), "--anno_file", "x", "--num_frames", "16"]) == 2
    assert "--num_frames 16 must be 8k+1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["--model_path", str(tiny_ckpt), "--anno_file", "x", "--width", "60"])
    assert stop.value.code == 2 and "argument --width: must be a multiple of 8" in capsys.readouterr().err


def test_num_frames_beyond_every_clip_is_said_once_with_counts(tiny_ckpt, tmp_path, capsys):
    make_demo_dataset(tmp_path, num_clips=2, num_frames=17, width=64, height=48, images=False)
    assert main(["--model_path", str(tiny_ckpt / "causal_video_vae"), "--anno_file", str(tmp_path / "video_text.jsonl"),
                 "--width", "64", "--height", "48", "--num_frames", "33", "--model_dtype", "fp32",
                 "--num_workers", "0", "--no_progress", "--latent_kind", "mean"]) == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 1
    assert ("note: --num_frames (NUM_FRAMES) 33 is more than every clip has: all 2 clips extracted were cut to 17 "
            "frames at most, i.e. 3 latent frames, not 5.") in err
    assert load_latent(tmp_path / "latents" / "clip_00.safetensors").shape[2] == 3


def test_short_clips_note_counts_only_the_short_ones():
    from tools.extract_video_vae_latents import short_clips_note
    from tools.extraction_common import ItemResult

    def done(frames: int) -> ItemResult:
        return ItemResult(line=1, status="done", extra={"frames": frames})

    assert short_clips_note([done(33), done(33)], 33) is None
    assert short_clips_note([done(33), done(17), done(9), ItemResult(line=4, status="failed")], 33) == (
        "note: 2 of 3 clips extracted have fewer than --num_frames (NUM_FRAMES) 33 frames (shortest: 9 frames = "
        "2 latent frames); their latents are shorter than the others'.")
