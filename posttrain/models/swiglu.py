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
whole fc1 output.

Its output (fc2's input, ``[s, b, f]``) is kept by fc2 for fc2's weight gradient. :func:`release_outputs_after_fc2`
lets each MLP free it once fc2 has run and recompute it from the kept input just before fc2's backward
(megatron-core's ``CheckpointWithoutOutput``, the mechanism of its ``moe_act`` recomputation): 5.95 of the 40.8 MiB
per layer at 8 x 127 tokens (179 MiB over SmolLM2-135M's 30 layers), for one SwiGLU (two element-wise passes over
``[s, b, f]``) recomputed per layer in the backward. The gradients stay bitwise those of the unfused ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import CheckpointWithoutOutput


def _swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


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

    Attributes:
        release_output: set by :func:`release_outputs_after_fc2`; the output is then computed through
            ``CheckpointWithoutOutput`` and freed by the MLP's forward hook.
    """

    def __init__(self, config=None):
        super().__init__()
        self.release_output = False
        self._checkpoint = None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """Nothing to checkpoint (no parameters); megatron's MLP asks each child module for its shards."""
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[s, b, 2f]`` -> ``[s, b, f]``; only ``x`` is kept for the backward pass."""
        if not torch.is_grad_enabled() or not x.requires_grad:
            return _swiglu(x)
        if self.release_output:
            self._checkpoint = CheckpointWithoutOutput(fp8=None)  # its argument is the config's fp8 format
            return self._checkpoint.checkpoint(_swiglu, x)
        return _SwiGLUFunction.apply(x)

    def discard_output(self, hook_tensor: torch.Tensor) -> None:
        """Free the last output's storage; it is recomputed when ``hook_tensor``'s gradient is computed (which
        must happen before anything reads the output again: the MLP's output qualifies). No-op when the last
        forward kept nothing (no autograd) or ``hook_tensor`` needs no gradient."""
        checkpoint, self._checkpoint = self._checkpoint, None
        if checkpoint is not None and hook_tensor.requires_grad:
            checkpoint.discard_output_and_register_recompute(hook_tensor)


def _discard_after_mlp(mlp: torch.nn.Module, args, output) -> None:
    if isinstance(mlp.activation_func, MemoryEfficientSwiGLU):  # (unless it was replaced since)
        mlp.activation_func.discard_output(output[0] if isinstance(output, tuple) else output)


def release_outputs_after_fc2(model: torch.nn.Module) -> int:
    """Make every MLP of ``model`` whose activation is a :class:`MemoryEfficientSwiGLU` free the activation's output
    after the MLP's forward (fc2 has consumed it) and recompute it before fc2's backward.

    Returns:
        The number of MLPs changed.
    """
    changed = 0
    for module in model.modules():
        activation = getattr(module, "activation_func", None)
        if isinstance(activation, MemoryEfficientSwiGLU) and hasattr(module, "linear_fc2"):
            activation.release_output = True
            module.register_forward_hook(_discard_after_mlp)
            changed += 1
    return changed
