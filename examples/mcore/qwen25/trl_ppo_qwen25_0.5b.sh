#!/usr/bin/env bash
# PPO on Qwen2.5-0.5B-Instruct: one node, 2 NVIDIA GPUs with >= 40 GB each (A100 40/80 GB, H100, H200).
#
#   HF_ACTOR=./model_from_hf/Qwen2.5-0.5B-Instruct HF_RM=./outputs/qwen25_0.5b_rm/rm_hf \
#   DATA=./dataset/train-00000-of-00001.parquet bash examples/mcore/qwen25/trl_ppo_qwen25_0.5b.sh
#
# Layout: TP=1, PP=1, DP=2 (2 GPUs). Qwen2.5-0.5B has 14 attention heads, 2 KV heads and 24 layers: TP may be 1
# or 2, PP any divisor of 24; the script checks the layout before starting.
#
# Memory per GPU (P = 0.494e9 parameters; critic and reward model are the same network with a scalar head):
#   weights, bf16, 4 models             4 x 2 B x P             =  4.0 GB
#   actor + critic: fp32 grads 4 B, fp32 master 4 B, Adam m+v 8 B  2 x 16 B x P  = 15.8 GB
#                                       static total 40 B x P   = 19.8 GB  (/ (TP x PP); DP replicates it)
#   training activations, micro-batch 4 x 512 tokens (s b h (34 + 5 a s / h) per layer, local attention):
#                                       4 x 512 x 896 x (34 + 40) B x 24 layers  = 3.3 GB
#   logits: the model's output over all 512 positions in bf16 + fp32, 4 x 512 x 151,936 x 6 B = 1.9 GB, and ~3 fp32
#   working copies over the 256 response positions, 3 x 4 x 256 x 151,936 x 4 B = 1.9 GB
#   rollout (not at the same time as training): KV cache 16 x 512 tokens x 12 KiB = 0.1 GB (the decode
#   materialises the logits of the last position only)
#   => about 27 GB at the training peak, plus allocator slack: 40 GB GPUs. On 24 GB GPUs add
#   --use-distributed-optimizer (master weights and Adam states / DP: 13.8 GB static) and MBS=2.
#
# HF_RM: a reward model of the same tokenizer as Qwen2ForSequenceClassification (num_labels=1) or, from
# rm_qwen25_0.5b.sh with POOLING=response_mean, Qwen2ForTokenClassification; REWARD_MODEL=<posttrain value
# checkpoint> (e.g. $OUT/rm/iter_XXXXXXX/model of rm_qwen25_0.5b.sh) skips its conversion; RM_FRESH=1 with
# HF_RM=$HF_ACTOR starts from a fresh value head (an untrained reward: exercises the pipeline only).
#
# Settings from the environment (defaults in brackets):
#   OUT [outputs/qwen25_0.5b]  NPROC [2] TP [1] PP [1]  GBS [64] MBS [4] ROLLOUT_BS [16] ITERS [500]
#   MAX_PROMPT [256] MAX_NEW_TOKENS [256] LR [1e-6] CRITIC_LR [5e-6] PROMPT_TYPE [qwen] WORKERS [16]
#   TRANSFORMER_IMPL (unset: the trainer's default; local or transformer_engine when the trainer has the flag)
#   POSTTRAIN_VENV / PYTHON, DRY_RUN=1, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: see examples/mcore/common.sh
# Steps whose outputs exist are skipped. The trained actor is exported to $OUT/actor_hf.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$REPO"
source examples/mcore/common.sh
: "${HF_ACTOR:?set HF_ACTOR to the HF directory of Qwen2.5-0.5B-Instruct}"
: "${DATA:?set DATA to the Alpaca-style prompt parquet/jsonl}"
[ -n "${REWARD_MODEL:-}" ] || : "${HF_RM:?set HF_RM to the HF reward model (or REWARD_MODEL to a posttrain one)}"
OUT=${OUT:-outputs/qwen25_0.5b}
NPROC=${NPROC:-2}; TP=${TP:-1}; PP=${PP:-1}
GBS=${GBS:-64}; MBS=${MBS:-4}; ROLLOUT_BS=${ROLLOUT_BS:-16}; ITERS=${ITERS:-500}
MAX_PROMPT=${MAX_PROMPT:-256}; MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}; LR=${LR:-1e-6}; CRITIC_LR=${CRITIC_LR:-5e-6}
PROMPT_TYPE=${PROMPT_TYPE:-qwen}; WORKERS=${WORKERS:-16}

gpu_python
launcher
model_shape "$HF_ACTOR" 14 2 24
check_layout "$GBS" "$MBS"
require_cuda
IMPL_ARGS=(); [ -n "${TRANSFORMER_IMPL:-}" ] && IMPL_ARGS=(--transformer-impl "$TRANSFORMER_IMPL")

step "actor / reference checkpoint"
exists "$OUT/actor_mcore/posttrain_checkpoint.json" || \
  run "$PY" convert_ckpt.py --direction hf2mcore --load-dir "$HF_ACTOR" --save-dir "$OUT/actor_mcore" \
    --target-tensor-parallel-size "$TP" --target-pipeline-parallel-size "$PP"
step "reward model"
if [ -z "${REWARD_MODEL:-}" ]; then
  REWARD_MODEL="$OUT/rm_mcore"
  VALUE_ARGS=(--model-kind value); [ "${RM_FRESH:-0}" = 1 ] && VALUE_ARGS+=(--init-value-head)
  exists "$REWARD_MODEL/posttrain_checkpoint.json" || \
    run "$PY" convert_ckpt.py --direction hf2mcore --load-dir "$HF_RM" --save-dir "$REWARD_MODEL" "${VALUE_ARGS[@]}"
fi
step "prompts"
run mkdir -p "$OUT/data"
exists "$OUT/data/alpaca_packed_input_ids_document.idx" || \
  run "$PY" preprocess_data.py --input "$DATA" --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$HF_ACTOR" \
    --output-prefix "$OUT/data/alpaca" --workers "$WORKERS" --log-interval 1000 \
    --handler-name PPOAlpacaStyleInstructionHandler --prompt-type "$PROMPT_TYPE"

step "PPO"
run "${TORCHRUN[@]}" pretrain_gpt.py --stage trl_ppo \
  --ref-model "$OUT/actor_mcore" --reward-model "$REWARD_MODEL" --data-path "$OUT/data/alpaca" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" "${IMPL_ARGS[@]}" \
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --rollout-batch-size "$ROLLOUT_BS" --train-iters "$ITERS" \
  --lr "$LR" --critic-lr "$CRITIC_LR" --bf16 \
  --max-prompt-length "$MAX_PROMPT" --max-new-tokens "$MAX_NEW_TOKENS" --do-sample --temperature 1.0 --top-p 1.0 \
  --kl-coef 0.05 --gamma 1.0 --lam 0.95 --clip-ratio 0.2 --cliprange-value 0.2 --missing-eos-penalty 1.0 \
  --save "$OUT/ppo" --save-interval 100 --log-interval 1 --tensorboard-dir "$OUT/tensorboard"

step "trained actor -> HF"
run "$PY" convert_ckpt.py --direction mcore2hf --load-dir "$(latest_checkpoint "$OUT/ppo")/actor" \
  --save-dir "$OUT/actor_hf" --overwrite
