"""The CPU layer spec's fused core attention computes megatron-core's local attention: same outputs and
gradients on a left-padded causal mask with grouped-query heads, and the parent's path wherever the fused call
would differ."""
from __future__ import annotations

from unittest import mock

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from posttrain.distributed import destroy_distributed, initialize_distributed

    initialize_distributed(1, 1, 1, seed=1234)
    yield
    destroy_distributed()


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=2, hidden_size=64 * 9, num_attention_heads=9, num_query_groups=3, kv_channels=64,
                  attention_dropout=0.0, use_cpu_initialization=True)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _pair(**overrides):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from posttrain.models.sdpa_attention import SDPADotProductAttention

    config = _config(**overrides)
    args = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(config, **args), SDPADotProductAttention(config, **args)


def _inputs(dtype=torch.float32, seq=23, batch=3):
    from posttrain.models import build_attention_mask

    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq, batch, 9, 64, generator=g, dtype=dtype)
    k = torch.randn(seq, batch, 3, 64, generator=g, dtype=dtype)
    v = torch.randn(seq, batch, 3, 64, generator=g, dtype=dtype)
    valid = torch.ones(batch, seq, dtype=torch.long)
    valid[0, :5] = 0  # left padding, as the trainer's prompts
    valid[2, :11] = 0
    return q, k, v, build_attention_mask(valid), valid


def test_fused_attention_equals_megatron_local_attention_forward_and_backward():
    local, fused = _pair()
    q, k, v, mask, valid = _inputs()
    outs, grads = [], []
    for module in (local, fused):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = module(*leaves, mask)
        assert out.shape == (23, 3, 9 * 64)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * weights * valid.T[:, :, None]).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in leaves])
    real = valid.T.bool()  # [s, b]
    torch.testing.assert_close(outs[1][real], outs[0][real], rtol=1e-5, atol=1e-5)
    for g_fused, g_local in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_fused, g_local, rtol=1e-4, atol=1e-5)


def test_fused_attention_in_bf16_stays_within_bf16_rounding_of_the_fp32_result():
    _, fused = _pair(bf16=True, params_dtype=torch.bfloat16)
    local, _ = _pair()
    q, k, v, mask, valid = _inputs()
    reference = local(q, k, v, mask)
    out = fused(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask).float()
    real = valid.T.bool()
    assert (out - reference)[real].abs().max() < 3e-2


def test_cases_the_fused_call_does_not_express_use_megatrons_path():
    q, k, v, mask, _ = _inputs()
    local, plain = _pair()
    _, with_dropout = _pair(attention_dropout=0.1)
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", side_effect=AssertionError) as sdpa:
        with_dropout.train()
        with_dropout(q, k, v, mask)  # dropout while training: megatron's RNG-tracked dropout
        # no mask: megatron's own causal mask
        torch.testing.assert_close(plain(q, k, v, None), local(q, k, v, None), rtol=0, atol=0)
        assert sdpa.call_count == 0
        with_dropout.eval()
        with pytest.raises(AssertionError):
            with_dropout(q, k, v, mask)  # evaluation has no dropout: the fused call


def test_cpu_models_are_built_with_the_fused_attention(tmp_path):
    from posttrain.models.provider import build_model
    from posttrain.models.sdpa_attention import SDPADotProductAttention

    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
                 "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
                 "rope_theta": 10000.0, "tie_word_embeddings": True}
    model = build_model(hf_config, "causal_lm")
    attentions = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert attentions and all(type(a) is SDPADotProductAttention for a in attentions)
