#!/usr/bin/env bash
# Reward model on Llama-3.2-1B-Instruct from preference pairs: one node, 4 NVIDIA GPUs with >= 24 GB each.
#
#   HF_MODEL=./model_from_hf/Llama-3.2-1B-Instruct DATA=./dataset/dpo_train.parquet \
#   EVAL_DATA=./dataset/dpo_eval.parquet bash examples/mcore/llama32/rm_llama32_1b.sh
#
# Converts the SFT model to a value checkpoint with a fresh scalar head, preprocesses the pairs (columns prompt,
# chosen, rejected[, history]; docs/preprocessing.md), trains with the pairwise loss (docs/reward_model.md) and
# exports the result to $OUT/rm_hf: a LlamaForSequenceClassification (num_labels=1), or with
# POOLING=response_mean a LlamaForTokenClassification. trl_ppo_llama32_1b.sh takes it as HF_RM (or, without a
# conversion, REWARD_MODEL=$OUT/rm/iter_XXXXXXX/model).
#
# Layout: TP=2, PP=1, DP=2 (4 GPUs).
# Llama-3.2-1B has 32 attention heads, 8 KV heads and 16 layers:
# TP may be 1, 2, 4 or 8, PP a divisor of 16. The script checks the layout before starting.
#
# Memory per GPU (one trained value model, Pv = 1.236e9 parameters):
#   bf16 weights 2 B + fp32 grads 4 B + fp32 master 4 B + Adam m+v 8 B = 18 B x Pv = 22.2 GB; / TP 2 = 11.1 GB
#   activations, micro-batch of 2 pairs = 4 rows x 1024 tokens, s b h (10 + 24/TP + 5 a s / (h TP)) B per layer:
#   1024 x 4 x 2048 x (22 + 40) B x 16 layers = 8.3 GB (no vocabulary logits: a scalar head)
#   => about 20 GB plus allocator slack: 24 GB GPUs (TP=1 on one GPU: 22.2 + 15.3 GB, a 48 or 80 GB GPU).
#
# Settings from the environment (defaults in brackets):
#   OUT [outputs/llama32_1b_rm]  NPROC [4] TP [2] PP [1]  EPOCHS [1]
#   GBS [64] pairs per step, MBS [2] pairs per micro-batch and GPU
#   SEQ [1024] tokens; longer pairs: TRUNCATION [truncate] keeping MAX_PROMPT [SEQ/4] prompt tokens, or skip
#   LR [5e-6, cosine to LR/10]  HEAD_STD [0.00049 = 1 / (2048 + 1): scores start near 0]
#   POOLING [last] (or response_mean)
#   PROMPT_TYPE [llama3] WORKERS [16] EVAL_INTERVAL [0: at the end] SAVE_INTERVAL [0: at the end]
#   TRANSFORMER_IMPL (unset: the trainer's default; local or transformer_engine when the trainer has the flag)
#   POSTTRAIN_VENV / PYTHON, DRY_RUN=1, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: see examples/mcore/common.sh
# Steps whose outputs exist are skipped; an interrupted training run resumes from its last checkpoint.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$REPO"
source examples/mcore/common.sh
: "${HF_MODEL:?set HF_MODEL to the HF directory of the SFT model}"
: "${DATA:?set DATA to the preference pairs (parquet/jsonl with prompt, chosen, rejected)}"
EVAL_DATA=${EVAL_DATA:-}
OUT=${OUT:-outputs/llama32_1b_rm}
NPROC=${NPROC:-4}; TP=${TP:-2}; PP=${PP:-1}
GBS=${GBS:-64}; MBS=${MBS:-2}; EPOCHS=${EPOCHS:-1}; SEQ=${SEQ:-1024}; MAX_PROMPT=${MAX_PROMPT:-$((SEQ / 4))}
TRUNCATION=${TRUNCATION:-truncate}; LR=${LR:-5e-6}; HEAD_STD=${HEAD_STD:-0.00049}; POOLING=${POOLING:-last}
PROMPT_TYPE=${PROMPT_TYPE:-llama3}; WORKERS=${WORKERS:-16}
EVAL_INTERVAL=${EVAL_INTERVAL:-0}; SAVE_INTERVAL=${SAVE_INTERVAL:-0}
MIN_LR=$(awk "BEGIN { print $LR / 10 }")

gpu_python
launcher
model_shape "$HF_MODEL" 32 8 16
check_layout "$GBS" "$MBS"
require_cuda
IMPL_ARGS=(); [ -n "${TRANSFORMER_IMPL:-}" ] && IMPL_ARGS=(--transformer-impl "$TRANSFORMER_IMPL")

step "value checkpoint with a fresh head"
exists "$OUT/rm_init_mcore/posttrain_checkpoint.json" || \
  run "$PY" convert_ckpt.py --direction hf2mcore --load-dir "$HF_MODEL" --save-dir "$OUT/rm_init_mcore" \
    --model-kind value --init-value-head --value-head-init-std "$HEAD_STD" \
    --target-tensor-parallel-size "$TP" --target-pipeline-parallel-size "$PP"
step "preference pairs"
run mkdir -p "$OUT/data"
EVAL_ARGS=()
for split in train eval; do
  if [ "$split" = train ]; then input=$DATA; else input=$EVAL_DATA; fi
  [ -n "$input" ] || continue
  exists "$OUT/data/dpo_${split}_chosen_input_ids_document.idx" || \
    run "$PY" preprocess_data.py --input "$input" --handler-name AlpacaStylePairwiseHandler \
      --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$HF_MODEL" --prompt-type "$PROMPT_TYPE" \
      --output-prefix "$OUT/data/dpo_${split}" --workers "$WORKERS" --log-interval 1000
done
[ -n "$EVAL_DATA" ] && EVAL_ARGS=(--eval-data-path "$OUT/data/dpo_eval" --eval-interval "$EVAL_INTERVAL")

step "reward model training"
run "${TORCHRUN[@]}" pretrain_gpt.py --stage rm \
  --pretrained-checkpoint "$OUT/rm_init_mcore" --load "$OUT/rm" --save "$OUT/rm" \
  --data-path "$OUT/data/dpo_train" "${EVAL_ARGS[@]}" \
  --seq-length "$SEQ" --truncation "$TRUNCATION" --max-prompt-length "$MAX_PROMPT" --score-pooling "$POOLING" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" "${IMPL_ARGS[@]}" \
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --num-epochs "$EPOCHS" \
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters 10 --weight-decay 0.0 --clip-grad 1.0 \
  --bf16 --save-interval "$SAVE_INTERVAL" --log-interval 1 \
  --tensorboard-dir "$OUT/rm/tensorboard"

step "reward model -> HF"
FINAL="$(latest_checkpoint "$OUT/rm")/model"
run "$PY" convert_ckpt.py --direction mcore2hf --load-dir "$FINAL" --save-dir "$OUT/rm_hf" --overwrite
echo "reward model: $FINAL (posttrain, REWARD_MODEL=) and $OUT/rm_hf (HF, HF_RM=)"
