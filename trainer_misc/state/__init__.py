"""What outlives a process: checkpoints (``checkpoint``) and whether one can be trusted (``trust``), the exported
model folders (``export``), the random streams (``rng``) and the one-run-per-folder lock (``run_lock``)."""
