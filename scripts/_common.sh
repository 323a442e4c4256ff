# Shared by the scripts in this folder (POSIX sh; sourced, not run). Callers set SCRIPT_NAME first.
#
# The scripts only set their variables (every one of them exported, `set -a`); the checks and the launch are the
# Python launcher's (train/launch.py, tools/launch.py over trainer_misc/runtime/launcher.py), so each rule lives in
# one place and a bad setting is refused in about a second, named as the variable you set.
REPO=$(cd "$(dirname "$0")/.." && pwd)
# This checkout's code, whichever checkout `pip install -e .` pointed python3 at.
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH

# run_launcher MODULE ARGS...: the launcher replaces this shell (so signals sent to the script reach it directly).
run_launcher() {
    command -v python3 >/dev/null 2>&1 || { echo "$SCRIPT_NAME: python3 not found on PATH" >&2; exit 2; }
    python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" \
        || { echo "$SCRIPT_NAME: python3 cannot import torch: install the requirements first (sh scripts/install.sh)" >&2; exit 2; }
    exec python3 -m "$@"
}
