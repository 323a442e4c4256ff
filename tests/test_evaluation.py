"""The held-out evaluation, in one process: the seeded split, the data check's evaluation set, the objective's
deterministic evaluation inputs, the tracker's base / best / degradation rule, and the loop's hook on the toy
model (the training curve is untouched, the figures survive a resume, a degrading run warns and stops).

The real-script runs (rerun, resume, 1 vs 2 processes, ZeRO-2 vs ZeRO-3, the overfit run) are in
tests/test_train_evaluation.py.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from test_trainer_toy import IN, ToyDataset, ToyModel, toy_loss

from trainer_misc.data.split import held_out_count, held_out_lines, line_keys
from trainer_misc.loop.evaluation import DegradeRule, EvalFigures, EvalTracker, evaluation_steps
from trainer_misc.optim.engine import reset_accelerate_state

# ------------------------------------------------------------------------------------------------ the split


def test_split_is_a_pure_function_of_seed_and_line():
    assert held_out_count(8, 0.25) == 2 and held_out_count(8, 0.01) == 1 and held_out_count(8, 0) == 0
    assert held_out_count(5, 0.5) == 3  # rounded half up, not to even
    held = held_out_lines(8, 0.25, seed=42)
    assert len(held) == 2 and held == held_out_lines(8, 0.25, seed=42)
    assert held != held_out_lines(8, 0.25, seed=43) or held != held_out_lines(8, 0.25, seed=44)
    # A line's key does not depend on how many lines follow it ...
    assert (line_keys(42, 5) == line_keys(42, 1000)[:5]).all()
    # ... so appending lines moves at most the lines at the margin of the split.
    big = held_out_lines(1000, 0.1, seed=7)
    grown = held_out_lines(1010, 0.1, seed=7)
    assert len(big) == 100 and len(grown) == 101
    assert len(big - grown) <= 2


# ------------------------------------------------------------------------------------------------ data check

@pytest.fixture()
def anno(tmp_path) -> Path:
    """8 usable latent lines (64x64, 4 latent frames) + the empty prompt."""
    from trainer_misc.files import atomic_save_safetensors

    def text(path):
        atomic_save_safetensors({"prompt_embed": torch.zeros(1, 6, 32),
                                 "prompt_attention_mask": torch.ones(1, 6, dtype=torch.int64),
                                 "pooled_prompt_embed": torch.zeros(1, 24)}, path)
        return str(path)

    lines = []
    for i in range(8):
        atomic_save_safetensors({"latent": torch.zeros(1, 16, 4, 8, 8)}, tmp_path / f"l{i}.safetensors")
        lines.append({"video": f"v{i}.mp4", "text": f"clip {i}", "latent": f"l{i}.safetensors",
                      "text_fea": text(tmp_path / f"t{i}.safetensors")})
    text(tmp_path / "empty_prompt_text_fea.safetensors")
    path = tmp_path / "anno.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _spec(anno: Path, **kw):
    from trainer_misc.data.check import DataSpec
    return DataSpec(**{"anno_file": str(anno), "resolution": "64x64", "num_frames": 4, "text_dims": (32, 24), **kw})


def test_data_check_moves_the_held_out_lines_out_of_training(anno):
    from trainer_misc.data.check import check_data, format_report

    report = check_data(_spec(anno, eval_fraction=0.25, seed=42))
    held = held_out_lines(8, 0.25, 42)
    assert sorted(u.entry.index for u in report.eval_usable) == sorted(held)
    assert not {u.entry.index for u in report.usable} & held
    assert len(report.usable) == 6 and report.ok
    text = format_report(report)
    assert "evaluation set: 2 usable of the 2 line(s) EVAL_FRACTION=0.25 holds out of 8 (seed 42)" in text
    assert "clip lengths used (latent frames: clips): 4: 6" in text  # the training part's histogram


def test_data_check_of_an_eval_file_and_its_problems(anno, tmp_path):
    from trainer_misc.data.check import check_data, format_report

    lines = anno.read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[5:]) + "\n" + json.dumps(
        {"video": "x.mp4", "text": "gone", "latent": "missing.safetensors", "text_fea": "t0.safetensors"}) + "\n")
    report = check_data(_spec(tmp_path / "train.jsonl", eval_anno_file=str(tmp_path / "eval.jsonl")))
    assert len(report.usable) == 6 and len(report.eval_usable) == 3 and report.ok
    text = format_report(report)
    assert "4 lines, 3 usable, 1 excluded" in text and "latent file missing" in text
    assert "NOTE: 1 evaluation sample(s) are also in ANNO_FILE (trained on)" in text  # line 5 is in both

    (tmp_path / "bad.jsonl").write_text(json.dumps({"video": "x.mp4", "text": "gone",
                                                    "latent": "missing.safetensors"}) + "\n")
    report = check_data(_spec(tmp_path / "train.jsonl", eval_anno_file=str(tmp_path / "bad.jsonl")))
    assert not report.ok and any("the evaluation set is empty" in f for f in report.fatal)


def test_the_dataset_builder_never_hands_a_held_out_line_to_training(anno, tmp_path):
    """train/run.py builds both datasets from the data check's split: disjoint, and together every line."""
    from tools.build_tiny_checkpoint import build_tiny_checkpoint
    from train.args import build_parser
    from train.run import build_datasets

    model = build_tiny_checkpoint(tmp_path / "model")
    args = build_parser().parse_args(["--model_path", str(model), "--anno_file", str(anno), "--output_dir", "o",
                                      "--resolution", "64x64", "--max_frames", "4", "--eval_fraction", "0.25"])
    train_set, eval_set = build_datasets(args, verbose=False)
    trained = {str(e.latent) for e in train_set.entries}
    held = {str(e.latent) for e in eval_set.entries}
    assert len(trained) == 6 and len(held) == 2 and not trained & held
    assert {Path(p).name for p in held} == {f"l{i}.safetensors" for i in held_out_lines(8, 0.25, 42)}
    capped = build_parser().parse_args(["--model_path", str(model), "--anno_file", str(anno), "--output_dir", "o",
                                        "--resolution", "64x64", "--max_frames", "4", "--eval_fraction", "0.5",
                                        "--eval_samples", "3"])
    train_set, eval_set = build_datasets(capped, verbose=False)
    assert len(train_set) == 4 and len(eval_set) == 3  # the cap bounds the cost, it never returns lines to training


