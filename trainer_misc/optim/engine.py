"""The accelerate ``Accelerator`` for ``ddp | zero2 | zero3``, on CUDA or CPU, and the few engine-specific steps.

``TrainEngine`` hides what differs between plain DDP and DeepSpeed ZeRO behind one small interface (accumulate,
backward, step, learning rate, state save/load, full state dict, sharding report), so the training loop is written
once.

Facts this relies on (measured on CPU with torch 2.13, accelerate 1.15, DeepSpeed 0.19; several setups *silently*
fall back, so ``build_accelerator`` checks the result and raises instead):

* ``zero2`` / ``zero3`` use accelerate's ``DeepSpeedPlugin``. On CPU they need ``InitProcessGroupKwargs(
  backend="gloo")`` and must not run with ``ACCELERATE_USE_CPU`` (that turns DeepSpeed into DDP). Without the gloo
  backend accelerate reports one process while DeepSpeed runs two.
* ``ddp`` on CPU needs accelerate's ``cpu=True``; otherwise every rank trains alone.
* DeepSpeed only starts under a launcher environment; a plain ``python train.py`` gets a one-rank one.
* With DeepSpeed, ``accelerator.backward`` also runs the optimizer step at the accumulation boundary (clipping is
  DeepSpeed's ``gradient_clipping``), and bf16/fp16 cast the model itself (floating buffers included), so inputs
  must be cast to ``TrainEngine.param_dtype``; DeepSpeed keeps fp32 master weights in the optimizer. With DDP,
  parameters stay fp32 and accelerate autocasts the forward.
* DDP and DeepSpeed (ZeRO-2 and ZeRO-3) broadcast rank 0's initial weights when the model is prepared.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from pyramid_dit.device import resolve_device
from trainer_misc.runtime.distributed import backend_for_device, collective_timeout, ensure_launcher_env

logger = logging.getLogger(__name__)

__all__ = ["EngineConfig", "StepOutcome", "TrainEngine", "build_accelerator", "deepspeed_config", "PRECISIONS",
           "STRATEGIES", "GRAD_REDUCE_DTYPES", "model_init_context", "reset_accelerate_state"]

STRATEGIES = ("ddp", "zero2", "zero3")
PRECISIONS = ("bf16", "fp16", "fp32")
GRAD_REDUCE_DTYPES = ("fp32", "model")
# DeepSpeed's gradient-reduction and all-gather buckets, in elements. DeepSpeed's default (5e8) holds 2 GB per
# bucket in fp32 reduction, twice over with overlap_comm on GPU; 5e7 (200 MB in fp32) still exceeds the largest
# tensor of the released DiT (a single block's proj_out, 9600 x 1920 = 18.4 M) and is large enough for NCCL to
# run near full bandwidth; smaller buckets mean more, smaller collectives.
DEEPSPEED_BUCKET_ELEMENTS = 50_000_000


@dataclass(frozen=True)
class EngineConfig:
    """How to run: sharding strategy, precision, device, accumulation and clipping.

    ``micro_batch_size`` is the per-rank batch size; DeepSpeed wants it in its config even though we feed the data.
    ``max_grad_norm`` None or 0 disables clipping (the gradient norm is still measured and reported).
    ``grad_reduce_dtype``: ``fp32`` reduces gradients across ranks and accumulates them over micro-batches in fp32
    (bf16 has 8 mantissa bits: summing 8+ ranks or several micro-batches in it loses the small contributions);
    ``model`` does both in the training dtype (DeepSpeed's default, what the reference's FSDP bf16 policy does):
    half the gradient traffic, less exact. DDP always accumulates in fp32 (its parameters are fp32); ``model``
    makes it reduce in bf16/fp16 through a compression hook.
    ``offload_optimizer`` (``OFFLOAD=1``, ZeRO only): DeepSpeed keeps the fp32 master weights, gradient partition and
    AdamW state in CPU memory and runs the update there with DeepSpeed's CPU Adam (``optim.build_adamw``); the GPU
    keeps the model-dtype weights, activations and a reduce bucket. Costs host memory (16 bytes per trainable
    parameter, divided by the GPU count) and a PCIe round trip plus a CPU AdamW per step.
    """

    strategy: str = "ddp"
    mixed_precision: str = "bf16"
    device: str = "auto"
    grad_accum_steps: int = 1
    max_grad_norm: Optional[float] = 1.0
    micro_batch_size: int = 1
    find_unused_parameters: bool = False
    grad_reduce_dtype: str = "fp32"
    process_group_timeout_min: Optional[float] = None  # None: $COLLECTIVE_TIMEOUT_MIN, else 10 (distributed.py)
    offload_optimizer: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy (SHARD_STRATEGY) must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 or None, got {self.max_grad_norm}")
        if self.grad_reduce_dtype not in GRAD_REDUCE_DTYPES:
            raise ValueError(f"grad_reduce_dtype must be one of {GRAD_REDUCE_DTYPES}, got {self.grad_reduce_dtype!r}")
        if self.offload_optimizer and not self.uses_deepspeed:
            raise ValueError("OFFLOAD=1 (DeepSpeed optimizer CPU offload) needs SHARD_STRATEGY=zero2 or zero3, "
                             f"got {self.strategy}")

    @property
    def uses_deepspeed(self) -> bool:
        return self.strategy in ("zero2", "zero3")


def deepspeed_config(cfg: EngineConfig, device: torch.device) -> dict:
    """The DeepSpeed JSON config for ``zero2`` / ``zero3`` (no optimizer / scheduler: ours are passed in)."""
    stage = {"zero2": 2, "zero3": 3}[cfg.strategy]
    zero: dict = {"stage": stage, "contiguous_gradients": True, "overlap_comm": device.type == "cuda",
                  "reduce_bucket_size": DEEPSPEED_BUCKET_ELEMENTS}
    if cfg.offload_optimizer:
        # Pinned host buffers make the GPU<->CPU copies asynchronous; on a CPU-only run there is nothing to pin.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if stage == 2:
        zero["allgather_bucket_size"] = DEEPSPEED_BUCKET_ELEMENTS
    else:
        zero["stage3_prefetch_bucket_size"] = DEEPSPEED_BUCKET_ELEMENTS
        # Lets accelerator.get_state_dict gather the full weights on rank 0 for export.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    # Without these two keys DeepSpeed reduces and accumulates gradients in the model dtype (bf16).
    reduce = "fp32" if cfg.grad_reduce_dtype == "fp32" else cfg.mixed_precision
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": float(cfg.max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.mixed_precision == "bf16"},
        "fp16": {"enabled": cfg.mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "communication_data_type": reduce,
        "data_types": {"grad_accum_dtype": reduce},
        # torch.optim.AdamW is a "client" optimizer to DeepSpeed; ZeRO handles it correctly (partitioned state).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        # We pass DeepSpeedCPUAdam ourselves (optim.build_adamw). Without this key accelerate replaces any optimizer
        # that is not a torch AdamW by a new DeepSpeedCPUAdam in L2 mode (adamw_mode=False) built from the learning
        # rate and weight decay alone: measured here, 0.5% weight difference after one step of a tiny DiT.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def _prepare_deepspeed_process(device: torch.device) -> None:
    """What every DeepSpeed process needs before DeepSpeed starts (engine or ZeRO-3 partitioned init)."""
    ensure_launcher_env()
    if device.type == "cpu":
        skip_deepspeed_shm_comm_build()
    # DeepSpeed's ZeRO calls collectives torch now marks deprecated, on every rank; nothing a user can change.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.\w+` is deprecated\. Please use `torch\.distributed\.")


@contextlib.contextmanager
def model_init_context(cfg: EngineConfig) -> Iterator[None]:
    """Build the model inside this context. Under ZeRO-3 it is DeepSpeed's partitioned init (``zero.Init``): each
    parameter is split across the ranks as soon as its module is constructed, so no rank ever holds the whole
    model (the process group is started here for that, from the launcher environment). Otherwise a no-op.

    Weights must then be loaded with ``trainer_misc.optim.zero3.load_partitioned``; ``accelerator.prepare``
    keeps the existing partitions.
    """
    if cfg.strategy != "zero3":
        yield
        return
    device = resolve_device(cfg.device)
    _prepare_deepspeed_process(device)
    import deepspeed

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not deepspeed.comm.is_initialized():
        # accelerate later finds this group and uses it.
        deepspeed.init_distributed(dist_backend=backend_for_device(device), auto_mpi_discovery=False,
                                   timeout=collective_timeout(cfg.process_group_timeout_min))
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, device)):
        yield


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons (for building a second Accelerator in one process, e.g. tests)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


DEEPSPEED_SHM_COMM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME


def skip_deepspeed_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its ``deepspeed_shm_comm`` C++ op when it starts on the CPU.

    DeepSpeed's communication backend builds that op (g++ and ninja, ~2 minutes on 2 cores, silent) the first time
    it starts on a CPU, but uses it only for ``inference_all_reduce`` (tensor-parallel inference), which training
    never calls; every training collective goes through torch.distributed (gloo). Marking the op incompatible in
    DeepSpeed's own table of compatible ops (a dict it keeps for the process) makes it skip the build.
    """
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible[DEEPSPEED_SHM_COMM_OP] = False


