#!/bin/sh
# Extract T5 + CLIP-pooled text features for every line of an annotation file (tools/extract_text_features.py),
# plus, once, the empty-prompt features the trainer uses for classifier-free-guidance dropout.
# One process per GPU (torchrun), or CPU processes with gloo when there is no GPU.
#
# Every variable below can be set from the environment, e.g.
#   MODEL_PATH=ckpt/pyramid-flow-miniflux ANNO_FILE=data/demo/video_text.jsonl sh scripts/extract_text_feature.sh
# The launcher (tools/launch.py) checks them before anything starts, with a message naming the variable. A rerun
# skips the features that already exist and load correctly; add EXTRA_ARGS=--overwrite to redo them.
set -eu
SCRIPT_NAME=extract_text_feature.sh

set -a  # every variable below reaches the launcher
: "${MODEL_NAME:=pyramid_flux}" # pyramid_flux (CLIP-L + T5) | pyramid_mmdit (SD3: CLIP-L + CLIP-G + T5)
: "${MODEL_PATH:=}"             # the downloaded model folder (text_encoder*/ and tokenizer*/ of that kind)
: "${ANNO_FILE:=annotation/video_text.jsonl}"   # lines with "text" and "text_fea"
: "${KIND:=video}"              # video | image: the kind of lines in ANNO_FILE
: "${DATA_ROOT:=}"              # root for relative paths in ANNO_FILE (default: the annotation file's folder)
: "${EMPTY_PROMPT_FEA:=}"       # empty-prompt output (default: <data root>/empty_prompt_text_fea.safetensors)
: "${BATCH_SIZE:=16}"           # prompts per encoder call
: "${MODEL_DTYPE:=}"            # bf16 | fp16 | fp32 (default: bf16 with GPUs, fp32 on CPU)
: "${GPUS:=}"                   # processes per node (default: the visible GPU count, or 1 without GPUs);
                                # under Slurm: Slurm's (one task per node)
: "${NNODES:=}"                 # nodes (default 1, or Slurm's); with NNODES > 1 also:
: "${NODE_RANK:=}"              #   this node, 0..NNODES-1
: "${MASTER_ADDR:=}"            #   address of node 0, reachable from every node
: "${MASTER_PORT:=}"            #   default 29500
: "${EXTRA_ARGS:=}"             # more flags, e.g. "--overwrite"
set +a

. "$(dirname "$0")/_common.sh"
run_launcher tools.launch text
