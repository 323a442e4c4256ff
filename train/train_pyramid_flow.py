"""Finetune a Pyramid Flow DiT: autoregressive temporal pyramid (``--use_temporal_pyramid``) or full sequence.

The scripts in ``scripts/`` launch it (``sh scripts/train_pyramid_flow.sh``: variables at their top); by hand::

    torchrun --nproc_per_node 8 train/train_pyramid_flow.py --model_path /PATH/pyramid-flow-miniflux \\
        --model_variant diffusion_transformer_384p --anno_file annotation/video_text.jsonl --output_dir out \\
        --use_temporal_pyramid --sync_video_input --video_sync_group 8 --max_frames 16 --batch_size 4

The flags and their checks are :mod:`train.args` (importable without torch: ``--help`` and a refused setting
answer at once); how the run is put together is :mod:`train.run`. The reference's flags are accepted
(``--use_fsdp`` and ``--fsdp_shard_strategy`` select the sharding strategy, which is ZeRO through DeepSpeed here).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from train.args import parse_and_check
from trainer_misc.runtime.arguments import ConfigError
from trainer_misc.runtime.failures import run_main


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = parse_and_check(argv, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from train.run import run  # torch, diffusers and the model package load here, after the checks

    return run(args)


# The last line of a run that ran out of GPU memory: what lowers the memory per GPU, cheapest change first.
OOM_HINT = ("Lower the memory per GPU: PACK_SLOTS=1 (AR: one slot per pass), GRADIENT_CHECKPOINTING=1, "
            "SHARD_STRATEGY=zero3, more GPUs, a smaller BATCH_SIZE, NUM_FRAMES or RESOLUTION; DRY_RUN=1 predicts "
            "a launch's peak per GPU before it starts (docs/training.md, 'Which GPUs do I need')")

if __name__ == "__main__":
    # Any failure on any rank: one line naming the rank and the reason, and every rank ends within seconds.
    run_main(main, "train_pyramid_flow.py", oom_hint=OOM_HINT)
