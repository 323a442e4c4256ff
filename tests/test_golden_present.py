"""The reference-written golden vectors ship with the repository: every file the parity tests read must be here.

A clone without them would otherwise pass with fewer checks; this list makes a missing file a named failure.
"""
from pathlib import Path

EXPECTED = [
    "README.md",
    "flux_tiny/config.json", "flux_tiny/diffusion_pytorch_model.safetensors", "flux_tiny/cases.json",
    "flux_tiny/case_nonar.safetensors", "flux_tiny/case_ar.safetensors", "flux_tiny/case_infer.safetensors",
    "flux_tiny/generate.safetensors",
    "mmdit_tiny/config.json", "mmdit_tiny/diffusion_pytorch_model.safetensors", "mmdit_tiny/cases.json",
    "mmdit_tiny/case_nonar.safetensors", "mmdit_tiny/case_ar.safetensors", "mmdit_tiny/case_infer.safetensors",
    "mmdit_tiny/generate.safetensors",
    "vae_tiny/config.json", "vae_tiny/diffusion_pytorch_model.safetensors", "vae_tiny/cases.json",
    "vae_tiny/cases.safetensors",
    "pipeline/objective.json", "pipeline/pyramid_latent.safetensors",
    "scheduler/tables.json",
    "keys/README.md", "keys/pyramid_flux_miniflux.json", "keys/pyramid_mmdit_sd3.json", "keys/causal_video_vae.json",
]


def test_every_golden_file_is_in_the_repository(golden_dir: Path):
    missing = [name for name in EXPECTED if not (golden_dir / name).is_file()]
    assert not missing, f"golden files missing from {golden_dir}: {missing} (restore with `git checkout -- tests/golden`)"
    # Non-empty and not a Git LFS pointer: a pointer file would make every parity test fail obscurely.
    for name in EXPECTED:
        head = (golden_dir / name).read_bytes()[:64]
        assert head and not head.startswith(b"version https://git-lfs"), f"{name} is empty or an LFS pointer"
