"""tools/measure_gpu.py: its cases are the planner's launches, and without a GPU it says so instead of failing late."""
from __future__ import annotations

import json

import pytest

from tools import measure_gpu


def test_case_is_the_one_gpu_launch_of_the_released_config():
    case = measure_gpu.Case.parse("pyramid_mmdit:ar:768p:32:ckpt")
    launch = case.launch()
    assert (launch.model_kind, launch.task, launch.width, launch.height, launch.num_frames) == \
        ("pyramid_mmdit", "ar", 1280, 768, 32)
    assert (launch.gpus, launch.video_sync_group, launch.batch_size, launch.dtype) == (1, 8, 4, "bf16")
    assert launch.gradient_checkpointing and launch.model_config["num_layers"] == 24  # the released SD3 DiT
    assert str(case) == "pyramid_mmdit:ar:768p:32:ckpt"
    assert measure_gpu.Case.parse("pyramid_flux:t2v:384p:16").launch().video_sync_group == 1


@pytest.mark.parametrize("bad", ["pyramid_flux:ar:384p", "flux:ar:384p:16", "pyramid_flux:t2i:384p:16",
                                 "pyramid_flux:ar:384p:16:fast"])
def test_a_malformed_case_names_the_expected_form(bad):
    with pytest.raises(SystemExit, match="kind:task:resolution:frames"):
        measure_gpu.Case.parse(bad)


def test_without_a_gpu_it_stops_with_the_way_out(tmp_path, monkeypatch):
    predictions = tmp_path / "pred.json"  # cached predictions: no tracing needed
    predictions.write_text(json.dumps({"pyramid_flux:ar:384p:16": {"tokens": 1, "activation_bytes": 1, "flops": 1}}))
    monkeypatch.setattr(measure_gpu.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--predict_only"):
        measure_gpu.main(["--cases", "pyramid_flux:ar:384p:16", "--predictions", str(predictions)])
