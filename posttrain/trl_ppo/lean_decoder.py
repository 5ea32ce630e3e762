"""A lean KV-cached forward over a megatron-core GPT model's own weights, for rollouts on CPU.

megatron-core's inference path pays, for every generated token, its pipeline schedule, its inference-context
bookkeeping, a rotary table rebuilt for the whole context, grouped-query keys copied per head, and dozens of small
modules' Python overhead; on a CPU, where a decoding step of a 135M model is a few tens of milliseconds of
memory-bound matrix-vector products, that overhead dominates. :class:`LeanDecoder` runs the same arithmetic with
plain torch ops over the same parameter tensors (no copies: a weight update is seen at once):

* embedding lookup; per layer ``RMSNorm -> QKV -> RoPE -> attention over the cache -> output projection ->
  residual -> RMSNorm -> SwiGLU MLP -> residual``; final RMSNorm; the output layer on the last position only;
* the layout conventions of megatron-core: the fused QKV weight holds, per query group, its query heads then one
  key and one value head; RoPE is non-interleaved and applied at each token's absolute index in the padded row
  (as megatron-core does, ignoring ``position_ids``); masked attention scores are -10000 before the softmax, as
  megatron's local attention writes them;
* a static key/value cache ``[layers, batch, groups, max_len, head_dim]`` written in place;
* outside the CPU adaptation's global torch-function mode (:func:`posttrain.cpu_backend.suspended`): nothing here
  asks for CUDA, so no op needs rewriting;
* matrix products through oneDNN with weights packed once per rollout (``torch.ops.mkldnn``, the kernels torch's
  own CPU compiler uses): a decoding step multiplies a few rows by every weight matrix, a shape for which the
  default BLAS streams the weights from memory at a fraction of the bandwidth oneDNN reaches (on the 2-core
  machine of docs/performance.md, 4.6 against 12-16 GB/s). The packed copy (one more copy of the weights) lives
  as long as the decoder. Without oneDNN the weights are used as they are.

It is chosen by :func:`posttrain.trl_ppo.rollout.generate` only where it applies (:meth:`LeanDecoder.supports`:
no CUDA, one tensor- and one pipeline-parallel rank, a dense model with megatron's local layers); everything else
decodes through megatron-core's own inference path. Tests compare the two token for token.

:class:`LeanForward` is the same transformer without a cache, over whole padded sequences, for the experience
phase's gradient-free forwards (the actor's old log-probs, the reference's log-probs, the critic's values, the
reward model's scores): one fused ``scaled_dot_product_attention`` call per layer (as
:class:`~posttrain.models.sdpa_attention.SDPADotProductAttention`), plain ``F.linear`` products over the weights as
they are (at ``batch x seq`` rows torch's ``mm`` runs at its full rate, through oneDNN where
:mod:`posttrain.cpu_matmul` chose it, so nothing is packed or copied), the
batch-major ``[b, s, h]`` layout throughout, and the output layer or value head on the positions asked for only.
It returns what the megatron model returns for the same inputs (bit for bit on SmolLM2-135M in the
experience phase; tests allow rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from posttrain import cpu_backend
from posttrain.models.provider import model_info, unwrap_model

MASKED_SCORE = -10000.0
"""The attention score megatron-core's local attention gives masked keys (``attention_mask_func``)."""


def _supported(model: torch.nn.Module, kinds: tuple[str, ...]) -> bool:
    """No CUDA, TP = PP = 1, a model of one of ``kinds`` built with megatron-core's local layer spec, dense, with
    RMSNorm, SwiGLU, non-interleaved RoPE and no linear biases other than the QKV's."""
    if torch.cuda.is_available():
        return False
    info = model_info(model)
    if info is None or info.kind not in kinds or info.transformer_impl != "local":
        return False
    if (parallel_state.get_tensor_model_parallel_world_size() != 1
            or parallel_state.get_pipeline_model_parallel_world_size() != 1):
        return False
    inner = unwrap_model(model)
    config = inner.config
    return (not config.num_moe_experts and config.gated_linear_unit and config.activation_func is F.silu
            and config.normalization == "RMSNorm" and not config.rotary_interleaved and not config.add_bias_linear
            and not config.qk_layernorm and getattr(inner, "position_embedding_type", None) == "rope")


