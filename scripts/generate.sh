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
# The launcher (tools/launch.py) checks every variable before anything loads, naming it in its message.
# The tiny test model (no GPU needed):
#   python3 tools/build_tiny_checkpoint.py --out /tmp/tiny && MODEL_PATH=/tmp/tiny HEIGHT=64 WIDTH=64 TEMP=3 \
#     NUM_INFERENCE_STEPS=2 VIDEO_NUM_INFERENCE_STEPS=1 PROMPT="a dog" sh scripts/generate.sh
set -eu
SCRIPT_NAME=generate.sh

set -a  # every variable below reaches the launcher
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
set +a

. "$(dirname "$0")/_common.sh"
run_launcher tools.launch generate
