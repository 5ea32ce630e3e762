"""The PPO trainer's persistent state beyond the models: the actor's EMA and the checkpoint save/load (a mixin of
:class:`posttrain.trl_ppo.trainer.PPOTrainer`, which owns ``actor``, ``ema``, ``checkpoint``, ``sampler``,
``kl_ctl``, ``score_normalizer`` and ``eval_baseline``). The directory layout is
:class:`posttrain.training.TrainingCheckpoint`'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from posttrain.arguments import ArgumentError
from posttrain.models.checkpoint import load_model_checkpoint, save_model_checkpoint
from posttrain.training import TrainingCheckpoint, print_rank0


class PPOState:
    """EMA and checkpoint methods of :class:`~posttrain.trl_ppo.trainer.PPOTrainer`."""

    # ------------------------------------------------------------------ EMA of the actor
    def _copy_actor_weights(self) -> dict:
        return {k: p.detach().clone().float() for k, p in self.actor.model.named_parameters()}

    def _update_ema(self) -> None:
        decay = self.args.ema_decay
        with torch.no_grad():
            for k, p in self.actor.model.named_parameters():
                self.ema[k].mul_(decay).add_(p.detach().float(), alpha=1 - decay)

    def _write_ema(self, directory: Path) -> None:
        """Save the EMA weights as a model checkpoint (the actor's own weights are restored afterwards)."""
        current = {k: p.detach().clone() for k, p in self.actor.model.named_parameters()}
        with torch.no_grad():
            for k, p in self.actor.model.named_parameters():
                p.copy_(self.ema[k].to(p.dtype))
            save_model_checkpoint(self.actor.model, directory, hf_config=self.actor.hf_config,
                                  tokenizer_dir=self.tokenizer_dir, iteration=self.iteration, atomic=False)
            for k, p in self.actor.model.named_parameters():
                p.copy_(current[k])

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write actor and critic if any (models, optimisers, schedulers), the EMA actor, RNG and trainer state."""
        extra = {"actor_ema": self._write_ema} if self.ema is not None else {}
        return self.checkpoint.save(self.iteration, self.models.trained, self._trainer_state(), extra)

    def _load(self, root: str) -> None:
        directory = TrainingCheckpoint.latest(root)
        if directory is None:
            raise ArgumentError(f"--load {root}: no latest_checkpointed_iteration.txt (not a PPO checkpoint)")
        state = self.checkpoint.load(directory, self.models.trained, load_optim=not self.ckpt_args.no_load_optim,
                                     load_rng=not self.ckpt_args.no_load_rng,
                                     steps_per_iteration=self.steps_per_iteration)
        if self.ema is not None and (directory / "actor_ema").exists():
            current = {k: p.detach().clone() for k, p in self.actor.model.named_parameters()}
            load_model_checkpoint(self.actor.model, directory / "actor_ema")
            self.ema = self._copy_actor_weights()
            with torch.no_grad():
                for k, p in self.actor.model.named_parameters():
                    p.copy_(current[k])
        self.iteration = int(state["iteration"])
        self.sampler.load_state_dict(state["sampler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.skipped_prompts = int(state.get("skipped_prompts", 0))
        if self.score_normalizer is not None and state.get("score_normalizer"):
            self.score_normalizer.load_state_dict(state["score_normalizer"])
        self.eval_baseline = self._checkpointed_eval_baseline(state.get("eval_baseline"))

    def _checkpointed_eval_baseline(self, baseline: Optional[dict]) -> Optional[dict]:
        """The checkpoint's validation baseline (per-prompt scores of the run's first validation) when it was taken
        on this run's held-out prompts (same ``--eval-data-path``, as many prompts); else None, and the first
        validation after the resume becomes the baseline of ``eval/score_gain``. Checkpoints written before the
        baseline was saved have none."""
        if baseline is None or self.eval_dataset is None:
            return None
        n = self._num_eval_prompts()
        if baseline.get("eval_data_path") == self.args.eval_data_path and len(baseline.get("scores", ())) == n:
            return baseline
        print_rank0(f" trl_ppo: the checkpoint's validation baseline (iteration {baseline.get('iteration')}, "
                    f"{len(baseline.get('scores', ()))} prompts of {baseline.get('eval_data_path')}) does not fit "
                    f"{n} prompts of {self.args.eval_data_path}: eval/score_gain is measured from the first "
                    "validation of this run")
        return None

