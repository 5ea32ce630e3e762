#!/usr/bin/env bash
# PPO on Qwen2.5-7B-Instruct: one node, 8 NVIDIA GPUs with >= 80 GB each (A100/H100 80 GB, H200 141 GB);
# actor, reference, critic and reward model of 7B each in one job.
#
#   HF_ACTOR=./model_from_hf/Qwen2.5-7B-Instruct HF_RM=./outputs/qwen25_7b_rm/rm_hf \
#   DATA=./dataset/train-00000-of-00001.parquet bash examples/mcore/qwen25/trl_ppo_qwen25_7b.sh
#
# Layout: TP=4, PP=2, DP=1 (8 GPUs). Qwen2.5-7B has 28 attention heads, 4 KV heads and 28 layers: TP must divide
# 4 (1, 2, 4), PP divide 28; the script checks the layout before starting. On 8 x 141 GB (H200): TP=2 PP=2
# (DP=2), or TP=2 PP=1 (DP=4); --use-distributed-optimizer then shards the Adam states over DP.
#
# Memory per GPU (P = 7.616e9 parameters for the actor/reference; the critic and reward model have no 0.545e9
# LM head: Pv = 7.071e9):
#   weights, bf16, 4 models             2 B x (2 P + 2 Pv)              =  58.7 GB
#   actor + critic: fp32 grads 4 B, fp32 master 4 B, Adam m+v 8 B  16 B x (P + Pv)  = 235.0 GB
#                                       static total 293.7 GB; / (TP 4 x PP 2) = 36.7 GB per GPU
#   (with DP > 1 and --use-distributed-optimizer the 12 B of master + Adam per parameter are divided by DP:
#    TP=2 PP=2 DP=2 -> (58.7 + 58.7 + 176.2 / 2) / 4 = 51.4 GB)
#   training activations with --recompute-granularity full: layer inputs 768 x 2 x 3584 x 2 B = 11 MB per layer
#   and micro-batch, x 14 layers x 2 micro-batches in flight = 0.3 GB, plus one recomputed layer (0.13 GB)
#   logits on the last stage, vocabulary split over TP: output over 768 positions in bf16 + fp32,
#   2 x 768 x 152,064 / 4 x 6 B = 0.35 GB, and ~3 fp32 working copies over 256 response positions, 0.23 GB
#   rollout (not at the same time as training): KV cache 16 x 768 tokens x 56 KiB / (TP x PP) = 0.1 GB (the
#   decode materialises the logits of the last position only)
#   => about 38 GB at the training peak, plus allocator slack: more than 40 GB GPUs, 80 GB.
#
# HF_RM: a Qwen2ForSequenceClassification (num_labels=1) reward model of the same tokenizer (rm_qwen25_7b.sh
# writes one); REWARD_MODEL=<posttrain value checkpoint> skips its conversion; RM_FRESH=1 with HF_RM=$HF_ACTOR
# starts from a fresh value head (an untrained reward: exercises the pipeline only).
#
# Settings from the environment (defaults in brackets):
#   OUT [outputs/qwen25_7b]  NPROC [8] TP [4] PP [2]  GBS [32] MBS [2] ROLLOUT_BS [16] ITERS [300]
#   MAX_PROMPT [512] MAX_NEW_TOKENS [256] LR [5e-7] CRITIC_LR [2e-6] PROMPT_TYPE [qwen] WORKERS [16]
#   TRANSFORMER_IMPL (unset: the trainer's default; local or transformer_engine when the trainer has the flag)
#   POSTTRAIN_VENV / PYTHON, DRY_RUN=1, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT: see examples/mcore/common.sh
#   (two nodes of 8: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0> on each node; DP doubles)
# Steps whose outputs exist are skipped. The trained actor is exported to $OUT/actor_hf.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$REPO"
source examples/mcore/common.sh
: "${HF_ACTOR:?set HF_ACTOR to the HF directory of Qwen2.5-7B-Instruct}"
: "${DATA:?set DATA to the Alpaca-style prompt parquet/jsonl}"
[ -n "${REWARD_MODEL:-}" ] || : "${HF_RM:?set HF_RM to the HF reward model (or REWARD_MODEL to a posttrain one)}"
OUT=${OUT:-outputs/qwen25_7b}
NPROC=${NPROC:-8}; TP=${TP:-4}; PP=${PP:-2}
GBS=${GBS:-32}; MBS=${MBS:-2}; ROLLOUT_BS=${ROLLOUT_BS:-16}; ITERS=${ITERS:-300}
MAX_PROMPT=${MAX_PROMPT:-512}; MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}; LR=${LR:-5e-7}; CRITIC_LR=${CRITIC_LR:-2e-6}
PROMPT_TYPE=${PROMPT_TYPE:-qwen}; WORKERS=${WORKERS:-16}

gpu_python
launcher
model_shape "$HF_ACTOR" 28 4 28
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
  --lr "$LR" --critic-lr "$CRITIC_LR" --bf16 --use-distributed-optimizer --recompute-granularity full \
  --max-prompt-length "$MAX_PROMPT" --max-new-tokens "$MAX_NEW_TOKENS" --do-sample --temperature 1.0 --top-p 1.0 \
  --kl-coef 0.05 --gamma 1.0 --lam 0.95 --clip-ratio 0.2 --cliprange-value 0.2 --missing-eos-penalty 1.0 \
  --save "$OUT/ppo" --save-interval 50 --log-interval 1 --tensorboard-dir "$OUT/tensorboard"

step "trained actor -> HF"
run "$PY" convert_ckpt.py --direction mcore2hf --load-dir "$(latest_checkpoint "$OUT/ppo")/actor" \
  --save-dir "$OUT/actor_hf" --overwrite
