#!/usr/bin/env bash
# PPO on Qwen2.5-0.5B-Instruct, one node with 2 GPUs (TP=1, DP=2).
#
#   HF_ACTOR=./model_from_hf/Qwen2.5-0.5B-Instruct HF_RM=./model_from_hf/Qwen2.5-0.5B-RM \
#   DATA=./dataset/train-00000-of-00001.parquet bash examples/mcore/qwen25/trl_ppo_qwen25_0.5b.sh
#
# HF_RM: a Qwen2ForSequenceClassification (num_labels=1) reward model; RM_FRESH=1 with HF_RM=$HF_ACTOR starts from
# a fresh value head instead. Qwen2.5-0.5B has 14 attention heads and 2 KV heads: TP may be 1 or 2.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$REPO"
: "${HF_ACTOR:?set HF_ACTOR}"; : "${HF_RM:?set HF_RM}"; : "${DATA:?set DATA}"
OUT=${OUT:-outputs/qwen25_0.5b}
NPROC=${NPROC:-2}; TP=${TP:-1}; PP=${PP:-1}
PY=${PYTHON:-python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'this example needs GPUs'"

VALUE_ARGS=(--model-kind value); [ "${RM_FRESH:-0}" = "1" ] && VALUE_ARGS+=(--init-value-head)
[ -f "$OUT/actor_mcore/posttrain_checkpoint.json" ] || \
  "$PY" convert_ckpt.py --direction hf2mcore --load-dir "$HF_ACTOR" --save-dir "$OUT/actor_mcore"
[ -f "$OUT/rm_mcore/posttrain_checkpoint.json" ] || \
  "$PY" convert_ckpt.py --direction hf2mcore --load-dir "$HF_RM" --save-dir "$OUT/rm_mcore" "${VALUE_ARGS[@]}"
[ -f "$OUT/data/alpaca_packed_input_ids_document.idx" ] || \
  "$PY" preprocess_data.py --input "$DATA" --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$HF_ACTOR" \
    --output-prefix "$OUT/data/alpaca" --workers 16 --log-interval 1000 \
    --handler-name PPOAlpacaStyleInstructionHandler --prompt-type qwen

torchrun --nproc_per_node "$NPROC" pretrain_gpt.py --stage trl_ppo \
  --ref-model "$OUT/actor_mcore" --reward-model "$OUT/rm_mcore" --data-path "$OUT/data/alpaca" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --micro-batch-size 8 --global-batch-size 64 --train-iters 500 --lr 1e-6 --critic-lr 5e-6 --bf16 \
  --max-prompt-length 256 --max-new-tokens 256 --do-sample --temperature 1.0 --top-p 1.0 \
  --kl-coef 0.05 --gamma 1.0 --lam 0.95 --clip-ratio 0.2 --cliprange-value 0.2 --missing-eos-penalty 1.0 \
  --save "$OUT/ppo" --save-interval 100 --log-interval 1 --tensorboard-dir "$OUT/tensorboard"
