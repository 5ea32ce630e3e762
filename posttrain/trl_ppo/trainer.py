"""PPO with four megatron-core GPT models: ``pretrain_gpt.py --stage trl_ppo``.

One iteration is a sequence of named phases over a :class:`RolloutBatch`:

1. **generate** — the actor answers this rank's prompts (KV-cached, :mod:`posttrain.trl_ppo.rollout`);
2. **experience** — old log-probs (actor), reference log-probs, values (critic) and scores (reward model and/or a
   rule-based reward function), all from one forward each over ``[prompt | response]``; then KL-shaped rewards,
   advantages and returns through :mod:`posttrain.trl_ppo.core_algos` (whitening global over DP ranks);
3. **train** — ``--ppo-epochs`` passes over ``--ppo-mini-batch-size`` mini-batches: one actor step (clipped
   policy loss, optional entropy bonus, KL loss and ptx loss) and one critic step (clipped value loss) each,
   through megatron's forward-backward schedule in micro-batches.

Shapes: the trainer keeps sequences as ``[batch, prompt_len + response_len]`` with prompts left-padded and
responses right-padded; RL tensors are ``[batch, response_len]``. Token ``t`` of the response is predicted by the
logits at position ``prompt_len + t - 1``, and the critic's value for that token is read at the same position
(MindSpeed-LLM: ``logits[:, ctx-1:-1]``, ``values[:, ctx-1:-1]``).

Loss scaling (why results do not depend on DP size or micro-batching): each micro-batch's loss is its share of
the mini-batch loss, ``core_algos.agg_loss`` with token/sequence counts summed over every micro-batch and DP rank
of the mini-batch. Megatron's schedule divides each micro-batch loss by the number of micro-batches and DDP
averages gradients over DP ranks, so the loss handed to the schedule is multiplied by both; the gradient is then
exactly that of the mini-batch loss computed in one piece.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch

from posttrain.arguments import (ArgumentError, CheckpointArgs, LoggingArgs, OptimizerArgs, ParallelArgs,
                                 add_dataclass_args, dataclass_from_args)
from posttrain import parallel
from posttrain.trl_ppo import core_algos
from posttrain.trl_ppo.config import PPOArgs
from posttrain.trl_ppo.rollout import SamplingParams, generate


# ----------------------------------------------------------------------------------------------------------------
# Data carried between phases
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class RolloutBatch:
    """One rank's rollout and its experience.

    Attributes:
        prompt_ids: ``[batch, prompt_len]`` int64, left-padded. prompt_mask: ``[batch, prompt_len]`` 0/1.
        responses: ``[batch, response_len]`` int64, right-padded. response_mask: ``[batch, response_len]`` 0/1
            (1 up to and including the stop token).
        has_eos: ``[batch]`` bool. group_index: ``[batch]`` int64, the prompt each response answers.
        sampler_log_probs: ``[batch, response_len]`` the sampler's log-probs (diagnostics).
        old_log_probs, ref_log_probs, values: ``[batch, response_len]`` fp32 (values: critic at rollout).
        scores: ``[batch]`` fp32 sequence scores. rewards, advantages, returns: ``[batch, response_len]`` fp32.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    group_index: torch.Tensor
    sampler_log_probs: torch.Tensor
    old_log_probs: Optional[torch.Tensor] = None
    ref_log_probs: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None
    rewards: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def response_len(self) -> int:
        return self.responses.shape[1]

    def input_ids(self) -> torch.Tensor:
        """``[batch, prompt_len + response_len]``."""
        return torch.cat([self.prompt_ids, self.responses], dim=1)

    def attention_mask(self) -> torch.Tensor:
        """``[batch, prompt_len + response_len]`` 1 on real tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def select(self, rows: slice) -> "RolloutBatch":
        """The rows ``rows`` of every tensor."""
        values = {f.name: (getattr(self, f.name)[rows] if getattr(self, f.name) is not None else None)
                  for f in fields(self)}
        return RolloutBatch(**values)


@dataclass
class ModelSlot:
    """A model with its role; ``ddp``/``optimizer``/``scheduler`` only for trained models."""

    name: str
    model: torch.nn.Module
    checkpoint: str
    hf_config: dict
    ddp: Optional[torch.nn.Module] = None
    optimizer: Optional[object] = None
    scheduler: Optional[object] = None

    @property
    def runnable(self) -> torch.nn.Module:
        return self.ddp if self.ddp is not None else self.model


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm became NaN/inf."""


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------

