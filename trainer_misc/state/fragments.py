"""Named tensors stored as flat fragments, readable back by range: the checkpoint layout that does not depend on the
number of processes or the sharding strategy that wrote it.

A training state is a set of named full-size tensors (each trainable parameter's fp32 master weights, its AdamW
moments, its EMA). Under ZeRO or the sharded EMA each rank holds only a *fragment* of each: a run of elements of
the flattened tensor. Every rank writes the fragments it holds to its own file (``rank_<r>.safetensors``, 1-D
tensors under ``<name>::<part>`` plus their offsets and full shapes in the header), so a save needs no
communication; any later launch reads, for whatever fragments *it* holds, exactly the ranges it needs from
whichever files hold them (safetensors reads slices of a 1-D tensor without loading the rest). A resume on
another process count or another strategy is then just a different set of ranges.
"""
from __future__ import annotations

import json
import math
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open

from trainer_misc.files import FileDigest, atomic_save_safetensors

__all__ = ["Fragment", "FragmentReader", "write_fragments"]

INDEX_KEY = "fragments"  # safetensors metadata key of the per-file index: key -> [start, numel, full shape]


@dataclass(frozen=True)
class Fragment:
    """Elements ``[start, start + data.numel())`` of the flattened tensor of shape ``shape``."""

    start: int
    data: torch.Tensor
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        numel = math.prod(self.shape)
        if self.data.dim() != 1 or not 0 <= self.start <= self.start + self.data.numel() <= numel:
            raise ValueError(f"fragment [{self.start}, {self.start + self.data.numel()}) of a tensor of {numel} "
                             f"elements (data shape {tuple(self.data.shape)})")


def write_fragments(path: Path, fragments: Mapping[str, Fragment]) -> FileDigest:
    """Write ``fragments`` (key -> fragment) to one safetensors file, atomically; returns its size and hash."""
    index = {key: [f.start, f.data.numel(), list(f.shape)] for key, f in fragments.items()}
    return atomic_save_safetensors({key: f.data for key, f in fragments.items()}, path,
                                   metadata={INDEX_KEY: json.dumps(index, separators=(",", ":"))})


class FragmentReader:
    """Reads ranges of named tensors from the fragment files of a folder (``*.safetensors`` written by
    :func:`write_fragments`); only the headers are read at construction."""

    def __init__(self, folder: Path, files: Optional[Iterable[Path]] = None) -> None:
        self.folder = Path(folder)
        self._pieces: dict[str, list[tuple[int, int, Path]]] = {}  # key -> sorted (start, stop, file)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in sorted(files if files is not None else self.folder.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    index = json.loads((f.metadata() or {}).get(INDEX_KEY, "{}"))
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"{path}: not a readable fragment file ({e})") from None
            for key, (start, numel, shape) in index.items():
                shape = tuple(int(d) for d in shape)
                if self._shapes.setdefault(key, shape) != shape:
                    raise ValueError(f"{path}: {key} has shape {shape}, another file says {self._shapes[key]}")
                self._pieces.setdefault(key, []).append((int(start), int(start) + int(numel), path))
        for pieces in self._pieces.values():
            pieces.sort()

    def keys(self) -> list[str]:
        return sorted(self._pieces)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._shapes:
            raise KeyError(f"{self.folder}: no {key!r} in the checkpoint")
        return self._shapes[key]

    def read(self, key: str, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor ``key`` (default: all of it), 1-D."""
        numel = math.prod(self.shape(key))
        stop = numel if stop is None else stop
        if not 0 <= start <= stop <= numel:
            raise ValueError(f"{key}: range [{start}, {stop}) outside its {numel} elements")
        pieces = self._pieces[key]
        if start == stop:  # an empty range (a rank holding nothing of a small tensor), in the stored dtype
            with safe_open(str(pieces[0][2]), framework="pt") as f:
                return f.get_slice(key)[0:0]
        parts, at = [], start
        i = max(0, bisect_right(pieces, (start, float("inf"), Path())) - 1)
        while at < stop:
            if i >= len(pieces) or pieces[i][0] > at:
                raise ValueError(f"{self.folder}: elements [{at}, {stop}) of {key} are in no file of the checkpoint")
            lo, hi, path = pieces[i]
            if hi > at:
                end = min(hi, stop)
                with safe_open(str(path), framework="pt") as f:
                    parts.append(f.get_slice(key)[at - lo:end - lo])
                at = end
            i += 1
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    def read_full(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` in its shape."""
        return self.read(key).reshape(self.shape(key))
