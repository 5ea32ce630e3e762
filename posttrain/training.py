"""Training machinery shared by the stages: DDP wrapping, megatron optimiser and LR schedule, forward-backward
through megatron's pipeline schedules, training-state checkpoints and metric logging.

Everything that touches ``parallel_state`` for training lives here or in :mod:`posttrain.parallel`; the
stage trainers call these functions and never talk to process groups themselves.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from posttrain.arguments import OptimizerArgs


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP and Float16Module wrappers: the underlying GPTModel / value model."""
    while hasattr(model, "module"):
        model = model.module
    return model


def model_config(model: torch.nn.Module):
    """The TransformerConfig of a (possibly wrapped) megatron model."""
    return unwrap_model(model).config


def wrap_ddp(model: torch.nn.Module, use_distributed_optimizer: bool = False):
    """Wrap ``model`` in megatron-core ``DistributedDataParallel`` and register the gradient hooks the schedules use.

    Gradients are reduced in fp32 over the data-parallel group by ``finalize_model_grads`` (which also syncs tied
    embeddings across pipeline stages), as Megatron-LM's training loop does.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    config = model_config(model)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                              use_distributed_optimizer=use_distributed_optimizer), model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp


def build_optimizer(ddp_model, args: OptimizerArgs, train_iters: int, lr: Optional[float] = None):
    """Megatron optimiser (Adam, fp32 master weights when bf16) and ``OptimizerParamScheduler``.

    Args:
        ddp_model: the DDP-wrapped model.
        args: optimiser flags.
        train_iters: optimiser steps the schedule decays over.
        lr: peak learning rate (default ``args.lr``; the critic passes ``--critic-lr``).

    Returns:
        ``(optimizer, scheduler)``.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    lr = args.lr if lr is None else lr
    config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min(args.min_lr, lr), weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(config, [ddp_model])
    decay = max(1, train_iters)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else lr, max_lr=lr, min_lr=min(args.min_lr, lr),
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=decay, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=decay, wd_incr_style="constant")
    return optimizer, scheduler


def forward_backward(model, forward_step: Callable, micro_batches: list, seq_length: int, micro_batch_size: int,
                     forward_only: bool) -> list[dict]:
    """Run megatron's forward-backward schedule over ``micro_batches``.

    Args:
        model: the (DDP-wrapped) model chunk.
        forward_step: ``forward_step(micro_batch, model) -> (output, loss_func)`` as megatron expects, except that
            it receives the micro-batch itself.
        micro_batches: one entry per micro-batch; all have ``micro_batch_size`` rows and ``seq_length`` tokens
            (the pipeline's send/recv shape).
        forward_only: no backward pass.

    Returns:
        The ``loss_func`` metric dicts on the last pipeline stage (empty elsewhere). Note the schedule divides the
        loss it back-propagates by the number of micro-batches; the trainers' loss functions return losses already
        normalised by global counts and undo that division (see ``core_algos.agg_loss``).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterator = iter(micro_batches)

    def step(data_iterator, wrapped_model):
        return forward_step(next(data_iterator), wrapped_model)

    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iterator, model=[model], num_microbatches=len(micro_batches),
        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only)


def optimizer_step(ddp_model, optimizer, scheduler) -> tuple[bool, float]:
    """One optimiser step after a forward-backward; returns ``(applied, grad_norm)``.

    ``applied`` is False when the step was skipped (non-finite gradients).
    """
    success, grad_norm, _ = optimizer.step()
    if success:
        scheduler.step(increment=1)
    return bool(success), float(grad_norm) if grad_norm is not None else float("nan")


def zero_grad(ddp_model, optimizer) -> None:
    """Clear DDP's gradient buffers and the optimiser's gradients."""
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()


# ----------------------------------------------------------------------------------------------------------------
# Training-state checkpoints
# ----------------------------------------------------------------------------------------------------------------

TRACKER_FILE = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str | Path, iteration: int) -> Path:
    """``<root>/iter_0000010`` (Megatron's naming)."""
    return Path(root) / f"iter_{iteration:07d}"


def read_latest_iteration(root: str | Path) -> Optional[int]:
    """The iteration in ``<root>/latest_checkpointed_iteration.txt``, or None when there is none.

    Raises:
        ValueError: the tracker file does not hold an integer.
    """
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}") from None


