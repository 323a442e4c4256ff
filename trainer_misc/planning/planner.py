"""Cost of one training step, counted without weights: FLOPs and memory per GPU of a launch.

Used by ``tools/plan.py`` and ``DRY_RUN=1``. Everything is measured by running the real DiT's forward and
backward on meta tensors (no storage, no arithmetic) with the real objective building its inputs:

* FLOPs: ``torch.utils.flop_counter.FlopCounterMode``. FLOPs are additive over blocks (every double-/single-
  stream block of a kind sees the same shapes), so models of depth 1-2 are traced and the count is extended to
  the full depth exactly (see :func:`count_flops`); tests pin the identity against a full trace and against
  real tensors.
* Memory: :class:`LiveBytes` records the bytes of every storage the step allocates and frees (autograd decides
  what is saved for backward, so activations and gradient checkpointing come out as they really are). On meta
  tensors torch would take the "math" attention path, which materialises the attention matrix; GPU training
  takes fused kernels that keep only a log-sum-exp per query, so attention is routed to the fused kernel's
  shape function (:func:`fused_attention`).
* LoRA (``Launch.lora_rank > 0``): the traced model carries the same peft adapters the trainer injects
  (``pyramid_dit.lora.add_lora``), so base weights are frozen: gradients, master weights and AdamW state are
  counted for the adapters only, and the activations are those of the adapted, frozen-base step.
* Sharding: DDP / ZeRO-2 / ZeRO-3 are not simulated on one process. The per-category bytes of the traced
  step are divided as each strategy divides them (:func:`per_gpu_bytes`); that arithmetic is stated next to
  every prediction.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any, Callable, Optional

import torch
from torch.utils._pytree import tree_leaves

from pyramid_dit.device import DTYPES
from pyramid_dit.options import TEXT_TOKENS
from trainer_misc.optim.engine import DEEPSPEED_BUCKET_ELEMENTS
from trainer_misc.planning.tracing import LiveBytes, flop_counter_mode, fused_attention
from trainer_misc.runtime.slots import pack_choices, process_slot_count

GIB = 2**30
DEPTH_KEYS = {"pyramid_flux": ("num_layers", "num_single_layers"), "pyramid_mmdit": ("num_layers",)}


# ------------------------------------------------------------------------------------------------ inputs

@dataclass(frozen=True)
class Launch:
    """What a training launch runs; mirrors the training flags."""

    model_kind: str  # pyramid_flux | pyramid_mmdit
    model_config: dict
    task: str = "ar"  # ar (temporal pyramid) | t2v (full sequence) | t2i
    width: int = 640  # pixels
    height: int = 384
    num_frames: int = 16  # latent frames (NUM_FRAMES)
    batch_size: int = 4  # per GPU
    gpus: int = 8
    shard_strategy: str = "zero2"
    dtype: str = "bf16"
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    gradient_checkpointing_ratio: float = 0.75
    video_sync_group: int = 8
    text_tokens: int = TEXT_TOKENS
    lora_rank: int = 0  # LORA_RANK; 0: full finetune
    lora_targets: tuple[str, ...] = ()  # LORA_TARGETS; empty: the kind's default (pyramid_dit/kinds.py)
    offload_optimizer: bool = False  # OFFLOAD=1 (ZeRO only)
    text_encoder: bool = False  # LOAD_TEXT_ENCODER=1: the kind's text encoders sit on every GPU
    vae: bool = False  # --load_vae (and always for t2i): the VAE sits on every GPU to encode during training
    validation: bool = False  # --validation_every > 0: rank 0 keeps a sampling DiT + VAE
    validation_offload: bool = False  # --validation_offload: ... on the CPU between validations
    ema: bool = False  # --ema_update: an fp32 average of this GPU's share of the trainable weights
    grad_reduce_dtype: str = "fp32"  # --grad_reduce_dtype: fp32 | model
    eval_samples: int = 0  # evaluation set size after the data check and EVAL_SAMPLES (0: no evaluation)
    eval_timesteps: int = 4  # EVAL_TIMESTEPS
    eval_history_depths: int = 2  # EVAL_HISTORY_DEPTHS (AR only)
    eval_every: int = 0  # EVAL_EVERY
    max_steps: int = 0  # optimizer steps of the run (for the number of evaluations)
    pack_slots: int = 1  # PACK_SLOTS: slots of a virtual sync group per forward/backward pass (divides the slots)

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank and self.shard_strategy == "zero3":
            raise ValueError("LoRA (LORA_RANK, --lora_rank) with zero3 is refused by the trainer; plan it with "
                             "ddp or zero2 (SHARD_STRATEGY, --shard_strategy)")
        if self.offload_optimizer and self.shard_strategy == "ddp":
            raise ValueError("optimizer offload (OFFLOAD=1, --offload_optimizer) is DeepSpeed's: plan it with zero2 or "
                             "zero3 (SHARD_STRATEGY, --shard_strategy)")
        if self.grad_reduce_dtype not in ("fp32", "model"):
            raise ValueError(f"grad_reduce_dtype must be fp32 or model, got {self.grad_reduce_dtype!r}")
        if self.pack_slots < 1 or self.slots_per_process % self.pack_slots:
            raise ValueError(f"pack_slots {self.pack_slots} must divide the {self.slots_per_process} slot(s) each "
                             "process trains per micro-batch")

    @property
    def slots_per_process(self) -> int:
        """Slots each process trains per micro-batch: VIDEO_SYNC_GROUP / GPUs for a virtual AR group, else 1."""
        return process_slot_count(self.video_sync_group, self.gpus) if self.task == "ar" else 1

    @property
    def frames(self) -> int:
        return 1 if self.task == "t2i" else self.num_frames


def build_model(kind: str, config: dict, dtype: torch.dtype = torch.bfloat16, lora_rank: int = 0,
                lora_targets: tuple[str, ...] = (), device: torch.device | str = "meta") -> torch.nn.Module:
    """The DiT of ``kind`` with ``config`` on ``device`` (default meta: no memory), in ``dtype``; with
    ``lora_rank`` > 0 carrying the trainer's adapters (base frozen), built in the same dtype."""
    if kind == "pyramid_flux":
        from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer as cls
    elif kind == "pyramid_mmdit":
        from pyramid_dit.modeling_pyramid_mmdit import PyramidDiffusionMMDiT as cls
    else:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(DEPTH_KEYS)}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
            if lora_rank:
                from pyramid_dit.kinds import get_kind
                from pyramid_dit.lora import LoraSettings, add_lora

                targets = tuple(lora_targets) or get_kind(kind).lora_targets
                add_lora(model, LoraSettings(lora_rank, float(lora_rank), targets))
            return model
    finally:
        torch.set_default_dtype(previous)


