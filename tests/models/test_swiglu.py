"""The CPU layer spec's SwiGLU keeps only its input for the backward and computes exactly what megatron-core's
unfused gated MLP computes: the same output and bitwise the same gradients, alone and inside a whole model, where
its output (fc2's input) is freed after the forward and recomputed for the backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    from posttrain.distributed import destroy_distributed, initialize_distributed

    initialize_distributed(1, 1, 1, seed=1234)
    yield
    destroy_distributed()


def _unfused(x):  # megatron-core's glu() with F.silu and glu_linear_offset 0 (mlp.py, no fusion)
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * (up + 0.0)


class _Unfused(torch.nn.Module):
    def forward(self, x):
        return _unfused(x)


def test_swiglu_equals_the_unfused_ops_and_keeps_only_its_input():
    from posttrain.models.swiglu import MemoryEfficientSwiGLU

    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 3, 2 * 48, generator=g) * 3
    grad = torch.randn(23, 3, 48, generator=g)
    results = []
    for fn in (_unfused, MemoryEfficientSwiGLU()):
        leaf = x.clone().requires_grad_()
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (kept.append(t), t)[1], lambda t: t):
            out = fn(leaf)
        out.backward(grad)
        results.append((out.detach(), leaf.grad, {t.untyped_storage().data_ptr() for t in kept}))
    (out_ref, grad_ref, kept_ref), (out, grad_x, kept) = results
    assert torch.equal(out, out_ref) and torch.equal(grad_x, grad_ref)
    assert len(kept) == 1 and len(kept_ref) == 3  # the input alone, against the input, silu(gate) and up + 0
    with torch.no_grad():  # no autograd: plain ops
        assert torch.equal(MemoryEfficientSwiGLU()(x), out_ref)


def test_cpu_model_uses_it_with_the_gradients_of_the_unfused_mlp():
    from posttrain.models import build_attention_mask
    from posttrain.models.provider import build_model
    from posttrain.models.swiglu import MemoryEfficientSwiGLU

    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
                 "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
                 "rope_theta": 10000.0, "tie_word_embeddings": True}
    model = build_model(hf_config, "causal_lm")
    mlps = [layer.mlp for layer in model.decoder.layers]
    assert mlps and all(isinstance(m.activation_func, MemoryEfficientSwiGLU) for m in mlps)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, 9, dtype=torch.long)
    valid[1, :3] = 0
    positions = (valid.cumsum(-1) - 1).clamp(min=0)
    mask = build_attention_mask(valid)
    outputs = []
    handles = [m.activation_func.register_forward_hook(lambda mod, args, out: outputs.append(out)) for m in mlps]
    runs = []
    for activation in ("module", "unfused"):
        if activation == "unfused":
            for m in mlps:
                m.activation_func = _Unfused()
        model.zero_grad()
        logits = model(ids, positions, mask)
        if activation == "module":  # fc2's input was freed after the forward (recomputed for the backward)
            assert len(outputs) == len(mlps) and all(o.untyped_storage().nbytes() == 0 for o in outputs)
        logits.float().logsumexp(-1).sum().backward()
        runs.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    for handle in handles:
        handle.remove()
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
