"""Throughput of latent extraction: clips/s and frames/s for decode alone and for decode + VAE encode.

Uses the extraction tool's own pipeline (decord batched read + resize/crop in DataLoader workers, chunked VAE
encode), so the figures track the real tool. Defaults measure the tiny VAE on synthetic demo clips, which needs
nothing downloaded::

    python3 tools/benchmark_extraction.py                       # tiny VAE, 12 demo clips, 64x48, 17 frames
    python3 tools/benchmark_extraction.py --vae_path PATH/causal_video_vae --anno_file my.jsonl \
        --width 640 --height 384 --num_frames 121 --model_dtype bf16

Frames/s counts the frames fed to the VAE (after the 8k+1 cut). Nothing is written except with ``--json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from tools.extract_video_vae_latents import ClipDataset, encode_clip, item_generator, load_vae, make_loader
from tools.extraction_common import parse_dtype
from trainer_misc.data.annotation import VideoEntry, load_annotation


def _entries(args: argparse.Namespace, workdir: Path) -> list[VideoEntry]:
    if args.anno_file:
        return load_annotation(args.anno_file, data_root=args.data_root)  # type: ignore[return-value]
    from tools.make_demo_dataset import make_demo_dataset

    anno = make_demo_dataset(workdir / "demo", num_clips=args.num_clips, num_frames=args.clip_frames,
                             width=args.clip_width, height=args.clip_height, images=False)
    return load_annotation(anno)  # type: ignore[return-value]


def _vae_path(args: argparse.Namespace, workdir: Path) -> Path:
    if args.vae_path:
        return Path(args.vae_path)
    from tools.build_tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(workdir / "tiny", seed=0) / "causal_video_vae"


def measure(entries: Sequence[VideoEntry], args: argparse.Namespace, vae=None, device=None,
            dtype=torch.float32) -> dict:
    """One pass over ``entries``; with ``vae`` each decoded clip is also encoded. Failed clips are counted."""
    loader = make_loader(ClipDataset(entries, args.width, args.height, args.num_frames, overwrite=True),
                         args.num_workers)
    clips = frames = failed = 0
    t0 = time.perf_counter()
    for item in loader:
        if item["action"] != "encode":
            failed += 1
            continue
        if vae is not None:
            pixels = item["pixels"].unsqueeze(0).to(device)
            latent = encode_clip(vae, pixels, generator=item_generator(0, item["entry"].index))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            del latent
        clips += 1
        frames += item["pixels"].shape[1]
    seconds = time.perf_counter() - t0
    return {"clips": clips, "frames": frames, "failed": failed, "seconds": round(seconds, 3),
            "clips_per_s": round(clips / seconds, 3), "frames_per_s": round(frames / seconds, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vae_path", default=None, help="causal_video_vae folder (default: build the tiny one)")
    p.add_argument("--anno_file", default=None, help="video annotation (default: synthetic demo clips)")
    p.add_argument("--data_root", default=None)
    p.add_argument("--num_clips", type=int, default=12, help="demo clips to generate")
    p.add_argument("--clip_frames", type=int, default=25, help="frames per demo clip")
    p.add_argument("--clip_width", type=int, default=96)
    p.add_argument("--clip_height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--num_frames", type=int, default=17)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--model_dtype", default="fp32", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    p.add_argument("--decode_only", action="store_true", help="skip the VAE (no checkpoint needed)")
    p.add_argument("--json", default=None, help="also write the figures to this json file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = parse_dtype(args.model_dtype)

    with tempfile.TemporaryDirectory(prefix="bench_extraction_") as tmp:
        workdir = Path(tmp)
        entries = _entries(args, workdir)
        vae = None if args.decode_only else load_vae(_vae_path(args, workdir), device, dtype)
        # warm-up: first decode and first encode pay one-off costs (worker start, kernel selection)
        measure(entries[:1], args, vae, device, dtype)
        decode = measure(entries, args)
        full = None if vae is None else measure(entries, args, vae, device, dtype)

    figures = {"device": str(device), "model_dtype": args.model_dtype, "num_workers": args.num_workers,
               "torch_threads": torch.get_num_threads(), "size": f"{args.width}x{args.height}",
               "num_frames": args.num_frames, "decode": decode, "decode_encode": full}
    for name, r in (("decode only", decode), ("decode+encode", full)):
        if r is None:
            continue
        print(f"{name:>14}: {r['clips_per_s']:8.2f} clips/s {r['frames_per_s']:9.1f} frames/s "
              f"({r['clips']} clips, {r['frames']} frames, {r['seconds']:.2f} s, {r['failed']} failed)")
    print(f"{'':>14}  device {device}, {args.model_dtype}, {args.width}x{args.height}, <= {args.num_frames} "
          f"frames, {args.num_workers} decode workers, {torch.get_num_threads()} torch threads")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
