"""Log-probabilities of chosen tokens straight from the final hidden states, without materialising the logits.

A causal LM's loss needs only ``log softmax(h W^T / T)[label]`` per position, yet megatron-core's output layer
produces the whole ``[s, b, V]`` logits, transposes them into a second ``[b, s, V]`` copy, and the backward pass
adds a contiguous ``[s, b, V]`` gradient next to the ``[V, h]`` weight gradient: for SmolLM2-135M's vocabulary
(49,152) at 8 x 64 response positions each such tensor is 100 MB in fp32, and at the start of the actor's
backward pass three of them are alive at once (docs/performance.md, fifth pass).

:func:`chosen_token_log_probs` computes the same quantity ``chunk_rows`` positions at a time: the forward keeps
only the per-row log-partition function, and the backward recomputes each chunk's logits (one more
``[rows, h] x [h, V]`` product) to form ``softmax - onehot`` for it, the gradient of megatron-core's
``vocab_parallel_cross_entropy`` (Megatron-LM; the same as ``torch.nn.functional.cross_entropy``'s). The idea is
that of fused linear cross-entropy kernels (Liger-Kernel's ``fused_linear_cross_entropy``; verl's
``FusedLinearForPPO``), here in plain torch ops.

It works on one tensor-parallel rank (the whole vocabulary in ``weight``); the trainers use it on CPU with
TP = PP = 1 only, the layout where one process holds the output layer (see
:meth:`posttrain.trl_ppo.forwards.PPOForwards._fused_output_head`).
"""
from __future__ import annotations

import torch


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 ``[rows, V] = hidden @ weight^T / temperature`` in the weight's dtype (as the output layer computes
    it), then upcast."""
    logits = torch.matmul(hidden.to(weight.dtype), weight.t()).float()
    return logits.div_(temperature) if temperature != 1.0 else logits


class _ChosenTokenLogProbs(torch.autograd.Function):
    """See :func:`chosen_token_log_probs`."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_rows):
        rows = hidden.shape[0]
        log_probs = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(log_probs)
        log_z = torch.empty_like(log_probs)
        for start in range(0, rows, chunk_rows):
            part = slice(start, start + chunk_rows)
            logits = _chunk_logits(hidden[part], weight, temperature)
            # the operations of megatron-core's vocab_parallel_cross_entropy: shift by the max, exp, sum, log
            maxima = logits.max(dim=-1, keepdim=True).values
            shifted = logits.sub_(maxima)
            chosen = shifted.gather(-1, labels[part, None])[:, 0]
            exp = shifted.exp()
            sum_exp = exp.sum(-1)
            log_sum = sum_exp.log()
            log_probs[part] = chosen - log_sum
            # entropy (a metric here) of posttrain.parallel.vocab_parallel_entropy: log(Z) - sum e x / Z
            entropy[part] = log_sum - exp.mul_(shifted).sum(-1) / sum_exp
            log_z[part] = maxima[:, 0] + log_sum
        ctx.save_for_backward(hidden, weight, labels, log_z)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy):
        hidden, weight, labels, log_z = ctx.saved_tensors
        temperature, chunk_rows = ctx.temperature, ctx.chunk_rows
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], chunk_rows):
            part = slice(start, start + chunk_rows)
            # d log p[label] / d logits = onehot(label) - softmax; the chain through the 1/T scaling adds 1/T
            grad_logits = _chunk_logits(hidden[part], weight, temperature).sub_(log_z[part, None]).exp_()
            grad_logits.scatter_add_(-1, labels[part, None], grad_logits.new_full((grad_logits.shape[0], 1), -1.0))
            grad_logits.mul_(grad_log_probs[part, None] * (-1.0 / temperature))
            grad_logits = grad_logits.to(weight.dtype)
            if need_hidden:
                grad_hidden[part] = torch.matmul(grad_logits, weight).to(hidden.dtype)
            if need_weight and weight.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), hidden[part])
            elif need_weight:  # a low-precision product (as the output layer's), summed over chunks in fp32
                grad_weight.add_(torch.matmul(grad_logits.t(), hidden[part].to(weight.dtype)))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chosen_token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           temperature: float = 1.0, chunk_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(hidden @ weight^T / temperature)[labels]`` and the softmax's entropy, ``chunk_rows`` rows of
    logits at a time (differentiable in ``hidden`` and ``weight``; the entropy is a metric, without gradient).

    Args:
        hidden: ``[..., h]`` final hidden states (after the final norm), any float dtype.
        weight: ``[V, h]`` output-layer weight over the real vocabulary (padded rows removed: their logits would
            only be masked out).
        labels: ``[...]`` int64 token ids in ``[0, V)``.
        temperature: the sampling temperature the logits are divided by.
        chunk_rows: positions per chunk; 0 picks about 32 MiB of fp32 logits per chunk (equal chunks).

    Returns:
        ``(log_probs, entropy)``, both ``[...]`` fp32 in nats; equal to megatron-core's
        ``vocab_parallel_cross_entropy`` (negated) and :func:`posttrain.parallel.vocab_parallel_entropy` over the
        full logits up to the rounding of the products (tests/models/test_output_head.py).

    Raises:
        ValueError: ``labels`` does not match ``hidden``'s leading shape.
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states {tuple(hidden.shape)}")
    rows = chunk_rows
    if not rows:  # about 32 MiB of fp32 logits per chunk, the positions split evenly over the chunks
        positions = labels.numel()
        chunks = max(1, -(-positions // max(16, (1 << 23) // weight.shape[0])))
        rows = max(1, -(-positions // chunks))
    log_probs, entropy = _ChosenTokenLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                    labels.reshape(-1), float(temperature), rows)
    return log_probs.view(labels.shape), entropy.view(labels.shape)
