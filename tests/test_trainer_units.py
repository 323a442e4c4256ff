"""Unit tests of the trainer's pure parts: optimizer groups, LR schedules, sampler, sync groups, sharded EMA."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from test_trainer_toy import ToyModel
from torch import nn

from trainer_misc.data.sampler import ResumableBatchSampler
from trainer_misc.optim.adamw import LRSchedule, build_adamw, split_decay_groups
from trainer_misc.optim.ema import ShardedEMA, held_chunks
from trainer_misc.runtime.distributed import ensure_launcher_env, slot_layout

# ----------------------------------------------------------------------------------------------------- optimizer

def test_decay_groups_exempt_biases_norms_and_listed_names():
    model = ToyModel()
    model.no_weight_decay = lambda: {"mid.weight"}
    model.inp.bias.requires_grad_(False)
    decay, no_decay = split_decay_groups(model, weight_decay=0.05)
    assert decay["names"] == ["inp.weight", "out.weight"] and decay["weight_decay"] == 0.05
    assert no_decay["names"] == ["norm.weight", "norm.bias", "mid.weight", "mid.bias"]
    assert no_decay["weight_decay"] == 0.0
    assert all(p is dict(model.named_parameters())[n] for n, p in zip(decay["names"], decay["params"]))


def test_adamw_hyperparameters():
    opt = build_adamw(ToyModel(), lr=3e-4, betas=(0.9, 0.95), eps=1e-6, weight_decay=1e-4)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-6 and g["lr"] == 3e-4 for g in opt.param_groups)


def _reference_constant(base, total, warmup, start=1e-6):
    warm = np.linspace(start, base, warmup) if warmup > 0 else np.array([])
    return np.concatenate((warm, np.array([base] * (total - warmup))))


def _reference_cosine(base, final, total, warmup):
    warm = np.linspace(0, base, warmup) if warmup > 0 else np.array([])
    n = total - warmup
    body = np.array([final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)])
    return np.concatenate((warm, body))


@pytest.mark.parametrize("failure", ["not_compatible", "build_fails"])
def test_offload_without_a_buildable_cpu_adam_says_what_to_do(monkeypatch, failure):
    """OFFLOAD=1 on a machine where DeepSpeed's CPU Adam op cannot be built: one error naming the way out, raised
    before training starts, not a compiler traceback."""
    import subprocess

    from deepspeed.ops.op_builder import CPUAdamBuilder

    if failure == "not_compatible":
        monkeypatch.setattr(CPUAdamBuilder, "is_compatible", lambda self, verbose=False: False)
        expected = "not buildable here"
    else:
        monkeypatch.setattr(CPUAdamBuilder, "is_compatible", lambda self, verbose=False: True)

        def fail(self, verbose=False):
            raise subprocess.CalledProcessError(1, ["ninja", "-v"])
        monkeypatch.setattr(CPUAdamBuilder, "load", fail)
        expected = "building DeepSpeed's CPU Adam op failed .*CalledProcessError.*ninja"
    with pytest.raises(RuntimeError, match=expected) as info:
        build_adamw(nn.Linear(2, 2), lr=1e-3, cpu_offload=True)
    assert "OFFLOAD=0" in str(info.value)


@pytest.mark.parametrize("warmup", [0, 1, 2, 7])
def test_lr_schedules_equal_the_reference_arrays(warmup):
    total = 20
    constant = LRSchedule("constant_with_warmup", 5e-5, total, warmup)
    cosine = LRSchedule("cosine", 5e-5, total, warmup, min_lr=1e-5)
    assert [constant(s) for s in range(total)] == _reference_constant(5e-5, total, warmup).tolist()
    assert [cosine(s) for s in range(total)] == _reference_cosine(5e-5, 1e-5, total, warmup).tolist()
    assert constant(total + 5) == constant(total - 1)  # past the end: last value


def test_lr_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="lr_scheduler"):
        LRSchedule("linear", 1e-4, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule("cosine", 1e-4, 10, warmup_steps=10)
    short = LRSchedule("constant_with_warmup", 1e-4, 5, warmup_steps=11)  # warmup longer than the run
    assert short(4) == pytest.approx(1e-6 + 4 * (1e-4 - 1e-6) / 10)


# ----------------------------------------------------------------------------------------------------- sync groups

def test_slot_layout_of_real_groups():
    lay = [slot_layout(r, 8, 4) for r in range(8)]
    assert [(lane.group, lane.positions) for x in lay for lane in x.lanes] == \
        [(0, (0,)), (0, (1,)), (0, (2,)), (0, (3,)), (1, (0,)), (1, (1,)), (1, (2,)), (1, (3,))]
    assert {x.num_groups for x in lay} == {2} and [x.slots for x in lay] == [(r,) for r in range(8)]
    with pytest.raises(ValueError, match="must divide one another"):
        slot_layout(0, 6, 4)


def test_virtual_sync_group_spreads_every_slot_over_the_processes():
    # GPUS=1 VIDEO_SYNC_GROUP=8: one process trains all 8 slots; GPUS=2: 4 consecutive slots each.
    assert slot_layout(0, 1, 8).lanes[0].positions == tuple(range(8))
    two = [slot_layout(r, 2, 8) for r in range(2)]
    assert [x.lanes[0].positions for x in two] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert {(x.lanes[0].group, x.num_groups, x.virtual) for x in two} == {(0, 1, 4)}
    # A real group (processes a multiple of the group) keeps one slot per rank.
    assert [slot_layout(r, 4, 2).lanes[0].positions for r in range(4)] == [(0,), (1,), (0,), (1,)]


def test_a_resumed_run_keeps_its_slots_on_another_process_count():
    """The run's data streams are fixed at its first launch: 4 processes of sync groups of 2 train 2 streams x 2
    slots; on 1 process those 4 slots become 2 lanes of 2, on 2 processes one stream each; 3 cannot share them."""
    first = [slot_layout(r, 4, 2) for r in range(4)]
    assert {x.num_groups for x in first} == {2}
    one = slot_layout(0, 1, 2, num_groups=2)
    assert [(lane.group, lane.positions) for lane in one.lanes] == [(0, (0, 1)), (1, (0, 1))]
    assert one.slots == (0, 1, 2, 3) and one.virtual == 4
    assert [slot_layout(r, 2, 2, num_groups=2).slots for r in range(2)] == [(0, 1), (2, 3)]
    # Full-sequence training (groups of 1): 2 processes' data streams on 1 process are 2 lanes of 1 slot.
    assert [(lane.group, lane.positions) for lane in slot_layout(0, 1, 1, num_groups=2).lanes] == [(0, (0,)), (1, (0,))]
    with pytest.raises(ValueError, match="cannot share them equally"):
        slot_layout(0, 3, 2, num_groups=2)
    with pytest.raises(ValueError, match="cannot share them equally"):
        slot_layout(0, 2, 1, num_groups=1)  # more processes than the run's slots: the global batch would change


def test_partial_launcher_environment_is_an_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(RuntimeError, match="incomplete launcher environment"):
        ensure_launcher_env()


# ----------------------------------------------------------------------------------------------------- sampler

def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_sync_group_ranks_share_batches_and_groups_split_data():
    world, group = 4, 2
    streams = []
    for rank in range(world):
        lay = slot_layout(rank, world, group)
        s = ResumableBatchSampler(40, 4, num_replicas=lay.num_groups, replica=lay.lanes[0].group, seed=3)
        streams.append(_take(s, s.batches_per_epoch))
    assert streams[0] == streams[1] and streams[2] == streams[3]
    a = {i for b in streams[0] for i in b}
    b = {i for b in streams[2] for i in b}
    assert not a & b and len(a | b) == 40  # one epoch covers the data once, split between the two groups


def test_sampler_resume_position_continues_the_same_stream():
    full = ResumableBatchSampler(30, 4, num_replicas=2, replica=1, seed=5)
    assert full.batches_per_epoch == 3  # 7 full batches, 3 per stream
    reference = _take(full, 10)  # crosses three epoch boundaries
    for start in (0, 2, 3, 7):
        resumed = ResumableBatchSampler(30, 4, num_replicas=2, replica=1, seed=5, start_batch=start)
        assert _take(resumed, 10 - start) == reference[start:]
    assert reference[:3] != reference[3:6]  # epochs are reshuffled


def test_sampler_group_keys_make_uniform_batches():
    keys = [i % 3 for i in range(50)]  # e.g. latent frame counts
    streams = [ResumableBatchSampler(50, 4, num_replicas=2, replica=r, seed=0, group_keys=keys) for r in (0, 1)]
    assert streams[0].batches_per_epoch == streams[1].batches_per_epoch == 6  # (4 + 4 + 4) // 2
    for s in streams:
        for batch in s.epoch_batches(0):
            assert len(batch) == 4 and len({keys[i] for i in batch}) == 1
    with pytest.raises(ValueError, match="not enough data"):
        ResumableBatchSampler(7, 4, num_replicas=2, replica=0)


# ----------------------------------------------------------------------------------------------------- EMA

def test_chunks_partition_each_parameter():
    p = nn.Parameter(torch.arange(10.0))
    held = [held_chunks([("p", p)], r, 3)[0] for r in range(3)]
    assert [(h.start, h.numel) for h in held] == [(0, 4), (4, 4), (8, 2)]
    assert torch.equal(torch.cat([h.views("fp32") for h in held]), p.detach())
    assert held[0].views("fp32").data_ptr() == p.data_ptr()  # a view: the EMA reads the weights in place


def test_ema_update_rule_and_reload():
    torch.manual_seed(0)
    model = ToyModel()
    named = list(model.named_parameters())
    ema = ShardedEMA(held_chunks(named, 0, 1), decay=0.9, update_every=2)
    expected = {n: p.detach().clone() for n, p in named}
    for _ in range(3):
        with torch.no_grad():
            for _, p in named:
                p.add_(torch.randn_like(p))
        ema.update()
        for n, p in named:
            expected[n] = expected[n] * 0.9 + (1 - 0.9) * p.detach()
    full = ema.gather()
    for n in expected:
        torch.testing.assert_close(full[n], expected[n], rtol=1e-6, atol=1e-7)
    assert [ema.should_update(s) for s in range(5)] == [True, False, True, False, True]

    # Reloaded by ranges, as a resume on another process count reads it: two ranks' halves of the same average.
    halves = [ShardedEMA(held_chunks(named, r, 2), decay=0.9) for r in range(2)]
    for half in halves:
        half.load(lambda name, start, stop: full[name].reshape(-1)[start:stop])
    for n, p in named:
        joined = torch.cat([h.shadow[n] for h in halves])
        assert torch.equal(joined, full[n].reshape(-1))


def test_init_process_group_from_launcher_env_and_teardown(monkeypatch):
    import torch.distributed as dist

    from trainer_misc.runtime.distributed import (
        all_reduce_sum,
        destroy_process_group,
        get_world_size,
        init_process_group,
    )

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for key in keys:  # setenv first so monkeypatch restores the original state afterwards
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    assert init_process_group(torch.device("cpu")) == (0, 1) and not dist.is_initialized()  # plain run: no group
    assert ensure_launcher_env()  # fills a one-rank torchrun environment
    assert all(key in os.environ for key in keys)
    try:
        assert init_process_group(torch.device("cpu")) == (0, 1) and dist.is_initialized()
        assert dist.get_backend() == "gloo" and get_world_size() == 1
        assert all_reduce_sum(torch.tensor([2.0])).item() == 2.0
    finally:
        destroy_process_group()
    assert not dist.is_initialized()


def test_ema_is_float32_for_a_bf16_model():
    """The reference keeps its EMA in the model dtype; at decay 0.9999 a bf16 average cannot move (the step
    (1 - decay) * (param - ema) is below bf16's resolution), so ours is float32 whatever the model trains in."""
    torch.manual_seed(0)
    model = ToyModel().to(torch.bfloat16)
    named = list(model.named_parameters())
    ema = ShardedEMA(held_chunks(named, 0, 1), decay=0.9999)
    assert {t.dtype for t in ema.shadow.values()} == {torch.float32}
    start = {n: t.clone() for n, t in ema.gather().items()}
    with torch.no_grad():
        for _, p in named:
            p.add_(1.0)
    for _ in range(10):
        ema.update()
    moved = {n: (ema.gather()[n] - start[n]).abs().max().item() for n in start}
    assert all(m == pytest.approx(10 * 1e-4, rel=0.05) for m in moved.values()), moved
    # A bf16 shadow could not have moved: one update's step (1e-4) is below bf16's resolution at these values.
    big = torch.cat([t.flatten() for t in start.values()]).abs() > 0.1
    values = torch.cat([t.flatten() for t in start.values()])[big].to(torch.bfloat16)
    assert torch.equal(values + 1e-4, values)


def test_t2i_vae_sample_is_normalised_and_noised_in_fp32(golden_dir):
    """t2i (pixels encoded during training): the VAE runs in its own dtype (bf16 on GPUs), but its posterior sample
    is upcast before the objective normalises it and builds the pyramid and noise -- the reference does all of that
    in the VAE's bf16, which rounds the normalised latents to 8 mantissa bits before the noise is mixed in. Run
    through the real loss: the DiT's inputs are exactly the fp32 noising of the upcast sample, and differ from the
    noising done in bf16."""
    from types import SimpleNamespace

    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    from pyramid_dit.objective import PyramidFlowObjective
    from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler
    from pyramid_dit.text_features import TextFeatures
    from trainer_misc.data.datasets import TrainBatch
    from trainer_misc.loop.pyramid_loss import PyramidFlowLoss
    from trainer_misc.loop.step import StepContext

    g = torch.Generator().manual_seed(0)
    sample = torch.randn(4, 16, 1, 8, 8, generator=g).to(torch.bfloat16)
    seen = {}

    class BF16VAE:
        dtype = torch.bfloat16

        def encode(self, pixels):
            seen["pixels"] = pixels.dtype
            return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda: sample))

    objective = PyramidFlowObjective(PyramidFlowMatchEulerDiscreteScheduler(), "pyramid_flux", text_drop_rate=0.0,
                                     max_temporal_length=1, video_sync_group=1)
    noise_latents, calls = objective.noise_latents, []

    def watched(latents, **kw):
        calls.append((latents, kw, torch.get_rng_state()))
        return noise_latents(latents, **kw)

    objective.noise_latents = watched
    dit = PyramidFluxTransformer.from_pretrained(golden_dir / "flux_tiny")
    fed = []
    dit.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["sample"]), with_kwargs=True)
    text = TextFeatures(torch.randn(4, 8, 32, generator=g), torch.ones(4, 8, dtype=torch.long),
                        torch.randn(4, 24, generator=g))
    batch = TrainBatch(captions=[""] * 4, paths=[""] * 4, pixels=torch.rand(4, 3, 1, 64, 64), text_features=text)
    ctx = StepContext(step=0, micro_step=0, micro_index=0, rank=0, world_size=1, sync_rank=0, sync_group=1,
                      sync_group_index=0, device=torch.device("cpu"), dtype=torch.float32, module=dit)
    PyramidFlowLoss(objective, use_temporal_pyramid=False, vae=BF16VAE())(dit, batch, ctx)

    (latents, kw, rng), = calls
    assert seen["pixels"] == torch.bfloat16 and latents.dtype == torch.float32 and torch.equal(latents, sample.float())
    torch.set_rng_state(rng)
    fp32 = noise_latents(sample.float(), **kw)
    torch.set_rng_state(rng)
    in_bf16 = noise_latents(sample, **kw)  # the reference's order: normalise and noise in the VAE's dtype
    (dit_sample,) = fed  # what the DiT was given: the fp32 noising, replayed here from the same random state
    for given, mine, bf16 in zip(dit_sample, fp32.sample, in_bf16.sample):
        assert given[-1].dtype == torch.float32 and torch.equal(given[-1], mine[-1])
        assert (mine[-1] - bf16[-1].float()).abs().max() > 0  # bf16 rounding would have changed the inputs
