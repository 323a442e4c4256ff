"""tools/plan.py's engine (trainer_misc/planning/planner.py): FLOPs equal torch's count on real tensors, and predicted
memory matches the live bytes of a real CPU training step."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
from trainer_misc.planning.planner import (
    Launch,
    _loss,
    count_flops,
    dit_inputs,
    flops_per_step,
    measure_step,
    predict_memory,
    rank_shapes,
)
from trainer_misc.planning.tracing import flop_counter_mode

TINY = dict(patch_size=1, in_channels=64, num_layers=3, num_single_layers=3, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=[4, 6, 6])
SMALL = Launch("pyramid_flux", TINY, task="ar", width=64, height=64, num_frames=4, batch_size=4, gpus=2,
               shard_strategy="ddp", dtype="fp32", video_sync_group=2)


def test_flops_equal_flop_counter_on_real_tensors_and_add_up_over_ranks():
    shapes = rank_shapes(SMALL)
    assert shapes[0] != shapes[1]  # the two AR ranks train different units
    torch.manual_seed(0)
    model = PyramidFluxTransformer(**TINY)
    real = []
    for s in shapes:
        inputs = dit_inputs(SMALL, s, torch.float32, device="cpu")
        for t in inputs["sample"][0] + [inputs["encoder_hidden_states"]]:
            t.normal_()
        with flop_counter_mode() as counter:  # real CPU tensors, torch's own kernels
            _loss(model(**inputs)).backward()
        real.append(counter.get_total_flops())
        # The planner traces depth-1/2 models on meta tensors and extends to depth 3 x 3.
        assert count_flops(SMALL, s) == real[-1]
    assert flops_per_step(SMALL) == sum(real)


@pytest.mark.parametrize("task", ["ar", "t2v"])
def test_eval_flops_are_the_forward_of_the_real_evaluation_inputs(task):
    """The held-out evaluation's cost: its calls are the objective's eval_columns shapes, and the planner's
    forward-only count equals torch's on the real tiny model; the plan states it per evaluation and per run."""
    from pyramid_dit.objective import PyramidFlowObjective
    from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler
    from trainer_misc.planning.planner import eval_call_shapes, eval_cost, eval_flops_per_sample

    launch = replace(SMALL, task=task, eval_samples=3, eval_timesteps=4, eval_history_depths=2, eval_every=10,
                     max_steps=100)
    calls = eval_call_shapes(launch)
    assert len(calls) == (2 if task == "ar" else 1) and all(len(call) == 3 for call in calls)
    scheduler = PyramidFlowMatchEulerDiscreteScheduler(shift=1.0, stages=3, stage_range=(0, 1 / 3, 2 / 3, 1))
    objective = PyramidFlowObjective(scheduler, "pyramid_flux", max_temporal_length=4, video_sync_group=1)
    latents = torch.randn(1, 16, 4, 8, 8)
    torch.manual_seed(0)
    model = PyramidFluxTransformer(**TINY).eval()
    real = 0
    for call, units in zip(calls, [2, 4] if task == "ar" else [None]):
        inputs = objective.eval_columns(latents, timestep_indices=objective.timestep_grid(4), units=units,
                                        generator=torch.Generator().manual_seed(0))
        assert [[tuple(c.shape) for c in col] for col in inputs.sample] == call
        kwargs = dit_inputs(launch, call, torch.float32, device="cpu")
        with flop_counter_mode() as counter, torch.no_grad():
            model(**{**kwargs, "sample": inputs.sample})
        real += counter.get_total_flops()
    assert eval_flops_per_sample(launch) == real
    cost = eval_cost(launch, flops_per_step=10**6)
    assert cost["eval_flops"] == 3 * real and cost["eval_rows_per_sample"] == 12 * len(calls)
    assert cost["evaluations"] == 11  # before the first step, every 10 steps up to 100


