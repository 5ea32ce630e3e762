"""Megatron-core training machinery shared by every stage: DDP, optimiser and LR schedule, forward-backward through
megatron's pipeline schedules, one optimiser step.

Together with :mod:`posttrain.parallel` (collectives) this is everything that talks to megatron-core's training
API; the stage trainers call these functions and never build schedules or optimisers themselves.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from posttrain.arguments import ArgumentError, OptimizerArgs


def wrap_ddp(model: torch.nn.Module, use_distributed_optimizer: bool = False) -> DistributedDataParallel:
    """Wrap ``model`` in megatron-core ``DistributedDataParallel`` and register the gradient hooks the schedules use.

    Gradients are reduced in fp32 over the data-parallel group by ``finalize_model_grads`` (which also syncs tied
    embeddings across pipeline stages), as Megatron-LM's training loop does.
    """
    config = get_model_config(model)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                              use_distributed_optimizer=use_distributed_optimizer), model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp


def build_optimizer(ddp_model: DistributedDataParallel, args: OptimizerArgs, train_steps: int, *, bf16: bool,
                    lr: Optional[float] = None):
    """Megatron optimiser (Adam, fp32 master weights when bf16) and ``OptimizerParamScheduler``.

    Args:
        ddp_model: the DDP-wrapped model.
        args: optimiser flags.
        train_steps: optimiser steps the schedule decays over.
        bf16: the model's parameters are bf16 (fp32 master weights are kept).
        lr: peak learning rate (default ``args.lr``; the PPO critic passes ``--critic-lr``).

    Returns:
        ``(optimizer, scheduler)``.

    Raises:
        ArgumentError: ``--lr-warmup-iters`` is not smaller than ``train_steps`` (the schedule would have no decay).
    """
    lr = args.lr if lr is None else lr
    if args.lr_warmup_iters and args.lr_warmup_iters >= max(1, train_steps):
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than the {max(1, train_steps)} "
                            "optimiser steps the learning rate is scheduled over (--train-iters / --num-epochs)")
    config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min(args.min_lr, lr), weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(config, [ddp_model])
    use_fused_torch_adam(optimizer)
    decay = max(1, train_steps)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else lr, max_lr=lr, min_lr=min(args.min_lr, lr),
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=decay, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=decay, wd_incr_style="constant")
    return optimizer, scheduler


def _torch_optimizers(optimizer) -> list:
    """The ``torch.optim`` optimizers inside a megatron optimizer (chained or not)."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    found = []
    for item in inner:
        base = getattr(item, "optimizer", None)
        if isinstance(base, torch.optim.Optimizer):
            found.append(base)
    return found


def use_fused_torch_adam(optimizer) -> int:
    """Switch megatron's fallback ``torch.optim.Adam(W)`` (used without Transformer Engine and apex) to torch's
    fused kernel, which updates each parameter in one pass instead of about ten (same update rule; on the
    2-core CPU of docs/performance.md an Adam step over 135M parameters drops from 0.67 s to 0.07 s).

    Returns:
        The number of torch optimizers switched (0 with TE / apex optimizers, which are fused already).
    """
    switched = 0
    for opt in _torch_optimizers(optimizer):
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        devices = {p.device.type for group in opt.param_groups for p in group["params"]}
        if not devices <= {"cpu", "cuda"}:
            continue
        opt.defaults.update(fused=True, foreach=False)
        for group in opt.param_groups:
            group.update(fused=True, foreach=False)
        switched += 1
    return switched


def forward_backward(model: torch.nn.Module, forward_step: Callable, micro_batches: list, seq_length: int,
                     micro_batch_size: int, forward_only: bool) -> list[dict]:
    """Run megatron's forward-backward schedule over ``micro_batches``.

    Args:
        model: the (DDP-wrapped) model chunk.
        forward_step: ``forward_step(micro_batch, model) -> (output, loss_func)`` as megatron expects, except that
            it receives the micro-batch itself.
        micro_batches: one entry per micro-batch; with pipeline parallelism all have ``micro_batch_size`` rows and
            ``seq_length`` tokens (the send/recv shape between stages).
        seq_length, micro_batch_size: that shape.
        forward_only: no backward pass.

    Returns:
        The ``loss_func`` metric dicts on the last pipeline stage (empty elsewhere). The schedule divides the loss
        it back-propagates by the number of micro-batches; the stages' loss functions return losses already
        normalised by global counts and undo that division (see ``core_algos.agg_loss``).
    """
    iterator = iter(micro_batches)

    def step(data_iterator, wrapped_model):
        return forward_step(next(data_iterator), wrapped_model)

    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iterator, model=[model], num_microbatches=len(micro_batches),
        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only)


def optimizer_step(optimizer, scheduler) -> tuple[bool, float]:
    """One optimiser step after a forward-backward; returns ``(applied, grad_norm)``.

    ``applied`` is False when the step was skipped (non-finite gradients); the LR schedule advances only with an
    applied step.
    """
    success, grad_norm, _ = optimizer.step()
    if success:
        scheduler.step(increment=1)
    return bool(success), float(grad_norm) if grad_norm is not None else float("nan")


def release_grad_buffers(ddp_model: DistributedDataParallel) -> None:
    """Free ``ddp_model``'s gradient buffers between its optimiser steps (megatron-core's
    ``offload_grad_buffers``: the storage is resized to 0, every ``main_grad`` / bucket view stays a valid tensor
    object). Gradients are dead between steps (each step starts from zeroed buffers), so this changes no result;
    it saves one fp32 copy of the model's trained parameters while other models run. Idempotent."""
    on_gpu = torch.cuda.is_available()
    with warnings.catch_warnings():  # megatron-core resizes through the deprecated TypedStorage API
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        ddp_model.offload_grad_buffers(synchronize=on_gpu, empty_cache=on_gpu)


def restore_grad_buffers(ddp_model: DistributedDataParallel) -> None:
    """Re-allocate, zeroed, the gradient buffers :func:`release_grad_buffers` freed (no-op when they are held)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        ddp_model.restore_grad_buffers(synchronize=torch.cuda.is_available())


def zero_grad(ddp_model: DistributedDataParallel, optimizer) -> None:
    """Clear DDP's gradient buffers and the optimiser's gradients."""
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
