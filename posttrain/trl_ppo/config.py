"""Flags of ``pretrain_gpt.py --stage trl_ppo`` (MindSpeed-LLM / Megatron names where they exist).

Batch vocabulary:

* ``--global-batch-size`` G: prompts per PPO iteration over all data-parallel ranks (each rank takes G / DP);
* ``--n-samples-per-prompt`` n: responses per prompt, so an iteration's rollout holds G x n sequences;
* ``--rollout-batch-size``: sequences a rank generates at once (bounds the KV cache), default all of them;
* ``--ppo-mini-batch-size``: sequences per optimiser step (over all DP ranks), default G x n (one step per epoch,
  as MindSpeed-LLM); ``--ppo-epochs`` passes over the rollout;
* ``--micro-batch-size``: sequences per forward/backward on a rank (gradient accumulation inside a mini-batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from posttrain.arguments import ArgumentError, arg, check_range
from posttrain.trl_ppo import core_algos

# the choices are the registries' keys: a formula registered in core_algos is a flag value at once
KL_ESTIMATORS = list(core_algos.kl_estimator_names())
ADV_ESTIMATORS = list(core_algos.adv_estimator_names())
POLICY_LOSSES = list(core_algos.policy_loss_names())
LOSS_AGG_MODES = list(core_algos.LOSS_AGG_MODES)
ROLLOUT_CORRECTIONS = list(core_algos.ROLLOUT_CORRECTION_MODES)
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
CRITIC_ESTIMATORS = ("gae",)
"""Estimators that read the critic's values; with any other no critic is built or trained (verl ``use_critic``
follows the estimator the same way; TRL's GRPO and OpenRLHF's group estimators have none either)."""
SEQUENCE_POLICY_LOSSES = ("gspo", "gspo_token")
OLD_LOG_PROB_SOURCES = ("recompute", "rollout")


@dataclass(kw_only=True)
class PPOArgs:
    """Models, data, rollout and PPO hyper-parameters."""

    # models
    ref_model: str = arg(help="actor and reference checkpoint (causal LM, converted with convert_ckpt.py)")
    reward_model: Optional[str] = arg(None, "reward checkpoint (value head); also initialises the critic")
    critic_model: Optional[str] = arg(None, "critic checkpoint (default: --reward-model, else the actor with a fresh "
                                            "value head); only --adv-estimator gae has a critic")
    reward_function: Optional[str] = arg(None, "rule-based reward 'module:callable' or 'file.py:callable', called "
                                               "as fn(prompts: list[str], responses: list[str], **columns) -> "
                                               "list[float], columns being the dataset's extra columns "
                                               "(preprocess_data.py --extra-columns) its signature names; added to "
                                               "the reward model's score, or used alone without --reward-model. "
                                               "Runs the named Python code: pass only code you trust")
    # data
    data_path: str = arg(help="prompt dataset prefix written by preprocess_data.py (PPOAlpacaStyleInstructionHandler)")
    eval_data_path: Optional[str] = arg(None, "held-out prompt dataset prefix for validation reward")
    eval_interval: int = arg(0, "with --eval-data-path: validate every N iterations and after the last one "
                                "(0: only after the last)")
    eval_samples: int = arg(64, "held-out prompts scored per validation")
    skip_eval_at_start: bool = arg(False, "with --eval-data-path: no validation before the first update "
                                          "(iteration 0)")
    eval_do_sample: bool = arg(False, "validate with sampled responses (--temperature/--top-k/--top-p) instead of "
                                      "greedy ones")
    pretrain_data_path: Optional[str] = arg(None, "dataset prefix of pretraining documents for --ptx-coef")
    max_samples: Optional[int] = arg(None, "use only the first N prompts")
    # schedule and batches
    train_iters: Optional[int] = arg(None, "PPO iterations (default: from --num-episodes)")
    num_episodes: int = arg(1, "passes over the prompt set, when --train-iters is not given")
    micro_batch_size: int = arg(1, "sequences per forward/backward on one rank")
    global_batch_size: int = arg(8, "prompts per PPO iteration over all data-parallel ranks")
    rollout_batch_size: Optional[int] = arg(None, "sequences generated at once on a rank (default: the whole "
                                                  "local rollout)")
    ppo_mini_batch_size: Optional[int] = arg(None, "sequences per optimiser step over all DP ranks (default: the "
                                                   "whole rollout). With the whole rollout and one --ppo-epochs, "
                                                   "every step starts at the rollout's own policy and values, so "
                                                   "--clip-ratio and --cliprange-value never act; use several "
                                                   "mini-batches or epochs for PPO's clipping to matter")
    ppo_epochs: int = arg(1, "passes over each rollout; with 1 and the default --ppo-mini-batch-size (one step "
                             "per iteration) --clip-ratio and --cliprange-value never act")
    n_samples_per_prompt: int = arg(1, "responses per prompt (group estimators need > 1)")
    critic_lr: Optional[float] = arg(None, "critic learning rate (default: --lr; unused without a critic)")
    # rollout
    max_prompt_length: int = arg(256, "longest prompt in tokens")
    prompt_truncation: str = arg("left", "longer prompts: keep their last tokens, or skip them",
                                 choices=["left", "skip"])
    max_new_tokens: int = arg(128, "response budget in tokens")
    do_sample: bool = arg(False, "sample responses (default: greedy)")
    temperature: float = arg(1.0, "sampling temperature; the training forward divides logits by it too")
    top_k: int = arg(0, "top-k sampling (0: off)")
    top_p: float = arg(1.0, "nucleus sampling (1.0: off)")
    stop_token_ids: List[int] = arg(default_factory=list, help="token ids that end a response besides EOS")
    ignore_eos: bool = arg(False, "generate --max-new-tokens tokens for every prompt, stop tokens included "
                                  "(vLLM's ignore_eos; for benchmarks on equal work)")
    # rewards and advantages
    kl_coef: float = arg(0.3, "initial KL coefficient (MindSpeed-LLM default 0.3; TRL 0.05)")
    kl_estimator: str = arg("k1", "per-token KL estimator in the reward", choices=KL_ESTIMATORS)
    kl_clamp: Optional[float] = arg(None, "clamp the per-token KL to [-x, x] nats")
    kl_target: Optional[float] = arg(None, "adaptive KL controller target (Ziegler et al. 2019); default fixed")
    kl_horizon: int = arg(10000, "adaptive KL controller horizon")
    use_kl_loss: bool = arg(False, "KL as a loss term instead of in the reward (verl use_kl_loss)")
    kl_loss_coef: float = arg(0.001, "coefficient of the KL loss")
    kl_loss_type: str = arg("low_var_kl", "estimator of the KL loss", choices=KL_ESTIMATORS)
    missing_eos_penalty: Optional[float] = arg(None, "subtracted from the score of responses without EOS")
    normalize_reward: bool = arg(False, "normalise scores by running mean/std over all ranks")
    reward_clip: Optional[float] = arg(None, "clip scores (after normalisation) to [-x, x]")
    adv_estimator: str = arg("gae", "advantage estimator", choices=ADV_ESTIMATORS)
    policy_loss: str = arg("vanilla", "policy loss (vanilla: PPO's clipped surrogate with dual-clip and "
                                      "clip-higher options)", choices=POLICY_LOSSES)
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")
    # losses
    clip_ratio: float = arg(0.2, "PPO clip range epsilon (acts from an iteration's second optimiser step on: "
                                 "see --ppo-epochs)")
    clip_ratio_low: Optional[float] = arg(None, "lower clip epsilon (default --clip-ratio)")
    clip_ratio_high: Optional[float] = arg(None, "upper clip epsilon (default --clip-ratio)")
    clip_ratio_c: Optional[float] = arg(None, "dual-clip bound for negative advantages (e.g. 3.0; off by default)")
    cliprange_value: float = arg(0.2, "value clip range (acts from an iteration's second optimiser step on: see "
                                      "--ppo-epochs)")
    loss_agg_mode: Optional[str] = arg(None, "how token losses are averaged (default: token-mean; seq-mean-token-mean "
                                             "with --policy-loss gspo/gspo_token; seq-mean-token-sum-norm divides "
                                             "by --max-new-tokens, Dr. GRPO)", choices=LOSS_AGG_MODES)
    entropy_coef: float = arg(0.0, "entropy bonus coefficient")
    ptx_coef: float = arg(0.0, "pretraining (ptx) loss coefficient, with --pretrain-data-path")
    dynamic_sampling: bool = arg(False, "DAPO dynamic sampling: drop prompt groups whose scores are all equal and "
                                        "draw more prompts until the batch is full (group estimators)")
    dynamic_sampling_max_rounds: int = arg(4, "with --dynamic-sampling: rollout rounds per iteration at most; "
                                              "a batch still short after them is filled with uninformative groups")
    overlong_buffer_len: int = arg(0, "DAPO overlong reward shaping: penalise responses longer than "
                                      "--max-new-tokens minus this many tokens, linearly (0: off)")
    overlong_penalty_factor: float = arg(1.0, "the penalty at --max-new-tokens tokens, with --overlong-buffer-len")
    overlong_filter: bool = arg(False, "DAPO overlong filtering: responses cut by --max-new-tokens (no stop "
                                       "token) are left out of the losses")
    rollout_correction: str = arg("none", "importance weights for the sampler/trainer log-prob mismatch: tis "
                                          "(truncated at --tis-cap) or mis (masked above --tis-cap)",
                                  choices=ROLLOUT_CORRECTIONS)
    tis_cap: float = arg(2.0, "cap of --rollout-correction tis/mis weights")
    old_log_probs: str = arg("recompute", "where PPO's old log-probs come from: recompute (a forward of the actor "
                                          "over the rollout, as verl and OpenRLHF do) or rollout (the sampler's "
                                          "log-probs of the tokens it drew, as TRL's PPOTrainer takes them; one "
                                          "actor forward fewer per iteration, the same numbers up to rounding where "
                                          "the rollout runs the training weights in the training precision)",
                             choices=OLD_LOG_PROB_SOURCES)
    offload_grad_buffers: bool = arg(True, "free the actor's and critic's DDP gradient buffers between their "
                                           "optimiser steps (megatron-core's offload_grad_buffers; re-allocated "
                                           "zeroed at the next step): the other models run without them, one fp32 "
                                           "copy of each trained model less outside its own step")
    moe_aux_loss_coeff: Optional[float] = arg(None, "MoE router load-balancing loss coefficient (MoE actors)")
    enable_ema: bool = arg(False, "keep an exponential moving average of the actor's weights (saved beside it)")
    ema_decay: float = arg(0.992, "EMA decay per optimiser step")
    sample_interval: int = arg(5, "print a sample prompt/response every N iterations (0: never)")
    log_samples: int = arg(4, "rows (prompt, response, score, reward) written to <save>/samples.jsonl and "
                              "TensorBoard every --log-interval iterations, and per validation (0: none)")
    max_iteration_failures: int = arg(0, "iterations with a non-finite loss tolerated before stopping")

    def __post_init__(self):
        positive = ("micro_batch_size", "global_batch_size", "ppo_epochs", "n_samples_per_prompt", "max_new_tokens",
                    "max_prompt_length", "num_episodes", "eval_samples", "kl_horizon")
        for name in positive:
            check_range(_flag(name), getattr(self, name), ge=1)
        for name in ("train_iters", "rollout_batch_size", "ppo_mini_batch_size", "max_samples"):
            check_range(_flag(name), getattr(self, name), ge=1)
        for name in ("eval_interval", "sample_interval", "max_iteration_failures", "log_samples", "top_k"):
            check_range(_flag(name), getattr(self, name), ge=0)
        if self.reward_model is None and self.reward_function is None:
            raise ArgumentError("give --reward-model, --reward-function, or both")
        if self.ptx_coef > 0 and not self.pretrain_data_path:
            raise ArgumentError("--ptx-coef needs --pretrain-data-path")
        if self.loss_agg_mode is None:
            self.loss_agg_mode = "seq-mean-token-mean" if self.policy_loss in SEQUENCE_POLICY_LOSSES else "token-mean"
        if self.dynamic_sampling and self.adv_estimator not in GROUP_ESTIMATORS:
            raise ArgumentError(f"--dynamic-sampling needs a group estimator (--adv-estimator "
                                f"{'/'.join(GROUP_ESTIMATORS)}), not {self.adv_estimator}")
        check_range("--dynamic-sampling-max-rounds", self.dynamic_sampling_max_rounds, ge=1)
        check_range("--overlong-buffer-len", self.overlong_buffer_len, ge=0, lt=self.max_new_tokens)
        check_range("--overlong-penalty-factor", self.overlong_penalty_factor, ge=0.0)
        check_range("--tis-cap", self.tis_cap, gt=0.0)
        if self.old_log_probs == "rollout" and self.rollout_correction != "none":
            raise ArgumentError(f"--rollout-correction {self.rollout_correction} weighs the trainer's recomputed "
                                f"log-probs against the sampler's: it needs --old-log-probs recompute")
        if self.critic_model is not None and not self.uses_critic:
            raise ArgumentError(f"--critic-model: --adv-estimator {self.adv_estimator} has no critic (only "
                                f"{'/'.join(CRITIC_ESTIMATORS)} reads values)")
        if self.adv_estimator in GROUP_ESTIMATORS and self.n_samples_per_prompt < 2:
            raise ArgumentError(f"--adv-estimator {self.adv_estimator} needs --n-samples-per-prompt >= 2")
        # coefficients, checked where the flags are parsed (before anything is built or written)
        check_range("--temperature", self.temperature, gt=0.0)
        check_range("--top-p", self.top_p, gt=0.0, le=1.0)
        check_range("--gamma", self.gamma, ge=0.0, le=1.0)
        check_range("--lam", self.lam, ge=0.0, le=1.0)
        check_range("--clip-ratio", self.clip_ratio, gt=0.0, lt=1.0)
        check_range("--clip-ratio-low", self.clip_ratio_low, ge=0.0, lt=1.0)
        check_range("--clip-ratio-high", self.clip_ratio_high, ge=0.0)
        check_range("--clip-ratio-c", self.clip_ratio_c, gt=1.0)
        check_range("--cliprange-value", self.cliprange_value, gt=0.0)
        check_range("--kl-coef", self.kl_coef, ge=0.0)
        check_range("--kl-target", self.kl_target, gt=0.0)
        check_range("--kl-clamp", self.kl_clamp, gt=0.0)
        check_range("--kl-loss-coef", self.kl_loss_coef, ge=0.0)
        check_range("--entropy-coef", self.entropy_coef, ge=0.0)
        check_range("--ptx-coef", self.ptx_coef, ge=0.0)
        check_range("--missing-eos-penalty", self.missing_eos_penalty, ge=0.0)
        check_range("--reward-clip", self.reward_clip, gt=0.0)
        check_range("--critic-lr", self.critic_lr, ge=0.0)
        check_range("--moe-aux-loss-coeff", self.moe_aux_loss_coeff, ge=0.0)
        check_range("--ema-decay", self.ema_decay, gt=0.0, lt=1.0)

    @property
    def uses_critic(self) -> bool:
        """Whether the advantage estimator reads critic values (:data:`CRITIC_ESTIMATORS`)."""
        return self.adv_estimator in CRITIC_ESTIMATORS

    @property
    def rollout_size(self) -> int:
        """Sequences per iteration over all ranks (G x n)."""
        return self.global_batch_size * self.n_samples_per_prompt

    def check_layout(self, dp_size: int) -> None:
        """Validate the batch sizes against the data-parallel size.

        Raises:
            ArgumentError: naming the flag that does not divide.
        """
        if self.global_batch_size % dp_size:
            raise ArgumentError(f"--global-batch-size {self.global_batch_size} is not divisible by the data-parallel "
                                f"size {dp_size}")
        mini = self.ppo_mini_batch_size or self.rollout_size
        if self.rollout_size % mini:
            raise ArgumentError(f"--ppo-mini-batch-size {mini} does not divide the rollout of "
                                f"{self.rollout_size} sequences (--global-batch-size x --n-samples-per-prompt)")
        if mini % (dp_size * self.micro_batch_size):
            raise ArgumentError(f"--ppo-mini-batch-size {mini} is not divisible by data-parallel size {dp_size} x "
                                f"--micro-batch-size {self.micro_batch_size}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