def _objective(launch: Launch):
    from pyramid_dit.objective import PyramidFlowObjective
    from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler
    scheduler = PyramidFlowMatchEulerDiscreteScheduler(shift=1.0, stages=3, stage_range=(0, 1 / 3, 2 / 3, 1))
    group = launch.video_sync_group if launch.task == "ar" else 1
    return PyramidFlowObjective(scheduler, launch.model_kind, max_temporal_length=launch.frames,
                                video_sync_group=group, text_drop_rate=0.0)


def clip_shapes(launch: Launch, rank: int = 0, micro_step: int = 0) -> list[list[tuple[int, ...]]]:
    """Per column, the clip shapes the DiT gets on ``rank`` at ``micro_step``, built by the real objective."""
    latents = torch.empty(launch.batch_size, 16, launch.frames, launch.height // 8, launch.width // 8,
                          device="meta")
    step = _objective(launch).noise_latents(latents, use_temporal_pyramid=launch.task == "ar", rank=rank,
                                            step=micro_step)
    return [[tuple(c.shape) for c in col] for col in step.sample]


def dit_inputs(launch: Launch, shapes: list[list[tuple[int, ...]]], dtype: torch.dtype,
               device: str = "meta") -> dict[str, Any]:
    """DiT keyword inputs of the given clip shapes; every text token valid (the most a prompt can cost)."""
    rows = shapes[0][-1][0] * len(shapes)
    cfg = launch.model_config
    return dict(
        sample=[[torch.empty(s, dtype=dtype, device=device) for s in col] for col in shapes],
        encoder_hidden_states=torch.empty(rows, launch.text_tokens, cfg["joint_attention_dim"], dtype=dtype,
                                          device=device),
        encoder_attention_mask=torch.ones(rows, launch.text_tokens, dtype=torch.int64, device=device),
        pooled_projections=torch.empty(rows, cfg["pooled_projection_dim"], dtype=dtype, device=device),
        timestep_ratio=torch.empty(rows, dtype=torch.float32, device=device),
    )


