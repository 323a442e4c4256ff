"""Training checkpoints: written atomically by every rank in one pass, read back by any process count and strategy.

Layout of one checkpoint (``<output_dir>/checkpoints/checkpoint-<step>/``, ``step`` = optimizer steps done)::

    trainer_state.json              step, data position, counters, the run's slot layout and settings (rank 0)
    optimizer.json                  AdamW's step count, the fp16 loss scale (rank 0)
    weights/rank_00000.safetensors  that rank's fragments of each trainable parameter's fp32 master weights,
                                    AdamW moments and EMA (``<name>::fp32|exp_avg|exp_avg_sq|ema``, with offsets)
    rng/slot_00000.safetensors      each training slot's torch random state (``torch_cpu``, ``torch_cuda``)
    rng/process_00000.safetensors   each process's python / numpy / torch states (+ ``.json``)
    complete                        manifest, written last: every file's size and SHA-256

**Any layout.** What a rank writes is what it holds (:mod:`trainer_misc.optim.master`): its fragment of the fp32
master weights and moments under ZeRO, its chunk of the replicated parameters under DDP; nothing is gathered. A
later launch reads the ranges *it* holds (:class:`trainer_misc.state.fragments.FragmentReader`), so a ZeRO-2 run on
2 GPUs resumes on 1 GPU, under ZeRO-3 or DDP, with the same weights, moments and EMA. The random streams are saved
per training *slot* (``trainer_misc.runtime.distributed.SlotLayout``), not per process, so the resumed slots draw the
same noise wherever they now run. Frozen parameters (LoRA's base, ...) are not saved: they are the pretrained
weights the run loads at start.

**Atomic, verified.** Every rank writes into ``checkpoint-<step>.tmp``; each file's size and SHA-256 come from the
bytes as they were written (:class:`trainer_misc.files.FileDigest`: no second pass over gigabytes, which matters when
a preemption leaves seconds to save). Once all ranks are done rank 0 writes ``complete`` and renames the folder, so
a checkpoint either is complete or does not exist under its final name. Resume verifies the manifest and never runs
pickled code (:mod:`trainer_misc.state.trust`): every file is safetensors or JSON. Which checkpoint a run resumes
from is decided in :mod:`trainer_misc.loop.resume`; the exported model folders are :mod:`trainer_misc.state.export`.
Multi-node runs need ``output_dir`` on storage every node sees (checked at start-up: :mod:`trainer_misc.state.storage`).
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
from trainer_misc.files import FileDigest, atomic_save_safetensors, read_json, write_json_atomic
from trainer_misc.optim.master import PARTS, ensure_optimizer_state, held_elements, optimizer_steps, set_model_weights
from trainer_misc.runtime.distributed import all_gather_object, barrier
from trainer_misc.state.fragments import Fragment, FragmentReader, write_fragments
from trainer_misc.state.rng import capture_rng_state, restore_rng_state
from trainer_misc.state.trust import (
    CHECKPOINT_PREFIX,
    COMPLETE_MARKER,
    TRAINER_STATE,
    CheckpointError,
    CheckpointWriteError,
    _is_write_error,
    _write_failed,
    list_checkpoints,
)

if TYPE_CHECKING:
    from trainer_misc.optim.ema import ShardedEMA
    from trainer_misc.optim.engine import TrainEngine
    from trainer_misc.state.rng import SlotStreams

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "load_checkpoint", "read_trainer_state", "remove_interrupted_saves", "restore_process_rng",
           "save_checkpoint"]

FORMAT = 2  # trainer_state.json "format": the layout above (1: DeepSpeed's own per-rank files, not readable here)
OPTIMIZER_STATE = "optimizer.json"
EMA = "ema"


def _fragments(engine: "TrainEngine", ema: Optional["ShardedEMA"]) -> dict[str, Fragment]:
    """What this rank holds of every trainable parameter's master weights, moments and EMA, as fragments."""
    ensure_optimizer_state(engine, optimizer_steps(engine))  # a run whose every update so far was skipped has none
    out: dict[str, Fragment] = {}
    for held in held_elements(engine, replicated="chunk"):
        for part in PARTS:
            out[f"{held.name}::{part}"] = Fragment(held.start, held.views(part).detach().cpu(), held.shape)
        if ema is not None:
            out[f"{held.name}::{EMA}"] = Fragment(held.start, ema.shadow[held.name].detach().cpu(), held.shape)
    return out


