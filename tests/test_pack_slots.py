"""PACK_SLOTS: the slots of a virtual sync group trained as one packed forward/backward per pass.

What must hold (the through-the-script runs with the real DiT are in test_virtual_sync_group.py):

* the merged batch (``PyramidTrainingBatch.cat``) gives every slot's columns the DiT outputs they get alone, and
  ``PyramidFlowLoss.forward_packed`` the per-slot losses and the mean gradient of one slot at a time, for both
  DiT kinds (golden tiny checkpoints, padded prompts of different lengths, two lanes);
* the step runner packs any ``compute_loss`` with the packed protocol (a toy one here) into the same losses,
  weights and random streams as one slot per pass, falls back to one slot per pass without the protocol, writes
  the same checkpoint contents, and a run resumed with another PACK_SLOTS continues the same curve;
* the flags refuse a PACK_SLOTS that does not divide the slots per process, or that meets LoRA dropout, naming
  PACK_SLOTS and the allowed values;
* the planner: a packed pass holds more activations than one slot's, and ``auto`` picks the most slots that fit.
"""
from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_train_scripts import AR, NON_AR, fake_model, flag, launched, run_script  # noqa: F401 (fixture)
from test_trainer_toy import ToyDataset, ToyModel

from pyramid_dit.kinds import get_kind
from pyramid_dit.objective import PyramidFlowObjective, PyramidTrainingBatch
from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler
from pyramid_dit.text_features import TextFeatures
from trainer_misc.data.datasets import TrainBatch
from trainer_misc.loop.config import TrainConfig
from trainer_misc.loop.pyramid_loss import PyramidFlowLoss
from trainer_misc.loop.step import StepContext
from trainer_misc.loop.trainer import train
from trainer_misc.optim.engine import reset_accelerate_state

GOLDEN = {"pyramid_flux": "flux_tiny", "pyramid_mmdit": "mmdit_tiny"}
TEXT_LEN = 10


# ------------------------------------------------------------------------------------ the merged DiT batch

def _objective(kind: str) -> PyramidFlowObjective:
    null = TextFeatures(torch.zeros(TEXT_LEN, 32), torch.tensor([1] + [0] * (TEXT_LEN - 1)), torch.zeros(24))
    return PyramidFlowObjective(PyramidFlowMatchEulerDiscreteScheduler(), kind, sample_ratios=[1, 2, 1],
                                max_temporal_length=8, video_sync_group=4, text_drop_rate=0.3, null_text=null)


