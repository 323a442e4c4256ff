"""What a multi-node launch needs, on one host: the output folder shared by every node (refused at start-up when
it is not), the rendezvous and GPU count from Slurm's variables, the network interface that reaches MASTER_ADDR, and
a checkpoint's write time against the stop window."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# ------------------------------------------------------------------------------------------------ Slurm

def _slurm(**extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1", **extra}


def test_slurm_variables_give_the_rendezvous():
    from trainer_misc.runtime.launcher import launch_command, node_layout

    layout = node_layout(_slurm())
    assert (layout.nnodes, layout.node_rank, layout.master_addr, layout.master_port, layout.gpus) == \
        (2, 1, "gpu07", 29500, 8)
    assert "Slurm" in layout.source and "MASTER_ADDR=gpu07" in layout.source
    cmd = launch_command(["train.py"], layout)
    assert cmd[3:13] == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "gpu07", "--master_port", "29500",
                         "--nproc_per_node", "8"]
    # The user's own variables win over Slurm's.
    assert node_layout(_slurm(GPUS="4", MASTER_ADDR="10.1.1.1")).gpus == 4
    assert node_layout(_slurm(MASTER_ADDR="10.1.1.1")).master_addr == "10.1.1.1"


def test_slurm_with_one_task_per_gpu_is_refused():
    from trainer_misc.runtime.arguments import ConfigError
    from trainer_misc.runtime.launcher import node_layout

    with pytest.raises(ConfigError, match="one task per node"):
        node_layout(_slurm(SLURM_NTASKS_PER_NODE="8"))


@pytest.mark.parametrize("nodelist,first", [("gpu[07-08]", "gpu07"), ("node001", "node001"),
                                            ("a[3,5-9],b1", "a3"), ("x-1[0010-0012]", "x-10010")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    from trainer_misc.runtime.launcher import slurm_first_host

    assert slurm_first_host(nodelist) == first


def test_the_train_script_takes_the_rendezvous_from_slurm(tmp_path):
    model = tmp_path / "model" / "diffusion_transformer_384p"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"num_attention_heads": 24}')
    anno = tmp_path / "anno.jsonl"
    anno.write_text("")
    (tmp_path / "empty_prompt_text_fea.safetensors").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(_slurm(SLURM_GPUS_ON_NODE="2", SLURM_JOB_NODELIST="127.0.0.1"), MODEL_PATH=str(tmp_path / "model"),
               ANNO_FILE=str(anno), OUTPUT_DIR=str(tmp_path / "out"), VIDEO_SYNC_GROUP="4", PRINT_LAUNCH="1",
               NNODES="", NODE_RANK="", MASTER_ADDR="", GPUS="")
    proc = subprocess.run(["sh", str(REPO / "scripts" / "train_pyramid_flow.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "layout from Slurm (NNODES=2 from SLURM_JOB_NUM_NODES, NODE_RANK=1 from SLURM_NODEID, GPUS=2 from " \
           "SLURM_GPUS_ON_NODE, MASTER_ADDR=127.0.0.1 (first host of the Slurm node list))" in proc.stderr
    args = proc.stdout.splitlines()
    assert args[args.index("--nnodes") + 1] == "2" and args[args.index("--node_rank") + 1] == "1"


# ------------------------------------------------------------------------------------------------ network

def test_the_interface_that_reaches_master_addr_is_chosen(capsys):
    from trainer_misc.runtime.launcher import NodeLayout, network_env, pick_interface

    interface, local = pick_interface("127.0.0.1", 29500)
    assert local == "127.0.0.1" and interface == "lo"
    layout = NodeLayout(gpus=1, nnodes=2, node_rank=0, master_addr="127.0.0.1", master_port=29500, have_gpu=False,
                        source="test")
    assert network_env(layout, {}, "test") == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    err = capsys.readouterr().err
    assert "network interface lo (127.0.0.1) reaches MASTER_ADDR=127.0.0.1" in err and "loopback" in err
    assert network_env(layout, {"GLOO_SOCKET_IFNAME": "eth9"}, "test") == {"NCCL_SOCKET_IFNAME": "lo"}
    assert "GLOO_SOCKET_IFNAME=eth9 (yours)" in capsys.readouterr().err
    one = NodeLayout(gpus=2, nnodes=1, node_rank=0, master_addr="127.0.0.1", master_port=0, have_gpu=False, source="t")
    assert network_env(one, {}, "test") == {}


# ------------------------------------------------------------------------------------------------ shared storage

LAUNCH = ("import sys; from trainer_misc.runtime.launcher import NodeLayout, launch; "
          "launch(sys.argv[4:], NodeLayout(gpus=1, nnodes=2, node_rank=int(sys.argv[1]), master_addr='127.0.0.1', "
          "master_port=int(sys.argv[2]), have_gpu=False, source='test'), prog=sys.argv[3])")


def _worker(spec: dict) -> int:
    import torch
    from test_trainer_toy import ToyDataset, ToyModel, toy_loss

    from trainer_misc.loop.config import TrainConfig
    from trainer_misc.loop.trainer import train

    torch.set_num_threads(1)
    outputs = spec.pop("outputs")
    spec["output_dir"] = outputs[int(os.environ["GROUP_RANK"])]  # each emulated node its own OUTPUT_DIR
    train(ToyModel(), toy_loss, ToyDataset(64), TrainConfig(**spec))
    return 0


def test_an_output_dir_the_nodes_do_not_share_is_refused_at_start(tmp_path):
    """Two emulated nodes, each with its own OUTPUT_DIR (as node-local storage would be): both stop at start-up,
    before any step, with rank 0's message naming the folder and the rank whose files it cannot see."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outputs = [str(tmp_path / "node0" / "run"), str(tmp_path / "node1" / "run")]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"outputs": outputs, "max_steps": 3, "batch_size": 4, "strategy": "zero2",
                                "mixed_precision": "fp32", "device": "cpu", "tensorboard": False}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", LAUNCH, str(r), str(port), f"node{r}", str(Path(__file__)),
                               str(spec)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode != 0 for p in procs), results
    last = results[0][1].strip().splitlines()[-1]
    assert f"OUTPUT_DIR={outputs[0]} is not one folder for every process: rank 0 on {socket.gethostname()} cannot " \
           f"see the files that rank 1 on {socket.gethostname()} wrote there" in last, results[0][1][-3000:]
    assert not (Path(outputs[0]) / "checkpoints").exists() and not (Path(outputs[0]) / "metrics.jsonl").exists()
    assert time.monotonic() - start < 200


