"""posttrain.models.output_release: a producer's output is freed after its consumer's forward and recomputed for
the backward, with unchanged values and gradients; the CPU layer spec applies it to both norms and the SwiGLU of
every layer."""
from __future__ import annotations

import pytest
import torch

from posttrain.models.output_release import release_output_after


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():  # megatron's recomputation saves and restores the RNG states it tracks
    from posttrain.distributed import destroy_distributed, initialize_distributed

    initialize_distributed(1, 1, 1, seed=5)
    yield
    destroy_distributed()


class _Consumer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.linear(x).tanh(), None  # (output, bias) as megatron's modules return


def _pair(seed=0):
    torch.manual_seed(seed)
    norm, consumer = torch.nn.RMSNorm(16, eps=1e-5), _Consumer()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm, consumer


def test_output_is_freed_and_gradients_are_unchanged():
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(1)) * 2
    runs = []
    for release in (True, False):
        norm, consumer = _pair()
        if release:
            release_output_after(norm, consumer)
        leaf = x.clone().requires_grad_()
        produced = norm(leaf)
        out, _ = consumer(produced)
        if release:
            assert produced.untyped_storage().nbytes() == 0  # freed once the consumer ran
        out.square().sum().backward()
        runs.append((out.detach(), leaf.grad, norm.weight.grad, consumer.linear.weight.grad))
        if release:
            assert produced.untyped_storage().nbytes() == produced.numel() * 4  # recomputed for the backward
    for released, plain in zip(*runs):
        assert torch.equal(released, plain)


def test_without_autograd_the_producer_runs_as_before():
    norm, consumer = _pair()
    release_output_after(norm, consumer)
    x = torch.randn(4, 16)
    with torch.no_grad():
        produced = norm(x)
        consumer(produced)
    assert produced.untyped_storage().nbytes() == produced.numel() * 4
    produced = norm(x)  # input needs no gradient and the norm's weight is not an input: nothing recorded
    consumer(produced)
    assert produced.untyped_storage().nbytes() == produced.numel() * 4
    with pytest.raises(ValueError, match="already frees"):
        release_output_after(norm, consumer)


def test_cpu_gpt_model_frees_norm_and_swiglu_outputs_with_the_same_gradients():
    from posttrain.models import build_attention_mask
    from posttrain.models.provider import build_model

    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256,
                 "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
                 "rope_theta": 10000.0, "tie_word_embeddings": True}
    released, plain = build_model(hf_config, "causal_lm"), build_model(hf_config, "causal_lm")
    plain.load_state_dict(released.state_dict())
    for module in plain.modules():  # back to the modules' own forward (the consumers' hooks find nothing)
        module.__dict__.pop("forward", None)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, 9, dtype=torch.long)
    valid[1, :3] = 0
    inputs = (ids, (valid.cumsum(-1) - 1).clamp(min=0), build_attention_mask(valid))
    runs = []
    for model in (released, plain):
        outputs = []
        handles = [m.register_forward_hook(lambda mod, args, out: outputs.append(out))
                   for layer in model.decoder.layers
                   for m in (layer.input_layernorm, layer.pre_mlp_layernorm, layer.mlp.activation_func)]
        logits = model(*inputs)
        freed = [o.untyped_storage().nbytes() == 0 for o in outputs]
        logits.float().logsumexp(-1).sum().backward()
        for handle in handles:
            handle.remove()
        runs.append((freed, logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (freed, logits, grads), (kept, plain_logits, plain_grads) = runs
    assert len(freed) == 6 and all(freed) and not any(kept)
    assert torch.equal(logits, plain_logits)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("recompute, released", [
    ({}, 6), ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}, 0),
    ({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1}, 6),
    ({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2}, 0)],
    ids=["no-recompute", "uniform", "block-1-of-2-layers", "block-all-layers"])
def test_layers_recomputed_as_a_whole_keep_their_outputs(recompute, released):
    """Full recomputation of every layer keeps one layer's activations at a time: nothing to release there."""
    from posttrain.models.output_release import _ReleasedForward
    from posttrain.models.provider import build_model

    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256,
                 "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
                 "rope_theta": 10000.0, "tie_word_embeddings": True}
    model = build_model(hf_config, "causal_lm", **recompute)
    assert sum(isinstance(m.__dict__.get("forward"), _ReleasedForward) for m in model.modules()) == released
