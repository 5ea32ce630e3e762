"""posttrain.models.output_head: chosen-token log-probs and entropy computed chunk by chunk from hidden states
equal the float64 log-softmax of the full logits, with the same gradients, and equal what the trainer computed
before from megatron-core's logits (vocab_parallel_cross_entropy, vocab_parallel_entropy)."""
from __future__ import annotations

import pytest
import torch

from posttrain.models.output_head import chosen_token_log_probs


def _inputs(dtype=torch.float32, batch=3, seq=7, hidden=32, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g)
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5 * 4).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    return h, w, labels


def _reference(h, w, labels, temperature):
    logits = (h.double() @ w.double().t()) / temperature
    log_softmax = torch.log_softmax(logits, -1)
    return log_softmax.gather(-1, labels[..., None])[..., 0], -(log_softmax.exp() * log_softmax).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [4, 5, 21, 0])  # 21 rows: several chunks, a short last one, one chunk
def test_log_probs_entropy_and_gradients_equal_the_full_logits_in_float64(temperature, chunk_rows):
    h, w, labels = _inputs()
    g_out = torch.randn(labels.shape, generator=torch.Generator().manual_seed(9))
    hidden, weight = h.clone().requires_grad_(), w.clone().requires_grad_()
    log_probs, entropy = chosen_token_log_probs(hidden, weight, labels, temperature, chunk_rows)
    assert log_probs.shape == labels.shape and log_probs.dtype == torch.float32 and not entropy.requires_grad
    (log_probs * g_out).sum().backward()

    ref_h, ref_w = h.double().requires_grad_(), w.double().requires_grad_()
    ref_lp, ref_entropy = _reference(ref_h, ref_w, labels, temperature)
    (ref_lp * g_out.double()).sum().backward()
    torch.testing.assert_close(log_probs.double(), ref_lp.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(hidden.grad.double(), ref_h.grad, rtol=0, atol=2e-5)
    torch.testing.assert_close(weight.grad.double(), ref_w.grad, rtol=0, atol=2e-5)


def test_equals_the_trainers_path_over_megatron_logits():
    """The log-probs of megatron-core's vocab_parallel_cross_entropy and the entropy of vocab_parallel_entropy
    over the materialised logits (what the actor's loss used before), on one rank, with their gradients."""
    from posttrain import parallel
    from posttrain.distributed import destroy_distributed, initialize_distributed

    initialize_distributed(1, 1, 1, seed=3)
    try:
        h, w, labels = _inputs(vocab=4096, hidden=64, seq=33)
        results = []
        for fused in (True, False):
            hidden, weight = h.clone().requires_grad_(), w.clone().requires_grad_()
            if fused:
                log_probs, entropy = chosen_token_log_probs(hidden, weight, labels, 1.0, chunk_rows=16)
            else:
                logits = hidden @ weight.t()
                with torch.no_grad():
                    entropy = parallel.vocab_parallel_entropy(logits)
                log_probs = parallel.vocab_parallel_log_probs(logits, labels)
            log_probs.sum().backward()
            results.append((log_probs.detach(), entropy, hidden.grad, weight.grad))
        for fused_value, megatron_value in zip(*results):
            torch.testing.assert_close(fused_value, megatron_value, rtol=0, atol=1e-5)
    finally:
        destroy_distributed()


def test_bf16_weight_gets_a_bf16_gradient_as_accurate_as_the_output_layers_own():
    """With a bf16 model the products run in bf16 (as megatron's output layer runs them): the errors against
    float64 are those of the unfused bf16 path (logits in bf16, upcast, log-softmax, gradient cast back)."""
    h, w, labels = _inputs(dtype=torch.bfloat16)
    h = h.bfloat16().float()  # hidden states arrive in fp32 from a bf16 model (Float16Module upcasts them)
    ref_h, ref_w = h.double().requires_grad_(), w.double().requires_grad_()
    ref_lp, _ = _reference(ref_h, ref_w, labels, 1.0)
    ref_lp.sum().backward()
    errors = []
    for fused in (True, False):
        hidden, weight = h.clone().requires_grad_(), w.clone().requires_grad_()
        if fused:
            log_probs, _ = chosen_token_log_probs(hidden, weight, labels, 1.0, chunk_rows=8)
        else:
            logits = (hidden.bfloat16() @ weight.t()).float()
            log_probs = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
        log_probs.sum().backward()
        assert weight.grad.dtype == torch.bfloat16 and hidden.grad.dtype == torch.float32
        errors.append([(log_probs.double() - ref_lp).abs().max().item(),
                       (hidden.grad.double() - ref_h.grad).abs().max().item(),
                       (weight.grad.double() - ref_w.grad).abs().max().item()])
    fused_errors, unfused_errors = errors
    assert all(f <= 1.5 * u + 1e-3 for f, u in zip(fused_errors, unfused_errors)), errors


def test_mismatched_labels_are_refused():
    h, w, labels = _inputs()
    with pytest.raises(ValueError, match="do not match"):
        chosen_token_log_probs(h, w, labels[:, :-1])


class _MicroBatch:
    """What the trainer's forwards read of a rollout micro-batch: left-padded prompts, then responses."""

    def __init__(self, ids, valid, prompt_len):
        from posttrain.models import build_attention_mask

        self.ids, self.valid, self.prompt_len = ids, valid, prompt_len
        self.response_len = ids.shape[1] - prompt_len
        self.responses = ids[:, prompt_len:]
        self.mask = build_attention_mask(valid)

    def model_inputs(self):
        return self.ids, (self.valid.cumsum(-1) - 1).clamp(min=0), self.mask


@pytest.mark.parametrize("tied", [True, False], ids=["tied-embeddings", "separate-output-layer"])
def test_trainer_hidden_forward_gives_the_logit_paths_log_probs_and_gradients(tied):
    """PPOForwards._lm_hidden_forward (megatron's GPTModel without its output layer) + chosen_token_log_probs
    against _lm_forward's logits + vocab_parallel_log_probs: same log-probs, same gradients for every parameter
    (the output weight's reach the embedding when tied)."""
    from posttrain import parallel
    from posttrain.distributed import destroy_distributed, initialize_distributed
    from posttrain.models.provider import build_model
    from posttrain.trl_ppo.forwards import PPOForwards

    initialize_distributed(1, 1, 1, seed=3)
    try:
        hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300,
                     "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
                     "rope_theta": 10000.0, "tie_word_embeddings": tied}
        model = build_model(hf_config, "causal_lm")  # vocabulary padded to 384: the weight's extra rows are cut
        g = torch.Generator().manual_seed(4)
        ids = torch.randint(0, 300, (3, 11), generator=g)
        valid = torch.ones(3, 11, dtype=torch.long)
        valid[1, :2] = 0
        mb = _MicroBatch(ids, valid, prompt_len=5)
        runs = []
        for fused in (True, False):
            model.zero_grad()
            if fused:
                hidden = PPOForwards._lm_hidden_forward(model, mb)
                assert hidden.shape == (mb.response_len, 3, 64) and model.post_process
                weight = (model.shared_embedding_or_output_weight() if tied else model.output_layer.weight)[:300]
                log_probs, _ = chosen_token_log_probs(hidden.transpose(0, 1), weight, mb.responses, 0.8)
            else:
                logits = PPOForwards._lm_forward(model, mb).float().div_(0.8)
                log_probs = parallel.vocab_parallel_log_probs(parallel.mask_padded_vocab(logits, 300), mb.responses)
            log_probs.sum().backward()
            runs.append((log_probs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        (fused_lp, fused_grads), (ref_lp, ref_grads) = runs
        torch.testing.assert_close(fused_lp, ref_lp, rtol=0, atol=1e-5)
        assert fused_grads.keys() == ref_grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(fused_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    finally:
        destroy_distributed()
