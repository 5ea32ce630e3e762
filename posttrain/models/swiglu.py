"""SwiGLU that keeps only its input for the backward pass, for the local (non-Transformer-Engine) layer spec on CPU.

megatron-core's unfused gated MLP computes ``silu(gate) * up`` with autograd ops that keep, until the layer's
backward, the fc1 output ``[s, b, 2f]`` (``gate`` and ``up`` are views of it) and two more ``[s, b, f]`` tensors
(``silu(gate)`` among them) besides the product that fc2 keeps. Its fused path (``bias_activation_fusion``) keeps
only the fc1 output and recomputes ``silu(gate)`` in the backward, but its kernels go through ``torch.compile``,
which on CPU needs a C++ toolchain at run time. :class:`MemoryEfficientSwiGLU` does what the fused path does with
eager torch ops: per layer of SmolLM2-135M at 8 x 127 tokens the tensors kept for the backward fall from 52.7 to
40.8 MiB (357 MiB less over its 30 layers, for each trained model), and the gradients are bitwise those of the
unfused ops (the same ``silu``, ``silu_backward`` and products, recomputed).

:func:`posttrain.models.provider._layer_spec` plugs it in through megatron-core's own hook for a module-valued
activation (``MLPSubmodules.activation_func`` with ``config.use_te_activation_func``), which hands the module the
whole fc1 output. Its output, fc2's input, is freed after the MLP's forward and recomputed for fc2's backward
(:func:`posttrain.models.output_release.release_output_after`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLUFunction(torch.autograd.Function):
    """``silu(x[..., :f]) * x[..., f:]`` saving only ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(x, 2, dim=-1)
        ctx.save_for_backward(x)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        gate, up = torch.chunk(x, 2, dim=-1)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        grad_up = grad * F.silu(gate)
        return torch.cat([grad_gate, grad_up], dim=-1)


class MemoryEfficientSwiGLU(torch.nn.Module):
    """SwiGLU over the fc1 output of a gated MLP: ``[..., 2f] -> [..., f]``, ``silu(first half) * second half``
    (Shazeer 2020, "GLU Variants Improve Transformer"; megatron-core's ``glu`` with ``F.silu``).

    Args:
        config: the layer's ``TransformerConfig`` (megatron's ``build_module`` passes it; unused).
    """

    def __init__(self, config=None):
        super().__init__()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """Nothing to checkpoint (no parameters); megatron's MLP asks each child module for its shards."""
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[s, b, 2f]`` -> ``[s, b, f]``; only ``x`` is kept for the backward pass."""
        if not torch.is_grad_enabled() or not x.requires_grad:
            gate, up = torch.chunk(x, 2, dim=-1)
            return F.silu(gate) * up
        return _SwiGLUFunction.apply(x)
