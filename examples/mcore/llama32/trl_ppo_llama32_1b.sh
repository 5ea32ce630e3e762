#!/usr/bin/env bash
# PPO on Llama-3.2-1B-Instruct: one node, 4 NVIDIA GPUs with >= 24 GB each (as MindSpeed-LLM ships it).
#
#   HF_ACTOR=./model_from_hf/Llama-3.2-1B-Instruct HF_RM=./outputs/llama32_1b_rm/rm_hf \
#   DATA=./dataset/train-00000-of-00001.parquet bash examples/mcore/llama32/trl_ppo_llama32_1b.sh
#
# Layout: TP=2, PP=2, DP=1 (4 GPUs). Llama-3.2-1B has 32 attention heads, 8 KV heads and 16 layers: TP may be
# 1, 2, 4 or 8, PP a divisor of 16; the script checks the layout before starting. On one 80 GB GPU, TP=1 PP=1
# NPROC=1 fits as well (static 49.4 GB + ~5 GB of activations and logits at MBS=4).
#
# Memory per GPU (P = 1.236e9 parameters, tied embeddings; critic and reward model: same network, scalar head):
#   weights, bf16, 4 models             4 x 2 B x P             =  9.9 GB
#   actor + critic: fp32 grads 4 B, fp32 master 4 B, Adam m+v 8 B  2 x 16 B x P  = 39.5 GB
#                                       static total 40 B x P   = 49.4 GB; / (TP 2 x PP 2) = 12.4 GB
#   training activations, micro-batch 4 x 384 tokens, per layer s b h (10 + 24/TP + 5 a s / (h TP)) B:
#     384 x 4 x 2048 x (22 + 15) B = 116 MB; the first stage holds PP micro-batches of its 8 layers: 16 x 116 MB
#                                                                  = 1.9 GB
#   logits on the last stage, vocabulary split over TP: output over 384 positions in bf16 + fp32,
#   4 x 384 x 128,256 / 2 x 6 B = 0.6 GB, and ~3 fp32 working copies over 128 response positions,
#   3 x 4 x 128 x 128,256 / 2 x 4 B = 0.4 GB
#   rollout (not at the same time as training): KV cache 32 x 384 tokens x 32 KiB / (TP x PP) = 0.1 GB (the
#   decode materialises the logits of the last position only)
#   => about 15 GB at the training peak, plus allocator slack: 24 GB GPUs.
#
# HF_RM: a LlamaForSequenceClassification (num_labels=1) reward model of the same tokenizer (rm_llama32_1b.sh
# writes one; with POOLING=response_mean it is a LlamaForTokenClassification); REWARD_MODEL=<posttrain value
# checkpoint> skips its conversion; RM_FRESH=1 with HF_RM=$HF_ACTOR starts from a fresh value head (an untrained
# reward: exercises the pipeline only).
#
# Settings from the environment (defaults in brackets):
#   OUT [outputs/llama32_1b]  NPROC [4] TP [2] PP [2]  GBS [32] MBS [4] ROLLOUT_BS [32] ITERS [500]
#   MAX_PROMPT [256] MAX_NEW_TOKENS [128] LR [1e-6] CRITIC_LR [5e-6] PROMPT_TYPE [llama3] WORKERS [16]
#   TRANSFORMER_IMPL (unset: the trainer's default; local or transformer_engine when the trainer has the flag)
#   POSTTRAIN_VENV / PYTHON, DRY_RUN=1, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: see examples/mcore/common.sh
# Steps whose outputs exist are skipped. The trained actor is exported to $OUT/actor_hf.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$REPO"
source examples/mcore/common.sh
: "${HF_ACTOR:?set HF_ACTOR to the HF directory of Llama-3.2-1B-Instruct}"
: "${DATA:?set DATA to the Alpaca-style prompt parquet/jsonl}"
[ -n "${REWARD_MODEL:-}" ] || : "${HF_RM:?set HF_RM to the HF reward model (or REWARD_MODEL to a posttrain one)}"
OUT=${OUT:-outputs/llama32_1b}
NPROC=${NPROC:-4}; TP=${TP:-2}; PP=${PP:-2}
GBS=${GBS:-32}; MBS=${MBS:-4}; ROLLOUT_BS=${ROLLOUT_BS:-32}; ITERS=${ITERS:-500}
MAX_PROMPT=${MAX_PROMPT:-256}; MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}; LR=${LR:-1e-6}; CRITIC_LR=${CRITIC_LR:-5e-6}
PROMPT_TYPE=${PROMPT_TYPE:-llama3}; WORKERS=${WORKERS:-16}

gpu_python
launcher
model_shape "$HF_ACTOR" 32 8 16
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
  --lr "$LR" --critic-lr "$CRITIC_LR" --min-lr 0 --lr-decay-style constant --weight-decay 0.0 --clip-grad 1.0 --bf16 \
  --max-prompt-length "$MAX_PROMPT" --max-new-tokens "$MAX_NEW_TOKENS" --do-sample --temperature 1.0 --top-p 1.0 \
  --kl-coef 0.05 --gamma 1.0 --lam 0.95 --clip-ratio 0.2 --cliprange-value 0.2 --missing-eos-penalty 1.0 \
  --save "$OUT/ppo" --save-interval 100 --log-interval 1 --tensorboard-dir "$OUT/tensorboard"

step "trained actor -> HF"
run "$PY" convert_ckpt.py --direction mcore2hf --load-dir "$(latest_checkpoint "$OUT/ppo")/actor" \
  --save-dir "$OUT/actor_hf" --overwrite
