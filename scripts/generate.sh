#!/bin/sh
# Generate a video (text-to-video, or image-to-video with IMAGE) or an image (TASK=t2i, a .png) with
# tools/generate.py, from the official model folder and optionally a finetuned DiT (DIT_PATH: a folder exported by
# the trainer; DIT_WEIGHT: a state-dict file) and/or a LoRA adapter applied without merging (LORA_PATH: the
# trainer's export/lora; LORA_SCALE: its strength). TASK and MODE default to how the DiT was trained (an exported
# folder records it in pyramid_flow_training.json; the released diffusion_transformer_image is t2i, the other
# variants ar).
#
# Every variable below can be set from the environment, e.g.
#   MODEL_PATH=ckpt/pyramid-flow-miniflux DIT_PATH=runs/run1/export/transformer_ema PROMPT="a red ball on a beach" \
#     OUTPUT=out/ball.mp4 sh scripts/generate.sh
#   MODEL_PATH=ckpt/pyramid-flow-miniflux TASK=t2i PROMPT="a red ball on a beach" OUTPUT=out/ball.png \
#     GUIDANCE_SCALE=9 sh scripts/generate.sh
# The tiny test model (no GPU needed):
#   python3 tools/build_tiny_checkpoint.py --out /tmp/tiny && MODEL_PATH=/tmp/tiny HEIGHT=64 WIDTH=64 TEMP=3 \
#     NUM_INFERENCE_STEPS=2 VIDEO_NUM_INFERENCE_STEPS=1 PROMPT="a dog" sh scripts/generate.sh
set -eu
SCRIPT_NAME=generate.sh
. "$(dirname "$0")/_common.sh"

: "${GPUS:=1}"                              # processes splitting each video's sequence (sequence parallelism; divides the DiT's head count)
: "${MODEL_NAME:=pyramid_flux}"             # pyramid_flux (pyramid-flow-miniflux) | pyramid_mmdit (pyramid-flow-sd3)
: "${MODEL_PATH:=}"                         # the downloaded model folder (causal_video_vae/, text encoders, DiTs)
: "${VARIANT:=}"                            # DiT subfolder: diffusion_transformer_384p | _768p | _image
                                            # (default: _image for TASK=t2i when MODEL_PATH has it, else _384p)
: "${DIT_PATH:=}"                           # finetuned DiT folder (config.json + diffusion_pytorch_model.safetensors)
: "${DIT_WEIGHT:=}"                         # ... or a single state-dict file (.safetensors / .pt / .bin)
: "${LORA_PATH:=}"                          # LoRA adapter folder (export/lora: adapter_config.json + weights)
: "${LORA_SCALE:=1}"                        # adapter strength: 1 as trained (= export/transformer), 0 = base DiT
: "${PROMPT:=}"                             # the prompt ...
: "${PROMPT_FILE:=}"                        # ... or a file with one prompt per line (one video each)
: "${IMAGE:=}"                              # image-to-video: the first frame
: "${TASK:=}"                               # t2v | t2i (one image); default: what the DiT was trained for
: "${MODE:=}"                               # ar | full_sequence; default: how the DiT was trained
: "${TEMP:=}"                               # latent frames; video frames = 1 + 8 * (TEMP - 1) (default 16 -> 121
                                            # frames, 5 s; 1 for t2i: one image)
: "${HEIGHT:=}"                             # pixels, multiple of 64 (default 384, 768 for the 768p / image variants)
: "${WIDTH:=}"                              # pixels, multiple of 64 (default 640, 1280 for the 768p / image variants)
: "${NUM_INFERENCE_STEPS:=20 20 20}"        # Euler steps per stage, first frame (MODE=full_sequence: all frames)
: "${VIDEO_NUM_INFERENCE_STEPS:=10 10 10}"  # Euler steps per stage, later frames (MODE=ar)
: "${GUIDANCE_SCALE:=7.0}"                  # guidance of the first frame / of all frames with MODE=full_sequence
                                            # (upstream advice: 7 for 384p, 7-9 for 768p, 9 for images)
: "${VIDEO_GUIDANCE_SCALE:=5.0}"            # guidance of the later frames (MODE=ar)
: "${SEED:=0}"                              # prompt i of PROMPT_FILE uses SEED + i
: "${DEVICE:=auto}"                         # auto | cuda | cpu
: "${DTYPE:=auto}"                          # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
: "${CPU_OFFLOAD:=0}"                       # 1: keep models on the CPU, move each to the GPU while it runs
: "${OUTPUT:=}"                             # .mp4 | .gif | .png (frame strip; an image is always .png); default
                                            # outputs/sample.mp4 (.png for an image); several prompts: stem + _000 ...
: "${FPS:=24}"                              # frame rate of the written video (the released models: 24)
: "${EXTRA_ARGS:=}"                         # more flags, e.g. "--decode_window 2 --vae_tile_size 0"
# NEGATIVE_PROMPT and PROMPT_SUFFIX: when set (even to ""), replace tools/generate.py's defaults.


check_model_name
[ -n "$MODEL_PATH" ] || die "set MODEL_PATH to the downloaded model folder (e.g. ckpt/pyramid-flow-miniflux)"
[ -d "$MODEL_PATH" ] || die "MODEL_PATH=$MODEL_PATH is not a folder"
[ -z "$DIT_PATH" ] || [ -z "$DIT_WEIGHT" ] || die "set DIT_PATH or DIT_WEIGHT, not both"
[ -z "$LORA_PATH" ] || [ -f "$LORA_PATH/adapter_config.json" ] \
    || die "LORA_PATH=$LORA_PATH has no adapter_config.json; point it at a run's export/lora folder"
