"""Fault injection on 2-process ZeRO-2 runs of the toy model: every fault ends in a bounded time with a clear last
line, and where training can go on, a rerun continues the uninterrupted run's loss curve exactly.

Each launch goes through the scripts' launcher (``trainer_misc.runtime.launcher.launch``: torchrun under its
supervisor), as a user's launch does, and runs this file as the worker. One uninterrupted run (module fixture) is the baseline every resume is compared
with and the source of the checkpoints the corruption tests damage. Faults: an exception on one rank (disk full
while checkpointing), a rank that stops responding (SIGSTOP), a second run in the same output folder, a planted
pickle in a DeepSpeed file, corrupt latest / all checkpoints, SIGTERM (preemption), a repeated signal.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEPS = 6
# Generous for a loaded 2-core machine, far below every timeout that used to end these faults (60 min).
BOUNDED_S = 150


# ----------------------------------------------------------------------------------------------------- worker

def _worker(spec: dict) -> int:
    import torch

    torch.set_num_threads(1)
    from test_trainer_toy import ToyDataset, ToyModel, toy_loss

    import trainer_misc.state.checkpoint as checkpoint_mod
    from trainer_misc.loop.config import TrainConfig
    from trainer_misc.loop.trainer import train

    rank = int(os.environ["RANK"])
    fault = spec.get("fault") or {}
    kind = fault.get("kind")

    def loss_fn(model, batch, ctx):
        if kind == "sigstop" and rank == fault["rank"] and ctx.step == fault["step"]:
            Path(spec["pid_file"]).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)
        return toy_loss(model, batch, ctx)

    def on_step_end(record):
        if kind == "signal" and rank == 0 and record.step == fault["step"]:
            os.kill(os.getppid(), getattr(signal, fault["signal"]))  # to torchrun, as a scheduler or Ctrl-C does
            time.sleep(2)  # torchrun forwards it to both workers meanwhile
        if kind == "signal_rank" and rank == fault["rank"] and record.step == fault["step"]:
            os.kill(os.getpid(), getattr(signal, fault["signal"]))  # one worker only (an OOM killer's TERM, a user)

    if kind == "enospc":
        original = checkpoint_mod.atomic_save_safetensors

        def full_disk(tensors, path, metadata=None):
            if rank == fault["rank"] and f"checkpoint-{fault['step']}.tmp" in str(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return original(tensors, path, metadata)

        checkpoint_mod.atomic_save_safetensors = full_disk

    torch.manual_seed(0)
    result = train(ToyModel(), loss_fn, ToyDataset(64), TrainConfig(**spec["config"]), on_step_end=on_step_end)
    Path(spec["report_dir"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["report_dir"]) / f"rank{rank}.json").write_text(json.dumps({
        "start_step": result.start_step, "world_size": result.engine.world_size,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None}))
    return 0


# ----------------------------------------------------------------------------------------------------- launcher

def _config(out: Path, **kw) -> dict:
    cfg = dict(output_dir=str(out), max_steps=STEPS, batch_size=4, strategy="zero2", mixed_precision="fp32",
               device="cpu", lr=1e-2, warmup_steps=0, checkpoint_every=2, keep_last_checkpoints=2,
               tensorboard=False, seed=3)
    cfg.update(kw)
    return cfg


class Launch:
    def __init__(self, proc: subprocess.CompletedProcess, elapsed: float, reports: list[dict]) -> None:
        self.rc, self.stdout, self.stderr, self.elapsed, self.reports = (proc.returncode, proc.stdout, proc.stderr,
                                                                         elapsed, reports)
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        self.last_line = lines[-1] if lines else ""

    def explain(self) -> str:
        return f"rc {self.rc} after {self.elapsed:.0f}s\n{self.stdout[-2000:]}\n{self.stderr[-6000:]}"


# Two processes on this node through the scripts' supervisor (the launch line a script would print is skipped).
LAUNCH = ("import sys; from trainer_misc.runtime.launcher import NodeLayout, launch; "
          "launch(sys.argv[1:], NodeLayout(gpus=2, nnodes=1, node_rank=0, master_addr='127.0.0.1', master_port=0, "
          "have_gpu=False, source='test'), prog='test')")


def launch(tmp: Path, name: str, config: dict, fault: dict | None = None, env: dict | None = None,
           timeout: float = 400) -> Launch:
    spec = {"config": config, "fault": fault, "report_dir": str(tmp / f"{name}_reports"),
            "pid_file": str(tmp / f"{name}.pid")}
    spec_file = tmp / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    full_env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "RANK", "WORLD_SIZE",
                                                                 "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    full_env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="3", **(env or {}))
    cmd = [sys.executable, "-c", LAUNCH, str(Path(__file__).resolve()), str(spec_file)]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=full_env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    elapsed = time.monotonic() - start
    reports = [json.loads((tmp / f"{name}_reports" / f"rank{r}.json").read_text()) for r in range(2)
               if (tmp / f"{name}_reports" / f"rank{r}.json").is_file()]
    return Launch(proc, elapsed, reports)


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def assert_same_curve(out: Path, baseline: Path) -> None:
    got, want = losses(out), losses(baseline)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), f"step {step}: {a} vs uninterrupted {b}"


def copy_checkpoints(baseline: Path, out: Path, *steps: int) -> None:
    for step in steps:
        shutil.copytree(baseline / "checkpoints" / f"checkpoint-{step}", out / "checkpoints" / f"checkpoint-{step}")


def rewrite_manifest(checkpoint: Path, name: str) -> None:
    """Record a replaced file's size and hash in ``complete``, as someone tampering with the folder could."""
    marker = json.loads((checkpoint / "complete").read_text())
    data = (checkpoint / name).read_bytes()
    marker["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "complete").write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("baseline")
    run = launch(tmp, "baseline", _config(tmp / "out"))
    assert run.rc == 0, run.explain()
    assert [r["world_size"] for r in run.reports] == [2, 2]
    return tmp / "out"


# ----------------------------------------------------------------------------------------------------- tests

def test_keep_ckpts_keeps_the_newest(baseline):
    assert sorted(p.name for p in (baseline / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_disk_full_on_one_rank_ends_every_rank_then_resume_skips_a_corrupt_checkpoint(baseline, tmp_path):
    out = tmp_path / "out"
    run = launch(tmp_path, "full", _config(out), fault={"kind": "enospc", "rank": 1, "step": 4})
    assert run.rc != 0 and run.elapsed < BOUNDED_S, run.explain()
    # The failing rank's reason is the last line: rank, "no space left", the path and the free space.
    assert "rank 1:" in run.last_line and "no space left on device" in run.last_line, run.explain()
    assert "checkpoint-4.tmp" in run.last_line and "free there" in run.last_line
    # The earlier checkpoint is kept; step 4 never became a checkpoint (at most a .tmp that the next save removes).
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.endswith(".tmp"))
    assert names == ["checkpoint-2"], names

    # Plant a damaged newer checkpoint (the baseline's step 4 with rank 1's RNG state truncated).
    copy_checkpoints(baseline, out, 4)
    rng = out / "checkpoints" / "checkpoint-4" / "rng" / "slot_00001.safetensors"
    rng.write_bytes(rng.read_bytes()[:100])
    resumed = launch(tmp_path, "resume", _config(out))
    assert resumed.rc == 0, resumed.explain()
    assert f"skipping checkpoint {out / 'checkpoints' / 'checkpoint-4'}: {rng}: 100 bytes" in resumed.stderr
    assert [r["start_step"] for r in resumed.reports] == [2, 2]  # every rank resumed from the same checkpoint
    assert_same_curve(out, baseline)


def test_a_rank_that_stops_responding_is_detected_by_the_collective_timeout(tmp_path):
    out = tmp_path / "out"
    pid_file = tmp_path / "stop.pid"
    try:
        run = launch(tmp_path, "stop", _config(out), fault={"kind": "sigstop", "rank": 1, "step": 2},
                     env={"COLLECTIVE_TIMEOUT_MIN": "0.33"})
    finally:
        if pid_file.is_file():  # never leave a stopped process behind (torchrun kills it; make sure)
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert run.rc != 0 and run.elapsed < BOUNDED_S, run.explain()
    assert "rank 0:" in run.last_line and "a collective timed out" in run.last_line, run.explain()
    assert "COLLECTIVE_TIMEOUT_MIN" in run.last_line


def test_second_run_in_the_same_output_dir_is_refused(tmp_path):
    from trainer_misc.state.run_lock import OutputDirLock

    out = tmp_path / "out"
    lock = OutputDirLock(out).acquire()  # "another run" (this process) holds the folder
    try:
        run = launch(tmp_path, "second", _config(out))
    finally:
        lock.release()
    assert run.rc != 0 and run.elapsed < BOUNDED_S, run.explain()
    assert f"is in use by another run (pid {os.getpid()}" in run.last_line, run.explain()
    assert not (out / "checkpoints").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    code = ("import sys, time; from trainer_misc.state.run_lock import OutputDirLock; "
            "OutputDirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        from trainer_misc.state.run_lock import OutputDirLock, RunLockedError

        with pytest.raises(RunLockedError, match=f"pid {holder.pid} on"):
            OutputDirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = OutputDirLock(tmp_path).acquire()  # the holder died with its lock: no stale lock to clean by hand
    assert lock.held
    lock.release()


def test_planted_pickle_in_a_checkpoint_is_refused_not_run(baseline, tmp_path):
    """A checkpoint file replaced by a pickle that runs a command when unpickled, its manifest rewritten to match
    (so that only the loader stands in the way): the resume refuses the file by name and nothing runs, because
    checkpoints hold only safetensors and JSON and nothing in them is ever unpickled."""
    import torch

    out = tmp_path / "out"
    copy_checkpoints(baseline, out, 6)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    name = "weights/rank_00000.safetensors"
    torch.save({"module": Payload()}, out / "checkpoints" / "checkpoint-6" / name)
    rewrite_manifest(out / "checkpoints" / "checkpoint-6", name)
    run = launch(tmp_path, "pickle", _config(out))
    assert run.rc != 0 and run.elapsed < BOUNDED_S, run.explain()
    assert not marker.exists(), "the planted pickle was executed"
    assert f"{out / 'checkpoints' / 'checkpoint-6' / name}: not a readable fragment file" in run.last_line, \
        run.explain()


def test_no_checkpoint_verifies_names_the_files(baseline, tmp_path):
    out = tmp_path / "out"
    copy_checkpoints(baseline, out, 4, 6)
    (out / "checkpoints" / "checkpoint-6" / "trainer_state.json").write_bytes(b"\xff\xfe garbage")
    states = out / "checkpoints" / "checkpoint-4" / "weights" / "rank_00000.safetensors"
    states.write_bytes(states.read_bytes()[:-10])
    run = launch(tmp_path, "broken", _config(out))
    assert run.rc != 0 and run.elapsed < BOUNDED_S, run.explain()
    assert "no usable checkpoint under" in run.last_line, run.explain()
    assert "checkpoint-6/trainer_state.json" in run.last_line and str(states) in run.last_line


def test_sigterm_checkpoints_and_exits_then_resume_continues_the_curve(baseline, tmp_path):
    out = tmp_path / "out"
    run = launch(tmp_path, "term", _config(out), fault={"kind": "signal", "signal": "SIGTERM", "step": 3})
    assert run.rc != 0 and run.elapsed < BOUNDED_S, run.explain()
    assert "stopped by SIGTERM after step 3" in run.last_line and "checkpoint-3" in run.last_line, run.explain()
    assert (out / "checkpoints" / "checkpoint-3" / "complete").is_file()
    resumed = launch(tmp_path, "after_term", _config(out))
    assert resumed.rc == 0, resumed.explain()
    assert [r["start_step"] for r in resumed.reports] == [3, 3]
    assert_same_curve(out, baseline)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_to_one_rank_stops_every_rank_and_the_last_line_names_it(tmp_path, signal_name):
    """A stop signal that reaches only rank 1 (or Ctrl-C's SIGINT through torchrun) stops both ranks after the same
    step with a checkpoint, and the launch's last line names the signal, not "none" and not torchrun's traceback."""
    out = tmp_path / "out"
    fault = ({"kind": "signal_rank", "rank": 1, "signal": signal_name, "step": 2} if signal_name == "SIGTERM" else
             {"kind": "signal", "signal": signal_name, "step": 2})
    run = launch(tmp_path, f"one_{signal_name}", _config(out), fault=fault)
    assert run.rc != 0 and run.elapsed < BOUNDED_S, run.explain()
    assert f"stopped by {signal_name} after step" in run.last_line, run.explain()
    stopped = int(run.last_line.split("after step ")[1].split(":")[0])
    assert (out / "checkpoints" / f"checkpoint-{stopped}" / "complete").is_file()


# -------------------------------------------------------------------------------------------- generation

def test_nan_weights_are_refused_by_name_and_a_nan_latent_is_never_decoded(tmp_path):
    import torch
    from safetensors.torch import save_file

    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    from pyramid_dit.pipeline import PyramidFlowPipeline
    from tools.build_tiny_checkpoint import build_tiny_checkpoint
    from tools.generate import main as generate

    model = build_tiny_checkpoint(tmp_path / "tiny", seed=0)
    state = PyramidFluxTransformer.from_pretrained(model / "diffusion_transformer_384p").state_dict()
    name = sorted(state)[len(state) // 2]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "nan.safetensors"))
    out = tmp_path / "video.mp4"
    with pytest.raises(ValueError, match=f"tensor {name} contains NaN"):
        generate(["--model_path", str(model), "--dit_weight", str(tmp_path / "nan.safetensors"), "--prompt", "x",
                  "--height", "64", "--width", "64", "--temp", "2", "--num_inference_steps", "1",
                  "--video_num_inference_steps", "1", "--device", "cpu", "--output", str(out)])
    assert not out.exists()

    # Weights that pass the check but still produce a non-finite latent: refused before decoding.
    pipe = PyramidFlowPipeline.from_pretrained(model, device="cpu")
    with torch.no_grad():
        next(p for n, p in pipe.dit.named_parameters() if n.endswith("bias")).fill_(float("inf"))
    with pytest.raises(ValueError, match="generated latents contain NaN or inf"):
        pipe.generate("x", height=64, width=64, temp=2, num_inference_steps=1, video_num_inference_steps=1,
                      progress=False)


# -------------------------------------------------------------------------------------- single-process pieces

def _python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_clear_error_is_one_line_without_traceback():
    proc = _python("from trainer_misc.runtime.failures import run_main\n"
                   "def main():\n"
                   "    raise ValueError('ckpt was written by a ddp run with 2 processes; this run has 1')\n"
                   "run_main(main, 'prog')\n")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "prog: rank 0: ckpt was written by a ddp run with 2 processes; this run has 1"


def test_running_out_of_gpu_memory_ends_with_the_figures_and_the_levers():
    # torch's own exception class and message form; the CUDA allocator raises it on a GPU.
    proc = _python("import torch\n"
                   "from trainer_misc.runtime.failures import run_main\n"
                   "from train.train_pyramid_flow import OOM_HINT\n"
                   "def main():\n"
                   "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
                   "total capacity of 79.19 GiB of which 1.06 GiB is free. Including non-PyTorch memory, this process "
                   "has 78.12 GiB memory in use. If reserved but unallocated memory is large try setting "
                   "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.')\n"
                   "run_main(main, 'train_pyramid_flow.py', oom_hint=OOM_HINT)\n")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "train_pyramid_flow.py: rank 0: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 "
        "has a total capacity of 79.19 GiB of which 1.06 GiB is free). Lower the memory per GPU: PACK_SLOTS=1 (AR: "
        "one slot per pass), GRADIENT_CHECKPOINTING=1, SHARD_STRATEGY=zero3, more GPUs, a smaller BATCH_SIZE, "
        "NUM_FRAMES or RESOLUTION; DRY_RUN=1 predicts a launch's peak per GPU before it starts (docs/training.md, "
        "'Which GPUs do I need')")


def test_second_signal_exits_at_once():
    # The first SIGTERM asks for a checkpoint; the loop would stop after its step. A second one more than a second
    # later exits immediately with 128 + signal.
    proc = _python("import os, signal, time\n"
                   "from trainer_misc.runtime.failures import StopSignals\n"
                   "s = StopSignals().install()\n"
                   "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)\n"
                   "assert s.requested and s.should_stop()\n"
                   "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)\n"
                   "print('repeat within the window ignored', flush=True)\n"
                   "time.sleep(1.2); os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
                   "print('not reached')\n")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "repeat within the window ignored" in proc.stdout and "not reached" not in proc.stdout
    assert "second signal (SIGTERM): exiting now without a checkpoint" in proc.stderr


if __name__ == "__main__":
    from trainer_misc.runtime.failures import run_main

    run_main(lambda: _worker(json.loads(Path(sys.argv[1]).read_text())), "fault_worker")
