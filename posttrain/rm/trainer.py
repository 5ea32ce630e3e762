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

Layout written under ``--save`` (one ``iter_*`` per ``--save-interval`` and one at the end)::

    <save>/latest_checkpointed_iteration.txt      the last complete iteration, e.g. "15"
    <save>/metrics.jsonl                           one JSON line per iteration (train and eval metrics)
    <save>/iter_0000015/model/                     THE REWARD MODEL: a posttrain value checkpoint
                                                   (posttrain_checkpoint.json, model/, tokenizer files)
    <save>/iter_0000015/optimizer/                 optimiser + LR scheduler state (dist_checkpointing)
    <save>/iter_0000015/rng/rank<k>.pt             RNG states per rank
    <save>/iter_0000015/trainer_state.json         iteration, data position, arguments, last eval metrics

``<save>/iter_XXXXXXX/model`` is what ``--stage trl_ppo --reward-model`` and ``convert_ckpt.py --direction mcore2hf``
(to ``*ForSequenceClassification``) take; :func:`latest_reward_checkpoint` resolves it from ``<save>``. Checkpoints
appear atomically (written to a hidden directory, renamed, then the tracker file is updated).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from posttrain.arguments import (ArgumentError, CheckpointArgs, LoggingArgs, OptimizerArgs, ParallelArgs,
                                 add_dataclass_args, arg, dataclass_from_args)
from posttrain.models.value_model import SCORE_POOLINGS
from posttrain.rm.data import TRUNCATION_MODES, RewardDataError, RewardPairs, collate_pairs
from posttrain.rm.loss import finalize_pair_stats, pairwise_loss, STAT_FIELDS

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"
STATE_FILE = "trainer_state.json"


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
                            ("--pad-to-multiple-of", self.pad_to_multiple_of)):
            if value < 1:
                raise ArgumentError(f"{flag} must be >= 1, got {value}")
        if self.eval_micro_batch_size is not None and self.eval_micro_batch_size < 1:
            raise ArgumentError(f"--eval-micro-batch-size must be >= 1, got {self.eval_micro_batch_size}")
        if self.value_head_init_std < 0:
            raise ArgumentError(f"--value-head-init-std must be >= 0, got {self.value_head_init_std}")
        if self.eval_interval < 0:
            raise ArgumentError(f"--eval-interval must be >= 0, got {self.eval_interval}")
        if (self.train_iters is None) == (self.num_epochs is None):
            raise ArgumentError("give exactly one of --train-iters and --num-epochs")
        if (self.train_iters or 1) < 1 or (self.num_epochs or 1) < 1:
            raise ArgumentError("--train-iters / --num-epochs must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ArgumentError(f"--global-batch-size {self.global_batch_size} is not divisible by "
                                f"--micro-batch-size {self.micro_batch_size}")


