#!/bin/sh
# Full-sequence pyramid-flow finetuning (no temporal pyramid): text-to-video (TASK=t2v, pre-extracted latents) or
# text-to-image (TASK=t2i, images encoded by the VAE on the fly, aspect-ratio buckets).
#
# Every variable below can be set from the environment, e.g.
#   TASK=t2i GPUS=8 MODEL_PATH=/data/pyramid-flow-miniflux OUTPUT_DIR=runs/t2i ANNO_FILE=data/image_text.jsonl \
#     sh scripts/train_pyramid_flow_without_ar.sh
# Constraint (checked before launch): BATCH_SIZE % 4 == 0. A rerun with the same OUTPUT_DIR resumes.
set -eu
SCRIPT_NAME=train_pyramid_flow_without_ar.sh
. "$(dirname "$0")/_common.sh"

: "${GPUS:=}"                         # processes per node (default: visible GPUs, or 1 on CPU)
: "${NNODES:=1}"                      # multi-node: also NODE_RANK, MASTER_ADDR, MASTER_PORT
: "${TASK:=t2i}"                      # t2i | t2v
: "${SHARD_STRATEGY:=zero2}"          # zero2 | zero3 (DeepSpeed ZeRO) | ddp
: "${SP_SIZE:=1}"                     # sequence parallelism: processes splitting each sample's tokens (divides GPUS*NNODES and the head count)
: "${MODEL_NAME:=pyramid_flux}"       # pyramid_flux (rain1011/pyramid-flow-miniflux) | pyramid_mmdit (rain1011/pyramid-flow-sd3)
: "${MODEL_PATH:=}"                   # the downloaded checkpoint folder
: "${VARIANT:=diffusion_transformer_image}"  # diffusion_transformer_image (t2i) or diffusion_transformer_384p
: "${OUTPUT_DIR:=}"
: "${NUM_FRAMES:=8}"                  # t2v: latent frames per clip (8 for 2 s, 16 for 5 s)
: "${BATCH_SIZE:=4}"                  # per process; multiple of 4
: "${GRAD_ACCU_STEPS:=1}"
: "${RESOLUTION:=768p}"               # 384p | 768p | WIDTHxHEIGHT
: "${ANNO_FILE:=annotation/image_text.jsonl}"
: "${DATA_ROOT:=}"                    # root for relative paths in ANNO_FILE (default: $PYRAMID_DATA_ROOT, else ANNO_FILE's folder)
: "${MODEL_DTYPE:=}"                  # bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)
: "${LR:=1e-4}"
: "${WARMUP_STEPS:=1000}"             # LR warmup steps; 0 or less: WARMUP_EPOCHS epochs (as the reference)
: "${WARMUP_EPOCHS:=1}"
: "${EPOCHS:=20}"
: "${ITERS_PER_EPOCH:=2000}"
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
: "${LOAD_TEXT_ENCODER:=1}"           # 1: encode captions during training; 0: read text_fea files
: "${NUM_WORKERS:=4}"
: "${EXTRA_ARGS:=}"

check_train_vars
[ -z "$DATA_ROOT" ] || [ -d "$DATA_ROOT" ] || die "DATA_ROOT=$DATA_ROOT is not a folder; set it to the folder the relative paths in ANNO_FILE start from"
default_checkpointing
case "$TASK" in t2i|t2v) ;; *) die "TASK=$TASK must be t2i or t2v" ;; esac
detect_gpus
[ -n "$MODEL_DTYPE" ] || { if [ "$HAVE_GPU" -eq 1 ]; then MODEL_DTYPE=bf16; else MODEL_DTYPE=fp32; fi; }
check_sp

set -- --task "$TASK"
[ "$LOAD_TEXT_ENCODER" = 0 ] || set -- "$@" --load_text_encoder
launch_training "$@"