@pytest.mark.parametrize("checkpointing", [False, True])
def test_predicted_memory_matches_a_real_training_step(checkpointing):
    launch = replace(SMALL, model_config={**TINY, "num_layers": 2, "num_single_layers": 2}, num_frames=2, gpus=1,
                     video_sync_group=1, gradient_checkpointing=checkpointing)
    r = measure_step(launch)
    predicted, measured = r["predicted"], r["measured"]
    assert predicted["params"] == measured["params"]
    assert abs(predicted["optimizer"] / measured["optimizer"] - 1) < 0.01
    assert abs(predicted["activations"] / measured["activations"] - 1) < 0.10


def test_memory_grows_with_resolution_and_checkpointing_lowers_activations():
    def peak(**changes):
        parts, _ = predict_memory(replace(SMALL, **changes))
        return parts
    base = peak(gpus=8, video_sync_group=4, shard_strategy="zero2", dtype="bf16")
    assert sum(peak(gpus=8, video_sync_group=4, shard_strategy="zero2", dtype="bf16", width=128,
                    height=128).values()) > sum(base.values())
    ckpt = peak(gpus=8, video_sync_group=4, shard_strategy="zero2", dtype="bf16", gradient_checkpointing=True)
    assert ckpt["activations"] < base["activations"]


def test_lora_counts_grads_and_optimizer_state_of_the_adapters_only():
    """LORA_RANK > 0: gradients, master weights and AdamW state are those of the adapters, counted here on a meta
    model without peft (rank x (in + out) per targeted block linear)."""
    import math
    import re

    from pyramid_dit.kinds import get_kind
    from trainer_misc.optim.engine import DEEPSPEED_BUCKET_ELEMENTS
    from trainer_misc.planning.planner import model_size

    rank, targets = 4, get_kind("pyramid_flux").lora_targets
    with torch.device("meta"):
        plain = PyramidFluxTransformer(**TINY)
    block_linear = re.compile(r".*blocks\.\d+\.(?:" + "|".join(map(re.escape, targets)) + ")")
    adapters = sum(rank * (m.in_features + m.out_features) for name, m in plain.named_modules()
                   if isinstance(m, torch.nn.Linear) and block_linear.fullmatch(name))
    base = sum(p.numel() for p in plain.parameters())
    lora = replace(SMALL, lora_rank=rank)
    assert model_size(lora) == (base + adapters, adapters)

    ddp, _ = predict_memory(lora)
    assert (ddp["grads"], ddp["optimizer"], ddp["params"]) == (4 * adapters, 8 * adapters, 4 * (base + adapters))
    zero2 = replace(lora, shard_strategy="zero2", dtype="bf16")
    parts, _ = predict_memory(zero2)
    assert parts["optimizer"] == math.ceil(12 * adapters / 2)  # fp32 master + 2 AdamW states, over 2 GPUs
    assert parts["grads"] == math.ceil(4 * adapters / 2) + 4 * min(DEEPSPEED_BUCKET_ELEMENTS, adapters)
    full, _ = predict_memory(replace(zero2, lora_rank=0))
    assert full["optimizer"] == math.ceil(12 * base / 2)  # the full finetune: every base parameter
    with pytest.raises(ValueError, match="zero3"):
        replace(lora, shard_strategy="zero3")


def test_optimizer_offload_leaves_the_reduce_bucket_on_the_gpu():
    """OFFLOAD=1 moves master weights, AdamW state and the gradient partition to host memory (arithmetic); params
    and traced activations are unchanged."""
    from trainer_misc.optim.engine import DEEPSPEED_BUCKET_ELEMENTS
    from trainer_misc.planning.planner import model_size

    zero2 = replace(SMALL, shard_strategy="zero2", dtype="bf16")
    on, _ = predict_memory(replace(zero2, offload_optimizer=True))
    off, _ = predict_memory(zero2)
    trainable = model_size(zero2)[1]
    assert on["optimizer"] == 0 < off["optimizer"]
    assert on["grads"] == 4 * min(DEEPSPEED_BUCKET_ELEMENTS, trainable) < off["grads"]
    assert (on["params"], on["activations"]) == (off["params"], off["activations"])
    with pytest.raises(ValueError, match="zero2 or zero3"):
        replace(SMALL, offload_optimizer=True)
