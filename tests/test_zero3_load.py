"""ZeRO-3 loads the DiT without a full copy per rank, and trains it in bf16 with fp32 timesteps and fp32 gradients.

One two-process launch (gloo, CPU) of this file as a worker. Each rank:

1. builds and loads a ~20 M-parameter DiT from a ``save_pretrained`` folder through
   ``load_pretrained_for_training`` (ZeRO-3, bf16) while a thread samples the process's resident memory
   (``RssAnon + RssFile`` from /proc: private allocations plus mapped checkpoint pages);
2. gathers the weights back and compares them with the file's (rounded to bf16, as DeepSpeed's bf16 engine
   always did);
3. measures the previous path the same way: ``from_pretrained`` in fp32 and the bf16 cast DeepSpeed makes before
   it partitions (the full copy every rank used to hold);
4. trains two micro-batches through ``TrainEngine`` and records the dtype of the timesteps reaching the
   embedding and of ZeRO-3's gradient accumulation buffer.
"""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import torch
from two_ranks import run_two_ranks

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LAUNCH_TIMEOUT_S = 420
# Tiny but not trivial: 2 double + 4 single blocks of width 384 = 20.4 M parameters (82 MB in fp32).
DIT_CONFIG = dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=6,
                  joint_attention_dim=384, pooled_projection_dim=64, axes_dims_rope=[16, 24, 24], in_channels=64)


def _rss_mb() -> float:
    total = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                total += int(line.split()[1]) / 1024
    return total


class PeakRss:
    """Highest resident memory (MB above the start) seen by a 1 ms sampling thread while the block runs."""

    def __enter__(self) -> "PeakRss":
        self.start = _rss_mb()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())
        self.delta = self.peak - self.start


# ----------------------------------------------------------------------------------------------------- worker

def _worker(spec: dict) -> None:
    torch.set_num_threads(1)
    import gc

    import deepspeed
    import torch.distributed as dist

    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    from pyramid_dit.objective import PyramidFlowObjective
    from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler
    from pyramid_dit.text_features import TextFeatures
    from trainer_misc.data.datasets import TrainBatch
    from trainer_misc.loop.pyramid_loss import PyramidFlowLoss
    from trainer_misc.loop.step import StepContext
    from trainer_misc.optim.adamw import build_adamw
    from trainer_misc.optim.engine import EngineConfig, TrainEngine, model_init_context
    from trainer_misc.optim.zero3 import load_pretrained_for_training, safetensors_checkpoint
    from trainer_misc.runtime.distributed import destroy_process_group

    folder = Path(spec["model"])
    cfg = EngineConfig(strategy="zero3", mixed_precision="bf16", device="cpu", grad_accum_steps=2,
                       micro_batch_size=4)
    with model_init_context(cfg):  # process group and DeepSpeed's modules up before measuring
        pass
    gc.collect()
    with PeakRss() as zero3_load:
        model = load_pretrained_for_training(PyramidFluxTransformer, folder, "dit", cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    params = list(model.named_parameters())
    report = {"rank": rank, "world_size": world, "load_peak_mb": zero3_load.delta,
              "numel_total": sum(p.ds_numel for _, p in params),
              "numel_held": sum(p.ds_tensor.numel() for _, p in params),
              "full_tensors_held": sum(p.numel() for _, p in params),  # ZeRO-3 leaves p.data empty
              "all_partitioned": all(hasattr(p, "ds_tensor") for _, p in params),
              "partition_dtype": str(params[0][1].ds_tensor.dtype)}

    # The loaded weights are the file's, rounded to the training dtype.
    entries = safetensors_checkpoint(folder / "dit")
    worst = 0.0
    for name, p in params:
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            worst = max(worst, (p.data.float() - entries[name].read().to(p.dtype).float()).abs().max().item())
    report["max_weight_diff"] = worst

    # The previous path: every rank loads the full fp32 model, DeepSpeed casts it to bf16 before partitioning.
    gc.collect()
    with PeakRss() as full_load:
        full = PyramidFluxTransformer.from_pretrained(folder, subfolder="dit", torch_dtype=torch.float32)
        full = full.to(torch.bfloat16)
    report["full_copy_peak_mb"] = full_load.delta
    del full
    gc.collect()

    # Train two micro-batches (one accumulation window) through the engine, bf16 ZeRO-3.
    engine = TrainEngine(model, build_adamw(model, 1e-4, (0.9, 0.999), 1e-8, 0.0), cfg)
    reached = []
    engine.module.time_text_embed.register_forward_pre_hook(lambda m, args: reached.append(str(args[0].dtype)))
    objective = PyramidFlowObjective(PyramidFlowMatchEulerDiscreteScheduler(), "pyramid_flux", text_drop_rate=0.0,
                                     max_temporal_length=2, video_sync_group=1)
    loss_fn = PyramidFlowLoss(objective, use_temporal_pyramid=False)
    g = torch.Generator().manual_seed(rank)
    grad_dtypes = []
    for k in range(2):
        batch = TrainBatch(captions=[""] * 4, paths=[""] * 4, latents=torch.randn(4, 16, 2, 16, 16, generator=g),
                           text_features=TextFeatures(torch.randn(4, 8, 384, generator=g),
                                                      torch.ones(4, 8, dtype=torch.long),
                                                      torch.randn(4, 64, generator=g)))
        ctx = StepContext(step=0, micro_step=k, micro_index=k, rank=rank, world_size=world, sync_rank=0,
                          sync_group=1, sync_group_index=rank, device=engine.device, dtype=engine.param_dtype,
                          module=engine.module)
        with engine.accumulate():
            loss, _ = loss_fn(engine.model, batch, ctx)
            engine.backward(loss)
            zero_optimizer = engine.optimizer.optimizer
            grad_dtypes.append(str(zero_optimizer.grad_partitions_flat_buffer.dtype))
            if engine.at_boundary:
                outcome = engine.step()
    report.update(param_dtype=str(engine.param_dtype), timestep_dtypes=reached, grad_accum_dtypes=grad_dtypes,
                  communication_dtype=str(engine.model.communication_data_type), applied=outcome.applied,
                  grad_norm=float(outcome.grad_norm))
    out = Path(spec["result_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    destroy_process_group()


# ----------------------------------------------------------------------------------------------------- test

@pytest.fixture(scope="module")
def zero3_reports(tmp_path_factory) -> list[dict]:
    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer

    tmp = tmp_path_factory.mktemp("zero3_load")
    torch.manual_seed(0)
    PyramidFluxTransformer(**DIT_CONFIG).save_pretrained(tmp / "model" / "dit")
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"model": str(tmp / "model"), "result_dir": str(tmp / "results")}))
    # Large blocks mmapped (and so returned when freed): resident memory then tracks live tensors, not what
    # glibc keeps cached after the construction temporaries are freed.
    return run_two_ranks(Path(__file__).resolve(), spec, tmp / "results", timeout=LAUNCH_TIMEOUT_S,
                         env={"MALLOC_MMAP_THRESHOLD_": "65536"})