def build_accelerator(cfg: EngineConfig):
    """Create the Accelerator for ``cfg`` and verify it really is what was asked for.

    Raises RuntimeError when accelerate fell back to a different setup (fewer processes than launched, DDP instead
    of DeepSpeed) instead of training in a way that looks like success.
    """
    from accelerate import Accelerator
    from accelerate.utils import (
        DDPCommunicationHookType,
        DeepSpeedPlugin,
        DistributedDataParallelKwargs,
        DistributedType,
        InitProcessGroupKwargs,
    )

    device = resolve_device(cfg.device)
    if cfg.uses_deepspeed and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        raise RuntimeError(f"strategy {cfg.strategy!r} cannot run with ACCELERATE_USE_CPU set: accelerate would "
                           "silently replace DeepSpeed by DDP. Unset ACCELERATE_USE_CPU.")
    if cfg.uses_deepspeed:
        _prepare_deepspeed_process(device)
    timeout = collective_timeout(cfg.process_group_timeout_min)
    if "LOCAL_RANK" in os.environ:  # launched (or made to look launched): name the backend explicitly
        handlers = [InitProcessGroupKwargs(backend=backend_for_device(device), timeout=timeout)]
    else:  # plain single-process DDP run: no process group at all (accelerate would fail on a backend here)
        handlers = [InitProcessGroupKwargs(timeout=timeout)]
    plugin = None
    if cfg.uses_deepspeed:
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, device))
    else:
        # DDP keeps fp32 parameters, so gradients are fp32 and reduced in fp32 unless a compression hook is asked for.
        hook = DDPCommunicationHookType.NO
        if cfg.grad_reduce_dtype == "model" and cfg.mixed_precision != "fp32":
            hook = DDPCommunicationHookType(cfg.mixed_precision)
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters,
                                                      comm_hook=hook))
    accelerator = Accelerator(
        mixed_precision="no" if cfg.mixed_precision == "fp32" else cfg.mixed_precision,
        cpu=device.type == "cpu" and not cfg.uses_deepspeed,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
    )

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
                           f"(strategy {cfg.strategy!r}, device {device}); the run would silently train "
                           "independent copies. Check the launcher environment and the backend.")
    is_ds = accelerator.distributed_type == DistributedType.DEEPSPEED
    if is_ds != cfg.uses_deepspeed:
        raise RuntimeError(f"strategy {cfg.strategy!r} requested but accelerate chose {accelerator.distributed_type}")
    if accelerator.device.type != device.type:
        raise RuntimeError(f"expected device {device} but accelerate chose {accelerator.device}")
    return accelerator


