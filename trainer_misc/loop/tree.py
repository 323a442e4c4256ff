"""One tree-map over the nested containers a batch or a model input is made of.

Batches are dataclasses (``TrainBatch``), dicts and lists of tensors; model inputs are dicts of lists of tensors.
Moving a batch to the device and casting model inputs to the training dtype are the same walk with another leaf
function, so both go through :func:`map_tensors`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

__all__ = ["map_tensors", "to_device", "cast_floats"]


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """``obj`` with every tensor ``t`` in it replaced by ``fn(t)``; containers are rebuilt, other leaves kept.

    Walks dataclass instances (init fields), dicts, lists and tuples (named tuples keep their type).
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(fn, getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Every tensor in ``obj`` moved to ``device``."""
    return map_tensors(lambda t: t.to(device, non_blocking=non_blocking), obj)


def cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """Every floating-point tensor in ``obj`` cast to ``dtype``; integer tensors (masks, ids) untouched."""
    return map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, obj)