def rng_state() -> dict:
    """This rank's Python, NumPy, torch and megatron RNG-tracker states."""
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_optimizer_state(directory: Path, ddp_model, optimizer, scheduler) -> None:
    """Save optimiser (sharded, dist_checkpointing) and scheduler state into ``directory`` (collective)."""
    from megatron.core import dist_checkpointing

    directory.mkdir(parents=True, exist_ok=True)
    model_sd = ddp_model.sharded_state_dict()
    state = {"optimizer": optimizer.sharded_state_dict(model_sd, metadata={
        "distrib_optim_sharding_type": "dp_reshardable"}), "scheduler": scheduler.state_dict()}
    dist_checkpointing.save(state, str(directory))


def load_optimizer_state(directory: Path, ddp_model, optimizer, scheduler) -> None:
    """Load what :func:`save_optimizer_state` wrote (any data-parallel size)."""
    from megatron.core import dist_checkpointing

    with torch.no_grad():
        model_sd = ddp_model.sharded_state_dict()
        template = {"optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata={
            "distrib_optim_sharding_type": "dp_reshardable"}), "scheduler": scheduler.state_dict()}
        state = dist_checkpointing.load(template, str(directory))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def begin_checkpoint(root: str | Path, iteration: int) -> Path:
    """Create the temporary directory a checkpoint is written into; :func:`commit_checkpoint` renames it."""
    tmp = Path(root) / f".iter_{iteration:07d}.tmp"
    if is_rank0():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    return tmp


def commit_checkpoint(root: str | Path, iteration: int, tmp: Path) -> Path:
    """Atomically publish a checkpoint: rename the temporary directory, then update the tracker file.

    A crash before the rename leaves the previous checkpoint and tracker untouched.
    """
    barrier()
    final = iteration_dir(root, iteration)
    if is_rank0():
        if final.exists():
            old = final.with_name(final.name + ".old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        tracker_tmp = Path(root) / (TRACKER_FILE + ".tmp")
        tracker_tmp.write_text(str(iteration))
        os.replace(tracker_tmp, Path(root) / TRACKER_FILE)
    barrier()
    return final


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------

class MetricsLogger:
    """Console lines, TensorBoard scalars and ``<save>/metrics.jsonl`` for one training run (rank 0 writes).

    Args:
        save_dir: where ``metrics.jsonl`` goes (None: no file).
        tensorboard_dir: TensorBoard log directory (None: no TensorBoard).
        resume_iteration: drop JSONL lines past this iteration when resuming, so the file has one line per
            iteration.
    """

    def __init__(self, save_dir: Optional[str], tensorboard_dir: Optional[str], resume_iteration: int = 0):
        self.enabled = is_rank0()
        self.jsonl = None
        self.writer = None
        if not self.enabled:
            return
        if save_dir:
            path = Path(save_dir) / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("iteration", 0) <= resume_iteration]
                path.write_text("".join(line + "\n" for line in kept))
            self.jsonl = open(path, "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)

    def log(self, iteration: int, metrics: dict[str, float], console_lines: Iterable[str] = ()) -> None:
        """Record one iteration's metrics (floats) and print ``console_lines``."""
        if not self.enabled:
            return
        for line in console_lines:
            print(line, flush=True)
        if self.jsonl is not None:
            record = {"iteration": iteration}
            record.update({k: (v if math.isfinite(v) else str(v)) if isinstance(v, float) else v
                           for k, v in metrics.items()})
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, iteration)
            self.writer.flush()

    def text(self, tag: str, text: str, iteration: int) -> None:
        """Log a text sample (TensorBoard) and print it."""
        if not self.enabled:
            return
        print(text, flush=True)
        if self.writer is not None:
            self.writer.add_text(tag, text, iteration)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


class Timer:
    """Wall-clock seconds per named phase: ``with timer("generate"): ...``; :meth:`pop` returns and resets."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.start
                return False

        return _Phase()

    def pop(self) -> dict[str, float]:
        times, self.times = self.times, {}
        return times


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error on stderr (rank 0) and exit with ``code``."""
    if is_rank0():
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
