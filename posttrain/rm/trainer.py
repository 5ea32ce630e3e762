"""Reward-model training: ``pretrain_gpt.py --stage rm`` on preference pairs.

::

    torchrun --nproc_per_node 2 pretrain_gpt.py --stage rm \\
        --pretrained-checkpoint CKPT --data-path DATA --eval-data-path EVAL_DATA \\
        --seq-length 384 --micro-batch-size 1 --global-batch-size 16 --num-epochs 1 --lr 1e-5 --save OUT

The model is a megatron-core ``GPTModel`` with a scalar head (:class:`posttrain.models.value_model.GPTValueModel`).
Each iteration takes ``--global-batch-size`` pairs; every micro-batch of ``b`` pairs is one forward pass over
``2b`` right-padded rows ``[chosen; rejected]``; the score of a row is the head's output at its last real token
or, with ``--score-pooling response_mean``, the mean of its outputs over the response tokens
(:func:`~posttrain.models.value_model.pool_scores`), and the loss is the pairwise ranking loss of
:mod:`posttrain.rm.loss` (which also explains why it is the mean over the global batch for every DP size and
micro-batch count). TP, PP and DP run through the shared machinery of :mod:`posttrain.training`.

Starting point (one of):

* ``--pretrained-checkpoint DIR`` (alias ``--load-backbone``): a posttrain checkpoint. A causal LM (e.g. the SFT
  model, ``convert_ckpt.py --direction hf2mcore``) gives the backbone and the head is initialised fresh
  (``N(0, std^2)`` with ``--value-head-init-std``, bias 0, seeded by ``--seed``); a value checkpoint (``convert_ckpt.py ... --model-kind value
  --init-value-head``, or a previous reward model) is loaded whole, head included.
* ``--load DIR``: resume a previous ``--stage rm`` run written with ``--save DIR``: model, optimiser, LR schedule,
  data position and RNG states of the iteration in ``DIR/latest_checkpointed_iteration.txt``. When ``DIR`` holds no
  checkpoint yet and ``--pretrained-checkpoint`` is given, training starts from the latter (so ``--load`` and
  ``--save`` can name the same directory in a job that is restarted).

Layout written under ``--save`` (one ``iter_*`` per ``--save-interval`` and one at the end; the layout every stage
shares, :mod:`posttrain.training.checkpoint`)::

    <save>/latest_checkpointed_iteration.txt      the last complete iteration, e.g. "15"
    <save>/metrics.jsonl                           one JSON line per iteration (train and eval metrics)
    <save>/iter_0000015/model/                     THE REWARD MODEL: a posttrain value checkpoint
                                                   (posttrain_checkpoint.json, model/, tokenizer files)
    <save>/iter_0000015/optimizer/model/           optimiser + LR scheduler state (dist_checkpointing)
    <save>/iter_0000015/rng/rank<k>.pt             RNG states per rank
    <save>/iter_0000015/trainer_state.json         iteration, data position, arguments, last eval metrics

``<save>/iter_XXXXXXX/model`` is what ``--stage trl_ppo --reward-model`` and ``convert_ckpt.py --direction mcore2hf``
(to ``*ForSequenceClassification``) take; :func:`latest_reward_checkpoint` resolves it from ``<save>``. Checkpoints
appear atomically (written to a hidden directory, renamed, then the tracker file is updated).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from posttrain import parallel
from posttrain.arguments import (
    ArgumentError,
    CheckpointArgs,
    LoggingArgs,
    ModelArgs,
    OptimizerArgs,
    ParallelArgs,
    add_dataclass_args,
    arg,
    check_range,
    dataclass_from_args,
)
from posttrain.data.prompt_dataset import PromptSampler
from posttrain.distributed import initialize_distributed
from posttrain.errors import TrainingDivergedError
from posttrain.models.checkpoint import (
    CheckpointError,
    check_tokenizer_dir,
    read_checkpoint_meta,
)
from posttrain.models.provider import (
    build_attention_mask,
    position_ids_from_attention_mask,
)
from posttrain.models.value_model import (
    SCORE_POOLINGS,
    checkpoint_score_pooling,
    pool_scores,
)
from posttrain.rm.data import (
    TRUNCATION_MODES,
    RewardDataError,
    RewardPairs,
    collate_pairs,
)
from posttrain.rm.loss import STAT_FIELDS, finalize_pair_stats, pairwise_loss
from posttrain.training import (
    MetricsLogger,
    TrainingCheckpoint,
    build_model_slot,
    forward_backward,
    is_rank0,
    optimizer_step,
    print_rank0,
    run_stage,
    zero_grad,
)

MODEL_DIR = "model"
"""The reward model's slot name: ``<save>/iter_XXXXXXX/model`` is the reward checkpoint."""


