# Shared by the scripts in this folder (POSIX sh; sourced, not run). Callers set SCRIPT_NAME first.
#   die MSG            print "SCRIPT_NAME: MSG" to stderr and exit 2 (nothing was launched)
#   is_uint V          true when V is a non-negative integer
#   detect_gpus        sets GPUS (if unset) to the visible GPU count, or 1 without GPUs; sets HAVE_GPU=0|1 (and
#                      DS_ACCELERATOR=cpu without GPUs)
#   launch SCRIPT ...  python3 when one process on one node, else torchrun (multi-node via NNODES, NODE_RANK,
#                      MASTER_ADDR, MASTER_PORT; with NNODES>1 the first two must be set)
REPO=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "$SCRIPT_NAME: $*" >&2; exit 2; }
is_uint() { case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac; }

detect_gpus() {
    NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())") || die "python3 with torch is needed"
    HAVE_GPU=0; [ "$NGPU" -gt 0 ] && HAVE_GPU=1
    # No GPU: tell DeepSpeed so, instead of each process logging "Setting accelerator to CPU" as it guesses.
    if [ "$HAVE_GPU" -eq 0 ] && [ -z "${DS_ACCELERATOR:-}" ]; then export DS_ACCELERATOR=cpu; fi
    if [ -z "${GPUS:-}" ]; then GPUS=$NGPU; [ "$GPUS" -gt 0 ] || GPUS=1; fi
    is_uint "$GPUS" && [ "$GPUS" -gt 0 ] || die "GPUS=$GPUS must be a positive integer (processes per node)"
}

launch() {
    : "${NNODES:=1}" "${MASTER_PORT:=29500}"
    is_uint "$NNODES" && [ "$NNODES" -gt 0 ] || die "NNODES=$NNODES must be a positive integer"
    if [ "$GPUS" -eq 1 ] && [ "$NNODES" -eq 1 ]; then
        exec python3 "$@"
    fi
    if command -v torchrun >/dev/null 2>&1; then RUN=torchrun; else RUN="python3 -m torch.distributed.run"; fi
    # torchrun's own default with several processes per node, set here so it does not print a 4-line banner.
    if [ "$GPUS" -gt 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then export OMP_NUM_THREADS=1; fi
    if [ "$NNODES" -eq 1 ]; then
        # shellcheck disable=SC2086  # RUN may be several words
        supervise $RUN --standalone --nproc_per_node "$GPUS" "$@"
    fi
    # Several nodes: a default address or rank would make a node wait on its own localhost or claim rank 0
    # a second time (a hang, not an error), so both must be given on every node.
    [ -n "${MASTER_ADDR:-}" ] && [ -n "${NODE_RANK:-}" ] \
        || die "NNODES=$NNODES needs MASTER_ADDR (address of the node with NODE_RANK=0, reachable from every node) and NODE_RANK (0..$((NNODES - 1)), different on each node) set on every node; got MASTER_ADDR='${MASTER_ADDR:-}' NODE_RANK='${NODE_RANK:-}'"
    is_uint "$NODE_RANK" && [ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK=$NODE_RANK must be in 0..$((NNODES - 1)) (NNODES=$NNODES)"
    is_uint "$MASTER_PORT" || die "MASTER_PORT=$MASTER_PORT must be a port number"
    echo "$SCRIPT_NAME: rendezvous $MASTER_ADDR:$MASTER_PORT, this is node $NODE_RANK of $NNODES, $GPUS processes per node ($((NNODES * GPUS)) in all)" >&2
    # shellcheck disable=SC2086
    supervise $RUN --nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
        --master_port "$MASTER_PORT" --nproc_per_node "$GPUS" "$@"
}

# MODEL_NAME -> the kind's text subfolders (TEXT_SUBFOLDERS); pyramid_dit/kinds.py is the Python side of this table.
check_model_name() {
    case "$MODEL_NAME" in
        pyramid_flux) TEXT_SUBFOLDERS="text_encoder text_encoder_2 tokenizer tokenizer_2" ;;
        pyramid_mmdit) TEXT_SUBFOLDERS="text_encoder text_encoder_2 text_encoder_3 tokenizer tokenizer_2 tokenizer_3" ;;
        *) die "MODEL_NAME=$MODEL_NAME must be pyramid_flux (rain1011/pyramid-flow-miniflux) or pyramid_mmdit (rain1011/pyramid-flow-sd3)" ;;
    esac
}

