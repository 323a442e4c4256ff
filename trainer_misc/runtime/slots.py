"""How many training slots a process of a new run trains, and how many of them one pass may pack: the rules the
argument checks (``train.args``), the planner and the step runner share. Importable without torch.

The full layout (which slots, across resumes on other process counts) is
:func:`trainer_misc.runtime.distributed.slot_layout`; these are its counts for a fresh launch.
"""
from __future__ import annotations

from trainer_misc.runtime.arguments import integer

__all__ = ["pack_choices", "pack_slots_arg", "process_slot_count"]


def process_slot_count(video_sync_group: int, data_world: int) -> int:
    """Slots each of ``data_world`` data-parallel processes trains per micro-batch: ``VIDEO_SYNC_GROUP /
    processes`` for a virtual group (fewer processes than the group), else 1 (one process per slot)."""
    return max(1, video_sync_group // data_world)


def pack_choices(slots: int) -> list[int]:
    """The ``PACK_SLOTS`` values a process training ``slots`` slots per micro-batch can run: the divisors of
    ``slots`` (every pass of a micro-batch packs as many), smallest first."""
    return [k for k in range(1, slots + 1) if slots % k == 0]


def pack_slots_arg(text: str) -> str | int:
    """The argparse type of ``--pack_slots`` / ``PACK_SLOTS``: ``auto`` or a count from 1 to 1024 (that it is one of
    :func:`pack_choices` of the launch is checked with the other flags)."""
    if str(text).strip() == "auto":
        return "auto"
    return integer(1, 1024, why=" or auto (slots per forward/backward pass)")(text)
