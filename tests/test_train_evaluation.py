"""The held-out evaluation through the real training scripts on the tiny model and the demo clips.

* The figure is a function of the weights: identical on a rerun and after a resume (the resumed launch does not
  evaluate the base again, its ``loss_vs_base`` uses the saved base), the same with 1 or 2 processes and with
  ZeRO-2 or ZeRO-3 (AR, fp32, EVAL_FRACTION=0.25), with sequence parallelism and with LoRA; it moves when the weights
  move. Text-to-image (images encoded on the fly, EVAL_ANNO_FILE) likewise across 1 and 2 processes.
* The held-out clips never reach a training batch (``--trace_batches``).
* An overfit run: a "base" trained on all 8 clips is finetuned on 2 of them with the other 6 held out; the training
  loss falls while the held-out loss rises past its best, the degradation warning fires and
  EVAL_STOP_ON_DEGRADE=1 ends the run with a checkpoint.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest
from demo_workspace import build_demo_workspace, run_train_script

from trainer_misc.data.split import held_out_lines

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """Tiny model + 8 demo clips (25 frames, 64x64 -> 4 latent frames) with latents and text features, 8 images."""
    return build_demo_workspace(tmp_path_factory.mktemp("train_eval"))


def run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_train_script(script, {"LR": "1e-3", "MODEL_DTYPE": "fp32", **env}, timeout=LAUNCH_TIMEOUT_S)


def evals(out: Path) -> dict[int, dict]:
    """Step -> the evaluation record of ``metrics.jsonl`` (its figures: the wall time left out)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: {k: v for k, v in m["eval"].items() if k != "seconds"} for m in lines if "eval" in m}


def train_losses(out: Path) -> list[float]:
    return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval" not in m]


def ar(workspace, out: Path, gpus: int, strategy: str, steps: int, **env: str) -> subprocess.CompletedProcess:
    """AR training, VIDEO_SYNC_GROUP=2 (virtual on 1 process: the same updates as 2), 2 of 8 clips held out."""
    return run_script("train_pyramid_flow.sh", {
        "GPUS": str(gpus), "VIDEO_SYNC_GROUP": "2", "SHARD_STRATEGY": strategy, "MODEL_PATH": str(workspace["model"]),
        "OUTPUT_DIR": str(out), "ANNO_FILE": str(workspace["anno"]), "RESOLUTION": "64x64", "NUM_FRAMES": "4",
        "BATCH_SIZE": "4", "GRAD_ACCU_STEPS": "1", "ITERS_PER_EPOCH": str(steps), "SAVE_EVERY_STEPS": "1",
        "EVAL_FRACTION": "0.25", "EVAL_EVERY": "1", "EXTRA_ARGS": "--trace_batches --report_to none", **env})


@pytest.fixture(scope="module")
def ar_runs(workspace) -> dict[str, tuple[Path, list[subprocess.CompletedProcess]]]:
    root = workspace["root"]
    runs = {}
    for name, gpus, strategy in (("one", 1, "ddp"), ("rerun", 1, "ddp"), ("zero2", 2, "zero2"),
                                 ("zero3", 2, "zero3")):
        runs[name] = (root / name, [ar(workspace, root / name, gpus, strategy, 2)])
    resumed = root / "resumed"
    runs["resumed"] = (resumed, [ar(workspace, resumed, 1, "ddp", 1), ar(workspace, resumed, 1, "ddp", 2)])
    return runs


def test_eval_loss_of_the_same_weights_is_identical_on_rerun_resume_process_counts_and_strategies(ar_runs):
    one = evals(ar_runs["one"][0])
    assert sorted(one) == [0, 1, 2]
    for name in ("one", "rerun", "resumed", "zero2", "zero3"):
        print(name, {step: f"{e['loss']:.10f}" for step, e in evals(ar_runs[name][0]).items()})
    # The same launch again, and the same run stopped after step 1 and resumed: bit-identical figures.
    assert evals(ar_runs["rerun"][0]) == one
    resumed = evals(ar_runs["resumed"][0])
    assert {s: e["loss"] for s, e in resumed.items()} == {s: e["loss"] for s, e in one.items()}
    assert resumed[2]["loss_vs_base"] == one[2]["loss_vs_base"]
    second_launch = ar_runs["resumed"][1][1].stderr
    assert "resumed from" in second_launch and "(base weights)" not in second_launch, \
        "a resumed run must not evaluate the base again with resumed weights"
    assert "eval step 2: held-out loss" in second_launch and "vs base" in second_launch
    # Base weights: the same figure for 1 process, 2 processes with ZeRO-2 and with ZeRO-3 (one contributor per
    # sample, summed exactly); after training, the weights of the three set-ups agree to ~1e-7, and so do the figures.
    for name in ("zero2", "zero3"):
        other = evals(ar_runs[name][0])
        assert other[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-7, abs=0)
        for step in (1, 2):
            assert other[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-6, abs=0), (name, step)
            for part in ("stage_0", "stage_1", "stage_2"):
                assert other[step][f"loss_{part}"] == pytest.approx(one[step][f"loss_{part}"], rel=1e-6, abs=0)