def _rope_table(inner, max_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``[max_len, head_dim]`` of megatron-core's non-interleaved RoPE at positions ``0 .. max_len-1``."""
    rotary = inner.rotary_pos_emb
    positions = torch.arange(max_len, dtype=rotary.inv_freq.dtype, device=rotary.inv_freq.device)
    if rotary.seq_len_interpolation_factor is not None:
        positions *= 1 / rotary.seq_len_interpolation_factor
    freqs = torch.outer(positions, rotary.inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim], non-interleaved
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` ``[..., s, d]`` with ``cos``/``sin`` ``[s, d]`` (non-interleaved halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class _Linear:
    """``y = x W^T (+ b)`` with ``W`` packed for oneDNN when it is available (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: int):
        self.bias = bias
        self.out_features = weight.shape[0]
        self.packed = None
        if _ONEDNN:
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
            except RuntimeError:
                # oneDNN packs bf16 weights only on CPUs with AVX512-BW/VL/DQ or AVX-NE-CONVERT; elsewhere the
                # product stays with F.linear.
                self.packed = None
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: _Linear
    proj: _Linear
    mlp_norm: torch.Tensor
    fc1: _Linear
    fc2: _Linear


class LeanDecoder:
    """Prefill and one-token decoding steps over a GPT model's weights (see the module docstring).

    Args:
        model: a causal-LM model from :func:`posttrain.models.build_model` (any wrapper) for which
            :meth:`supports` is True.
        batch: rows decoded together. max_len: prompt plus response budget, in tokens.
    """

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int):
        inner = unwrap_model(model)
        config = inner.config
        self.eps = config.layernorm_epsilon
        self.heads = config.num_attention_heads
        self.groups = config.num_query_groups or config.num_attention_heads
        self.head_dim = config.kv_channels
        self.scale = inner.decoder.layers[0].self_attention.core_attention.softmax_scale
        self.embedding = inner.embedding.word_embeddings.weight
        output_weight = (inner.shared_embedding_or_output_weight() if inner.share_embeddings_and_output_weights
                         else inner.output_layer.weight)
        self.output = _Linear(output_weight, None, batch)
        self.final_norm = inner.decoder.final_layernorm.weight
        self.layers = []
        for layer in inner.decoder.layers:
            attention, mlp = layer.self_attention, layer.mlp
            qkv_bias = attention.linear_qkv.bias
            self.layers.append(_Layer(
                input_norm=layer.input_layernorm.weight,
                qkv=_Linear(attention.linear_qkv.weight, qkv_bias if qkv_bias is not None and qkv_bias.numel()
                            else None, batch),
                proj=_Linear(attention.linear_proj.weight, None, batch), mlp_norm=layer.pre_mlp_layernorm.weight,
                fc1=_Linear(mlp.linear_fc1.weight, None, batch), fc2=_Linear(mlp.linear_fc2.weight, None, batch)))
        dtype = self.embedding.dtype
        self.cos, self.sin = _rope_table(inner, max_len, dtype)
        shape = (len(self.layers), batch, self.groups, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=self.embedding.device)
        self.values = torch.zeros(shape, dtype=dtype, device=self.embedding.device)
        self.length = 0  # cache positions filled

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """Whether this decoder reproduces ``model``: no CUDA, TP = PP = 1, a dense causal LM built with
        megatron-core's local layer spec (RMSNorm, SwiGLU, no MoE, non-interleaved RoPE)."""
        return _supported(model, ("causal_lm",))

    # ------------------------------------------------------------------ the transformer
    def _rope(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """``x`` ``[b, heads, s, d]`` rotated at absolute positions ``start .. start + s - 1``."""
        s = x.shape[2]
        return _rotate(x, self.cos[start:start + s], self.sin[start:start + s])

    def _attention(self, index: int, layer: _Layer, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Self-attention of ``x`` ``[b, s, h]`` (the next ``s`` positions) over the cache and itself.

        ``key_mask`` is ``[b, 1, s, length + s]`` (or broadcastable), True where a key is masked.
        """
        b, s, _ = x.shape
        per_group = self.heads // self.groups
        qkv = layer.qkv(x)
        qkv = qkv.view(b, s, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = qkv.split([per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(b, s, self.heads, self.head_dim).transpose(1, 2)  # [b, heads, s, d]
        k = k.transpose(1, 2)  # [b, groups, s, d]
        start = self.length
        q, k = self._rope(q, start), self._rope(k, start)
        self.keys[index, :, :, start:start + s] = k
        self.values[index, :, :, start:start + s] = v.transpose(1, 2)
        keys = self.keys[index, :, :, :start + s]  # [b, groups, T, d]
        values = self.values[index, :, :, :start + s]
        # grouped-query attention without copying keys: [b, groups, per_group * s, d] x [b, groups, d, T]
        q = q.reshape(b, self.groups, per_group * s, self.head_dim)
        scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(self.scale)
        scores = scores.view(b, self.groups, per_group, s, start + s)
        scores.masked_fill_(key_mask.unsqueeze(1), MASKED_SCORE)
        probs = torch.softmax(scores, dim=-1).view(b, self.groups, per_group * s, start + s)
        context = torch.matmul(probs, values).view(b, self.heads, s, self.head_dim)
        context = context.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return layer.proj(context)

    def _forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Run the layers over ``hidden`` ``[b, s, h]``; returns fp32 logits ``[b, V_padded]`` of the last position."""
        shape = (hidden.shape[-1],)
        for index, layer in enumerate(self.layers):
            normed = F.rms_norm(hidden, shape, layer.input_norm, self.eps)
            hidden = hidden + self._attention(index, layer, normed, key_mask)
            normed = F.rms_norm(hidden, shape, layer.mlp_norm, self.eps)
            gate, up = layer.fc1(normed).chunk(2, dim=-1)
            hidden = hidden + layer.fc2(F.silu(gate) * up)
        self.length += hidden.shape[1]
        last = F.rms_norm(hidden[:, -1], shape, self.final_norm, self.eps)
        return self.output(last).float()

    @torch.no_grad()
    @cpu_backend.suspended()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encode left-padded prompts into the cache.

        Args:
            input_ids: ``[b, s]`` int64. attention_mask: ``[b, 1, s, s]`` bool, True = masked (the model's mask,
                see :func:`posttrain.models.provider.build_attention_mask`).

        Returns:
            ``[b, V_padded]`` fp32 logits of the last position.
        """
        self.length = 0
        return self._forward(F.embedding(input_ids, self.embedding), attention_mask)

    @torch.no_grad()
    @cpu_backend.suspended()
    def step(self, tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Append one token per row.

        Args:
            tokens: ``[b]`` int64. key_mask: ``[b, 1, 1, length + 1]`` bool, True where a key (cache and the new
                token) is masked.

        Returns:
            ``[b, V_padded]`` fp32 logits.
        """
        return self._forward(F.embedding(tokens[:, None], self.embedding), key_mask)


class LeanForward:
    """Gradient-free forward of a whole padded batch over a GPT model's (or value model's) own weights (see the
    module docstring); the experience phase's forwards at TP = PP = 1 on CPU.

    Args:
        model: a model from :func:`posttrain.models.build_model` (any wrapper) for which :meth:`supports` is True.
            Its parameters are read at every call, so updates are seen at once.
    """

    def __init__(self, model: torch.nn.Module):
        self.inner = unwrap_model(model)
        self.kind = model_info(model).kind
        config = self.inner.config
        self.eps = config.layernorm_epsilon
        self.heads = config.num_attention_heads
        self.groups = config.num_query_groups or config.num_attention_heads
        self.head_dim = config.kv_channels
        self.scale = self.inner.decoder.layers[0].self_attention.core_attention.softmax_scale

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """Whether this forward reproduces ``model``: as :meth:`LeanDecoder.supports`, for causal LMs and value
        models (critic, reward model)."""
        return _supported(model, ("causal_lm", "value"))

    def _layer(self, layer, hidden: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        b, s, h = hidden.shape
        attention, mlp = layer.self_attention, layer.mlp
        per_group = self.heads // self.groups
        normed = F.rms_norm(hidden, (h,), layer.input_layernorm.weight, self.eps)
        bias = attention.linear_qkv.bias
        qkv = F.linear(normed, attention.linear_qkv.weight, bias if bias is not None and bias.numel() else None)
        qkv = qkv.view(b, s, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = qkv.split([per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = _rotate(q.reshape(b, s, self.heads, self.head_dim).transpose(1, 2), cos, sin)  # [b, heads, s, d]
        k = _rotate(k.transpose(1, 2), cos, sin)  # [b, groups, s, d]
        context = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, scale=self.scale,
                                                 enable_gqa=self.groups != self.heads)
        context = context.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        hidden = hidden + F.linear(context, attention.linear_proj.weight)
        normed = F.rms_norm(hidden, (h,), layer.pre_mlp_layernorm.weight, self.eps)
        gate, up = F.linear(normed, mlp.linear_fc1.weight).chunk(2, dim=-1)
        return hidden + F.linear(F.silu(gate).mul_(up), mlp.linear_fc2.weight)

    @torch.no_grad()
    @cpu_backend.suspended()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 positions: Optional[slice] = None) -> torch.Tensor:
        """The model's output for a padded batch.

        Args:
            input_ids: ``[b, s]`` int64. attention_mask: ``[b, 1, s, s]`` bool, True = masked (the model's mask, see
                :func:`posttrain.models.provider.build_attention_mask`; no query row is fully masked).
            positions: the positions whose output is wanted (all when None).

        Returns:
            causal LM: logits ``[b, len(positions), V_padded]`` in the model's dtype; value model: fp32 values
            ``[b, len(positions)]`` — what the megatron model returns (batch-major) for the same inputs.
        """
        inner = self.inner
        s = input_ids.shape[1]
        hidden = F.embedding(input_ids, inner.embedding.word_embeddings.weight)  # [b, s, h]
        cos, sin = _rope_table(inner, s, hidden.dtype)
        mask = ~attention_mask  # SDPA's convention: True = attend
        for layer in inner.decoder.layers:
            hidden = self._layer(layer, hidden, mask, cos, sin)
        if positions is not None:
            hidden = hidden[:, positions]
        hidden = F.rms_norm(hidden, (hidden.shape[-1],), inner.decoder.final_layernorm.weight, self.eps)
        if self.kind == "value":
            return inner.value_head(hidden)
        weight = (inner.shared_embedding_or_output_weight() if inner.share_embeddings_and_output_weights
                  else inner.output_layer.weight)
        return F.linear(hidden, weight)