def _loss(outputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([o.float().pow(2).mean() for o in outputs]).sum()


def rank_shapes(launch: Launch) -> list[list[list[tuple[int, ...]]]]:
    """Clip shapes of every forward/backward pass of the launch's first optimizer step, on every process."""
    # Without AR every rank sees the same shapes. With AR a sync group larger than the GPU count is virtual:
    # each process trains several slots of the clip one after the other, so every slot is one pass; with
    # PACK_SLOTS = k, k consecutive slots of a process (it owns a contiguous run of them) share one pass, their
    # columns joined (pyramid_dit.objective.PyramidTrainingBatch.cat).
    ranks = max(launch.gpus, launch.video_sync_group) if launch.task == "ar" else 1
    k = launch.pack_slots
    return [[col for r in range(first, first + k) for col in clip_shapes(launch, r, s)]
            for first in range(0, ranks, k) for s in range(launch.grad_accum)]


def _tokens(shapes: list[list[tuple[int, ...]]], patch: int = 2) -> int:
    return sum(s[0] * s[2] * (s[3] // patch) * (s[4] // patch) for col in shapes for s in col)


# ------------------------------------------------------------------------------------------------ counting

def _trace_flops(launch: Launch, config: dict, shapes, backward: bool = True) -> int:
    model = build_model(launch.model_kind, config, torch.bfloat16, launch.lora_rank, launch.lora_targets)
    with flop_counter_mode() as counter, fused_attention():
        if backward:
            _loss(model(**dit_inputs(launch, shapes, torch.bfloat16))).backward()
        else:
            with torch.no_grad():
                model(**dit_inputs(launch, shapes, torch.bfloat16))
    return counter.get_total_flops()


def count_flops(launch: Launch, shapes, backward: bool = True) -> int:
    """Forward + backward (``backward=False``: forward only) FLOPs of one micro-batch of ``shapes`` (no recompute),
    exact at full depth.

    Every block of a kind sees the same shapes, so ``F(depths) = F(1, ..) + sum_k (depth_k - 1) * delta_k``,
    where ``delta_k`` is what one more block of kind ``k`` adds; the first and last blocks (which some kinds
    treat specially) are in ``F(1, ..)``. Three (flux) or two (SD3) shallow traces replace a full-depth one.
    """
    keys = DEPTH_KEYS[launch.model_kind]
    shallow = {**launch.model_config, **{k: 1 for k in keys}, "use_gradient_checkpointing": False}
    base = _trace_flops(launch, shallow, shapes, backward)
    total = base
    for k in keys:
        depth = launch.model_config[k]
        if depth > 1:
            total += (depth - 1) * (_trace_flops(launch, {**shallow, k: 2}, shapes, backward) - base)
    return total


def eval_call_shapes(launch: Launch) -> list[list[list[tuple[int, ...]]]]:
    """Per DiT call of one evaluation sample, the clip shapes of each column, built by the objective's own
    evaluation path (``PyramidFlowObjective.eval_columns``) on meta latents."""
    objective = _objective(launch)
    latents = torch.empty(1, 16, launch.frames, launch.height // 8, launch.width // 8, device="meta")
    units = objective.history_grid(launch.eval_history_depths, launch.frames) if launch.task == "ar" else [None]
    indices = objective.timestep_grid(launch.eval_timesteps)
    generator = torch.Generator().manual_seed(0)
    return [[[tuple(c.shape) for c in col] for col in
             objective.eval_columns(latents, timestep_indices=indices, units=u, generator=generator).sample]
            for u in units]


def eval_flops_per_sample(launch: Launch, calls: Optional[list] = None) -> int:
    """Forward FLOPs of one evaluation sample: every call of its grid (stages x timesteps x depths rows);
    ``calls``: :func:`eval_call_shapes` of ``launch``, when the caller has them already."""
    calls = eval_call_shapes(launch) if calls is None else calls
    return sum(count_flops(launch, call, backward=False) for call in calls)


@dataclass
class TracedMemory:
    """Bytes of one micro-batch's forward + backward on one GPU, before sharding."""

    param_bytes: int
    grad_bytes: int  # gradients as produced by backward (model dtype)
    activation_bytes: int  # peak of everything else alive: saved activations, temporaries, inputs
    buffer_bytes: int = 0  # the model's buffers (SD3's fixed sin-cos position table): whole on every GPU
    attention_calls: int = 0  # attention kernels the pass launched, forward and backward together


def _build(launch: Launch, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    return build_model(launch.model_kind, launch.model_config, dtype, launch.lora_rank, launch.lora_targets)


def trace_memory(launch: Launch, shapes, dtype: torch.dtype) -> TracedMemory:
    model = _build(launch, dtype)
    model.train()
    if launch.gradient_checkpointing:
        model.enable_gradient_checkpointing(launch.gradient_checkpointing_ratio)
    params = list(model.parameters())
    tracker = LiveBytes(params)
    try:
        with tracker, fused_attention():
            _loss(model(**dit_inputs(launch, shapes, dtype))).backward()
    finally:
        tracker.close()
    grad_bytes = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
    return TracedMemory(param_bytes=sum(p.numel() * p.element_size() for p in params), grad_bytes=grad_bytes,
                        activation_bytes=tracker.peak_act,
                        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
                        attention_calls=tracker.attention_calls)


# ------------------------------------------------------------------------------------------------ sharding

def _reduce_bytes(launch: Launch) -> int:
    """Bytes per gradient element in the reduction (``--grad_reduce_dtype``: fp32 by default)."""
    return 4 if launch.grad_reduce_dtype == "fp32" or launch.dtype == "fp32" else 2


def per_gpu_bytes(launch: Launch, n_params: int, n_trainable: int, traced: TracedMemory) -> dict[str, int]:
    """Per-GPU bytes of the training state by category after the strategy's sharding (arithmetic, stated in
    :data:`SHARDING_NOTE`): params, grads, optimizer, ema, comm_buffers, activations."""
    n = launch.gpus
    mixed = launch.dtype != "fp32"
    ema = math.ceil(4 * n_trainable / n) if launch.ema else 0  # fp32 average of this rank's share (ShardedEMA)
    if launch.shard_strategy == "ddp":
        # DDP keeps fp32 parameters and gradients on every GPU and autocasts the forward; AdamW: 2 fp32 states.
        # Autocast caches a low-precision copy of each trainable weight for the step (torch caches only leaves
        # that require grad: frozen LoRA base weights are recast per use, not kept). DDP's own reduce buckets are
        # views of the gradients (gradient_as_bucket_view).
        return {"params": 4 * n_params + traced.buffer_bytes, "grads": 4 * n_trainable, "optimizer": 8 * n_trainable,
                "ema": ema, "comm_buffers": 0,
                "activations": traced.activation_bytes + (2 * n_trainable if mixed else 0)}
    # DeepSpeed ZeRO: model-dtype parameters; fp32 master weights + 2 fp32 Adam states, split over the GPUs;
    # gradients reduced / accumulated in fp32 (engine's default) into this GPU's partition. The reduction goes
    # through DEEPSPEED_BUCKET_ELEMENTS-element buffers, two of them with overlap_comm (on for GPUs; DeepSpeed's
    # stage_1_and_2.setup_buckets allocates them).
    p_bytes = traced.param_bytes + traced.buffer_bytes
    master = 4 * n_trainable if mixed else 0
    grads = math.ceil(4 * n_trainable / n)
    buffers = 2 * _reduce_bytes(launch) * min(DEEPSPEED_BUCKET_ELEMENTS, n_trainable)
    params = p_bytes
    optimizer = math.ceil((master + 8 * n_trainable) / n)
    if launch.offload_optimizer:
        # ZeRO-Offload: master weights, AdamW state, the fp32 gradient partition (and so the EMA) live in host
        # memory; the GPU keeps the reduce buffers.
        optimizer, grads, ema = 0, 0, 0
    if launch.shard_strategy == "zero3":
        elem = traced.param_bytes // max(n_params, 1)
        params = (math.ceil(traced.param_bytes / n) + traced.buffer_bytes
                  + elem * min(DEEPSPEED_BUCKET_ELEMENTS, n_params))  # + prefetched blocks
    return {"params": params, "grads": grads, "optimizer": optimizer, "ema": ema, "comm_buffers": buffers,
            "activations": traced.activation_bytes}


SHARDING_NOTE = {
    "ddp": "DDP: fp32 params, grads and AdamW state on every GPU; activations traced (+ autocast copies of the "
           "trainable weights)",
    "zero2": "ZeRO-2 arithmetic: params in model dtype on every GPU; fp32 grads, master weights and AdamW state "
             "divided by the GPU count (+ two reduce buffers); activations traced",
    "zero3": "ZeRO-3 arithmetic: params, fp32 grads, master weights and AdamW state divided by the GPU count "
             "(+ one prefetch bucket of gathered params and two reduce buffers); activations traced",
}


# ------------------------------------------------------------------------------------------------ what else is resident

# Margins for what no trace sees, stated as such (not measured here): the CUDA context with cuBLAS / cuDNN
# workspaces lives outside torch's allocator (0.5-1 GiB per process on recent GPUs; counted as 1 GiB); NCCL's
# buffers for the process groups of a multi-GPU launch (counted as 0.5 GiB); and the caching allocator's
# fragmentation, counted as a fraction of the allocated peak. tools/gpu_check.sh measures the last on a GPU.
CUDA_CONTEXT_BYTES = GIB
NCCL_BYTES = GIB // 2
FRAGMENTATION = 0.10


@lru_cache(maxsize=None)
def text_encoder_params(model_kind: str) -> int:
    """Parameters of the kind's released text encoders, counted on the meta device from their configurations."""
    import transformers

    from pyramid_dit.kinds import get_kind

    kind = get_kind(model_kind)
    classes = kind.text_encoder().subfolders
    total = 0
    for name, config in kind.text_encoder_configs.items():
        cls = getattr(transformers, classes[name].split()[0])
        with torch.device("meta"):
            total += sum(p.numel() for p in cls(cls.config_class(**config)).parameters())
    return total


@lru_cache(maxsize=None)
def vae_params() -> int:
    """Parameters of the released causal video VAE, counted on the meta device."""
    from pyramid_dit.kinds import VAE_CONFIG
    from video_vae.modeling_causal_vae import CausalVideoVAE

    with torch.device("meta"):
        return sum(p.numel() for p in CausalVideoVAE(**VAE_CONFIG).parameters())


def resident_model_bytes(launch: Launch, n_params: int, buffer_bytes: int) -> dict[str, int]:
    """Frozen models the launch keeps on the GPU besides the trained DiT, in the run's dtype: the text encoders
    (``LOAD_TEXT_ENCODER=1``) and the VAE (``--load_vae``, t2i) on every GPU; rank 0's validation DiT + VAE
    (``--validation_every`` without ``--validation_offload``). Their no-grad forwards' transients are not
    counted (they end before the DiT's step)."""
    elem = _ELEMENT_BYTES[launch.dtype]
    encoders = (text_encoder_params(launch.model_kind) * elem if launch.text_encoder else 0) + \
        (vae_params() * elem if launch.vae or launch.task == "t2i" else 0)
    validation = (n_params * elem + buffer_bytes + vae_params() * elem
                  if launch.validation and not launch.validation_offload else 0)
    return {"encoders": encoders, "validation": validation}


def runtime_bytes(launch: Launch, allocated: int) -> dict[str, int]:
    """The margins above, for a launch whose torch allocator peaks at ``allocated`` bytes."""
    return {"cuda_context": CUDA_CONTEXT_BYTES, "nccl": NCCL_BYTES if launch.gpus > 1 else 0,
            "fragmentation": int(FRAGMENTATION * allocated)}


_ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


# ------------------------------------------------------------------------------------------------ bytes that move

def micro_batches_per_step(launch: Launch) -> int:
    """Forward/backward passes per optimizer step on each GPU: GRAD_ACCU_STEPS, times the slots each process
    trains when an AR sync group is virtual (larger than the process count), over the slots per pass."""
    return launch.grad_accum * launch.slots_per_process // launch.pack_slots


def comm_bytes_per_step(launch: Launch, n_params: int, n_trainable: int) -> dict[str, int]:
    """Bytes each GPU sends per optimizer step for data parallelism (ring collectives: ``(n-1)/n`` of the buffer
    per reduce-scatter or all-gather, twice that per all-reduce). Sequence-parallel all-to-alls and the AR sync
    group's few host bytes are not counted.

    * DDP: one all-reduce of the gradients per optimizer step (accumulation runs without sync).
    * ZeRO-2: a reduce-scatter of the gradients in every micro-batch (DeepSpeed reduces as backward produces them),
      then an all-gather of the updated model-dtype weights.
    * ZeRO-3: per micro-batch, the weights all-gathered for forward and again for backward (and for the
      recomputed blocks with gradient checkpointing) and the gradients reduce-scattered.
    """
    n = launch.gpus
    if n == 1:
        return {"gradients": 0, "weights": 0}
    ring = (n - 1) / n
    grad = n_trainable * _reduce_bytes(launch)
    weight = n_trainable * _ELEMENT_BYTES[launch.dtype]
    micro = micro_batches_per_step(launch)
    if launch.shard_strategy == "ddp":
        return {"gradients": int(2 * ring * grad), "weights": 0}
    if launch.shard_strategy == "zero2":
        return {"gradients": int(micro * ring * grad), "weights": int(ring * weight)}
    gathers = 2 + (launch.gradient_checkpointing_ratio if launch.gradient_checkpointing else 0)
    return {"gradients": int(micro * ring * grad),
            "weights": int(micro * gathers * ring * n_params * _ELEMENT_BYTES[launch.dtype])}


def checkpoint_bytes(launch: Launch, n_trainable: int) -> int:
    """Bytes each process writes per checkpoint: its share of the fp32 master weights and both AdamW moments (and
    the EMA) -- what ``save_checkpoint`` writes under every strategy."""
    return 4 * (3 + launch.ema) * math.ceil(n_trainable / launch.gpus)


# ------------------------------------------------------------------------------------------------ the plan

def model_size(launch: Launch) -> tuple[int, int]:
    """(parameters, trainable parameters) of the launch's DiT (with LoRA: the adapters are the trainable ones)."""
    model = _build(launch)
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def memory_parts(launch: Launch, n_params: int, n_trainable: int, traced: TracedMemory) -> dict[str, int]:
    """Everything one GPU holds at the step's peak, by category: the training state (:func:`per_gpu_bytes`), the
    frozen models resident beside it (:func:`resident_model_bytes`) and the runtime margins (:func:`runtime_bytes`)."""
    parts = per_gpu_bytes(launch, n_params, n_trainable, traced)
    parts.update(resident_model_bytes(launch, n_params, traced.buffer_bytes))
    parts.update(runtime_bytes(launch, sum(parts.values())))
    return parts


def trace_heaviest_pass(launch: Launch) -> tuple[TracedMemory, int]:
    """The trace of the pass with the most tokens (the one that sets the peak), and that token count."""
    dtype = DTYPES[launch.dtype]
    heaviest = max(rank_shapes(launch), key=_tokens)
    return trace_memory(launch, heaviest, dtype), _tokens(heaviest)


def predict_memory(launch: Launch) -> tuple[dict[str, int], int]:
    """:func:`memory_parts` for the rank with the most tokens, and that token count."""
    traced, tokens = trace_heaviest_pass(launch)
    n_params, n_trainable = model_size(launch)
    return memory_parts(launch, n_params, n_trainable, traced), tokens


def packed_peak_bytes(launch: Launch, pack_slots: int) -> int:
    """Predicted peak bytes per GPU of ``launch`` with ``pack_slots`` slots per pass (what ``PACK_SLOTS=auto``
    compares with the GPU's memory)."""
    return sum(predict_memory(replace(launch, pack_slots=pack_slots))[0].values())


def choose_pack_slots(slots_per_process: int, gpu_bytes: int, peak: Callable[[int], int]
                      ) -> tuple[int, dict[int, int]]:
    """``PACK_SLOTS=auto``: the largest divisor of ``slots_per_process`` whose predicted peak ``peak(k)`` fits in
    ``gpu_bytes``, else 1 (one slot per pass is the least a step can hold); and the peaks predicted, by slots per
    pass. Largest first, stopping at the first that fits: each prediction is a trace of the packed pass.

    Why the largest: the packed passes run the same arithmetic in fewer, bigger kernels, and the only cost is the
    pack's activations held at once.
    """
    peaks: dict[int, int] = {}
    for k in reversed(pack_choices(slots_per_process)):
        peaks[k] = peak(k)
        if peaks[k] <= gpu_bytes:
            return k, peaks
    return 1, peaks


def flops_per_step(launch: Launch) -> int:
    """Forward + backward FLOPs of all GPUs' micro-batches of optimizer step 1 (no recompute).

    FLOPs are additive over columns too (attention never crosses columns; every other op is per token or per
    row), so the columns of all ranks and micro-batches are traced together in one forward call.
    """
    all_columns = [col for shapes in rank_shapes(launch) for col in shapes]
    return count_flops(launch, all_columns) * (1 if launch.task == "ar" else launch.gpus)


def pass_counts(launch: Launch, traced: TracedMemory) -> dict[str, Any]:
    """Forward/backward passes per optimizer step on each GPU and the attention kernels they launch (the heaviest
    pass's count times the passes: under FlexAttention, CUDA's path, every pass launches one call per block each
    way), with PACK_SLOTS as launched and, when it packs, one slot per pass: what packing saves, and what it
    costs (the activations of the packed pass against one slot's; ``traced`` is the launch's heaviest pass)."""
    passes = micro_batches_per_step(launch)
    out: dict[str, Any] = {"pack_slots": launch.pack_slots, "slots_per_process": launch.slots_per_process,
                           "per_step": passes, "attention_calls_per_step": traced.attention_calls * passes,
                           "activation_bytes": traced.activation_bytes}
    if launch.pack_slots > 1:
        single = replace(launch, pack_slots=1)
        one, tokens = trace_heaviest_pass(single)
        out["unpacked"] = {"per_step": micro_batches_per_step(single),
                           "attention_calls_per_step": one.attention_calls * micro_batches_per_step(single),
                           "activation_bytes": one.activation_bytes, "max_tokens": tokens}
    return out


def plan(launch: Launch, gpu_memory_gib: float, interconnect_gbps: Optional[float] = None) -> dict[str, Any]:
    """FLOPs per optimizer step, predicted peak memory per GPU and whether it fits, bytes sent per step and written
    per checkpoint; see module docstring. ``interconnect_gbps``: each GPU's network bandwidth in Gbit/s, to turn the
    bytes sent into seconds."""
    n_params, n_trainable = model_size(launch)
    traced, tokens = trace_heaviest_pass(launch)
    parts = memory_parts(launch, n_params, n_trainable, traced)
    peak = sum(parts.values())
    lora = (f"; LoRA rank {launch.lora_rank}: grads, master weights and AdamW state of the "
            f"{n_trainable:,} adapter parameters only" if launch.lora_rank else "")
    if launch.offload_optimizer:
        lora += (f"; OFFLOAD=1: master weights, AdamW state and fp32 gradient partition in host memory "
                 f"({math.ceil(16 * n_trainable / launch.gpus) / GIB:.1f} GiB of CPU RAM per process), GPU keeps "
                 "the reduce buffers")
    comm = comm_bytes_per_step(launch, n_params, n_trainable)
    sent = sum(comm.values())
    result: dict[str, Any] = {
        "launch": {k: v for k, v in asdict(launch).items() if k != "model_config"},
        "params": n_params,
        "trainable_params": n_trainable,
        "flops_per_step": flops_per_step(launch),
        "flops_per_step_note": f"forward+backward of the {launch.gpus} GPU(s) x {micro_batches_per_step(launch)} "
                               "pass(es) of optimizer step 1; FlopCounterMode on meta tensors, 2 FLOPs per "
                               "multiply-add; gradient-checkpointing recompute not included",
        "max_tokens_per_gpu": tokens,
        "passes": pass_counts(launch, traced),
        "peak_gib_per_gpu": round(peak / GIB, 2),
        "peak_breakdown_gib": {k: round(v / GIB, 2) for k, v in parts.items()},
        "peak_breakdown_bytes": parts,
        "sharding": SHARDING_NOTE[launch.shard_strategy] + lora,
        "gpu_memory_gib": gpu_memory_gib,
        "fits": peak <= gpu_memory_gib * GIB,
        "comm_bytes_per_step": comm,
        "comm_note": "bytes each GPU sends per optimizer step for data parallelism (ring collectives; "
                     f"gradients reduced in {'fp32' if _reduce_bytes(launch) == 4 else launch.dtype})",
        "checkpoint_bytes_per_process": checkpoint_bytes(launch, n_trainable),
        "checkpoint_bytes_total": checkpoint_bytes(launch, n_trainable) * launch.gpus,
        "prediction": "PREDICTION from CPU tracing (meta tensors); the activation part was 10-16% above what one "
                      "H200 measured for both released kinds (tools/measure_gpu.py); CUDA context, NCCL and "
                      "allocator fragmentation are margins (trainer_misc/planning/planner.py), not measurements",
    }
    if interconnect_gbps:
        seconds = sent / (interconnect_gbps * 1e9 / 8)
        result["interconnect_gbps"] = interconnect_gbps
        result["comm_seconds_per_step"] = round(seconds, 3)
        if launch.grad_reduce_dtype == "fp32" and launch.dtype != "fp32":
            halved = replace(launch, grad_reduce_dtype="model")
            result["comm_seconds_per_step_model_dtype"] = round(
                sum(comm_bytes_per_step(halved, n_params, n_trainable).values()) / (interconnect_gbps * 1e9 / 8), 3)
    if launch.eval_samples:
        result.update(eval_cost(launch, result["flops_per_step"]))
    if not result["fits"]:
        result["cheapest_fix"] = cheapest_fix(launch, gpu_memory_gib)
    return result


def eval_cost(launch: Launch, flops_per_step: int) -> dict[str, Any]:
    """The held-out evaluation's FLOPs: per sample, per evaluation, and over the run next to its training."""
    from trainer_misc.loop.evaluation import evaluation_steps

    calls = eval_call_shapes(launch)
    per_sample = eval_flops_per_sample(launch, calls)
    rows = sum(len(call) * call[0][-1][0] for call in calls)
    evaluations = len(evaluation_steps(0, launch.max_steps, launch.eval_every, None)) if launch.max_steps else 1
    per_eval = per_sample * launch.eval_samples
    training = flops_per_step * launch.max_steps
    return {"eval_samples": launch.eval_samples, "eval_flops_per_sample": per_sample, "eval_flops": per_eval,
            "eval_rows_per_sample": rows,
            "eval_calls_per_sample": len(calls), "evaluations": evaluations,
            "eval_share_of_run": per_eval * evaluations / training if training else None}


def cheapest_fix(launch: Launch, gpu_memory_gib: float) -> Optional[str]:
    """The first change, cheapest first, whose plan fits: validation offload, pre-extracted text features, ZeRO-2
    for LoRA, gradient checkpointing, optimizer offload, zero3, fewer frames, more GPUs."""
    candidates: list[tuple[str, Launch]] = []
    if launch.validation and not launch.validation_offload:
        candidates.append(("EXTRA_ARGS=--validation_offload (rank 0's sampling DiT and VAE on the CPU between "
                           "validations)", replace(launch, validation_offload=True)))
    if launch.text_encoder:
        candidates.append(("LOAD_TEXT_ENCODER=0 with text features extracted beforehand "
                           "(scripts/extract_text_feature.sh): the text encoders leave the GPUs",
                           replace(launch, text_encoder=False)))
    if launch.lora_rank and launch.shard_strategy == "ddp" and launch.dtype != "fp32":
        # DDP keeps the frozen base in fp32; ZeRO-2 (on any process count) keeps it in the model dtype.
        candidates.append(("SHARD_STRATEGY=zero2 (frozen base weights in bf16 instead of fp32)",
                           replace(launch, shard_strategy="zero2")))
    if not launch.gradient_checkpointing:
        candidates.append(("turn on gradient checkpointing (GRADIENT_CHECKPOINTING=1)",
                           replace(launch, gradient_checkpointing=True)))
    base = replace(launch, gradient_checkpointing=True)
    if launch.shard_strategy != "ddp" and not launch.offload_optimizer:
        candidates.append(("gradient checkpointing + OFFLOAD=1 (optimizer state in host memory, slower steps)",
                           replace(base, offload_optimizer=True)))
    zero3 = not launch.lora_rank  # the trainer refuses LoRA under zero3
    if zero3 and launch.shard_strategy != "zero3" and launch.gpus > 1:
        candidates.append(("gradient checkpointing + SHARD_STRATEGY=zero3", replace(base, shard_strategy="zero3")))
    if launch.task != "t2i" and launch.num_frames > 1:
        half = max(launch.num_frames // 2, 1)
        candidates.append((f"gradient checkpointing + NUM_FRAMES={half}", replace(base, num_frames=half)))
    for more in (launch.gpus * 2, launch.gpus * 4) if zero3 else ():
        candidates.append((f"gradient checkpointing + zero3 on {more} GPUs",
                           replace(base, shard_strategy="zero3", gpus=more)))
    for text, option in candidates:
        try:
            if sum(predict_memory(option)[0].values()) <= gpu_memory_gib * GIB:
                return text
        except ValueError:
            continue
    return None


# ------------------------------------------------------------------------------------------------ validation

def measure_step(launch: Launch, seed: int = 0) -> dict[str, dict[str, int]]:
    """Predicted vs live bytes of one real fp32 training step (forward, backward, AdamW) on the CPU.

    The prediction is this module's (meta tensors, :class:`LiveBytes`, fused-attention routing, 1-GPU DDP
    arithmetic). The measurement is torch's own ``MemTracker`` on real tensors: parameters, gradients and
    optimizer state after the step, and activations (+ temporaries) at the higher of the forward and backward
    peaks. Use small configs: the real step allocates everything.
    """
    from torch.distributed._tools.mem_tracker import MemTracker, _ModState

    if launch.dtype != "fp32" or launch.gpus != 1 or launch.shard_strategy != "ddp":
        raise ValueError("measure a single-process fp32 'ddp' launch (what runs on this CPU)")
    if launch.lora_rank:
        raise ValueError("measure a full finetune: torch's MemTracker registers a gradient hook on every parameter "
                         "and fails on LoRA's frozen base weights")
    shapes = max(rank_shapes(launch), key=_tokens)
    n_params, n_trainable = model_size(launch)
    predicted = per_gpu_bytes(launch, n_params, n_trainable, trace_memory(launch, shapes, torch.float32))
    del predicted["grads"]  # compared below only through the total

    torch.manual_seed(seed)
    model = build_model(launch.model_kind, launch.model_config, torch.float32).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.train()
    if launch.gradient_checkpointing:
        model.enable_gradient_checkpointing(launch.gradient_checkpointing_ratio)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        inputs = dit_inputs(launch, shapes, torch.float32, device="cpu")
        for t in tree_leaves(inputs):
            if t.is_floating_point():
                t.normal_()
        _loss(model(**inputs)).backward()
        optimizer.step()
    cpu = torch.device("cpu")
    snaps = tracker.memory_tracking[model].snapshots
    act = max(snap[cpu][_kind("ACT")] + snap[cpu][_kind("TEMP")]
        for state in (_ModState.PEAK_FW, _ModState.PEAK_BW) for snap in snaps[state])
    after = tracker.get_tracker_snapshot("current")[cpu]
    measured = {"params": after[_kind("PARAM")], "optimizer": after[_kind("OPT")], "activations": act}
    return {"predicted": predicted, "measured": measured}


def _kind(name: str):
    from torch.distributed._tools.mem_tracker import _MemRefType
    return getattr(_MemRefType, name)
