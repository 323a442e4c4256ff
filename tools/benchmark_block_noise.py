"""Speed of the one-call block-noise sampler against a per-block Python loop (how the reference draws it).

At every stage jump the sampler needs correlated 2x2 block noise for the whole upsampled latent; the reference
draws it one 4-vector at a time from ``MultivariateNormal`` in a Python loop. This prints, per shape, the time of

* ``loop``: the reference's per-block ``MultivariateNormal(...).sample()`` loop (with ``1e-6 * I`` added to the
  covariance, which is singular for gamma = 1/3 and rejected by torch as it stands; see below);
* ``vectorised``: :func:`pyramid_dit.block_noise.sample_block_noise`, one ``randn`` for all blocks,

and the largest deviation of each result's empirical block covariance from ``(1 + gamma) I - gamma J``. It also
reports whether ``MultivariateNormal`` accepts the reference's (singular) covariance on this machine.

Usage::

    python3 tools/benchmark_block_noise.py                      # 384p stage jumps, one latent frame
    python3 tools/benchmark_block_noise.py --shape 1 16 1 96 160 --device cuda
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, List, Optional, Sequence

import torch

from pyramid_dit.block_noise import block_noise_covariance, sample_block_noise

# Stage jumps of one latent frame at 384p (latent 48x80): into stage 1 (24x40) and stage 2 (48x80).
DEFAULT_SHAPES = [(1, 16, 1, 24, 40), (1, 16, 1, 48, 80)]


def loop_block_noise(shape: Sequence[int], gamma: float, jitter: float = 1e-6) -> torch.Tensor:
    """The reference's algorithm: ``MultivariateNormal(...).sample()`` once per 2x2 block in a Python loop, then
    reassembled into ``shape``. ``jitter * I`` is added to the covariance so that torch accepts it (the exact
    matrix is singular). Draws from torch's global generator, as the reference does."""
    *lead, h, w = shape
    cov = block_noise_covariance(gamma).float() + jitter * torch.eye(4)
    dist = torch.distributions.MultivariateNormal(torch.zeros(4), covariance_matrix=cov)
    count = (h // 2) * (w // 2)
    for size in lead:
        count *= size
    blocks = torch.stack([dist.sample() for _ in range(count)])
    return blocks.reshape(*lead, h // 2, w // 2, 2, 2).transpose(-3, -2).reshape(*lead, h, w)


def covariance_error(noise: torch.Tensor, gamma: float) -> float:
    h, w = noise.shape[-2:]
    blocks = noise.reshape(-1, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4).double().cpu()
    cov = blocks.T @ blocks / blocks.shape[0]
    return (cov - block_noise_covariance(gamma)).abs().max().item()


def best_time(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def reference_mvn_status(gamma: float) -> str:
    """Whether torch accepts the reference's ``MultivariateNormal(0, (1 + gamma) I - gamma J)``."""
    try:
        cov = torch.eye(4) * (1 + gamma) - torch.ones(4, 4) * gamma
        torch.distributions.MultivariateNormal(torch.zeros(4), cov).sample()
    except (ValueError, RuntimeError) as e:  # the argument check (ValueError) or the Cholesky itself
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return "accepted"


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs="+", action="append", default=None,
                   help="noise shape [..., H, W] (repeatable); default: the two 384p stage jumps of one frame")
    p.add_argument("--gamma", type=float, default=1 / 3)
    p.add_argument("--repeats", type=int, default=10, help="timed runs per method; the best is reported")
    p.add_argument("--loop_repeats", type=int, default=1, help="timed runs of the (slow) loop")
    p.add_argument("--device", default="cpu", help="device of the vectorised sampler's output (the draw itself "
                   "stays on the CPU generator, as in the pipeline), e.g. cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = [tuple(s) for s in args.shape] if args.shape else DEFAULT_SHAPES
    for shape in shapes:
        if len(shape) < 2 or shape[-1] % 2 or shape[-2] % 2:
            p.error(f"--shape {list(shape)}: needs at least [H, W] with even H and W")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, gamma {args.gamma:.4g}")
    print(f"reference MultivariateNormal with this covariance: {reference_mvn_status(args.gamma)}")
    print(f"{'shape':>22} {'blocks':>8} {'loop ms':>10} {'vectorised ms':>14} {'speedup':>9} "
          f"{'cov err loop':>13} {'cov err vec':>12}")
    for shape in shapes:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        t_loop, loop = best_time(lambda: loop_block_noise(shape, args.gamma), args.loop_repeats, torch.device("cpu"))
        t_vec, vec = best_time(lambda: sample_block_noise(shape, args.gamma, generator=gen).to(device),
                               args.repeats, device)
        blocks = loop.numel() // 4
        print(f"{str(list(shape)):>22} {blocks:>8} {t_loop * 1e3:>10.1f} {t_vec * 1e3:>14.3f} "
              f"{t_loop / t_vec:>8.0f}x {covariance_error(loop, args.gamma):>13.4f} "
              f"{covariance_error(vec, args.gamma):>12.4f}")


if __name__ == "__main__":
    main()
