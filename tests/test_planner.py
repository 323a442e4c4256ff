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


def test_flops_equal_flop_counter_on_real_tensors_and_add_up_over_ranks(monkeypatch):
    # Real CPU tensors attend per frame; the planner's meta tensors trace what CUDA runs (FlexAttention, whose
    # single-stream sequence carries tile padding the linear layers also compute): compare the same attention form.
    from pyramid_dit.packing import PackedDiTMixin
    monkeypatch.setattr(PackedDiTMixin, "attention_split", "frame")
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
def test_eval_flops_are_the_forward_of_the_real_evaluation_inputs(task, monkeypatch):
    """The held-out evaluation's cost: its calls are the objective's eval_columns shapes, and the planner's
    forward-only count equals torch's on the real tiny model; the plan states it per evaluation and per run."""
    from pyramid_dit.objective import PyramidFlowObjective
    from pyramid_dit.packing import PackedDiTMixin
    monkeypatch.setattr(PackedDiTMixin, "attention_split", "frame")  # same attention form both ways (see above)
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
    assert parts["grads"] == math.ceil(4 * adapters / 2)
    assert parts["comm_buffers"] == 2 * 4 * min(DEEPSPEED_BUCKET_ELEMENTS, adapters)  # two fp32 reduce buffers
    full, _ = predict_memory(replace(zero2, lora_rank=0))
    assert full["optimizer"] == math.ceil(12 * base / 2)  # the full finetune: every base parameter
    with pytest.raises(ValueError, match="zero3"):
        replace(lora, shard_strategy="zero3")


def test_optimizer_offload_leaves_the_reduce_buffers_on_the_gpu():
    """OFFLOAD=1 moves master weights, AdamW state and the gradient partition to host memory (arithmetic); params,
    the reduce buffers and traced activations are unchanged."""
    from trainer_misc.optim.engine import DEEPSPEED_BUCKET_ELEMENTS
    from trainer_misc.planning.planner import model_size

    zero2 = replace(SMALL, shard_strategy="zero2", dtype="bf16")
    on, _ = predict_memory(replace(zero2, offload_optimizer=True))
    off, _ = predict_memory(zero2)
    trainable = model_size(zero2)[1]
    assert on["optimizer"] == on["grads"] == 0 < off["optimizer"]
    assert on["comm_buffers"] == off["comm_buffers"] == 2 * 4 * min(DEEPSPEED_BUCKET_ELEMENTS, trainable)
    assert (on["params"], on["activations"]) == (off["params"], off["activations"])
    with pytest.raises(ValueError, match="zero2 or zero3"):
        replace(SMALL, offload_optimizer=True)


def test_released_encoders_have_their_published_sizes():
    """The planner counts the text encoders and the VAE from their released configurations on the meta device; the
    counts are the published sizes (CLIP ViT-L/14 text tower, OpenCLIP bigG text tower with projection, T5 v1.1 XXL
    encoder) and the VAE's golden key listing."""
    import json
    from pathlib import Path

    from trainer_misc.planning.planner import text_encoder_params, vae_params

    assert text_encoder_params("pyramid_flux") == 123_060_480 + 4_762_310_656
    assert text_encoder_params("pyramid_mmdit") == 123_650_304 + 694_659_840 + 4_762_310_656
    golden = json.loads((Path(__file__).parent / "golden" / "keys" / "causal_video_vae.json").read_text())
    assert vae_params() == golden["n_params"] == 335_402_067


