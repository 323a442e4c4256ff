"""Generate videos from a Pyramid Flow model folder, optionally with a finetuned DiT.

Text-to-video::

    python3 tools/generate.py --model_path PATH/pyramid-flow-miniflux --prompt "a red ball rolling on a beach" \
        --output out/ball.mp4

Image-to-video (the image is resized to cover ``--width x --height`` and centre-cropped)::

    python3 tools/generate.py --model_path PATH/pyramid-flow-miniflux --image first_frame.png \
        --prompt "FPV flying over the Great Wall" --output out/wall.mp4

Text-to-image (one latent frame, written as a PNG of ``--width x --height``), from the released image DiT or a t2i
finetune::

    python3 tools/generate.py --model_path PATH/pyramid-flow-miniflux --task t2i --prompt "a red ball on a beach" \
        --output out/ball.png

How the DiT was trained decides the defaults: a folder exported by the trainer records it
(``pyramid_flow_training.json``: ``t2v`` or ``t2i``, ``ar`` or ``full_sequence``); without that file
``diffusion_transformer_image`` is a text-to-image DiT and every other variant an autoregressive video DiT.
``--task`` and ``--mode`` override it: ``--mode full_sequence`` denoises all latent frames jointly (DiTs trained by
``scripts/train_pyramid_flow_without_ar.sh``), ``--mode ar`` one unit after another (``scripts/train_pyramid_flow.sh``
and the released video DiTs). ``--temp 1`` (the default for t2i) generates one image.

A finetuned DiT replaces the variant's: ``--dit_path`` for a folder exported by the trainer (``config.json`` +
``diffusion_pytorch_model.safetensors``), ``--dit_weight`` for a single state-dict file. ``--lora_path`` applies a
LoRA adapter (the trainer's ``export/lora``, peft format) on top of that DiT without merging, its output scaled by
``--lora_scale`` (1: as trained, equal to ``export/transformer``; 0: the base DiT). With ``--prompt_file``
(one prompt per line) every prompt gets its own video, ``<output stem>_<index>.<suffix>``, prompt ``i`` seeded
with ``--seed + i`` (so it equals a single run of that prompt with that seed). The output suffix picks the
format: ``.mp4``, ``.gif`` or ``.png`` (a strip of frames). ``--temp`` counts latent frames: the video has
``1 + 8 * (temp - 1)`` frames (16 -> 121 frames, 5 s at 24 fps).

Launched by ``torchrun --nproc_per_node N`` (``GPUS=N sh scripts/generate.sh``), the N processes generate the same
videos together: the DiT splits each sequence over them (sequence parallelism, :mod:`pyramid_dit.sequence_parallel`;
N divides the DiT's head count), every process draws the same seeded noise, and process 0 decodes and writes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from pyramid_dit.kinds import MODEL_NAMES, get_kind
from pyramid_dit.options import AESTHETIC_SUFFIX, DEFAULT_NEGATIVE_PROMPT
from pyramid_dit.training_record import IMAGE_VARIANT, SAMPLING_MODES, TASKS, TrainedAs, read_training_record
from tools.cli import DefaultsHelp
from trainer_misc.runtime.arguments import CheckedParser, ConfigError, Naming, integer, number, parse_checked

STAGES = 3  # the released models' pyramid
SIZE_MULTIPLE = 8 * 2 ** STAGES  # latent halves twice and is then cut into 2x2 patches
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser() -> CheckedParser:
    p = CheckedParser(prog="generate.py", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelp)
    g = p.add_argument_group("model")
    g.add_argument("--model_path", required=True, help="official model folder (causal_video_vae/, text encoders, "
                   "diffusion_transformer_*/)")
    g.add_argument("--model_name", default="pyramid_flux", choices=list(MODEL_NAMES),
                   help="model kind: pyramid_flux (rain1011/pyramid-flow-miniflux) or pyramid_mmdit (pyramid-flow-sd3)")
    g.add_argument("--variant", default=None, help="DiT subfolder of --model_path (default: "
                   f"{IMAGE_VARIANT} for t2i when the folder has it, else diffusion_transformer_384p)")
    g.add_argument("--dit_path", default=None, help="finetuned DiT folder (config.json + "
                   "diffusion_pytorch_model.safetensors) used instead of --variant")
    g.add_argument("--dit_weight", default=None, help="single-file DiT state dict (.safetensors, or .pt/.pth/.bin "
                   "read with weights_only=True) loaded into the --variant architecture")
    g.add_argument("--lora_path", default=None, help="LoRA adapter folder (adapter_config.json + "
                   "adapter_model.safetensors, the trainer's export/lora) applied to the DiT without merging")
    g.add_argument("--lora_scale", type=number(-100, 100), default=1.0, help="adapter strength: 1 as trained (equals the merged "
                   "export), 0 the base DiT; needs --lora_path")
    g = p.add_argument_group("what to generate")
    g.add_argument("--task", default=None, choices=TASKS, help="t2v (video) or t2i (one image, --temp 1, .png); "
                   "default: what the DiT was trained for (its pyramid_flow_training.json, else t2i for "
                   f"{IMAGE_VARIANT} and t2v for the other variants)")
    g.add_argument("--mode", default=None, choices=SAMPLING_MODES, help="ar: one latent frame after another; "
                   "full_sequence: all latent frames jointly; default: how the DiT was trained (its "
                   "pyramid_flow_training.json, else ar)")
    g.add_argument("--prompt", default=None, help="the text prompt")
    g.add_argument("--prompt_file", default=None, help="text file, one prompt per line (blank lines skipped)")
    g.add_argument("--prompt_suffix", default=AESTHETIC_SUFFIX, help="appended to every prompt (the reference's "
                   "aesthetic suffix); '' to disable")
    g.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT, help="classifier-free guidance negative")
    g.add_argument("--image", default=None, help="image-to-video: the first frame (any format PIL reads)")
    g.add_argument("--temp", type=integer(1, 4096), default=None, help="latent frames (video frames = 1 + 8 * (temp - 1)); "
                   "default 16, 1 (an image) for t2i")
    g.add_argument("--height", type=integer(SIZE_MULTIPLE, 16384, multiple_of=SIZE_MULTIPLE), default=None, help=f"pixels, a multiple of {SIZE_MULTIPLE} (default: 768 "
                   "for the 768p and image variants, else 384)")
    g.add_argument("--width", type=integer(SIZE_MULTIPLE, 16384, multiple_of=SIZE_MULTIPLE), default=None, help=f"pixels, a multiple of {SIZE_MULTIPLE} (default: 1280 "
                   "for the 768p and image variants, else 640)")
    g = p.add_argument_group("sampling")
    g.add_argument("--num_inference_steps", type=integer(1, 10_000), nargs="+", default=[20, 20, 20],
                   help="Euler steps per stage for the first frame, or for all frames with --mode full_sequence "
                   "(one value, or one per stage)")
    g.add_argument("--video_num_inference_steps", type=integer(1, 10_000), nargs="+", default=[10, 10, 10],
                   help="Euler steps per stage for every later latent frame (--mode ar)")
    g.add_argument("--guidance_scale", type=number(-1e3, 1e3), default=7.0, help="classifier-free guidance of the first frame "
                   "(of every frame with --mode full_sequence; the reference uses 9 for images); <= 1 turns "
                   "guidance off (conditional prediction only)")
    g.add_argument("--video_guidance_scale", type=number(-1e3, 1e3), default=5.0, help="guidance of the later frames (--mode ar)")
    g.add_argument("--seed", type=integer(0, 2**31 - 1), default=0)
    g = p.add_argument_group("runtime")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                   help="weights and autocast dtype (auto: bf16 on CUDA, fp32 on the CPU)")
    g.add_argument("--cpu_offload", action="store_true", help="keep models on the CPU, move each to the GPU only "
                   "while it runs (less GPU memory, slower)")
    g.add_argument("--decode_window", type=integer(1, 4096), default=1, help="latent frames per VAE decode chunk (2 is faster, "
                   "needs more memory)")
    g.add_argument("--vae_tile_size", type=integer(0, 16384, multiple_of=8), default=256, help="VAE decode tile size in pixels; 0 disables "
                   "tiling")
    g.add_argument("--compile_vae", action="store_true", help="torch.compile the VAE: each new decode shape compiles "
                   "first (a minute or more); not faster than eager on a 2-core CPU (tools/benchmark_vae.py --compile)")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, help="output file; the suffix picks the format (.mp4, .gif, .png "
                   "strip; one image is always .png); default outputs/sample.mp4, outputs/sample.png for an image")
    g.add_argument("--fps", type=number(0, 1000, lo_open=True), default=24.0)
    return p


def check_args(args: argparse.Namespace, n: Optional[Naming] = None, world_size: int = 1) -> None:
    """Reject bad flag combinations before any model is loaded (:class:`ConfigError`; ``n`` names each setting as
    its user set it: ``--temp 0`` on the command line, ``TEMP=0`` from ``scripts/generate.sh``). ``world_size``:
    processes splitting each video's sequence (their count must divide the DiT's heads)."""
    from pyramid_dit.media import VIDEO_SUFFIXES

    n = n or Naming(args)
    if (args.prompt is None) == (args.prompt_file is None):
        raise ConfigError(f"give exactly one of {n.var('--prompt')} and {n.var('--prompt_file')} (one prompt per line)")
    if args.dit_path and args.dit_weight:
        raise ConfigError(f"{n.var('--dit_path')} (a DiT folder) and {n.var('--dit_weight')} (a state-dict file) are "
                          "alternatives; give one")
    if args.lora_scale != 1.0 and args.lora_path is None:
        raise ConfigError(f"{n('--lora_scale')} scales an adapter: set {n.var('--lora_path')} too")
    if args.task == "t2i" and args.temp not in (None, 1):
        raise ConfigError(f"--task t2i generates one image: drop {n('--temp')} (or use --task t2v)")
    for name in ("--num_inference_steps", "--video_num_inference_steps"):
        if len(getattr(args, name[2:])) not in (1, STAGES):
            raise ConfigError(f"{n(name)}: give one step count or one per stage ({STAGES})")
    if args.image is not None and args.temp is not None and args.temp < 2:
        raise ConfigError(f"{n.var('--image')} (image-to-video) needs {n.var('--temp')} >= 2: the image is latent "
                          "frame 0")
    if args.output is not None and Path(args.output).suffix.lower() not in VIDEO_SUFFIXES:
        raise ConfigError(f"{n('--output')}: the suffix must be one of {', '.join(VIDEO_SUFFIXES)}")
    if args.device == "cuda" or args.cpu_offload:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{n('--device') if args.device == 'cuda' else n('--cpu_offload')} needs a GPU, but "
                              "torch.cuda.is_available() is False (CPU-only torch build or no visible GPU); use "
                              "--device cpu")
    if args.cpu_offload and args.device == "cpu":
        raise ConfigError("--cpu_offload moves models between the CPU and a GPU; it makes no sense with --device cpu")
    if not Path(args.model_path).is_dir():
        raise ConfigError(f"{n('--model_path')} is not a folder; download {get_kind(args.model_name).hub_repo} there "
                          f"(or build a tiny one: python3 tools/build_tiny_checkpoint.py --kind {args.model_name} "
                          "--out DIR)")
    for flag, kind in (("--prompt_file", "file"), ("--image", "file"), ("--dit_weight", "file"),
                       ("--dit_path", "folder"), ("--lora_path", "folder")):
        path = getattr(args, flag[2:])
        if path is not None and not (Path(path).is_dir() if kind == "folder" else Path(path).is_file()):
            raise ConfigError(f"{n(flag)}: no such {kind}")
    if args.lora_path is not None and not (Path(args.lora_path) / "adapter_config.json").is_file():
        raise ConfigError(f"{n('--lora_path')} has no adapter_config.json; point it at a run's export/lora folder")
    if args.variant is not None and args.dit_path is None and \
            not (Path(args.model_path) / args.variant / "config.json").is_file():
        raise ConfigError(f"no {args.variant}/config.json in {n('--model_path')}; set {n.var('--variant')} to one of "
                          "its diffusion_transformer_* folders")
    if world_size > 1:
        # Every variant of a kind has the same head count, so the 384p one answers for an unset variant.
        config = Path(args.dit_path or Path(args.model_path) / (args.variant or "diffusion_transformer_384p"))
        try:
            heads = json.loads((config / "config.json").read_text(encoding="utf-8"))["num_attention_heads"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"cannot read the head count of {config}/config.json ({e})") from None
        if heads % world_size:
            raise ConfigError(f"GPUS={world_size} must divide the DiT's {heads} attention heads ({config}): each "
                              f"process attends with heads/GPUS of them; choose a divisor of {heads}")


def resolve_defaults(args: argparse.Namespace) -> TrainedAs:
    """Fill the flags left unset from how the DiT was trained (its training record) and from the variant; returns
    that record. Runs after :func:`check_args`, before any model is loaded."""
    from pyramid_dit.pipeline_loading import resolve_dit_folder

    model_path = Path(args.model_path)
    from_export = read_training_record(args.dit_path) if args.dit_path else None
    task_hint = args.task or (from_export.task if from_export else None)
    if args.variant is None:
        has_image_dit = (model_path / IMAGE_VARIANT / "config.json").is_file()
        args.variant = IMAGE_VARIANT if task_hint == "t2i" and has_image_dit else "diffusion_transformer_384p"
    trained = from_export or read_training_record(resolve_dit_folder(model_path, args.variant))
    args.task = args.task or trained.task
    args.mode = args.mode or trained.sampling_mode
    if args.temp is None:
        args.temp = 1 if args.task == "t2i" else 16
    elif args.task == "t2i" and args.temp != 1:
        raise ConfigError(f"the DiT was trained for t2i ({trained.source}): one image, so --temp 1, or --task t2v "
                          f"to sample {args.temp} latent frames anyway")
    if args.image is not None and (args.mode != "ar" or args.temp < 2):
        raise ConfigError(f"--image (image-to-video) needs --mode ar and --temp >= 2 (only the autoregressive "
                          f"sampler continues a given first frame); this run is {args.task}, mode {args.mode} "
                          f"(trained as {trained.task}/{trained.sampling_mode}: {trained.source})")
    large = "768p" in args.variant or args.variant == IMAGE_VARIANT
    args.height = args.height or (768 if large else 384)
    args.width = args.width or (1280 if large else 640)
    if args.output is None:
        args.output = "outputs/sample.png" if args.temp == 1 else "outputs/sample.mp4"
    elif args.temp == 1 and not args.output.lower().endswith(".png"):
        raise ConfigError(f"--output {args.output}: one image (--temp 1, --task t2i) is written as .png")
    return trained


def read_prompts(args: argparse.Namespace) -> List[str]:
    if args.prompt is not None:
        return [args.prompt]
    prompts = [line.strip() for line in Path(args.prompt_file).read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"--prompt_file {args.prompt_file} has no non-blank line")
    return prompts


def output_paths(output: str, count: int) -> List[Path]:
    out = Path(output)
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(count)]


def join_processes(pipe) -> bool:
    """Under ``torchrun`` with several processes: join them into one sequence-parallel group over the DiT (each
    holds 1/N of every sequence; all make the same calls with the same noise). Returns whether this process writes
    the outputs (process 0; the only one without torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return True
    from trainer_misc.runtime.distributed import init_process_group, sequence_parallel_group

    rank, world = init_process_group(pipe.device)
    pipe.dit.enable_sequence_parallel(sequence_parallel_group(world))
    return rank == 0


def parse_and_check(argv: Optional[Sequence[str]], variables: Optional[dict[str, str]] = None,
                    values: Optional[dict[str, str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """The flags, checked (:func:`check_args`, through :func:`trainer_misc.runtime.arguments.parse_checked`;
    ``variables``: ``scripts/generate.sh``'s). ``world_size``: the launch's processes (default: torchrun's
    ``WORLD_SIZE``, else 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    return parse_checked(build_parser(), argv, lambda args, n: check_args(args, n, world), variables, values)


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    try:
        args = parse_and_check(argv)
        trained = resolve_defaults(args)
    except ConfigError as e:  # as argparse reports a bad flag: the reason, exit status 2
        print(f"generate.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    import torch

    from pyramid_dit.media import save_video
    from pyramid_dit.pipeline import PyramidFlowPipeline
    from pyramid_dit.resize import resize_crop_image

    prompts = read_prompts(args)
    image = None
    if args.image is not None:
        from PIL import Image

        with Image.open(args.image) as img:
            image = resize_crop_image(img.convert("RGB"), args.width, args.height)

    start = time.time()
    pipe = PyramidFlowPipeline.from_pretrained(
        args.model_path, variant=args.variant, dit_path=args.dit_path, dit_weight=args.dit_weight,
        lora_path=args.lora_path, lora_scale=args.lora_scale,
        device=args.device, dtype=None if args.dtype == "auto" else getattr(torch, DTYPES[args.dtype]),
        cpu_offload=args.cpu_offload, model_name=args.model_name,
    )
    writer = join_processes(pipe)
    if args.compile_vae:
        print("--compile_vae: the VAE compiles on its first decode of each shape (a minute or more)", flush=True)
        pipe.vae.compile_for_inference()
    if writer:
        adapter = f" + LoRA {args.lora_path} x {args.lora_scale:g}" if args.lora_path else ""
        print(f"loaded {args.dit_path or args.dit_weight or Path(args.model_path) / args.variant}{adapter} on "
              f"{pipe.device} ({str(pipe.dtype).replace('torch.', '')}) in {time.time() - start:.1f}s; {args.task}, "
              f"mode {args.mode} (trained as {trained.task}/{trained.sampling_mode}: {trained.source})", flush=True)

    written = []
    for index, (prompt, path) in enumerate(zip(prompts, output_paths(args.output, len(prompts)))):
        start = time.time()
        video = pipe.generate(
            prompt + args.prompt_suffix, negative_prompt=args.negative_prompt, image=image,
            height=args.height, width=args.width, temp=args.temp, mode=args.mode,
            num_inference_steps=args.num_inference_steps, video_num_inference_steps=args.video_num_inference_steps,
            guidance_scale=args.guidance_scale, video_guidance_scale=args.video_guidance_scale,
            seed=args.seed + index, output_type="uint8" if writer else "latent", decode_window=args.decode_window,
            vae_tile_size=args.vae_tile_size or None,
        )
        if not writer:  # the other processes only helped the DiT; process 0 decodes and writes
            continue
        save_video(video[0], path, fps=args.fps, progress=True)
        frames, height, width = video.shape[2:]
        what = "1 image" if frames == 1 else f"{frames} frames"
        print(f"wrote {path} ({what}, {width}x{height}, seed {args.seed + index}) in "
              f"{time.time() - start:.1f}s", flush=True)
        written.append(path)
    return written


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, KeyError) as e:
        # Loading and validation errors carry the file / key / flag in their message; a traceback adds nothing.
        print(f"generate.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    from trainer_misc.runtime.failures import exit_process

    exit_process(0)  # several processes: tear the group down on every rank and leave cleanly
