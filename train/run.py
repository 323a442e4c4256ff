"""How a training run is put together from its checked flags (:mod:`train.args`): the dataset, the model side by
kind, the Pyramid Flow loss, validation samples and the loop's settings, then :func:`run`.

Each builder does one thing, top to bottom in :func:`run`: the data check and the datasets (``trainer_misc.data``:
the training lines and the evaluation set, split there), the DiT and the encoders that run during training
(:func:`build_model_side`, by kind through ``pyramid_dit.kinds``), the objective (``pyramid_dit.objective``) inside
the loss (``trainer_misc.loop.pyramid_loss``) and the held-out loss (``trainer_misc.loop.pyramid_eval``), validation
(``trainer_misc.loop.validation``) and the loop (``trainer_misc.loop.trainer``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pyramid_dit.device import DTYPES, resolve_device
from pyramid_dit.objective import PyramidFlowObjective
from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler
from pyramid_dit.text_features import TextFeatures
from pyramid_dit.training_record import TRAINING_RECORD, training_record
from train.args import SAMPLE_RATIOS, empty_prompt_file, sp_size_of, strategy_of
from trainer_misc.data.check import DataSpec, image_buckets, is_dry_run, run_data_check
from trainer_misc.data.datasets import ImageDataset, VideoLatentDataset, collate
from trainer_misc.data.features import load_text_features
from trainer_misc.data.resolution import parse_resolution
from trainer_misc.loop.config import TrainConfig
from trainer_misc.loop.metrics import BatchTrace
from trainer_misc.loop.pyramid_loss import PyramidFlowLoss
from trainer_misc.loop.trainer import train
from trainer_misc.optim.engine import EngineConfig
from trainer_misc.planning.plan import load_model_config, lora_targets, pack_peak_predictor, pixel_size, plan_text
from trainer_misc.planning.planner import Launch
from trainer_misc.runtime.distributed import get_world_size

logger = logging.getLogger("train_pyramid_flow")


def load_null_text(args: argparse.Namespace) -> Optional[TextFeatures]:
    """The extracted empty-prompt features (checked to exist by :func:`train.args.check_args`), or None when the
    run needs none (:func:`train.args.empty_prompt_file`)."""
    path, _ = empty_prompt_file(args)
    return None if path is None else TextFeatures.from_file(load_text_features(path))


def build_datasets(args: argparse.Namespace, verbose: bool):
    """The up-front data check (file headers only; prints its summary, exits 2 when nothing is usable), then
    ``(training dataset, evaluation dataset or None)``: the usable lines, split as the data check decided
    (``--eval_fraction``'s held-out lines never reach the training dataset), the evaluation set capped at
    ``--eval_samples``."""
    dit_config = json.loads((Path(args.model_path) / args.model_variant / "config.json").read_text())
    dims = (dit_config.get("joint_attention_dim"), dit_config.get("pooled_projection_dim"))
    report = run_data_check(DataSpec(
        anno_file=args.anno_file, task=args.task, resolution=args.resolution, num_frames=args.max_frames,
        data_root=args.data_root, load_text_encoder=args.load_text_encoder, text_drop_rate=args.text_drop_rate,
        empty_prompt_fea=args.empty_prompt_fea or None, text_dims=dims if None not in dims else None,
        eval_anno_file=args.eval_anno_file or None, eval_fraction=args.eval_fraction, seed=args.seed),
        verbose=verbose)
    evaluation = report.eval_usable[:args.eval_samples]  # its first lines: EVAL_SAMPLES bounds the cost
    if verbose and len(report.eval_usable) > len(evaluation):
        print(f"  evaluation set capped at EVAL_SAMPLES={args.eval_samples} (--eval_samples): the first "
              f"{len(evaluation)} of {len(report.eval_usable)} usable evaluation samples are evaluated", flush=True)
    if args.task == "t2i":
        buckets = image_buckets(args.resolution)
        train_set = ImageDataset(report.usable, buckets, load_text_fea=not args.load_text_encoder,
                                 crop_mode=args.crop_mode, seed=args.seed)
        # Centre crops: an evaluation sample is the same image at every evaluation.
        eval_set = ImageDataset(evaluation, buckets, load_text_fea=not args.load_text_encoder,
                                crop_mode="center", seed=args.seed) if evaluation else None
        return train_set, eval_set
    width, height = parse_resolution(args.resolution)
    latent_size = (height // 8, width // 8)
    return (VideoLatentDataset(report.usable, args.max_frames, latent_size, load_text_fea=not args.load_text_encoder),
            VideoLatentDataset(evaluation, args.max_frames, latent_size, load_text_fea=not args.load_text_encoder)
            if evaluation else None)


@dataclass
class ModelSide:
    """What the model kind decides: the DiT to train and the encoders that run during training (None when their
    outputs were extracted beforehand)."""

    dit: torch.nn.Module
    vae: Optional[torch.nn.Module] = None
    text_encoder: Optional[object] = None


def build_model_side(args: argparse.Namespace, device: torch.device, engine: EngineConfig) -> ModelSide:
    """Load the DiT (and the VAE / text encoder when they run during training) for ``--model_name``.

    What differs between kinds (DiT class, text encoder) comes from :mod:`pyramid_dit.kinds`.
    """
    from pyramid_dit.kinds import get_kind
    from trainer_misc.optim.zero3 import load_pretrained_for_training

    kind = get_kind(args.model_name)
    # Under ZeRO-3 the DiT is built and loaded already partitioned (no rank ever holds all of it).
    dit = load_pretrained_for_training(kind.dit(), args.model_path, args.model_variant, engine,
                                       weights_file=args.dit_pretrained_weight or None)
    if args.lora_rank:
        from pyramid_dit.lora import LoraSettings, add_lora

        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) or kind.lora_targets
        counts = add_lora(dit, LoraSettings(args.lora_rank, args.lora_alpha or float(args.lora_rank), targets,
                                            args.lora_dropout), seed=args.seed)
        logger.info("LoRA rank %d on %d layers: %d trainable parameters, %d frozen", args.lora_rank,
                    counts["adapted_layers"], counts["trainable"], counts["frozen"])
    if args.gradient_checkpointing:
        dit.enable_gradient_checkpointing(args.gradient_checkpointing_ratio)
    dit.attention_split = args.attention_split

    side = ModelSide(dit)
    encode_dtype = DTYPES[args.model_dtype]
    if args.load_vae or args.task == "t2i":
        from video_vae.modeling_causal_vae import CausalVideoVAE
        # dtype at load, not .to(dtype): diffusers warns on every .to(dtype) of a model
        side.vae = CausalVideoVAE.from_pretrained(Path(args.model_path) / "causal_video_vae",
                                                  torch_dtype=encode_dtype).to(device).eval()
        side.vae.requires_grad_(False)
    if args.load_text_encoder:
        side.text_encoder = kind.load_text_encoder(args.model_path, torch_dtype=encode_dtype).to(device)
    return side


def build_objective(args: argparse.Namespace, null_text: Optional[TextFeatures]) -> PyramidFlowObjective:
    scheduler = PyramidFlowMatchEulerDiscreteScheduler(shift=args.schedule_shift, stages=3,
                                                        stage_range=(0, 1 / 3, 2 / 3, 1))
    return PyramidFlowObjective(
        scheduler, args.model_name, sample_ratios=SAMPLE_RATIOS, corrupt_ratio=args.corrupt_ratio,
        frame_per_unit=args.frame_per_unit, max_temporal_length=args.max_frames,
        video_sync_group=args.video_sync_group if args.use_temporal_pyramid else 1,
        text_drop_rate=args.text_drop_rate, null_text=null_text)


def build_validation(args: argparse.Namespace, side: ModelSide, dataset, null_text: Optional[TextFeatures],
                     device: torch.device):
    """Rank 0's validation sampler: a second DiT of the trained kind and a VAE, both in the run's dtype."""
    from trainer_misc.loop.validation import ValidationSampler, pick_validation_prompts
    from video_vae.modeling_causal_vae import CausalVideoVAE

    try:
        prompts = pick_validation_prompts(dataset, args.validation_prompts, side.text_encoder, device)
    except ValueError as e:
        raise SystemExit(f"--validation_every: {e}") from None
    if side.text_encoder is not None:
        with torch.no_grad():
            negative = side.text_encoder.encode([""], device).to(device="cpu")
    else:
        negative = null_text
    width, height = image_buckets(args.resolution)[0] if args.task == "t2i" else parse_resolution(args.resolution)
    dtype = DTYPES[args.model_dtype]
    return ValidationSampler(
        type(side.dit).from_config(side.dit.config),
        CausalVideoVAE.from_pretrained(Path(args.model_path) / "causal_video_vae", torch_dtype=dtype), prompts,
        negative,
        width=width, height=height, temp=1 if args.task == "t2i" else (args.validation_temp or args.max_frames),
        steps=args.validation_steps, dtype=dtype, device=device, output_dir=args.output_dir,
        offload=args.validation_offload, tensorboard=args.report_to == "tensorboard", model_name=args.model_name,
        mode=trained_as(args)["sampling_mode"])


def build_held_out(args: argparse.Namespace, eval_set, objective: PyramidFlowObjective, side: ModelSide):
    """The held-out loss of ``eval_set`` on the run's own objective (AR or full sequence, t2v or t2i)."""
    from trainer_misc.loop.pyramid_eval import PyramidHeldOutLoss

    return PyramidHeldOutLoss(objective, eval_set, use_temporal_pyramid=args.use_temporal_pyramid,
                              timesteps=args.eval_timesteps, history_depths=args.eval_history_depths,
                              frames=1 if args.task == "t2i" else args.max_frames, seed=args.seed, vae=side.vae,
                              text_encoder=side.text_encoder)


def trained_as(args: argparse.Namespace) -> dict:
    """What this run teaches (task, sampling mode): recorded in the export for generation, used by validation."""
    return training_record(args.task, args.use_temporal_pyramid)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The loop's settings from the flags (step counts resolved from epochs where the flags say so)."""
    max_steps = args.max_steps or args.epochs * args.iters_per_epoch
    # The reference's rule: a positive --warmup_steps wins, anything else means --warmup_epochs epochs.
    warmup = args.warmup_steps if args.warmup_steps > 0 else args.warmup_epochs * args.iters_per_epoch
    checkpoint_every = args.save_every_steps or args.save_ckpt_freq * args.iters_per_epoch
    return TrainConfig(
        output_dir=args.output_dir, max_steps=max_steps, batch_size=args.batch_size, strategy=strategy_of(args),
        mixed_precision=args.model_dtype, grad_reduce_dtype=args.grad_reduce_dtype, device=args.device,
        offload_optimizer=args.offload_optimizer, grad_accum_steps=args.gradient_accumulation_steps,
        lr=args.lr, betas=(args.opt_beta1, args.opt_beta2), eps=args.opt_eps, weight_decay=args.weight_decay,
        lr_scheduler=args.lr_scheduler, warmup_steps=min(warmup, max_steps), warmup_start_lr=args.warmup_lr,
        min_lr=args.min_lr, max_grad_norm=args.clip_grad or None, skip_loss_threshold=args.skip_loss_threshold,
        ema_decay=args.ema_decay if args.ema_update else None, ema_update_every=args.ema_update_every,
        seed=args.seed, video_sync_group=args.video_sync_group if args.sync_video_input else 1,
        sp_size=sp_size_of(args), pack_slots=args.pack_slots,
        shuffle=not args.no_shuffle, num_workers=args.num_workers, checkpoint_every=checkpoint_every,
        keep_last_checkpoints=args.keep_last_checkpoints, resume=args.resume, export_dtype=args.export_dtype,
        tensorboard=args.report_to == "tensorboard", validate_every=args.validation_every,
        export_files={TRAINING_RECORD: trained_as(args)}, eval_every=args.eval_every,
        eval_degrade_margin=args.eval_degrade_margin, eval_degrade_patience=args.eval_degrade_patience,
        eval_degrade_vs=args.eval_degrade_vs, eval_stop_on_degrade=args.eval_stop_on_degrade)


def warmup_note(args: argparse.Namespace, config: TrainConfig) -> Optional[str]:
    """Say how the warmup length came about when it was not given in steps (the reference's rule, easy to miss:
    ``WARMUP_STEPS=0`` means ``WARMUP_EPOCHS`` epochs, not no warmup)."""
    if args.warmup_steps > 0 or config.warmup_steps == 0:
        return None
    return (f"LR warmup: {config.warmup_steps} steps = WARMUP_EPOCHS={args.warmup_epochs} x ITERS_PER_EPOCH="
            f"{args.iters_per_epoch}{' (capped at the run length)' if config.warmup_steps == config.max_steps else ''}"
            f", because WARMUP_STEPS={args.warmup_steps} is not positive (the reference's rule); set WARMUP_STEPS "
            "to a step count, or WARMUP_EPOCHS=0 for no warmup")


def run_summary(result, world_size: int, output_dir: str) -> str:
    """The closing line; a run that resumed at its last step says so instead of quoting losses it never had."""
    exported = ", ".join(map(str, result.exported)) or "nothing"
    if not result.records:
        return (f"done: nothing to train: {output_dir} already holds a finished run of {result.final_step} steps "
                f"(resumed at step {result.start_step}); exported {exported}. Use a new OUTPUT_DIR to train again, "
                "or raise EPOCHS / ITERS_PER_EPOCH to train further.")
    line = (f"done: {result.final_step} steps (from {result.start_step}), loss {result.records[0].loss:.4f} -> "
            f"{result.records[-1].loss:.4f}, world size {world_size}; {result.bad_samples} unreadable samples "
            f"skipped; exported {exported}")
    if result.evaluations:
        last, base = result.evaluations[-1], result.eval_base
        line += f"; held-out loss {last.loss:.5f} at step {last.step}"
        if base is not None:
            line += f" vs base {base:.5f} ({100 * (last.loss / base - 1):+.2f}%)"
    if result.stopped_early:
        line += f"; {result.stopped_early}"
    return line


def planned_launch(args: argparse.Namespace, world_size: int, eval_samples: int = 0) -> Launch:
    """The launch these flags describe, as the planner counts it (``DRY_RUN=1``)."""
    kind, config = load_model_config(args.model_path, args.model_variant)
    task = "t2i" if args.task == "t2i" else ("ar" if args.use_temporal_pyramid else "t2v")
    width, height = pixel_size(args.resolution, task)
    return Launch(model_kind=kind, model_config=config, task=task, width=width, height=height,
                  num_frames=args.max_frames, batch_size=args.batch_size, gpus=world_size,
                  shard_strategy=strategy_of(args), dtype=args.model_dtype,
                  grad_accum=args.gradient_accumulation_steps, gradient_checkpointing=args.gradient_checkpointing,
                  gradient_checkpointing_ratio=args.gradient_checkpointing_ratio,
                  video_sync_group=args.video_sync_group if task == "ar" else 1, lora_rank=args.lora_rank,
                  lora_targets=lora_targets(args.lora_targets), offload_optimizer=args.offload_optimizer,
                  text_encoder=args.load_text_encoder, vae=args.load_vae, validation=args.validation_every > 0,
                  validation_offload=args.validation_offload, ema=args.ema_update,
                  grad_reduce_dtype=args.grad_reduce_dtype, eval_samples=eval_samples,
                  eval_timesteps=args.eval_timesteps, eval_history_depths=args.eval_history_depths,
                  eval_every=args.eval_every, max_steps=train_config(args).max_steps)


def dry_run_text(args: argparse.Namespace, world_size: int, eval_samples: int = 0) -> str:
    """``DRY_RUN=1``: the plan of the exact launch these flags describe (``eval_samples``: the evaluation set's
    size after the data check, 0 without one)."""
    launch = planned_launch(args, world_size, eval_samples)
    print(f"DRY_RUN: planning this launch ({launch.model_kind}, {launch.task}, {args.resolution}, "
          f"NUM_FRAMES={args.max_frames}, {world_size} process(es), {launch.shard_strategy}) on meta tensors ...",
          flush=True)
    return plan_text(launch, sp_size_of(args), pack_slots=args.pack_slots) + \
        "\nDRY_RUN: nothing trained, no checkpoint written."


def run(args: argparse.Namespace) -> int:
    """Train with the checked flags ``args`` on this process (one rank of the launch)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    config = train_config(args)
    note = warmup_note(args, config)
    if note and rank == 0:
        print(note, flush=True)

    dataset, eval_set = build_datasets(args, verbose=rank == 0)
    if is_dry_run():  # DRY_RUN=1: data summary (above) and the plan of this launch, no weights, no training
        if rank == 0:
            print(dry_run_text(args, world_size, len(eval_set) if eval_set is not None else 0), flush=True)
        return 0
    null_text = load_null_text(args)
    device = resolve_device(args.device)  # this rank's GPU (LOCAL_RANK), as the engine uses
    side = build_model_side(args, device, config.engine_config())
    trace = BatchTrace(args.output_dir, rank) if args.trace_batches else None
    objective = build_objective(args, null_text)
    compute_loss = PyramidFlowLoss(objective, args.use_temporal_pyramid, vae=side.vae,
                                   text_encoder=side.text_encoder, trace=trace,
                                   peak_bytes=pack_peak_predictor(lambda: planned_launch(args, world_size),
                                                                  args.pack_slots))
    validate = build_validation(args, side, dataset, null_text, device) if args.validation_every and rank == 0 \
        else None
    held_out = build_held_out(args, eval_set, objective, side) if eval_set is not None else None
    result = train(side.dit, compute_loss, dataset, config, collate_fn=collate, group_keys=dataset.group_keys(),
                   validate=validate, held_out=held_out)
    if trace is not None:
        trace.write({"sharding": result.engine.sharding_report()})
    if result.engine.is_main:
        logger.info("%s", run_summary(result, get_world_size(), args.output_dir))
    return 0