def _loss_scale(engine: "TrainEngine") -> Optional[dict[str, Any]]:
    """fp16's dynamic loss-scale state (None in bf16 / fp32)."""
    if engine.cfg.mixed_precision != "fp16":
        return None
    if engine.is_deepspeed:
        scaler = engine.optimizer.optimizer.loss_scaler
        return {k: getattr(scaler, k) for k in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
                if hasattr(scaler, k)}
    scaler = engine.accelerator.scaler
    return scaler.state_dict() if scaler is not None else None


def _restore_loss_scale(engine: "TrainEngine", state: Optional[Mapping[str, Any]]) -> None:
    if not state or engine.cfg.mixed_precision != "fp16":
        return
    if engine.is_deepspeed:
        for key, value in state.items():
            setattr(engine.optimizer.optimizer.loss_scaler, key, value)
    elif engine.accelerator.scaler is not None:
        engine.accelerator.scaler.load_state_dict(dict(state))


def remove_interrupted_saves(root: Path) -> list[Path]:
    """Remove the ``checkpoint-<step>.tmp`` / ``.old`` folders of saves that were killed or failed (on a full disk
    they hold space the run needs). Rank 0 only, with the output folder locked (they are this run's own); done at
    start-up and before each save, never while another rank may be writing."""
    stale = sorted(path for suffix in (".tmp", ".old") for path in Path(root).glob(f"{CHECKPOINT_PREFIX}*{suffix}"))
    for path in stale:
        logger.warning("removing %s left by an interrupted save", path)
        shutil.rmtree(path)
    return stale


def save_checkpoint(root: Path, step: int, engine: "TrainEngine", trainer_state: Mapping,
                    ema: Optional["ShardedEMA"] = None, keep_last: Optional[int] = None,
                    streams: Optional["SlotStreams"] = None) -> Path:
    """Write ``root/checkpoint-<step>`` atomically. Collective: every rank calls it with the same arguments.

    ``trainer_state`` (JSON-serialisable: step, data position, counters, layout) is written by rank 0; ``streams``
    are this rank's slots' random streams. ``keep_last`` deletes older complete checkpoints beyond the newest
    ``keep_last``. A failed write raises :class:`CheckpointWriteError`: the failing rank removes the files it wrote
    (never the shared folder, which other ranks may still be writing into; the next run or save sweeps it,
    :func:`remove_interrupted_saves`), and earlier checkpoints stay untouched.
    """
    root = Path(root)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f"{CHECKPOINT_PREFIX}{step}.tmp"
    rank = engine.rank
    written: dict[str, FileDigest] = {}  # this rank's files, relative to the checkpoint, with their digests
    try:
        if engine.is_main:
            root.mkdir(parents=True, exist_ok=True)
            remove_interrupted_saves(root)
            tmp.mkdir()
        barrier()

        name = f"weights/rank_{rank:05d}.safetensors"
        written[name] = write_fragments(tmp / name, _fragments(engine, ema))
        for slot, state in (streams.state_dict() if streams is not None else {}).items():
            name = f"rng/slot_{slot:05d}.safetensors"
            written[name] = atomic_save_safetensors(state, tmp / name)
        tensors, meta = capture_rng_state(engine.device)
        name = f"rng/process_{rank:05d}"
        written[f"{name}.safetensors"] = atomic_save_safetensors(tensors, tmp / f"{name}.safetensors")
        written[f"{name}.json"] = write_json_atomic(meta, tmp / f"{name}.json")
        if engine.is_main:
            written[OPTIMIZER_STATE] = write_json_atomic({"steps": optimizer_steps(engine),
                                                          "loss_scale": _loss_scale(engine)}, tmp / OPTIMIZER_STATE)
            written[TRAINER_STATE] = write_json_atomic({**trainer_state, "format": FORMAT}, tmp / TRAINER_STATE)

        files: dict[str, dict] = {}
        for share in all_gather_object({name: {"size": d.size, "sha256": d.sha256} for name, d in written.items()}):
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
        raise _write_failed(e, root, tmp, [tmp / name for name in written]) from e
    if engine.is_main:
        if keep_last is not None and keep_last > 0:
            for _, path in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(path)
        logger.info("saved checkpoint %s", final)
    barrier()
    return final