# Run torchrun in the foreground and exit with its status. Its workers write their one-line failure (or stop)
# reason into PYRAMID_ERROR_DIR; the first one is repeated after torchrun's own summary, so the cause is the last
# thing on the screen. torchrun forwards SIGTERM/SIGINT/SIGHUP/SIGUSR1 to the workers (they finish the step, write a
# checkpoint and exit) and kills them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds; the workers also stop this way
# when torchrun itself is killed (e.g. with this shell's process group).
supervise() {
    : "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:=120}"
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT
    export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
    PYRAMID_ERROR_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pyramid_errors.XXXXXX") || die "cannot create a temp folder"
    export PYRAMID_ERROR_DIR
    status=0
    "$@" || status=$?
    first=$(ls "$PYRAMID_ERROR_DIR" | sort | head -n 1)
    if [ "$status" -ne 0 ] && [ -n "$first" ]; then
        { echo; cat "$PYRAMID_ERROR_DIR/$first"; } >&2
    fi
    rm -rf "$PYRAMID_ERROR_DIR"
    exit "$status"
}

# GRADIENT_CHECKPOINTING unset or empty: on for 768p (the reference script says 768p needs it), off
# otherwise; an explicit 0 or 1 is kept. Says so when it turns it on.
default_checkpointing() {
    if [ -z "${GRADIENT_CHECKPOINTING:-}" ]; then
        GRADIENT_CHECKPOINTING=0
        if [ "$RESOLUTION" = 768p ]; then
            GRADIENT_CHECKPOINTING=1
            echo "$SCRIPT_NAME: RESOLUTION=768p: gradient checkpointing on (GRADIENT_CHECKPOINTING=0 turns it off)" >&2
        fi
    fi
    case "$GRADIENT_CHECKPOINTING" in 0|1) ;; *) die "GRADIENT_CHECKPOINTING=$GRADIENT_CHECKPOINTING must be 0 or 1 (unset: on for 768p)" ;; esac
}

# SP_SIZE (sequence parallelism: processes splitting one sample's tokens) against GPUS*NNODES and the DiT's head
# count. Sets WORLD (GPUS*NNODES), DATA_WORLD (data-parallel ranks: WORLD/SP_SIZE) and SP_ARGS (the trainer's flags,
# empty for SP_SIZE=1; callers append them with: set -- "$@" $SP_ARGS).
check_sp() {
    is_uint "$SP_SIZE" && [ "$SP_SIZE" -gt 0 ] || die "SP_SIZE=$SP_SIZE must be a positive integer (1: no sequence parallelism)"
    WORLD=$((GPUS * NNODES))
    [ $((WORLD % SP_SIZE)) -eq 0 ] \
        || die "SP_SIZE=$SP_SIZE must divide GPUS*NNODES=$WORLD: each sample is split over SP_SIZE processes (use a divisor of $WORLD)"
    DATA_WORLD=$((WORLD / SP_SIZE))
    SP_ARGS=""
    if [ "$SP_SIZE" -gt 1 ]; then
        heads=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1])).get('num_attention_heads', 0))" \
            "$MODEL_PATH/$VARIANT/config.json") || die "cannot read $MODEL_PATH/$VARIANT/config.json"
        [ "$heads" -gt 0 ] && [ $((heads % SP_SIZE)) -eq 0 ] \
            || die "SP_SIZE=$SP_SIZE must divide the DiT's $heads attention heads ($VARIANT/config.json); choose a divisor of $heads"
        SP_ARGS="--use_sequence_parallel --sp_group_size $SP_SIZE"
    fi
}

# Checks shared by the two training scripts; each message names the variable to change.
check_train_vars() {
    [ -n "$MODEL_PATH" ] || die "set MODEL_PATH to the downloaded checkpoint folder (e.g. /data/pyramid-flow-miniflux)"
    [ -f "$MODEL_PATH/$VARIANT/config.json" ] \
        || die "MODEL_PATH=$MODEL_PATH has no $VARIANT/config.json; set MODEL_PATH to the checkpoint folder and VARIANT to one of its diffusion_transformer_* subfolders"
    [ -f "$ANNO_FILE" ] || die "ANNO_FILE=$ANNO_FILE not found; set ANNO_FILE to your annotation jsonl"
    [ -n "$OUTPUT_DIR" ] || die "set OUTPUT_DIR (checkpoints, logs and the exported DiT go there)"
    is_uint "$BATCH_SIZE" && [ "$BATCH_SIZE" -gt 0 ] && [ $((BATCH_SIZE % 4)) -eq 0 ] \
        || die "BATCH_SIZE=$BATCH_SIZE must be a positive multiple of 4 (each batch is split 1:2:1 over the 3 pyramid stages)"
    is_uint "$GRAD_ACCU_STEPS" && [ "$GRAD_ACCU_STEPS" -gt 0 ] || die "GRAD_ACCU_STEPS=$GRAD_ACCU_STEPS must be a positive integer"
    # Every number before any shell arithmetic uses it ($((GPUS * NNODES)) would fail or mislead on text).
    for var in NNODES EPOCHS ITERS_PER_EPOCH; do
        eval "val=\${$var:-}"; is_uint "$val" && [ "$val" -gt 0 ] || die "$var=$val must be a positive integer"
    done
    for var in WARMUP_EPOCHS SAVE_CKPT_FREQ SAVE_EVERY_STEPS NUM_WORKERS; do
        eval "val=\${$var:-}"; is_uint "$val" || die "$var=$val must be a non-negative integer"
    done
    case "$WARMUP_STEPS" in -[0-9]*) is_uint "${WARMUP_STEPS#-}" ;; *) is_uint "$WARMUP_STEPS" ;; esac \
        || die "WARMUP_STEPS=$WARMUP_STEPS must be an integer (0 or less: WARMUP_EPOCHS epochs of warmup)"
    is_uint "$NUM_FRAMES" && [ "$NUM_FRAMES" -gt 0 ] || die "NUM_FRAMES=$NUM_FRAMES must be a positive integer (latent frames: 16 for 5 s, 32 for 10 s)"
    case "$SHARD_STRATEGY" in ddp|zero2|zero3) ;; *) die "SHARD_STRATEGY=$SHARD_STRATEGY must be ddp, zero2 or zero3" ;; esac
    check_model_name
    case "$RESOLUTION:$VARIANT" in
        384p:diffusion_transformer_384p|768p:diffusion_transformer_768p|768p:diffusion_transformer_image) ;;
        384p:*|768p:*) die "RESOLUTION=$RESOLUTION does not match VARIANT=$VARIANT: use 384p with diffusion_transformer_384p, 768p with diffusion_transformer_768p or diffusion_transformer_image" ;;
        *x*) ;;  # custom WIDTHxHEIGHT (tiny and test runs); checked by the trainer
        *) die "RESOLUTION=$RESOLUTION must be 384p, 768p or WIDTHxHEIGHT" ;;
    esac
}

