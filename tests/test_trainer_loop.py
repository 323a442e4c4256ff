"""The training loop in one process (strategy ``ddp``, world size 1, fp32): resume, abnormal-loss skip, gradient
accumulation, logging, export. The two-process ZeRO runs are in test_trainer_distributed.py."""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from test_trainer_toy import ToyDataset, ToyModel, toy_loss

from trainer_misc.loop.config import TrainConfig
from trainer_misc.loop.trainer import train
from trainer_misc.optim.engine import reset_accelerate_state


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def _config(out, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), max_steps=6, batch_size=4, strategy="ddp", mixed_precision="fp32", device="cpu",
                grad_accum_steps=2, lr=1e-2, weight_decay=0.1, warmup_steps=3, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _run(cfg, data=None, model=None, **kw):
    torch.manual_seed(0)
    return train(model or ToyModel(), toy_loss, data or ToyDataset(64), cfg, **kw)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_from_newest_complete_checkpoint_continues_the_same_curve(tmp_path, caplog):
    cfg = _config(tmp_path, checkpoint_every=3, ema_decay=0.7, ema_update_every=1)
    full = _run(cfg)
    assert [c.name for c in full.checkpoints] == ["checkpoint-3", "checkpoint-6"]
    full_losses = [r.loss for r in full.records]
    ema_full = (tmp_path / "export" / "transformer_ema" / "model.safetensors").read_bytes()
    model_full = (tmp_path / "export" / "transformer" / "model.safetensors").read_bytes()
    # the LR schedule really drives the optimizer: warmup from 1e-6 to 1e-2 over 3 steps, then constant
    assert [r.lr for r in full.records] == [1e-6, (1e-2 - 1e-6) / 2 + 1e-6, 1e-2, 1e-2, 1e-2, 1e-2]

    # Simulate an interruption after step 3: the step-6 checkpoint and the export never happened, and a save of
    # step 5 was killed half-way (a .tmp folder and a folder without its 'complete' marker).
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-6")
    shutil.rmtree(tmp_path / "export")
    (tmp_path / "checkpoints" / "checkpoint-5.tmp").mkdir()
    (tmp_path / "checkpoints" / "checkpoint-5").mkdir()
    reset_accelerate_state()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer_misc"):
        resumed = _run(cfg)
    assert resumed.resumed_from.name == "checkpoint-3" and resumed.start_step == 3
    # The killed save's folder goes at start-up (on a full disk it holds space the run needs), not at the next save.
    said = [r.getMessage() for r in caplog.records]
    swept = [i for i, m in enumerate(said) if "checkpoint-5.tmp left by an interrupted save" in m]
    assert swept and swept[0] < min(i for i, m in enumerate(said) if m.startswith("resumed from")), said
    assert [r.loss for r in resumed.records] == full_losses[3:]  # bit-identical in one process
    assert (tmp_path / "export" / "transformer_ema" / "model.safetensors").read_bytes() == ema_full
    assert (tmp_path / "export" / "transformer" / "model.safetensors").read_bytes() == model_full
    assert [m["loss"] for m in _metrics(tmp_path)] == full_losses  # one continuous curve on disk

    # tensorboard got the scalars the issue asks for
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (tmp_path / "logs").iterdir():
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_sec", "train/tokens_per_sec",
            "train/skipped_updates", "train/pred_std"} <= tags


