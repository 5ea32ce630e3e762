"""Core attention through torch's fused ``scaled_dot_product_attention`` for the local (non-Transformer-Engine)
layer spec on CPU.

megatron-core's local :class:`~megatron.core.transformer.dot_product_attention.DotProductAttention` materialises
the scores ``[b, np, sq, sk]``, masks them, soft-maxes them and keeps the probabilities for the backward pass
(``baddbmm``, ``masked_fill``, ``softmax``, ``bmm``: five passes over ``b·np·s²`` values, repeated in the
backward). :class:`SDPADotProductAttention` computes the same function with one call of
:func:`torch.nn.functional.scaled_dot_product_attention`, whose CPU kernel is a fused, blocked (flash) attention
that also computes the backward without the probabilities tensor. Timings are in docs/performance.md.

It takes the same constructor arguments and inputs and returns the same output; cases the fused call does not
express the same way (no mask given, attention dropout while training, a sliding window, the off-by-one or
learnable softmax, query-key layer scaling, attention bias, packed sequences, a query length other than the
mask's) go to the parent class unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention


class SDPADotProductAttention(DotProductAttention):
    """:class:`DotProductAttention` whose forward is one fused ``scaled_dot_product_attention`` call.

    Inputs (as the parent): ``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]`` (grouped-query heads
    ``ng`` divide ``np``), ``attention_mask [b, 1, sq, sk]`` bool with **True = masked** (megatron-core's
    convention; :func:`posttrain.models.provider.build_attention_mask` never leaves a query row empty).
    Output: ``context [sq, b, np * hn]``, softmax scale ``self.softmax_scale`` (``1 / sqrt(hn)`` unless
    configured).
    """

    def __init__(self, config, layer_number: int, *args, **kwargs):
        super().__init__(config, layer_number, *args, **kwargs)
        self._fusable = (
            self.config.softmax_type == "vanilla"
            and not self.config.apply_query_key_layer_scaling
            and not is_layer_window_attention(self.config.window_size, self.config.window_attn_skip_freq,
                                              layer_number)
        )

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None):
        """``[sq, b, np * hn]`` attention output; see the class docstring for the shapes."""
        dropout = self.training and self.attention_dropout.p > 0
        if (not self._fusable or dropout or attention_mask is None or attention_bias is not None
                or packed_seq_params is not None or attention_mask.dtype != torch.bool
                or attention_mask.shape[-2] != query.shape[0] or attention_mask.shape[-1] != key.shape[0]):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        sq, b, heads, _ = query.shape
        # [s, b, n, hn] -> [b, n, s, hn]; the mask flips to SDPA's convention (True = attend). The value is a
        # view of the fused QKV projection's output, which the attention's backward would keep alive through it
        # (three times the value's size); a copy of the value lets that output go after the forward.
        context = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3).contiguous(),
            attn_mask=~attention_mask, scale=self.softmax_scale,
            enable_gqa=key.shape[2] != heads)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