def test_zero3_load_holds_a_partition_per_rank_not_the_whole_model(zero3_reports):
    full_fp32_mb = None
    for rep in zero3_reports:
        print(f"rank {rep['rank']}: load peak {rep['load_peak_mb']:.1f} MB (ZeRO-3 partitioned) vs "
              f"{rep['full_copy_peak_mb']:.1f} MB (full copy); parameter elements held "
              f"{rep['numel_held']:,} of {rep['numel_total']:,}")
        assert rep["world_size"] == 2 and rep["all_partitioned"]
        assert rep["full_tensors_held"] == 0
        assert rep["numel_held"] <= rep["numel_total"] // 2 + 4096  # half (+ alignment padding)
        full_fp32_mb = rep["numel_total"] * 4 / 2**20
        # The previous path really held the whole model (fp32 pages + its bf16 cast) ...
        assert rep["full_copy_peak_mb"] > 0.9 * full_fp32_mb
        # ... the partitioned load about a quarter of that: half the model, in bf16, plus one gathered tensor.
        assert rep["load_peak_mb"] < 0.4 * rep["full_copy_peak_mb"]
        assert rep["partition_dtype"] == "torch.bfloat16"
    assert full_fp32_mb > 70  # tiny, but large enough that process noise cannot hide a full copy


def test_zero3_partitioned_load_gives_the_checkpoint_weights(zero3_reports):
    for rep in zero3_reports:
        assert rep["max_weight_diff"] == 0.0


def test_zero3_bf16_training_keeps_timesteps_and_gradient_accumulation_in_fp32(zero3_reports):
    for rep in zero3_reports:
        assert rep["param_dtype"] == "torch.bfloat16"
        assert rep["timestep_dtypes"] == ["torch.float32"] * 2
        assert rep["grad_accum_dtypes"] == ["torch.float32"] * 2
        assert rep["communication_dtype"] == "torch.float32"
        assert rep["applied"] and rep["grad_norm"] is not None and rep["grad_norm"] > 0
    assert zero3_reports[0]["grad_norm"] == zero3_reports[1]["grad_norm"]


if __name__ == "__main__":
    _worker(json.loads(Path(sys.argv[1]).read_text()))
