#!/bin/sh
# Autoregressive video finetuning with the temporal pyramid (train/train_pyramid_flow.py --use_temporal_pyramid).
# The ranks of one VIDEO_SYNC_GROUP read the same clip and each trains a different temporal unit of it.
#
# Every variable below can be set from the environment, e.g.
#   GPUS=8 MODEL_PATH=/data/pyramid-flow-miniflux OUTPUT_DIR=runs/ar ANNO_FILE=data/video_text.jsonl \
#     sh scripts/train_pyramid_flow.sh
# Constraints (checked before launch): NUM_FRAMES % VIDEO_SYNC_GROUP == 0, BATCH_SIZE % 4 == 0, SP_SIZE divides
# GPUS*NNODES and the DiT's head count, and GPUS*NNODES/SP_SIZE and VIDEO_SYNC_GROUP divide one another: GPUS=8 VIDEO_SYNC_GROUP=8 trains one slot (temporal unit) per process;
# GPUS=1 VIDEO_SYNC_GROUP=8 (a virtual group) trains all 8 slots in turn on one process, accumulated into the same
# optimizer step: the same update, 8x the time per step. 768p turns GRADIENT_CHECKPOINTING on. A rerun with the same OUTPUT_DIR resumes.
set -eu
SCRIPT_NAME=train_pyramid_flow.sh
. "$(dirname "$0")/_common.sh"

: "${GPUS:=}"                         # processes per node (default: visible GPUs, or 1 on CPU)
: "${NNODES:=1}"                      # multi-node: also NODE_RANK, MASTER_ADDR, MASTER_PORT
: "${SHARD_STRATEGY:=zero2}"          # zero2 | zero3 (DeepSpeed ZeRO) | ddp
: "${SP_SIZE:=1}"                     # sequence parallelism: processes splitting each sample's tokens (divides GPUS*NNODES and the head count)
: "${VIDEO_SYNC_GROUP:=8}"            # slots sharing one clip: 4, 8 or 16 (may exceed GPUS*NNODES, see above)
: "${MODEL_NAME:=pyramid_flux}"       # pyramid_flux (rain1011/pyramid-flow-miniflux) | pyramid_mmdit (rain1011/pyramid-flow-sd3)
: "${MODEL_PATH:=}"                   # the downloaded checkpoint folder
: "${VARIANT:=diffusion_transformer_384p}"   # DiT subfolder to finetune
: "${OUTPUT_DIR:=}"                   # checkpoints, tensorboard logs, exported DiT
: "${BATCH_SIZE:=4}"                  # per process; multiple of 4
: "${GRAD_ACCU_STEPS:=2}"
: "${RESOLUTION:=384p}"               # 384p | 768p | WIDTHxHEIGHT (must match the extracted latents)
: "${NUM_FRAMES:=16}"                 # latent frames per clip: 16 for 5 s, 32 for 10 s
: "${ANNO_FILE:=annotation/video_text.jsonl}"
: "${DATA_ROOT:=}"                    # root for relative paths in ANNO_FILE (default: $PYRAMID_DATA_ROOT, else ANNO_FILE's folder)
: "${MODEL_DTYPE:=}"                  # bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)
: "${LR:=5e-5}"
: "${WARMUP_STEPS:=1000}"             # LR warmup steps; 0 or less: WARMUP_EPOCHS epochs (as the reference)
: "${WARMUP_EPOCHS:=1}"
: "${EPOCHS:=20}"
: "${ITERS_PER_EPOCH:=2000}"          # optimizer steps per epoch; total = EPOCHS * ITERS_PER_EPOCH
: "${SAVE_CKPT_FREQ:=1}"              # checkpoint every N epochs (as the reference's --save_ckpt_freq)
: "${SAVE_EVERY_STEPS:=0}"            # >0: checkpoint every N optimizer steps instead
: "${LORA_RANK:=0}"                   # LoRA rank; 0 = full finetune (ddp or zero2 with LoRA)
: "${LORA_ALPHA:=}"                   # LoRA alpha (scale alpha/rank; default: LORA_RANK)
: "${LORA_TARGETS:=}"                 # comma-separated block layer names (default: the kind's, pyramid_dit/kinds.py)
: "${LORA_DROPOUT:=0}"
: "${OFFLOAD:=0}"                     # 1: ZeRO optimizer state + fp32 master weights in CPU RAM (DeepSpeed CPU Adam; slower)
: "${KEEP_CKPTS:=0}"                 # keep only the newest N checkpoints (0: keep all)
: "${COLLECTIVE_TIMEOUT_MIN:=10}"     # a rank that stops responding for this long ends the run (minutes)
: "${GRADIENT_CHECKPOINTING:=}"       # 1 recomputes activations; unset: on for 768p only
: "${NUM_WORKERS:=4}"
: "${EXTRA_ARGS:=}"                   # more flags for train/train_pyramid_flow.py (see --help)

check_train_vars
[ -z "$DATA_ROOT" ] || [ -d "$DATA_ROOT" ] || die "DATA_ROOT=$DATA_ROOT is not a folder; set it to the folder the relative paths in ANNO_FILE start from"
default_checkpointing
detect_gpus
[ -n "$MODEL_DTYPE" ] || { if [ "$HAVE_GPU" -eq 1 ]; then MODEL_DTYPE=bf16; else MODEL_DTYPE=fp32; fi; }
check_sp
is_uint "$VIDEO_SYNC_GROUP" && [ "$VIDEO_SYNC_GROUP" -gt 0 ] || die "VIDEO_SYNC_GROUP=$VIDEO_SYNC_GROUP must be a positive integer"
[ $((NUM_FRAMES % VIDEO_SYNC_GROUP)) -eq 0 ] \
    || die "NUM_FRAMES=$NUM_FRAMES must be a multiple of VIDEO_SYNC_GROUP=$VIDEO_SYNC_GROUP (change either)"
[ $((DATA_WORLD % VIDEO_SYNC_GROUP)) -eq 0 ] || [ $((VIDEO_SYNC_GROUP % DATA_WORLD)) -eq 0 ] \
    || die "GPUS*NNODES/SP_SIZE=$DATA_WORLD data-parallel ranks and VIDEO_SYNC_GROUP=$VIDEO_SYNC_GROUP must divide one another: a multiple of VIDEO_SYNC_GROUP gives each rank one slot of a group, a divisor of it makes each rank train VIDEO_SYNC_GROUP/ranks slots of the clip in turn (same update, more time per step)"

launch_training --task t2v --use_temporal_pyramid --sync_video_input --video_sync_group "$VIDEO_SYNC_GROUP" \
    --frame_per_unit 1