class PPOTrainer:
    """Builds the four models and runs PPO iterations (see the module docstring)."""

    def __init__(self, ppo: PPOArgs, parallel_args: ParallelArgs, optim: OptimizerArgs, ckpt: CheckpointArgs,
                 logging_args: LoggingArgs):
        from posttrain.data.prompt_dataset import PromptDataset, PromptSampler
        from posttrain.distributed import initialize_distributed
        from posttrain.models.checkpoint import read_checkpoint_meta
        from posttrain.models.value_model import checkpoint_score_pooling
        from posttrain.training import MetricsLogger, Timer

        self.args, self.parallel_args, self.optim_args = ppo, parallel_args, optim
        self.ckpt_args, self.logging_args = ckpt, logging_args
        self.state = initialize_distributed(parallel_args.tensor_model_parallel_size,
                                            parallel_args.pipeline_model_parallel_size,
                                            parallel_args.expert_model_parallel_size, seed=parallel_args.seed)
        ppo.check_layout(self.state.data_parallel_size)

        # --- data
        self.dataset = PromptDataset(ppo.data_path)
        num_prompts = len(self.dataset) if ppo.max_samples is None else min(len(self.dataset), ppo.max_samples)
        if num_prompts < ppo.global_batch_size:
            raise ArgumentError(f"--data-path {ppo.data_path}: {num_prompts} prompts cannot fill one "
                                f"--global-batch-size of {ppo.global_batch_size}")
        self.sampler = PromptSampler(num_prompts, ppo.global_batch_size, parallel.dp_rank(), parallel.dp_world_size(),
                                     seed=parallel_args.seed)
        self.train_iters = ppo.train_iters or ppo.num_episodes * self.sampler.batches_per_epoch
        self.eval_dataset = PromptDataset(ppo.eval_data_path) if ppo.eval_data_path else None
        self.ptx_dataset = PromptDataset(ppo.pretrain_data_path) if ppo.pretrain_data_path else None

        # --- models
        actor_meta = read_checkpoint_meta(ppo.ref_model)
        if actor_meta.get("model_kind") != "causal_lm":
            raise ArgumentError(f"--ref-model {ppo.ref_model} is a {actor_meta.get('model_kind')} checkpoint; "
                                "the actor needs a causal LM")
        self.tokenizer_dir = ppo.ref_model
        self.eos_ids, self.pad_id = self._special_tokens(actor_meta)
        overrides = self._config_overrides()
        self.actor = self._build("actor", ppo.ref_model, actor_meta, "causal_lm", overrides, train=True)
        self.vocab_size = actor_meta["hf_config"]["vocab_size"]
        self.reference = self._build("reference", ppo.ref_model, actor_meta, "causal_lm", overrides, train=False)
        self.reward = None
        self.score_pooling = "last"
        if ppo.reward_model:
            reward_meta = read_checkpoint_meta(ppo.reward_model)
            if reward_meta.get("model_kind") != "value":
                raise ArgumentError(f"--reward-model {ppo.reward_model} is a {reward_meta.get('model_kind')} "
                                    "checkpoint; it needs a value head (convert_ckpt.py --model-kind value)")
            self._check_vocab("--reward-model", reward_meta)
            try:
                self.score_pooling = checkpoint_score_pooling(reward_meta)
            except ValueError as exc:
                raise ArgumentError(f"--reward-model {ppo.reward_model}: {exc}") from None
            self.reward = self._build("reward", ppo.reward_model, reward_meta, "value", overrides, train=False)
        critic_path = ppo.critic_model or ppo.reward_model or ppo.ref_model
        critic_meta = read_checkpoint_meta(critic_path)
        self._check_vocab("--critic-model", critic_meta)
        self.critic = self._build("critic", critic_path, critic_meta, "value", overrides, train=True,
                                  lr=ppo.critic_lr if ppo.critic_lr is not None else optim.lr)
        self.reward_function = _load_reward_function(ppo.reward_function) if ppo.reward_function else None
        self.ema = self._init_ema() if ppo.enable_ema else None

        # --- PPO state
        self.kl_ctl = core_algos.build_kl_controller("adaptive" if ppo.kl_target else "fixed", ppo.kl_coef,
                                                     target_kl=ppo.kl_target, horizon=ppo.kl_horizon)
        self.score_normalizer = core_algos.RunningMeanStd() if ppo.normalize_reward else None
        self.sampling = SamplingParams(max_new_tokens=ppo.max_new_tokens, do_sample=ppo.do_sample,
                                       temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p,
                                       stop_token_ids=self.eos_ids, pad_token_id=self.pad_id,
                                       ignore_eos=ppo.ignore_eos)
        self.iteration = 0
        self.skipped_prompts = 0
        if ckpt.load:
            self._load(ckpt.load)
        self.logger = MetricsLogger(ckpt.save, logging_args.tensorboard_dir, resume_iteration=self.iteration)
        self.timer = Timer()
        self._tokenizer = None

    # ------------------------------------------------------------------ set-up helpers
    def _special_tokens(self, meta: dict) -> tuple[list[int], int]:
        eos = self.dataset.eos_token_id
        pad = self.dataset.pad_token_id
        config = meta.get("hf_config", {})
        if eos is None:
            eos = config.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        eos_ids = [int(e) for e in eos_ids] + [int(t) for t in self.args.stop_token_ids]
        if pad is None:
            pad = config.get("pad_token_id")
        if pad is None:
            pad = eos_ids[0] if eos_ids else 0
        if not eos_ids:
            raise ArgumentError("no EOS id in the dataset metadata or the actor's config: give --stop-token-ids")
        return eos_ids, int(pad)

    def _config_overrides(self) -> dict:
        overrides = {}
        if self.optim_args.recompute_granularity:
            overrides.update(recompute_granularity=self.optim_args.recompute_granularity)
            if self.optim_args.recompute_granularity == "full":
                overrides.update(recompute_method=self.optim_args.recompute_method,
                                 recompute_num_layers=self.optim_args.recompute_num_layers)
        return overrides

    def _check_vocab(self, flag: str, meta: dict) -> None:
        vocab = meta.get("hf_config", {}).get("vocab_size")
        if vocab != self.vocab_size:
            raise ArgumentError(f"{flag}: vocabulary size {vocab} differs from the actor's {self.vocab_size} "
                                "(the models must share one tokenizer)")

    def _build(self, name: str, path: str, meta: dict, kind: str, overrides: dict, train: bool,
               lr: Optional[float] = None) -> ModelSlot:
        from posttrain.models.checkpoint import CheckpointError, load_model_checkpoint
        from posttrain.models.provider import build_model
        from posttrain.training import build_optimizer, wrap_ddp

        hf_config = meta["hf_config"]
        extra = dict(overrides)
        if kind == "causal_lm" and self.args.moe_aux_loss_coeff is not None and hf_config.get("num_local_experts",
                                                                                              hf_config.get("num_experts")):
            extra["moe_aux_loss_coeff"] = self.args.moe_aux_loss_coeff
        model = build_model(hf_config, kind, bf16=self.optim_args.bf16,
                            make_vocab_size_divisible_by=self.optim_args.make_vocab_size_divisible_by,
                            value_head_seed=self.parallel_args.seed, **extra)
        # a critic initialised from a causal LM keeps its fresh head; nothing else may be missing
        result = load_model_checkpoint(model, path, strict=meta.get("model_kind") == kind)
        missing = [k for k in result["missing_keys"] if not k.startswith("value_head")]
        if missing:
            raise CheckpointError(f"{path}: the {name} model's backbone is incomplete (missing {missing[:3]})")
        slot = ModelSlot(name=name, model=model, checkpoint=path, hf_config=hf_config)
        if train:
            slot.ddp = wrap_ddp(model, self.optim_args.use_distributed_optimizer)
            slot.optimizer, slot.scheduler = build_optimizer(slot.ddp, self.optim_args,
                                                             self.train_iters * self._steps_per_iteration(), lr=lr)
        else:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        return slot

    def _steps_per_iteration(self) -> int:
        mini = self.args.ppo_mini_batch_size or self.args.rollout_size
        return self.args.ppo_epochs * (self.args.rollout_size // mini)

    def _init_ema(self) -> dict:
        return {k: p.detach().clone().float() for k, p in self.actor.model.named_parameters()}

    def _update_ema(self) -> None:
        decay = self.args.ema_decay
        with torch.no_grad():
            for k, p in self.actor.model.named_parameters():
                self.ema[k].mul_(decay).add_(p.detach().float(), alpha=1 - decay)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer

    # ------------------------------------------------------------------ forward helpers
    def _micro_batches(self, batch: RolloutBatch) -> list[RolloutBatch]:
        mbs = self.args.micro_batch_size
        return [batch.select(slice(i, i + mbs)) for i in range(0, batch.batch_size, mbs)]

    def _model_inputs(self, mb: RolloutBatch):
        from posttrain.models.provider import build_attention_mask, position_ids_from_attention_mask

        mask = mb.attention_mask()
        return mb.input_ids(), position_ids_from_attention_mask(mask), build_attention_mask(mask)

    def _token_logits(self, output: torch.Tensor, start: int, end: int, temperature: float) -> torch.Tensor:
        """Logits at positions ``[start, end)`` as a fresh fp32 tensor ``[b, end - start, V/TP]`` divided by
        ``temperature``, padded vocabulary entries masked (fresh: the vocab-parallel kernels work in place)."""
        scaled = output[:, start:end, :].float().div(temperature).contiguous()
        return parallel.mask_padded_vocab(scaled, self.vocab_size)

    def _response_logits(self, output: torch.Tensor, mb: RolloutBatch) -> torch.Tensor:
        """``[b, response_len, V/TP]`` logits predicting the response tokens, divided by the temperature."""
        return self._token_logits(output, mb.prompt_len - 1, mb.prompt_len + mb.response_len - 1,
                                  self.args.temperature)

    def _forward_only(self, slot: ModelSlot, batch: RolloutBatch,
                      compute: Callable[[torch.Tensor, RolloutBatch], torch.Tensor], width: int) -> torch.Tensor:
        """Run ``slot`` over ``batch`` in micro-batches; ``compute(output, mb) -> [mb, width]`` on the last stage.

        Returns ``[batch, width]`` fp32 on every pipeline stage.
        """
        from posttrain.training import forward_backward

        micro = self._micro_batches(batch)

        def step(mb, model):
            ids, pos, mask = self._model_inputs(mb)
            output = model(ids, pos, mask)
            return output, lambda out: (torch.zeros(()), {"out": compute(out, mb).detach().float()})

        slot.runnable.eval()
        with torch.no_grad():
            results = forward_backward(slot.runnable, step, micro, seq_length=batch.prompt_len + batch.response_len,
                                       micro_batch_size=self.args.micro_batch_size, forward_only=True)
        local = torch.cat([r["out"] for r in results], 0) if results else None
        return parallel.broadcast_from_last_stage(local, (batch.batch_size, width), torch.float32)

    # ------------------------------------------------------------------ phase 1: generate
    def _prompts_for_iteration(self, iteration: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        indices = next(self.sampler)  # this rank's prompts; the sampler's position is checkpointed
        prompts, groups = [], []
        limit = self.args.max_prompt_length
        for i in indices:
            ids = self.dataset[int(i)]
            if ids.numel() > limit:
                if self.args.prompt_truncation == "skip":
                    self.skipped_prompts += 1
                    continue
                ids = ids[-limit:]
            for _ in range(self.args.n_samples_per_prompt):
                prompts.append(ids)
                groups.append(int(i))
        if not prompts:
            raise RuntimeError(f"iteration {iteration + 1}: every prompt of this rank's batch is longer than "
                               f"--max-prompt-length {limit} (--prompt-truncation skip)")
        return prompts, torch.tensor(groups, dtype=torch.long)

    def _sampling_generator(self, iteration: int, salt: int = 0) -> torch.Generator:
        seed = (self.parallel_args.seed * 1_000_003 + iteration * 10_007 + parallel.dp_rank() * 101 + salt) % (2 ** 62)
        return torch.Generator().manual_seed(seed)

    def generate_phase(self, prompts: list[torch.Tensor], groups: torch.Tensor, iteration: int,
                       sampling: Optional[SamplingParams] = None) -> RolloutBatch:
        """Generate responses for ``prompts`` in chunks of ``--rollout-batch-size``; pad into one batch."""
        from posttrain.data.prompt_dataset import pad_sequences

        sampling = sampling or self.sampling
        chunk = self.args.rollout_batch_size or len(prompts)
        generator = self._sampling_generator(iteration)
        pieces = []
        self.actor.runnable.eval()
        for start in range(0, len(prompts), chunk):
            ids, mask = pad_sequences(prompts[start:start + chunk], self.pad_id, side="left")
            out = generate(self.actor.runnable, ids, mask, sampling, self.vocab_size, generator)
            pieces.append((ids, mask, out))
        prompt_len = max(p[0].shape[1] for p in pieces)
        response_len = max(p[2].responses.shape[1] for p in pieces)

        def pad(t, width, value, left):
            extra = width - t.shape[1]
            if extra == 0:
                return t
            fill = torch.full((t.shape[0], extra), value, dtype=t.dtype)
            return torch.cat([fill, t] if left else [t, fill], dim=1)

        return RolloutBatch(
            prompt_ids=torch.cat([pad(p[0], prompt_len, self.pad_id, True) for p in pieces]),
            prompt_mask=torch.cat([pad(p[1], prompt_len, 0, True) for p in pieces]),
            responses=torch.cat([pad(p[2].responses, response_len, self.pad_id, False) for p in pieces]),
            response_mask=torch.cat([pad(p[2].response_mask, response_len, 0, False) for p in pieces]),
            sampler_log_probs=torch.cat([pad(p[2].sampler_log_probs, response_len, 0.0, False) for p in pieces]),
            has_eos=torch.cat([p[2].has_eos for p in pieces]),
            group_index=groups,
        )

    # ------------------------------------------------------------------ phase 2: experience
    def _log_probs_fn(self, output, mb):
        return parallel.vocab_parallel_log_probs(self._response_logits(output, mb), mb.responses)

    def _values_fn(self, output, mb):
        p, r = mb.prompt_len, mb.response_len
        return output[:, p - 1:p + r - 1].float()

    def _scores_fn(self, output, mb):
        from posttrain.models.value_model import pool_scores

        response_mask = torch.cat([torch.zeros_like(mb.prompt_mask), mb.response_mask], dim=1)
        return pool_scores(output.float(), mb.attention_mask(), response_mask, self.score_pooling)[:, None]

    def decode(self, batch: RolloutBatch) -> tuple[list[str], list[str]]:
        """Prompt and response texts of a batch (special tokens of the response dropped)."""
        tok = self.tokenizer
        prompts = [tok.decode(ids[m.bool()].tolist()) for ids, m in zip(batch.prompt_ids, batch.prompt_mask)]
        responses = [tok.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
                     for ids, m in zip(batch.responses, batch.response_mask)]
        return prompts, responses

    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """Sequence scores ``[batch]``: the reward model's score (at the last real token, or the mean over the
        response tokens when the reward checkpoint records ``score_pooling: response_mean``), plus the rule-based
        reward."""
        scores = torch.zeros(batch.batch_size)
        if self.reward is not None:
            scores += self._forward_only(self.reward, batch, self._scores_fn, 1)[:, 0]
        if self.reward_function is not None:
            prompts, responses = self.decode(batch)
            extra = torch.tensor([float(x) for x in self.reward_function(prompts, responses)], dtype=torch.float32)
            if extra.shape != scores.shape:
                raise RuntimeError(f"--reward-function returned {extra.numel()} scores for {scores.numel()} responses")
            scores += extra
        return scores

    def experience_phase(self, batch: RolloutBatch) -> dict:
        """Fill old/ref log-probs, values, scores, rewards, advantages and returns; return rollout metrics."""
        r = batch.response_len
        batch.old_log_probs = self._forward_only(self.actor, batch, self._log_probs_fn, r)
        batch.ref_log_probs = self._forward_only(self.reference, batch, self._log_probs_fn, r)
        batch.values = self._forward_only(self.critic, batch, self._values_fn, r) * batch.response_mask
        batch.scores = self.score(batch)
        reduce_fn = parallel.dp_reduce_fn()
        kl_coef = 0.0 if self.args.use_kl_loss else self.kl_ctl.value
        batch.rewards, reward_metrics = core_algos.compute_rewards(
            batch.scores, batch.old_log_probs, batch.ref_log_probs, batch.response_mask, kl_coef,
            kl_estimator=self.args.kl_estimator, kl_clamp=self.args.kl_clamp, has_eos=batch.has_eos,
            missing_eos_penalty=self.args.missing_eos_penalty, score_normalizer=self.score_normalizer,
            score_clip=self.args.reward_clip, reduce_fn=reduce_fn)
        batch.advantages, batch.returns = core_algos.compute_advantages(
            self.args.adv_estimator, response_mask=batch.response_mask, rewards=batch.rewards, values=batch.values,
            scores=batch.scores, group_index=batch.group_index, gamma=self.args.gamma, lam=self.args.lam,
            reduce_fn=reduce_fn)
        mask = batch.response_mask.float()
        kl_per_seq = (core_algos.kl_penalty(self.args.kl_estimator, batch.old_log_probs, batch.ref_log_probs)
                      * mask).sum(-1)
        logprob_gap = ((batch.old_log_probs - batch.sampler_log_probs).abs() * mask)
        # sums over this rank; made global (means over all DP ranks) in _global_means
        return {
            "sum/kl": kl_per_seq.sum(), "sum/score_mean": batch.scores.sum(),
            "sum/reward_mean": (batch.rewards * mask).sum(-1).sum(),
            "sum/response_length": mask.sum(), "sum/eos_frac": batch.has_eos.float().sum(),
            "count/seqs": torch.tensor(float(batch.batch_size)),
            # an exact integer fingerprint of the generated tokens, comparable across parallel layouts
            "sum/token_checksum": (batch.responses.double() * batch.response_mask
                                   * torch.arange(1, r + 1, dtype=torch.float64)).sum(),
            "max/rollout_logprob_gap": logprob_gap.max() if logprob_gap.numel() else torch.zeros(()),
            "info/non_score_reward": reward_metrics.get("non_score_reward", torch.zeros(())),
        }

    # ------------------------------------------------------------------ phase 3: train
    def _mini_batches(self, batch: RolloutBatch) -> list[RolloutBatch]:
        local_mini = (self.args.ppo_mini_batch_size or self.args.rollout_size) // parallel.dp_world_size()
        return [batch.select(slice(i, i + local_mini)) for i in range(0, batch.batch_size, local_mini)]

    def _global_counts(self, mini: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        counts = core_algos.loss_token_counts(mini.response_mask).double()
        counts = parallel.dp_all_reduce(counts)
        return counts[0], counts[1]

    def _train_model(self, slot: ModelSlot, mini: RolloutBatch, loss_of: Callable, extra_micro: list = ()) -> dict:
        """One optimiser step of ``slot`` on ``mini``; returns token-weighted metric sums of this rank."""
        from posttrain.training import forward_backward, optimizer_step, zero_grad

        micro = self._micro_batches(mini) + list(extra_micro)
        scale = len(micro) * parallel.dp_world_size()
        sums: dict[str, torch.Tensor] = {}

        def step(mb, model):
            ids, pos, mask = self._model_inputs(mb) if isinstance(mb, RolloutBatch) else mb["inputs"]
            output = model(ids, pos, mask)

            def loss_func(out):
                loss, metrics, weight = loss_of(out, mb)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * weight
                    sums["weight/" + key] = sums.get("weight/" + key, 0.0) + weight
                return loss * scale, {"loss": loss.detach()}

            return output, loss_func

        slot.runnable.train()
        zero_grad(slot.ddp, slot.optimizer)
        seq = mini.prompt_len + mini.response_len
        forward_backward(slot.runnable, step, micro, seq_length=seq, micro_batch_size=self.args.micro_batch_size,
                         forward_only=False)
        applied, grad_norm = optimizer_step(slot.ddp, slot.optimizer, slot.scheduler)
        if not math.isfinite(grad_norm) or not applied:
            raise NonFiniteLossError(f"{slot.name} gradient norm is {grad_norm}")
        # every DP rank sees the same global norm: weight 1/DP so the DP sum counts it once
        sums["grad_norm"] = grad_norm / parallel.dp_world_size()
        sums["weight/grad_norm"] = 1.0 / parallel.dp_world_size()
        return sums

    def _actor_loss(self, tokens: torch.Tensor, seqs: torch.Tensor, ptx_tokens: Optional[torch.Tensor]):
        args = self.args

        def loss_of(output, mb):
            if isinstance(mb, dict):  # a ptx micro-batch
                logits = self._token_logits(output, 0, output.shape[1] - 1, 1.0)
                log_probs = parallel.vocab_parallel_log_probs(logits, mb["labels"])
                loss, metrics = core_algos.compute_ptx_loss(log_probs, mb["mask"], args.ptx_coef,
                                                            global_token_count=ptx_tokens)
                return loss, metrics, float(mb["mask"].sum())
            logits = self._response_logits(output, mb)
            entropy = parallel.vocab_parallel_entropy(logits)
            log_probs = parallel.vocab_parallel_log_probs(logits, mb.responses)
            counts = dict(loss_agg_mode=args.loss_agg_mode, global_token_count=tokens, global_seq_count=seqs)
            loss, metrics = core_algos.compute_policy_loss(
                "vanilla", log_probs, mb.old_log_probs, mb.advantages, mb.response_mask, clip_ratio=args.clip_ratio,
                clip_ratio_low=args.clip_ratio_low, clip_ratio_high=args.clip_ratio_high,
                clip_ratio_c=args.clip_ratio_c, **counts)
            ent_loss, ent_metrics = core_algos.compute_entropy_loss(entropy, mb.response_mask, args.entropy_coef,
                                                                    **counts)
            metrics.update(ent_metrics)
            if args.entropy_coef:
                loss = loss + ent_loss
            if args.use_kl_loss:
                kl_loss, kl_metrics = core_algos.compute_kl_loss(
                    log_probs, mb.ref_log_probs, mb.response_mask, args.kl_loss_coef, args.kl_loss_type, **counts)
                loss = loss + kl_loss
                metrics.update(kl_metrics)
            return loss, metrics, float(mb.response_mask.sum())

        return loss_of

    def _critic_loss(self, tokens: torch.Tensor, seqs: torch.Tensor):
        args = self.args

        def loss_of(output, mb):
            values = self._values_fn(output, mb)
            loss, metrics = core_algos.compute_value_loss(
                values, mb.values, mb.returns, mb.response_mask, cliprange_value=args.cliprange_value,
                loss_agg_mode=args.loss_agg_mode, global_token_count=tokens, global_seq_count=seqs)
            metrics["value_mean"] = core_algos.masked_mean(values.detach(), mb.response_mask)
            return loss, metrics, float(mb.response_mask.sum())

        return loss_of

    def _ptx_micro_batches(self, iteration: int, mini_index: int, seq_len: int) -> tuple[list, torch.Tensor]:
        """Pretraining micro-batches for one actor step (as many as PPO micro-batches), ``seq_len`` tokens."""
        from posttrain.models.provider import build_attention_mask, position_ids_from_attention_mask

        local_mini = (self.args.ppo_mini_batch_size or self.args.rollout_size) // parallel.dp_world_size()
        count = local_mini // self.args.micro_batch_size
        mbs = self.args.micro_batch_size
        generator = self._sampling_generator(iteration, salt=7919 + mini_index)
        n = len(self.ptx_dataset)
        micro = []
        for _ in range(count):
            docs = [self.ptx_dataset[int(torch.randint(n, (1,), generator=generator))][:seq_len] for _ in range(mbs)]
            ids = torch.full((mbs, seq_len), self.pad_id, dtype=torch.long)
            mask = torch.zeros((mbs, seq_len), dtype=torch.long)
            for row, doc in enumerate(docs):
                ids[row, :doc.numel()] = doc
                mask[row, :doc.numel()] = 1
            micro.append({"inputs": (ids, position_ids_from_attention_mask(mask), build_attention_mask(mask)),
                          "labels": ids[:, 1:], "mask": mask[:, 1:] * mask[:, :-1]})
        tokens = parallel.dp_all_reduce(torch.tensor(float(sum(float(m["mask"].sum()) for m in micro))))
        return micro, tokens

    def train_phase(self, batch: RolloutBatch, iteration: int) -> tuple[dict, dict]:
        """``--ppo-epochs`` x mini-batches of actor and critic steps; returns (actor sums, critic sums)."""
        actor_sums: dict = {}
        critic_sums: dict = {}
        for _ in range(self.args.ppo_epochs):
            for index, mini in enumerate(self._mini_batches(batch)):
                tokens, seqs = self._global_counts(mini)
                extra, ptx_tokens = [], None
                if self.ptx_dataset is not None and self.args.ptx_coef > 0:
                    extra, ptx_tokens = self._ptx_micro_batches(iteration, index,
                                                                mini.prompt_len + mini.response_len)
                _merge(actor_sums, self._train_model(self.actor, mini, self._actor_loss(tokens, seqs, ptx_tokens),
                                                     extra))
                if self.ema is not None:
                    self._update_ema()
                _merge(critic_sums, self._train_model(self.critic, mini, self._critic_loss(tokens, seqs)))
        return actor_sums, critic_sums

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict:
        """Run iteration ``self.iteration + 1``; returns its metrics (floats, global over DP ranks)."""
        iteration = self.iteration
        start = time.perf_counter()
        with self.timer("generate"):
            prompts, groups = self._prompts_for_iteration(iteration)
            batch = self.generate_phase(prompts, groups, iteration)
        with self.timer("experience"):
            rollout_sums = self.experience_phase(batch)
        with self.timer("train"):
            actor_sums, critic_sums = self.train_phase(batch, iteration)
        metrics = self._summarise(batch, rollout_sums, actor_sums, critic_sums)
        self.kl_ctl.update(metrics["kl"], n_steps=self.args.global_batch_size * self.args.n_samples_per_prompt)
        times = self.timer.pop()
        metrics.update({f"time/{k}": v for k, v in times.items()})
        metrics["time/iteration"] = time.perf_counter() - start
        metrics["perf/generated_tokens_per_s"] = metrics["response_length"] * metrics["num_sequences"] / max(
            times.get("generate", 1e-9), 1e-9)
        bad = [k for k in ("pg_loss", "vf_loss", "kl", "score_mean") if not math.isfinite(metrics[k])]
        if bad:
            raise NonFiniteLossError(f"{', '.join(bad)} is not finite")
        self.iteration += 1
        self._last_batch = batch
        return metrics

    def _summarise(self, batch, rollout_sums, actor_sums, critic_sums) -> dict:
        sums = {k: float(v) for k, v in rollout_sums.items() if k.startswith(("sum/", "count/"))}
        keys = sorted(sums)
        total = parallel.dp_all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        sums = dict(zip(keys, total.tolist()))
        gap = parallel.dp_all_reduce(rollout_sums["max/rollout_logprob_gap"].reshape(1).float().clone(),
                                     op=torch.distributed.ReduceOp.MAX)
        n = sums["count/seqs"]
        metrics = {
            "kl": sums["sum/kl"] / n, "kl_coef": float(self.kl_ctl.value), "score_mean": sums["sum/score_mean"] / n,
            "reward_mean": sums["sum/reward_mean"] / n, "response_length": sums["sum/response_length"] / n,
            "eos_frac": sums["sum/eos_frac"] / n, "num_sequences": n,
            "rollout/logprob_gap_max": float(gap.item()),
            "rollout/token_checksum": sums["sum/token_checksum"],
            "lr": float(self.actor.optimizer.param_groups[0]["lr"]),
            "critic_lr": float(self.critic.optimizer.param_groups[0]["lr"]),
        }
        for role, part in (("actor", actor_sums), ("critic", critic_sums)):
            names = sorted(k for k in part if not k.startswith("weight/"))
            values = torch.tensor([[part[k], part["weight/" + k]] for k in names], dtype=torch.float64)
            values = parallel.dp_all_reduce(values.reshape(-1)).reshape(-1, 2) if names else values
            for name, (num, den) in zip(names, values.tolist()):
                key = f"{role}_{name}" if name == "grad_norm" else name
                metrics[key] = num / den if den else float("nan")
        if "explained_variance" in metrics:
            metrics["explained_var"] = metrics.pop("explained_variance")
        return parallel.broadcast_object_from_last_stage(metrics)

    # ------------------------------------------------------------------ logging
    ACTOR_KEYS = ["pg_loss", "abs_pg_loss", "ppo_ratio", "ppo_ratio_clamped", "pg_clipfrac", "approx_kl", "entropy",
                  "kl", "kl_coef", "score_mean", "reward_mean", "response_length", "lr"]
    CRITIC_KEYS = ["vf_loss", "vf_clipfrac", "explained_var", "value_mean"]

    def log(self, metrics: dict) -> None:
        it = self.iteration
        if it % self.logging_args.log_interval and it != self.train_iters:
            self.logger.log(it, metrics)
            return
        head = f" iteration {it:6d}/{self.train_iters:6d} |"
        actor = head + " actor |" + "".join(f" {k}: {_fmt(metrics.get(k))} |" for k in self.ACTOR_KEYS)
        critic = head + " critic |" + "".join(f" {k}: {_fmt(metrics.get(k))} |" for k in self.CRITIC_KEYS)
        times = " | ".join(f"{k[5:]} {v:.2f}s" for k, v in metrics.items() if k.startswith("time/"))
        perf = head + f" time | {times} | generated tokens/s {metrics['perf/generated_tokens_per_s']:.1f}"
        lines = [actor, critic, perf]
        if "eval/score_mean" in metrics:
            lines.append(head + " validation |" + "".join(f" {k[5:]}: {_fmt(v)} |" for k, v in metrics.items()
                                                          if k.startswith("eval/")))
        self.logger.log(it, metrics, lines)
        interval = self.args.sample_interval
        if interval and (it % interval == 0 or it == 1) and self.logger.enabled:
            prompts, responses = self.decode(self._last_batch.select(slice(0, 1)))
            self.logger.text("sample", f" sample (iteration {it}) | prompt: {prompts[0]!r} | response: "
                                       f"{responses[0]!r} | score: {float(self._last_batch.scores[0]):.4f}", it)

    # ------------------------------------------------------------------ validation
    def evaluate(self) -> dict:
        """Mean score of greedy responses to the first ``--eval-samples`` held-out prompts (all DP ranks)."""
        n = min(self.args.eval_samples, len(self.eval_dataset))
        dp, rank = parallel.dp_world_size(), parallel.dp_rank()
        indices = list(range(rank, n, dp))
        total = torch.zeros(3, dtype=torch.float64)
        if indices:
            prompts = [self.eval_dataset[i][-self.args.max_prompt_length:] for i in indices]
            greedy = SamplingParams(max_new_tokens=self.args.max_new_tokens, do_sample=False,
                                    stop_token_ids=self.eos_ids, pad_token_id=self.pad_id)
            chunk = self.args.rollout_batch_size or len(prompts)
            for s in range(0, len(prompts), chunk):
                part = prompts[s:s + chunk]
                # the experience forwards need micro-batch-sized pieces: pad the chunk with repeats
                pad_to = -(-len(part) // self.args.micro_batch_size) * self.args.micro_batch_size
                padded = part + [part[-1]] * (pad_to - len(part))
                batch = self.generate_phase(padded, torch.arange(len(padded)), 0, sampling=greedy)
                scores = self.score(batch)[:len(part)]
                total += torch.tensor([scores.sum().item(), float(len(part)),
                                       batch.response_mask[:len(part)].sum().item()], dtype=torch.float64)
        # every DP rank must take part in the reductions even without prompts
        total = parallel.dp_all_reduce(total)
        return {"eval/score_mean": total[0].item() / max(total[1].item(), 1.0),
                "eval/response_length": total[2].item() / max(total[1].item(), 1.0)}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write actor, critic (models, optimisers, schedulers), RNG and trainer state atomically."""
        from posttrain.models.checkpoint import save_model_checkpoint
        from posttrain.training import (begin_checkpoint, commit_checkpoint, is_rank0, rng_state,
                                        save_optimizer_state)

        root = Path(self.ckpt_args.save)
        tmp = begin_checkpoint(root, self.iteration)
        for slot in (self.actor, self.critic):
            save_model_checkpoint(slot.model, tmp / slot.name, hf_config=slot.hf_config,
                                  tokenizer_dir=self.tokenizer_dir, iteration=self.iteration)
            save_optimizer_state(tmp / f"{slot.name}_optim", slot.ddp, slot.optimizer, slot.scheduler)
        if self.ema is not None:
            self._save_ema(tmp / "actor_ema")
        torch.save(rng_state(), tmp / f"rng_rank{torch.distributed.get_rank():05d}.pt")
        if is_rank0():
            state = {"iteration": self.iteration, "sampler": self.sampler.state_dict(),
                     "kl_controller": self.kl_ctl.state_dict(), "skipped_prompts": self.skipped_prompts,
                     "score_normalizer": self.score_normalizer.state_dict() if self.score_normalizer else None,
                     "args": {k: v for k, v in vars(self.args).items()}}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
        return commit_checkpoint(root, self.iteration, tmp)

    def _save_ema(self, directory: Path) -> None:
        from posttrain.models.checkpoint import save_model_checkpoint

        current = {k: p.detach().clone() for k, p in self.actor.model.named_parameters()}
        with torch.no_grad():
            for k, p in self.actor.model.named_parameters():
                p.copy_(self.ema[k].to(p.dtype))
            save_model_checkpoint(self.actor.model, directory, hf_config=self.actor.hf_config,
                                  tokenizer_dir=self.tokenizer_dir, iteration=self.iteration)
            for k, p in self.actor.model.named_parameters():
                p.copy_(current[k])

    def _load(self, root: str) -> None:
        from posttrain.models.checkpoint import load_model_checkpoint
        from posttrain.training import iteration_dir, load_optimizer_state, read_latest_iteration, set_rng_state

        iteration = read_latest_iteration(root)
        if iteration is None:
            raise ArgumentError(f"--load {root}: no latest_checkpointed_iteration.txt (not a PPO checkpoint)")
        directory = iteration_dir(root, iteration)
        state = json.loads((directory / "trainer_state.json").read_text())
        for slot in (self.actor, self.critic):
            load_model_checkpoint(slot.model, directory / slot.name)
            if not self.ckpt_args.no_load_optim:
                load_optimizer_state(directory / f"{slot.name}_optim", slot.ddp, slot.optimizer, slot.scheduler)
        if self.ema is not None and (directory / "actor_ema").exists():
            current = {k: p.detach().clone() for k, p in self.actor.model.named_parameters()}
            load_model_checkpoint(self.actor.model, directory / "actor_ema")
            self.ema = self._init_ema()
            with torch.no_grad():
                for k, p in self.actor.model.named_parameters():
                    p.copy_(current[k])
        rng_file = directory / f"rng_rank{torch.distributed.get_rank():05d}.pt"
        if not self.ckpt_args.no_load_rng and rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        self.iteration = int(state["iteration"])
        self.sampler.load_state_dict(state["sampler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.skipped_prompts = int(state.get("skipped_prompts", 0))
        if self.score_normalizer is not None and state.get("score_normalizer"):
            self.score_normalizer.load_state_dict(state["score_normalizer"])

    # ------------------------------------------------------------------ main loop
    def train(self) -> dict:
        """Run iterations up to ``train_iters``; save, validate and log on their intervals."""
        from posttrain.training import is_rank0

        last_metrics: dict = {}
        save_interval = self.ckpt_args.save_interval
        eval_interval = self.args.eval_interval
        if is_rank0():
            print(f" trl_ppo: {self.train_iters} iterations, {self.state.world_size} ranks (TP "
                  f"{self.state.tensor_model_parallel_size}, PP {self.state.pipeline_model_parallel_size}, DP "
                  f"{self.state.data_parallel_size}), rollout {self.args.rollout_size} sequences/iteration, "
                  f"starting at iteration {self.iteration}"
                  + (f", reward score pooling {self.score_pooling}" if self.reward is not None else ""), flush=True)
        while self.iteration < self.train_iters:
            metrics = self.step()
            it = self.iteration
            if self.eval_dataset is not None and ((eval_interval and it % eval_interval == 0)
                                                  or it == self.train_iters):
                metrics.update(self.evaluate())
            self.log(metrics)
            last_metrics = metrics
            if self.ckpt_args.save and save_interval and it % save_interval == 0:
                self.save()
        if self.ckpt_args.save and (not save_interval or self.iteration % save_interval):
            self.save()
        self.logger.close()
        return last_metrics


def _merge(into: dict, part: dict) -> None:
    for k, v in part.items():
        into[k] = into.get(k, 0.0) + v


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _load_reward_function(spec: str) -> Callable:
    """Import ``module:callable`` (a file path ``path/to/file.py:callable`` works too).

    Raises:
        ArgumentError: malformed spec, module or attribute not found.
    """
    if ":" not in spec:
        raise ArgumentError(f"--reward-function {spec!r} must look like module:callable")
    module_name, attr = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            import importlib.util

            loaded = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if loaded is None:
                raise ImportError(module_name)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        fn = getattr(module, attr)
    except (ImportError, AttributeError, FileNotFoundError) as exc:
        raise ArgumentError(f"--reward-function {spec}: {exc}") from None
    if not callable(fn):
        raise ArgumentError(f"--reward-function {spec} is not callable")
    return fn


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------

ARG_GROUPS = ((PPOArgs, "PPO"), (ParallelArgs, "parallelism"), (OptimizerArgs, "optimiser"),
              (CheckpointArgs, "checkpoints"), (LoggingArgs, "logging"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain_gpt.py --stage trl_ppo",
                                     description="PPO with actor, reference, critic and reward megatron models")
    for cls, title in ARG_GROUPS:
        add_dataclass_args(parser, cls, title)
    return parser


def main(argv=None) -> int:
    """Parse flags, train, exit 0; one-line ``error: ...`` and exit 1 on bad input or a non-finite loss."""
    from posttrain.data.errors import DataError
    from posttrain.distributed import DistributedSetupError
    from posttrain.models.checkpoint import CheckpointError
    from posttrain.training import fail

    args = build_parser().parse_args(argv)
    try:
        ppo, par, opt, ck, lg = (dataclass_from_args(cls, args) for cls, _ in ARG_GROUPS)
        trainer = PPOTrainer(ppo, par, opt, ck, lg)
        trainer.train()
    except (ArgumentError, DistributedSetupError, CheckpointError, DataError, FileNotFoundError, ValueError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except NonFiniteLossError as exc:
        it = trainer.iteration + 1 if "trainer" in locals() else "?"
        fail(f"iteration {it}: {exc}; stopping (the last saved checkpoint is kept)")
    finally:
        from posttrain.distributed import destroy_distributed

        destroy_distributed()
    return 0
