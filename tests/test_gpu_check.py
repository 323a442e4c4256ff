"""The GPU check of issue 23 (tools/gpu_check.sh and its helpers), in everything a CPU can check: the script parses,
its cases have the planner's predictions (so no device time goes to tracing), the report renders what a run left
and says what is missing, and the GPU-only helper stops with a clear message without a GPU."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import gpu_flex_check
import pytest

from tools import gpu_check_report, measure_gpu

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"
PREDICTIONS = REPO / "tools" / "gpu_check_predictions.json"


def test_the_script_parses_and_bounds_every_step():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    steps = re.findall(r"^step (\w+) (\d+) ", text, flags=re.M)
    assert [name for name, _ in steps] == ["env", "flux384", "flex_check", "sd3_384", "flux768"]
    deadline = int(re.search(r"DEADLINE_S:-(\d+)", text).group(1))
    assert deadline < 8 * 60  # the whole run, every step's own timeout capped by it
    assert "timeout --kill-after" in text


def test_every_measured_case_has_its_prediction_and_the_headline_one_is_current():
    cases = re.findall(r"--cases (pyramid_\S+)", SCRIPT.read_text())
    cached = json.loads(PREDICTIONS.read_text())
    assert len(cases) == 3 and set(cases) <= set(cached)
    headline = "pyramid_flux:ar:384p:16"
    assert measure_gpu.predict(measure_gpu.Case.parse(headline)) == cached[headline]


def test_the_report_renders_a_run_and_names_what_is_missing(tmp_path):
    (tmp_path / "flex_check.json").write_text(json.dumps({
        "device": "NVIDIA H100 80GB HBM3", "torch": "2.x", "golden": {"flux_tiny/case_ar/flex": 3e-7},
        "kernels": {"rms_norm": {"outputs": 1e-7, "gradients": 2e-7}},
        "parity": {"pyramid_flux/host_lengths/float32": {"outputs": 2e-7, "gradients": 3e-6, "n_gradients": 120}},
        "compilations": {"layouts": 14, "compiled_graphs": 4, "seconds": 50.0},
        "host_syncs": {"pyramid_flux": {"synchronizing_calls": 0, "first": []}}}))
    row = {"case": "pyramid_flux:ar:384p:16", "attention_split": "flex", "tokens": 4680, "step_s": 0.2,
           "tflops": 180.0, "first_step_s": 40.0, "predicted_activation_gib": 9.8, "measured_activation_gib": 9.0,
           "activation_error": 0.09, "reserved_gib": 10.0, "reference_step_s": 0.335, "ratio_to_reference": 0.6,
           "reference_tflops": 108.0}
    (tmp_path / "measure_flux384.json").write_text(json.dumps([row]))
    text = gpu_check_report.report(tmp_path)
    assert "| pyramid_flux/host_lengths/float32 | 2.0e-07 | 3.0e-06 (120 tensors) |" in text
    assert "compilations: 4 over 14 layouts" in text and "pyramid_flux 0" in text
    assert "flux_tiny/case_ar/flex 3.0e-07" in text and "rms_norm 1.0e-07 / 2.0e-07" in text
    assert "| pyramid_flux:ar:384p:16 | flex | 0.200 | 180 | 0.335 | 0.60 | 108 | 40 | 9.8 / 9.0 (+9%) |" in text
    assert "measure_sd3_384.json: no results" in text
    assert (tmp_path / "summary.md").read_text() == text


def test_the_flex_check_needs_a_gpu_and_says_so(monkeypatch):
    monkeypatch.setattr(gpu_flex_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_flex_check.main([])
