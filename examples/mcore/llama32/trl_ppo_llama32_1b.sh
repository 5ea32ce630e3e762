#!/usr/bin/env bash
# PPO on Llama-3.2-1B-Instruct, one node with 4 GPUs: TP=2, PP=2 (as MindSpeed-LLM ships it).
#
#   HF_ACTOR=./model_from_hf/Llama-3.2-1B-Instruct HF_RM=./model_from_hf/Llama-3.2-1B-RM \
#   DATA=./dataset/train-00000-of-00001.parquet bash examples/mcore/llama32/trl_ppo_llama32_1b.sh
#
# HF_RM is a LlamaForSequenceClassification (num_labels=1) reward model of the same tokenizer, e.g. trained with
# `pretrain_gpt.py --stage rm` and converted back; without one, set HF_RM=$HF_ACTOR and RM_FRESH=1 to start from
# a fresh value head (an untrained reward). Steps whose outputs exist are skipped.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$REPO"
: "${HF_ACTOR:?set HF_ACTOR to the HF directory of Llama-3.2-1B-Instruct}"
: "${HF_RM:?set HF_RM to the HF directory of the reward model}"
: "${DATA:?set DATA to the Alpaca-style prompt parquet/jsonl}"
OUT=${OUT:-outputs/llama32_1b}
NPROC=${NPROC:-4}; TP=${TP:-2}; PP=${PP:-2}
PY=${PYTHON:-python}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'this example needs GPUs (see examples/mcore/smollm2 for CPU)'"

[ -f "$OUT/actor_mcore/posttrain_checkpoint.json" ] || \
  "$PY" convert_ckpt.py --direction hf2mcore --load-dir "$HF_ACTOR" --save-dir "$OUT/actor_mcore"
if [ "${RM_FRESH:-0}" = "1" ]; then
  [ -f "$OUT/rm_mcore/posttrain_checkpoint.json" ] || \
    "$PY" convert_ckpt.py --direction hf2mcore --load-dir "$HF_RM" --save-dir "$OUT/rm_mcore" --model-kind value --init-value-head
else
  [ -f "$OUT/rm_mcore/posttrain_checkpoint.json" ] || \
    "$PY" convert_ckpt.py --direction hf2mcore --load-dir "$HF_RM" --save-dir "$OUT/rm_mcore" --model-kind value
fi
[ -f "$OUT/data/alpaca_packed_input_ids_document.idx" ] || \
  "$PY" preprocess_data.py --input "$DATA" --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$HF_ACTOR" \
    --output-prefix "$OUT/data/alpaca" --workers 16 --log-interval 1000 \
    --handler-name PPOAlpacaStyleInstructionHandler --prompt-type llama3

torchrun --nproc_per_node "$NPROC" pretrain_gpt.py --stage trl_ppo \
  --ref-model "$OUT/actor_mcore" --reward-model "$OUT/rm_mcore" --data-path "$OUT/data/alpaca" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --micro-batch-size 4 --global-batch-size 32 --rollout-batch-size 32 --train-iters 500 \
  --lr 1e-6 --critic-lr 5e-6 --min-lr 0 --lr-decay-style constant --weight-decay 0.0 --clip-grad 1.0 --bf16 \
  --max-prompt-length 256 --max-new-tokens 128 --do-sample --temperature 1.0 --top-p 1.0 \
  --kl-coef 0.05 --gamma 1.0 --lam 0.95 --clip-ratio 0.2 --cliprange-value 0.2 --missing-eos-penalty 1.0 \
  --save "$OUT/ppo" --save-interval 100 --log-interval 1 --tensorboard-dir "$OUT/tensorboard"
