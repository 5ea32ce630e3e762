"""Free an intermediate activation once its consumer has run and recompute it just before its consumer's backward.

In a transformer layer the outputs of the RMSNorms and of the SwiGLU are kept until the backward pass only because
the linear layer that reads them (QKV, fc1, fc2) needs its input for its weight gradient; each is cheap to recompute
from its own input, which is kept anyway. megatron-core does this with ``CheckpointWithoutOutput`` (its ``layernorm``
and ``moe_act`` recomputation, "output-discarding checkpointing"); :func:`release_output_after` applies the same
mechanism to any producer / consumer pair of modules: the producer's forward runs without autograd and keeps its
inputs, its output's storage is freed when the consumer's forward returns, and a hook on the consumer's output
recomputes it (with autograd, so the producer's gradients are those of its own ops) when that output's gradient
arrives, i.e. before anything in the consumer's backward reads it.

The CPU layer spec uses it for both norms and the SwiGLU of every layer (:func:`posttrain.models.provider.build_model`):
per layer of SmolLM2-135M at 8 x 127 tokens 2 x 2 x 2.34 MiB (each norm's normalised input and output) and 5.95 MiB
(the SwiGLU output) fewer, for one recomputation of three element-wise functions per layer and step
(docs/performance.md, fifth pass). megatron-core's own ``--recompute-modules layernorm`` builds
``CheckpointWithoutOutput()`` with its default ``fp8=False``, which it reads as "FP8 on" and then needs Transformer
Engine, so it cannot run on CPU in megatron-core 0.16.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import CheckpointWithoutOutput


class _ReleasedForward:
    """Replaces ``producer.forward`` (see :func:`release_output_after`)."""

    def __init__(self, producer: torch.nn.Module):
        self.run = producer.forward  # the bound original
        self.pending = None

    def __call__(self, *args):
        if not torch.is_grad_enabled() or not any(torch.is_tensor(a) and a.requires_grad for a in args):
            return self.run(*args)
        checkpoint = CheckpointWithoutOutput(fp8=None)  # its argument is the config's fp8 format; None: no FP8
        self.pending = checkpoint
        return checkpoint.checkpoint(self.run, *args)

    def release(self, consumer: torch.nn.Module, args, output) -> None:
        """Forward hook of the consumer: free the producer's last output, recompute it from the consumer's output
        gradient. Nothing to do when the producer's last call kept no graph."""
        checkpoint, self.pending = self.pending, None
        hook_tensor = output[0] if isinstance(output, (tuple, list)) else output
        if checkpoint is not None and torch.is_tensor(hook_tensor) and hook_tensor.requires_grad:
            checkpoint.discard_output_and_register_recompute(hook_tensor)


def release_output_after(producer: torch.nn.Module, consumer: torch.nn.Module) -> None:
    """Free ``producer``'s output (a tensor or a tuple of tensors) after each forward of ``consumer`` that records
    gradients, and recompute it when the gradient of ``consumer``'s output (its first element if a tuple) is
    computed.

    The caller guarantees that nothing but ``consumer`` reads the producer's output and that the consumer's output
    gradient is computed before the consumer's backward reads it (true of a module and its caller's next module:
    norm -> attention, norm -> MLP, activation -> the MLP that calls it). Values and gradients are unchanged; the
    producer's parameters receive their gradients from the recomputation. Without autograd (``no_grad``, inputs
    that need no gradient) the producer runs as before.

    Raises:
        ValueError: ``producer`` is already released after a consumer.
    """
    if isinstance(producer.__dict__.get("forward"), _ReleasedForward):
        raise ValueError(f"{type(producer).__name__} already frees its output after a consumer")
    released = _ReleasedForward(producer)
    producer.forward = released
    consumer.register_forward_hook(released.release)
