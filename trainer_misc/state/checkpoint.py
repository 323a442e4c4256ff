"""Training checkpoints: atomic save, load, and what a rank keeps of its own (RNG states, EMA chunks).

Layout of one checkpoint (``<output_dir>/checkpoints/checkpoint-<step>/``, ``step`` = optimizer steps done)::

    trainer_state.json          step, data position, counters, run settings (rank 0)
    engine/                     model + optimizer: DeepSpeed's ZeRO files, or model/optimizer safetensors (DDP)
    rank_00000/rng.safetensors  torch / CUDA / numpy / python RNG states of that rank (+ rng.json)
    rank_00000/ema.safetensors  that rank's EMA chunks (when EMA is on)
    complete                    marker, written last

Every rank writes into ``checkpoint-<step>.tmp``; once all ranks are done rank 0 writes ``complete`` and renames
the folder, so a checkpoint folder either is complete or does not exist under its final name. A run killed while
saving leaves a ``.tmp`` folder that the lookup ignores and the next save replaces. Multi-node runs need
``output_dir`` on a filesystem every node sees (as DeepSpeed's own checkpoints do).

``complete`` lists every file with its size and SHA-256; resume verifies them and never runs pickled code, and a
failed write (disk full) keeps the earlier checkpoints: see :mod:`trainer_misc.state.trust`. Everything we write is
safetensors or JSON. Which checkpoint a run resumes from is decided in :mod:`trainer_misc.loop.resume`; the
exported model folders are :mod:`trainer_misc.state.export`.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch

from pyramid_dit.tensor_files import load_tensor_file
from trainer_misc.files import atomic_save_safetensors, read_json, write_json_atomic
from trainer_misc.runtime.distributed import barrier, broadcast_object
from trainer_misc.state.rng import capture_rng_state, restore_rng_state
from trainer_misc.state.trust import (
    CHECKPOINT_PREFIX,
    COMPLETE_MARKER,
    TRAINER_STATE,
    CheckpointWriteError,
    _all_gather,
    _hash_share,
    _is_write_error,
    _payload_files,
    _write_failed,
    list_checkpoints,
    safe_torch_load,
)

if TYPE_CHECKING:
    from trainer_misc.optim.ema import ShardedEMA
    from trainer_misc.optim.engine import TrainEngine

logger = logging.getLogger(__name__)

__all__ = ["load_checkpoint", "load_engine_state", "load_rank_tensors", "optimizer_state_from_flat",
           "optimizer_state_to_flat", "restore_rank_rng", "save_checkpoint", "save_engine_state"]


def _rank_dir(root: Path, rank: int) -> Path:
    return Path(root) / f"rank_{rank:05d}"


# ------------------------------------------------------------------------------------------------- optimizer

def optimizer_state_to_flat(state_dict: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """A torch optimizer ``state_dict()`` as flat tensors (``state.<param id>.<name>``) + JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "tensor_params": sorted(
        {int(k.split(".")[1]) for k in tensors})}


