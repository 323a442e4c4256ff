"""Time one training step (forward + backward) of a Pyramid Flow DiT on a small autoregressive batch.

Workload (fixed, so numbers compare across runs and machines):

* model: 6 heads x 64 (width 384), 2 double-stream + 4 single-stream blocks, text width 128, pooled width
  128, RoPE axes [16, 24, 24]: 20.3 M parameters, weights N(0, 0.02) from seed 0;
* one batch row per column, four columns shaped like the pipeline's autoregressive (temporal pyramid)
  training batch, latent frames as ``t x h x w`` (tokens are 2x2 patches):

  ====== ================== ====================================================== ========
  column stage              clips (history first, trained clip last)               tokens
  ====== ================== ====================================================== ========
  0      low                1x6x10, 1x6x10, 1x6x10                                 32 + 45
  1      mid                1x6x10, 1x12x20, 1x12x20                               32 + 135
  2      mid                1x6x10, 1x12x20, 1x12x20                               32 + 135
  3      high               3x6x10, 1x12x20, 1x24x40, 1x24x40                      32 + 585
  ====== ================== ====================================================== ========

* text: 32 tokens per row, rows padded at the end by 0, 4, 8, 12 tokens (``--padding``); timesteps uniform
  in [0, 1000);
* loss: mean squared output (its value is irrelevant; the backward pass is what costs).

``--kind pyramid_mmdit`` times the SD3 kind (``PyramidDiffusionMMDiT``) instead, at the same width and text:
4 joint blocks, sin-cos table of 64 x 64 positions, temporal RoPE over the whole head (20.2 M parameters).

Reported: median (and min) seconds per step over ``--steps`` timed steps after one warm-up, with the
process CPU time per step (steadier than wall-clock when other jobs share the cores); tokens per second
(text tokens, padding included, plus video tokens); FLOPs of one step counted by
``torch.utils.flop_counter.FlopCounterMode`` (the CPU flash-attention op is not in torch's table, so its
forward/backward get torch's SDPA formulas here) and the achieved GFLOP/s; this machine's float32 matmul
GFLOP/s (1024^3) measured in the same run; the bytes of tensors kept for backward (deduplicated by storage),
standing in for activation memory, which CPU torch cannot report.

``--compile`` also times our DiT after ``compile_blocks()`` (torch.compile) and prints its one-time compile cost and
after how many steps of the same layout it is repaid.

``--reference /path/to/Pyramid-Flow`` also times the reference implementation's class of the same kind
(imported from that checkout at run time) with the same weights and inputs, alternating steps with ours, and
prints the output difference between the two.

``--count_ops`` runs nothing for real: on meta tensors (no memory, no arithmetic) at the released size, it counts
what one micro-batch dispatches to the device for the heaviest micro-batch of a one-GPU 384p x 16-frame AR launch
(``--count_case`` to change it; the input ``tools/measure_gpu.py`` builds): attention calls (a fused kernel
each, forward and backward), device ops (aten ops on the device, views and metadata excluded: what launches
kernels) and host syncs (reads of device values on the host, and host-to-device copies that make the host wait;
``DeviceOpCounter``). Ours runs the objective (noising, on the device), forward, loss and backward; meta tensors
take the path CUDA takes. With ``--reference``, the reference's class of the same kind on the same input
(forward, loss, backward).

    python tools/benchmark_dit.py --steps 7
    python tools/benchmark_dit.py --steps 7 --reference /tmp/ref
    python tools/benchmark_dit.py --steps 7 --reference /tmp/ref --kind pyramid_mmdit
    python tools/benchmark_dit.py --count_ops --reference /tmp/ref
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]

from pyramid_dit.kinds import get_kind
from pyramid_dit.options import ATTENTION_SPLITS
from tools.reference_dit import load_reference_class

CONFIGS = {
    "pyramid_flux": dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=6,
                         joint_attention_dim=128, pooled_projection_dim=128, axes_dims_rope=[16, 24, 24]),
    "pyramid_mmdit": dict(num_layers=4, attention_head_dim=64, num_attention_heads=6, caption_projection_dim=384,
                          joint_attention_dim=128, pooled_projection_dim=128, sample_size=128, pos_embed_max_size=64,
                          pos_embed_type="sincos", temp_pos_embed_type="rope", add_temp_pos_embed=True,
                          use_temporal_causal=True, interp_condition_pos=True, use_t5_mask=True,
                          use_flash_attn=False),
}
CONFIG = CONFIGS["pyramid_flux"]
# Where the reference keeps each kind's DiT: (folder under pyramid_dit/, module, class).
COLUMNS = [
    [(1, 6, 10)] * 3,
    [(1, 6, 10), (1, 12, 20), (1, 12, 20)],
    [(1, 6, 10), (1, 12, 20), (1, 12, 20)],
    [(3, 6, 10), (1, 12, 20), (1, 24, 40), (1, 24, 40)],
]
TEXT_LEN, TEXT_PADDING = 32, (0, 4, 8, 12)


def make_inputs(device: torch.device, dtype: torch.dtype, padding: tuple[int, ...] = TEXT_PADDING) -> dict:
    g = torch.Generator().manual_seed(1)
    rows = len(COLUMNS)
    if len(padding) != rows or not all(0 <= p <= TEXT_LEN for p in padding):
        raise ValueError(f"--padding needs {rows} counts in [0, {TEXT_LEN}], got {padding}")
    mask = torch.ones(rows, TEXT_LEN, dtype=torch.int64)
    for r, pad in enumerate(padding):
        if pad:
            mask[r, TEXT_LEN - pad:] = 0
    inputs = dict(
        sample=[[torch.randn(1, 16, *shape, generator=g) for shape in col] for col in COLUMNS],
        encoder_hidden_states=torch.randn(rows, TEXT_LEN, CONFIG["joint_attention_dim"], generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(rows, CONFIG["pooled_projection_dim"], generator=g),
        timestep_ratio=torch.rand(rows, generator=g) * 1000,
    )
    cast = lambda t: t.to(device, dtype) if t.is_floating_point() and t.ndim > 1 else t.to(device)  # noqa: E731
    return {k: ([[cast(c) for c in col] for col in v] if k == "sample" else cast(v)) for k, v in inputs.items()}


def n_tokens(inputs: dict) -> int:
    video = sum(c.shape[0] * c.shape[2] * (c.shape[3] // 2) * (c.shape[4] // 2)
                for col in inputs["sample"] for c in col)
    return video + inputs["encoder_attention_mask"].numel()


def train_step(model: torch.nn.Module, inputs: dict) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    torch.stack([o.float().pow(2).mean() for o in out]).mean().backward()
    return out


def _sdpa_formulas() -> dict:
    """FLOP formulas for the CPU flash-attention ops, which torch's flop counter does not list."""
    try:
        from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count
    except ImportError:
        print("note: this torch has no SDPA flop formulas; attention FLOPs are not counted")
        return {}
    aten = torch.ops.aten
    table = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        table[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v))
        table[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda grad, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(grad, q, k, v))
    return table


