"""The shared annotation loader: valid lines, every kind of bad line (with file and line number), path roots."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer_misc.data.annotation import (
    DATA_ROOT_ENV,
    AnnotationError,
    ImageEntry,
    VideoEntry,
    load_annotation,
    parse_annotation,
    resolve_data_root,
)

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _video(i: int, **extra) -> str:
    obj = {"video": f"v/{i}.mp4", "text": f"caption {i}", "latent": f"l/{i}.safetensors",
           "text_fea": f"t/{i}.safetensors", **extra}
    return json.dumps(obj)


def test_valid_video_lines_resolve_against_the_annotation_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    anno = _write(tmp_path / "a.jsonl", [_video(0), "", _video(1, frames=[0, 2, 4]),
                                         json.dumps({"video": "/abs/x.mp4", "text": "t", "latent": "~/l.safetensors",
                                                     "extra": {"ignored": True}})])
    entries = load_annotation(anno, require=("latent",))
    assert [type(e) for e in entries] == [VideoEntry] * 3
    assert [e.line for e in entries] == [1, 3, 4]
    assert [e.index for e in entries] == [0, 1, 2]  # blank lines do not count
    assert entries[0].video == tmp_path / "v/0.mp4"
    assert entries[0].latent == tmp_path / "l/0.safetensors"
    assert entries[0].text_fea == tmp_path / "t/0.safetensors"
    assert entries[0].frames is None
    assert entries[1].frames == (0, 2, 4)
    assert entries[2].video == Path("/abs/x.mp4")
    assert entries[2].latent == Path("~/l.safetensors").expanduser()
    assert entries[2].text_fea is None


def test_data_root_order_flag_then_env_then_annotation_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    anno = _write(tmp_path / "sub" / "a.jsonl", [_video(0)])
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    assert resolve_data_root(anno) == tmp_path / "sub"
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env"))
    assert resolve_data_root(anno) == tmp_path / "env"
    assert load_annotation(anno)[0].video == tmp_path / "env" / "v/0.mp4"
    assert resolve_data_root(anno, tmp_path / "flag") == tmp_path / "flag"
    assert load_annotation(anno, data_root=tmp_path / "flag")[0].latent == tmp_path / "flag" / "l/0.safetensors"


BAD_LINES = [
    ('{"video": "a.mp4", "text": ', "bad JSON"),
    ('["video", "text"]', "expected a JSON object, got list"),
    ('{"text": "t", "latent": "l.safetensors"}', "missing key(s) 'video'"),
    ('{"video": "a.mp4", "latent": "l.safetensors"}', "missing key(s) 'text'"),
    ('{"video": "a.mp4", "text": "t"}', "missing key(s) 'latent'"),
    ('{"video": "a.mp4", "text": "   ", "latent": "l.safetensors"}', '"text" is empty'),
    ('{"video": "a.mp4", "text": 3, "latent": "l.safetensors"}', '"text" must be a string'),
    ('{"video": "", "text": "t", "latent": "l.safetensors"}', '"video" must be a non-empty string path'),
    ('{"image": "a.jpg", "text": "t", "latent": "l.safetensors"}', "image line"),
    ('{"video": "still.JPG", "text": "t", "latent": "l.safetensors"}', "points at an image file"),
    ('{"video": "a.mp4", "text": "t", "latent": "l.safetensors", "frames": [0, 2, 2]}', "strictly increasing"),
    ('{"video": "a.mp4", "text": "t", "latent": "l.safetensors", "frames": [0, -1]}', "non-negative integers"),
    ('{"video": "a.mp4", "text": "t", "latent": "l.safetensors", "frames": [true]}', "non-negative integers"),
    ('{"video": "a.mp4", "text": "t", "latent": "l.safetensors", "frames": []}', "non-empty list"),
]


def test_every_bad_line_is_reported_with_file_and_line_and_the_good_lines_survive(tmp_path):
    lines = [_video(0)] + [bad for bad, _ in BAD_LINES] + [_video(1)]
    anno = _write(tmp_path / "a.jsonl", lines)
    parsed = parse_annotation(anno, require=("latent",))
    assert [e.line for e in parsed.entries] == [1, len(lines)]
    assert len(parsed.issues) == len(BAD_LINES)
    for issue, (_, expected), line in zip(parsed.issues, BAD_LINES, range(2, len(lines))):
        assert issue.line == line and issue.index == line - 1
        assert expected in issue.message, (line, issue.message)
        assert str(issue).startswith(f"{anno}:{line}: ")
    with pytest.raises(AnnotationError) as err:
        load_annotation(anno, require=("latent",))
    assert f"{len(BAD_LINES)} bad line(s)" in str(err.value) and f"{anno}:2:" in str(err.value)


def test_image_annotations(tmp_path):
    anno = _write(tmp_path / "i.jsonl", [json.dumps({"image": "a.jpg", "text": "a cat"}),
                                         json.dumps({"video": "a.mp4", "text": "t"})])
    parsed = parse_annotation(anno, kind="image")
    assert parsed.entries == [ImageEntry(index=0, line=1, image=tmp_path / "a.jpg", text="a cat")]
    assert parsed.issues[0].line == 2 and "video line" in parsed.issues[0].message


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(AnnotationError, match="does not exist"):
        parse_annotation(tmp_path / "nope.jsonl")
    with pytest.raises(AnnotationError, match="no entries"):
        load_annotation(_write(tmp_path / "e.jsonl", [""]))


@pytest.mark.parametrize("name,kind", [("video_text.jsonl", "video"), ("image_text.jsonl", "image")])
def test_repository_examples_are_valid(name, kind):
    require = ("latent", "text_fea") if kind == "video" else ()
    entries = load_annotation(REPO / "annotation" / name, kind=kind, require=require)
    assert len(entries) >= 2
