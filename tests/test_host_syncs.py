"""No host sync inside a training micro-batch: the objective's noising, the DiT's forward, the loss and the backward
never make the host wait for the device.

What the host needs (the prompts' lengths to trim text padding, the timestep draws and their table lookups) comes
from the batch on the host (``TextFeatures.host_lengths``, CPU draws) and goes to the device in non-blocking
copies. Counted with ``tools/benchmark_dit.DeviceOpCounter``:

* on meta tensors (the device, shape-only) through a whole micro-batch as the trainer runs it, with caption
  dropout: no device-to-host copy or read, no blocking host-to-device copy (the copy torch makes wait for the
  device's queued work);
* on CPU tensors through the DiT's forward, loss and backward: no tensor value read through torch at all (on a GPU
  each such read is a device-to-host copy and a stall). Reading the host's own mask is free and allowed.
"""
from __future__ import annotations

import pytest
import torch
from test_dit import AR_COLUMNS, make_inputs

from pyramid_dit.objective import PyramidFlowObjective
from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler
from pyramid_dit.text_features import TextFeatures
from tools.benchmark_dit import DeviceOpCounter
from trainer_misc.loop.tree import to_device


def _tiny(kind: str):
    if kind == "pyramid_flux":
        from test_dit import tiny_model
    else:
        from test_mmdit import tiny_model
    return tiny_model()


@pytest.mark.parametrize("kind", ["pyramid_flux", "pyramid_mmdit"])
@pytest.mark.parametrize("ar", [True, False])
def test_a_micro_batch_on_the_device_never_waits_for_it(kind, ar):
    scheduler = PyramidFlowMatchEulerDiscreteScheduler(shift=1.0, stages=3, stage_range=(0, 1 / 3, 2 / 3, 1))
    null = TextFeatures(torch.zeros(10, 32), torch.tensor([1] + [0] * 9), torch.zeros(24))
    objective = PyramidFlowObjective(scheduler, kind, sample_ratios=(1, 2, 1), max_temporal_length=8,
                                     video_sync_group=4, text_drop_rate=0.5, null_text=null)
    with torch.device("meta"):
        model = _tiny(kind).train()
    rows = 8
    mask = torch.ones(rows, 10, dtype=torch.int64)
    mask[::3, 6:] = 0  # padded prompts
    host = TextFeatures(torch.randn(rows, 10, 32), mask, torch.randn(rows, 24))
    assert host.host_lengths is not None  # the collated batch knows its prompts' lengths on the host
    batch_text = to_device(host, torch.device("meta"))  # the trainer's transfer keeps them
    latents = torch.empty(rows, 16, 8, 16, 24, device="meta")
    torch.manual_seed(0)
    with DeviceOpCounter() as counter:
        text, _ = objective.drop_text(batch_text)
        step = objective.noise_latents(latents, use_temporal_pyramid=ar, rank=1)
        step.text = text
        inputs = step.dit_inputs()
        assert len(inputs["text_lengths"]) == rows
        objective.loss(model(**inputs), step.targets).backward()
    assert dict(counter.syncs) == {}
    assert counter.total > 100  # the count did see the step


@pytest.mark.parametrize("kind", ["pyramid_flux", "pyramid_mmdit"])
def test_the_dit_reads_no_tensor_value(kind):
    model = _tiny(kind).train()
    inputs = make_inputs(AR_COLUMNS, batch=2)
    with DeviceOpCounter() as counter:
        torch.stack([o.pow(2).mean() for o in model(**inputs)]).sum().backward()
    reads = {op: n for op, n in counter.ops.items()
             if str(op) in ("aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.item.default")}
    assert reads == {}
