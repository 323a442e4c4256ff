"""Whether a checkpoint can be trusted, and what to say when writing one fails.

* **Manifest**: ``save_checkpoint`` records every file's size and SHA-256 in the ``complete`` marker, hashed as each
  rank writes its files (no second read).
* **Verification and choice** (:func:`choose_resume_checkpoint`): before resuming, the ranks re-check their shares;
  a checkpoint with a missing, truncated or changed file is skipped with a warning naming the file, the newest one
  that verifies is used, and rank 0's choice is broadcast so that every rank resumes from the same one.
* **No pickled code**: every file of a checkpoint is safetensors or JSON (``trainer_misc.state.checkpoint``), so
  there is nothing to unpickle; a file that is not in the manifest is never read.
* **Disk full**: a failed write becomes :class:`CheckpointWriteError` saying "no space left on device", the path and
  the free space; the partial folder is removed and the earlier checkpoints are kept.
"""
from __future__ import annotations

import errno
import hashlib
import logging
from pathlib import Path
from typing import Iterable, Mapping, Optional

from trainer_misc.files import disk_usage, free_space, read_json
from trainer_misc.runtime.distributed import all_gather_object, broadcast_object, get_rank, get_world_size

logger = logging.getLogger("trainer_misc.state.checkpoint")

__all__ = ["CHECKPOINT_PREFIX", "COMPLETE_MARKER", "TRAINER_STATE", "CheckpointError", "CheckpointWriteError",
           "choose_resume_checkpoint", "find_latest_checkpoint", "list_checkpoints", "note_changed_settings",
           "verify_checkpoint"]

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "complete"
TRAINER_STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (none verifies, or a file holds something it must not). Names the file."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, quota, I/O error); the earlier checkpoints are intact."""


# ------------------------------------------------------------------------------------------------- lookup

def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first. Incomplete ones are skipped with a
    warning naming them."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        name = path.name
        if not (path.is_dir() and name.startswith(CHECKPOINT_PREFIX)):
            continue
        suffix = name[len(CHECKPOINT_PREFIX):]
        if not suffix.isdigit():
            if not name.endswith((".tmp", ".old")):  # those two are an interrupted save's leftovers
                logger.warning("ignoring %s: not a checkpoint-<step> folder", path)
            continue
        if not (path / COMPLETE_MARKER).is_file():
            logger.warning("ignoring incomplete checkpoint %s (no %r marker)", path, COMPLETE_MARKER)
            continue
        found.append((int(suffix), path))
    return sorted(found)


def find_latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint folder under ``root``, or None (not verified: see
    :func:`choose_resume_checkpoint`)."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# ------------------------------------------------------------------------------------------------- manifest

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path: Path) -> list[str]:
    """What is wrong with checkpoint ``path`` (empty list: it verifies). Collective: each rank re-hashes its share.

    Checks the marker, that every file it lists exists with the recorded size and SHA-256, and that no listed file
    is missing. A marker written before checksums existed is accepted with a warning.
    """
    path = Path(path)
    problems: list[str] = []
    try:
        marker = read_json(path / COMPLETE_MARKER)
        files = marker.get("files") if isinstance(marker, dict) else None
        if not isinstance(marker, dict):
            problems.append(f"{path / COMPLETE_MARKER}: not a checkpoint marker")
    except (OSError, ValueError) as e:
        problems.append(str(e))
        files = None
    if files is None and not problems:
        if get_rank() == 0:
            logger.warning("%s: written without checksums, not verified", path)
        return []
    names = sorted(files or {})
    share = [n for i, n in enumerate(names) if i % get_world_size() == get_rank()]
    for name in share:
        f, want = path / name, files[name]
        if not f.is_file():
            problems.append(f"{f}: missing")
            continue
        size = f.stat().st_size
        if size != want["size"]:
            problems.append(f"{f}: {size} bytes, {want['size']} when it was written (truncated or replaced)")
        elif _sha256(f) != want["sha256"]:
            problems.append(f"{f}: content changed since it was written (SHA-256 mismatch)")
    return [p for rank_problems in all_gather_object(problems) for p in rank_problems]


