#!/bin/sh
# Extract causal-VAE latents for every video line of an annotation file (tools/extract_video_vae_latents.py),
# one process per GPU (torchrun), or CPU processes with gloo when there is no GPU.
#
# Every variable below can be set from the environment, e.g.
#   MODEL_PATH=ckpt/pyramid-flow-miniflux ANNO_FILE=data/demo/video_text.jsonl WIDTH=64 HEIGHT=48 NUM_FRAMES=17 \
#     sh scripts/extract_vae_latent.sh
# A rerun skips the latents that already exist and load correctly; add EXTRA_ARGS=--overwrite to redo them.
set -eu

: "${MODEL_PATH:=}"             # the downloaded model folder (its causal_video_vae/ subfolder is used) ...
: "${VAE_MODEL_PATH:=}"         # ... or the causal_video_vae folder itself (wins over MODEL_PATH)
: "${ANNO_FILE:=annotation/video_text.jsonl}"   # video lines: {"video", "text", "latent", ...}
: "${DATA_ROOT:=}"              # root for relative paths in ANNO_FILE (default: the annotation file's folder)
: "${WIDTH:=640}"               # output width in pixels, a multiple of 8 (640 for 384p, 1280 for 768p)
: "${HEIGHT:=384}"              # output height in pixels, a multiple of 8
: "${NUM_FRAMES:=121}"          # at most this many frames per clip; must be 8k+1 (9, 17, ..., 121)
: "${MODEL_DTYPE:=}"            # bf16 | fp16 | fp32 (default: bf16 with GPUs, fp32 on CPU)
: "${GPUS:=}"                   # processes per node (default: the visible GPU count, or 1 without GPUs);
                                # multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
: "${NUM_WORKERS:=4}"           # decode workers per process
: "${EXTRA_ARGS:=}"             # more flags, e.g. "--tiling --overwrite --latent_kind mean"

SCRIPT_NAME=extract_vae_latent.sh
. "$(dirname "$0")/_common.sh"   # die, is_uint, detect_gpus, launch

if [ -z "$VAE_MODEL_PATH" ]; then
    [ -n "$MODEL_PATH" ] || die "set MODEL_PATH (the model folder) or VAE_MODEL_PATH (its causal_video_vae folder)"
    VAE_MODEL_PATH="$MODEL_PATH/causal_video_vae"
fi
[ -f "$VAE_MODEL_PATH/config.json" ] || die "no config.json in VAE_MODEL_PATH=$VAE_MODEL_PATH; point it at the causal_video_vae folder of the checkpoint"
[ -f "$ANNO_FILE" ] || die "annotation file ANNO_FILE=$ANNO_FILE not found; set ANNO_FILE to your video_text.jsonl"
is_uint "$WIDTH" && [ "$WIDTH" -gt 0 ] && [ $((WIDTH % 8)) -eq 0 ] || die "WIDTH=$WIDTH must be a positive multiple of 8"
is_uint "$HEIGHT" && [ "$HEIGHT" -gt 0 ] && [ $((HEIGHT % 8)) -eq 0 ] || die "HEIGHT=$HEIGHT must be a positive multiple of 8"
is_uint "$NUM_FRAMES" && [ "$NUM_FRAMES" -ge 9 ] && [ $(((NUM_FRAMES - 1) % 8)) -eq 0 ] \
    || die "NUM_FRAMES=$NUM_FRAMES must be 8k+1 with k >= 1 (9, 17, ..., 121)"

detect_gpus
if [ -z "$MODEL_DTYPE" ]; then
    if [ "$HAVE_GPU" -eq 1 ]; then MODEL_DTYPE=bf16; else MODEL_DTYPE=fp32; fi
fi

set -- "$REPO/tools/extract_video_vae_latents.py" \
    --model_path "$VAE_MODEL_PATH" --anno_file "$ANNO_FILE" \
    --width "$WIDTH" --height "$HEIGHT" --num_frames "$NUM_FRAMES" \
    --model_dtype "$MODEL_DTYPE" --num_workers "$NUM_WORKERS"
[ -z "$DATA_ROOT" ] || set -- "$@" --data_root "$DATA_ROOT"

# shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
launch "$@" $EXTRA_ARGS
