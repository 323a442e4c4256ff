"""Time the causal video VAE's chunked encode and chunked decode, optionally side by side with the reference's.

Workload (fixed, so numbers compare across runs and machines): a VAE of the released layout at reduced width,
levels of 32, 64, 64, 64 channels (group norm over 8 groups), 1 resnet per encoder level and 2 per decoder level,
weights N(0, 0.05) from seed 0 (norm scales 1 + N(0, 0.1)); one clip of 17 frames at 128 x 192 in [-1, 1];
``encode(temporal_chunk=True, window_size=8)`` (windows of 9 + 8 frames) of the clip, then
``decode(temporal_chunk=True, window_size=2)`` (the generation default) of its 3 x 16 x 24 latent mean, under
``torch.no_grad`` in eval mode, as latent extraction and generation run them.

Reported: median (and min) seconds of encode, decode and their sum over ``--repeats`` timed runs after one
warm-up, with process CPU time (steadier than wall-clock when other jobs share the cores); the FLOPs of encode and
decode (convolutions, matmuls and attention, counted by ``torch.utils.flop_counter``) and the achieved GFLOP/s,
against this machine's float32 matmul rate measured in the same run. ``--compile`` also times
our VAE after ``compile_for_inference()`` (torch.compile) and prints its one-time compile cost and after how many
clips of this shape it is repaid. With
``--reference /path/to/Pyramid-Flow`` the reference's ``CausalVideoVAE`` (imported from that checkout at run
time; its optional imports ``timm`` and its context-parallel ``utils`` are stubbed while it imports) gets the same
weights and input, runs alternate with ours, and the ratio of medians and the output difference are printed.

    python tools/benchmark_vae.py --repeats 3
    python tools/benchmark_vae.py --repeats 3 --reference /tmp/ref
    python tools/benchmark_vae.py --repeats 3 --reference /tmp/ref --compile
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from tools.benchmark_dit import matmul_gflops
from video_vae import CausalVideoVAE

CONFIG = dict(
    encoder_out_channels=16, decoder_in_channels=16,
    encoder_block_out_channels=(32, 64, 64, 64), decoder_block_out_channels=(32, 64, 64, 64),
    encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(2, 2, 2, 2),
    encoder_norm_num_groups=8, decoder_norm_num_groups=8, scaling_factor=0.13025,
)
FRAMES, HEIGHT, WIDTH = 17, 128, 192
ENCODE_WINDOW, DECODE_WINDOW = 8, 2


def build(seed: int = 0) -> CausalVideoVAE:
    gen = torch.Generator().manual_seed(seed)
    vae = CausalVideoVAE(**CONFIG)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_norm_scale else 0.05 * noise)
    return vae.eval()


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


def load_reference_class(ref_root: Path):
    """The reference ``CausalVideoVAE``, imported from a Pyramid-Flow checkout without its package init.

    Its modules import ``timm`` (three init/utility helpers, not installed here) and a top-level ``utils`` with
    context-parallel helpers; stubs stand in while they import and are removed afterwards.
    """
    folder = ref_root / "video_vae"
    if not (folder / "modeling_causal_vae.py").is_file():
        raise FileNotFoundError(f"--reference {ref_root}: no video_vae/modeling_causal_vae.py there")
    import diffusers.models.attention_processor  # noqa: F401 (diffusers probes for timm once, at its import)
    import diffusers.models.modeling_utils  # noqa: F401

    layers = _stub("timm.models.layers", drop_path=lambda x, *a, **k: x,
                   to_2tuple=lambda x: x if isinstance(x, tuple) else (x, x),
                   trunc_normal_=lambda t, *a, **k: torch.nn.init.trunc_normal_(t, *a, **k))
    models = _stub("timm.models", layers=layers)
    not_parallel = lambda *a, **k: None  # noqa: E731
    utils = _stub("utils", is_context_parallel_initialized=lambda: False,
                  **{n: not_parallel for n in ("get_context_parallel_group", "get_context_parallel_world_size",
                                               "get_context_parallel_rank", "get_context_parallel_group_rank")})
    package = _stub("_reference_video_vae")
    package.__path__ = [str(folder)]
    stubs = {"timm": _stub("timm", models=models), "timm.models": models, "timm.models.layers": layers,
             "utils": utils, package.__name__: package}
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        module = importlib.import_module(f"{package.__name__}.modeling_causal_vae")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module.CausalVideoVAE


def run(vae: torch.nn.Module, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float, float, float]:
    """(latent mean, decoded video, encode s, decode s, encode CPU s, decode CPU s)."""
    with torch.no_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        z = vae.encode(video, temporal_chunk=True, window_size=ENCODE_WINDOW).latent_dist.mean
        t1, c1 = time.perf_counter(), time.process_time()
        x = vae.decode(z, temporal_chunk=True, window_size=DECODE_WINDOW).sample
        t2, c2 = time.perf_counter(), time.process_time()
    return z, x, t1 - t0, t2 - t1, c1 - c0, c2 - c1


def count_flops(vae: torch.nn.Module, video: torch.Tensor) -> tuple[int, int]:
    """(encode, decode) FLOPs of one ``run``, counted by ``torch.utils.flop_counter`` (convolutions, matmuls and
    attention; element-wise work is not counted). oneDNN's convolution op, which our CPU inference calls directly,
    is not in torch's table: it gets torch's convolution formula here."""
    from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

    aten = torch.ops.aten

    def mkldnn_conv(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:  # the counter passes shapes
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    counts = []
    with torch.no_grad():
        for part in ("encode", "decode"):
            with FlopCounterMode(display=False, custom_mapping={aten.mkldnn_convolution: mkldnn_conv}) as counter:
                if part == "encode":
                    z = vae.encode(video, temporal_chunk=True, window_size=ENCODE_WINDOW).latent_dist.mean
                else:
                    vae.decode(z, temporal_chunk=True, window_size=DECODE_WINDOW)
            counts.append(counter.get_total_flops())
    return counts[0], counts[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed encode + decode runs per model")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--reference", type=Path, help="Pyramid-Flow checkout to time its VAE as well")
    parser.add_argument("--compile", action="store_true",
                        help="also time our VAE after compile_for_inference() (torch.compile, inductor), with its "
                             "one-time compile cost")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    ours = build()
    models: dict[str, torch.nn.Module] = {"ours": ours}
    if args.reference is not None:
        reference = load_reference_class(args.reference)(**CONFIG)
        reference.load_state_dict(ours.state_dict())
        models["reference"] = reference.eval()
    if args.compile:
        compiled = build()
        compiled.compile_for_inference()
        models["compiled"] = compiled
    video = torch.rand(1, 3, FRAMES, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1)) * 2 - 1
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"cpu ({torch.get_num_threads()} threads), torch {torch.__version__}; {n_params / 1e6:.2f} M parameters; "
          f"clip {FRAMES} x {HEIGHT} x {WIDTH}, encode window {ENCODE_WINDOW}, decode window {DECODE_WINDOW}")

    outs, first_run = {}, 0.0
    for name, m in models.items():  # warm-up (the compiled model compiles here)
        start = time.perf_counter()
        outs[name] = run(m, video)[:2]
        if name == "compiled":
            first_run = time.perf_counter() - start
            print(f"compiled: first encode + decode (compiling) took {first_run:.1f} s; output vs "
                  f"eager: latent {_rel(outs[name][0], outs['ours'][0]):.2e}, decoded "
                  f"{_rel(outs[name][1], outs['ours'][1]):.2e}")
    if "reference" in outs:
        print(f"max |ours - reference| / max |reference|: latent {_rel(outs['ours'][0], outs['reference'][0]):.2e}, "
              f"decoded {_rel(outs['ours'][1], outs['reference'][1]):.2e}")
    keys = ("encode", "decode", "encode_cpu", "decode_cpu")
    times = {name: {k: [] for k in keys} for name in models}
    for _ in range(args.repeats):  # alternate models so both see the same machine load
        for name, m in models.items():
            for k, v in zip(keys, run(m, video)[2:]):
                times[name][k].append(v)
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    print(f"matmul float32: {matmul_gflops(torch.device('cpu'), torch.float32):.1f} GFLOP/s (1024^3, median of 10)")
    # Compiled kernels are not aten ops a counter can see: the compiled model does the eager model's FLOPs.
    flops = {name: count_flops(m, video) for name, m in models.items() if name != "compiled"}
    for name, t in times.items():
        total = [e + d for e, d in zip(t["encode"], t["decode"])]
        enc_flops, dec_flops = flops["ours" if name == "compiled" else name]
        rates = f"{enc_flops / med[name]['encode'] / 1e9:.0f} / {dec_flops / med[name]['decode'] / 1e9:.0f}"
        print(f"{name:>9}: encode {med[name]['encode']:.3f} s, decode {med[name]['decode']:.3f} s, "
              f"encode + decode {statistics.median(total):.3f} s (median of {args.repeats}; min {min(total):.3f}; "
              f"process CPU {med[name]['encode_cpu'] + med[name]['decode_cpu']:.3f} s); "
              f"{enc_flops / 1e9:.1f} + {dec_flops / 1e9:.1f} GFLOP, {rates} GFLOP/s achieved")
    for name in ("ours", "compiled"):
        if "reference" in med and name in med:
            for k in ("encode", "decode"):
                print(f"{name} / reference {k}: {med[name][k] / med['reference'][k]:.2f}x")
            ratio = lambda a, b: (med[name][a] + med[name][b]) / (med["reference"][a] + med["reference"][b])  # noqa: E731
            print(f"{name} / reference encode + decode: {ratio('encode', 'decode'):.2f}x wall-clock, "
                  f"{ratio('encode_cpu', 'decode_cpu'):.2f}x process CPU time")
    if "compiled" in med:
        saved = med["ours"]["encode"] + med["ours"]["decode"] - med["compiled"]["encode"] - med["compiled"]["decode"]
        extra = first_run - med["compiled"]["encode"] - med["compiled"]["decode"]  # compiling, once per shape
        payback = f"its {extra:.0f} s of compiling are repaid after {extra / saved:.0f} clips" if saved > 0 else \
            "it is not faster here: leave it off"
        print(f"compiled saves {saved:.3f} s per encode + decode of this shape; {payback}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