def optimizer_state_from_flat(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------------------------- engine state

def save_engine_state(engine: "TrainEngine", directory: Path) -> None:
    """Model + optimizer (+ fp16 loss scaler) into ``directory``. Collective: every rank must call it.

    DeepSpeed writes its own per-rank ZeRO files (model and optimizer partitions, ``torch.save``; read back
    without running pickled code, see :func:`load_engine_state`); DDP writes
    ``model.safetensors``, ``optimizer.safetensors`` + ``optimizer.json`` (and ``grad_scaler.json``) on rank 0.
    """
    directory = Path(directory)
    if engine.is_deepspeed:
        engine.model.save_checkpoint(str(directory), tag="zero", save_latest=False)
        return
    if engine.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(engine.module.state_dict(), directory / "model.safetensors")
        tensors, meta = optimizer_state_to_flat(engine.optimizer.optimizer.state_dict())
        atomic_save_safetensors(tensors, directory / "optimizer.safetensors")
        write_json_atomic(meta, directory / "optimizer.json")
        if engine.accelerator.scaler is not None:
            write_json_atomic(engine.accelerator.scaler.state_dict(), directory / "grad_scaler.json")

def load_engine_state(engine: "TrainEngine", directory: Path) -> None:
    """Inverse of :func:`save_engine_state` (same strategy and number of processes). Collective."""
    directory = Path(directory)
    if engine.is_deepspeed:
        if not (directory / "zero").is_dir():
            raise FileNotFoundError(f"{directory}: no DeepSpeed state ('zero' folder); was the checkpoint "
                                    f"written with strategy {engine.cfg.strategy!r}?")
        # DeepSpeed reads its files with torch.load(weights_only=False), which runs whatever a planted pickle
        # says; every read of load_checkpoint goes through the DeepSpeed engine's checkpoint_engine.load.
        engine.model.checkpoint_engine.load = safe_torch_load
        path, _ = engine.model.load_checkpoint(str(directory), tag="zero", load_optimizer_states=True,
                                             load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
        return
    model_file = directory / "model.safetensors"
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} missing; was the checkpoint written with strategy 'ddp'?")
    state = load_tensor_file(model_file)
    engine.module.load_state_dict(state, strict=True)
    flat = load_tensor_file(directory / "optimizer.safetensors")
    engine.optimizer.optimizer.load_state_dict(
        optimizer_state_from_flat(flat, read_json(directory / "optimizer.json")))
    scaler_file = directory / "grad_scaler.json"
    if engine.accelerator.scaler is not None and scaler_file.is_file():
        engine.accelerator.scaler.load_state_dict(read_json(scaler_file))


# ------------------------------------------------------------------------------------------------- save / load

def save_checkpoint(root: Path, step: int, engine: "TrainEngine", trainer_state: Mapping,
                    ema: Optional["ShardedEMA"] = None, keep_last: Optional[int] = None,
                    rank_tensors: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None) -> Path:
    """Write ``root/checkpoint-<step>`` atomically. Collective: every rank must call it with the same arguments.

    ``trainer_state`` (JSON-serialisable: step, data position, counters) is written by rank 0. ``keep_last``
    deletes older complete checkpoints beyond the newest ``keep_last``. ``rank_tensors`` (name -> tensors) are this
    rank's extra files, ``rank_<r>/<name>.safetensors`` (read back with :func:`load_rank_tensors`). A failed write raises
    :class:`CheckpointWriteError` (the partial folder removed, earlier checkpoints untouched).
    """
    root = Path(root)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f"{CHECKPOINT_PREFIX}{step}.tmp"
    try:
        if engine.is_main:
            root.mkdir(parents=True, exist_ok=True)
            for stale in list(root.glob(f"{CHECKPOINT_PREFIX}*.tmp")) + list(root.glob(f"{CHECKPOINT_PREFIX}*.old")):
                logger.warning("removing %s left by an interrupted save", stale)  # the output dir is locked: ours
                shutil.rmtree(stale)
            tmp.mkdir()
        barrier()

        save_engine_state(engine, tmp / "engine")
        rank_dir = _rank_dir(tmp, engine.rank)
        rank_dir.mkdir(parents=True, exist_ok=True)
        rng_tensors, rng_meta = capture_rng_state(engine.device)
        atomic_save_safetensors(rng_tensors, rank_dir / "rng.safetensors")
        write_json_atomic(rng_meta, rank_dir / "rng.json")
        if ema is not None:
            atomic_save_safetensors(ema.state_dict(), rank_dir / "ema.safetensors")
        for name, tensors in (rank_tensors or {}).items():
            atomic_save_safetensors(dict(tensors), rank_dir / f"{name}.safetensors")
        if engine.is_main:
            write_json_atomic(dict(trainer_state), tmp / TRAINER_STATE)
        barrier()

        names = broadcast_object(_payload_files(tmp) if engine.is_main else None)
        files: dict[str, dict] = {}
        for share in _all_gather(_hash_share(tmp, names)):
            files.update(share)
        if engine.is_main:
            write_json_atomic({"step": step, "world_size": engine.world_size, "time": time.time(), "files": files},
                              tmp / COMPLETE_MARKER)
            if final.exists():  # e.g. a rerun reaching the same step: replace, never leave a half state
                old = root / f"{CHECKPOINT_PREFIX}{step}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
    except Exception as e:
        if isinstance(e, CheckpointWriteError) or not _is_write_error(e, root):
            raise  # e.g. another rank failed during the save: not a storage problem
        raise _write_failed(e, root, tmp) from e
    if engine.is_main:
        if keep_last is not None and keep_last > 0:
            for _, path in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(path)
        logger.info("saved checkpoint %s", final)
    barrier()
    return final


def load_checkpoint(path: Path, engine: "TrainEngine", ema: Optional["ShardedEMA"] = None,
                    restore_rng: bool = True) -> dict:
    """Load a complete checkpoint into ``engine`` (and ``ema``), restore this rank's RNG states, and return the
    trainer state. Collective. Raises when the checkpoint was written with another strategy / number of
    processes."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE_MARKER!r} marker)")
    state = read_json(path / TRAINER_STATE)
    saved_world, saved_strategy = state.get("world_size"), state.get("strategy")
    if saved_world != engine.world_size or saved_strategy != engine.cfg.strategy:
        raise ValueError(f"{path} was written by a {saved_strategy!r} run with {saved_world} processes; this run "
                         f"is {engine.cfg.strategy!r} with {engine.world_size}. Resume with the same SHARD_STRATEGY "
                         "and GPUS, or start a new OUTPUT_DIR.")
    load_engine_state(engine, path / "engine")
    rank_dir = _rank_dir(path, engine.rank)
    if ema is not None:
        ema_file = rank_dir / "ema.safetensors"
        if ema_file.is_file():
            ema.load_state_dict(load_tensor_file(ema_file), source=str(ema_file))
        else:
            ema.reset_to_params()
            logger.warning("%s has no EMA state: the EMA starts from the resumed weights", path)
    if restore_rng:
        restore_rank_rng(path, engine.rank, engine.device)
    return state


def load_rank_tensors(path: Path, rank: int, name: str) -> dict[str, torch.Tensor]:
    """A file ``save_checkpoint(..., rank_tensors={name: ...})`` wrote for ``rank``; a clear error when absent."""
    file = _rank_dir(Path(path), rank) / f"{name}.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file} missing: the checkpoint was written by a run with another set-up "
                                "(e.g. another VIDEO_SYNC_GROUP); resume with the same settings or a new OUTPUT_DIR")
    return load_tensor_file(file)


def restore_rank_rng(path: Path, rank: int, device: Optional[torch.device] = None) -> None:
    """Restore the RNG states ``rank`` had when checkpoint ``path`` was written."""
    rank_dir = _rank_dir(Path(path), rank)
    restore_rng_state(load_tensor_file(rank_dir / "rng.safetensors"), read_json(rank_dir / "rng.json"), device,
                      source=str(rank_dir))


