"""posttrain.trl_ppo.lean_decoder.LeanForward against the megatron-core model it reads its weights from.

Tiny Llama / Qwen2 models built in this process (random weights, real megatron-core layers, the local layer spec of
the CPU backend) as a causal LM and as a value model; the reference is the megatron model's own forward on the
same left- and right-padded batch.
"""
import pytest
import torch

from posttrain.models.provider import build_attention_mask, build_model, position_ids_from_attention_mask
from posttrain.trl_ppo.lean_decoder import LeanForward

LLAMA = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
         "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "initializer_range": 0.3}
QWEN2 = {**LLAMA, "model_type": "qwen2", "tie_word_embeddings": False, "num_key_value_heads": 1}


@pytest.fixture(scope="module", autouse=True)
def distributed():
    from posttrain.distributed import destroy_distributed, initialize_distributed

    initialize_distributed(1, 1, 1, seed=7)
    yield
    destroy_distributed()


def batch():
    """Left-padded prompts followed by right-padded responses: ``[4, 11]`` ids and their 0/1 mask."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 300, (4, 11), generator=generator)
    mask = torch.ones(4, 11, dtype=torch.long)
    mask[1, :3] = 0  # prompt padding
    mask[2, :1] = 0
    mask[2, 9:] = 0  # response padding
    mask[3, 7:] = 0
    return ids * mask, mask


@pytest.mark.parametrize("hf_config", [LLAMA, QWEN2], ids=["llama", "qwen2-qkv-bias"])
@pytest.mark.parametrize("kind", ["causal_lm", "value"])
def test_lean_forward_returns_the_megatron_models_output(hf_config, kind):
    model = build_model(hf_config, kind)
    model.eval()
    if hf_config is QWEN2:
        torch.nn.init.normal_(model.decoder.layers[0].self_attention.linear_qkv.bias, std=0.5)
    assert LeanForward.supports(model)
    ids, mask = batch()
    attention = build_attention_mask(mask)
    with torch.no_grad():
        reference = model(ids, position_ids_from_attention_mask(mask), attention)  # [b, s, V] or [b, s]
    lean = LeanForward(model)
    torch.testing.assert_close(lean(ids, attention), reference, rtol=1e-5, atol=1e-5)
    # the positions that predict a response starting at column 6
    torch.testing.assert_close(lean(ids, attention, slice(5, 10)), reference[:, 5:10], rtol=1e-5, atol=1e-5)


def test_lean_forward_sees_a_weight_update_at_once():
    model = build_model(LLAMA, "value")
    model.eval()
    ids, mask = batch()
    attention = build_attention_mask(mask)
    lean = LeanForward(model)
    before = lean(ids, attention)
    with torch.no_grad():
        model.decoder.layers[1].mlp.linear_fc2.weight.mul_(2.0)
        after_megatron = model(ids, position_ids_from_attention_mask(mask), attention)
    after = lean(ids, attention)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, after_megatron, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["causal_lm", "value"])
def test_lean_forward_of_a_bf16_model_equals_megatrons(kind):
    """Under ``--bf16`` the megatron model is wrapped in ``Float16Module`` (fp32 outputs); the lean forward computes
    in the weights' bf16 and gives the same numbers once both are fp32."""
    model = build_model(LLAMA, kind, bf16=True)
    model.eval()
    assert LeanForward.supports(model)
    ids, mask = batch()
    attention = build_attention_mask(mask)
    with torch.no_grad():
        reference = model(ids, position_ids_from_attention_mask(mask), attention)
    torch.testing.assert_close(LeanForward(model)(ids, attention).float(), reference.float(), rtol=1e-2, atol=1e-2)