def _rewrite_verified(path, text: str) -> None:
    """Change a checkpoint file and its entry in the ``complete`` manifest (as a deliberate edit would)."""
    import hashlib

    path.write_text(text)
    marker_file = path.parent / "complete"
    marker = json.loads(marker_file.read_text())
    marker["files"][path.name] = {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    marker_file.write_text(json.dumps(marker))


def test_resume_refuses_a_checkpoint_of_another_run_shape(tmp_path):
    """A checkpoint is refused when its slots cannot be shared out (3 data streams on 2 processes would change the
    global batch), when it comes from an older format, or when its data position means other samples now."""
    from trainer_misc.state.trust import CheckpointError

    _run(_config(tmp_path, max_steps=2))
    state_file = tmp_path / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    _rewrite_verified(state_file, json.dumps({**state, "format": 1}))
    reset_accelerate_state()
    with pytest.raises(CheckpointError, match="written by an older version"):
        _run(_config(tmp_path, max_steps=4))
    _rewrite_verified(state_file, json.dumps(state))
    reset_accelerate_state()
    with pytest.raises(ValueError, match="data layout changed"):
        _run(_config(tmp_path, max_steps=4), data=ToyDataset(40))


def test_abnormal_loss_drops_micro_batches_and_skips_updates(tmp_path, caplog):
    # batch 2, GA 2, no shuffle: step s reads samples 4s..4s+3 as micro-batches (4s, 4s+1) and (4s+2, 4s+3).
    data = ToyDataset(32, poison=(5, 8, 11))  # step 1: first micro-batch bad; step 2: both bad
    changed, adam_steps = [], []

    def snapshot(engine):
        return [p.detach().clone() for p in engine.module.parameters()]

    holder = {}

    def on_step_end(record):
        engine = holder["engine"]
        now = snapshot(engine)
        changed.append(any(not torch.equal(a, b) for a, b in zip(holder["prev"], now)))
        holder["prev"] = now
        adam_steps.append(max(float(s["step"]) for s in engine.optimizer.optimizer.state.values()))

    import trainer_misc.loop.trainer as trainer_mod

    class Capturing(trainer_mod.TrainEngine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            holder["engine"], holder["prev"] = self, snapshot(self)

    original, trainer_mod.TrainEngine = trainer_mod.TrainEngine, Capturing
    try:
        with caplog.at_level(logging.WARNING, logger="trainer_misc"):
            result = _run(_config(tmp_path, max_steps=4, batch_size=2, shuffle=False, skip_loss_threshold=50.0,
                                  warmup_steps=0, checkpoint_every=2, keep_last_checkpoints=1), data=data,
                          on_step_end=on_step_end)
    finally:
        trainer_mod.TrainEngine = original
    recs = result.records
    assert [r.dropped_micro_batches for r in recs] == [0, 1, 2, 0]
    assert [r.skipped for r in recs] == [False, False, True, False]
    assert recs[2].grad_norm is None and recs[1].grad_norm is not None
    assert changed == [True, True, False, True]
    assert adam_steps == [1.0, 2.0, 2.0, 3.0]
    assert result.skipped_updates == 1 and result.dropped_micro_batches == 3
    assert sum("skip_loss_threshold" in r.message for r in caplog.records) == 3
    assert sum("optimizer step skipped" in r.message for r in caplog.records) == 1
    # counters are part of the checkpoint; keep_last_checkpoints=1 pruned the step-2 checkpoint
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-4"]
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["skipped_updates"] == 1 and state["dropped_micro_batches"] == 3 and state["micro_step"] == 8


def _plain_loss(model, batch, ctx):
    pred = model(batch["x"].to(ctx.dtype))
    return torch.mean((pred.float() - batch["y"]) ** 2), {}


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    results = {}
    for name, batch, ga in (("accum", 2, 2), ("big", 4, 1)):
        reset_accelerate_state()
        torch.manual_seed(0)
        cfg = _config(tmp_path / name, batch_size=batch, grad_accum_steps=ga, max_steps=4, max_grad_norm=0.5)
        results[name] = train(ToyModel(), _plain_loss, ToyDataset(64), cfg)
    a, b = results["accum"], results["big"]
    for ra, rb in zip(a.records, b.records):
        assert ra.loss == pytest.approx(rb.loss, rel=1e-6)
        assert ra.grad_norm == pytest.approx(rb.grad_norm, rel=1e-5)
    for pa, pb in zip(a.engine.module.parameters(), b.engine.module.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert a.records[0].grad_norm > 0.5  # clipping was active


def test_diffusers_model_is_exported_loadable_with_from_pretrained(tmp_path):
    from test_trainer_checkpoint import _toy_diffusers_class

    cls = _toy_diffusers_class()
    torch.manual_seed(0)
    model = cls(width=8)

    def loss_fn(m, batch, ctx):
        return m(batch["x"].to(ctx.dtype)).square().mean(), {}

    cfg = _config(tmp_path, max_steps=2, ema_decay=0.5, ema_update_every=1, export_dtype="bf16")
    result = train(model, loss_fn, ToyDataset(16), cfg)
    folder = tmp_path / "export" / "transformer"
    assert result.exported == [folder, tmp_path / "export" / "transformer_ema"]
    reloaded = cls.from_pretrained(folder, torch_dtype=torch.bfloat16)
    for k, v in result.engine.module.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v.to(torch.bfloat16)), k
    from safetensors.torch import load_file

    stored = load_file(str(result.exported[1] / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}  # export_dtype applies to the EMA too
    ema = cls.from_pretrained(result.exported[1], torch_dtype=torch.bfloat16)
    assert not torch.equal(ema.proj.weight, reloaded.proj.weight)


def test_resume_without_ema_state_starts_the_ema_from_the_resumed_weights(tmp_path, caplog):
    """A checkpoint without EMA files (written before --ema_update was turned on): the log says the EMA starts
    from the resumed weights, and it does (not from the pretrained weights it was built from at start-up)."""
    _run(_config(tmp_path, max_steps=2))  # no EMA in this run's checkpoints
    assert not list((tmp_path / "checkpoints" / "checkpoint-2").rglob("ema.safetensors"))
    shutil.rmtree(tmp_path / "export")
    reset_accelerate_state()
    with caplog.at_level(logging.WARNING, logger="trainer_misc"):
        resumed = _run(_config(tmp_path, max_steps=2, ema_decay=0.9, ema_update_every=1))  # nothing left to train
    assert resumed.start_step == 2 and resumed.records == []
    assert any("no EMA state: the EMA starts from the resumed weights" in r.message for r in caplog.records)
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "export" / "transformer" / "model.safetensors"))
    ema = load_file(str(tmp_path / "export" / "transformer_ema" / "model.safetensors"))
    pretrained = {k: v.detach() for k, v in (torch.manual_seed(0), ToyModel())[1].state_dict().items()}
    assert sorted(ema) == sorted(weights)
    assert all(torch.equal(ema[k], weights[k]) for k in weights)
    assert not all(torch.equal(ema[k], pretrained[k]) for k in ema), "the weights moved in training"


def test_one_host_sync_per_step_from_our_code(tmp_path, monkeypatch):
    """Losses, token counts, stats and the gradient norm are read in one device-to-host copy per optimizer step
    (the forward and backward of every micro-batch are queued without waiting); bad-batch and stop decisions go
    through host-side collectives (``all_reduce_host``), which read no device tensor. Counted: every tensor read
    (``item``, ``tolist``, ``float()``, ...) made by the project's own code inside a step, at GRAD_ACCU_STEPS=2."""
    import os
    import sys

    from trainer_misc.loop import step as step_module

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(step_module.__file__))))
    ours = tuple(os.path.join(root, d) + os.sep for d in ("trainer_misc", "pyramid_dit", "train"))
    state = {"in_step": False, "reads": 0}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if state["in_step"] and caller.co_filename.startswith(ours) and caller.co_name != "all_reduce_host":
                state["reads"] += 1
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    original_run = step_module.StepRunner.run

    def run(self, step):
        state["in_step"] = True
        try:
            return original_run(self, step)
        finally:
            state["in_step"] = False

    monkeypatch.setattr(step_module.StepRunner, "run", run)
    result = _run(_config(tmp_path / "plain", max_steps=3, grad_accum_steps=2))
    assert len(result.records) == 3 and all(r.grad_norm > 0 and "pred_std" in r.stats for r in result.records)
    assert state["reads"] == 3  # before: 11 per step (per micro-batch: bad-batch flag, loss, 2 reduced values, a stat)

    # The opt-in loss skip decides before each backward: one more read per micro-batch, no more.
    reset_accelerate_state()
    state["reads"] = 0
    _run(_config(tmp_path / "skip", max_steps=3, grad_accum_steps=2, skip_loss_threshold=1e9))
    assert state["reads"] == 3 * (1 + 2)


