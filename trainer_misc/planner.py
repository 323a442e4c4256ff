"""Cost of one training step, counted on meta / fake tensors: FLOPs and memory per GPU without weights.

Used by ``tools/plan.py`` and ``DRY_RUN=1``. The counts come from running the real model's forward and
backward under torch's own tools (``FlopCounterMode``; ``mem_tracker``), never from hand-written formulas.
"""
from __future__ import annotations

import torch
from torch.utils import flop_counter

aten = torch.ops.aten

# torch counts the CUDA attention kernels and the math path (bmm, what meta tensors take), but not the CPU
# flash kernel real CPU tensors take: count it with the same formula, so CPU, meta and GPU runs agree.
def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the CPU attention kernel (2 FLOPs per multiply-add)."""
    return flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