def choose_resume_checkpoint(root: Path, resume: str = "auto") -> Optional[Path]:
    """The checkpoint every rank resumes from, or None for a fresh start. Collective.

    ``resume``: ``auto`` (the newest complete checkpoint under ``root`` that verifies; broken ones are skipped with a
    warning naming the file and what is wrong), ``never``, or a checkpoint folder (which must verify). Rank 0 lists
    the candidates and its decision is broadcast, so all ranks agree even if their views of the folder differ.
    Raises :class:`CheckpointError` naming the files when checkpoints exist but none verifies.
    """
    if resume == "never":
        return None
    if get_rank() == 0:
        if resume == "auto":
            candidates = [str(p) for _, p in reversed(list_checkpoints(root))]
        elif not Path(resume).is_dir():
            candidates = FileNotFoundError(f"resume={resume!r}: no such checkpoint folder")
        else:
            candidates = [str(Path(resume))]
    else:
        candidates = None
    candidates = broadcast_object(candidates)
    if isinstance(candidates, Exception):
        raise candidates
    rejected: list[str] = []
    for candidate in map(Path, candidates):
        problems = verify_checkpoint(candidate)
        if not problems:
            if rejected and get_rank() == 0:
                logger.warning("resuming from %s instead (the newest checkpoint that verifies)", candidate)
            return candidate
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        rejected.append(f"{problems[0]}{more}")
        if get_rank() == 0:
            logger.warning("skipping checkpoint %s: %s%s", candidate, problems[0], more)
    if rejected:
        raise CheckpointError(f"no usable checkpoint under {root}: {'; '.join(rejected)}. Restore or delete the "
                              "broken checkpoint folders, resume from a good one with --resume, or start over with "
                              "--resume never / a new OUTPUT_DIR")
    return None


def note_changed_settings(saved: Mapping, current: Mapping, source: Path) -> list[str]:
    """Warn (rank 0) about run settings that differ from those saved in ``source``'s trainer state; returns the
    notes. A resume with another accumulation or learning rate is allowed, but it does not continue the same loss
    curve, so it must not go unnoticed."""
    saved_cfg = dict(saved.get("config") or {})
    saved_cfg.setdefault("grad_accum_steps", saved.get("grad_accum_steps"))
    names = {"grad_accum_steps": "gradient_accumulation_steps", "lr": "lr", "lr_scheduler": "lr_scheduler",
             "warmup_steps": "warmup_steps", "mixed_precision": "mixed_precision", "max_grad_norm": "clip_grad",
             "weight_decay": "weight_decay", "ema_decay": "ema_decay", "skip_loss_threshold": "skip_loss_threshold"}
    notes = [f"{flag} {saved_cfg[key]} -> {current[key]}" for key, flag in names.items()
             if key in saved_cfg and key in current and saved_cfg[key] is not None and saved_cfg[key] != current[key]]
    if notes and get_rank() == 0:
        logger.warning("resuming from %s with changed settings: %s; the run continues, but not the same loss curve "
                       "as without the change", source, ", ".join(notes))
    return notes


# ------------------------------------------------------------------------------------------------- write errors

def _no_space(exc: BaseException, root: Path) -> bool:
    """Whether a failed write looks like a full disk or quota. torch.save's C++ writer only says
    ``basic_ios::clear: iostream error``; then a nearly full filesystem is taken as the cause."""
    seen: Optional[BaseException] = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen).lower()
        if "no space left" in text or "quota exceeded" in text:
            return True
        if "iostream error" in text or "file write failed" in text or "unexpected pos" in text:
            usage = disk_usage(root)
            if usage is not None:
                return usage.free < min(2**30, usage.total // 50)
        seen = seen.__cause__ or seen.__context__
    return False


def _is_write_error(exc: BaseException, root: Path) -> bool:
    text = str(exc).lower()
    return (isinstance(exc, OSError) and not isinstance(exc, ConnectionError)) or _no_space(exc, root) \
        or "iostream error" in text or "ioerror" in text or "file write failed" in text


def _write_failed(exc: BaseException, root: Path, tmp: Path, own_files: Iterable[Path]) -> CheckpointWriteError:
    """The error a rank raises when its part of a checkpoint could not be written. It removes only ``own_files``:
    removing the shared ``tmp`` folder would pull it from under ranks still writing (they would then fail with
    "file not found" and hide the real cause); the next run or save sweeps the folder."""
    full = _no_space(exc, root)  # judged before our partial files are removed: that frees the space they took
    for path in own_files:
        path.unlink(missing_ok=True)
    kept = ", ".join(p.name for _, p in list_checkpoints(root)) or "none yet"
    if full:
        return CheckpointWriteError(
            errno.ENOSPC, f"no space left on device while writing checkpoint {tmp} ({free_space(root)} free there; "
            f"{type(exc).__name__}: {exc}). Earlier checkpoints are kept ({kept}). Free some space, keep fewer "
            "checkpoints (KEEP_CKPTS / --keep_last_checkpoints), or use an OUTPUT_DIR on a larger disk, then rerun "
            "to resume")
    return CheckpointWriteError(
        getattr(exc, "errno", None) or errno.EIO, f"writing checkpoint {tmp} failed: {type(exc).__name__}: {exc} "
        f"({free_space(root)} free there). Earlier checkpoints are kept ({kept}); rerun to resume")