def test_a_checkpoint_save_hashes_while_writing_and_reads_nothing_back(tmp_path, monkeypatch):
    """The manifest's SHA-256s come from the bytes as they are written: a save on slow shared storage must not
    read its multi-GB files back to hash them. The manifest still matches the files (verify_checkpoint)."""
    import sys

    import safetensors.torch

    from trainer_misc.state import checkpoint as checkpoint_module
    from trainer_misc.state.trust import verify_checkpoint

    reads: list[str] = []
    saving = {"on": False}
    root = str(tmp_path / "checkpoints")

    def audit(event, args):
        if saving["on"] and event == "open" and isinstance(args[0], str) and args[0].startswith(root):
            path, mode, flags = args
            if os.path.isdir(path):  # a folder opened to fsync its entries
                return
            reading = ("r" in mode or "+" in mode) if mode else (flags & (os.O_WRONLY | os.O_RDWR)) != os.O_WRONLY
            if reading:
                reads.append(path)

    def no_safetensors_reads(*a, **k):
        raise AssertionError("a checkpoint file was read back during the save")

    sys.addaudithook(audit)  # hooks cannot be removed; `saving` keeps it inert outside this test
    monkeypatch.setattr(safetensors.torch, "load_file", no_safetensors_reads)
    monkeypatch.setattr(safetensors, "safe_open", no_safetensors_reads)
    real_save = checkpoint_module.save_checkpoint

    def watched(*a, **k):
        saving["on"] = True
        try:
            return real_save(*a, **k)
        finally:
            saving["on"] = False

    monkeypatch.setattr("trainer_misc.loop.trainer.save_checkpoint", watched)
    result = _run(_config(tmp_path, max_steps=2, checkpoint_every=2, ema_decay=0.9, ema_update_every=1))
    monkeypatch.undo()
    assert [c.name for c in result.checkpoints] == ["checkpoint-2"]
    assert reads == []
    assert verify_checkpoint(result.checkpoints[0]) == []
    manifest = json.loads((result.checkpoints[0] / "complete").read_text())["files"]
    assert any(name.startswith("weights/") for name in manifest) and len(manifest) >= 4