launch_training() {  # "$@": the script's own flags (task, AR wiring); adds the flags both training scripts share
    set -- "$REPO/train/train_pyramid_flow.py" "$@" --shard_strategy "$SHARD_STRATEGY" \
        --model_name "$MODEL_NAME" --model_path "$MODEL_PATH" --model_variant "$VARIANT" --model_dtype "$MODEL_DTYPE" \
        --output_dir "$OUTPUT_DIR" --batch_size "$BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCU_STEPS" \
        --resolution "$RESOLUTION" --max_frames "$NUM_FRAMES" --anno_file "$ANNO_FILE" \
        --schedule_shift 1.0 --lr_scheduler constant_with_warmup --opt_beta1 0.9 --opt_beta2 0.95 \
        --weight_decay 1e-4 --clip_grad 1.0 --lr "$LR" --warmup_steps "$WARMUP_STEPS" --warmup_epochs "$WARMUP_EPOCHS" \
        --epochs "$EPOCHS" --iters_per_epoch "$ITERS_PER_EPOCH" --save_ckpt_freq "$SAVE_CKPT_FREQ" \
        --save_every_steps "$SAVE_EVERY_STEPS" --num_workers "$NUM_WORKERS" --seed 42
    is_uint "$KEEP_CKPTS" || die "KEEP_CKPTS=$KEEP_CKPTS must be a non-negative integer (0 keeps every checkpoint)"
    [ "$KEEP_CKPTS" = 0 ] || set -- "$@" --keep_last_checkpoints "$KEEP_CKPTS"
    export COLLECTIVE_TIMEOUT_MIN
    [ "$GRADIENT_CHECKPOINTING" = 0 ] || set -- "$@" --gradient_checkpointing
    is_uint "$LORA_RANK" || die "LORA_RANK=$LORA_RANK must be 0 (full finetune) or a positive integer rank"
    if [ "$LORA_RANK" -gt 0 ]; then
        [ "$SHARD_STRATEGY" != zero3 ] || die "LORA_RANK=$LORA_RANK needs SHARD_STRATEGY=zero2 or ddp (LoRA with zero3 is not supported)"
        set -- "$@" --lora_rank "$LORA_RANK" --lora_dropout "$LORA_DROPOUT"
        [ -z "$LORA_ALPHA" ] || set -- "$@" --lora_alpha "$LORA_ALPHA"
        [ -z "$LORA_TARGETS" ] || set -- "$@" --lora_targets "$LORA_TARGETS"
    fi
    case "$OFFLOAD" in 0) ;; 1) [ "$SHARD_STRATEGY" != ddp ] || die "OFFLOAD=1 is DeepSpeed's optimizer CPU offload: set SHARD_STRATEGY=zero2 or zero3"
        set -- "$@" --offload_optimizer ;; *) die "OFFLOAD=$OFFLOAD must be 0 or 1" ;; esac
    [ -z "$DATA_ROOT" ] || set -- "$@" --data_root "$DATA_ROOT"
    # shellcheck disable=SC2086  # SP_ARGS and EXTRA_ARGS are lists of flags
    launch "$@" $SP_ARGS $EXTRA_ARGS
}
