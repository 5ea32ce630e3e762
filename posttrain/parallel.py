"""The parallelism layer: the one place the stages talk to megatron-core's process groups.

* vocabulary-parallel log-probabilities and entropy over logits sharded ``[..., V/TP]`` across tensor-parallel
  ranks (no rank ever materialises the full vocabulary for training);
* broadcasts of results computed on the last pipeline stage to every stage;
* sums and maxima over the data-parallel group, including the injected reduction that makes ``core_algos``
  statistics (advantage whitening, token counts) global.

Collectives run on :func:`comm_device` (the GPU with NCCL, the CPU with gloo); tensors living elsewhere are moved
there and back. :mod:`posttrain.trl_ppo.core_algos` stays free of all of this; the trainers compose the two.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
)


def comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device with NCCL, else the CPU."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on_comm_device(tensor: torch.Tensor, collective: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Run the in-place ``collective`` on ``tensor``, moving it to :func:`comm_device` and back when needed."""
    device = comm_device()
    if tensor.device == device:
        collective(tensor)
        return tensor
    moved = tensor.to(device)
    collective(moved)
    tensor.copy_(moved)
    return tensor


def tp_world_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def pp_world_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def is_last_stage() -> bool:
    return parallel_state.is_pipeline_last_stage()


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the logits of padded vocabulary entries (ids ``>= vocab_size``) to a large negative value.

    Args:
        logits: ``[..., V_padded / TP]`` this rank's vocabulary shard.
        vocab_size: the real (unpadded) vocabulary size.

    Returns:
        ``logits`` itself when nothing is padded on this shard, else a masked copy.
    """
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    if start + shard <= vocab_size:
        return logits
    ids = torch.arange(start, start + shard, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, torch.finfo(logits.dtype).min / 2)


def vocab_parallel_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[label]`` with the vocabulary sharded over tensor-parallel ranks (differentiable).

    Uses megatron-core's ``vocab_parallel_cross_entropy`` (an all-reduce of the max and of the partition function
    over the TP group), so it equals ``log_softmax(full_logits).gather(-1, labels)`` of the gathered logits.

    Megatron's kernel works in place: an fp32 ``logits`` tensor is overwritten (compute anything else that needs
    the logits, such as :func:`vocab_parallel_entropy`, first).

    Args:
        logits: ``[batch, seq, V/TP]`` float (computed in fp32).
        labels: ``[batch, seq]`` int64 token ids in the full vocabulary.

    Returns:
        ``[batch, seq]`` fp32 log-probabilities in nats.
    """
    return -vocab_parallel_cross_entropy(logits.float(), labels)


def vocab_parallel_entropy(logits: torch.Tensor, chunk_rows: int = 64) -> torch.Tensor:
    """Entropy of the softmax of logits sharded over TP ranks (differentiable).

    ``H = logsumexp(x) - sum_v softmax(x)_v x_v``, computed on ``x - max(x)`` (the global max over the TP group)
    as ``log(Z) - sum_v e_v (x_v - max) / Z`` with ``e = exp(x - max)`` and ``Z = sum_v e_v``: every term is
    bounded, and for peaked distributions (``Z`` close to 1) the two terms are small and subtract without
    cancellation. Its error against a float64 evaluation is checked in tests/test_parallel.py, including logits
    scaled by 30.

    Without autograd (grad mode off, or logits that need no gradient: the entropy as a metric) the rows are
    processed ``chunk_rows`` at a time, so the temporaries are ``[chunk_rows, V/TP]`` instead of three copies of
    the logits (3 x 100 MB for ``[8, 64, 49152]`` fp32); each row's value is computed by the same operations either
    way.

    Args:
        logits: ``[batch, seq, V/TP]``.
        chunk_rows: rows of ``[batch * seq, V/TP]`` per step on the gradient-free path.

    Returns:
        ``[batch, seq]`` fp32 entropy in nats.
    """
    logits = logits.float()
    with torch.no_grad():
        local_max = logits.max(dim=-1, keepdim=True).values
        if tp_world_size() > 1:
            torch.distributed.all_reduce(local_max, op=torch.distributed.ReduceOp.MAX,
                                         group=parallel_state.get_tensor_model_parallel_group())
    if torch.is_grad_enabled() and logits.requires_grad:
        shifted = logits - local_max
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        weighted = (exp * shifted).sum(-1)
    else:
        rows, maxima = logits.reshape(-1, logits.shape[-1]), local_max.reshape(-1, 1)
        sum_exp = torch.empty(rows.shape[0], dtype=rows.dtype, device=rows.device)
        weighted = torch.empty_like(sum_exp)
        with torch.no_grad():
            for start in range(0, rows.shape[0], chunk_rows):
                part = slice(start, start + chunk_rows)
                shifted = rows[part] - maxima[part]
                exp = shifted.exp()
                sum_exp[part] = exp.sum(-1)
                weighted[part] = exp.mul_(shifted).sum(-1)
        sum_exp, weighted = sum_exp.view(logits.shape[:-1]), weighted.view(logits.shape[:-1])
    if tp_world_size() > 1:
        sum_exp = reduce_from_tensor_model_parallel_region(sum_exp)
        weighted = reduce_from_tensor_model_parallel_region(weighted)
    return sum_exp.log() - weighted / sum_exp


def broadcast_from_last_stage(tensor: Optional[torch.Tensor], shape, dtype) -> torch.Tensor:
    """Give every pipeline stage the tensor the last stage computed (no-op without pipeline parallelism).

    Args:
        tensor: the value on the last stage (ignored elsewhere).
        shape, dtype: of the tensor (known on every stage).

    Returns:
        The tensor, on :func:`comm_device` on the stages that received it.
    """
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    if not parallel_state.is_pipeline_last_stage():
        tensor = torch.empty(shape, dtype=dtype, device=comm_device())
    tensor = tensor.contiguous()
    return _on_comm_device(tensor, lambda t: torch.distributed.broadcast(
        t, src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group()))


def broadcast_object_from_last_stage(obj):
    """The last pipeline stage's picklable ``obj`` on every stage (e.g. loss metrics only it computed)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                            group=parallel_state.get_pipeline_model_parallel_group(),
                                            device=comm_device())
    return holder[0]


def dp_all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """In-place sum (or ``op``) over the data-parallel group; returns the tensor (on its own device)."""
    if parallel_state.get_data_parallel_world_size() > 1:
        _on_comm_device(tensor, lambda t: torch.distributed.all_reduce(
            t, op=op or torch.distributed.ReduceOp.SUM, group=parallel_state.get_data_parallel_group()))
    return tensor


def dp_reduce_fn() -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``reduce_fn`` that makes ``core_algos`` statistics global: a sum over data-parallel ranks."""

    def reduce(local: torch.Tensor) -> torch.Tensor:
        out = local.detach().clone().float()
        return dp_all_reduce(out).to(local.dtype)

    return reduce


def dp_world_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()
