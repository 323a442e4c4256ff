"""Two-process runs of the trainer on the toy model: ZeRO-2 (with resume), ZeRO-3 (sharding, skip, EMA, export), DDP.

Each strategy is launched once or twice with ``python -m torch.distributed.run --nproc_per_node 2`` running this
file as a worker; the worker writes one JSON per rank and the tests read them. Several silent failure modes exist
(accelerate falling back to one process, DeepSpeed degrading to DDP), so the tests assert the world size and the
real sharding rather than "it ran".
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from two_ranks import run_two_ranks

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LAUNCH_TIMEOUT_S = 420


# ----------------------------------------------------------------------------------------------------- worker

def _worker(spec: dict) -> None:
    torch.set_num_threads(1)
    from test_trainer_toy import ToyDataset, ToyModel, toy_loss

    from trainer_misc.loop.config import TrainConfig
    from trainer_misc.loop.trainer import train
    from trainer_misc.optim.master import held_elements
    from trainer_misc.runtime.distributed import destroy_process_group

    seen: list[dict] = []

    def loss_fn(model, batch, ctx):
        loss, stats = toy_loss(model, batch, ctx)
        seen.append({"micro_step": ctx.micro_step, "step": ctx.step, "sync_rank": ctx.sync_rank,
                     "group": ctx.sync_group_index, "indices": batch["index"].tolist(),
                     "local_loss": float(loss.detach())})
        return loss, stats

    torch.manual_seed(0)  # same initial weights on every rank
    model = ToyModel()
    cfg = TrainConfig(**spec["config"])
    out = Path(spec["result_dir"])

    state: dict = {"engine": None, "prev": None, "changed": [], "adam_steps": [], "ref_ema": None}

    def full_params(engine) -> dict:
        """Every rank takes part; rank 0 gets full fp32 copies (ZeRO-3 partitions gathered)."""
        params = dict(engine.module.named_parameters())
        if engine.cfg.strategy == "zero3":
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
                return {n: p.detach().float().clone() for n, p in params.items()}
        return {n: p.detach().float().clone() for n, p in params.items()}

    def on_step_end(record):
        engine = state["engine"]
        if engine is None:
            return
        chunks = [h.views("fp32").clone() for h in held_elements(engine)]
        if state["prev"] is not None:
            state["changed"].append(any(not torch.equal(a, b) for a, b in zip(state["prev"], chunks)))
        state["prev"] = chunks
        base = engine.optimizer.optimizer
        if engine.is_deepspeed:
            base = base.optimizer
        state["adam_steps"].append(sorted({float(s["step"]) for s in base.state.values() if "step" in s}))
        if spec.get("reference_ema"):
            full = full_params(engine)
            d = cfg.ema_decay
            if state["ref_ema"] is None:
                state["ref_ema"] = state.pop("ema_init")
            if (record.step - 1) % cfg.ema_update_every == 0:
                for n, v in full.items():
                    state["ref_ema"][n].mul_(d).add_(v, alpha=1.0 - d)

    # Capture the engine right after it is built: wrap TrainEngine construction.
    import trainer_misc.loop.trainer as trainer_mod
    original = trainer_mod.TrainEngine

    class CapturingEngine(original):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            state["engine"] = self
            state["prev"] = [h.views("fp32").clone() for h in held_elements(self)]
            if spec.get("reference_ema"):
                state["ema_init"] = full_params(self)

    trainer_mod.TrainEngine = CapturingEngine
    try:
        result = train(model, loss_fn, ToyDataset(spec.get("num_samples", 64), tuple(spec.get("poison", ()))), cfg,
                       on_step_end=on_step_end)
    finally:
        trainer_mod.TrainEngine = original
    engine = result.engine
    import torch.distributed as dist

    report = {
        "rank": engine.rank,
        "world_size": engine.world_size,
        "dist_world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "distributed_type": str(engine.accelerator.distributed_type),
        "sharding": engine.sharding_report(),
        "param_partitions": [[int(p.ds_tensor.numel()), int(p.ds_numel)] for p in engine.module.parameters()
                             if hasattr(p, "ds_tensor")],
        "records": [{"step": r.step, "loss": r.loss, "grad_norm": r.grad_norm, "skipped": r.skipped,
                     "dropped": r.dropped_micro_batches, "tokens_per_sec": r.tokens_per_sec} for r in result.records],
        "start_step": result.start_step,
        "skipped_updates": result.skipped_updates,
        "dropped_micro_batches": result.dropped_micro_batches,
        "seen": seen,
        "changed": state["changed"],
        "adam_steps": state["adam_steps"],
        "exported": [str(p) for p in result.exported],
    }
    # Export equality: the exported folder holds exactly the trained (gathered) weights.
    full = full_params(engine)
    import hashlib
    weights = b"".join(v.numpy().tobytes() for _, v in sorted(full.items()))
    report["param_digest"] = hashlib.sha256(weights).hexdigest()
    if engine.is_main and result.exported:
        from safetensors.torch import load_file
        exported = {k: v.clone() for k, v in load_file(str(Path(result.exported[0]) / "model.safetensors")).items()}
        report["export_keys_match"] = sorted(exported) == sorted(engine.module.state_dict())
        report["export_max_diff"] = max((exported[n].float() - v).abs().max().item() for n, v in full.items())
        if spec.get("reference_ema") and len(result.exported) > 1:
            ema = {k: v.clone() for k, v in load_file(str(Path(result.exported[1]) / "model.safetensors")).items()}
            report["ema_max_diff"] = max((ema[n].float() - v).abs().max().item()
                                         for n, v in state["ref_ema"].items())
            report["ema_vs_model_max_diff"] = max((ema[n].float() - full[n]).abs().max().item() for n in full)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{engine.rank}.json").write_text(json.dumps(report))
    destroy_process_group()


# ----------------------------------------------------------------------------------------------------- launcher

def _launch(tmp: Path, name: str, config: dict, **extra) -> list[dict]:
    """Run the worker on 2 processes; return both ranks' reports (asserting the launch succeeded)."""
    result_dir = tmp / f"{name}_results"
    spec = {"config": config, "result_dir": str(result_dir), **extra}
    spec_file = tmp / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    # A private extensions folder: shows whether DeepSpeed JIT-compiled any C++ op (it must not on CPU).
    env = {"TOKENIZERS_PARALLELISM": "false", "TORCH_EXTENSIONS_DIR": str(tmp / "torch_extensions")}
    return run_two_ranks(Path(__file__).resolve(), spec_file, result_dir, timeout=LAUNCH_TIMEOUT_S,
                         what=f"{name}: launch", env=env)