@dataclass
class RewardModelArgs:
    """Reward-model stage: data, batch sizes, length, schedule and starting point."""

    data_path: Optional[str] = arg(None, "training pairs: the --output-prefix given to preprocess_data.py "
                                         "--handler-name AlpacaStylePairwiseHandler (required)")
    eval_data_path: Optional[str] = arg(None, "held-out pairs (same format), evaluated every --eval-interval "
                                              "iterations and at the end")
    eval_interval: int = arg(0, "evaluate every N iterations (0: only at the end)")
    pretrained_checkpoint: Optional[str] = arg(
        None, "posttrain checkpoint to start from: a causal LM (backbone; fresh scalar head) or a value model "
              "(loaded whole)", aliases=("--load-backbone",))
    value_head_init_std: float = arg(0.02, "std of the fresh head when starting from a causal LM (OpenRLHF uses "
                                           "1 / (hidden_size + 1))")
    micro_batch_size: int = arg(1, "pairs per micro-batch and data-parallel rank (one forward pass over "
                                   "2 x this many rows: chosen then rejected)")
    eval_micro_batch_size: Optional[int] = arg(None, "pairs per micro-batch in evaluation (default: "
                                                     "--micro-batch-size)")
    global_batch_size: int = arg(16, "pairs per optimiser step over all data-parallel ranks; must be divisible "
                                     "by DP x --micro-batch-size")
    train_iters: Optional[int] = arg(None, "optimiser steps (give this or --num-epochs)")
    num_epochs: Optional[int] = arg(None, "passes over the training pairs; an epoch is "
                                          "floor(usable pairs / --global-batch-size) steps")
    seq_length: int = arg(1024, "longest sequence (prompt + response) in tokens")
    truncation: str = arg("skip", "pairs longer than --seq-length: skip them (counted) or truncate them (prompt "
                                  "keeps its last tokens, responses are cut but keep their end-of-turn token)", choices=list(TRUNCATION_MODES))
    max_prompt_length: Optional[int] = arg(None, "with --truncation truncate: prompt tokens always kept "
                                                 "(default: --seq-length / 2)")
    pad_to_multiple_of: int = arg(8, "round each micro-batch's padded length up to a multiple of this")
    score_pooling: Optional[str] = arg(None, "sequence score from the head's per-token outputs: last (the last "
                                             "real token, as HF sequence classifiers) or response_mean (their mean "
                                             "over the response tokens); default: the starting checkpoint's, else "
                                             "last. Stored in the reward checkpoint for --stage trl_ppo",
                                       choices=list(SCORE_POOLINGS))

    def __post_init__(self):
        if not self.data_path:
            raise ArgumentError("--data-path is required (the --output-prefix of a pairwise preprocessing run)")
        for flag, value in (("--micro-batch-size", self.micro_batch_size),
                            ("--global-batch-size", self.global_batch_size), ("--seq-length", self.seq_length),
                            ("--pad-to-multiple-of", self.pad_to_multiple_of),
                            ("--eval-micro-batch-size", self.eval_micro_batch_size),
                            ("--train-iters", self.train_iters), ("--num-epochs", self.num_epochs)):
            check_range(flag, value, ge=1)
        check_range("--value-head-init-std", self.value_head_init_std, ge=0.0)
        check_range("--eval-interval", self.eval_interval, ge=0)
        if (self.train_iters is None) == (self.num_epochs is None):
            raise ArgumentError("give exactly one of --train-iters and --num-epochs")
        if self.global_batch_size % self.micro_batch_size:
            raise ArgumentError(f"--global-batch-size {self.global_batch_size} is not divisible by "
                                f"--micro-batch-size {self.micro_batch_size}")


