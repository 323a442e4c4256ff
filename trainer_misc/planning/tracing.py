"""Instruments for counting a training step without running it for real (``trainer_misc.planning.planner``): a FLOP counter
that also knows the fused CPU attention kernel, a switch that routes attention to the fused kernel as GPU training
does, and a dispatch mode that tracks the bytes of live storages (activations and gradients apart).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveBytes", "flop_counter_mode", "fused_attention"]

aten = torch.ops.aten


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels and the math path (bmm), but not the fused CPU kernel that real CPU
# tensors (and FusedAttention on meta) take: count it with torch's formula for the CUDA kernels.
_CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the CPU attention kernel (2 FLOPs per multiply-add)."""
    return flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` to the fused (flash-style) kernel, as GPU training does.

    On meta tensors the dispatcher picks the math path, which stores the ``q x k`` probabilities for backward;
    the fused kernels store the output and one log-sum-exp per query instead. Counted FLOPs: the backward
    recomputes the scores, as fused kernels do. (The function is swapped, not intercepted by a torch-function
    mode, because gradient checkpointing recomputes blocks outside such modes.)
    """
    original = F.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if dropout_p or kwargs:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                            **kwargs)
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=attn_mask,
                                                                scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# ------------------------------------------------------------------------------------------------ memory

class LiveBytes(TorchDispatchMode):
    """Bytes of live storages created inside the mode, with their peak; gradients are counted apart. Also counts
    the attention kernels dispatched (the planner reports them per optimizer step).

    A storage is counted when an op first returns it and uncounted when it is freed (weakref callback), so
    tensors autograd saves for backward stay counted exactly as long as they live. Gradients are recognised by
    a post-accumulate hook on each parameter.
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.grad_keys: set[int] = set()
        self.skip = {self._key(p.untyped_storage()) for p in params}
        self.now = self.grad_now = 0
        self.peak = self.peak_act = 0
        self.hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params if p.requires_grad]
        self.attention_calls = 0  # attention kernels (fused SDPA or FlexAttention, forward and backward)

    @staticmethod
    def _key(storage: torch.UntypedStorage) -> int:
        return storage._cdata

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        key = self._key(p.grad.untyped_storage())
        if key in self.live and key not in self.grad_keys:
            self.grad_keys.add(key)
            self.grad_now += self.live[key]

    def _freed(self, key: int) -> None:
        nbytes = self.live.pop(key, 0)
        self.refs.pop(key, None)
        self.now -= nbytes
        if key in self.grad_keys:
            self.grad_keys.discard(key)
            self.grad_now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if "scaled_dot_product" in name or "flex_attention" in name:
            self.attention_calls += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = self._key(storage)
                if key in self.live or key in self.skip:
                    continue
                self.live[key] = storage.nbytes()
                self.refs[key] = weakref.ref(storage, lambda _, k=key: self._freed(k))
                self.now += self.live[key]
        self.peak = max(self.peak, self.now)
        self.peak_act = max(self.peak_act, self.now - self.grad_now)
        return out

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