def _base_config(out: Path, strategy: str, **kw) -> dict:
    cfg = dict(output_dir=str(out), max_steps=6, batch_size=4, strategy=strategy, mixed_precision="fp32",
               device="cpu", grad_accum_steps=2, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0,
               lr_scheduler="constant_with_warmup", warmup_steps=2, seed=7)
    cfg.update(kw)
    return cfg


# ----------------------------------------------------------------------------------------------------- ZeRO-2

@pytest.fixture(scope="module")
def zero2_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero2")
    full_dir = tmp / "full"
    config = _base_config(full_dir, "zero2", checkpoint_every=3, ema_decay=0.8, ema_update_every=1,
                          video_sync_group=2, skip_loss_threshold=200.0)
    # Poison one sample of micro-batch 7 (step 4, last micro-batch) and of micro-batch 8 (step 5, first one):
    # both ranks read them (one sync group), so those micro-batches are dropped and the others still update.
    from trainer_misc.data.sampler import ResumableBatchSampler

    order = ResumableBatchSampler(64, 4, seed=config["seed"]).epoch_batches(0)
    full = _launch(tmp, "full", config, poison=[order[7][0], order[8][0]])
    # The "interrupted" run: the full run's output as it was right after the step-3 checkpoint.
    resumed_dir = tmp / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(full_dir / "checkpoints" / "checkpoint-3", resumed_dir / "checkpoints" / "checkpoint-3")
    resumed = _launch(tmp, "resumed", {**config, "output_dir": str(resumed_dir)}, poison=[order[7][0], order[8][0]])
    return full, resumed, full_dir, resumed_dir


def test_zero2_world_size_and_optimizer_sharding(zero2_runs):
    full, _, _, _ = zero2_runs
    for rep in full:
        assert rep["world_size"] == 2 and rep["dist_world_size"] == 2
        assert rep["distributed_type"].endswith("DEEPSPEED")
        sh = rep["sharding"]
        # ZeRO-2: parameters replicated, Adam state partitioned (each rank holds about half).
        assert sh["param_numel_local"] == sh["param_numel_total"]
        assert 0 < sh["optim_state_numel_local"] < sh["param_numel_total"]
        assert sh["optim_state_numel_local"] <= (sh["param_numel_total"] + 1) // 2 + 64  # + alignment padding


def test_zero2_on_cpu_compiles_no_deepspeed_op(zero2_runs):
    # DeepSpeed would otherwise build its deepspeed_shm_comm op with g++ (~2 min, silent) on the first CPU launch.
    _, _, full_dir, _ = zero2_runs
    extensions = full_dir.parent / "torch_extensions"
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(extensions.rglob("*"))


def test_zero2_sync_group_reads_same_clip_at_different_positions(zero2_runs):
    full, _, _, _ = zero2_runs
    r0, r1 = (sorted(rep["seen"], key=lambda s: s["micro_step"]) for rep in full)
    assert [s["indices"] for s in r0] == [s["indices"] for s in r1]
    assert {s["sync_rank"] for s in r0} == {0} and {s["sync_rank"] for s in r1} == {1}
    assert len(r0) == 6 * 2 and [s["micro_step"] for s in r0] == list(range(12))
    # distinct batches within the run (no repeats before an epoch ends: 64 samples / 4 = 16 batches)
    assert len({tuple(s["indices"]) for s in r0}) == 12


