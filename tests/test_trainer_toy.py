"""Toy model, dataset and objective for the trainer tests (no DiT needed).

The objective draws noise from the global torch RNG on every micro-batch, like the real flow-matching objective, so
a resume that fails to restore the RNG, the data position, the optimizer or the weights shows up as different
losses.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

IN, HIDDEN, OUT = 8, 16, 4


class ToyModel(nn.Module):
    """A few Linear layers with a LayerNorm (1-D parameters: no weight decay) and biases."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.mid = nn.Linear(HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, OUT, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(torch.tanh(self.norm(self.inp(x))))))


class ToyDataset(Dataset):
    """Deterministic samples derived from the index; ``poison`` indices get a huge target (abnormal loss)."""

    def __init__(self, n: int = 64, poison: tuple[int, ...] = ()) -> None:
        self.n = n
        self.poison = set(poison)
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, IN, generator=g)
        self.w = torch.randn(IN, OUT, generator=g) / IN**0.5  # targets of unit scale: clean losses ~1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        y = self.x[i] @ self.w
        if i in self.poison:
            y = y + 100.0
        return {"x": self.x[i], "y": y, "index": torch.tensor(i)}


def toy_loss(model: nn.Module, batch: dict, ctx) -> tuple[torch.Tensor, dict]:
    x = batch["x"].to(ctx.dtype)
    x = x + 0.1 * torch.randn_like(x)  # global-RNG draw, as the real objective's noise
    pred = model(x).float()
    loss = torch.mean((pred - batch["y"].float()) ** 2)
    return loss, {"tokens": x.shape[0] * 3, "pred_std": pred.detach().std()}


def test_toy_poison_is_abnormal():
    """The poisoned sample really produces a loss far above the reference's 2.0 threshold; clean ones do not."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    model, data = ToyModel(), ToyDataset(8, poison=(3,))
    ctx = SimpleNamespace(dtype=torch.float32)
    clean = {k: torch.stack([data[i][k] for i in (0, 1)]) for k in ("x", "y")}
    bad = {k: torch.stack([data[i][k] for i in (2, 3)]) for k in ("x", "y")}
    assert toy_loss(model, clean, ctx)[0].item() < 2.0
    assert toy_loss(model, bad, ctx)[0].item() > 1000.0
