"""Training checkpoints (atomic save, newest-complete lookup, resume), export, and loading pretrained DiT weights.

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
failed write (disk full) keeps the earlier checkpoints: see ``trainer_misc.checkpoint_trust``, whose names are
re-exported here. Everything we write is safetensors or JSON.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from .checkpoint_trust import (CHECKPOINT_PREFIX, COMPLETE_MARKER, TRAINER_STATE, CheckpointError,  # noqa: F401
                               CheckpointWriteError, _all_gather, _hash_share, _is_write_error, _payload_files,
                               _write_failed, choose_resume_checkpoint, find_latest_checkpoint, list_checkpoints,
                               note_changed_settings, read_json, safe_torch_load, verify_checkpoint)
from .distributed import barrier, broadcast_object
from .io_utils import atomic_save_safetensors, load_tensor_file

if TYPE_CHECKING:
    from .ema import ShardedEMA
    from .engine import TrainEngine

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_PREFIX", "COMPLETE_MARKER", "CheckpointError", "CheckpointWriteError", "capture_rng_state",
    "check_finite_weights",
    "choose_resume_checkpoint", "export_model", "export_pretrained", "gather_full_weights", "note_changed_settings",
    "safe_torch_load", "verify_checkpoint",
    "find_latest_checkpoint", "list_checkpoints", "load_checkpoint", "load_rank_tensors", "load_dit_weights", "read_dit_state", "optimizer_state_from_flat",
    "optimizer_state_to_flat", "read_json", "restore_rank_rng", "restore_rng_state", "save_checkpoint", "write_json_atomic",
]

# ------------------------------------------------------------------------------------------------- small file IO

def write_json_atomic(obj: Any, path: Path) -> None:
    """Write JSON to a temp name in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rank_dir(root: Path, rank: int) -> Path:
    return Path(root) / f"rank_{rank:05d}"


# ------------------------------------------------------------------------------------------------- RNG

def capture_rng_state(device: Optional[torch.device] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's torch (CPU and ``device`` when CUDA), numpy and python RNG states, as tensors + JSON."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {
        "torch_cpu": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
    }
    if device is not None and device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    meta = {"numpy": {"kind": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                      "cached_gaussian": float(np_state[4])},
            "python": {"version": py_state[0], "gauss_next": py_state[2]}}
    return tensors, meta


