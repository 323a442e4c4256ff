#!/bin/sh
# Autoregressive video finetuning with the temporal pyramid (train/train_pyramid_flow.py --use_temporal_pyramid).
# The ranks of one VIDEO_SYNC_GROUP read the same clip and each trains a different temporal unit of it.
#
# Every variable below can be set from the environment, e.g.
#   GPUS=8 MODEL_PATH=/data/pyramid-flow-miniflux OUTPUT_DIR=runs/ar ANNO_FILE=data/video_text.jsonl \
#     sh scripts/train_pyramid_flow.sh
# The launcher (train/launch.py) checks them all before anything starts, with a message naming the variable:
# NUM_FRAMES % VIDEO_SYNC_GROUP == 0, BATCH_SIZE % 4 == 0, SP_SIZE divides GPUS*NNODES and the DiT's head count,
# GPUS*NNODES/SP_SIZE and VIDEO_SYNC_GROUP divide one another, and every number within its range. GPUS=8
# VIDEO_SYNC_GROUP=8 trains one slot (temporal unit) per process; GPUS=1 VIDEO_SYNC_GROUP=8 (a virtual group) trains
# all 8 slots in turn on one process, accumulated into the same optimizer step: the same update, 8x the time per
# step. 768p turns GRADIENT_CHECKPOINTING on. A rerun with the same OUTPUT_DIR resumes. Under Slurm, run it as one
# task per node (scripts/slurm_train.sbatch): NNODES, NODE_RANK, MASTER_ADDR and GPUS come from Slurm's variables.
set -eu
SCRIPT_NAME=train_pyramid_flow.sh

set -a  # every variable below reaches the launcher
: "${GPUS:=}"                         # processes per node (default: visible GPUs, or 1 on CPU)
: "${NNODES:=}"                       # nodes (default 1, or Slurm's); multi-node: also NODE_RANK, MASTER_ADDR, MASTER_PORT
: "${NODE_RANK:=}"                    # this node, 0..NNODES-1 (Slurm: SLURM_NODEID)
: "${MASTER_ADDR:=}"                  # address of node 0, reachable from every node (Slurm: its first host)
: "${MASTER_PORT:=29500}"
: "${SHARD_STRATEGY:=zero2}"          # zero2 | zero3 (DeepSpeed ZeRO) | ddp
: "${SP_SIZE:=1}"                     # sequence parallelism: processes splitting each sample's tokens (divides GPUS*NNODES and the head count)
: "${VIDEO_SYNC_GROUP:=8}"            # slots sharing one clip: 4, 8 or 16 (may exceed GPUS*NNODES, see above)
: "${PACK_SLOTS:=auto}"               # virtual group: its slots per forward/backward pass (same losses; auto: most that fit the GPU, 1 on CPU)
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
: "${EMPTY_PROMPT_FEA:=}"             # empty-prompt features for caption dropout (default: <data root>/empty_prompt_text_fea.safetensors)
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
: "${LORA_DROPOUT:=}"                 # dropout on the LoRA branch (default 0)
: "${OFFLOAD:=0}"                     # 1: ZeRO optimizer state + fp32 master weights in CPU RAM (DeepSpeed CPU Adam; slower)
: "${KEEP_CKPTS:=0}"                  # keep only the newest N checkpoints (0: keep all)
: "${COLLECTIVE_TIMEOUT_MIN:=10}"     # a rank that stops responding for this long ends the run (minutes)
: "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:=120}" # seconds the workers get to checkpoint after a stop signal
: "${GRADIENT_CHECKPOINTING:=}"       # 1 recomputes activations; unset: on for 768p only
: "${NUM_WORKERS:=auto}"              # data-loading workers per process: auto (up to 4) or a count; capped by the machine
: "${EVAL_FRACTION:=0}"               # held-out evaluation (docs/evaluation.md): fraction of ANNO_FILE's lines kept out of training (0..0.5)
: "${EVAL_ANNO_FILE:=}"               # ... or a separate annotation file to evaluate (never trained on); set one of the two
: "${EVAL_EVERY:=500}"                # evaluation loss before the first step (base model), every N steps and after the last
: "${EVAL_SAMPLES:=32}"               # at most this many evaluation samples (cost: samples x stages x timesteps x depths rows)
: "${EVAL_TIMESTEPS:=4}"              # fixed timesteps per stage in the evaluation grid
: "${EVAL_HISTORY_DEPTHS:=2}"         # fixed AR history depths in the evaluation grid
: "${EVAL_DEGRADE_MARGIN:=0.02}"      # warn when the evaluation loss is >2% above the reference ...
: "${EVAL_DEGRADE_PATIENCE:=3}"       # ... for this many evaluations in a row
: "${EVAL_DEGRADE_VS:=best}"          # the reference: best (so far, base included) | base (the model you started from)
: "${EVAL_STOP_ON_DEGRADE:=0}"        # 1: when the warning fires, checkpoint, export and end the run
: "${EXTRA_ARGS:=}"                   # more flags for train/train_pyramid_flow.py (see --help)
set +a

. "$(dirname "$0")/_common.sh"
run_launcher train.launch ar
