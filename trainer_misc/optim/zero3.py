"""Load a pretrained diffusers model for training, without a full copy of it on every rank under ZeRO-3.

DDP and ZeRO-2 keep a whole replica of the parameters on every rank anyway, so they use ``from_pretrained``.
Under ZeRO-3 every rank holding the whole 2 B DiT in fp32 while loading (8 GB of host RAM per process, then the
whole model on each GPU before DeepSpeed partitions it) is what makes a large model not fit, so instead:

1. the model is constructed inside ``engine.model_init_context`` (DeepSpeed ``zero.Init``): each parameter is
   split across the ranks as soon as its module exists;
2. ``load_partitioned`` fills it one parameter at a time: rank 0 reads that tensor from the memory-mapped
   safetensors file, the ranks gather that one parameter, rank 0 writes it and DeepSpeed scatters it back.

Peak memory per rank is its 1/N share of the model plus one full parameter (the largest released one is 18 M
elements); only rank 0 opens the checkpoint. Checks are as strict as ``PyramidFluxTransformer.from_pretrained``:
missing, unexpected or mis-shaped weights raise on every rank (never a hang, never a half-loaded model).
"""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from trainer_misc.optim.engine import EngineConfig, model_init_context

logger = logging.getLogger(__name__)

__all__ = ["WEIGHTS_NAME", "load_partitioned", "load_pretrained_for_training", "safetensors_checkpoint"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"


class _Entry(NamedTuple):
    shape: tuple[int, ...]            # from the file header
    read: Callable[[], torch.Tensor]  # loads this one tensor


def _read_one(path: Path, key: str) -> torch.Tensor:
    # The file is mapped only while one tensor is read: keeping it open would leave every page read so far
    # resident in this process (the whole checkpoint, by the end).
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def safetensors_checkpoint(folder: Path) -> dict[str, _Entry]:
    """The tensors of a diffusers folder's weights (one file, or the shards its ``.index.json`` lists), each
    readable on its own; only the headers are read here."""
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    elif (folder / INDEX_NAME).is_file():
        files = sorted(set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values()))
    else:
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} (or sharded {INDEX_NAME}); point --model_path at "
                                "the downloaded checkpoint folder")
    entries: dict[str, _Entry] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                entries[key] = _Entry(tuple(f.get_slice(key).get_shape()),
                                      functools.partial(_read_one, folder / name, key))
    return entries


def _broadcast_problem(problem: Optional[str]) -> Optional[str]:
    """Rank 0's verdict, on every rank (so all of them raise together instead of some waiting forever)."""
    import torch.distributed as dist

    box = [problem]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_partitioned(model: nn.Module, source: str | os.PathLike,
                     entries_on_rank0: Callable[[], dict[str, _Entry]]) -> None:
    """Fill a model built under ``model_init_context`` (ZeRO-3) with the tensors ``entries_on_rank0()`` lists
    (called on rank 0 only; ``source`` names them in messages).

    Collective: every rank calls it; only rank 0 reads.
    """
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank()
    params = dict(model.named_parameters())
    buffers = {k: v for k, v in model.state_dict().items() if k not in params}
    problem, entries = None, {}
    if rank == 0:
        try:
            entries = entries_on_rank0()
        except (OSError, ValueError, SafetensorError) as e:  # all ranks must stop, not rank 0 alone
            entries, problem = {}, f"{source}: cannot read the weights: {e}"
        file_shapes = {k: e.shape for k, e in entries.items()}
        expected = {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in params.items()}
        expected.update({k: tuple(b.shape) for k, b in buffers.items()})
        missing = sorted(set(expected) - set(file_shapes))
        unexpected = sorted(set(file_shapes) - set(expected))
        bad = [f"{k}: file {file_shapes[k]} vs model {expected[k]}" for k in sorted(expected)
               if k in file_shapes and file_shapes[k] != expected[k]]
        if problem is None and (missing or unexpected or bad):
            problem = (f"{source}: weights do not match {type(model).__name__}: missing {missing[:8]}, "
                       f"unexpected {unexpected[:8]}, shape mismatches {bad[:5]}. Check that it holds this model "
                       "kind and variant and that config.json matches it.")
    problem = _broadcast_problem(problem)
    if problem:
        raise ValueError(problem)
    for name, param in params.items():
        # Every rank gathers this one parameter; rank 0 writes it; on exit DeepSpeed scatters it again.
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    param.data.copy_(entries[name].read())
    for name, buf in buffers.items():
        if rank == 0:
            buf.copy_(entries[name].read())
        dist.broadcast(buf, src=0)
    logger.info("loaded %d tensors from %s into ZeRO-3 partitions", len(params) + len(buffers), source)


def load_pretrained_for_training(model_cls, model_path: str | os.PathLike, subfolder: str, engine: EngineConfig,
                                 weights_file: Optional[str | os.PathLike] = None) -> nn.Module:
    """``model_cls.from_pretrained(model_path, subfolder=...)`` in fp32, then the single-file state dict
    ``weights_file`` if given (``--dit_pretrained_weight``, see ``checkpoint.load_dit_weights``).

    Under ZeRO-3 the model is built partitioned and filled by ``load_partitioned`` (see the module docstring);
    with ``weights_file`` the folder's weights are not read at all, and rank 0 holds that file while loading.
    """
    from pyramid_dit.weights import load_dit_weights, read_dit_state

    if engine.strategy != "zero3":
        model = model_cls.from_pretrained(model_path, subfolder=subfolder, torch_dtype=torch.float32)
        if weights_file:
            load_dit_weights(model, weights_file)
        return model
    config = model_cls.load_config(model_path, subfolder=subfolder)
    with model_init_context(engine):
        model = model_cls.from_config(config)
    if weights_file:
        def entries() -> dict[str, _Entry]:
            state = read_dit_state(Path(weights_file))
            return {k: _Entry(tuple(v.shape), functools.partial(lambda t: t, v)) for k, v in state.items()}
        load_partitioned(model, weights_file, entries)
    else:
        folder = Path(model_path) / subfolder
        load_partitioned(model, folder, lambda: safetensors_checkpoint(folder))
    return model
