#!/bin/sh
# Extract causal-VAE latents for every video line of an annotation file (tools/extract_video_vae_latents.py),
# one process per GPU (torchrun), or CPU processes with gloo when there is no GPU.
#
# Every variable below can be set from the environment, e.g.
#   MODEL_PATH=ckpt/pyramid-flow-miniflux ANNO_FILE=data/demo/video_text.jsonl WIDTH=64 HEIGHT=48 NUM_FRAMES=17 \
#     sh scripts/extract_vae_latent.sh
# The launcher (tools/launch.py) checks them before anything starts, with a message naming the variable. A rerun
# skips the latents that already exist and load correctly; add EXTRA_ARGS=--overwrite to redo them.
set -eu
SCRIPT_NAME=extract_vae_latent.sh

set -a  # every variable below reaches the launcher
: "${MODEL_PATH:=}"             # the downloaded model folder (its causal_video_vae/ subfolder is used) ...
: "${VAE_MODEL_PATH:=}"         # ... or the causal_video_vae folder itself (wins over MODEL_PATH)
: "${ANNO_FILE:=annotation/video_text.jsonl}"   # video lines: {"video", "text", "latent", ...}
: "${DATA_ROOT:=}"              # root for relative paths in ANNO_FILE (default: the annotation file's folder)
: "${WIDTH:=640}"               # output width in pixels, a multiple of 8 (640 for 384p, 1280 for 768p)
: "${HEIGHT:=384}"              # output height in pixels, a multiple of 8
: "${NUM_FRAMES:=121}"          # at most this many frames per clip; must be 8k+1 (9, 17, ..., 121)
: "${MODEL_DTYPE:=}"            # bf16 | fp16 | fp32 (default: bf16 with GPUs, fp32 on CPU)
: "${GPUS:=}"                   # processes per node (default: the visible GPU count, or 1 without GPUs);
                                # under Slurm: Slurm's (one task per node)
: "${NNODES:=}"                 # nodes (default 1, or Slurm's); with NNODES > 1 also:
: "${NODE_RANK:=}"              #   this node, 0..NNODES-1
: "${MASTER_ADDR:=}"            #   address of node 0, reachable from every node
: "${MASTER_PORT:=}"            #   default 29500
: "${NUM_WORKERS:=auto}"        # decode workers per process: auto (up to 4) or a count; capped by the machine
: "${EXTRA_ARGS:=}"             # more flags, e.g. "--tiling --overwrite --latent_kind mean"
set +a

. "$(dirname "$0")/_common.sh"
run_launcher tools.launch latents