# ------------------------------------------------------------------------------------------------ the objective

def _objective(**kw):
    from pyramid_dit.objective import PyramidFlowObjective
    from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler

    scheduler = PyramidFlowMatchEulerDiscreteScheduler(shift=1.0, stages=3, stage_range=(0, 1 / 3, 2 / 3, 1))
    return PyramidFlowObjective(scheduler, "pyramid_flux", max_temporal_length=4, video_sync_group=1,
                                text_drop_rate=0.0, **kw)


@pytest.mark.parametrize("units", [None, 1, 3], ids=["full-sequence", "ar-first-unit", "ar-depth-3"])
def test_eval_columns_are_seeded_and_never_move_the_global_streams(units):
    objective = _objective()
    latents = torch.randn(1, 16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = objective.timestep_grid(4)
    assert grid == [125, 375, 625, 875]
    before = torch.get_rng_state()

    def build(seed):
        return objective.eval_columns(latents, timestep_indices=grid, units=units,
                                      generator=torch.Generator().manual_seed(seed))

    a, b, c = build(1), build(1), build(2)
    assert torch.equal(torch.get_rng_state(), before), "evaluation drew from the global RNG"
    assert all(torch.equal(x, y) for col_a, col_b in zip(a.sample, b.sample) for x, y in zip(col_a, col_b))
    assert not torch.equal(a.sample[0][-1], c.sample[0][-1])
    assert len(a.sample) == 3 and a.timestep_ratio.shape == (12,)
    # Row j of every column is timestep-table index grid[j] of that column's stage; rows are column-major like
    # a training batch (row r belongs to column r % 3).
    for stage in range(3):
        want = objective.scheduler.timesteps_per_stage[stage][grid].float()
        assert torch.equal(a.timestep_ratio[stage::3], want)
        assert a.sample[stage][-1].shape[0] == 4 and a.targets[stage].shape == a.sample[stage][-1].shape


def test_eval_columns_build_the_training_columns_shapes():
    """For a unit count the training path also trains, the evaluation column holds the same clips (history at the
    same resolutions) as the training column does."""
    objective = _objective()
    latents = torch.randn(4, 16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    train = objective.noise_latents(latents, use_temporal_pyramid=True, rank=0, step=0)
    units = train.units_per_stage
    for column, stage in enumerate(objective.column_stages):
        evaluated = objective.eval_columns(latents[:1], timestep_indices=[500], units=units[stage],
                                           generator=torch.Generator().manual_seed(0))
        assert [tuple(c.shape[1:]) for c in evaluated.sample[stage]] == \
            [tuple(c.shape[1:]) for c in train.sample[column]]


def test_eval_targets_are_the_training_arithmetic():
    """With the training path's noise and timestep index, the evaluation input and target are the training ones
    (the shared ``_flow_pair``): at the last stage the target is start - clean."""
    objective = _objective()
    latents = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    out = objective.eval_columns(latents, timestep_indices=[0, 999], units=None,
                                 generator=torch.Generator().manual_seed(5))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    from pyramid_dit.pyramid import noise_pyramid, spatial_pyramid, upsample_nearest
    clean = spatial_pyramid(objective.normalization.normalize(latents), 3)
    noises = noise_pyramid(noise, 3)
    s = objective.scheduler.start_sigmas[2]
    start = s * noises[2] + (1 - s) * upsample_nearest(clean[1])
    assert torch.allclose(out.targets[2][0], (start - clean[2])[0], atol=1e-6)
    ratio = objective.scheduler.sigmas_per_stage[2][[0, 999]].view(-1, 1, 1, 1, 1)
    assert torch.allclose(out.sample[2][-1], (ratio * start + (1 - ratio) * clean[2]).float(), atol=1e-6)


# ------------------------------------------------------------------------------------------------ the tracker

def _fig(step: int, loss: float) -> EvalFigures:
    return EvalFigures(step=step, loss=loss, parts={"stage_0": loss, "stage_1": loss}, samples=2, seconds=0.1,
                       seconds_per_sample=0.05)


def test_tracker_compares_with_base_and_best_and_warns_after_patience():
    tracker = EvalTracker(DegradeRule(margin=0.02, patience=2, against="best", stop=True), "fp")
    base = tracker.record(_fig(0, 1.0))
    assert "base weights" in base.line and base.scalars["eval/loss_vs_base"] == 0 and base.warning is None
    better = tracker.record(_fig(10, 0.8), lr=1e-4)
    assert better.scalars["eval/loss_vs_base"] == pytest.approx(-0.2) and tracker.best_step == 10
    first = tracker.record(_fig(20, 0.85), lr=1e-4)  # +6% above the best: 1 of 2
    assert first.warning is None and tracker.streak == 1
    second = tracker.record(_fig(30, 0.83), lr=1e-4)
    assert second.stop and second.warning.startswith("eval step 30: DEGRADING: held-out loss 0.83000 has been more "
                                                     "than 2.0% above the best (0.80000, step 10) for 2 evaluations")
    assert "base 1.00000, -17.00%" in second.warning and "LR is 0.0001 now" in second.warning
    assert "LoRA finetune (LORA_RANK=16)" in second.warning and "ANNO_FILE" in second.warning
    assert tracker.record(_fig(40, 0.805)).warning is None and tracker.streak == 0  # within the margin: reset

    # Against the base: 0.85 is still 15% better than the base, no warning however long it lasts.
    vs_base = EvalTracker(DegradeRule(margin=0.02, patience=1, against="base"), "fp")
    vs_base.record(_fig(0, 1.0))
    vs_base.record(_fig(10, 0.8))
    assert vs_base.record(_fig(20, 0.85)).warning is None
    late = vs_base.record(_fig(30, 1.05))
    assert "above the base model's (1.00000, step 0)" in late.warning and not late.stop


def test_tracker_state_survives_a_resume_and_is_dropped_when_the_set_changes(caplog):
    tracker = EvalTracker(DegradeRule(), "fp")
    tracker.record(_fig(0, 1.0))
    tracker.record(_fig(10, 1.1))
    state = json.loads(json.dumps(tracker.state_dict()))  # through trainer_state.json
    resumed = EvalTracker.restore(DegradeRule(), "fp", state)
    after = resumed.record(_fig(20, 1.2))
    assert after.scalars["eval/loss_vs_base"] == pytest.approx(0.2) and resumed.streak == 2
    with caplog.at_level(logging.WARNING):
        other = EvalTracker.restore(DegradeRule(), "another set", state)
    assert other.base is None and "evaluation set or grid changed" in caplog.text
    assert "eval/loss_vs_base" not in other.record(_fig(20, 1.2)).scalars


def test_evaluation_steps():
    assert evaluation_steps(0, 10, 4, None) == [0, 4, 8, 10]
    assert evaluation_steps(0, 3, 0, None) == [0, 3]  # 0: before the first step and after the last
    assert evaluation_steps(4, 10, 4, 4) == [8, 10]  # resumed where the checkpoint had evaluated: not again
    assert evaluation_steps(4, 10, 4, 0) == [4, 8, 10]  # a stop signal skipped step 4's evaluation: made up for
    assert evaluation_steps(5, 10, 4, 4) == [8, 10]


# ------------------------------------------------------------------------------------------------ the loop

class ToyHeldOut:
    """Held-out toy samples: the toy inputs with targets of ``sign`` x the training mapping (sign -1: training
    makes them worse). Scored without noise: a function of the weights only."""

    parts = ("first", "second")
    weights = (1.0, 2.0)

    def __init__(self, n: int = 5, sign: float = 1.0) -> None:
        data = ToyDataset(64)
        self.x = torch.randn(n, IN, generator=torch.Generator().manual_seed(99))
        self.y = sign * self.x @ data.w
        self.scored: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def load(self, index, device):
        return None

    def score(self, model, index, ctx):
        self.scored.append(index)
        err = (model(self.x[index:index + 1].to(ctx.dtype)).float() - self.y[index]) ** 2
        return torch.stack([err[0, :2].mean(), err[0, 2:].mean()]).double()

    def describe(self) -> str:
        return f"{len(self)} toy samples"

    def fingerprint(self) -> str:
        return f"toy-{len(self)}"


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def _train(out, held_out=None, **kw):
    from trainer_misc.loop.config import TrainConfig
    from trainer_misc.loop.trainer import train

    base = dict(output_dir=str(out), max_steps=6, batch_size=4, strategy="ddp", mixed_precision="fp32",
                device="cpu", lr=1e-2, seed=3, checkpoint_every=3, eval_every=2)
    base.update(kw)
    reset_accelerate_state()
    torch.manual_seed(0)
    return train(ToyModel(), toy_loss, ToyDataset(64), TrainConfig(**base), held_out=held_out)


def _lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_evaluation_leaves_the_training_curve_alone_and_survives_a_resume(tmp_path):
    plain = _train(tmp_path / "plain")
    held = ToyHeldOut()
    evaluated = _train(tmp_path / "eval", held)
    assert [r.loss for r in evaluated.records] == [r.loss for r in plain.records], "evaluation moved the RNG"
    evals = [m for m in _lines(tmp_path / "eval") if "eval" in m]
    assert [m["step"] for m in evals] == [0, 2, 4, 6]
    assert sorted(set(held.scored)) == list(range(5))
    figures = [m["eval"]["loss"] for m in evals]
    assert len(set(figures)) == 4, "the figure must move with the weights"
    manual = evaluated.evaluations[-1]
    assert manual.loss == pytest.approx((manual.parts["first"] + 2 * manual.parts["second"]) / 3)

    # A rerun gives the same figures; a run stopped at step 3 and resumed keeps the base and continues.
    again = _train(tmp_path / "again", ToyHeldOut())
    assert [f.loss for f in again.evaluations] == figures
    shutil_steps = _train(tmp_path / "resumed", ToyHeldOut(), max_steps=3)
    assert [f.step for f in shutil_steps.evaluations] == [0, 2, 3]
    resumed = _train(tmp_path / "resumed", ToyHeldOut())
    assert resumed.start_step == 3 and [f.step for f in resumed.evaluations] == [4, 6]
    resumed_evals = {m["step"]: m["eval"] for m in _lines(tmp_path / "resumed") if "eval" in m}
    assert [resumed_evals[s]["loss"] for s in (0, 2, 4, 6)] == figures
    assert resumed_evals[6]["loss_vs_base"] == evals[-1]["eval"]["loss_vs_base"]
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["evaluation"]["base"]["loss"] == figures[0] and state["evaluation"]["last_step"] == 6

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set()
    for events in (tmp_path / "eval" / "logs").iterdir():
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"eval/loss", "eval/loss_first", "eval/loss_second", "eval/loss_vs_base"} <= tags


def test_a_degrading_run_warns_and_stops_with_a_checkpoint(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        result = _train(tmp_path, ToyHeldOut(sign=-1.0), max_steps=20, eval_every=1, checkpoint_every=0,
                        eval_degrade_patience=2, eval_degrade_margin=0.0, eval_stop_on_degrade=True)
    assert result.stopped_early and result.final_step < 20
    losses = [f.loss for f in result.evaluations]
    assert losses[-1] > losses[-2] > min(losses)
    assert "DEGRADING" in caplog.text and "stopping with a checkpoint" in caplog.text
    assert result.checkpoints[-1].name == f"checkpoint-{result.final_step}"
    assert (tmp_path / "export" / "transformer" / "model.safetensors").is_file()


def test_eval_report_table_lines_up_training_and_held_out(tmp_path):
    from tools.eval_report import eval_rows, format_rows

    _train(tmp_path, ToyHeldOut())
    rows = eval_rows(tmp_path / "metrics.jsonl")
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [m["loss"] for m in steps if "eval" not in m]
    assert [r["step"] for r in rows] == [0, 2, 4, 6] and rows[0]["train"] is None
    assert rows[1]["train"] == pytest.approx(sum(train[:2]) / 2)
    assert rows[3]["train"] == pytest.approx(sum(train[4:]) / 2)
    text = format_rows(rows)
    assert text.splitlines()[1].split()[:3] == ["0", f"{rows[0]['loss']:.5f}", "base"]
    assert "first" in text.splitlines()[0] and text.splitlines()[-1].startswith("best held-out loss")


def test_an_unreadable_evaluation_sample_stops_the_run_before_the_first_step(tmp_path):
    class Broken(ToyHeldOut):
        def load(self, index, device):
            return ("clips/held_3.safetensors", "truncated") if index == 3 else None

    with pytest.raises(ValueError, match=r"1 unreadable sample\(s\) \(sample 3: clips/held_3.safetensors: truncated\)"):
        _train(tmp_path, Broken())
    assert not (tmp_path / "checkpoints").exists()