ARG_GROUPS = ((RewardModelArgs, "reward model"), (ModelArgs, "model"), (ParallelArgs, "parallelism"),
              (OptimizerArgs, "optimizer"), (CheckpointArgs, "checkpointing"), (LoggingArgs, "logging"))


def build_parser() -> argparse.ArgumentParser:
    """The ``--stage rm`` command line (flags generated from :data:`ARG_GROUPS`)."""
    parser = argparse.ArgumentParser(prog="pretrain_gpt.py --stage rm",
                                     description="Train a reward model (scalar head) on preference pairs with the "
                                                 "pairwise ranking loss")
    for cls, title in ARG_GROUPS:
        add_dataclass_args(parser, cls, title)
    return parser


def latest_reward_checkpoint(save_dir: str | Path) -> Path:
    """The reward model of the last complete iteration of a ``--stage rm`` run: ``<save>/iter_XXXXXXX/model``.

    Raises:
        CheckpointError: ``save_dir`` has no (complete) checkpoint.
    """
    directory = TrainingCheckpoint.latest(save_dir)
    if directory is None:
        raise CheckpointError(f"{save_dir}: no latest_checkpointed_iteration.txt (not a --stage rm --save "
                              "directory, or nothing saved yet)")
    return directory / MODEL_DIR


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


