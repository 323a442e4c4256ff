"""Which torch device a process runs on: the one device resolver of the project (model package, trainer, tools)."""
from __future__ import annotations

import os

import torch

__all__ = ["DTYPES", "resolve_device"]

# The dtype names the flags and variables use (``--model_dtype``, ``MODEL_DTYPE``, ``--export_dtype``), in torch.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks this rank's CUDA device when CUDA is present, otherwise the CPU; ``cuda`` is this rank's GPU
    (``LOCAL_RANK``). An explicit device (``"cuda:1"``, a ``torch.device`` with an index, ``"meta"``) is kept.

    ``cuda`` without a GPU is an error rather than a silent CPU run. The one device resolver of the project.
    """
    if isinstance(device, torch.device) or device not in ("auto", "cpu", "cuda"):
        try:
            explicit = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or a torch device such as 'cuda:1', "
                             f"got {device!r}") from None
        if explicit.type != "cuda" or explicit.index is not None:
            return explicit
        device = "cuda"
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but torch.cuda.is_available() is False; "
                           "use device='cpu' (or 'auto') on a machine without a GPU")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
