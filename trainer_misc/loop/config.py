"""``TrainConfig``: every setting of the training loop, each one set by a flag of ``train/train_pyramid_flow.py``.

The reference's flag names are given in brackets where the meaning is the same.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

from pyramid_dit.device import DTYPES
from trainer_misc.loop.evaluation import DegradeRule
from trainer_misc.optim.adamw import LRSchedule
from trainer_misc.optim.engine import PRECISIONS, STRATEGIES, EngineConfig

__all__ = ["TrainConfig", "EXPORT_DTYPES"]

EXPORT_DTYPES = {None: None, **DTYPES}


@dataclass
class TrainConfig:
    """Everything the loop needs.

    Sizes: ``batch_size`` is per data-parallel rank and per micro-batch [--batch_size]; an optimizer step uses
    ``batch_size * (world_size / sp_size) * grad_accum_steps`` samples [--gradient_accumulation_steps] (the
    ``sp_size`` processes of a sequence-parallel group share one batch); ``max_steps`` counts optimizer steps
    [--epochs * --iters_per_epoch].
    """

    output_dir: str
    max_steps: int
    batch_size: int
    strategy: str = "ddp"                      # [--fsdp_shard_strategy] ddp | zero2 | zero3
    mixed_precision: str = "bf16"              # [--model_dtype] bf16 | fp16 | fp32
    grad_reduce_dtype: str = "fp32"            # fp32 | model: gradient reduction/accumulation (EngineConfig)
    offload_optimizer: bool = False            # [--offload_optimizer] OFFLOAD=1: ZeRO optimizer state on the CPU
    device: str = "auto"                       # auto | cuda | cpu
    grad_accum_steps: int = 1
    # optimizer [--lr --opt_beta1 --opt_beta2 --opt_eps --weight_decay]
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    # schedule [--lr_scheduler --warmup_steps --warmup_lr --min_lr]
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0
    warmup_start_lr: Optional[float] = None    # None: reference value (1e-6 constant_with_warmup, 0 cosine)
    min_lr: float = 1e-5
    max_grad_norm: Optional[float] = 1.0       # [--clip_grad]; None or 0: no clipping (norm still reported)
    skip_loss_threshold: Optional[float] = None  # reference behaviour: 2.0
    # EMA [--ema_update --ema_decay]; None disables
    ema_decay: Optional[float] = None
    ema_update_every: int = 100                # the reference updates its EMA every 100 steps
    # data
    seed: int = 0
    video_sync_group: int = 1                  # [--video_sync_group], 1 = every rank reads its own batches
    sp_size: int = 1                           # [--sp_group_size] processes splitting one sample's tokens (Ulysses)
    pack_slots: Union[int, str] = 1            # slots per forward/backward pass (divides the slots per process), or
                                               # "auto": the most the planner predicts to fit (step.slots_per_pass)
    shuffle: bool = True                       # --no_shuffle: annotation order (to reproduce a data problem)
    num_workers: Union[int, str] = 0          # DataLoader workers per process, or "auto"; capped by the machine
    # checkpoints and export (to output_dir/export/transformer, and transformer_ema with EMA)
    checkpoint_every: int = 0                  # steps; 0 = only at the end [--save_ckpt_freq, in steps here]
    keep_last_checkpoints: Optional[int] = None
    resume: str = "auto"                       # auto | never | path to a checkpoint folder [--resume]
    export_dtype: Optional[str] = None         # None keeps the training dtype; bf16 | fp16 | fp32
    # JSON files written next to config.json in every exported model folder (name -> content), e.g. the training
    # record that tells generation how the DiT was trained (pyramid_dit/training_record.py)
    export_files: dict = dataclasses.field(default_factory=dict)
    # validation samples: every N steps (0 = off) train() calls its ``validate`` on rank 0 with the weights
    validate_every: int = 0
    # held-out evaluation (when train() gets a ``held_out`` set; loop/evaluation.py): before the first step, every
    # N steps (0: only then and after the last step) and after the last; the degradation warning's rule
    eval_every: int = 0
    eval_degrade_margin: float = 0.02          # relative: 0.02 = 2 % above the reference
    eval_degrade_patience: int = 3             # evaluations in a row
    eval_degrade_vs: str = "best"              # best (so far, base included) | base
    eval_stop_on_degrade: bool = False         # checkpoint and end the run when the warning fires
    # logging
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        for name in ("max_steps", "batch_size", "grad_accum_steps", "video_sync_group", "ema_update_every",
                     "sp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype must be one of {list(EXPORT_DTYPES)}, got {self.export_dtype!r}")
        if self.eval_every < 0 or self.validate_every < 0:
            raise ValueError(f"eval_every and validate_every must be >= 0, got {self.eval_every}, "
                             f"{self.validate_every}")
        if self.skip_loss_threshold is not None and not self.skip_loss_threshold > 0:
            raise ValueError(f"skip_loss_threshold must be > 0 or None, got {self.skip_loss_threshold}")
        self.betas = tuple(self.betas)

    def engine_config(self) -> EngineConfig:
        """The engine settings; also what ``engine.model_init_context`` needs to build a ZeRO-3 model."""
        return EngineConfig(strategy=self.strategy, mixed_precision=self.mixed_precision, device=self.device,
                            grad_accum_steps=self.grad_accum_steps, max_grad_norm=self.max_grad_norm,
                            micro_batch_size=self.batch_size, grad_reduce_dtype=self.grad_reduce_dtype,
                            offload_optimizer=self.offload_optimizer)

    def degrade_rule(self) -> DegradeRule:
        return DegradeRule(margin=self.eval_degrade_margin, patience=self.eval_degrade_patience,
                           against=self.eval_degrade_vs, stop=self.eval_stop_on_degrade)

    def schedule(self) -> LRSchedule:
        return LRSchedule(self.lr_scheduler, self.lr, self.max_steps, self.warmup_steps, self.warmup_start_lr,
                          self.min_lr)
