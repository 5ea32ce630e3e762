"""PPO with four megatron-core GPT models: ``pretrain_gpt.py --stage trl_ppo``.

One iteration is a sequence of named phases over a :class:`~posttrain.trl_ppo.experience.RolloutBatch`:

1. **generate** — the actor answers this rank's prompts (KV-cached, :mod:`posttrain.trl_ppo.rollout`);
2. **experience** — old log-probs (actor), reference log-probs, values (critic) and scores (reward model and/or a
   rule-based reward function), all from one forward each over ``[prompt | response]``; then KL-shaped rewards,
   advantages and returns through :mod:`posttrain.trl_ppo.core_algos` (whitening global over DP ranks);
3. **train** — ``--ppo-epochs`` passes over ``--ppo-mini-batch-size`` mini-batches: one actor step (policy loss,
   optional entropy bonus, KL loss and ptx loss) and one critic step (clipped value loss) each, through
   megatron's forward-backward schedule in micro-batches.

Only ``--adv-estimator gae`` reads values: with the critic-free estimators (``grpo``, ``dr_grpo``, ``rloo``,
``reinforce_plus_plus``) there is no critic, no value forward and no critic step.

Loss scaling (why results do not depend on DP size or micro-batching): each micro-batch's loss is its share of
the mini-batch loss, ``core_algos.agg_loss`` with token/sequence counts summed over every micro-batch and DP rank
of the mini-batch (:class:`~posttrain.trl_ppo.experience.GlobalCounts`). Megatron's schedule divides each
micro-batch loss by the number of micro-batches and DDP averages gradients over DP ranks, so the loss handed to
the schedule is multiplied by both; the gradient is then exactly that of the mini-batch loss computed in one piece.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict
from functools import partial
from typing import Optional

import torch
from transformers import AutoTokenizer

from posttrain import parallel
from posttrain.arguments import (
    ArgumentError,
    CheckpointArgs,
    LoggingArgs,
    ModelArgs,
    OptimizerArgs,
    ParallelArgs,
    add_dataclass_args,
    dataclass_from_args,
)
from posttrain.data.prompt_dataset import PromptDataset, PromptSampler, pad_sequences
from posttrain.distributed import initialize_distributed
from posttrain.errors import TrainingDivergedError
from posttrain.models.output_head import chosen_token_log_probs
from posttrain.training import (
    MetricAccumulator,
    MetricsLogger,
    ModelSlot,
    Timer,
    TrainingCheckpoint,
    forward_backward,
    is_rank0,
    optimizer_step,
    print_rank0,
    release_grad_buffers,
    restore_grad_buffers,
    run_stage,
    zero_grad,
)
from posttrain.trl_ppo import core_algos
from posttrain.trl_ppo.config import PPOArgs
from posttrain.trl_ppo.experience import GlobalCounts, PtxMicroBatch, RolloutBatch
from posttrain.trl_ppo.forwards import PPOForwards, _forward
from posttrain.trl_ppo.models import PPOModels, RewardFunction
from posttrain.trl_ppo.reporting import PPOReporting
from posttrain.trl_ppo.rollout import SamplingParams, generate
from posttrain.trl_ppo.state import PPOState

ARG_GROUPS = ((PPOArgs, "PPO"), (ModelArgs, "model"), (ParallelArgs, "parallelism"), (OptimizerArgs, "optimiser"),
              (CheckpointArgs, "checkpoints"), (LoggingArgs, "logging"))


class PPOTrainer(PPOForwards, PPOState, PPOReporting):
    """Builds the models and runs PPO iterations (see the module docstring).

    Everything that can fail on bad input happens in ``__init__``, before anything is written: flags, data, the
    reward function (probed), checkpoints and the parallel layout.

    Raises (from ``__init__``):
        InputError subclasses: ArgumentError, DataError, CheckpointError, RewardFunctionError, DistributedSetupError.
    """

    def __init__(self, ppo: PPOArgs, model_args: ModelArgs, par: ParallelArgs, optim: OptimizerArgs,
                 ckpt: CheckpointArgs, logging_args: LoggingArgs):
        self.args, self.model_args, self.par, self.optim_args = ppo, model_args, par, optim
        self.ckpt_args, self.logging_args = ckpt, logging_args
        self.state = initialize_distributed(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                                            par.expert_model_parallel_size, seed=par.seed)
        self.device = self.state.device
        ppo.check_layout(self.state.data_parallel_size)

        # --- data
        self.dataset = PromptDataset(ppo.data_path)
        num_prompts = len(self.dataset) if ppo.max_samples is None else min(len(self.dataset), ppo.max_samples)
        if num_prompts < ppo.global_batch_size:
            raise ArgumentError(f"--data-path {ppo.data_path}: {num_prompts} prompts cannot fill one "
                                f"--global-batch-size of {ppo.global_batch_size}")
        self.sampler = PromptSampler(num_prompts, ppo.global_batch_size, parallel.dp_rank(), parallel.dp_world_size(),
                                     seed=par.seed)
        self.train_iters = ppo.train_iters or ppo.num_episodes * self.sampler.batches_per_epoch
        self.eval_dataset = PromptDataset(ppo.eval_data_path) if ppo.eval_data_path else None
        self.ptx_dataset = PromptDataset(ppo.pretrain_data_path) if ppo.pretrain_data_path else None
        self.reward_function = (RewardFunction(ppo.reward_function, columns=self.dataset.extra_columns)
                                if ppo.reward_function else None)
        if self.reward_function is not None:
            if self.eval_dataset is not None:
                self.reward_function.check_columns(self.eval_dataset.extra_columns,
                                                   f"--eval-data-path {ppo.eval_data_path}")
            self.reward_function.probe()

        # --- models
        self.models = PPOModels(ppo, model_args, optim, seed=par.seed,
                                train_steps=self.train_iters * self.steps_per_iteration,
                                eos_token_id=self.dataset.eos_token_id, pad_token_id=self.dataset.pad_token_id)
        self.actor, self.reference, self.critic, self.reward = (self.models.actor, self.models.reference,
                                                                self.models.critic, self.models.reward)
        self.vocab_size, self.pad_id = self.models.vocab_size, self.models.pad_id
        self.tokenizer_dir = ppo.ref_model
        self.ema = self._copy_actor_weights() if ppo.enable_ema else None

        # --- PPO state
        self.kl_ctl = core_algos.build_kl_controller("adaptive" if ppo.kl_target else "fixed", ppo.kl_coef,
                                                     target_kl=ppo.kl_target, horizon=ppo.kl_horizon)
        self.score_normalizer = core_algos.RunningMeanStd() if ppo.normalize_reward else None
        self.sampling = SamplingParams(max_new_tokens=ppo.max_new_tokens, do_sample=ppo.do_sample,
                                       temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p,
                                       stop_token_ids=self.models.eos_ids, pad_token_id=self.pad_id,
                                       ignore_eos=ppo.ignore_eos)
        self.iteration = 0
        self.skipped_prompts = 0
        # per-prompt scores of the run's first validation, the baseline of eval/score_gain (PPOReporting.evaluate)
        self.eval_baseline: Optional[dict] = None
        self.checkpoint = TrainingCheckpoint(ckpt.save, tokenizer_dir=self.tokenizer_dir,
                                             keep_last=ckpt.ckpt_keep_last, save_optim=not ckpt.no_save_optim,
                                             save_rng=not ckpt.no_save_rng)
        self.checkpoint.remove_stale()
        if ckpt.load:
            self._load(ckpt.load)
        self.logger = MetricsLogger(ckpt.save, logging_args, resume_iteration=self.iteration, enabled=is_rank0(),
                                    config={title: asdict(obj) for (_, title), obj in zip(ARG_GROUPS,
                                                                                         self._arg_objects())})
        self.timer = Timer()
        if ppo.offload_grad_buffers:
            for slot in self.models.trained:
                release_grad_buffers(slot.ddp)
        self._tokenizer = None
        self._last_batch: Optional[RolloutBatch] = None
        self._eval_samples: list[dict] = []

    def _arg_objects(self):
        return self.args, self.model_args, self.par, self.optim_args, self.ckpt_args, self.logging_args

    @property
    def steps_per_iteration(self) -> int:
        """Optimiser steps of each trained model per iteration: PPO epochs x mini-batches."""
        mini = self.args.ppo_mini_batch_size or self.args.rollout_size
        return self.args.ppo_epochs * (self.args.rollout_size // mini)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer

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
            raise ArgumentError(f"iteration {iteration + 1}: every prompt of this rank's batch is longer than "
                                f"--max-prompt-length {limit} (--prompt-truncation skip)")
        return prompts, torch.tensor(groups, dtype=torch.long, device="cpu")

    def _seed(self, iteration: int, salt: int = 0) -> int:
        """The seed of an iteration's random draws: from ``--seed``, the iteration and the DP rank (identical on
        the TP / PP ranks of one DP rank, and after a resume)."""
        return (self.par.seed * 1_000_003 + iteration * 10_007 + parallel.dp_rank() * 101 + salt) % (2 ** 62)

    def generate_phase(self, prompts: list[torch.Tensor], groups: torch.Tensor, iteration: int,
                       sampling: Optional[SamplingParams] = None, salt: int = 0) -> RolloutBatch:
        """Generate responses for ``prompts`` in chunks of ``--rollout-batch-size``; one batch on the device.

        Sampling draws from a generator on the device seeded by :meth:`_seed` (``iteration``, ``salt``)."""
        sampling = sampling or self.sampling
        chunk = self.args.rollout_batch_size or len(prompts)
        generator = torch.Generator(device=self.device).manual_seed(self._seed(iteration, salt))
        pieces = []
        self.actor.runnable.eval()
        for start in range(0, len(prompts), chunk):
            ids, mask = pad_sequences(prompts[start:start + chunk], self.pad_id, side="left")
            ids, mask = ids.to(self.device), mask.to(self.device)
            out = generate(self.actor.runnable, ids, mask, sampling, self.vocab_size, generator)
            pieces.append(RolloutBatch(prompt_ids=ids, prompt_mask=mask, responses=out.responses,
                                       response_mask=out.response_mask, sampler_log_probs=out.sampler_log_probs,
                                       has_eos=out.has_eos,
                                       group_index=groups[start:start + chunk].to(self.device)))
        return RolloutBatch.concat(pieces, self.pad_id)

    def dynamic_sampling_phase(self, iteration: int) -> tuple[RolloutBatch, MetricAccumulator]:
        """DAPO's dynamic sampling: draw, score and keep only informative prompt groups (scores not all equal),
        drawing further prompt batches until this rank's batch is full or ``--dynamic-sampling-max-rounds`` is
        reached; a batch still short is filled with uninformative groups. All DP ranks draw the same number of
        rounds (the prompt sampler stays in step). Returns the scored batch and the draw counts."""
        n = self.args.n_samples_per_prompt
        target = self.sampler.local_batch_size * n  # rows
        kept: list[RolloutBatch] = []
        spare: list[RolloutBatch] = []
        kept_rows = drawn_rows = rounds = 0
        while True:
            prompts, groups = self._prompts_for_iteration(iteration)
            groups = groups + rounds * len(self.dataset)  # a prompt drawn again in a later round is a new group
            batch = self.generate_phase(prompts, groups, iteration, salt=rounds)
            batch.scores = self.score(batch, where=f"at iteration {iteration + 1}")
            keep = core_algos.informative_groups(batch.scores, batch.group_index)
            kept.append(batch.select(keep))
            spare.append(batch.select(~keep))
            kept_rows += int(keep.sum())
            drawn_rows += batch.batch_size
            rounds += 1
            shortfall = torch.tensor([max(target - kept_rows, 0)], dtype=torch.float64, device=self.device)
            parallel.dp_all_reduce(shortfall, op=torch.distributed.ReduceOp.MAX)
            if shortfall.item() == 0 or rounds >= self.args.dynamic_sampling_max_rounds:
                break
        pieces = [p for p in kept + spare if p.batch_size]
        batch = RolloutBatch.concat(pieces, self.pad_id).select(slice(0, target))
        acc = MetricAccumulator()
        acc.max("dynamic_sampling/rounds", rounds)
        acc.total("dynamic_sampling/drawn_groups", drawn_rows / n)
        acc.total("dynamic_sampling/kept_groups", min(kept_rows, target) / n)
        acc.total("dynamic_sampling/filled_groups", max(target - kept_rows, 0) / n)
        return batch, acc

    # ------------------------------------------------------------------ phase 2: experience
    def decode(self, batch: RolloutBatch) -> tuple[list[str], list[str]]:
        """Prompt and response texts of a batch (special tokens of the response dropped)."""
        tok = self.tokenizer
        prompt_ids, prompt_mask = batch.prompt_ids.cpu(), batch.prompt_mask.cpu().bool()
        response_ids, response_mask = batch.responses.cpu(), batch.response_mask.cpu().bool()
        prompts = [tok.decode(ids[m].tolist()) for ids, m in zip(prompt_ids, prompt_mask)]
        responses = [tok.decode(ids[m].tolist(), skip_special_tokens=True)
                     for ids, m in zip(response_ids, response_mask)]
        return prompts, responses

    def score(self, batch: RolloutBatch, where: str = "", dataset: Optional[PromptDataset] = None) -> torch.Tensor:
        """Sequence scores ``[batch]`` on the device: the reward model's score (pooled as its checkpoint says)
        plus the rule-based reward, which also receives the extra columns it asks for from the rows of ``dataset``
        (default: the training prompts) that ``batch.group_index`` names (modulo the dataset size: dynamic sampling
        offsets later rounds by multiples of it)."""
        scores = torch.zeros(batch.batch_size, device=self.device)
        if self.reward is not None:
            scores += self._forward_only(self.reward, batch, self._scores, 1)[:, 0]
        if self.reward_function is not None:
            prompts, responses = self.decode(batch)
            dataset = dataset if dataset is not None else self.dataset
            rows = (batch.group_index.cpu() % len(dataset)).tolist() if self.reward_function.columns else []
            scores += self.reward_function(prompts, responses, dataset.extras(rows), where=where).to(self.device)
        return scores

    def experience_phase(self, batch: RolloutBatch, iteration: int) -> MetricAccumulator:
        """Fill old/ref log-probs, values, scores, rewards, advantages and returns; return the rollout metrics
        (this rank's sums, made global in :meth:`_summarise`)."""
        r = batch.response_len
        if self.args.old_log_probs == "rollout":  # TRL: the sampling forward's log-probs are the old ones
            batch.old_log_probs = batch.sampler_log_probs * batch.response_mask
        else:
            batch.old_log_probs = self._forward_only(self.actor, batch, self._log_probs, r)
        batch.ref_log_probs = self._forward_only(self.reference, batch, self._log_probs, r)
        if self.critic is not None:
            batch.values = self._forward_only(self.critic, batch, self._values, r) * batch.response_mask
        if batch.scores is None:  # dynamic sampling scores while it draws
            batch.scores = self.score(batch, where=f"at iteration {iteration + 1}")
        args = self.args
        scores = batch.scores
        lengths = batch.response_mask.sum(-1)
        if args.overlong_buffer_len:
            scores = scores + core_algos.overlong_penalty(lengths, args.max_new_tokens, args.overlong_buffer_len,
                                                          args.overlong_penalty_factor)
        batch.loss_mask = (core_algos.overlong_filter_mask(batch.response_mask, batch.has_eos)
                           if args.overlong_filter else batch.response_mask)
        mismatch = core_algos.rollout_mismatch_metrics(batch.old_log_probs, batch.sampler_log_probs,
                                                       batch.response_mask)
        if args.rollout_correction != "none":
            batch.token_weights, correction = core_algos.rollout_correction_weights(
                batch.old_log_probs, batch.sampler_log_probs, batch.response_mask, args.rollout_correction,
                args.tis_cap)
            mismatch.update(correction)
        reduce_fn = parallel.dp_reduce_fn()
        kl_coef = 0.0 if args.use_kl_loss else self.kl_ctl.value
        batch.rewards, _ = core_algos.compute_rewards(
            scores, batch.old_log_probs, batch.ref_log_probs, batch.response_mask, kl_coef,
            kl_estimator=self.args.kl_estimator, kl_clamp=self.args.kl_clamp, has_eos=batch.has_eos,
            missing_eos_penalty=self.args.missing_eos_penalty, score_normalizer=self.score_normalizer,
            score_clip=self.args.reward_clip, reduce_fn=reduce_fn)
        batch.advantages, batch.returns = core_algos.compute_advantages(
            self.args.adv_estimator, response_mask=batch.response_mask, rewards=batch.rewards, values=batch.values,
            scores=scores, group_index=batch.group_index, gamma=self.args.gamma, lam=self.args.lam,
            reduce_fn=reduce_fn)

        mask = batch.response_mask.float()
        n = float(batch.batch_size)
        kl_per_seq = (core_algos.kl_penalty(self.args.kl_estimator, batch.old_log_probs, batch.ref_log_probs)
                      * mask).sum(-1)
        logprob_gap = (batch.old_log_probs - batch.sampler_log_probs).abs() * mask
        acc = MetricAccumulator()
        acc.sum_mean("kl", kl_per_seq.sum(), n)
        acc.sum_mean("score_mean", batch.scores.sum(), n)
        acc.sum_mean("reward_mean", (batch.rewards * mask).sum(-1).sum(), n)
        acc.sum_mean("response_length", mask.sum(), n)
        acc.sum_mean("eos_frac", batch.has_eos.float().sum(), n)
        acc.total("num_sequences", n)
        # an exact integer fingerprint of the generated tokens, comparable across parallel layouts
        positions = torch.arange(1, r + 1, dtype=torch.float64, device=self.device)
        acc.total("rollout/token_checksum", (batch.responses.double() * batch.response_mask * positions).sum())
        acc.max("rollout/logprob_gap_max", logprob_gap.max() if logprob_gap.numel() else 0.0)
        tokens = float(mask.sum())
        for name, value in mismatch.items():
            if name.endswith("_max"):
                acc.max(f"rollout/{name}", value)
            else:
                acc.mean(f"rollout/{name}", value, tokens)
        if args.overlong_buffer_len:
            acc.sum_mean("overlong_penalty_mean", (scores - batch.scores).sum(), n)
        if args.overlong_filter:
            acc.sum_mean("overlong_filtered_frac", (~batch.has_eos).float().sum(), n)
        return acc

    # ------------------------------------------------------------------ phase 3: train
    def _mini_batches(self, batch: RolloutBatch) -> list[RolloutBatch]:
        local_mini = (self.args.ppo_mini_batch_size or self.args.rollout_size) // parallel.dp_world_size()
        return batch.split(local_mini)

    def _global_counts(self, mini: RolloutBatch, ptx: list[PtxMicroBatch]) -> GlobalCounts:
        counts = parallel.dp_all_reduce(core_algos.loss_token_counts(mini.loss_mask).double())
        ptx_tokens = None
        if ptx:
            local = torch.tensor(float(sum(float(m.loss_mask.sum()) for m in ptx)), device=self.device)
            ptx_tokens = parallel.dp_all_reduce(local)
        return GlobalCounts(tokens=counts[0], seqs=counts[1], ptx_tokens=ptx_tokens)

    def _actor_loss(self, counts: GlobalCounts, mb: RolloutBatch, output: torch.Tensor, fused: bool = False):
        """Policy loss (+ entropy bonus, + KL loss) of one PPO micro-batch: ``(loss, metrics, weight)``.

        ``output`` is the logits ``[b, response_len, V/TP]`` of :meth:`_lm_forward`, or with ``fused`` the hidden
        states ``[response_len, b, h]`` of :meth:`_lm_hidden_forward` (see :meth:`_fused_output_head`)."""
        args = self.args
        if fused:
            log_probs, entropy = chosen_token_log_probs(output.transpose(0, 1), self._output_weight(), mb.responses,
                                                        args.temperature)
        else:
            logits = self._response_logits(output)
            # before the log-probs (their kernel works in place); without an entropy bonus it is a metric only,
            # and computed without autograd it holds no softmax-sized tensors until the backward
            with torch.set_grad_enabled(torch.is_grad_enabled() and bool(args.entropy_coef)):
                entropy = parallel.vocab_parallel_entropy(logits)
            log_probs = parallel.vocab_parallel_log_probs(logits, mb.responses)
        agg = dict(loss_agg_mode=args.loss_agg_mode, global_token_count=counts.tokens, global_seq_count=counts.seqs,
                   norm_length=args.max_new_tokens)
        loss, metrics = core_algos.compute_policy_loss(
            args.policy_loss, log_probs, mb.old_log_probs, mb.advantages, mb.loss_mask, clip_ratio=args.clip_ratio,
            clip_ratio_low=args.clip_ratio_low, clip_ratio_high=args.clip_ratio_high, clip_ratio_c=args.clip_ratio_c,
            token_weights=mb.token_weights, **agg)
        entropy_loss, entropy_metrics = core_algos.compute_entropy_loss(entropy, mb.loss_mask, args.entropy_coef,
                                                                        **agg)
        metrics.update(entropy_metrics)
        if args.entropy_coef:
            loss = loss + entropy_loss
        if args.use_kl_loss:
            kl_loss, kl_metrics = core_algos.compute_kl_loss(log_probs, mb.ref_log_probs, mb.loss_mask,
                                                             args.kl_loss_coef, args.kl_loss_type, **agg)
            loss = loss + kl_loss
            metrics.update(kl_metrics)
        return loss, metrics, float(mb.loss_mask.sum())

    def _ptx_loss(self, counts: GlobalCounts, mb: PtxMicroBatch, output: torch.Tensor):
        """Pretraining cross-entropy of one ptx micro-batch: ``(loss, metrics, weight)``."""
        logits = parallel.mask_padded_vocab(output[:, :-1, :].float().contiguous(), self.vocab_size)
        log_probs = parallel.vocab_parallel_log_probs(logits, mb.labels)
        loss, metrics = core_algos.compute_ptx_loss(log_probs, mb.loss_mask, self.args.ptx_coef,
                                                    global_token_count=counts.ptx_tokens)
        return loss, metrics, float(mb.loss_mask.sum())

    def _critic_loss(self, counts: GlobalCounts, mb: RolloutBatch, output: torch.Tensor):
        """Clipped value loss of one micro-batch: ``(loss, metrics, weight)``."""
        values = self._values(output, mb)
        loss, metrics = core_algos.compute_value_loss(
            values, mb.values, mb.returns, mb.loss_mask, cliprange_value=self.args.cliprange_value,
            loss_agg_mode=self.args.loss_agg_mode, global_token_count=counts.tokens, global_seq_count=counts.seqs,
            norm_length=self.args.max_new_tokens)
        return loss, metrics, float(mb.loss_mask.sum())

    def _train_step(self, slot: ModelSlot, micro: list, seq_length: int, acc: MetricAccumulator) -> None:
        """One optimiser step of ``slot`` over ``micro`` (triples of micro-batch, forward ``(model, mb) -> output``
        and loss method ``(mb, output) -> (loss, metrics, weight)``); metrics go to ``acc`` weighted by tokens.

        Raises:
            TrainingDivergedError: the gradient norm is not finite.
        """
        scale = len(micro) * parallel.dp_world_size()

        def step(item, model):
            mb, forward, loss_method = item
            output = forward(model, mb)

            def loss_func(out):
                loss, metrics, weight = loss_method(mb, out)
                acc.means(metrics, weight)
                return loss * scale, {"loss": loss.detach()}

            return output, loss_func

        slot.runnable.train()
        restore_grad_buffers(slot.ddp)  # (a no-op when they are held: --no-offload-grad-buffers)
        zero_grad(slot.ddp, slot.optimizer)
        forward_backward(slot.runnable, step, micro, seq_length=seq_length,
                         micro_batch_size=self.args.micro_batch_size, forward_only=False)
        lr = float(slot.optimizer.param_groups[0]["lr"])  # this step's LR: the scheduler moves it after the step
        applied, grad_norm = optimizer_step(slot.optimizer, slot.scheduler)
        if self.args.offload_grad_buffers:
            release_grad_buffers(slot.ddp)
        if not math.isfinite(grad_norm) or not applied:
            raise TrainingDivergedError(f"iteration {self.iteration + 1}: {slot.name} gradient norm is {grad_norm}")
        # every DP rank holds the same global norm and LR: weight 1/DP so the DP sum counts them once
        dp = parallel.dp_world_size()
        acc.sum_mean(f"{slot.name}_grad_norm", grad_norm / dp, 1.0 / dp)
        acc.sum_mean("lr" if slot.name == "actor" else f"{slot.name}_lr", lr / dp, 1.0 / dp)

    def _ptx_micro_batches(self, iteration: int, mini_index: int, seq_len: int) -> list[PtxMicroBatch]:
        """Pretraining micro-batches for one actor step (as many as PPO micro-batches), ``seq_len`` tokens."""
        local_mini = (self.args.ppo_mini_batch_size or self.args.rollout_size) // parallel.dp_world_size()
        mbs = self.args.micro_batch_size
        generator = torch.Generator(device="cpu").manual_seed(self._seed(iteration, salt=7919 + mini_index))
        n = len(self.ptx_dataset)
        micro = []
        for _ in range(local_mini // mbs):
            docs = [self.ptx_dataset[int(torch.randint(n, (1,), generator=generator, device="cpu"))]
                    for _ in range(mbs)]
            micro.append(PtxMicroBatch.from_documents(docs, seq_len, self.pad_id, self.device))
        return micro

    def train_phase(self, batch: RolloutBatch, iteration: int) -> tuple[MetricAccumulator, MetricAccumulator]:
        """``--ppo-epochs`` x mini-batches of actor and critic steps; returns their metrics."""
        actor_acc, critic_acc = MetricAccumulator(), MetricAccumulator()
        mbs = self.args.micro_batch_size
        for _ in range(self.args.ppo_epochs):
            for index, mini in enumerate(self._mini_batches(batch)):
                seq_length = mini.prompt_len + mini.response_len
                ptx = []
                if self.ptx_dataset is not None and self.args.ptx_coef > 0:
                    ptx = self._ptx_micro_batches(iteration, index, seq_length)
                counts = self._global_counts(mini, ptx)
                fused = self._fused_output_head()
                forward = self._lm_hidden_forward if fused else self._lm_forward
                actor_micro = ([(mb, forward, partial(self._actor_loss, counts, fused=fused))
                                for mb in mini.split(mbs)]
                               + [(mb, _forward, partial(self._ptx_loss, counts)) for mb in ptx])
                self._train_step(self.actor, actor_micro, seq_length, actor_acc)
                if self.ema is not None:
                    self._update_ema()
                if self.critic is not None:
                    critic_micro = [(mb, _forward, partial(self._critic_loss, counts)) for mb in mini.split(mbs)]
                    self._train_step(self.critic, critic_micro, seq_length, critic_acc)
        return actor_acc, critic_acc

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict:
        """Run iteration ``self.iteration + 1``; returns its metrics (floats, global over DP ranks)."""
        iteration = self.iteration
        start = time.perf_counter()
        sampling_acc = None
        with self.timer("generate"):
            if self.args.dynamic_sampling:
                batch, sampling_acc = self.dynamic_sampling_phase(iteration)
            else:
                prompts, groups = self._prompts_for_iteration(iteration)
                batch = self.generate_phase(prompts, groups, iteration)
        with self.timer("experience"):
            rollout_acc = self.experience_phase(batch, iteration)
        with self.timer("train"):
            actor_acc, critic_acc = self.train_phase(batch, iteration)
        metrics = self._summarise(rollout_acc, actor_acc, critic_acc)
        if sampling_acc is not None:
            metrics.update(sampling_acc.reduce(parallel.dp_all_reduce,
                                               partial(parallel.dp_all_reduce, op=torch.distributed.ReduceOp.MAX)))
        self.kl_ctl.update(metrics["kl"], n_steps=self.args.global_batch_size * self.args.n_samples_per_prompt)
        times = self.timer.pop()
        metrics.update({f"time/{k}": v for k, v in times.items()})
        metrics["time/iteration"] = time.perf_counter() - start
        metrics["perf/generated_tokens_per_s"] = metrics["response_length"] * metrics["num_sequences"] / max(
            times.get("generate", 1e-9), 1e-9)
        # (a non-finite loss shows as a non-finite gradient norm in _train_step; a loss metric can be nan legitimately
        # when --overlong-filter leaves no token in the loss)
        bad = [k for k in ("kl", "score_mean") if not math.isfinite(metrics[k])]
        if bad:
            raise TrainingDivergedError(f"iteration {iteration + 1}: {', '.join(bad)} is not finite")
        self.iteration += 1
        self._last_batch = batch
        return metrics

    def _summarise(self, rollout: MetricAccumulator, actor: MetricAccumulator, critic: MetricAccumulator) -> dict:
        dp_sum, dp_max = parallel.dp_all_reduce, partial(parallel.dp_all_reduce, op=torch.distributed.ReduceOp.MAX)
        metrics = rollout.reduce(dp_sum, dp_max)
        metrics.update(kl_coef=float(self.kl_ctl.value))
        metrics.update(actor.reduce(dp_sum))
        if self.critic is not None:
            metrics.update(critic.reduce(dp_sum))
        if "explained_variance" in metrics:
            metrics["explained_var"] = metrics.pop("explained_variance")
        return parallel.broadcast_object_from_last_stage(metrics)

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "kl_controller": self.kl_ctl.state_dict(),
                "skipped_prompts": self.skipped_prompts, "eval_baseline": self.eval_baseline,
                "score_normalizer": self.score_normalizer.state_dict() if self.score_normalizer else None,
                "args": {title: asdict(obj) for (_, title), obj in zip(ARG_GROUPS, self._arg_objects())}}

    # ------------------------------------------------------------------ main loop
    def train(self) -> dict:
        """Validate before the first update, run iterations up to ``train_iters``; save, validate and log on their
        intervals. Returns the last iteration's metrics."""
        last_metrics: dict = {}
        save_interval, eval_interval = self.ckpt_args.save_interval, self.args.eval_interval
        print_rank0(f" trl_ppo: {self.train_iters} iterations, {self.state.world_size} ranks (TP "
                    f"{self.state.tensor_model_parallel_size}, PP {self.state.pipeline_model_parallel_size}, DP "
                    f"{self.state.data_parallel_size}), rollout {self.args.rollout_size} sequences/iteration, "
                    f"starting at iteration {self.iteration}"
                    + (f", reward score pooling {self.models.score_pooling}" if self.reward is not None else ""))
        if self.eval_dataset is not None and self.iteration == 0 and not self.args.skip_eval_at_start:
            metrics = self.evaluate()
            self.logger.log(0, metrics, [self._eval_line(0, metrics)])
            self._log_evaluation()
        while self.iteration < self.train_iters:
            metrics = self.step()
            it = self.iteration
            evaluated = self.eval_dataset is not None and ((eval_interval and it % eval_interval == 0)
                                                           or it == self.train_iters)
            if evaluated:
                metrics.update(self.evaluate())
            self.log(metrics)
            if evaluated:
                self._log_evaluation()
            last_metrics = metrics
            if self.ckpt_args.save and save_interval and it % save_interval == 0:
                self.save()
        if self.ckpt_args.save and (not save_interval or self.iteration % save_interval):
            self.save()
        self.logger.close()
        return last_metrics





# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``--stage trl_ppo`` command line (flags generated from :data:`ARG_GROUPS`)."""
    parser = argparse.ArgumentParser(prog="pretrain_gpt.py --stage trl_ppo",
                                     description="PPO with actor, reference, critic and reward megatron models")
    for cls, title in ARG_GROUPS:
        add_dataclass_args(parser, cls, title)
    return parser


def main(argv=None) -> int:
    """``pretrain_gpt.py --stage trl_ppo``: 0 on success; one ``error: ...`` line and 1 on bad input or divergence."""
    def run(args: argparse.Namespace) -> None:
        PPOTrainer(*(dataclass_from_args(cls, args) for cls, _ in ARG_GROUPS)).train()

    return run_stage(build_parser(), run, argv)