def test_eval_loss_differs_when_the_weights_differ(ar_runs):
    one = evals(ar_runs["one"][0])
    assert len({one[s]["loss"] for s in (0, 1, 2)}) == 3
    assert one[2]["loss_vs_base"] == pytest.approx(one[2]["loss"] / one[0]["loss"] - 1)
    assert one[0]["loss_vs_base"] == 0.0


def test_held_out_clips_never_reach_a_training_batch(workspace, ar_runs):
    lines = [json.loads(x) for x in workspace["anno"].read_text().splitlines()]
    held = {str(workspace["data"] / lines[i]["latent"]) for i in held_out_lines(len(lines), 0.25, 42)}
    assert len(held) == 2
    for name in ("one", "zero2", "zero3"):
        out, (result,) = ar_runs[name]
        assert "evaluation set: 2 usable of the 2 line(s) EVAL_FRACTION=0.25 holds out of 8 (seed 42); training " \
               "uses the other 6" in result.stdout
        trained = set()
        for path in (out / "logs").glob("trace_rank*.jsonl"):
            for record in map(json.loads, path.read_text().splitlines()):
                trained.update(record.get("paths", []))
        assert trained and not trained & held, (name, trained & held)


def test_base_figure_is_the_same_with_sequence_parallelism_and_lora(workspace, ar_runs):
    """SP_SIZE=2 (each process holds half of every sample's tokens) and LoRA (zero-initialised adapters: the base
    function) score the base weights as a plain run does."""
    base = evals(ar_runs["one"][0])[0]
    sp, lora = workspace["root"] / "sp", workspace["root"] / "lora"
    ar(workspace, sp, 2, "zero2", 1, SP_SIZE="2", VIDEO_SYNC_GROUP="1")
    ar(workspace, lora, 1, "ddp", 1, LORA_RANK="4")
    for out in (sp, lora):
        figure = evals(out)[0]
        print(out.name, f"{figure['loss']:.10f} vs {base['loss']:.10f}")
        assert figure["loss"] == pytest.approx(base["loss"], rel=1e-5, abs=0), out.name
        assert evals(out)[1]["loss"] != figure["loss"]


def test_t2i_eval_from_a_separate_file_is_the_same_on_one_and_two_processes(workspace):
    """Images encoded by the VAE on the fly (a seeded posterior sample, centre crops) and captions encoded by the
    run's text encoder: the base figure of 1 process equals ZeRO-3 on 2 processes."""
    lines = workspace["images"].read_text().splitlines()
    eval_file = workspace["data"] / "image_eval.jsonl"
    eval_file.write_text("\n".join(lines[:3]) + "\n")
    figures = {}
    for gpus, strategy in ((1, "ddp"), (2, "zero3")):
        out = workspace["root"] / f"t2i_{gpus}"
        result = run_script("train_pyramid_flow_without_ar.sh", {
            "GPUS": str(gpus), "TASK": "t2i", "SHARD_STRATEGY": strategy, "MODEL_PATH": str(workspace["model"]),
            "VARIANT": "diffusion_transformer_image", "OUTPUT_DIR": str(out), "ANNO_FILE": str(workspace["images"]),
            "EVAL_ANNO_FILE": str(eval_file), "RESOLUTION": "64x64", "BATCH_SIZE": "4", "ITERS_PER_EPOCH": "1",
            "EXTRA_ARGS": "--report_to none"})
        assert "NOTE: 3 evaluation sample(s) are also in ANNO_FILE (trained on)" in result.stdout
        figures[gpus] = evals(out)
    print({g: {s: e["loss"] for s, e in f.items()} for g, f in figures.items()})
    assert sorted(figures[1]) == sorted(figures[2]) == [0, 1]
    assert figures[2][0]["loss"] == pytest.approx(figures[1][0]["loss"], rel=1e-6, abs=0)
    assert figures[1][1]["loss"] != figures[1][0]["loss"]


