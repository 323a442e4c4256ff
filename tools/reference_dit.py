"""The reference's DiT classes (a jy0205/Pyramid-Flow checkout's ``pyramid_dit``), imported for side-by-side timing
and parity by ``tools/benchmark_dit.py`` and ``tools/measure_gpu.py``. Nothing of the reference is copied here."""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

__all__ = ["REFERENCE", "load_reference_class"]

# Where the reference keeps each kind's DiT: (folder under pyramid_dit/, module, class).
REFERENCE = {"pyramid_flux": ("flux_modules", "modeling_pyramid_flux", "PyramidFluxTransformer"),
             "pyramid_mmdit": ("mmdit_modules", "modeling_pyramid_mmdit", "PyramidDiffusionMMDiT")}


def load_reference_class(ref_root: Path, kind: str = "pyramid_flux"):
    """The reference DiT class of ``kind``, imported from a Pyramid-Flow checkout without its package init.

    Its modules import sequence-parallel helpers from a top-level ``trainer_misc``; a stub that reports
    "not initialised" stands in while they import (and our own ``trainer_misc``, if loaded, is restored).
    """
    folder, module_name, class_name = REFERENCE[kind]
    flux_dir = ref_root / "pyramid_dit" / folder
    if not (flux_dir / f"{module_name}.py").is_file():
        raise FileNotFoundError(f"--reference {ref_root}: no pyramid_dit/{folder}/{module_name}.py there")
    stub = types.ModuleType("trainer_misc")
    stub.is_sequence_parallel_initialized = lambda: False

    def _unavailable(*_args, **_kwargs):
        raise RuntimeError("sequence parallelism is not available in the benchmark stub")

    for name in ("get_sequence_parallel_group", "get_sequence_parallel_world_size", "get_sequence_parallel_rank",
                 "all_to_all"):
        setattr(stub, name, _unavailable)
    try:  # the reference's SD3 module imports IPython's ``embed`` (a debugging leftover) at import time
        importlib.import_module("IPython")
    except ImportError:
        ipython = types.ModuleType("IPython")
        ipython.embed = _unavailable
        sys.modules["IPython"] = ipython
    package = types.ModuleType(f"_reference_{folder}")
    package.__path__ = [str(flux_dir)]
    saved = sys.modules.get("trainer_misc")
    sys.modules[package.__name__], sys.modules["trainer_misc"] = package, stub
    try:
        module = importlib.import_module(f"{package.__name__}.{module_name}")
    finally:
        if saved is None:
            del sys.modules["trainer_misc"]
        else:
            sys.modules["trainer_misc"] = saved
    return getattr(module, class_name)
