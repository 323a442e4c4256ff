"""Sequence parallelism (Ulysses) of both DiT kinds: 2 processes (gloo) against 1, outputs and gradients.

Each case runs the same tiny model on the same inputs twice in every process: once alone (SP_SIZE=1, the
reference computation) and once split over the 2-process SP group (SP_SIZE=2). Outputs must match, and the
group's summed parameter/input gradients divided by the group size must match the single-process gradients
(the convention data-parallel averaging relies on, see ``pyramid_dit.sequence_parallel``). Cases cover the
autoregressive layout (several columns, history clips at lower resolutions, temporal-causal mask), the
full-sequence layout (one clip per column, several frames), text padding, stream lengths that do not divide by 2
(padding of the split) and gradient checkpointing (collectives recomputed in backward).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

from test_dit import outputs_and_grads
from two_ranks import run_two_ranks

from pyramid_dit.sequence_parallel import SequenceParallel, StreamShard
from trainer_misc.runtime.distributed import parallel_layout

TOL = 1e-5  # relative to the max |reference|, float32
LAUNCH_TIMEOUT_S = 240

# (name, kind, columns, text padding per row, model overrides, gradient checkpointing)
CASES = [
    # AR: 3 columns, history clips (lower resolution, several frames), temporal-causal mask, padded text.
    ("flux_ar", "flux", [[(1, 4, 6)] * 3, [(1, 4, 6), (1, 8, 12), (1, 6, 6)], [(2, 4, 6), (1, 6, 6)]],
     (0, 3, 1), {}, False),
    # Full sequence: one clip of several frames per column (the pyramid stages), no temporal causality.
    ("flux_full", "flux", [[(3, 4, 6)], [(3, 6, 6)]], (2, 0), {"use_temporal_causal": False}, False),
    # Full sequence with the temporal-causal mask, batch 2, gradient checkpointing of every block.
    ("flux_full_causal_ckpt", "flux", [[(3, 6, 6)]], (4, 1), {}, True),
    ("sd3_ar", "sd3", [[(1, 4, 6)] * 3, [(1, 4, 6), (1, 8, 12), (1, 6, 6)]], (0, 5), {}, False),
    ("sd3_full", "sd3", [[(3, 6, 6)], [(3, 8, 8)]], (3, 0), {"use_temporal_causal": False}, True),
    # One masked attention call per column (--attention_split column) instead of one per frame.
    ("flux_ar_column_split", "flux", [[(1, 4, 6)] * 3, [(2, 4, 6), (1, 6, 6)]], (0, 3), {"attention_split": "column"},
     False),
    # The gather's backward through a reduce-scatter (NCCL's path; emulated on gloo, which has none).
    ("sd3_ar_reduce_scatter", "sd3", [[(1, 4, 6)] * 3, [(1, 4, 6), (1, 8, 12), (1, 6, 6)]], (0, 5),
     {"reduce_scatter": True}, True),
]
# FlexAttention under SP, forward only (torch has no CPU backward for it; with TorchDynamo off, as in these
# launches, it runs torch's eager implementation).
FLEX_CASES = [
    ("flux_ar_flex", "flux", [[(1, 4, 6)] * 3, [(1, 4, 6), (1, 8, 12), (1, 6, 6)]], (0, 3)),
    ("sd3_ar_flex", "sd3", [[(1, 4, 6)] * 3, [(2, 4, 6), (1, 8, 12)]], (2, 0)),
]
BATCH = {"flux_full_causal_ckpt": 2}


# --------------------------------------------------------------------------------------------------- worker

def _model(kind: str, overrides: dict, ckpt: bool):
    if kind == "flux":
        from test_dit import tiny_model
    else:
        from test_mmdit import tiny_model
    overrides = dict(overrides)
    overrides.pop("reduce_scatter", None)  # a collective's path, not a config key
    split = overrides.pop("attention_split", "frame")  # a model attribute, not a config key
    model = tiny_model(**overrides).train()
    model.attention_split = split
    if ckpt:
        model.enable_gradient_checkpointing(1.0)
    return model


def _saved_bytes(model, inputs: dict) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward call: the activation memory of
    training, without the weights (a parameter's storage is not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(seen.values())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _emulated_reduce_scatter(dist):
    """``dist.reduce_scatter_tensor`` for gloo (which has none): all-reduce, keep this rank's block."""
    def reduce_scatter_tensor(output, input, group=None):
        total = input.clone()
        dist.all_reduce(total, group=group)
        output.copy_(total.chunk(dist.get_world_size(group))[dist.get_rank(group)])
    return reduce_scatter_tensor


