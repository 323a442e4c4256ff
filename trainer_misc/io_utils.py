"""Reading and writing the pre-extracted training inputs: VAE latents and text features.

Our tools write safetensors (no pickle, memory-mappable). Files written by the reference tools (``torch.save`` of
a tensor for latents, of a dict for text features; usually named ``.pt``) are still accepted, loaded with
``torch.load(weights_only=True)`` so a stale or hostile pickle cannot run code, and existing extracted sets stay
usable. The format is chosen by suffix: ``.safetensors`` or ``.pt`` / ``.pth`` / ``.bin``.

Layouts (identical in both formats):

* latent: ``[1, C, T, h, w]`` (``C`` = 16 latent channels), the *raw* ``latent_dist.sample()`` of the causal VAE.
  The trainer applies the shift/scale normalisation itself. In safetensors the tensor is stored under ``"latent"``.
* text features: ``prompt_embed [1, L, D]`` float, ``prompt_attention_mask [1, L]`` integer (1 = token,
  0 = padding), ``pooled_prompt_embed [1, Dp]`` float.
"""
from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

LATENT_KEY = "latent"
TEXT_FEATURE_KEYS = ("prompt_embed", "prompt_attention_mask", "pooled_prompt_embed")
LATENT_CHANNELS = 16
# Where tools/extract_text_features.py writes the empty-prompt features (classifier-free-guidance dropout),
# relative to the data root, unless told otherwise.
EMPTY_PROMPT_FILENAME = "empty_prompt_text_fea.safetensors"

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


class DataFileError(ValueError):
    """A latent / text-feature file is missing, unreadable or has the wrong content. The message names the file."""


# ----------------------------------------------------------------------------------------------------- writing


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
        raise DataFileError(f"{path}: outputs are written as safetensors; name the file *.safetensors")
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


# ----------------------------------------------------------------------------------------------------- reading


def load_tensor_file(path: str | os.PathLike) -> dict[str, torch.Tensor] | torch.Tensor:
    """Load a safetensors file (as a dict) or a reference ``.pt`` file (a tensor or a dict of tensors).

    Tensors are cloned out of the safetensors memory map: mapped buffers can be unaligned, which changes float
    results slightly and keeps the file open.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: file does not exist")
    if path.stat().st_size == 0:
        raise DataFileError(f"{path}: file is empty (zero bytes)")
    if path.suffix in SAFETENSORS_SUFFIXES:
        try:
            return {k: v.clone() for k, v in load_file(str(path)).items()}
        except SafetensorError as e:
            raise DataFileError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise DataFileError(f"{path}: refused to unpickle (only tensors and dicts of tensors are loaded, "
                                f"with weights_only=True): {e}") from None
        except (RuntimeError, EOFError, ValueError) as e:
            raise DataFileError(f"{path}: not a readable torch file ({e})") from None
        if isinstance(obj, torch.Tensor):
            return obj
        if isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
        raise DataFileError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")
    raise DataFileError(f"{path}: unknown file type {path.suffix!r}; expected .safetensors, or .pt/.pth/.bin "
                        "written by the reference tools")


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty when there is none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise DataFileError(f"{path}: cannot read the safetensors header ({e})") from None


def check_latent(latent: torch.Tensor, *, source: str = "latent", channels: int | None = LATENT_CHANNELS) -> None:
    """Raise :class:`DataFileError` unless ``latent`` is a finite float ``[1, C, T, h, w]`` tensor."""
    if latent.ndim != 5 or latent.shape[0] != 1:
        raise DataFileError(f"{source}: expected a latent of shape [1, C, T, h, w], got {list(latent.shape)}")
    if channels is not None and latent.shape[1] != channels:
        raise DataFileError(f"{source}: expected {channels} latent channels, got shape {list(latent.shape)}")
    if not latent.is_floating_point():
        raise DataFileError(f"{source}: latent must be floating point, got {latent.dtype}")
    if not torch.isfinite(latent).all():
        raise DataFileError(f"{source}: latent contains NaN or inf")


def load_latent(path: str | os.PathLike, *, channels: int | None = LATENT_CHANNELS,
                frames: int | None = None) -> torch.Tensor:
    """Load a raw VAE latent ``[1, C, T, h, w]`` in its stored dtype (the reference stored bf16).

    ``frames``: keep only the first ``frames`` latent frames. From a safetensors file only those bytes are read
    (a 10 s clip stored whole, trained on 16 frames, costs 16 frames of I/O); a ``.pt`` file is loaded whole.
    """
    path = Path(path)
    if frames is not None and path.suffix in SAFETENSORS_SUFFIXES and path.is_file() and path.stat().st_size:
        try:
            with safe_open(str(path), framework="pt") as f:
                if LATENT_KEY not in f.keys():
                    raise DataFileError(f"{path}: no {LATENT_KEY!r} tensor (found {sorted(f.keys())})")
                part = f.get_slice(LATENT_KEY)
                if len(part.get_shape()) != 5:
                    raise DataFileError(f"{path}: expected a latent of shape [1, C, T, h, w], "
                                        f"got {list(part.get_shape())}")
                latent = part[:, :, :frames].contiguous()
        except SafetensorError as e:
            raise DataFileError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        obj = load_tensor_file(path)
        if isinstance(obj, dict):
            if LATENT_KEY not in obj:
                raise DataFileError(f"{path}: no {LATENT_KEY!r} tensor (found {sorted(obj)})")
            latent = obj[LATENT_KEY]
        else:
            latent = obj
        if frames is not None:
            latent = latent[:, :, :frames]
    check_latent(latent, source=str(path), channels=channels)
    return latent


def check_text_features(fea: Mapping[str, torch.Tensor], *, source: str = "text features") -> None:
    """Raise :class:`DataFileError` unless ``fea`` has the three text-feature tensors with consistent shapes."""
    missing = [k for k in TEXT_FEATURE_KEYS if k not in fea]
    if missing:
        raise DataFileError(f"{source}: missing {missing} (found {sorted(fea)})")
    emb, mask, pooled = (fea[k] for k in TEXT_FEATURE_KEYS)
    if emb.ndim != 3 or emb.shape[0] != 1 or not emb.is_floating_point():
        raise DataFileError(f"{source}: prompt_embed must be float [1, L, D], got {emb.dtype} {list(emb.shape)}")
    if mask.shape != emb.shape[:2] or mask.is_floating_point():
        raise DataFileError(f"{source}: prompt_attention_mask must be integer [1, {emb.shape[1]}], "
                            f"got {mask.dtype} {list(mask.shape)}")
    if pooled.ndim != 2 or pooled.shape[0] != 1 or not pooled.is_floating_point():
        raise DataFileError(f"{source}: pooled_prompt_embed must be float [1, Dp], "
                            f"got {pooled.dtype} {list(pooled.shape)}")
    if not (torch.isfinite(emb).all() and torch.isfinite(pooled).all()):
        raise DataFileError(f"{source}: text features contain NaN or inf")


def load_text_features(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load ``{prompt_embed, prompt_attention_mask, pooled_prompt_embed}`` (each with a leading batch dim of 1)."""
    obj = load_tensor_file(path)
    if not isinstance(obj, dict):
        raise DataFileError(f"{path}: expected a dict of text-feature tensors, got a single tensor")
    check_text_features(obj, source=str(path))
    return {k: obj[k] for k in TEXT_FEATURE_KEYS}


def default_empty_prompt_path(data_root: str | os.PathLike) -> Path:
    """Where the empty-prompt features live by default: ``<data root>/empty_prompt_text_fea.safetensors``."""
    return Path(data_root) / EMPTY_PROMPT_FILENAME