def test_zero2_partially_dropped_windows_still_update(zero2_runs):
    full, _, _, _ = zero2_runs
    for rep in full:
        assert [r["dropped"] for r in rep["records"]] == [0, 0, 0, 1, 1, 0]
        assert not any(r["skipped"] for r in rep["records"])
        assert all(rep["changed"]) and rep["dropped_micro_batches"] == 2 and rep["skipped_updates"] == 0
        assert [s[-1] for s in rep["adam_steps"]] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_zero2_resume_continues_the_same_loss_curve(zero2_runs):
    full, resumed, full_dir, resumed_dir = zero2_runs
    for f, r in zip(full, resumed):
        assert r["start_step"] == 3
        assert r["dropped_micro_batches"] == 2  # the counter continues from the checkpoint (0) and adds 2
        tail = [rec for rec in f["records"] if rec["step"] > 3]
        assert [rec["step"] for rec in r["records"]] == [4, 5, 6]
        for a, b in zip(tail, r["records"]):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        # the data position was restored: same batches at the same micro steps
        seen_full = {s["micro_step"]: s["indices"] for s in f["seen"]}
        assert all(seen_full[s["micro_step"]] == s["indices"] for s in r["seen"])
        assert min(s["micro_step"] for s in r["seen"]) == 6
    # final weights and EMA agree too
    from safetensors.torch import load_file
    for name in ("transformer", "transformer_ema"):
        a = load_file(str(full_dir / "export" / name / "model.safetensors"))
        b = load_file(str(resumed_dir / "export" / name / "model.safetensors"))
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # metrics.jsonl of the resumed run holds one continuous curve, steps 4..6 after the checkpoint
    lines = [json.loads(x) for x in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [4, 5, 6]


# ----------------------------------------------------------------------------------------------------- ZeRO-3

@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    # batch_size 4, 2 data streams, shuffle off: step s (GA 1) reads batch 2s + rank. Sample 9 sits in batch 2,
    # read by rank 0 at step 1 -> the mean loss over ranks is huge at step 1 only.
    config = _base_config(tmp / "out", "zero3", max_steps=4, grad_accum_steps=1, shuffle=False,
                          skip_loss_threshold=200.0, ema_decay=0.5, ema_update_every=1)
    return _launch(tmp, "run", config, poison=[9], reference_ema=True)


def test_zero3_parameters_are_partitioned(zero3_run):
    for rep in zero3_run:
        assert rep["world_size"] == 2 and rep["dist_world_size"] == 2
        assert rep["distributed_type"].endswith("DEEPSPEED")
        parts = rep["param_partitions"]
        assert len(parts) == 7  # every parameter of the toy model is a ZeRO-3 parameter
        assert all(local < total for local, total in parts if total > 1)
        sh = rep["sharding"]
        assert sh["zero3_partitioned"]
        assert sh["param_numel_local"] < sh["param_numel_total"]
        assert 0 < sh["optim_state_numel_local"] < sh["param_numel_total"]


def test_zero3_abnormal_loss_skips_the_update(zero3_run):
    for rep in zero3_run:
        skipped = [rec["skipped"] for rec in rep["records"]]
        assert skipped == [False, True, False, False]
        assert rep["skipped_updates"] == 1 and rep["dropped_micro_batches"] == 1
        assert rep["records"][1]["grad_norm"] is None
        # parameters (this rank's partition) unchanged by the skipped step, changed by the others
        assert rep["changed"] == [True, False, True, True]
        # Adam's step counter did not advance on the skipped step: 1, 1, 2, 3
        assert [s[-1] for s in rep["adam_steps"]] == [1.0, 1.0, 2.0, 3.0]


def test_zero3_export_gathers_full_weights_and_ema(zero3_run):
    main = zero3_run[0]
    assert main["export_keys_match"]
    assert main["export_max_diff"] == 0.0
    assert main["ema_max_diff"] <= 1e-6
    assert main["ema_vs_model_max_diff"] > 1e-4  # the EMA really is an average, not a copy


# ----------------------------------------------------------------------------------------------------- DDP

@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return _launch(tmp, "run", _base_config(tmp / "out", "ddp", max_steps=3))


def test_ddp_two_processes_split_data_and_stay_in_sync(ddp_run):
    r0, r1 = ddp_run
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["distributed_type"].endswith("MULTI_CPU")
    idx0 = {i for s in r0["seen"] for i in s["indices"]}
    idx1 = {i for s in r1["seen"] for i in s["indices"]}
    assert idx0 and idx1 and not idx0 & idx1  # different data per rank without sync groups
    # The logged loss is the mean over ranks and micro-batches of the per-rank losses, which differ (other data) ...
    for rec in r0["records"]:
        local = [s["local_loss"] for r in (r0, r1) for s in r["seen"] if s["step"] == rec["step"] - 1]
        assert len(local) == 4 and len(set(local)) == 4
        assert rec["loss"] == pytest.approx(sum(local) / 4, rel=1e-6)
    # ... and the gradient all-reduce keeps the replicas identical: the same trained weights on both ranks.
    assert r0["param_digest"] == r1["param_digest"]
    assert r0["export_max_diff"] == 0.0


if __name__ == "__main__":
    _worker(json.loads(Path(sys.argv[1]).read_text()))
