"""Writing files so that nothing is ever left half-written: safetensors and JSON go to a temp name in the same
folder, are fsynced, then renamed over the target; a process killed at any moment leaves the old file or the new
one, never a truncated one (and at most a ``.<name>.*.tmp`` that the next run sweeps away).

Used by the extraction tools (latents, text features), checkpoints and exports. Files get the mode the umask
allows, as a plain ``open`` would give them, so outputs on a shared cluster are readable by whoever the umask says.
Reading user files is :mod:`pyramid_dit.tensor_files` (no pickled code is ever run).
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import save_file

from pyramid_dit.tensor_files import SAFETENSORS_SUFFIXES, TensorFileError

__all__ = ["atomic_save_safetensors", "honour_umask", "process_umask", "read_json", "remove_stale_temps",
           "sweep_stale_temps", "write_json_atomic"]


def _temp_name(path: Path) -> Path:
    # Hidden, unique per writer, and recognisable so a rerun can delete what a killed writer left behind.
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temp files a killed writer of ``path`` left behind; returns what was removed.

    Only call this when no other process can be writing ``path`` (the extraction tools give every output to
    exactly one rank).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for p in path.parent.glob(f".{path.name}.*.tmp"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def process_umask() -> int:
    """The process umask. Read from /proc where possible: setting it to read it back, even briefly, races with
    other threads creating files."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have: 0666 (file) or 0777 (folder) minus the umask.

    safetensors writes its files 0600 and ``tempfile`` creates 0600 files and 0700 folders, whatever the umask; on a
    shared cluster, latents, features and exported models must be readable by whoever the umask allows.
    """
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~process_umask())


def sweep_stale_temps(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete the temp files killed writers left for any of ``paths`` (one directory listing per folder).

    A tool killed mid-write leaves ``.<name>.<pid>.<id>.tmp`` (often 0 bytes) next to an output it never finished;
    the extraction tools call this at start-up on the outputs their rank owns, so a rerun leaves none behind --
    also for outputs it then skips. Only pass outputs no other live process writes.
    """
    by_dir: dict[Path, set[str]] = {}
    for p in map(Path, paths):
        by_dir.setdefault(p.parent, set()).add(p.name)
    removed = []
    for folder, names in by_dir.items():
        try:
            listing = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for item in listing:
            parts = item.name[1:].rsplit(".", 3)  # .<name>.<pid>.<id>.tmp -> [name, pid, id, "tmp"]
            if item.name.startswith(".") and len(parts) == 4 and parts[3] == "tmp" and parts[0] in names:
                Path(item.path).unlink(missing_ok=True)
                removed.append(Path(item.path))
    return removed


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows; os.replace is still atomic there
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _independent_cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no two sharing storage (safetensors refuses shared or strided tensors).

    Copies only where needed, so saving a large CPU state dict does not double its memory.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tensor {key!r} is a {type(value).__name__}, not a torch.Tensor")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()  # tied weights or two views of one buffer: give this one its own storage
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[key] = t
    return out


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` so that ``path`` is either absent, the old file, or the complete new file.

    The data goes to a temp file in the same directory, is fsynced, then renamed over ``path``; a process killed at
    any moment leaves at most a ``.<name>.*.tmp`` file, never a truncated ``path``. Parent directories are created.
    The file gets the mode the umask allows (safetensors alone would make it 0600).
    """
    path = Path(path)
    if path.suffix not in SAFETENSORS_SUFFIXES:
        raise TensorFileError(f"{path}: outputs are written as safetensors; name the file *.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _independent_cpu_tensors(tensors)
    tmp = _temp_name(path)
    try:
        save_file(payload, str(tmp), metadata=dict(metadata) if metadata else None)
        honour_umask(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write JSON to a temp name in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    """A JSON file's content; ``FileNotFoundError`` / ``ValueError`` naming the file when missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
