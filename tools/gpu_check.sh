#!/usr/bin/env bash
# The GPU check of issue 23 (FlexAttention, host syncs, step time against the reference), as one call that fits a
# lent device's budget: under 8 minutes on one H100, every step under its own `timeout`, the whole run under a
# deadline (a step that would pass it is skipped and reported), results written under $OUT, a short table last.
#
# What it runs (docs/performance.md, "The GPU check", says how to read the results):
#   1. env            nvidia-smi, torch / triton / diffusers versions
#   2. flux384        tools/measure_gpu.py pyramid_flux:ar:384p:16, flex / frame / column, against the reference
#                     (the headline: released miniFLUX, heaviest micro-batch of a one-GPU 384p x 16-frame AR launch)
#   3. flex_check     tests/gpu_flex_check.py: FlexAttention against per-frame SDPA, outputs and gradients (tiny
#                     models, fp32 without TF32, prompts' lengths on the host or only on the device); compilations
#                     over 14 varied layouts; synchronising CUDA calls in one training micro-batch
#   4. sd3_384        the same for the released SD3 DiT, flex / frame, against the reference
#   5. flux768        pyramid_flux:ar:768p:16 with gradient checkpointing, flex: the planner's activations vs measured
#   6. report         tools/gpu_check_report.py: the table, printed last (also $OUT/summary.md)
# The planner's predictions come from tools/gpu_check_predictions.json (traced on a CPU with
# `python3 tools/measure_gpu.py --predict_only --predictions tools/gpu_check_predictions.json --cases ...`), so no
# device time goes to tracing.
#
# How the call is made (the device machine has no network; the reference travels inside the working tree):
#   once, in the repository root of the checkout the session sends:
#       echo /.gpu_ref/ >> .git/info/exclude
#       mkdir -p .gpu_ref && cp -r /tmp/ref/pyramid_dit .gpu_ref/    # a jy0205/Pyramid-Flow checkout's pyramid_dit
#   then the device tool's `run` with
#       command:   bash tools/gpu_check.sh
#       carry:     [".gpu_ref"]
#       timeout_s: 540
#   Without .gpu_ref the reference columns are left out (REF=... points elsewhere). Run it on nvidia-h100-x1 (the
#   default kind); name the card with every figure, and compare times only within one run.
# Files back in $OUT (the device tool returns at most 8): log.txt (every step's output, and one status line per
# step), flex_check.json, measure_flux384.json, measure_sd3_384.json, measure_flux768.json, summary.md.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"  # the package and the tests' tiny-model helpers
OUT=${OUT:-runs/gpu_check}
REF=${REF:-.gpu_ref}
DEADLINE_S=${DEADLINE_S:-470}
PREDICTIONS=tools/gpu_check_predictions.json
mkdir -p "$OUT"
LOGS=$(mktemp -d)
START=$(date +%s)
: > "$OUT/log.txt"
REF_ARGS=()
if [ -f "$REF/pyramid_dit/flux_modules/modeling_pyramid_flux.py" ]; then REF_ARGS=(--reference "$REF"); fi

# step NAME LIMIT_S COMMAND...: runs COMMAND for at most LIMIT_S seconds and never past the deadline; its output and
# a status line go to $OUT/log.txt ($LOGS/status.txt collects the status lines for the report).
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE_S - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        echo "$name skipped (deadline: ${left}s left)" | tee -a "$LOGS/status.txt" "$OUT/log.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    { echo "==== $name"; cat "$LOGS/$name.log"; } >> "$OUT/log.txt"
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s (limit ${limit}s)" | tee -a "$LOGS/status.txt" "$OUT/log.txt"
    tail -n 3 "$LOGS/$name.log" | sed "s/^/  $name| /"
}

step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
    python3 -c "import torch, diffusers, einops; import triton; print(\"torch\", torch.__version__, \"cuda\",
    torch.version.cuda, \"triton\", triton.__version__, \"diffusers\", diffusers.__version__)"'
step flux384 150 python3 tools/measure_gpu.py --cases pyramid_flux:ar:384p:16 --attention_split flex frame column \
    "${REF_ARGS[@]}" --steps 5 --predictions "$PREDICTIONS" --json "$OUT/measure_flux384.json"
step flex_check 180 python3 tests/gpu_flex_check.py --json "$OUT/flex_check.json"
step sd3_384 100 python3 tools/measure_gpu.py --cases pyramid_mmdit:ar:384p:16 --attention_split flex frame \
    "${REF_ARGS[@]}" --steps 3 --predictions "$PREDICTIONS" --json "$OUT/measure_sd3_384.json"
step flux768 90 python3 tools/measure_gpu.py --cases pyramid_flux:ar:768p:16:ckpt --attention_split flex \
    --steps 3 --predictions "$PREDICTIONS" --json "$OUT/measure_flux768.json"
python3 tools/gpu_check_report.py "$OUT" --status "$LOGS/status.txt" > "$LOGS/report.log" 2>&1
{ echo "==== report"; cat "$LOGS/report.log"; } >> "$OUT/log.txt"
cat "$LOGS/report.log"
echo "total $(( $(date +%s) - START ))s; files under $OUT"
