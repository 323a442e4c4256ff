"""The tiny model in the official folder layout plus 8 demo clips (25 frames, 64x64 -> 4 latent frames) with their
VAE latents and text features, built through the same tools a user runs: what the script-level tests train on."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_demo_workspace(root: Path, kind: str = "pyramid_flux") -> dict[str, Path]:
    """Build under ``root``; returns the folders and annotation files the tests use."""
    from tools.build_tiny_checkpoint import build_tiny_checkpoint
    from tools.extract_text_features import main as extract_text
    from tools.extract_video_vae_latents import main as extract_latents
    from tools.make_demo_dataset import make_demo_dataset

    model = build_tiny_checkpoint(root / "model", kind=kind)
    data = root / "data"
    make_demo_dataset(data, num_clips=8, num_frames=25, width=64, height=64)
    anno = data / "video_text.jsonl"
    common = ["--anno_file", str(anno), "--no_progress"]
    assert extract_latents(["--model_path", str(model / "causal_video_vae"), "--width", "64", "--height", "64",
                            "--num_frames", "25", "--model_dtype", "fp32", "--num_workers", "0", *common]) == 0
    assert extract_text(["--model_name", kind, "--model_path", str(model), "--model_dtype", "fp32", *common]) == 0
    return {"root": root, "model": model, "data": data, "anno": anno, "images": data / "image_text.jsonl"}


def run_train_script(script: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``scripts/<script>`` with ``env`` over quiet CPU defaults (no loader workers, no warmup, one epoch, one
    thread, no compilation); a failed launch fails the test with the end of its output."""
    full = {**os.environ, "NUM_WORKERS": "0", "WARMUP_STEPS": "0", "WARMUP_EPOCHS": "0", "EPOCHS": "1",
            "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", **env}
    result = subprocess.run(["sh", str(REPO / "scripts" / script)], env=full, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result
