#!/bin/sh
# Full-sequence pyramid-flow finetuning (no temporal pyramid): text-to-video (TASK=t2v, pre-extracted latents) or
# text-to-image (TASK=t2i, images encoded by the VAE on the fly, aspect-ratio buckets).
#
# Every variable below can be set from the environment, e.g.
#   TASK=t2i GPUS=8 MODEL_PATH=/data/pyramid-flow-miniflux OUTPUT_DIR=runs/t2i ANNO_FILE=data/image_text.jsonl \
#     sh scripts/train_pyramid_flow_without_ar.sh
# The launcher (train/launch.py) checks them all before anything starts, with a message naming the variable
# (BATCH_SIZE % 4 == 0, SP_SIZE divides GPUS*NNODES and the DiT's head count, every number within its range).
# A rerun with the same OUTPUT_DIR resumes. Under Slurm, run it as one task per node (see scripts/slurm_train.sbatch).
set -eu
SCRIPT_NAME=train_pyramid_flow_without_ar.sh

set -a  # every variable below reaches the launcher
: "${GPUS:=}"                         # processes per node (default: visible GPUs, or 1 on CPU)
: "${NNODES:=}"                       # nodes (default 1, or Slurm's); multi-node: also NODE_RANK, MASTER_ADDR, MASTER_PORT
: "${NODE_RANK:=}"                    # this node, 0..NNODES-1 (Slurm: SLURM_NODEID)
: "${MASTER_ADDR:=}"                  # address of node 0, reachable from every node (Slurm: its first host)
: "${MASTER_PORT:=29500}"
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
: "${EMPTY_PROMPT_FEA:=}"             # empty-prompt features for caption dropout (default: <data root>/empty_prompt_text_fea.safetensors)
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
: "${LORA_DROPOUT:=}"                 # dropout on the LoRA branch (default 0)
: "${OFFLOAD:=0}"                     # 1: ZeRO optimizer state + fp32 master weights in CPU RAM (DeepSpeed CPU Adam; slower)
: "${KEEP_CKPTS:=0}"                  # keep only the newest N checkpoints (0: keep all)
: "${COLLECTIVE_TIMEOUT_MIN:=10}"     # a rank that stops responding for this long ends the run (minutes)
: "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:=120}" # seconds the workers get to checkpoint after a stop signal
: "${GRADIENT_CHECKPOINTING:=}"       # 1 recomputes activations; unset: on for 768p only
: "${LOAD_TEXT_ENCODER:=1}"           # 1: encode captions during training; 0: read text_fea files
: "${NUM_WORKERS:=auto}"              # data-loading workers per process: auto (up to 4) or a count; capped by the machine
: "${EVAL_FRACTION:=0}"               # held-out evaluation (docs/evaluation.md): fraction of ANNO_FILE's lines kept out of training (0..0.5)
: "${EVAL_ANNO_FILE:=}"               # ... or a separate annotation file to evaluate (never trained on); set one of the two
: "${EVAL_EVERY:=500}"                # evaluation loss before the first step (base model), every N steps and after the last
: "${EVAL_SAMPLES:=32}"               # at most this many evaluation samples (cost: samples x stages x timesteps x depths rows)
: "${EVAL_TIMESTEPS:=4}"              # fixed timesteps per stage in the evaluation grid
: "${EVAL_DEGRADE_MARGIN:=0.02}"      # warn when the evaluation loss is >2% above the reference ...
: "${EVAL_DEGRADE_PATIENCE:=3}"       # ... for this many evaluations in a row
: "${EVAL_DEGRADE_VS:=best}"          # the reference: best (so far, base included) | base (the model you started from)
: "${EVAL_STOP_ON_DEGRADE:=0}"        # 1: when the warning fires, checkpoint, export and end the run
: "${EXTRA_ARGS:=}"                   # more flags for train/train_pyramid_flow.py (see --help)
set +a

. "$(dirname "$0")/_common.sh"
run_launcher train.launch full_sequence