@dataclass(frozen=True)
class StepOutcome:
    """What an optimizer step did: the pre-clipping global gradient norm (None if unknown) and whether the update
    was applied (fp16 overflow steps are not).

    The norm stays a 0-dim tensor where it was computed: reading it now would be a host sync; the step runner reads
    it together with the step's losses in its one device-to-host copy per step."""

    grad_norm: Optional[torch.Tensor]
    applied: bool


class TrainEngine:
    """A model + optimizer prepared for ``cfg.strategy``; see the module docstring."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.accelerator = build_accelerator(cfg)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.module: nn.Module = self.accelerator.unwrap_model(self.model)
        self.is_deepspeed = cfg.uses_deepspeed
        self.device: torch.device = self.accelerator.device
        self.rank: int = self.accelerator.process_index
        self.world_size: int = self.accelerator.num_processes
        self.is_main: bool = self.accelerator.is_main_process
        # DeepSpeed bf16/fp16 cast the module itself; DDP keeps fp32 parameters and autocasts the forward.
        self.param_dtype: torch.dtype = next(self.module.parameters()).dtype
        offload = "off"
        if cfg.offload_optimizer:
            zero = self.optimizer.optimizer  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer
            # ZeRO-2 names the setting cpu_offload, ZeRO-3 offload_optimizer; refuse a run that silently kept it off.
            if not (getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False)):
                raise RuntimeError(f"OFFLOAD=1 was asked for but DeepSpeed's {type(zero).__name__} runs without "
                                   "optimizer offload")
            if zero.optimizer is not optimizer or not getattr(optimizer, "adam_w_mode", False):
                raise RuntimeError(f"OFFLOAD=1: DeepSpeed steps a {type(zero.optimizer).__name__} that is not the "
                                   "AdamW-mode DeepSpeedCPUAdam built by optim.build_adamw")
            offload = f"on ({type(zero.optimizer).__name__} on the CPU)"
        logger.info("engine: %s, %s, %d process(es), device %s, parameters in %s, optimizer offload %s", cfg.strategy,
                    cfg.mixed_precision, self.world_size, self.device, self.param_dtype, offload)

    # --------------------------------------------------------------------------------------------- training step

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Context for one micro-batch; the ``grad_accum_steps``-th call in a row is the accumulation boundary."""
        with self.accelerator.accumulate(self.model):
            yield

    @property
    def at_boundary(self) -> bool:
        return self.accelerator.sync_gradients

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch loss; scaled by ``1 / grad_accum_steps`` by accelerate or DeepSpeed.

        Under DeepSpeed, at the boundary this also clips and applies the optimizer step.
        """
        self.accelerator.backward(loss)

    def step(self) -> StepOutcome:
        """Finish the accumulation window after its last ``backward``: clip, step, zero the gradients.

        Must be called inside the boundary micro-batch's ``accumulate()`` context.
        """
        if not self.at_boundary:
            raise RuntimeError("TrainEngine.step() called outside the accumulation boundary micro-batch")
        if self.is_deepspeed:
            # DeepSpeed already clipped and stepped inside backward(); its norm is the pre-clipping global norm.
            ds = self.model
            norm = ds.get_global_grad_norm()
            return StepOutcome(_norm_tensor(norm), bool(ds.was_step_applied()))
        max_norm = self.cfg.max_grad_norm or math.inf
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        applied = not self.optimizer.step_was_skipped
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(_norm_tensor(norm), applied)

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    @property
    def param_groups(self) -> list[dict]:
        # DeepSpeed's ZeRO optimizers expose the wrapped torch optimizer's groups (their "lr" is what is used).
        return self.optimizer.optimizer.param_groups if self.is_deepspeed else self.optimizer.param_groups

    # --------------------------------------------------------------------------------------------- state

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """The whole model state dict (official key names, parameters in their training dtype) on rank 0, None on
        other ranks. Collective: under ZeRO-3 every rank takes part in gathering the partitions."""
        state = self.accelerator.get_state_dict(self.model, unwrap=True)
        if not self.is_main:
            return None
        return {k: v.detach().to("cpu").clone() for k, v in state.items()}

    # --------------------------------------------------------------------------------------------- inspection

    def sharding_report(self) -> dict:
        """How much of the parameters and of the Adam state this rank holds (to check sharding is real).

        ``param_numel_local`` counts ZeRO-3 partitions (``ds_tensor``); ``optim_state_numel_local`` counts the
        elements of ``exp_avg`` this rank's optimizer keeps (ZeRO-2 and ZeRO-3 partition it).
        """
        params = [p for p in self.module.parameters() if p.requires_grad]
        total = sum(p.ds_numel if hasattr(p, "ds_tensor") else p.numel() for p in params)
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        base = self.optimizer.optimizer
        if self.is_deepspeed:
            base = base.optimizer  # ZeRO optimizer -> the torch AdamW over flat partitions
        optim_local = sum(s["exp_avg"].numel() for s in base.state.values() if "exp_avg" in s)
        return {"strategy": self.cfg.strategy, "world_size": self.world_size, "rank": self.rank,
                "param_numel_total": int(total), "param_numel_local": int(local),
                "optim_state_numel_local": int(optim_local),
                "zero3_partitioned": all(hasattr(p, "ds_tensor") for p in params) and self.cfg.strategy == "zero3"}


def _norm_tensor(value) -> Optional[torch.Tensor]:
    """A gradient norm (tensor or number, as the engines return it) as a 0-dim fp32 tensor, without a host sync."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(())
    return torch.tensor(float(value))
