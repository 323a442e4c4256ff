"""PyramidFlowMatchEulerDiscreteScheduler against the reference's tables (golden/scheduler/tables.json)."""
from __future__ import annotations

import json

import pytest
import torch

from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler

SHIFTS = ["shift_1.0", "shift_3.0"]


@pytest.fixture(scope="module")
def tables(golden_dir):
    return json.loads((golden_dir / "scheduler" / "tables.json").read_text())


def _scheduler(golden: dict) -> PyramidFlowMatchEulerDiscreteScheduler:
    config = {k: v for k, v in golden["config"].items() if not k.startswith("_")}
    return PyramidFlowMatchEulerDiscreteScheduler(**config)


def _assert_values(actual, expected, what: str, rel: float = 1e-12) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=0, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("shift", SHIFTS)
def test_stage_sigmas_and_ratios(tables, shift):
    golden = tables[shift]
    scheduler = _scheduler(golden)
    for key in ("num_train_timesteps", "shift", "stages", "gamma"):
        assert scheduler.config[key] == golden["config"][key]
    assert list(scheduler.config.stage_range) == golden["config"]["stage_range"]
    _assert_values(scheduler.start_sigmas, golden["start_sigmas"], "start_sigmas")
    _assert_values(scheduler.end_sigmas, golden["end_sigmas"], "end_sigmas")
    _assert_values(scheduler.ori_start_sigmas, golden["ori_start_sigmas"], "ori_start_sigmas")
    _assert_values(scheduler.timestep_ratios, golden["timestep_ratios"], "timestep_ratios")
    # Stage k > 0 starts noisier than the global table says: re-noising at the jump removes signal.
    for k in range(1, 3):
        assert scheduler.start_sigmas[k] > scheduler.ori_start_sigmas[k]


@pytest.mark.parametrize("shift", SHIFTS)
def test_training_tables(tables, shift):
    golden = tables[shift]
    scheduler = _scheduler(golden)
    assert scheduler.sigmas.dtype == torch.float32 and scheduler.timesteps.dtype == torch.float32
    for index, value in golden["global_sigmas_at"].items():
        _assert_values(scheduler.sigmas[int(index)], value, f"sigmas[{index}]", rel=1e-7)
    for index, value in golden["global_timesteps_at"].items():
        _assert_values(scheduler.timesteps[int(index)], value, f"timesteps[{index}]", rel=1e-7)
    for stage in range(3):
        assert str(scheduler.timesteps_per_stage[stage].dtype) == golden["dtypes"]["timesteps_per_stage"]
        assert str(scheduler.sigmas_per_stage[stage].dtype) == golden["dtypes"]["sigmas_per_stage"]
        assert scheduler.timesteps_per_stage[stage].shape == (1000,)
    for index, values in golden["timesteps_per_stage_at"].items():
        got = [scheduler.timesteps_per_stage[k][int(index)] for k in range(3)]
        _assert_values(got, values, f"timesteps_per_stage[*][{index}]", rel=1e-7)
    for index, values in golden["sigmas_per_stage_at"].items():
        got = [scheduler.sigmas_per_stage[k][int(index)] for k in range(3)]
        _assert_values(got, values, f"sigmas_per_stage[*][{index}]")


@pytest.mark.parametrize("shift", SHIFTS)
def test_set_timesteps(tables, shift):
    golden = tables[shift]
    scheduler = _scheduler(golden)
    for name, expected in golden["set_timesteps"].items():
        steps, stage = int(name.split("_")[0]), int(name.rsplit("_", 1)[1])
        scheduler.set_timesteps(steps, stage)
        assert [str(scheduler.timesteps.dtype), str(scheduler.sigmas.dtype)] == expected["dtypes"]
        _assert_values(scheduler.timesteps, expected["timesteps"], f"{name} timesteps")
        _assert_values(scheduler.sigmas, expected["sigmas"], f"{name} sigmas")
        assert scheduler.step_index is None


@pytest.mark.parametrize("shift", SHIFTS)
def test_two_euler_steps(tables, shift):
    golden = tables[shift]["step"]
    scheduler = _scheduler(tables[shift])
    scheduler.set_timesteps(10, 1)
    shape = golden["shape"]
    sample = torch.tensor(golden["sample"], dtype=torch.float32).reshape(shape)
    model_output = torch.tensor(golden["model_output"], dtype=torch.float32).reshape(shape)

    first = scheduler.step(model_output, scheduler.timesteps[0], sample).prev_sample
    second = scheduler.step(model_output, scheduler.timesteps[1], first).prev_sample
    assert str(first.dtype) == golden["prev_sample_dtype"] and scheduler.step_index == 2
    torch.testing.assert_close(first.flatten(), torch.tensor(golden["first_step_prev_sample"]), rtol=0, atol=1e-7)
    torch.testing.assert_close(second.flatten(), torch.tensor(golden["second_step_prev_sample"]), rtol=0, atol=1e-7)


def test_full_schedule_reaches_zero_sigma():
    """Euler over a stage with a constant velocity v moves the sample by exactly -v (sigma 1 -> 0)."""
    scheduler = PyramidFlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(7, 2)
    sample = torch.zeros(1, 2, 1, 2, 2)
    velocity = torch.ones_like(sample)
    for t in scheduler.timesteps:
        sample = scheduler.step(velocity, t, sample).prev_sample
    torch.testing.assert_close(sample, -velocity)
    with pytest.raises(IndexError, match="set_timesteps"):
        scheduler.step(velocity, scheduler.timesteps[-1], sample)


def test_config_round_trip(tmp_path):
    scheduler = PyramidFlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.save_pretrained(tmp_path)
    loaded = PyramidFlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    assert loaded.start_sigmas == scheduler.start_sigmas
    for a, b in zip(loaded.timesteps_per_stage, scheduler.timesteps_per_stage):
        assert torch.equal(a, b)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="stage_range"):
        PyramidFlowMatchEulerDiscreteScheduler(stages=2)
    with pytest.raises(ValueError, match="stage_range"):
        PyramidFlowMatchEulerDiscreteScheduler(stage_range=(0, 2 / 3, 1 / 3, 1))
    scheduler = PyramidFlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="stage_index"):
        scheduler.set_timesteps(10, 3)
    scheduler.set_timesteps(10, 0)
    with pytest.raises(ValueError, match="integer timestep"):
        scheduler.step(torch.zeros(1), 5, torch.zeros(1))