def test_every_model_the_launch_keeps_resident_is_counted():
    """Live caption encoding puts the text encoders on every GPU, t2i (and --load_vae) the VAE, validation a second
    DiT + VAE on rank 0 unless offloaded; the runtime margins come on top, and `fits` judges the total."""
    from trainer_misc.planning.planner import GIB, model_size, plan, text_encoder_params, vae_params

    base = replace(SMALL, task="t2v", shard_strategy="zero2", dtype="bf16", gpus=2, video_sync_group=1)
    n_params = model_size(base)[0]
    parts, _ = predict_memory(base)
    assert parts["encoders"] == parts["validation"] == 0
    assert parts["cuda_context"] == GIB and parts["nccl"] > 0
    training = sum(v for k, v in parts.items() if k not in ("cuda_context", "nccl", "fragmentation"))
    assert parts["fragmentation"] == int(0.10 * training)

    live, _ = predict_memory(replace(base, text_encoder=True))
    assert live["encoders"] == 2 * text_encoder_params("pyramid_flux")  # ~9.1 GiB of T5-XXL + CLIP-L in bf16
    t2i, _ = predict_memory(replace(base, task="t2i"))
    assert t2i["encoders"] == 2 * vae_params()
    val, _ = predict_memory(replace(base, validation=True))
    assert val["validation"] == 2 * (n_params + vae_params())
    assert predict_memory(replace(base, validation=True, validation_offload=True))[0]["validation"] == 0

    # the DiT's own training state fits 9 GiB, the launch with its encoders does not, and the plan says why
    small_card = (sum(parts.values()) + GIB) / GIB
    assert plan(base, small_card)["fits"]
    verdict = plan(replace(base, text_encoder=True), small_card)
    assert not verdict["fits"] and verdict["cheapest_fix"].startswith("LOAD_TEXT_ENCODER=0")


def test_bytes_sent_per_step_follow_the_strategy_and_the_reduce_dtype():
    """DDP all-reduces once per optimizer step; ZeRO-2 reduce-scatters every micro-batch and all-gathers the updated
    weights; --grad_reduce_dtype model halves the gradient traffic; one GPU sends nothing."""
    from trainer_misc.planning.planner import comm_bytes_per_step, model_size

    zero2 = replace(SMALL, shard_strategy="zero2", dtype="bf16", gpus=8, video_sync_group=8, num_frames=8)
    n, trainable = model_size(zero2)
    one = comm_bytes_per_step(zero2, n, trainable)
    accum = comm_bytes_per_step(replace(zero2, grad_accum=3), n, trainable)
    assert accum["gradients"] == 3 * one["gradients"] and accum["weights"] == one["weights"]
    assert comm_bytes_per_step(replace(zero2, grad_reduce_dtype="model"), n, trainable)["gradients"] * 2 == \
        one["gradients"]
    ddp = replace(zero2, shard_strategy="ddp")
    assert comm_bytes_per_step(replace(ddp, grad_accum=3), n, trainable) == comm_bytes_per_step(ddp, n, trainable)
    # a virtual sync group (8 slots on 2 GPUs) is 4 micro-batches per step for ZeRO-2's per-micro-batch reduction
    virtual = comm_bytes_per_step(replace(zero2, gpus=2), n, trainable)
    assert virtual["gradients"] == 4 * comm_bytes_per_step(replace(zero2, gpus=2, video_sync_group=2), n,
                                                           trainable)["gradients"]
    assert sum(comm_bytes_per_step(replace(zero2, gpus=1, video_sync_group=1), n, trainable).values()) == 0


@pytest.mark.parametrize("argv, says", [
    (["--lora_rank", "8", "--shard_strategy", "zero3"], "LoRA (LORA_RANK, --lora_rank) with zero3 is refused"),
    (["--offload_optimizer", "--shard_strategy", "ddp"], "optimizer offload (OFFLOAD=1, --offload_optimizer)"),
    (["--gpus", "3", "--video_sync_group", "8"], "--video_sync_group 8 must divide --num_frames 16 and divide or be"),
])
def test_the_plan_command_refuses_what_the_trainer_refuses_before_tracing(argv, says):
    """One rule each, kept by the planner's ``Launch`` (the command line only adds the sync group's divisibility):
    the refusal names the setting and comes before any model is traced."""
    from tools.plan import main

    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert str(refused.value).startswith("plan.py: ") and says in str(refused.value)
