"""Console and file reporting and held-out validation of the PPO trainer (a mixin of
:class:`posttrain.trl_ppo.trainer.PPOTrainer`, which owns the attributes used here: ``args``, ``logger``,
``eval_dataset``, ``eval_baseline``, the model slots and the phases ``generate_phase``, ``score``,
``_forward_only``).

* :meth:`PPOReporting.log`: one record per iteration to ``metrics.jsonl`` / TensorBoard / W&B and, every
  ``--log-interval`` iterations, the actor, critic and time lines plus ``--log-samples`` rows of
  ``samples.jsonl``;
* :meth:`PPOReporting.evaluate`: validation on ``--eval-samples`` held-out prompts (score mean and standard error,
  the paired score gain over the run's first validation, response length, EOS fraction, KL to the reference).
"""
from __future__ import annotations

import math

import torch

from posttrain import parallel
from posttrain.training import MetricAccumulator, is_rank0
from posttrain.trl_ppo import core_algos
from posttrain.trl_ppo.experience import RolloutBatch
from posttrain.trl_ppo.rollout import SamplingParams

EVAL_SEED_SALT = 104_729
"""Offsets the seed of sampled validation rollouts from the training rollout of the same iteration."""


class PPOReporting:
    """Logging and validation methods of :class:`~posttrain.trl_ppo.trainer.PPOTrainer`."""

    # ------------------------------------------------------------------ logging
    ACTOR_KEYS = ["pg_loss", "abs_pg_loss", "ppo_ratio", "ppo_ratio_clamped", "pg_clipfrac", "approx_kl", "entropy",
                  "kl", "kl_coef", "score_mean", "reward_mean", "response_length", "lr"]
    CRITIC_KEYS = ["vf_loss", "vf_clipfrac", "explained_var", "vpred_mean", "critic_lr"]

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
        lines = [actor, critic, perf] if self.critic is not None else [actor, perf]
        if "eval/score_mean" in metrics:
            lines.append(self._eval_line(it, metrics))
        self.logger.log(it, metrics, lines)
        batch = self._last_batch
        if self.args.log_samples and batch is not None:
            self.logger.samples(it, "train", self._sample_rows(batch, self.args.log_samples))
        interval = self.args.sample_interval
        if interval and (it % interval == 0 or it == 1) and is_rank0() and batch is not None:
            prompts, responses = self.decode(batch.select(slice(0, 1)))
            print(f" sample (iteration {it}) | prompt: {prompts[0]!r} | response: {responses[0]!r} | score: "
                  f"{float(batch.scores[0]):.4f}", flush=True)

    @staticmethod
    def _eval_line(iteration: int, metrics: dict) -> str:
        return (f" iteration {iteration:6d} | validation |"
                + "".join(f" {k[5:]}: {_fmt(v)} |" for k, v in metrics.items() if k.startswith("eval/")))

    def _sample_rows(self, batch: RolloutBatch, n: int) -> list[dict]:
        rows = batch.select(slice(0, n))
        prompts, responses = self.decode(rows)
        mask = rows.response_mask.float()
        rewards = (rows.rewards * mask).sum(-1).tolist() if rows.rewards is not None else [None] * len(prompts)
        return [{"prompt": p, "response": r, "score": float(s), "reward": w, "response_length": int(length)}
                for p, r, s, w, length in zip(prompts, responses, rows.scores.tolist(), rewards,
                                              mask.sum(-1).tolist())]

    # ------------------------------------------------------------------ validation
    def evaluate(self) -> dict:
        """Validation on the first ``--eval-samples`` held-out prompts, dealt over the DP ranks.

        Returns:
            ``eval/score_mean`` and ``eval/score_stderr`` (standard error of the mean, ``std / sqrt(n)``),
            ``eval/response_length`` (tokens), ``eval/eos_frac``, ``eval/kl`` (mean over responses of the summed
            per-token ``--kl-estimator`` KL between actor and reference on the generated tokens, nats) and
            ``eval/num_prompts``; greedy responses unless ``--eval-do-sample``.

            Paired gain: the baseline is the per-prompt scores ``s0_i`` of the run's first evaluation (iteration
            0 unless ``--skip-eval-at-start``), kept in :attr:`eval_baseline` and in the checkpoints; after a
            resume it is the checkpoint's, or the first evaluation after the resume when the checkpoint has none
            for these prompts. Every later evaluation scores the same ``n`` prompts and also returns, with
            ``d_i = s_i - s0_i`` (score units):

            * ``eval/score_gain`` = ``sum_i d_i / n`` (= ``eval/score_mean`` now minus at the baseline);
            * ``eval/score_gain_stderr`` = ``sqrt(sum_i (d_i - gain)^2 / (n - 1)) / sqrt(n)``.

            Both come from per-rank sums of ``d_i`` and ``d_i^2`` reduced over the DP ranks. The baseline
            evaluation itself returns neither.
        """
        n = self._num_eval_prompts()
        dp, rank = parallel.dp_world_size(), parallel.dp_rank()
        indices = list(range(rank, n, dp))
        baseline = self.eval_baseline["scores"] if self.eval_baseline is not None else None
        acc = MetricAccumulator()
        samples: list[dict] = []
        local_scores: list[torch.Tensor] = []  # this rank's per-prompt scores, in the order of ``indices``
        if self.args.eval_do_sample:
            sampling = self.sampling
        else:
            sampling = SamplingParams(max_new_tokens=self.args.max_new_tokens, do_sample=False,
                                      stop_token_ids=self.models.eos_ids, pad_token_id=self.pad_id,
                                      ignore_eos=self.args.ignore_eos)
        prompts = [self.eval_dataset[i][-self.args.max_prompt_length:] for i in indices]
        chunk = self.args.rollout_batch_size or max(len(prompts), 1)
        for s in range(0, len(prompts), chunk):
            part = prompts[s:s + chunk]
            # the forwards need micro-batch-sized pieces: pad the chunk with repeats, weighted 0
            pad_to = -(-len(part) // self.args.micro_batch_size) * self.args.micro_batch_size
            padded = part + [part[-1]] * (pad_to - len(part))
            held_out = indices[s:s + chunk]  # held-out prompt indices: the reward function reads their columns
            rows = torch.tensor(held_out + [held_out[-1]] * (pad_to - len(part)), device="cpu")
            batch = self.generate_phase(padded, rows, self.iteration, sampling=sampling, salt=EVAL_SEED_SALT)
            real = slice(0, len(part))
            scores = self.score(batch, where="in validation", dataset=self.eval_dataset)[real].double()
            r = batch.response_len
            actor_lp = self._forward_only(self.actor, batch, self._log_probs, r)[real]
            ref_lp = self._forward_only(self.reference, batch, self._log_probs, r)[real]
            mask = batch.response_mask[real].float()
            kl = (core_algos.kl_penalty(self.args.kl_estimator, actor_lp, ref_lp) * mask).sum(-1)
            acc.sum_mean("eval/score_mean", scores.sum(), len(part))
            acc.total("eval/score_sum_sq", scores.square().sum())
            if baseline is not None:
                before = torch.tensor([baseline[i] for i in held_out], dtype=torch.float64, device=scores.device)
                gain = scores - before  # [len(part)] paired differences d_i
                acc.sum_mean("eval/score_gain", gain.sum(), len(part))
                acc.total("eval/score_gain_sum_sq", gain.square().sum())
            else:
                local_scores.append(scores.cpu())
            acc.sum_mean("eval/response_length", mask.sum(), len(part))
            acc.sum_mean("eval/eos_frac", batch.has_eos[real].float().sum(), len(part))
            acc.sum_mean("eval/kl", kl.sum(), len(part))
            acc.total("eval/num_prompts", len(part))
            if len(samples) < self.args.log_samples:
                batch.scores = scores.float().to(self.device)
                samples += self._sample_rows(batch.select(real), self.args.log_samples - len(samples))
        if not indices:  # every DP rank takes part in the reductions, even without prompts
            for name in ("eval/score_mean", "eval/response_length", "eval/eos_frac", "eval/kl"):
                acc.sum_mean(name, 0.0, 0.0)
            acc.total("eval/score_sum_sq", 0.0)
            acc.total("eval/num_prompts", 0.0)
            if baseline is not None:
                acc.sum_mean("eval/score_gain", 0.0, 0.0)
                acc.total("eval/score_gain_sum_sq", 0.0)
        reduced = acc.reduce(parallel.dp_all_reduce)
        count = reduced.pop("eval/num_prompts")
        metrics = {"eval/score_mean": reduced.pop("eval/score_mean")}
        metrics["eval/score_stderr"] = _stderr(metrics["eval/score_mean"], reduced.pop("eval/score_sum_sq"), count)
        if baseline is not None:
            metrics["eval/score_gain"] = reduced.pop("eval/score_gain")
            metrics["eval/score_gain_stderr"] = _stderr(metrics["eval/score_gain"],
                                                        reduced.pop("eval/score_gain_sum_sq"), count)
        else:
            self.eval_baseline = self._baseline(n, indices, local_scores)
        metrics.update(reduced)
        metrics["eval/num_prompts"] = count
        self._eval_samples = samples
        return metrics

    def _num_eval_prompts(self) -> int:
        """``n``: the held-out prompts each validation scores (indices ``0 .. n-1`` of ``--eval-data-path``)."""
        return min(self.args.eval_samples, len(self.eval_dataset))

    def _baseline(self, n: int, indices: list[int], local_scores: list[torch.Tensor]) -> dict:
        """The baseline of the paired gain: this evaluation's per-prompt scores, gathered over the DP ranks (each
        adds its own prompts' scores into a zero vector; one sum) so that every rank holds all ``n`` of them and
        rank 0 can checkpoint them.

        Returns:
            ``{"iteration", "eval_data_path", "scores"}``; ``scores[i]`` is held-out prompt ``i``'s score (``n``
            floats).
        """
        scores = torch.zeros(n, dtype=torch.float64, device=self.device)  # on the device: NCCL reduces there
        if indices:
            scores[torch.tensor(indices, dtype=torch.long, device=self.device)] = torch.cat(local_scores).to(
                self.device)
        scores = parallel.dp_all_reduce(scores).cpu()
        return {"iteration": self.iteration, "eval_data_path": self.args.eval_data_path, "scores": scores.tolist()}

    def _log_evaluation(self) -> None:
        self.logger.samples(self.iteration, "eval", self._eval_samples)


def _stderr(mean: float, sum_sq: float, count: float) -> float:
    """Standard error of a mean over ``count`` values from their mean and their sum of squares: ``sqrt(var / n)``
    with the sample variance ``(sum_sq / n - mean^2) * n / (n - 1)`` (0 for ``n <= 1`` or rounding below 0)."""
    variance = (sum_sq / max(count, 1) - mean * mean) * count / max(count - 1, 1)
    return math.sqrt(max(variance, 0.0) / max(count, 1))


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.6g}" if isinstance(value, float) else str(value)

