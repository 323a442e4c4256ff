"""Writing files so that nothing is ever left half-written: safetensors and JSON go to a temp name in the same
folder, are fsynced, then renamed over the target; a process killed at any moment leaves the old file or the new
one, never a truncated one (and at most a ``.<name>.*.tmp`` that the next run sweeps away).

Every writer returns the file's size and SHA-256, computed from the bytes as they are written: a checkpoint's
manifest needs no second pass over files of gigabytes (:class:`FileDigest`). The safetensors layout is written here
directly (an 8-byte header length, the JSON header, then each tensor's bytes in order), so the bytes stream from
the tensors to the file through the hash without a copy of the whole file in memory.

Used by the extraction tools (latents, text features), checkpoints and exports. Files get the mode the umask
allows, as a plain ``open`` would give them, so outputs on a shared cluster are readable by whoever the umask says.
Reading user files is :mod:`pyramid_dit.tensor_files` (no pickled code is ever run).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

import torch

from pyramid_dit.tensor_files import SAFETENSORS_SUFFIXES, TensorFileError

__all__ = ["FileDigest", "atomic_save_safetensors", "disk_usage", "free_space", "honour_umask", "process_umask",
           "read_json", "remove_stale_temps", "sweep_stale_temps", "write_json_atomic", "write_safetensors"]

# safetensors' names of the tensor dtypes we write.
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_CHUNK = 64 << 20  # bytes handed to the file (and the hash) at a time


@dataclass(frozen=True)
class FileDigest:
    """A written file's size in bytes and SHA-256 (hex), as a checkpoint manifest records them."""

    size: int
    sha256: str


class _Hashed:
    """A binary file that hashes and counts what is written to it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self.hash.update(data)
        self.size += len(data)

    def digest(self) -> FileDigest:
        return FileDigest(self.size, self.hash.hexdigest())


def _temp_name(path: Path) -> Path:
    # Hidden, unique per writer, and recognisable so a rerun can delete what a killed writer left behind.
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temp files a killed writer of ``path`` left behind; returns what was removed.

    Only call this when no other process can be writing ``path`` (the extraction tools give every output to
    exactly one rank).
    """
    return sweep_stale_temps([path])


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


def write_safetensors(tensors: Mapping[str, torch.Tensor], f: BinaryIO,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Serialise ``tensors`` (CPU, contiguous, no shared storage: :func:`_independent_cpu_tensors`) in the
    safetensors format to the open binary file ``f``, tensor by tensor."""
    header: dict[str, Any] = {}
    offset = 0
    for key, t in tensors.items():
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {key!r}: dtype {t.dtype} has no safetensors name here")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for t in tensors.values():
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        for start in range(0, len(data), _CHUNK):
            f.write(data[start:start + _CHUNK])


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> FileDigest:
    """Write ``tensors`` to ``path`` so that ``path`` is either absent, the old file, or the complete new file, and
    return its size and SHA-256 (hashed as it is written).

    The data goes to a temp file in the same directory, is fsynced, then renamed over ``path``; a process killed at
    any moment leaves at most a ``.<name>.*.tmp`` file, never a truncated ``path``. Parent directories are created.
    The file gets the mode the umask allows.
    """
    path = Path(path)
    if path.suffix not in SAFETENSORS_SUFFIXES:
        raise TensorFileError(f"{path}: outputs are written as safetensors; name the file *.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _independent_cpu_tensors(tensors)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            out = _Hashed(f)
            write_safetensors(payload, out, metadata)
            f.flush()
            os.fsync(f.fileno())
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return out.digest()


def write_json_atomic(obj: Any, path: Path) -> FileDigest:
    """Write JSON to a temp name in the same folder, fsync, then rename over ``path``; returns its size and
    SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(obj, indent=2, sort_keys=True).encode("utf-8")
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return FileDigest(len(data), hashlib.sha256(data).hexdigest())


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


def disk_usage(path: str | os.PathLike):
    """``shutil.disk_usage`` of the filesystem of ``path``, or of its nearest existing parent (a folder not made
    yet); None when nothing on the way exists."""
    path = Path(path)
    for p in [path, *path.parents]:
        if p.exists():
            return shutil.disk_usage(p)
    return None


def free_space(path: str | os.PathLike) -> str:
    """Free space on the filesystem of ``path`` (or of its nearest existing parent), for messages."""
    usage = disk_usage(path)
    if usage is None:
        return "unknown"
    return f"{usage.free / 2**30:.2f} GiB" if usage.free >= 2**30 else f"{usage.free / 2**20:.1f} MiB"
