#!/usr/bin/env bash
# PPO on Qwen2.5-7B-Instruct, one node with 8 GPUs: TP=4, PP=2 (actor, reference, critic and reward in one job).
#
#   HF_ACTOR=./model_from_hf/Qwen2.5-7B-Instruct HF_RM=./model_from_hf/Qwen2.5-7B-RM \
#   DATA=./dataset/train-00000-of-00001.parquet bash examples/mcore/qwen25/trl_ppo_qwen25_7b.sh
#
# Qwen2.5-7B has 28 attention heads and 4 KV heads: TP must divide 4. Activation recomputation keeps the
# four 7B models within 80 GB GPUs; use --use-distributed-optimizer to shard Adam states over DP ranks.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$REPO"
: "${HF_ACTOR:?set HF_ACTOR}"; : "${HF_RM:?set HF_RM}"; : "${DATA:?set DATA}"
OUT=${OUT:-outputs/qwen25_7b}
NPROC=${NPROC:-8}; TP=${TP:-4}; PP=${PP:-2}
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
  --micro-batch-size 2 --global-batch-size 32 --rollout-batch-size 16 --train-iters 300 \
  --lr 5e-7 --critic-lr 2e-6 --bf16 --use-distributed-optimizer --recompute-granularity full \
  --max-prompt-length 512 --max-new-tokens 256 --do-sample --temperature 1.0 --top-p 1.0 \
  --kl-coef 0.05 --gamma 1.0 --lam 0.95 --clip-ratio 0.2 --cliprange-value 0.2 --missing-eos-penalty 1.0 \
  --save "$OUT/ppo" --save-interval 50 --log-interval 1 --tensorboard-dir "$OUT/tensorboard"