def count_flops(step: Callable[[], object]) -> tuple[int, int]:
    """(total FLOPs, attention FLOPs) of one call of ``step``."""
    from torch.utils.flop_counter import FlopCounterMode

    custom = _sdpa_formulas()
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        step()
    per_op = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in per_op.items() if "scaled_dot_product" in str(op))
    return counter.get_total_flops(), attention


def saved_activation_bytes(model: torch.nn.Module, inputs: dict) -> int:
    """Bytes of distinct storages autograd keeps for backward during one step (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, inputs)
    return sum(seen.values())


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times[1:]) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ op counting

_aten = torch.ops.aten
# Ops that launch no kernel: shape / stride queries, dtype arithmetic, allocations (their memory is the caching
# allocator's, no launch), storage re-pointing. Views are recognised by their schema (``OpOverload.is_view``).
_NO_KERNEL = {_aten.sym_size.int, _aten.sym_stride.int, _aten.sym_numel.default, _aten.sym_storage_offset.default,
              _aten.is_same_size.default, _aten._has_compatible_shallow_copy_type.default,
              _aten.promote_types.default, _aten.empty.memory_format, _aten.empty_strided.default,
              _aten.new_empty.default, _aten.new_empty_strided.default, _aten.empty_like.default,
              _aten.set_.source_Storage_storage_offset, _aten._unsafe_view.default, _aten.lift_fresh.default}
# Ops whose result the host must read (a value, or a shape that depends on values): on a GPU each one waits for
# the device to finish everything queued before it.
_HOST_READS = {_aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.item.default,
               _aten.nonzero.default, _aten.masked_select.default, _aten._unique2.default,
               _aten.unique_consecutive.default, _aten.unique_dim.default, _aten.repeat_interleave.Tensor}


def _is_device(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


def host_sync(func, args: tuple, kwargs: dict) -> Optional[str]:
    """What makes the host wait for the device in this op, or ``None``: a read of a device value (``.item()``,
    ``bool(t)``, value-dependent shapes), a copy from the device to the host, or a copy from the host to the device
    that is not ``non_blocking`` (torch synchronises the stream before a pageable host-to-device copy)."""
    if func in _HOST_READS:
        return str(func) if any(_is_device(t) for t in tree_leaves((args, kwargs))) else None
    if func is _aten._to_copy.default:
        src, dst = args[0], kwargs.get("device", args[0].device)
        if src.device.type != "cpu" and torch.device(dst).type == "cpu":
            return "device-to-host copy"
        if src.device.type == "cpu" and torch.device(dst).type != "cpu" and not kwargs.get("non_blocking", False):
            return "blocking host-to-device copy"
    if func is _aten.copy_.default:
        dst, src = args[0], args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        if src.device.type != "cpu" and dst.device.type == "cpu":
            return "device-to-host copy"
        if src.device.type == "cpu" and dst.device.type != "cpu" and not non_blocking:
            return "blocking host-to-device copy"
    return None


class DeviceOpCounter(TorchDispatchMode):
    """Counts, for everything run inside it, the device ops (aten ops that launch kernels: views and metadata
    excluded), the attention calls among them (one fused kernel each, forward and backward) and the host syncs
    (:func:`host_sync`). Meant for meta tensors (shape-only: nothing runs, nothing syncs for real), where a model
    that reads a device value on the host would fail: it is counted first."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.attention: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sync = host_sync(func, args, kwargs)
        if sync is not None:
            self.syncs[sync] += 1
        if not (func.is_view or func in _NO_KERNEL):
            self.ops[func] += 1
            name = str(func)
            if "scaled_dot_product" in name or "flex_attention" in name:
                self.attention["backward" if "backward" in name else "forward"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(kind: str, case: str, reference_root: Optional[Path] = None) -> dict[str, dict]:
    """Meta-device counts of one micro-batch (see the module docstring) for ours and, with ``reference_root``,
    the reference; ``{name: {"attention": (forward, backward), "ops": n, "syncs": {...}, "blocks": n,
    "top": [(op, n), ...]}}``."""
    from pyramid_dit.objective import PyramidFlowObjective
    from pyramid_dit.text_features import TextFeatures
    from tools.measure_gpu import Case, _heaviest
    from trainer_misc.planning.planner import _loss, _objective, build_model, dit_inputs
    from trainer_misc.planning.tracing import fused_attention

    launch = Case.parse(case).launch()
    if launch.model_kind != kind:
        raise SystemExit(f"--count_case {case} is not a {kind} case")
    shapes = _heaviest(launch)
    config = launch.model_config
    blocks = config.get("num_layers", 0) + config.get("num_single_layers", 0)
    results = {}

    ours = build_model(kind, config, torch.bfloat16).train()
    objective: PyramidFlowObjective = _objective(launch)
    # The batch as the trainer has it: latents and text features on the device, the prompts' lengths on the host.
    latents = torch.empty(launch.batch_size, 16, launch.frames, launch.height // 8, launch.width // 8,
                          device="meta")
    host_text = TextFeatures(torch.empty(launch.batch_size, launch.text_tokens, config["joint_attention_dim"]),
                             torch.ones(launch.batch_size, launch.text_tokens, dtype=torch.int64),
                             torch.empty(launch.batch_size, config["pooled_projection_dim"]))
    text = host_text.to("meta", torch.bfloat16)
    heaviest_rank = next(r for r in range(max(launch.gpus, launch.video_sync_group))
                         if [[tuple(c.shape) for c in col] for col in objective.noise_latents(
                             latents, use_temporal_pyramid=launch.task == "ar", rank=r).sample] == shapes)
    with DeviceOpCounter() as counter, fused_attention():
        text, _ = objective.drop_text(text)
        step = objective.noise_latents(latents, use_temporal_pyramid=launch.task == "ar", rank=heaviest_rank)
        step.text = text
        inputs = step.dit_inputs()
        inputs = {k: ([[c.to(torch.bfloat16) for c in col] for col in v] if k == "sample" else v)
                  for k, v in inputs.items()}
        _loss(ours(**inputs)).backward()
    results["ours"] = counter

    if reference_root is not None:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("meta"):
                ref = load_reference_class(reference_root, kind)(**config)
        finally:
            torch.set_default_dtype(previous)
        ref.to("meta").train()  # buffers it builds from numpy land on the CPU whatever the device context
        with DeviceOpCounter() as counter, fused_attention():
            _loss(ref(**dit_inputs(launch, shapes, torch.bfloat16))).backward()
        results["reference"] = counter
    return {name: {"attention": (c.attention["forward"], c.attention["backward"]), "ops": c.total,
                   "syncs": dict(c.syncs), "blocks": blocks,
                   "top": [(str(op), n) for op, n in c.ops.most_common(12)]} for name, c in results.items()}


def count_step(kind: str, case: str, pack_slots: int) -> dict:
    """Meta-device counts of one optimizer step of the case's one-GPU launch with ``pack_slots`` slots of its
    virtual sync group per forward/backward pass (PACK_SLOTS): every micro-batch, every slot, through the trainer's
    loss (``PyramidFlowLoss.prepare`` on each slot, ``forward_packed`` on each pack) and one backward per pass, as
    the step runner (``trainer_misc.loop.step``) runs them; the optimizer update, the same either way, is left out.
    ``{"pack_slots", "passes", "attention": (forward, backward), "ops", "syncs", "tokens_per_pass"}``."""
    from dataclasses import replace

    from pyramid_dit.text_features import TextFeatures
    from tools.measure_gpu import Case
    from trainer_misc.data.datasets import TrainBatch
    from trainer_misc.loop.pyramid_loss import PyramidFlowLoss
    from trainer_misc.loop.step import StepContext
    from trainer_misc.planning.planner import _objective, build_model
    from trainer_misc.planning.tracing import fused_attention

    launch = Case.parse(case).launch()
    if launch.model_kind != kind:
        raise SystemExit(f"--count_case {case} is not a {kind} case")
    slots = launch.slots_per_process
    if slots % pack_slots:
        raise SystemExit(f"--pack_slots {pack_slots}: must divide the {slots} slot(s) per process of {case}")
    launch = replace(launch, pack_slots=pack_slots)
    config = launch.model_config
    model = build_model(kind, config, torch.bfloat16).train()
    loss_fn = PyramidFlowLoss(_objective(launch), use_temporal_pyramid=launch.task == "ar")
    rows = launch.batch_size
    # The batch as the trainer has it: latents and text features on the device, the prompts' lengths on the host.
    host_text = TextFeatures(torch.empty(rows, launch.text_tokens, config["joint_attention_dim"]),
                             torch.ones(rows, launch.text_tokens, dtype=torch.int64),
                             torch.empty(rows, config["pooled_projection_dim"]))
    batch = TrainBatch(captions=[""] * rows, paths=[f"clip{i}" for i in range(rows)],
                       latents=torch.empty(rows, 16, launch.frames, launch.height // 8, launch.width // 8,
                                           device="meta"),
                       text_features=host_text.to("meta", torch.bfloat16))
    passes, tokens = 0, []
    with DeviceOpCounter() as counter, fused_attention():
        for micro in range(launch.grad_accum):
            for first in range(0, slots, pack_slots):
                contexts = [StepContext(step=0, micro_step=micro, micro_index=micro, rank=0, world_size=1,
                                        sync_rank=s, sync_group=launch.video_sync_group, sync_group_index=0,
                                        device=torch.device("meta"), dtype=torch.bfloat16, module=model)
                            for s in range(first, first + pack_slots)]
                prepared = [loss_fn.prepare(model, batch, ctx) for ctx in contexts]
                losses = [loss for loss, _ in loss_fn.forward_packed(model, prepared, contexts)]
                (losses[0] if pack_slots == 1 else torch.stack(losses).mean()).backward()
                passes += 1
                tokens.append(sum(p.tokens for p in prepared))
    return {"pack_slots": pack_slots, "passes": passes, "attention": (counter.attention["forward"],
            counter.attention["backward"]), "ops": counter.total, "syncs": dict(counter.syncs),
            "tokens_per_pass": tokens}


def print_step_counts(counts: list[dict], case: str) -> None:
    print(f"meta-device counts, one optimizer step of {case} at the released size on one GPU (every slot of its "
          "virtual sync group), by slots per forward/backward pass (PACK_SLOTS):")
    print("| PACK_SLOTS | passes | attention calls (fwd + bwd) | device ops | host syncs | tokens per pass |")
    print("|---|---|---|---|---|---|")
    for c in counts:
        fwd, bwd = c["attention"]
        tokens = f"{min(c['tokens_per_pass']):,}-{max(c['tokens_per_pass']):,}"
        print(f"| {c['pack_slots']} | {c['passes']} | {fwd} + {bwd} | {c['ops']:,} | {sum(c['syncs'].values())} | "
              f"{tokens} |")
    base = counts[0]
    for c in counts[1:]:
        print(f"PACK_SLOTS={c['pack_slots']} / PACK_SLOTS={base['pack_slots']}: device ops "
              f"{c['ops'] / base['ops']:.2f}x, attention calls {sum(c['attention']) / sum(base['attention']):.2f}x")


def print_counts(counts: dict[str, dict], case: str) -> None:
    print(f"meta-device counts, one micro-batch of {case} at the released size (heaviest of a one-GPU launch):")
    print("| | attention calls (fwd + bwd) | per block | device ops | host syncs |")
    print("|---|---|---|---|---|")
    for name, c in counts.items():
        fwd, bwd = c["attention"]
        syncs = sum(c["syncs"].values())
        detail = f" ({', '.join(f'{k}: {v}' for k, v in c['syncs'].items())})" if syncs else ""
        print(f"| {name} | {fwd} + {bwd} | {fwd / c['blocks']:.1f} + {bwd / c['blocks']:.1f} | {c['ops']:,} | "
              f"{syncs}{detail} |")
    if "reference" in counts:
        print(f"device ops, ours / reference: {counts['ours']['ops'] / counts['reference']['ops']:.2f}")
    for name, c in counts.items():
        print(f"{name}, most frequent: " + ", ".join(f"{op.replace('aten.', '')} {n}" for op, n in c["top"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--reference", type=Path, help="Pyramid-Flow checkout to time its class as well")
    parser.add_argument("--kind", choices=sorted(CONFIGS), default="pyramid_flux", help="which DiT kind to time")
    parser.add_argument("--compile", action="store_true",
                        help="also time our DiT after compile_blocks() (torch.compile), with its one-time compile cost")
    parser.add_argument("--attention_split", choices=ATTENTION_SPLITS, default="auto",
                        help="our attention: auto (flex on CUDA, frame on the CPU), flex (one FlexAttention call "
                             "per block), frame (one SDPA call per frame) or column (one masked call per column)")
    parser.add_argument("--count_ops", action="store_true",
                        help="count attention calls, device ops and host syncs on meta tensors at the released "
                             "size (with --reference: the reference's too) and stop")
    parser.add_argument("--count_case", default=None,
                        help="kind:task:resolution:frames for --count_ops (tools/measure_gpu.py's form); default "
                             "the kind's :ar:384p:16")
    parser.add_argument("--pack_slots", default=None,
                        help="with --count_ops: count one whole optimizer step instead of one micro-batch, for each "
                             "of these comma-separated slots per pass (PACK_SLOTS; e.g. 1,4,8)")
    parser.add_argument("--padding", default=",".join(map(str, TEXT_PADDING)),
                        help="padding tokens at the end of each column's text row (4 comma-separated counts)")
    args = parser.parse_args(argv)

    if args.count_ops:
        case = args.count_case or f"{args.kind}:ar:384p:16"
        if args.pack_slots:
            packs = [int(k) for k in args.pack_slots.split(",")]
            print_step_counts([count_step(args.kind, case, k) for k in packs], case)
            return 0
        print_counts(count_ops(args.kind, case, args.reference), case)
        return 0
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = CONFIGS[args.kind]
    ours = get_kind(args.kind).dit()(**config)
    ours.attention_split = args.attention_split
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.02)
    models = {"ours": ours}
    if args.reference is not None:
        reference = load_reference_class(args.reference, args.kind)(**config)
        reference.load_state_dict(ours.state_dict())
        models["reference"] = reference
    if args.compile:
        compiled = get_kind(args.kind).dit()(**config)
        compiled.load_state_dict(ours.state_dict())
        compiled.attention_split = args.attention_split
        compiled.compile_blocks()
        models["compiled"] = compiled
    for m in models.values():
        m.to(device).train()
        if dtype != torch.float32:
            m.to(dtype)
    inputs = make_inputs(device, dtype, tuple(int(p) for p in args.padding.split(",")))
    tokens = n_tokens(inputs)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"device {device} ({torch.get_num_threads()} threads), {args.dtype}, torch {torch.__version__}; "
          f"attention split {args.attention_split}; "
          f"{n_params / 1e6:.1f} M parameters, {tokens} tokens per step")

    outputs, first_step = {}, 0.0
    for name, m in models.items():  # warm-up (the compiled model compiles here)
        start = time.perf_counter()
        outputs[name] = [o.detach().float() for o in train_step(m, inputs)]
        if name == "compiled":
            first_step = time.perf_counter() - start
            err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outputs[name], outputs["ours"]))
            print(f"compiled: first step (compiling) took {first_step:.1f} s; outputs vs eager {err:.2e}")
    if "reference" in outputs:
        err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outputs["ours"], outputs["reference"]))
        print(f"max |ours - reference| / max |reference| over outputs: {err:.2e}")

    times: dict[str, list[float]] = {name: [] for name in models}
    cpu_times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.steps):  # alternate models so both see the same machine load
        for name, m in models.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(m, inputs)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    mm = matmul_gflops(device, dtype)

    print(f"matmul {dtype}: {mm:.1f} GFLOP/s (1024^3, median of 10)")
    counted = {}
    for name, m in models.items():
        # Compiled kernels are not aten ops a counter can see: the compiled model does the eager model's FLOPs.
        if name != "compiled":
            counted[name] = (*count_flops(lambda: train_step(m, inputs)), saved_activation_bytes(m, inputs))
        flops, attn_flops, saved = counted["ours" if name == "compiled" else name]
        sec = statistics.median(times[name])
        kept = "" if name == "compiled" else f", {saved / 2**20:.0f} MiB kept for backward"
        print(f"{name:>9}: {sec:.3f} s/step (median of {args.steps}; min {min(times[name]):.3f}; "
              f"process CPU {statistics.median(cpu_times[name]):.3f} s), {tokens / sec:,.0f} tokens/s, "
              f"{flops / 1e9:.1f} GFLOP/step ({attn_flops / 1e9:.1f} in attention), "
              f"{flops / sec / 1e9:.1f} GFLOP/s achieved{kept}")
    for name in ("ours", "compiled"):
        if "reference" in times and name in times:
            ratio = lambda d: statistics.median(d["reference"]) / statistics.median(d[name])  # noqa: E731
            print(f"speed-up (reference / {name}, medians): {ratio(times):.2f}x wall-clock, "
                  f"{ratio(cpu_times):.2f}x process CPU time (steadier on a shared machine)")
    if "compiled" in times:
        saved = statistics.median(times["ours"]) - statistics.median(times["compiled"])
        extra = first_step - statistics.median(times["compiled"])
        print(f"compiled saves {saved:.3f} s per step of this layout; " + (
            f"its {extra:.0f} s of compiling are repaid after {extra / saved:.0f} steps with the same layout"
            if saved > 0 else "it is not faster here: leave it off"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