class RewardModelTrainer:
    """Set-up (everything that can fail on bad input happens in ``__init__``, before anything is written),
    then :meth:`train`.

    Raises (from ``__init__``):
        ArgumentError: inconsistent flags (e.g. the global batch is not divisible by DP x micro batch).
        RewardDataError: a dataset that cannot be read or is too small.
        CheckpointError: a checkpoint that cannot be used.
    """

    def __init__(self, rm: RewardModelArgs, model_args: ModelArgs, par: ParallelArgs, opt: OptimizerArgs,
                 ckpt: CheckpointArgs, log: LoggingArgs):
        self.args, self.model_args, self.par, self.opt, self.ckpt, self.log_args = rm, model_args, par, opt, ckpt, log
        self.state = initialize_distributed(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                                            par.expert_model_parallel_size, seed=par.seed)
        self.device = self.state.device
        dp = self.state.data_parallel_size
        if rm.global_batch_size % (dp * rm.micro_batch_size):
            raise ArgumentError(
                f"--global-batch-size {rm.global_batch_size} is not divisible by data-parallel size {dp} x "
                f"--micro-batch-size {rm.micro_batch_size} = {dp * rm.micro_batch_size}")
        self.num_microbatches = rm.global_batch_size // (dp * rm.micro_batch_size)
        self.checkpoint = TrainingCheckpoint(ckpt.save, keep_last=ckpt.ckpt_keep_last,
                                             save_optim=not ckpt.no_save_optim, save_rng=not ckpt.no_save_rng)
        self.checkpoint.remove_stale()

        # --- starting point (checked before reading data or building the model)
        self.resume_dir, self.iteration = self._find_resume_point()
        self.source = Path(self.resume_dir / MODEL_DIR if self.resume_dir else rm.pretrained_checkpoint)
        self.source_meta = read_checkpoint_meta(self.source)
        self.score_pooling = rm.score_pooling or self._source_pooling()
        try:
            check_tokenizer_dir(self.source)
            self.checkpoint.tokenizer_dir = self.source
        except FileNotFoundError:
            self.checkpoint.tokenizer_dir = None

        # --- data
        self.train_pairs = RewardPairs(rm.data_path, rm.seq_length, rm.truncation, rm.max_prompt_length)
        self._check_vocab(self.train_pairs, "--data-path")
        if len(self.train_pairs) < rm.global_batch_size:
            raise RewardDataError(f"--data-path {rm.data_path}: {len(self.train_pairs)} usable pairs cannot fill one "
                                  f"--global-batch-size of {rm.global_batch_size} ({self.train_pairs.summary()})")
        self.eval_pairs = None
        if rm.eval_data_path:
            self.eval_pairs = RewardPairs(rm.eval_data_path, rm.seq_length, rm.truncation, rm.max_prompt_length)
            self._check_vocab(self.eval_pairs, "--eval-data-path")
        self.sampler = PromptSampler(len(self.train_pairs), rm.global_batch_size, parallel.dp_rank(), dp,
                                     seed=par.seed)
        self.train_iters = rm.train_iters or rm.num_epochs * self.sampler.batches_per_epoch
        print_rank0(f"[rm] train data {rm.data_path}: {self.train_pairs.summary()}")
        if self.eval_pairs is not None:
            print_rank0(f"[rm] eval data {rm.eval_data_path}: {self.eval_pairs.summary()}")
        print_rank0(f"[rm] {self.train_iters} iterations of {rm.global_batch_size} pairs "
                    f"({self.sampler.batches_per_epoch} per epoch); TP {par.tensor_model_parallel_size}, PP "
                    f"{par.pipeline_model_parallel_size}, DP {dp}, {self.num_microbatches} micro-batch(es) of "
                    f"{rm.micro_batch_size} pair(s) per rank; score pooling {self.score_pooling}")

        # --- model and optimiser
        kind = self.source_meta["model_kind"]
        # The pairwise loss depends on score differences only, so the head's bias gets a gradient that is 0 up to
        # rounding; Adam would turn that rounding noise into +-lr steps. It keeps its loaded value.
        self.slot = build_model_slot(MODEL_DIR, self.source, "value", model_args, seed=par.seed,
                                     meta=self.source_meta, optim_args=opt, train_steps=self.train_iters,
                                     value_head_init_std=rm.value_head_init_std,
                                     frozen_params=("value_head.linear.bias",))
        how = "whole (value checkpoint)" if kind == "value" else "as the backbone, with a fresh scalar head"
        print_rank0(f"[rm] model loaded from {self.source} {how}")
        self.last_eval: dict = {}
        if self.resume_dir is not None:
            self._load_training_state()
        self.logger: Optional[MetricsLogger] = None

    @property
    def ddp(self):
        return self.slot.ddp

    # ------------------------------------------------------------------ set-up
    def _source_pooling(self) -> str:
        """Pooling recorded in the checkpoint we start from or resume (``last`` when it records none)."""
        try:
            return checkpoint_score_pooling(self.source_meta)
        except ValueError as exc:
            raise ArgumentError(f"{self.source}: {exc}") from None

    def _find_resume_point(self) -> tuple[Optional[Path], int]:
        load, pretrained = self.ckpt.load, self.args.pretrained_checkpoint
        if load:
            directory = TrainingCheckpoint.latest(load)
            if directory is not None:
                if not (directory / MODEL_DIR).is_dir():
                    raise CheckpointError(f"--load {load}: {directory} is missing or incomplete (no {MODEL_DIR}/)")
                return directory, int(TrainingCheckpoint.read_state(directory)["iteration"])
            if pretrained is None:
                raise CheckpointError(f"--load {load}: no latest_checkpointed_iteration.txt (not a --stage rm "
                                      "--save directory); to start from a model use --pretrained-checkpoint")
            print_rank0(f"[rm] --load {load} holds no checkpoint yet: starting from --pretrained-checkpoint "
                        f"{pretrained}")
        if pretrained is None:
            raise ArgumentError("give --pretrained-checkpoint (the SFT model or a value checkpoint) or --load "
                                "(a previous --stage rm --save directory)")
        return None, 0

    def _check_vocab(self, pairs: RewardPairs, flag: str) -> None:
        vocab = (pairs.source.meta or {}).get("vocab_size")
        model_vocab = int(self.source_meta["vocab_size"])
        if vocab is not None and int(vocab) > model_vocab:
            raise RewardDataError(f"{flag}: tokenized with a vocabulary of {vocab} ids but the model has "
                                  f"{model_vocab} (preprocess with the model's tokenizer)")

    def _load_training_state(self) -> None:
        # the model itself was built from resume_dir/model; optimiser, scheduler and RNG states come from here
        state = self.checkpoint.load(self.resume_dir, [self.slot], load_optim=not self.ckpt.no_load_optim,
                                     load_rng=not self.ckpt.no_load_rng, load_models=False)
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as exc:
            raise RewardDataError(f"--load {self.ckpt.load}: the training data differs from the resumed run's "
                                  f"({exc})") from None
        self.last_eval = state.get("eval", {})
        print_rank0(f"[rm] resumed from {self.resume_dir} (iteration {self.iteration}, epoch {self.sampler.epoch})")

    # ------------------------------------------------------------------ batches and steps
    def _micro_batches(self, pairs: list, micro_batch_size: int, weights: list[float]) -> tuple[list[dict], int]:
        """Collate ``pairs`` into micro-batches on the device; returns them and the sequence length given to the
        schedule."""
        multiple = self.args.pad_to_multiple_of
        chunks = [(pairs[i:i + micro_batch_size], weights[i:i + micro_batch_size])
                  for i in range(0, len(pairs), micro_batch_size)]

        def rounded(n: int) -> int:
            return min(-(-n // multiple) * multiple, max(n, self.args.seq_length))

        common = None
        if self.par.pipeline_model_parallel_size > 1:
            # stages exchange [seq, 2b, hidden] tensors: one length for every micro-batch of the call
            common = rounded(max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs))
        batches = []
        for chunk, w in chunks:
            longest = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in chunk)
            batch = collate_pairs(chunk, self.train_pairs.pad_token_id, common or rounded(longest), w)
            batches.append({k: v.to(self.device) for k, v in batch.items()})
        return batches, common or max(b["input_ids"].shape[1] for b in batches)

    def _forward_step(self, normalizer: Optional[float]):
        def forward_step(batch: dict, model):
            mask = batch["attention_mask"]
            output = model(batch["input_ids"], position_ids_from_attention_mask(mask), build_attention_mask(mask))

            def loss_func(values: torch.Tensor):
                scores = pool_scores(values.float(), mask, batch["response_mask"], self.score_pooling)
                half = scores.shape[0] // 2
                loss, sums = pairwise_loss(scores[:half], scores[half:], batch["margin"], batch["weights"],
                                           normalizer=normalizer)
                return loss, {"sums": sums}

            return output, loss_func

        return forward_step

    def _reduce_sums(self, outputs: list[dict]) -> torch.Tensor:
        """Sum the ``sums`` vectors of the micro-batches (last stage) and over DP ranks; every stage gets it."""
        total = torch.zeros(len(STAT_FIELDS), dtype=torch.float64, device=self.device)
        if parallel.is_last_stage():
            for item in outputs:
                total += item["sums"].to(self.device)
        parallel.dp_all_reduce(total)
        return parallel.broadcast_from_last_stage(total, total.shape, total.dtype)

    def train_step(self) -> dict[str, float]:
        """One optimiser step on the next global batch; returns the global metrics."""
        indices = next(self.sampler)
        pairs = [self.train_pairs[int(i)] for i in indices]
        micro_batches, seq_len = self._micro_batches(pairs, self.args.micro_batch_size, [1.0] * len(pairs))
        tokens = torch.tensor([float(sum(int(b["attention_mask"].sum()) for b in micro_batches))],
                              dtype=torch.float64, device=self.device)
        self.ddp.train()
        zero_grad(self.ddp, self.slot.optimizer)
        outputs = forward_backward(self.ddp, self._forward_step(normalizer=float(self.args.micro_batch_size)),
                                   micro_batches, seq_len, 2 * self.args.micro_batch_size, forward_only=False)
        lr = float(self.slot.optimizer.param_groups[0]["lr"])  # this step's LR: the scheduler moves it after the step
        applied, grad_norm = optimizer_step(self.slot.optimizer, self.slot.scheduler)
        metrics = finalize_pair_stats(self._reduce_sums(outputs))
        metrics.update(grad_norm=grad_norm, lr=lr,
                       tokens=float(parallel.dp_all_reduce(tokens)[0]), step_skipped=float(not applied))
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on every usable pair of ``--eval-data-path`` (each pair counted once).

        Pairs are dealt to DP ranks round-robin; ranks pad their last micro-batch (and, when the pair count does
        not divide evenly, add whole micro-batches) with weight-0 copies of a real pair, so every rank runs the same
        number of equally shaped micro-batches.
        """
        mbs = self.args.eval_micro_batch_size or self.args.micro_batch_size
        dp, rank, n = parallel.dp_world_size(), parallel.dp_rank(), len(self.eval_pairs)
        per_rank = -(-n // dp)
        per_rank = -(-per_rank // mbs) * mbs
        mine = list(range(rank, n, dp))
        weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
        mine += [0] * (per_rank - len(mine))
        pairs = [self.eval_pairs[i] for i in mine]
        self.ddp.eval()
        outputs = []
        # one forward-backward call per chunk of micro-batches bounds the padded length (and memory) of PP
        chunk = mbs * max(1, self.num_microbatches)
        for start in range(0, len(pairs), chunk):
            batches, seq_len = self._micro_batches(pairs[start:start + chunk], mbs, weights[start:start + chunk])
            outputs += forward_backward(self.ddp, self._forward_step(normalizer=None), batches, seq_len, 2 * mbs,
                                        forward_only=True)
        self.ddp.train()
        metrics = finalize_pair_stats(self._reduce_sums(outputs))
        return {f"eval/{k}": v for k, v in metrics.items()}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write ``<save>/iter_XXXXXXX`` (see the module docstring) and return its reward-model directory."""
        self.slot.save_meta = {"stage": "rm", "score_pooling": self.score_pooling, "train_data": self.args.data_path,
                               "initialised_from": str(self.args.pretrained_checkpoint or self.source),
                               "eval": self.last_eval}
        state = {"train_iters": self.train_iters, "sampler": self.sampler.state_dict(), "eval": self.last_eval,
                 "train_data": self.train_pairs.summary(),
                 "args": {title: asdict(obj) for (_, title), obj in zip(ARG_GROUPS, self._arg_objects())}}
        return self.checkpoint.save(self.iteration, [self.slot], state) / MODEL_DIR

    def _arg_objects(self):
        return self.args, self.model_args, self.par, self.opt, self.ckpt, self.log_args

    # ------------------------------------------------------------------ loop
    def _console(self, metrics: dict) -> str:
        line = (f" [rm] iteration {self.iteration:6d}/{self.train_iters:6d} | epoch {self.sampler.epoch} | "
                f"consumed pairs {self.sampler.total_consumed_samples} | lr {metrics['lr']:.3E} | "
                f"loss {metrics['loss']:.4f} | accuracy {metrics['accuracy']:.3f} | "
                f"reward margin {metrics['reward_margin_mean']:+.3f} | chosen {metrics['chosen_reward_mean']:+.3f} | "
                f"rejected {metrics['rejected_reward_mean']:+.3f} | grad norm {metrics['grad_norm']:.3f} | "
                f"{metrics['iteration_time_s']:.2f} s/it")
        if metrics.get("step_skipped"):
            line += " | step skipped (non-finite gradients)"
        return line

    def _eval_line(self, metrics: dict) -> str:
        return (f" [rm] eval at iteration {self.iteration}: pairs {metrics['eval/num_pairs']} | "
                f"loss {metrics['eval/loss']:.4f} | accuracy {metrics['eval/accuracy']:.4f} | reward margin "
                f"{metrics['eval/reward_margin_mean']:+.3f} | chosen {metrics['eval/chosen_reward_mean']:+.3f} | "
                f"rejected {metrics['eval/rejected_reward_mean']:+.3f}")

    def train(self) -> Optional[Path]:
        """Run to ``train_iters``; returns the final reward checkpoint (None without ``--save``).

        Raises:
            TrainingDivergedError: the loss became NaN/inf.
        """
        self.logger = MetricsLogger(self.ckpt.save, self.log_args, resume_iteration=self.iteration,
                                    enabled=is_rank0(), config={title: asdict(obj) for (_, title), obj
                                                                in zip(ARG_GROUPS, self._arg_objects())})
        saved_at, path, start_iteration = None, None, self.iteration
        start = time.perf_counter()
        try:
            while self.iteration < self.train_iters:
                t0 = time.perf_counter()
                metrics = self.train_step()
                self.iteration += 1
                metrics["iteration_time_s"] = time.perf_counter() - t0
                metrics["tokens_per_s"] = metrics["tokens"] / metrics["iteration_time_s"]
                metrics["epoch"] = self.sampler.epoch
                metrics["consumed_pairs"] = self.sampler.total_consumed_samples
                if not math.isfinite(metrics["loss"]):
                    raise TrainingDivergedError(f"iteration {self.iteration}: non-finite loss {metrics['loss']}")
                lines = [self._console(metrics)] if self.iteration % self.log_args.log_interval == 0 else []
                last = self.iteration == self.train_iters
                if self.eval_pairs is not None and (last or (self.args.eval_interval and
                                                             self.iteration % self.args.eval_interval == 0)):
                    self.last_eval = self.evaluate()
                    metrics.update(self.last_eval)
                    lines.append(self._eval_line(self.last_eval))
                self.logger.log(self.iteration, metrics, lines)
                if self.ckpt.save and self.ckpt.save_interval and self.iteration % self.ckpt.save_interval == 0:
                    path, saved_at = self.save(), self.iteration
            if self.iteration == self.train_iters and self.eval_pairs is not None and not self.last_eval:
                self.last_eval = self.evaluate()  # resumed at the end: report the held-out accuracy anyway
                print_rank0(self._eval_line(self.last_eval))
            if self.ckpt.save and saved_at != self.iteration and self.iteration > start_iteration:
                path = self.save()
            elif self.resume_dir is not None and self.iteration == start_iteration:
                path = self.resume_dir / MODEL_DIR  # nothing left to train: the loaded checkpoint is the result
        finally:
            self.logger.close()
        print_rank0(f"[rm] done: {self.iteration} iterations in {time.perf_counter() - start:.1f} s")
        if self.last_eval:
            print_rank0(f"[rm] held-out accuracy {self.last_eval['eval/accuracy']:.4f} on "
                        f"{self.last_eval['eval/num_pairs']} pairs")
        if path is not None:
            print_rank0(f"[rm] reward model checkpoint: {path}")
        return path


def main(argv=None) -> int:
    """``pretrain_gpt.py --stage rm``: 0 on success; one ``error: ...`` line (rank 0) and 1 on bad input."""
    def run(args: argparse.Namespace) -> None:
        RewardModelTrainer(*(dataclass_from_args(cls, args) for cls, _ in ARG_GROUPS)).train()

    return run_stage(build_parser(), run, argv)
