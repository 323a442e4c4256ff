"""Generation with sequence parallelism: 2 processes (gloo) split each video's DiT sequence and produce the video of
1 process for the same seed.

* Pipeline level: the reference run replayed with its recorded noise (golden ``flux_tiny`` generate case: 4 latent
  frames, 3 stages, CFG), once alone and once over a 2-process SP group, in the same processes.
* Script level: ``GPUS=2 sh scripts/generate.sh`` on the tiny checkpoint writes the frames ``GPUS=1`` writes.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "flux_tiny"
TOL = 1e-5
LAUNCH_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TORCHDYNAMO_DISABLE="1")
    return env


def worker(result_dir: Path) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    from pyramid_dit.noise import ReplayNoise
    from pyramid_dit.pipeline import PyramidFlowPipeline
    from pyramid_dit.sequence_parallel import SequenceParallel
    from pyramid_dit.text_features import TextFeatures
    from trainer_misc.runtime.distributed import sequence_parallel_group

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    case = load_file(GOLDEN / "generate.safetensors")
    pipe = PyramidFlowPipeline(PyramidFluxTransformer.from_pretrained(GOLDEN))

    def run() -> torch.Tensor:
        noise = ReplayNoise(case["initial_noise"].clone(), [case[f"block_noise.{i}"].clone() for i in range(8)])
        return pipe.generate(
            prompt_features=TextFeatures(case["prompt_embeds"], case["prompt_attention_mask"],
                                         case["pooled_prompt_embeds"]),
            negative_features=TextFeatures(case["negative_prompt_embeds"], case["negative_prompt_attention_mask"],
                                           case["negative_pooled_prompt_embeds"]),
            height=128, width=192, temp=4, num_inference_steps=[3, 3, 3], video_num_inference_steps=[2, 2, 2],
            guidance_scale=7.0, video_guidance_scale=5.0, noise=noise, output_type="latent", progress=False)

    alone = run()
    pipe.dit.enable_sequence_parallel(SequenceParallel.of(sequence_parallel_group(2)))
    split = run()
    ref = case["video_latent"]

    def rel(a, b) -> float:
        return ((a - b).abs().max() / b.abs().max()).item()

    report = {"sp_vs_alone": rel(split, alone), "sp_vs_reference": rel(split, ref),
              "alone_vs_reference": rel(alone, ref)}
    result_dir.mkdir(parents=True, exist_ok=True)
    (result_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def test_sp_generation_equals_one_process_and_the_reference(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    files = [tmp_path / f"rank{r}.json" for r in range(2)]
    if not all(f.is_file() for f in files):
        pytest.fail(f"launch failed (rc {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    for rank, f in enumerate(files):
        r = json.loads(f.read_text())
        print(f"rank {rank}: SP=2 vs SP=1 latents {r['sp_vs_alone']:.2e}, vs reference {r['sp_vs_reference']:.2e} "
              f"(SP=1 vs reference {r['alone_vs_reference']:.2e})")
        assert r["sp_vs_alone"] < TOL and r["sp_vs_reference"] < TOL, r


def test_generate_script_with_two_processes_writes_the_one_process_video(tmp_path):
    from PIL import Image

    from tools.build_tiny_checkpoint import build_tiny_checkpoint
    from tools.generate import main as generate

    model = build_tiny_checkpoint(tmp_path / "tiny")
    one, two = tmp_path / "gpus1.png", tmp_path / "gpus2.png"
    # One process (in this one), then GPUS=2 through the script.
    generate(["--model_path", str(model), "--height", "64", "--width", "64", "--temp", "2", "--prompt", "a dog",
              "--num_inference_steps", "2", "--video_num_inference_steps", "1", "--seed", "3", "--device", "cpu",
              "--output", str(one)])
    env = {**_env(), "MODEL_PATH": str(model), "HEIGHT": "64", "WIDTH": "64", "TEMP": "2", "GPUS": "2",
           "NUM_INFERENCE_STEPS": "2", "VIDEO_NUM_INFERENCE_STEPS": "1", "PROMPT": "a dog", "SEED": "3",
           "DEVICE": "cpu", "OUTPUT": str(two)}
    proc = subprocess.run(["sh", str(REPO / "scripts" / "generate.sh")], env=env, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"GPUS=2:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("wrote ") == 1, proc.stdout  # only process 0 writes
    a, b = (np.asarray(Image.open(f)).astype(np.int16) for f in (one, two))
    diff = np.abs(a - b)
    print(f"frame strip {a.shape}: max |difference| {diff.max()} of 255, {np.count_nonzero(diff)} of {diff.size} "
          "values differ")
    assert a.shape == b.shape
    assert diff.max() <= 1  # float rounding may move a value across a uint8 step, nothing more


def test_generate_script_refuses_gpus_that_do_not_divide_the_heads(tmp_path):
    (tmp_path / "diffusion_transformer_384p").mkdir()
    (tmp_path / "diffusion_transformer_384p" / "config.json").write_text('{"num_attention_heads": 24}')
    env = {**_env(), "MODEL_PATH": str(tmp_path), "GPUS": "5", "PROMPT": "a dog"}
    proc = subprocess.run(["sh", str(REPO / "scripts" / "generate.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "GPUS=5 must divide the DiT's 24 attention heads" in proc.stderr


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
