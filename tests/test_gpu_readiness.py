"""What a first GPU run depends on, checked on CPU: gradient reduction dtype, fp32 timesteps, memory defaults.

The two-process ZeRO-3 load-memory check lives in ``test_zero3_load.py``.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

from trainer_misc.optim.engine import DEEPSPEED_BUCKET_ELEMENTS, EngineConfig, deepspeed_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


# --------------------------------------------------------------------------- gradient reduction / accumulation

@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_deepspeed_reduces_and_accumulates_bf16_gradients_in_fp32_by_default(strategy):
    cfg = deepspeed_config(EngineConfig(strategy=strategy, mixed_precision="bf16", grad_accum_steps=2), CUDA)
    assert cfg["bf16"]["enabled"]
    assert cfg["communication_data_type"] == "fp32"
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    fast = deepspeed_config(EngineConfig(strategy=strategy, mixed_precision="bf16", grad_reduce_dtype="model"), CUDA)
    assert fast["communication_data_type"] == "bf16" and fast["data_types"] == {"grad_accum_dtype": "bf16"}


def test_deepspeed_buckets_are_sized_for_the_dit_not_the_5e8_default():
    largest_released_tensor = (1920 + 4 * 1920) * 1920  # a single block's proj_out (mlp + attention -> dim)
    for strategy in ("zero2", "zero3"):
        zero = deepspeed_config(EngineConfig(strategy=strategy), CUDA)["zero_optimization"]
        assert zero["reduce_bucket_size"] == DEEPSPEED_BUCKET_ELEMENTS
        assert zero["overlap_comm"] is True
        key = "allgather_bucket_size" if strategy == "zero2" else "stage3_prefetch_bucket_size"
        assert zero[key] == DEEPSPEED_BUCKET_ELEMENTS
    assert largest_released_tensor < DEEPSPEED_BUCKET_ELEMENTS < 5e8
    assert deepspeed_config(EngineConfig(strategy="zero2"), CPU)["zero_optimization"]["overlap_comm"] is False


def test_optimizer_offload_config_pins_memory_on_gpu_and_keeps_our_cpu_adam():
    """OFFLOAD=1: ZeRO's optimizer state goes to pinned host memory on GPUs; the optimizer we build is kept (accelerate
    would otherwise swap in an L2-mode DeepSpeedCPUAdam); DDP has no optimizer offload and is refused."""
    for strategy in ("zero2", "zero3"):
        cfg = deepspeed_config(EngineConfig(strategy=strategy, offload_optimizer=True), CUDA)
        assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
        assert cfg["zero_force_ds_cpu_optimizer"] is False
        plain = deepspeed_config(EngineConfig(strategy=strategy), CUDA)
        assert "offload_optimizer" not in plain["zero_optimization"] and "zero_force_ds_cpu_optimizer" not in plain
    assert deepspeed_config(EngineConfig(strategy="zero2", offload_optimizer=True), CPU)["zero_optimization"][
        "offload_optimizer"]["pin_memory"] is False
    with pytest.raises(ValueError, match="SHARD_STRATEGY=zero2 or zero3"):
        EngineConfig(strategy="ddp", offload_optimizer=True)


def test_grad_reduce_dtype_is_checked():
    with pytest.raises(ValueError, match="grad_reduce_dtype"):
        EngineConfig(grad_reduce_dtype="bf16")


# --------------------------------------------------------------------------- timesteps stay fp32

@pytest.mark.parametrize("engine", ["bf16_module", "ddp_bf16"])
def test_timesteps_reach_the_embedding_in_fp32_unrounded(golden_dir, engine):
    """A bf16 module (what DeepSpeed's bf16 engine makes of the DiT: the inputs are cast to bf16 too) and DDP's fp32
    weights under autocast: either way the timestep embedding must see the objective's fp32 timesteps exactly. The
    real DeepSpeed engine (ZeRO-3, bf16) is checked the same way in
    tests/test_zero3_load.py::test_zero3_bf16_training_keeps_timesteps_and_gradient_accumulation_in_fp32."""
    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    from pyramid_dit.objective import PyramidFlowObjective
    from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler
    from pyramid_dit.text_features import TextFeatures
    from trainer_misc.data.datasets import TrainBatch
    from trainer_misc.loop.pyramid_loss import PyramidFlowLoss
    from trainer_misc.loop.step import StepContext

    dit = PyramidFluxTransformer.from_pretrained(golden_dir / "flux_tiny")
    if engine == "bf16_module":
        dit = dit.to(torch.bfloat16)
    objective = PyramidFlowObjective(PyramidFlowMatchEulerDiscreteScheduler(), "pyramid_flux", text_drop_rate=0.0,
                                     max_temporal_length=2, video_sync_group=1)
    drawn, reached = [], []
    noise_latents = objective.noise_latents
    objective.noise_latents = lambda *a, **k: drawn.append(noise_latents(*a, **k)) or drawn[-1]
    dit.time_text_embed.register_forward_pre_hook(lambda module, args: reached.append(args[0].detach().clone()))

    g = torch.Generator().manual_seed(0)
    batch = TrainBatch(captions=[""] * 4, paths=[""] * 4, latents=torch.randn(4, 16, 2, 16, 16, generator=g),
                       text_features=TextFeatures(torch.randn(4, 8, 32, generator=g),
                                                  torch.ones(4, 8, dtype=torch.long), torch.randn(4, 24, generator=g)))
    param_dtype = next(dit.parameters()).dtype
    ctx = StepContext(step=0, micro_step=0, micro_index=0, rank=0, world_size=1, sync_rank=0, sync_group=1,
                      sync_group_index=0, device=CPU, dtype=param_dtype, module=dit)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=engine == "ddp_bf16"):
        loss, _ = PyramidFlowLoss(objective, use_temporal_pyramid=False)(dit, batch, ctx)
    assert torch.isfinite(loss)
    drawn_t = drawn[0].timestep_ratio
    assert drawn_t.dtype == torch.float32
    assert (drawn_t != drawn_t.bfloat16().float()).any(), "no timestep here would be changed by bf16 rounding"
    assert len(reached) == 1 and reached[0].dtype == torch.float32
    assert torch.equal(reached[0], drawn_t)


# --------------------------------------------------------------------------- latents: read only the frames used

def test_latent_partial_read_takes_only_the_requested_frames(tmp_path):
    from trainer_misc.data.datasets import VideoLatentDataset
    from trainer_misc.data.features import load_latent
    from trainer_misc.files import atomic_save_safetensors

    latent = torch.randn(1, 16, 12, 4, 6)
    latent[:, :, 4:] = float("nan")  # frames past the 4 used: never read, so never checked or copied
    path = tmp_path / "clip.safetensors"
    atomic_save_safetensors({"latent": latent}, path)
    part = load_latent(path, frames=4)
    assert part.shape == (1, 16, 4, 4, 6) and part.is_contiguous()
    assert torch.equal(part, latent[:, :, :4])
    with pytest.raises(ValueError, match="NaN"):  # the whole clip is what a full read checks
        load_latent(path)

    pt = tmp_path / "clip.pt"
    torch.save(latent[:, :, :4].clone(), pt)
    assert torch.equal(load_latent(pt, frames=2), latent[:, :, :2])

    from trainer_misc.data.annotation import VideoEntry
    entry = VideoEntry(index=0, line=1, video=tmp_path / "clip.mp4", text="t", latent=path)
    usable = SimpleNamespace(entry=entry, frames=8)  # what the data check hands the dataset
    item = VideoLatentDataset([usable], max_frames=4, latent_size=(4, 6), load_text_fea=False)[0]
    assert "bad" not in item and torch.equal(item["latents"], latent[0, :, :4])


def test_a_bf16_module_without_autocast_is_as_accurate_as_under_autocast(golden_dir):
    """Divergence: under DeepSpeed bf16 the DiT runs as a bf16 module without autocast; the reference runs its bf16
    module under autocast. Against an fp32 run of the same weights and inputs, our parameter gradients must be no
    further off than autocast's (on this CPU they are identical: autocast changes nothing for a bf16 module here)."""
    from test_dit import make_inputs

    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer

    inputs = make_inputs([[(1, 8, 8), (2, 16, 16)], [(4, 16, 16)]], batch=2, text_len=8, seed=1)

    def gradients(dtype: torch.dtype, autocast: bool) -> torch.Tensor:
        model = PyramidFluxTransformer.from_pretrained(golden_dir / "flux_tiny", torch_dtype=dtype)
        cast = {k: [[c.to(dtype) for c in col] for col in v] if k == "sample" else
                v.to(dtype) if v.is_floating_point() and k != "timestep_ratio" else v for k, v in inputs.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs = model(**cast)
        g = torch.Generator().manual_seed(7)
        sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
        return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])

    exact = gradients(torch.float32, autocast=False)
    ours = (gradients(torch.bfloat16, autocast=False) - exact).norm() / exact.norm()
    theirs = (gradients(torch.bfloat16, autocast=True) - exact).norm() / exact.norm()
    assert 0 < ours <= 1.05 * theirs, (ours.item(), theirs.item())