def restore_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping, device: Optional[torch.device] = None,
                      source: str = "RNG state") -> None:
    for key in ("torch_cpu", "numpy_keys", "python_state"):
        if key not in tensors:
            raise KeyError(f"{source}: missing {key!r}")
    torch.set_rng_state(tensors["torch_cpu"])
    if device is not None and device.type == "cuda":
        if "torch_cuda" not in tensors:
            raise KeyError(f"{source}: no CUDA RNG state (checkpoint written by a CPU run?)")
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    np_meta = meta["numpy"]
    np.random.set_state((np_meta["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), np_meta["pos"],
                         np_meta["has_gauss"], np_meta["cached_gaussian"]))
    py_meta = meta["python"]
    random.setstate((py_meta["version"], tuple(int(v) for v in tensors["python_state"].tolist()),
                     py_meta["gauss_next"]))


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

        engine.save_state(tmp / "engine")
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
    engine.load_state(path / "engine")
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


# ------------------------------------------------------------------------------------------------- export

def _is_diffusers_model(module: nn.Module) -> bool:
    # A module can only be a diffusers ModelMixin if diffusers is already imported; checking sys.modules avoids
    # importing diffusers (seconds of CPU) just to answer "no" for other models.
    diffusers = sys.modules.get("diffusers")
    return diffusers is not None and isinstance(module, diffusers.ModelMixin)


def export_pretrained(module: nn.Module, state_dict: Mapping[str, torch.Tensor], out_dir: Path,
                      files: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``state_dict`` as a pretrained folder for ``module``'s class, atomically (temp folder, rename).

    A diffusers model (``ModelMixin``) gets what its ``save_pretrained`` writes for a single shard: ``config.json``
    plus ``diffusion_pytorch_model.safetensors`` with the state-dict key names, so ``from_pretrained`` loads it.
    (We write the two files ourselves because under ZeRO-3, and for the EMA, no module holds the full weights to
    call ``save_pretrained`` on.) Any other module gets a plain ``model.safetensors``. ``files`` (name -> JSON
    content) are written beside them, inside the temp folder, so a folder never appears without them.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if _is_diffusers_model(module):
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

        module.save_config(tmp)
        atomic_save_safetensors(state_dict, tmp / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
    else:
        atomic_save_safetensors(state_dict, tmp / "model.safetensors", metadata={"format": "pt"})
    for name, content in (files or {}).items():
        write_json_atomic(content, tmp / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def gather_full_weights(engine: "TrainEngine", ema: Optional["ShardedEMA"] = None
                        ) -> tuple[Optional[dict[str, torch.Tensor]], Optional[dict[str, torch.Tensor]]]:
    """``(model state dict, EMA state dict)`` on rank 0, ``(None, None)`` on the others. Collective.

    ZeRO-3 partitions and EMA chunks are gathered to rank 0. The EMA dict is the model's state dict with every
    EMA-tracked parameter replaced by its average, in the dtype of the model's tensor; None without ``ema``.
    """
    state = engine.full_state_dict()
    ema_full = ema.gather(comm_device=engine.device) if ema is not None else None
    if not engine.is_main:
        return None, None
    assert state is not None
    if ema_full is None:
        return state, None
    missing = sorted(set(ema_full) - set(state))
    if missing:
        raise KeyError(f"EMA parameters not in the model's state dict: {missing[:5]}")
    return state, {k: ema_full[k].to(v.dtype) if k in ema_full else v for k, v in state.items()}


def export_model(engine: "TrainEngine", out_dir: Path, ema: Optional["ShardedEMA"] = None,
                 dtype: Optional[torch.dtype] = None, files: Optional[Mapping[str, Any]] = None) -> list[Path]:
    """Export the trained model to ``out_dir`` and, with ``ema``, its EMA to ``out_dir`` + ``_ema``.

    Collective (see :func:`gather_full_weights`); rank 0 writes and returns the folders, other ranks return ``[]``.
    ``dtype`` casts floating tensors of both; ``files`` go into both (see :func:`export_pretrained`).
    """
    out_dir = Path(out_dir)
    state, ema_state = gather_full_weights(engine, ema)
    written: list[Path] = []
    if engine.is_main:
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        written.append(export_pretrained(engine.module, {k: cast(v) for k, v in state.items()}, out_dir, files))
        if ema_state is not None:
            written.append(export_pretrained(engine.module, {k: cast(v) for k, v in ema_state.items()},
                                             out_dir.with_name(out_dir.name + "_ema"), files))
    barrier()
    return written


# ------------------------------------------------------------------------------------------------- pretrained DiT

_IGNORED_PREFIXES = ("vae.", "text_encoder")


def read_dit_state(path: Path) -> dict[str, torch.Tensor]:
    """The DiT tensors of a single-file state dict, under the model's key names (see ``load_dit_weights``)."""
    loaded = load_tensor_file(path)
    if isinstance(loaded, torch.Tensor):
        raise ValueError(f"{path}: holds a single tensor, expected a state dict (name -> tensor)")
    return {key[len("dit."):] if key.startswith("dit.") else key: value for key, value in loaded.items()
            if not key.startswith(_IGNORED_PREFIXES)}


def load_dit_weights(model: nn.Module, path: os.PathLike | str) -> None:
    """Load a single-file DiT state dict (``--dit_pretrained_weight``) into ``model``, strictly.

    Accepts ``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin`` read with ``torch.load(weights_only=True)``. Like the
    reference, keys of a full-pipeline checkpoint are mapped: a ``dit.`` prefix is stripped and ``vae.*`` /
    ``text_encoder*`` entries are ignored. Missing or unexpected keys, and shape mismatches, raise with the file
    name and the offending keys.
    """
    path = Path(path)
    state = read_dit_state(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return f"{len(keys)} {keys[:8]}{' ...' if len(keys) > 8 else ''}"
        raise KeyError(f"{path}: keys do not match the model {type(model).__name__}: missing {show(missing)}, "
                       f"unexpected {show(unexpected)}. Is it a checkpoint of the same model kind and variant?")
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
           for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {len(bad)} tensors, e.g. {bad[:5]}")
    check_finite_weights(state, str(path))
    model.load_state_dict(state, strict=True)
    logger.info("loaded %d tensors from %s", len(state), path)


def check_finite_weights(weights: nn.Module | Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` naming the first tensors with NaN or inf values (a diverged or damaged checkpoint
    would otherwise generate black videos without a word)."""
    items = weights.state_dict().items() if isinstance(weights, nn.Module) else weights.items()
    bad = [name for name, t in items if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"{source}: tensor {', '.join(bad[:3])}{more} contains NaN or inf values; these weights "
                         "are broken (a diverged run or a damaged file). Use an earlier checkpoint or export")