def read_trainer_state(path: Path) -> dict:
    """A complete checkpoint's ``trainer_state.json``; refuses other formats with what to do."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE_MARKER!r} marker)")
    state = read_json(path / TRAINER_STATE)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} was written by an older version of this trainer (DeepSpeed's own checkpoint "
                              "files), which this one does not read; resume with the version that wrote it, or start "
                              "a new OUTPUT_DIR")
    return state


@torch.no_grad()
def load_checkpoint(path: Path, engine: "TrainEngine", ema: Optional["ShardedEMA"] = None) -> dict:
    """Load the weights, AdamW moments and step count, fp16 loss scale and EMA of checkpoint ``path`` into
    ``engine`` (and ``ema``), whatever layout wrote it; returns the trainer state. Collective (every rank reads the
    ranges it holds; nothing is exchanged). The random streams are restored separately, last
    (:func:`restore_process_rng`, ``SlotStreams.load_state_dict``)."""
    path = Path(path)
    state = read_trainer_state(path)
    reader = FragmentReader(path / "weights")
    optimizer = read_json(path / OPTIMIZER_STATE)
    names = {h.name for h in held_elements(engine, replicated="full")}
    saved = {key.split("::")[0] for key in reader.keys()}
    if names != saved:
        raise CheckpointError(f"{path}: its trainable parameters differ from this run's (missing "
                              f"{sorted(names - saved)[:5]}, unexpected {sorted(saved - names)[:5]}); resume with the "
                              "model and LoRA settings that wrote it, or start a new OUTPUT_DIR")
    ensure_optimizer_state(engine, int(optimizer["steps"]))
    for held in held_elements(engine, replicated="full"):
        for part in PARTS:
            held.views(part).copy_(reader.read(f"{held.name}::{part}", held.start, held.stop))
    set_model_weights(engine, lambda name, start, stop: reader.read(f"{name}::fp32", start, stop))
    _restore_loss_scale(engine, optimizer.get("loss_scale"))
    if ema is not None:
        if all(f"{name}::{EMA}" in reader.keys() for name in ema.names):
            ema.load(lambda name, start, stop: reader.read(f"{name}::{EMA}", start, stop))
        else:
            ema.reset_to_params()
            logger.warning("%s has no EMA state: the EMA starts from the resumed weights", path)
    return state


def slot_states(path: Path, slots) -> dict[int, dict[str, torch.Tensor]]:
    """The random states checkpoint ``path`` saved for ``slots``; a clear error for a slot it does not have."""
    out = {}
    for slot in slots:
        file = Path(path) / "rng" / f"slot_{slot:05d}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{file} missing: the checkpoint was written by a run with other slots (another "
                                  "VIDEO_SYNC_GROUP); resume with the same settings or a new OUTPUT_DIR")
        out[slot] = load_tensor_file(file)
    return out


def restore_process_rng(path: Path, rank: int, world_size: int, saved_world: int,
                        device: Optional[torch.device] = None) -> bool:
    """Restore this process's python / numpy / torch states from checkpoint ``path`` when it was written by as many
    processes (then each process is the one that wrote them); returns whether it did. The slots' torch streams,
    which the training draws from, are restored from their own files either way."""
    if saved_world != world_size:
        return False
    base = Path(path) / "rng" / f"process_{rank:05d}"
    restore_rng_state(load_tensor_file(base.with_suffix(".safetensors")), read_json(base.with_suffix(".json")),
                      device, source=str(base))
    return True