def _lane_batch(seed: int, rows: int = 8) -> TrainBatch:
    """A lane's batch: latents and prompts of different lengths (padding at the end), so each column's text is
    trimmed to its own longest prompt."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, TEXT_LEN, dtype=torch.int64)
    for r in range(rows):
        mask[r, :int(torch.randint(2, TEXT_LEN + 1, (1,), generator=g))] = 1
    text = TextFeatures(torch.randn(rows, TEXT_LEN, 32, generator=g), mask, torch.randn(rows, 24, generator=g))
    return TrainBatch(captions=["x"] * rows, paths=[f"lane{seed}/clip{i}" for i in range(rows)],
                      latents=torch.randn(rows, 16, 8, 16, 24, generator=g), text_features=text)


def _ctx(slot: int, module: torch.nn.Module) -> StepContext:
    return StepContext(step=0, micro_step=1, micro_index=0, rank=0, world_size=1, sync_rank=slot % 4, sync_group=4,
                       sync_group_index=slot // 4, device=torch.device("cpu"), dtype=torch.float32, module=module)


# Slots 1 and 2 of the first lane (group 0) and slot 4 of the second (group 1): different units, different batches.
SLOTS = [(1, 0), (2, 0), (4, 1)]


def _prepared(kind: str, dit: torch.nn.Module):
    """Each slot prepared on its own seeded stream (as the runner's SlotStreams do)."""
    loss = PyramidFlowLoss(_objective(kind), use_temporal_pyramid=True)
    lanes = [_lane_batch(10), _lane_batch(11)]
    prepared, contexts = [], []
    for slot, lane in SLOTS:
        torch.manual_seed(100 + slot)
        contexts.append(_ctx(slot, dit))
        prepared.append(loss.prepare(dit, lanes[lane], contexts[-1]))
    assert len({tuple(p.step.units_per_stage) for p in prepared}) > 1, "the slots must train different units"
    assert len({tuple(p.step.text.host_lengths) for p in prepared}) > 1
    return loss, prepared, contexts


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("kind", sorted(GOLDEN))
def test_merged_batch_gives_each_slot_its_own_dit_outputs_losses_and_gradients(golden_dir, kind):
    dit = get_kind(kind).dit().from_pretrained(golden_dir / GOLDEN[kind])
    loss_fn, prepared, contexts = _prepared(kind, dit)

    merged = PyramidTrainingBatch.cat([p.step for p in prepared])
    with torch.no_grad():
        together = dit(**merged.dit_inputs())
        alone = [out for p in prepared for out in dit(**p.step.dit_inputs())]
    assert len(together) == len(alone) == sum(len(p.step.sample) for p in prepared)
    outputs = max(_rel(a, b) for a, b in zip(together, alone))

    # Losses and gradients: one packed forward/backward of the mean loss against one slot at a time.
    dit.zero_grad(set_to_none=True)
    packed = [loss for loss, _ in loss_fn.forward_packed(dit, prepared, contexts)]
    torch.stack(packed).mean().backward()
    grads_packed = {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}
    dit.zero_grad(set_to_none=True)
    single = []
    for p, ctx in zip(prepared, contexts):
        (loss, stats), = loss_fn.forward_packed(dit, [p], [ctx])
        (loss / len(prepared)).backward()
        single.append(loss)
        assert stats["tokens"] == p.tokens
    losses = max(abs(a.item() - b.item()) / b.item() for a, b in zip(packed, single))
    assert grads_packed.keys() == {n for n, p in dit.named_parameters() if p.grad is not None}
    grads = max(_rel(grads_packed[n], p.grad) for n, p in dit.named_parameters() if p.grad is not None)
    print(f"{kind}: packed vs alone, max relative difference: outputs {outputs:.2g}, losses {losses:.2g}, "
          f"gradients {grads:.2g}")
    assert outputs <= 1e-6 and losses <= 1e-6 and grads <= 1e-5


def test_cat_refuses_batches_that_cannot_share_a_call():
    objective = _objective("pyramid_flux")
    batches = []
    for rows in (4, 8):
        torch.manual_seed(0)
        step = objective.noise_latents(torch.randn(rows, 16, 8, 16, 24), use_temporal_pyramid=True, rank=1)
        step.text = TextFeatures(torch.randn(rows, TEXT_LEN, 32), torch.ones(rows, TEXT_LEN, dtype=torch.int64),
                                 torch.randn(rows, 24))
        batches.append(step)
    assert PyramidTrainingBatch.cat(batches[:1]) is batches[0]
    with pytest.raises(ValueError, match="same number of rows per column"):
        PyramidTrainingBatch.cat(batches)


# ------------------------------------------------------------------------------------ the step runner (toy)

class PackedToyLoss:
    """The toy objective (test_trainer_toy.toy_loss) with the packed protocol: ``prepare`` draws the slot's input
    noise, ``forward_packed`` runs the model once over every slot's rows and gives each slot the loss of its own
    rows. Slots read the same batch, so only their noise tells them apart: a draw made on another slot's stream
    changes the losses."""

    def prepare(self, model, batch: dict, ctx) -> dict:
        x = batch["x"].to(ctx.dtype)
        return {"x": x + 0.1 * torch.randn_like(x), "y": batch["y"].float()}

    def forward_packed(self, model, prepared: list[dict], contexts) -> list[tuple[torch.Tensor, dict]]:
        preds = model(torch.cat([p["x"] for p in prepared])).float().split([len(p["x"]) for p in prepared])
        return [(torch.mean((pred - p["y"]) ** 2), {"tokens": len(p["x"]) * 3, "pred_std": pred.detach().std()})
                for pred, p in zip(preds, prepared)]

    def __call__(self, model, batch: dict, ctx) -> tuple[torch.Tensor, dict]:
        return self.forward_packed(model, [self.prepare(model, batch, ctx)], [ctx])[0]


@pytest.fixture
def fresh_accelerate():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def _toy_run(out, pack, compute_loss=None, **kw):
    reset_accelerate_state()
    config = TrainConfig(output_dir=str(out), max_steps=6, batch_size=4, strategy="ddp", mixed_precision="fp32",
                         device="cpu", grad_accum_steps=2, lr=1e-2, warmup_steps=0, seed=3, video_sync_group=4,
                         pack_slots=pack, tensorboard=False, checkpoint_every=3, ema_decay=0.9, ema_update_every=1,
                         **kw)
    torch.manual_seed(0)
    return train(ToyModel(), compute_loss or PackedToyLoss(), ToyDataset(64), config)


def _export(out, suffix=""):
    return load_file(str(out / "export" / f"transformer{suffix}" / "model.safetensors"))


def _same_run(a, b, out_a, out_b):
    assert [r.loss for r in a.records] == pytest.approx([r.loss for r in b.records], rel=1e-6, abs=0)
    for suffix in ("", "_ema"):
        ea, eb = _export(out_a, suffix), _export(out_b, suffix)
        assert set(ea) == set(eb)
        assert max(_rel(ea[k], eb[k]) for k in ea) <= 1e-6


def test_packed_passes_train_like_one_slot_per_pass(tmp_path, fresh_accelerate, caplog):
    """One process, a virtual group of 4 slots, 2 micro-batches per step: PACK_SLOTS 2 and 4 log the losses and
    write the weights, EMA and random streams of PACK_SLOTS 1; the engine runs 4x fewer backward passes."""
    runs = {}
    with caplog.at_level(logging.INFO, logger="trainer_misc.loop.trainer"):
        for pack in (1, 2, 4):
            runs[pack] = _toy_run(tmp_path / f"pack{pack}", pack)
    assert runs[4].engine.cfg.grad_accum_steps == 2 and runs[1].engine.cfg.grad_accum_steps == 8
    assert "4 of this process's 4 slots per forward/backward pass: PACK_SLOTS=4" in caplog.text
    assert len({r.loss for r in runs[1].records}) == 6
    for pack in (2, 4):
        _same_run(runs[pack], runs[1], tmp_path / f"pack{pack}", tmp_path / "pack1")
        assert [r.tokens_per_sec is not None for r in runs[pack].records] == [True] * 6
        assert [r.stats["pred_std"] for r in runs[pack].records] == \
            pytest.approx([r.stats["pred_std"] for r in runs[1].records], rel=1e-6)

    # The checkpoint holds the same things whatever the packing: files, counters, layout, random streams.
    ckpt = {p: tmp_path / f"pack{p}" / "checkpoints" / "checkpoint-6" for p in (1, 4)}
    assert sorted(f.relative_to(ckpt[1]) for f in ckpt[1].rglob("*") if f.is_file()) == \
        sorted(f.relative_to(ckpt[4]) for f in ckpt[4].rglob("*") if f.is_file())
    states = {p: json.loads((c / "trainer_state.json").read_text()) for p, c in ckpt.items()}
    for state in states.values():
        state["config"].pop("pack_slots")
        state["config"].pop("output_dir")
    assert states[1] == states[4]
    from trainer_misc.state.checkpoint import slot_states
    rng = {p: slot_states(c, range(4)) for p, c in ckpt.items()}
    assert all(torch.equal(rng[1][s]["torch_cpu"], rng[4][s]["torch_cpu"]) for s in range(4))


def test_a_resume_with_another_pack_slots_continues_the_same_curve(tmp_path, fresh_accelerate):
    """Step 3's checkpoint of a PACK_SLOTS=1 run, resumed with PACK_SLOTS=4 (and the reverse), continues the
    uninterrupted run's losses, weights and EMA."""
    baseline = {p: _toy_run(tmp_path / f"straight{p}", p) for p in (1, 4)}
    for saved, resumed in ((1, 4), (4, 1)):
        out = tmp_path / f"from{saved}_to{resumed}"
        shutil.copytree(tmp_path / f"straight{saved}" / "checkpoints" / "checkpoint-3",
                        out / "checkpoints" / "checkpoint-3")
        result = _toy_run(out, resumed)
        assert result.start_step == 3 and [r.step for r in result.records] == [4, 5, 6]
        assert [r.loss for r in result.records] == \
            pytest.approx([r.loss for r in baseline[saved].records[3:]], rel=1e-6, abs=0)
        for suffix in ("", "_ema"):
            a, b = _export(out, suffix), _export(tmp_path / f"straight{saved}", suffix)
            assert max(_rel(a[k], b[k]) for k in a) <= 1e-6


def test_without_the_packed_protocol_the_slots_run_one_per_pass(tmp_path, fresh_accelerate, caplog):
    from test_trainer_toy import toy_loss

    with caplog.at_level(logging.INFO, logger="trainer_misc.loop.trainer"):
        fallback = _toy_run(tmp_path / "fallback", 2, compute_loss=toy_loss)
    assert "compute_loss has no packed forward" in caplog.text
    assert fallback.engine.cfg.grad_accum_steps == 8
    plain = _toy_run(tmp_path / "plain", 1, compute_loss=toy_loss)
    assert [r.loss for r in fallback.records] == [r.loss for r in plain.records]


def test_slots_per_pass_refuses_and_decides():
    from trainer_misc.loop.step import slots_per_pass

    cpu, toy, packed = torch.device("cpu"), ToyModel(), PackedToyLoss()
    with pytest.raises(ValueError, match=r"PACK_SLOTS \(--pack_slots\) 3: .* one of \[1, 2, 4, 8\] or auto"):
        slots_per_pass(3, 8, packed, toy, cpu)
    assert slots_per_pass("auto", 8, packed, toy, cpu).slots == 1  # no GPU memory to fit on the CPU
    assert "no GPU memory" in slots_per_pass("auto", 8, packed, toy, cpu).reason
    assert slots_per_pass(4, 8, packed, toy, cpu).slots == 4
    dropping = torch.nn.Sequential(toy, torch.nn.Dropout(0.1))
    with pytest.raises(ValueError, match="draws random numbers in the forward"):
        slots_per_pass(4, 8, packed, dropping, cpu)
    assert slots_per_pass(4, 8, packed, torch.nn.Sequential(toy, torch.nn.Dropout(0.0)), cpu).slots == 4


# ------------------------------------------------------------------------------------ the flags

@pytest.mark.parametrize("env,message", [
    ({"GPUS": "1", "PACK_SLOTS": "3"}, "PACK_SLOTS=3: each process trains 8 slot(s) per micro-batch "
                                       "(VIDEO_SYNC_GROUP=8 over 1 data-parallel process(es)); set PACK_SLOTS to one "
                                       "of [1, 2, 4, 8] or auto"),
    ({"GPUS": "2", "PACK_SLOTS": "8"}, "set PACK_SLOTS to one of [1, 2, 4] or auto"),
    ({"GPUS": "8", "PACK_SLOTS": "2"}, "PACK_SLOTS=2: each process trains 1 slot(s) per micro-batch (one slot per "
                                       "process"),
    ({"GPUS": "1", "PACK_SLOTS": "0"}, "PACK_SLOTS=0: must be from 1 to 1024 or auto (slots per forward/backward"),
    ({"GPUS": "1", "PACK_SLOTS": "x"}, "PACK_SLOTS=x: must be a whole number, from 1 to 1024 or auto"),
    ({"GPUS": "1", "PACK_SLOTS": "4", "LORA_RANK": "4", "LORA_DROPOUT": "0.1"},
     "PACK_SLOTS=4 with LORA_DROPOUT=0.1: LoRA dropout draws random numbers in the forward"),
], ids=["not-a-divisor", "not-a-divisor-2gpus", "real-group", "zero", "word", "lora-dropout"])
def test_pack_slots_is_checked_before_launch(fake_model, env, message):  # noqa: F811 (fixture)
    result = run_script(AR, {**fake_model, **env})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr


def test_pack_slots_reaches_the_trainer(fake_model):  # noqa: F811 (fixture)
    assert flag(launched(AR, {**fake_model, "GPUS": "1"}), "--pack_slots") == "auto"  # the AR script's default
    assert flag(launched(AR, {**fake_model, "GPUS": "2", "PACK_SLOTS": "4"}), "--pack_slots") == "4"
    assert flag(launched(AR, {**fake_model, "GPUS": "1", "PACK_SLOTS": "auto", "LORA_RANK": "4",
                              "LORA_DROPOUT": "0.1"}), "--pack_slots") == "auto"  # auto: decided at start
    assert "--pack_slots" not in launched(NON_AR, {**fake_model, "GPUS": "1"})  # full sequence: nothing to pack


# ------------------------------------------------------------------------------------ the planner

def _tiny_launch(**kw):
    from tools.plan import MEASURE_CONFIG
    from trainer_misc.planning.planner import Launch

    return Launch("pyramid_flux", MEASURE_CONFIG, task="ar", width=128, height=128, num_frames=8, gpus=1,
                  shard_strategy="ddp", dtype="fp32", video_sync_group=4, **kw)


def test_planner_packed_pass_holds_more_and_auto_picks_what_fits():
    from trainer_misc.planning.planner import (
        trace_heaviest_pass,
        choose_pack_slots,
        micro_batches_per_step,
        packed_peak_bytes,
        plan,
    )

    traced = {k: trace_heaviest_pass(_tiny_launch(pack_slots=k)) for k in (1, 2, 4)}
    acts = {k: t.activation_bytes for k, (t, _) in traced.items()}
    tokens = {k: n for k, (_, n) in traced.items()}
    assert acts[1] < acts[2] < acts[4] and tokens[1] < tokens[2] < tokens[4]
    assert [micro_batches_per_step(_tiny_launch(pack_slots=k)) for k in (1, 2, 4)] == [4, 2, 1]

    peaks = {k: packed_peak_bytes(_tiny_launch(), k) for k in (1, 2, 4)}
    assert peaks[1] < peaks[2] < peaks[4]
    asked = []

    def peak(k: int) -> int:
        asked.append(k)
        return peaks[k]

    assert choose_pack_slots(4, peaks[4], peak) == (4, {4: peaks[4]}) and asked == [4]  # all fit: the most
    assert choose_pack_slots(4, peaks[4] - 1, peak)[0] == 2
    assert choose_pack_slots(4, peaks[2] - 1, peak)[0] == 1
    assert choose_pack_slots(4, peaks[1] - 1, peak) == (1, peaks)  # nothing fits: one slot per pass, said

    result = plan(_tiny_launch(pack_slots=4), gpu_memory_gib=80)
    passes = result["passes"]
    assert passes["per_step"] == 1 and passes["unpacked"]["per_step"] == 4
    assert passes["activation_bytes"] == acts[4] and passes["unpacked"]["activation_bytes"] == acts[1]
    assert 0 < passes["attention_calls_per_step"] < passes["unpacked"]["attention_calls_per_step"]


def test_plan_text_reports_the_packing(monkeypatch):
    from trainer_misc.planning.plan import plan_text
    from trainer_misc.planning.planner import GIB, packed_peak_bytes

    fits_two = (packed_peak_bytes(_tiny_launch(), 2) + 1) / GIB
    text = plan_text(_tiny_launch(), gpu_memory_gib=fits_two, pack_slots="auto")
    assert "PACK_SLOTS=auto: 2 slot(s) per pass" in text
    assert "forward/backward passes per optimizer step per GPU: 2 of 2 slot(s) each" in text
    assert "one slot per pass: 4 passes" in text and "2 passes saved per step" in text
    single = plan_text(_tiny_launch(), gpu_memory_gib=80, pack_slots=1)
    assert "passes per optimizer step per GPU: 4 of 1 slot(s) each" in single


def test_auto_asks_the_planner_on_a_gpu_and_broadcasts(monkeypatch):
    """On a GPU (faked here: the memory query) rank 0 asks ``packed_peak_bytes`` and every rank gets its choice."""
    from trainer_misc.loop import step as step_module

    fake = SimpleNamespace(packed_peak_bytes=lambda k: {1: 10, 2: 20, 4: 40, 8: 80}[k],
                           prepare=PackedToyLoss.prepare, forward_packed=PackedToyLoss.forward_packed)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=45))
    sent = []
    monkeypatch.setattr(step_module, "broadcast_object", lambda obj: sent.append(obj) or obj)
    choice = step_module.slots_per_pass("auto", 8, fake, ToyModel(), torch.device("cuda", 0))
    assert choice.slots == 4 and sent == [choice]
    assert "fits" in choice.reason and "PREDICTION" in choice.reason


def test_count_ops_of_one_step_packed_and_not():
    """``tools/benchmark_dit.py --count_ops --pack_slots 1,8``: one optimizer step of the one-GPU 384p AR launch
    (VIDEO_SYNC_GROUP=8) through the trainer's loss, on meta tensors at the released size: packing all 8 slots
    into one pass dispatches fewer device ops and attention calls, and neither reads the device on the host."""
    from tools.benchmark_dit import count_step

    one, packed = (count_step("pyramid_flux", "pyramid_flux:ar:384p:16", k) for k in (1, 8))
    assert (one["passes"], packed["passes"]) == (8, 1)
    assert one["syncs"] == packed["syncs"] == {}
    assert sum(packed["attention"]) < sum(one["attention"]) and packed["ops"] < one["ops"]
    assert max(one["tokens_per_pass"]) < packed["tokens_per_pass"][0]
    print(f"one step: {one['ops']:,} device ops, {sum(one['attention'])} attention calls in 8 passes; packed: "
          f"{packed['ops']:,} ops, {sum(packed['attention'])} calls in 1 pass")