ARG_GROUPS = ((RewardModelArgs, "reward model"), (ParallelArgs, "parallelism"), (OptimizerArgs, "optimizer"),
              (CheckpointArgs, "checkpointing"), (LoggingArgs, "logging"))


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
        FileNotFoundError: ``save_dir`` has no ``latest_checkpointed_iteration.txt``.
    """
    from posttrain.training import iteration_dir, read_latest_iteration

    iteration = read_latest_iteration(save_dir)
    if iteration is None:
        raise FileNotFoundError(f"{save_dir}: no latest_checkpointed_iteration.txt (not a --stage rm --save "
                                "directory, or nothing saved yet)")
    return iteration_dir(save_dir, iteration) / MODEL_DIR


# ----------------------------------------------------------------------------------------------------------------
# Parallel plumbing (sums over DP ranks, shared with every pipeline stage)
# ----------------------------------------------------------------------------------------------------------------


def _reduce_sums(outputs: list[dict], device: torch.device) -> torch.Tensor:
    """Sum the ``sums`` vectors of the micro-batches (last stage) and over DP ranks; every rank gets the result."""
    from posttrain import parallel

    total = torch.zeros(len(STAT_FIELDS), dtype=torch.float64, device=device)
    if parallel.is_last_stage():
        for item in outputs:
            total += item["sums"].to(device)
    parallel.dp_all_reduce(total)
    return parallel.broadcast_from_last_stage(total, total.shape, total.dtype)


def _dp_sum(value: float, device: torch.device) -> float:
    from posttrain import parallel

    return float(parallel.dp_all_reduce(torch.tensor([value], dtype=torch.float64, device=device))[0])


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


class RewardModelTrainer:
    """Set-up (everything that can fail on bad input happens in ``__init__``, before anything is written),
    then :meth:`train`.

    Raises (from ``__init__``):
        ArgumentError: inconsistent flags (e.g. the global batch is not divisible by DP x micro batch).
        RewardDataError: a dataset that cannot be read or is too small.
        CheckpointError / FileNotFoundError: a checkpoint that cannot be used.
    """

    def __init__(self, rm: RewardModelArgs, par: ParallelArgs, opt: OptimizerArgs, ckpt: CheckpointArgs,
                 log: LoggingArgs):
        from posttrain.data.prompt_dataset import PromptSampler
        from posttrain.distributed import initialize_distributed
        from posttrain import parallel

        self.args, self.par, self.opt, self.ckpt, self.log_args = rm, par, opt, ckpt, log
        self.state = initialize_distributed(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                                            par.expert_model_parallel_size, seed=par.seed)
        self.device = self.state.device
        dp = self.state.data_parallel_size
        if rm.global_batch_size % (dp * rm.micro_batch_size):
            raise ArgumentError(
                f"--global-batch-size {rm.global_batch_size} is not divisible by data-parallel size {dp} x "
                f"--micro-batch-size {rm.micro_batch_size} = {dp * rm.micro_batch_size}")
        self.num_microbatches = rm.global_batch_size // (dp * rm.micro_batch_size)

        # --- starting point (checked before reading data or building the model)
        self.resume_dir, self.iteration = self._find_resume_point()
        source = self.resume_dir / MODEL_DIR if self.resume_dir else rm.pretrained_checkpoint
        from posttrain.models.checkpoint import check_tokenizer_dir, read_checkpoint_meta

        self.source_meta = read_checkpoint_meta(source)
        self.source = Path(source)
        self.hf_config = self.source_meta["hf_config"]
        self.score_pooling = rm.score_pooling or self._source_pooling()
        try:
            check_tokenizer_dir(self.source)
            self.tokenizer_dir = self.source
        except FileNotFoundError:
            self.tokenizer_dir = None

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
        self._print(f"[rm] train data {rm.data_path}: {self.train_pairs.summary()}")
        if self.eval_pairs is not None:
            self._print(f"[rm] eval data {rm.eval_data_path}: {self.eval_pairs.summary()}")
        self._print(f"[rm] {self.train_iters} iterations of {rm.global_batch_size} pairs "
                    f"({self.sampler.batches_per_epoch} per epoch); TP {par.tensor_model_parallel_size}, PP "
                    f"{par.pipeline_model_parallel_size}, DP {dp}, {self.num_microbatches} micro-batch(es) of "
                    f"{rm.micro_batch_size} pair(s) per rank; score pooling {self.score_pooling}")

        # --- model and optimiser
        self._build_model()
        self.last_eval: dict = {}
        if self.resume_dir is not None:
            self._load_training_state()
        self.logger = None

    # ------------------------------------------------------------------ set-up
    def _source_pooling(self) -> str:
        """Pooling recorded in the checkpoint we start from or resume (``last`` when it records none)."""
        from posttrain.models.value_model import checkpoint_score_pooling

        try:
            return checkpoint_score_pooling(self.source_meta)
        except ValueError as exc:
            raise ArgumentError(f"{self.source}: {exc}") from None

    def _print(self, text: str) -> None:
        from posttrain.training import is_rank0

        if is_rank0():
            print(text, flush=True)

    def _find_resume_point(self) -> tuple[Optional[Path], int]:
        from posttrain.training import iteration_dir, read_latest_iteration

        load, pretrained = self.ckpt.load, self.args.pretrained_checkpoint
        if load:
            iteration = read_latest_iteration(load)
            if iteration is not None:
                directory = iteration_dir(load, iteration)
                if not (directory / MODEL_DIR).is_dir() or not (directory / STATE_FILE).is_file():
                    raise FileNotFoundError(f"--load {load}: {directory} is missing or incomplete "
                                            f"(no {MODEL_DIR}/ or {STATE_FILE})")
                return directory, iteration
            if pretrained is None:
                raise FileNotFoundError(f"--load {load}: no latest_checkpointed_iteration.txt (not a --stage rm "
                                        "--save directory); to start from a model use --pretrained-checkpoint")
            self._print(f"[rm] --load {load} holds no checkpoint yet: starting from --pretrained-checkpoint "
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

    def _config_overrides(self) -> dict:
        overrides = {}
        if self.opt.recompute_granularity:
            overrides["recompute_granularity"] = self.opt.recompute_granularity
            if self.opt.recompute_granularity == "full":
                overrides.update(recompute_method=self.opt.recompute_method,
                                 recompute_num_layers=self.opt.recompute_num_layers)
        return overrides

    def _build_model(self) -> None:
        from posttrain.models.checkpoint import CheckpointError, load_model_checkpoint
        from posttrain.models.provider import build_model, unwrap_model
        from posttrain.training import build_optimizer, wrap_ddp

        self.model = build_model(self.hf_config, "value", bf16=self.opt.bf16,
                                 make_vocab_size_divisible_by=self.opt.make_vocab_size_divisible_by,
                                 value_head_init_std=self.args.value_head_init_std, value_head_seed=self.par.seed,
                                 **self._config_overrides())
        kind = self.source_meta["model_kind"]
        result = load_model_checkpoint(self.model, self.source, strict=kind == "value")
        unexpected_missing = [k for k in result["missing_keys"] if not k.startswith("value_head")]
        if unexpected_missing:
            raise CheckpointError(f"{self.source}: the backbone is incomplete (missing {unexpected_missing[:3]})")
        how = "whole (value checkpoint)" if kind == "value" else "as the backbone, with a fresh scalar head"
        self._print(f"[rm] model loaded from {self.source} {how}")
        inner = unwrap_model(self.model)
        if getattr(inner, "value_head", None) is not None:
            # The pairwise loss depends on score differences only, so the head's bias gets a gradient that is 0
            # up to rounding; Adam would turn that rounding noise into +-lr steps. It keeps its loaded value.
            inner.value_head.linear.bias.requires_grad_(False)
        self.ddp = wrap_ddp(self.model, self.opt.use_distributed_optimizer)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, self.opt, self.train_iters)

    def _load_training_state(self) -> None:
        from posttrain.training import load_optimizer_state, set_rng_state

        state = json.loads((self.resume_dir / STATE_FILE).read_text())
        if not self.ckpt.no_load_optim:
            load_optimizer_state(self.resume_dir / OPTIMIZER_DIR, self.ddp, self.optimizer, self.scheduler)
        else:
            self.scheduler.step(increment=self.iteration)
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as exc:
            raise RewardDataError(f"--load {self.ckpt.load}: the training data differs from the resumed run's "
                                  f"({exc})") from None
        rng_file = self.resume_dir / RNG_DIR / f"rank{torch.distributed.get_rank()}.pt"
        if not self.ckpt.no_load_rng and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        self.last_eval = state.get("eval", {})
        self._print(f"[rm] resumed from {self.resume_dir} (iteration {self.iteration}, epoch {self.sampler.epoch})")

    # ------------------------------------------------------------------ batches and steps
    def _micro_batches(self, pairs: list, micro_batch_size: int, weights: list[float]) -> tuple[list[dict], int]:
        """Collate ``pairs`` into micro-batches; returns them and the sequence length given to the schedule."""
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
        from posttrain.models.provider import build_attention_mask, position_ids_from_attention_mask
        from posttrain.models.value_model import pool_scores

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

    def train_step(self) -> dict[str, float]:
        """One optimiser step on the next global batch; returns the global metrics."""
        from posttrain.training import forward_backward, optimizer_step, zero_grad

        indices = next(self.sampler)
        pairs = [self.train_pairs[int(i)] for i in indices]
        micro_batches, seq_len = self._micro_batches(pairs, self.args.micro_batch_size, [1.0] * len(pairs))
        tokens = float(sum(int(b["attention_mask"].sum()) for b in micro_batches))
        self.ddp.train()
        zero_grad(self.ddp, self.optimizer)
        outputs = forward_backward(self.ddp, self._forward_step(normalizer=float(self.args.micro_batch_size)),
                                   micro_batches, seq_len, 2 * self.args.micro_batch_size, forward_only=False)
        applied, grad_norm = optimizer_step(self.ddp, self.optimizer, self.scheduler)
        metrics = finalize_pair_stats(_reduce_sums(outputs, self.device))
        metrics.update(grad_norm=grad_norm, lr=float(self.optimizer.param_groups[0]["lr"]),
                       tokens=_dp_sum(tokens, self.device), step_skipped=float(not applied))
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on every usable pair of ``--eval-data-path`` (each pair counted once).

        Pairs are dealt to DP ranks round-robin; ranks pad their last micro-batch (and, when the pair count does
        not divide evenly, add whole micro-batches) with weight-0 copies of a real pair, so every rank runs the same
        number of equally shaped micro-batches.
        """
        from posttrain import parallel
        from posttrain.training import forward_backward

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
        metrics = finalize_pair_stats(_reduce_sums(outputs, self.device))
        return {f"eval/{k}": v for k, v in metrics.items()}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write ``<save>/iter_XXXXXXX`` (see the module docstring) and return its reward-model directory."""
        from posttrain.models.checkpoint import save_model_checkpoint
        from posttrain.training import (begin_checkpoint, commit_checkpoint, is_rank0, rng_state,
                                        save_optimizer_state)

        root, iteration = Path(self.ckpt.save), self.iteration
        tmp = begin_checkpoint(root, iteration)
        save_model_checkpoint(self.ddp, tmp / MODEL_DIR, model_kind="value", tokenizer_dir=self.tokenizer_dir,
                              iteration=iteration, make_vocab_size_divisible_by=self.opt.make_vocab_size_divisible_by,
                              extra_meta={"stage": "rm", "score_pooling": self.score_pooling,
                                          "train_data": self.args.data_path,
                                          "initialised_from": str(self.args.pretrained_checkpoint or self.source),
                                          "eval": self.last_eval})
        save_optimizer_state(tmp / OPTIMIZER_DIR, self.ddp, self.optimizer, self.scheduler)
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / RNG_DIR / f"rank{torch.distributed.get_rank()}.pt")
        if is_rank0():
            state = {"iteration": iteration, "train_iters": self.train_iters, "sampler": self.sampler.state_dict(),
                     "eval": self.last_eval, "train_data": self.train_pairs.summary(),
                     "args": {title: asdict(obj) for (_, title), obj in zip(ARG_GROUPS, self._arg_objects())}}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str) + "\n")
        final = commit_checkpoint(root, iteration, tmp)
        return final / MODEL_DIR

    def _arg_objects(self):
        return self.args, self.par, self.opt, self.ckpt, self.log_args

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
        """Run to ``train_iters``; returns the final reward checkpoint (None without ``--save``)."""
        from posttrain.training import MetricsLogger

        self.logger = MetricsLogger(self.ckpt.save, self.log_args.tensorboard_dir, resume_iteration=self.iteration)
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
                    raise FloatingPointError(f"iteration {self.iteration}: non-finite loss {metrics['loss']}")
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
                self._print(self._eval_line(self.last_eval))
            if self.ckpt.save and saved_at != self.iteration and self.iteration > start_iteration:
                path = self.save()
            elif self.resume_dir is not None and self.iteration == start_iteration:
                path = self.resume_dir / MODEL_DIR  # nothing left to train: the loaded checkpoint is the result
        finally:
            self.logger.close()
        self._print(f"[rm] done: {self.iteration} iterations in {time.perf_counter() - start:.1f} s")
        if self.last_eval:
            self._print(f"[rm] held-out accuracy {self.last_eval['eval/accuracy']:.4f} on "
                        f"{self.last_eval['eval/num_pairs']} pairs")
        if path is not None:
            self._print(f"[rm] reward model checkpoint: {path}")
        return path


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv=None) -> int:
    """``pretrain_gpt.py --stage rm``: 0 on success; one ``error: ...`` line (rank 0) and 1 on bad input."""
    from posttrain.data.errors import DataError
    from posttrain.distributed import DistributedSetupError, destroy_distributed
    from posttrain.models.checkpoint import CheckpointError
    from posttrain.models.provider import UnsupportedModelError

    args = build_parser().parse_args(argv)
    input_errors = (ArgumentError, DistributedSetupError, CheckpointError, RewardDataError, DataError,
                    FileNotFoundError, UnsupportedModelError)
    try:
        try:
            groups = [dataclass_from_args(cls, args) for cls, _ in ARG_GROUPS]
            trainer = RewardModelTrainer(*groups)
        except ValueError as exc:  # set-up only: e.g. TP not dividing the heads (build_model)
            raise ArgumentError(_error_line(exc)) from exc
        trainer.train()
    except input_errors + (FloatingPointError,) as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {_error_line(exc)}", file=sys.stderr, flush=True)
        return 1
    finally:
        destroy_distributed()
    return 0
