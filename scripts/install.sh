#!/bin/sh
# Install this repository (`pip install -e .`: its packages and requirements.txt) with the torch build that fits
# this machine. Used by quickstart.sh and .ci/run.
#
#   sh scripts/install.sh                                    # the packages and their requirements
#   sh scripts/install.sh --test                             # ... and the test tools (pytest, pytest-xdist)
#   sh scripts/install.sh --constraints .ci/constraints.txt  # the exact set CI tests (what .ci/run does)
#   sh scripts/install.sh --if-missing                       # nothing to do when everything is installed (quickstart)
#
# torch, decided before anything else is installed (requirements.txt alone would pull the default index's torch,
# which on Linux x86-64 is the CUDA build: ~6 GB with its nvidia-* packages):
#   * a torch that is already installed is kept, whatever its build;
#   * with an NVIDIA GPU (nvidia-smi lists one), torch comes from pip's default index as usual (the CUDA build);
#   * without one, the CPU build (under 1 GB): from PyTorch's CPU wheel index (TORCH_CPU_INDEX); if that index is
#     unreachable, from a wheel in pip's configured find-links (a local wheelhouse); failing both, from the default
#     index, with a warning that it is the large CUDA build.
# TORCH_BUILD=cpu|default forces the choice (default: the default index, as with a GPU).
# DeepSpeed is installed without pre-building its C++ ops (DS_BUILD_OPS=0); they compile on first use if needed.
set -eu
SCRIPT_NAME=install.sh
REPO=$(cd "$(dirname "$0")/.." && pwd)

: "${PYTHON:=python3}"
: "${TORCH_CPU_INDEX:=https://download.pytorch.org/whl/cpu}"
: "${TORCH_BUILD:=auto}"        # auto | cpu | default
: "${INSTALL_DRY_RUN:=0}"       # 1: print the pip commands instead of running them (for tests)

CONSTRAINTS="" IF_MISSING=0 TEST=0
while [ $# -gt 0 ]; do
    case "$1" in
        --constraints) [ $# -ge 2 ] || { echo "$SCRIPT_NAME: --constraints needs a file" >&2; exit 2; }
                       CONSTRAINTS=$2; shift 2 ;;
        --if-missing) IF_MISSING=1; shift ;;
        --test) TEST=1; shift ;;
        *) echo "$SCRIPT_NAME: unknown argument $1 (see the header of scripts/install.sh)" >&2; exit 2 ;;
    esac
done
[ -z "$CONSTRAINTS" ] || [ -f "$CONSTRAINTS" ] || { echo "$SCRIPT_NAME: constraints file $CONSTRAINTS not found" >&2; exit 2; }
case "$TORCH_BUILD" in auto|cpu|default) ;; *) echo "$SCRIPT_NAME: TORCH_BUILD=$TORCH_BUILD must be auto, cpu or default" >&2; exit 2 ;; esac

say() { echo "[install] $*"; }
pip_install() {  # pip install ARGS..., with the constraints file when given
    if [ -n "$CONSTRAINTS" ]; then set -- "$@" -c "$CONSTRAINTS"; fi
    if [ "$INSTALL_DRY_RUN" = 1 ]; then echo "[install] would run: pip install $*"; return 0; fi
    DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install "$@"
}
torch_summary() {  # "2.13.0+cpu (CPU build)" / "2.4.1+cu121 (CUDA 12.1 build)", or fails without torch
    "$PYTHON" -c "import torch; c = torch.version.cuda; print(torch.__version__, '(CUDA ' + c + ' build)' if c else '(CPU build)')" 2>/dev/null
}
have_nvidia_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}
cpu_index_reachable() {
    "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=15)" \
        "$TORCH_CPU_INDEX" >/dev/null 2>&1
}

# Installed means importable from anywhere, not just from this checkout (the scripts add it to PYTHONPATH).
WANTED="import torch, diffusers, transformers, accelerate, deepspeed, decord, safetensors, einops, imageio_ffmpeg, peft, pyramid_dit, video_vae, trainer_misc, train, tools"
[ "$TEST" = 0 ] || WANTED="$WANTED, pytest, xdist"
if [ "$IF_MISSING" = 1 ] && (cd / && env -u PYTHONPATH "$PYTHON" -c "$WANTED") >/dev/null 2>&1; then
    say "already installed (torch $(torch_summary))"
    exit 0
fi

if installed=$(torch_summary); then
    say "keeping the installed torch $installed"
else
    build=$TORCH_BUILD
    if [ "$build" = auto ]; then
        if have_nvidia_gpu; then build=default; else build=cpu; fi
    fi
    if [ "$build" = default ]; then
        say "torch: from pip's default index with the other requirements (an NVIDIA GPU is present, or TORCH_BUILD=default)"
    elif cpu_index_reachable; then
        say "no NVIDIA GPU: installing the CPU build of torch from $TORCH_CPU_INDEX (under 1 GB; the default index's build brings ~6 GB of CUDA libraries)"
        pip_install torch --index-url "$TORCH_CPU_INDEX"
    else
        say "no NVIDIA GPU, but PyTorch's CPU index $TORCH_CPU_INDEX is unreachable; trying a torch wheel from pip's configured find-links (local wheelhouse)"
        if pip_install --no-index --no-deps torch; then
            say "installed torch from the local wheelhouse; its dependencies come with the requirements below"
        else
            say "WARNING: no local torch wheel either: torch comes from the default index, which on Linux x86-64 is the CUDA build (~6 GB). To avoid that, install a CPU torch first (pytorch.org) and rerun."
        fi
    fi
fi

TARGET="$REPO" WHAT="requirements.txt"
if [ "$TEST" = 1 ]; then TARGET="$REPO[test]" WHAT="requirements.txt and the test tools"; fi
say "installing this repository with pip install -e ($WHAT${CONSTRAINTS:+, constraints $CONSTRAINTS}; DeepSpeed ops not pre-built: DS_BUILD_OPS=0)"
pip_install -e "$TARGET"
if [ "$INSTALL_DRY_RUN" != 1 ]; then
    say "done: torch $(torch_summary); $("$PYTHON" -c "import diffusers, transformers, accelerate, deepspeed; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__)" 2>/dev/null | tail -n 1)"
fi