def worker(result_dir: Path) -> None:
    import torch.distributed as dist
    from test_dit import make_inputs

    import pyramid_dit.sequence_parallel as sequence_parallel
    from trainer_misc.runtime.distributed import sequence_parallel_group

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    sp = SequenceParallel.of(sequence_parallel_group(2))
    report = {}
    for name, kind, columns, pad, overrides, ckpt in CASES:
        model = _model(kind, overrides, ckpt)
        inputs = make_inputs(columns, batch=BATCH.get(name, 1), text_len=9, pad=pad, seed=3)
        g = torch.Generator().manual_seed(7)
        weights = [torch.randn(col[-1].shape, generator=g) for col in inputs["sample"]]
        ref_out, ref_grads = outputs_and_grads(model, inputs, weights)
        model.enable_sequence_parallel(sp)
        if overrides.get("reduce_scatter"):
            has, reduce_scatter = sequence_parallel._has_reduce_scatter, getattr(dist, "reduce_scatter_tensor")
            sequence_parallel._has_reduce_scatter = lambda _sp: True
            dist.reduce_scatter_tensor = _emulated_reduce_scatter(dist)
            try:
                out, grads = outputs_and_grads(model, inputs, weights)
            finally:
                sequence_parallel._has_reduce_scatter, dist.reduce_scatter_tensor = has, reduce_scatter
        else:
            out, grads = outputs_and_grads(model, inputs, weights)
        split = model._pack(inputs["sample"], inputs["encoder_attention_mask"])
        model.enable_sequence_parallel(None)
        assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
        grad_err = 0.0
        for key, grad in grads.items():
            dist.all_reduce(grad, group=sp.group)
            grad_err = max(grad_err, _rel(grad / sp.size, ref_grads[key]))
        seq = model._pack(inputs["sample"], inputs["encoder_attention_mask"])
        report[name] = {"out": max(_rel(o, r) for o, r in zip(out, ref_out)), "grad": grad_err,
                        "n_grads": len(grads), "video_tokens": sum(seq.video_lens), "text_tokens": sum(seq.text_lens),
                        "sharded": split.sharded and not seq.sharded,
                        "held_video": sum(split.lens("video")), "held_text": sum(split.lens("text"))}
    for name, kind, columns, pad in FLEX_CASES:
        model = _model(kind, {}, False).eval()
        inputs = make_inputs(columns, text_len=9, pad=pad, seed=4)
        with torch.no_grad():
            ref_out = model(**inputs)  # one process, attention per frame
            model.attention_split = "flex"
            model.enable_sequence_parallel(sp)
            out = model(**inputs)
            model.enable_sequence_parallel(None)
        report[name] = {"out": max(_rel(o, r) for o, r in zip(out, ref_out))}
    # Activation memory per process, full-sequence column of 4 frames x 16 x 16 tokens and 9 text tokens.
    model = _model("flux", {"use_temporal_causal": False}, False)
    inputs = make_inputs([[(4, 32, 32)]], text_len=9, pad=(0,), seed=5)
    one = _saved_bytes(model, inputs)
    model.enable_sequence_parallel(sp)
    two = _saved_bytes(model, inputs)
    report["memory"] = {"sp1_bytes": one, "sp2_bytes": two}
    result_dir.mkdir(parents=True, exist_ok=True)
    (result_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("sp")
    return run_two_ranks(Path(__file__).resolve(), tmp, tmp, timeout=LAUNCH_TIMEOUT_S, what="SP launch")


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_sp2_equals_sp1(reports, case):
    for rank, report in enumerate(reports):
        r = report[case]
        print(f"{case} rank {rank}: output rel err {r['out']:.2e}, gradient rel err {r['grad']:.2e} "
              f"over {r['n_grads']} tensors; tokens per process {r['held_video']} of {r['video_tokens']} video, "
              f"{r['held_text']} of {r['text_tokens']} text")
        assert r["sharded"], "the SP run did not split the sequence"
        assert (r["held_video"], r["held_text"]) == (-(-r["video_tokens"] // 2), -(-r["text_tokens"] // 2))
        assert r["out"] < TOL, r
        assert r["grad"] < TOL, r


@pytest.mark.parametrize("case", [c[0] for c in FLEX_CASES])
def test_sp2_flex_forward_equals_one_process_per_frame(reports, case):
    for rank, report in enumerate(reports):
        print(f"{case} rank {rank}: output rel err {report[case]['out']:.2e}")
        assert report[case]["out"] < TOL, report[case]


def test_activation_memory_per_process_halves(reports):
    """What SP is for: each process keeps about half the activations for backward (the whole-sequence attention
    inputs are kept for half the heads, every token-wise activation for half the tokens)."""
    for rank, report in enumerate(reports):
        m = report["memory"]
        ratio = m["sp2_bytes"] / m["sp1_bytes"]
        print(f"rank {rank}: activations kept for backward {m['sp1_bytes'] / 2**20:.2f} MiB with SP_SIZE=1, "
              f"{m['sp2_bytes'] / 2**20:.2f} MiB per process with SP_SIZE=2 ({ratio:.3f}x)")
        assert ratio < 0.6, m


def test_cases_exercise_split_padding(reports):
    """Some stream of some case has an odd length, so the padding of the split is covered."""
    assert any(r["video_tokens"] % 2 or r["text_tokens"] % 2 for r in reports[0].values())


def _sp(size: int, rank: int) -> SequenceParallel:
    return SequenceParallel(group=None, size=size, rank=rank)


def test_stream_shard_local_lens():
    # 3 columns of 5, 2 and 4 tokens (11) over 3 processes: parts of 4 tokens, the last holding 1 padding token.
    parts = [StreamShard(_sp(3, r), 11).local_lens([5, 2, 4]) for r in range(3)]
    assert parts == [[4, 0, 0], [1, 2, 1], [0, 0, 4]]
    assert all(sum(p) == 4 for p in parts)
    # A stream shorter than the group: the last process holds only padding.
    assert StreamShard(_sp(4, 3), 3).local_lens([2, 1]) == [0, 1]


def test_stream_shard_split_pads_and_covers():
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).view(2, 7, 3)
    parts = [StreamShard(_sp(2, r), 7).split(x) for r in range(2)]
    assert [tuple(p.shape) for p in parts] == [(2, 4, 3), (2, 4, 3)]
    assert torch.equal(torch.cat(parts, dim=1)[:, :7], x)
    assert torch.equal(parts[1][:, 3], torch.zeros(2, 3))


def test_parallel_layout_constraints():
    lay = parallel_layout(rank=5, world_size=8, video_sync_group=2, sp_size=2)
    assert (lay.sp_rank, lay.data_rank, lay.data_world) == (1, 2, 4)
    assert lay.slots.slots == (2,) and (lay.slots.lanes[0].group, lay.slots.lanes[0].positions) == (1, (0,))
    with pytest.raises(ValueError, match="SP_SIZE=3 must divide"):
        parallel_layout(rank=0, world_size=4, sp_size=3)
    with pytest.raises(ValueError, match="must divide one\nanother|divide one another"):
        parallel_layout(rank=0, world_size=12, video_sync_group=4, sp_size=2)  # 6 data ranks vs groups of 4


def test_head_count_must_divide():
    from test_dit import tiny_model

    with pytest.raises(ValueError, match="divisible"):
        tiny_model().enable_sequence_parallel(_sp(3, 0))


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