def test_an_output_dir_without_space_is_refused_at_start_with_the_free_space(tmp_path, monkeypatch):
    """A full disk is found by the start-up probe, not by the first checkpoint hours later: the message names
    OUTPUT_DIR, the error as the OS says it and the free space; the probe leaves nothing behind."""
    import errno

    from trainer_misc.state.storage import check_output_dir

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # where a full filesystem reports it for buffered writes
    with pytest.raises(ValueError) as refused:
        check_output_dir(tmp_path / "run")
    message = str(refused.value)
    assert message.startswith(f"OUTPUT_DIR={tmp_path / 'run'}: rank 0 on {socket.gethostname()} cannot write a 16 MiB")
    assert "No space left on device (" in message and " free there)" in message
    assert list((tmp_path / "run").iterdir()) == []


def test_a_checkpoint_that_would_not_fit_the_stop_window_is_said():
    from trainer_misc.state.storage import StorageProbe, stop_window_note

    probe = StorageProbe(write_bytes_per_s=100 * 2**20)  # 100 MiB/s
    assert stop_window_note(2**30, probe, 120.0) is None  # ~10 s of a 120 s window
    note = stop_window_note(28 * 2**30, probe, 120.0)  # ZeRO-2 shard of the 2 B model on slow storage: ~287 s
    assert note.startswith("a checkpoint writes 28.0 GiB per process, about 287 s at the 100 MiB/s measured")
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120 s" in note and "KillWait" in note
    assert stop_window_note(28 * 2**30, probe, None) is None  # not under torchrun: no window


if __name__ == "__main__":
    from trainer_misc.runtime.failures import run_main

    run_main(lambda: _worker(json.loads(Path(sys.argv[1]).read_text())), "cluster_worker")