def test_overfit_run_training_loss_falls_held_out_rises_and_the_warning_stops_it(workspace):
    """A base model trained on all 8 clips, then finetuned at a high learning rate on 2 of them (each twice in the
    annotation: a batch of 4) with the other 6 evaluated (EVAL_ANNO_FILE)."""
    lines = workspace["anno"].read_text().splitlines()
    train2, eval6 = workspace["data"] / "train2.jsonl", workspace["data"] / "eval6.jsonl"
    train2.write_text("\n".join([lines[0], lines[1], lines[0], lines[1]]) + "\n")
    eval6.write_text("\n".join(lines[2:]) + "\n")
    common = {"GPUS": "1", "VIDEO_SYNC_GROUP": "1", "SHARD_STRATEGY": "ddp", "MODEL_PATH": str(workspace["model"]),
              "RESOLUTION": "64x64", "NUM_FRAMES": "4", "BATCH_SIZE": "4", "GRAD_ACCU_STEPS": "1", "LR": "3e-3",
              "SAVE_EVERY_STEPS": "0", "SAVE_CKPT_FREQ": "0"}
    base = workspace["root"] / "overfit_base"
    run_script("train_pyramid_flow.sh", {**common, "OUTPUT_DIR": str(base), "ANNO_FILE": str(workspace["anno"]),
                                         "ITERS_PER_EPOCH": "300",
                                         "EXTRA_ARGS": "--report_to none --text_drop_rate 0"})
    out = workspace["root"] / "overfit"
    weights = base / "export" / "transformer" / "diffusion_pytorch_model.safetensors"
    result = run_script("train_pyramid_flow.sh", {
        **common, "OUTPUT_DIR": str(out), "ANNO_FILE": str(train2), "EVAL_ANNO_FILE": str(eval6),
        "ITERS_PER_EPOCH": "2000", "EVAL_EVERY": "200", "EVAL_DEGRADE_MARGIN": "0.02", "EVAL_DEGRADE_PATIENCE": "3",
        "EVAL_STOP_ON_DEGRADE": "1",
        "EXTRA_ARGS": f"--report_to none --text_drop_rate 0 --dit_pretrained_weight {weights}"})
    held_out = {step: e["loss"] for step, e in evals(out).items()}
    losses = train_losses(out)
    window = 200
    train_means = {w + window: statistics.mean(losses[w:w + window]) for w in range(0, len(losses), window)}
    print("held-out loss by step:", {s: round(v, 5) for s, v in held_out.items()})
    print("training loss, mean of the 200 steps up to:", {s: round(v, 5) for s, v in train_means.items()})
    steps = sorted(held_out)
    best_step = min(held_out, key=held_out.get)
    final = steps[-1]
    assert final < 2000, "EVAL_STOP_ON_DEGRADE=1 should have ended the run early"
    assert 0 < best_step < final
    assert held_out[final] > held_out[best_step] * 1.02  # the held-out loss rose past its best ...
    assert train_means[final] < train_means[best_step] < train_means[window]  # ... while training kept falling
    assert f"eval step {final}: DEGRADING: held-out loss" in result.stderr
    assert "Likely levers: a lower learning rate (LR is 0.003 now)" in result.stderr
    assert f"stopped after step {final} of 2000: the held-out loss degraded" in result.stderr
    assert (out / "checkpoints" / f"checkpoint-{final}" / "complete").is_file()
    assert (out / "export" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_dry_run_states_the_evaluation_set_and_its_cost(workspace, tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "GPUS": "1", "VIDEO_SYNC_GROUP": "1", "MODEL_PATH": str(workspace["model"]),
           "OUTPUT_DIR": str(tmp_path / "out"), "ANNO_FILE": str(workspace["anno"]), "RESOLUTION": "64x64",
           "NUM_FRAMES": "4", "BATCH_SIZE": "4", "NUM_WORKERS": "0", "OMP_NUM_THREADS": "1",
           "TORCHDYNAMO_DISABLE": "1", "EVAL_FRACTION": "0.25", "EVAL_EVERY": "100", "EPOCHS": "1",
           "ITERS_PER_EPOCH": "1000"}
    result = subprocess.run(["sh", str(REPO / "scripts" / "train_pyramid_flow.sh")], env=env, capture_output=True,
                            text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluation set: 2 usable of the 2 line(s) EVAL_FRACTION=0.25 holds out of 8" in result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("evaluation: "))
    # 3 stages x 4 timesteps x 2 history depths per sample; before the first step, every 100 steps (the last
    # included): 11 evaluations.
    assert line.startswith("evaluation: 2 held-out sample(s) x 24 grid points (DiT rows, forward only, 2 call(s) "
                           "per sample)") and "11 evaluation(s) in the run" in line, line
    assert not (tmp_path / "out").exists()