[ -n "$LORA_PATH" ] || [ "$LORA_SCALE" = 1 ] || die "LORA_SCALE=$LORA_SCALE scales an adapter: set LORA_PATH too"
[ -n "$DIT_PATH" ] || [ -z "$VARIANT" ] || [ -f "$MODEL_PATH/$VARIANT/config.json" ] \
    || die "no $VARIANT/config.json in MODEL_PATH=$MODEL_PATH; set VARIANT to one of its diffusion_transformer_* folders"
[ -n "$PROMPT" ] || [ -n "$PROMPT_FILE" ] || die "set PROMPT (or PROMPT_FILE, one prompt per line)"
[ -z "$PROMPT" ] || [ -z "$PROMPT_FILE" ] || die "set PROMPT or PROMPT_FILE, not both"

[ -z "$HEIGHT" ] || { is_uint "$HEIGHT" && [ "$HEIGHT" -gt 0 ] && [ $((HEIGHT % 64)) -eq 0 ]; } \
    || die "HEIGHT=$HEIGHT must be a positive multiple of 64"
[ -z "$WIDTH" ] || { is_uint "$WIDTH" && [ "$WIDTH" -gt 0 ] && [ $((WIDTH % 64)) -eq 0 ]; } \
    || die "WIDTH=$WIDTH must be a positive multiple of 64"
[ -z "$TEMP" ] || { is_uint "$TEMP" && [ "$TEMP" -ge 1 ]; } || die "TEMP=$TEMP must be a positive integer (latent frames)"
case "$TASK" in ''|t2v|t2i) ;; *) die "TASK=$TASK must be t2v or t2i (or unset: what the DiT was trained for)" ;; esac
case "$MODE" in ''|ar|full_sequence) ;; *) die "MODE=$MODE must be ar or full_sequence (or unset: how the DiT was trained)" ;; esac
case "$CPU_OFFLOAD" in 0|1) ;; *) die "CPU_OFFLOAD=$CPU_OFFLOAD must be 0 or 1" ;; esac
is_uint "$GPUS" && [ "$GPUS" -gt 0 ] || die "GPUS=$GPUS must be a positive integer (processes splitting each video)"
if [ "$GPUS" -gt 1 ]; then
    # Unset VARIANT: tools/generate.py picks one; every variant of a kind has the same head count, so 384p answers.
    DIT_CONFIG="${DIT_PATH:-$MODEL_PATH/${VARIANT:-diffusion_transformer_384p}}/config.json"
    heads=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1])).get('num_attention_heads', 0))" \
        "$DIT_CONFIG") || die "cannot read $DIT_CONFIG"
    [ "$heads" -gt 0 ] && [ $((heads % GPUS)) -eq 0 ] \
        || die "GPUS=$GPUS must divide the DiT's $heads attention heads ($DIT_CONFIG): each process attends with heads/GPUS of them; choose a divisor of $heads"
fi

set -- "$REPO/tools/generate.py" --model_name "$MODEL_NAME" --model_path "$MODEL_PATH" \
    --guidance_scale "$GUIDANCE_SCALE" --video_guidance_scale "$VIDEO_GUIDANCE_SCALE" \
    --seed "$SEED" --device "$DEVICE" --dtype "$DTYPE" --fps "$FPS"
# Unset: tools/generate.py derives them from how the DiT was trained and from the variant (one place for the rule).
[ -z "$VARIANT" ] || set -- "$@" --variant "$VARIANT"
[ -z "$TASK" ] || set -- "$@" --task "$TASK"
[ -z "$MODE" ] || set -- "$@" --mode "$MODE"
[ -z "$TEMP" ] || set -- "$@" --temp "$TEMP"
[ -z "$HEIGHT" ] || set -- "$@" --height "$HEIGHT"
[ -z "$WIDTH" ] || set -- "$@" --width "$WIDTH"
[ -z "$OUTPUT" ] || set -- "$@" --output "$OUTPUT"
# shellcheck disable=SC2086  # step lists are space-separated numbers
set -- "$@" --num_inference_steps $NUM_INFERENCE_STEPS --video_num_inference_steps $VIDEO_NUM_INFERENCE_STEPS
[ -z "$PROMPT" ] || set -- "$@" --prompt "$PROMPT"
[ -z "$PROMPT_FILE" ] || set -- "$@" --prompt_file "$PROMPT_FILE"
[ -z "$IMAGE" ] || set -- "$@" --image "$IMAGE"
[ -z "$DIT_PATH" ] || set -- "$@" --dit_path "$DIT_PATH"
[ -z "$DIT_WEIGHT" ] || set -- "$@" --dit_weight "$DIT_WEIGHT"
[ -z "$LORA_PATH" ] || set -- "$@" --lora_path "$LORA_PATH" --lora_scale "$LORA_SCALE"
[ "$CPU_OFFLOAD" = 0 ] || set -- "$@" --cpu_offload
[ "${NEGATIVE_PROMPT+set}" != set ] || set -- "$@" --negative_prompt "$NEGATIVE_PROMPT"
[ "${PROMPT_SUFFIX+set}" != set ] || set -- "$@" --prompt_suffix "$PROMPT_SUFFIX"

# One process: python3; GPUS > 1: torchrun, the processes split each video's sequence (rank 0 writes).
NNODES=1
# shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
launch "$@" $EXTRA_ARGS
