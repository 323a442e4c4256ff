#!/bin/sh
# The whole finetuning workflow, end to end, on a tiny random-weight model built on the spot (no downloads):
#   tiny checkpoint -> demo clips -> VAE latents + text features -> AR training -> resume -> generated video.
# Runs on a GPU when there is one, else on the CPU with 2 processes (gloo). On a 2-core CPU: ~2 min from an empty
# virtualenv (~1 min of it installing, 1.7 GB; longer over a slow network), ~1 min once installed.
# The generated video is noise (the model is tiny and random); every step is the code path of the real model.
#
#   sh scripts/quickstart.sh                     # everything under outputs/quickstart/
#   QUICKSTART_DIR=/tmp/qs sh scripts/quickstart.sh
#   MODEL_NAME=pyramid_mmdit sh scripts/quickstart.sh   # the SD3 kind (outputs/quickstart_pyramid_mmdit/)
set -eu
SCRIPT_NAME=quickstart.sh
. "$(dirname "$0")/_common.sh"

: "${MODEL_NAME:=pyramid_flux}"             # pyramid_flux (miniFLUX layout) | pyramid_mmdit (SD3 layout)
case "$MODEL_NAME" in pyramid_flux|pyramid_mmdit) ;; *) echo "$SCRIPT_NAME: MODEL_NAME=$MODEL_NAME must be pyramid_flux or pyramid_mmdit" >&2; exit 2 ;; esac
export MODEL_NAME                           # every script below takes the kind from it
if [ "$MODEL_NAME" = pyramid_flux ]; then DEFAULT_DIR=outputs/quickstart; else DEFAULT_DIR=outputs/quickstart_$MODEL_NAME; fi
: "${QUICKSTART_DIR:=$DEFAULT_DIR}"         # where everything is written (a rerun reuses the model, clips,
                                            # latents and features, and trains again from scratch)
: "${GPUS:=}"                               # processes (default: 2 on CPU, min(2, visible GPUs) with GPUs)
: "${SHARD_STRATEGY:=zero2}"                # zero2 | zero3 | ddp

banner() { printf '\n==> %s\n' "$*"; }

banner "0/6 requirements (scripts/install.sh: only what is missing; CPU torch when there is no NVIDIA GPU)"
sh "$REPO/scripts/install.sh" --if-missing

FOUND=$(python3 -c "from trainer_misc.runtime.launcher import count_local_gpus; print(count_local_gpus())")
[ "$FOUND" -gt 0 ] || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"  # DeepSpeed would guess it and say so
if [ -z "$GPUS" ]; then  # 2 processes: on CPU, or on up to 2 of the visible GPUs
    if [ "$FOUND" -eq 0 ] || [ "$FOUND" -ge 2 ]; then GPUS=2; else GPUS=$FOUND; fi
fi
mkdir -p "$QUICKSTART_DIR"
Q=$(cd "$QUICKSTART_DIR" && pwd)
MODEL=$Q/model DATA=$Q/data RUN=$Q/train
export PYTHONUNBUFFERED=1
START=$(date +%s)

banner "1/6 tiny model in the official folder layout -> $MODEL"
[ -f "$MODEL/diffusion_transformer_384p/config.json" ] || python3 "$REPO/tools/build_tiny_checkpoint.py" --out "$MODEL" \
    --kind "$MODEL_NAME"

banner "2/6 demo clips (coloured shapes moving, 25 frames, 64x64) -> $DATA"
[ -f "$DATA/video_text.jsonl" ] || python3 "$REPO/tools/make_demo_dataset.py" --out "$DATA" --num_clips 8 \
    --num_frames 25 --width 64 --height 64

banner "3/6 VAE latents ($GPUS processes)"
GPUS=$GPUS MODEL_PATH=$MODEL ANNO_FILE=$DATA/video_text.jsonl WIDTH=64 HEIGHT=64 NUM_FRAMES=25 NUM_WORKERS=1 \
    sh "$REPO/scripts/extract_vae_latent.sh"

banner "4/6 text features + empty-prompt features ($GPUS processes)"
GPUS=$GPUS MODEL_PATH=$MODEL ANNO_FILE=$DATA/video_text.jsonl sh "$REPO/scripts/extract_text_feature.sh"

train() {  # $1 = optimizer steps in total. EVAL_FRACTION=0.25 keeps 2 of the 8 clips out of training and
           # evaluates them before the first step (the base model), every 4 steps and at the end (docs/evaluation.md)
    GPUS=$GPUS VIDEO_SYNC_GROUP=$GPUS SHARD_STRATEGY=$SHARD_STRATEGY MODEL_PATH=$MODEL OUTPUT_DIR=$RUN \
    ANNO_FILE=$DATA/video_text.jsonl RESOLUTION=64x64 NUM_FRAMES=4 BATCH_SIZE=4 GRAD_ACCU_STEPS=1 LR=1e-4 \
    WARMUP_STEPS=0 WARMUP_EPOCHS=0 EPOCHS=1 ITERS_PER_EPOCH=$1 SAVE_EVERY_STEPS=4 NUM_WORKERS=0 \
    EVAL_FRACTION=0.25 EVAL_EVERY=4 \
        sh "$REPO/scripts/train_pyramid_flow.sh"
}
banner "5/6 autoregressive training: 4 steps, then a second launch that resumes and trains to 8 (2 clips held out)"
if [ -d "$RUN" ]; then
    echo "removing the training run of an earlier quickstart ($RUN): the quickstart always trains its 4 + 4 steps anew"
    rm -rf "$RUN"
fi
train 4
train 8
echo "held-out evaluation (step 0 = the base model; docs/evaluation.md explains the columns):"
python3 "$REPO/tools/eval_report.py" "$RUN"

banner "6/6 generate a video with the finetuned DiT"
python3 "$REPO/tools/generate.py" --model_name "$MODEL_NAME" --model_path "$MODEL" --dit_path "$RUN/export/transformer" \
    --prompt "a red square moving left" --temp 3 --height 64 --width 64 --num_inference_steps 2 \
    --video_num_inference_steps 1 --seed 0 --output "$Q/sample.mp4"

banner "done in $(( $(date +%s) - START )) s. Artefacts:"
cat <<EOT
  tiny model (official layout)   $MODEL
  demo clips + annotation        $DATA/videos/  $DATA/video_text.jsonl
  VAE latents / text features    $DATA/latents/  $DATA/text_fea/  ($DATA/empty_prompt_text_fea.safetensors)
  checkpoints (resumable)        $RUN/checkpoints/
  loss per step, held-out loss   $RUN/metrics.jsonl   (tensorboard --logdir $RUN; python3 tools/eval_report.py $RUN)
  finetuned DiT (diffusers)      $RUN/export/transformer/
  generated video                $Q/sample.mp4
EOT
