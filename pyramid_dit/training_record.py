"""How a DiT was trained, recorded next to its ``config.json`` so that generation samples the way training taught.

An autoregressive (temporal-pyramid) DiT has only ever seen one unit at a time with clean history clips, a
full-sequence DiT has only ever seen the whole clip in one column with no history; sampling one with the other's
loop asks the model for something it was never trained to do. The trainer writes :data:`TRAINING_RECORD` into every
exported DiT folder (``<OUTPUT_DIR>/export/transformer``, ``transformer_ema``), and ``tools/generate.py`` takes its
defaults for ``--task`` and ``--mode`` from :func:`read_training_record`. Folders without the file are the released
ones: ``diffusion_transformer_image`` is the text-to-image DiT, every other variant an autoregressive video DiT.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Union

TRAINING_RECORD = "pyramid_flow_training.json"
SAMPLING_MODES = ("ar", "full_sequence")
TASKS = ("t2v", "t2i")
IMAGE_VARIANT = "diffusion_transformer_image"


class TrainedAs(NamedTuple):
    task: str  # t2v | t2i
    sampling_mode: str  # ar | full_sequence: the sampler that matches the training objective
    source: str  # where this was read from (for messages)


def training_record(task: str, use_temporal_pyramid: bool) -> dict:
    """The record of a training run: image training and video training without the temporal pyramid are
    full-sequence (all latent frames in one column); video training with it is autoregressive."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "t2i" and use_temporal_pyramid:
        raise ValueError("t2i training has one frame and no temporal pyramid")
    return {"task": task, "sampling_mode": "ar" if use_temporal_pyramid else "full_sequence"}


def read_training_record(dit_folder: Union[str, Path]) -> TrainedAs:
    """How the DiT in ``dit_folder`` was trained: its :data:`TRAINING_RECORD`, else the released models' facts."""
    folder = Path(dit_folder)
    path = folder / TRAINING_RECORD
    if not path.is_file():
        if folder.name == IMAGE_VARIANT:
            return TrainedAs("t2i", "full_sequence", f"{folder.name} (released text-to-image DiT)")
        return TrainedAs("t2v", "ar", f"{folder} (no {TRAINING_RECORD}: a released autoregressive video DiT)")
    record = json.loads(path.read_text(encoding="utf-8"))
    task, mode = record.get("task"), record.get("sampling_mode")
    if task not in TASKS or mode not in SAMPLING_MODES:
        raise ValueError(f"{path}: task {task!r} / sampling_mode {mode!r} must be one of {TASKS} / "
                         f"{SAMPLING_MODES}; the file is damaged (delete it to fall back to the released defaults)")
    return TrainedAs(task, mode, str(path))
