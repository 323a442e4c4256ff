#!/bin/sh
# Extract T5 + CLIP-pooled text features for every line of an annotation file (tools/extract_text_features.py),
# plus, once, the empty-prompt features the trainer uses for classifier-free-guidance dropout.
# One process per GPU (torchrun), or CPU processes with gloo when there is no GPU.
#
# Every variable below can be set from the environment, e.g.
#   MODEL_PATH=ckpt/pyramid-flow-miniflux ANNO_FILE=data/demo/video_text.jsonl sh scripts/extract_text_feature.sh
# A rerun skips the features that already exist and load correctly; add EXTRA_ARGS=--overwrite to redo them.
set -eu

: "${MODEL_NAME:=pyramid_flux}" # pyramid_flux (CLIP-L + T5) | pyramid_mmdit (SD3: CLIP-L + CLIP-G + T5)
: "${MODEL_PATH:=}"             # the downloaded model folder (text_encoder*/ and tokenizer*/ of that kind)
: "${ANNO_FILE:=annotation/video_text.jsonl}"   # lines with "text" and "text_fea"
: "${KIND:=video}"              # video | image: the kind of lines in ANNO_FILE
: "${DATA_ROOT:=}"              # root for relative paths in ANNO_FILE (default: the annotation file's folder)
: "${EMPTY_PROMPT_FEA:=}"       # empty-prompt output (default: <data root>/empty_prompt_text_fea.safetensors)
: "${BATCH_SIZE:=16}"           # prompts per encoder call
: "${MODEL_DTYPE:=}"            # bf16 | fp16 | fp32 (default: bf16 with GPUs, fp32 on CPU)
: "${GPUS:=}"                   # processes per node (default: the visible GPU count, or 1 without GPUs);
                                # multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
: "${EXTRA_ARGS:=}"             # more flags, e.g. "--overwrite"

SCRIPT_NAME=extract_text_feature.sh
. "$(dirname "$0")/_common.sh"   # die, is_uint, detect_gpus, launch

check_model_name
[ -n "$MODEL_PATH" ] || die "set MODEL_PATH to the model folder (with $TEXT_SUBFOLDERS)"
for sub in $TEXT_SUBFOLDERS; do
    [ -d "$MODEL_PATH/$sub" ] || die "MODEL_PATH=$MODEL_PATH has no $sub/ folder; point it at the downloaded $MODEL_NAME model folder (or set MODEL_NAME to its kind)"
done
[ -f "$ANNO_FILE" ] || die "annotation file ANNO_FILE=$ANNO_FILE not found; set ANNO_FILE to your annotation jsonl"
case "$KIND" in video|image) ;; *) die "KIND=$KIND must be video or image" ;; esac
is_uint "$BATCH_SIZE" && [ "$BATCH_SIZE" -gt 0 ] || die "BATCH_SIZE=$BATCH_SIZE must be a positive integer"

detect_gpus
if [ -z "$MODEL_DTYPE" ]; then
    if [ "$HAVE_GPU" -eq 1 ]; then MODEL_DTYPE=bf16; else MODEL_DTYPE=fp32; fi
fi

set -- "$REPO/tools/extract_text_features.py" \
    --model_name "$MODEL_NAME" --model_path "$MODEL_PATH" --anno_file "$ANNO_FILE" --kind "$KIND" \
    --batch_size "$BATCH_SIZE" --model_dtype "$MODEL_DTYPE"
[ -z "$DATA_ROOT" ] || set -- "$@" --data_root "$DATA_ROOT"
[ -z "$EMPTY_PROMPT_FEA" ] || set -- "$@" --empty_prompt_fea "$EMPTY_PROMPT_FEA"

# shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
launch "$@" $EXTRA_ARGS
