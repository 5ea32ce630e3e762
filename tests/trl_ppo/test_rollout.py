"""posttrain.trl_ppo.rollout: sampling filters, Gumbel-max sampling, and KV-cached decoding against full forwards.

The model is a tiny Llama built in this process (random weights, real megatron-core layers); references are
written here: a sorted cumulative-probability loop for top-p, ``softmax`` frequencies for sampling, and greedy
decoding by re-running the whole sequence without a cache.
"""
import pytest
import torch

from posttrain.models.provider import (
    build_attention_mask,
    build_model,
    position_ids_from_attention_mask,
)
from posttrain.trl_ppo.rollout import (
    SamplingParams,
    filter_logits,
    generate,
    sample_tokens,
)

TINY = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "initializer_range": 0.3}


@pytest.fixture(scope="module")
def model():
    from posttrain.distributed import destroy_distributed, initialize_distributed

    initialize_distributed(1, 1, 1, seed=5)
    m = build_model(TINY, "causal_lm")
    m.eval()
    yield m
    destroy_distributed()


def test_top_k_and_top_p_keep_the_reference_sets():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0, 2.0]])
    top2 = filter_logits(logits, top_k=2)
    assert (torch.isfinite(top2) == torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)).all()
    for p in (0.3, 0.6, 0.9, 0.99):
        kept = torch.isfinite(filter_logits(logits, top_p=p))
        for row in range(2):
            probs = logits[row].softmax(-1).tolist()
            order = sorted(range(5), key=lambda i: -probs[i])
            expected, total = set(), 0.0
            for i in order:  # the smallest prefix whose mass reaches p
                expected.add(i)
                total += probs[i]
                if total >= p:
                    break
            assert {i for i in range(5) if kept[row, i]} == expected, (p, row)


def test_sampling_draws_from_the_softmax_and_reports_its_log_probs():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]]).repeat(20000, 1)
    params = SamplingParams(max_new_tokens=1, do_sample=True, temperature=0.7, stop_token_ids=[0])
    tokens, log_probs = sample_tokens(logits, params, torch.Generator().manual_seed(0))
    probs = (logits[0] / 0.7).softmax(-1)
    freq = torch.bincount(tokens, minlength=4).double() / tokens.numel()
    assert (freq - probs).abs().max().item() < 0.01  # ~4 standard errors at n = 20000
    torch.testing.assert_close(log_probs, probs.log()[tokens].float())
    greedy = SamplingParams(max_new_tokens=1, do_sample=False, stop_token_ids=[0])
    tokens, _ = sample_tokens(logits[:2], greedy, None)
    assert tokens.tolist() == [0, 0]


def test_nucleus_sampling_never_leaves_the_nucleus():
    logits = torch.tensor([[3.0, 2.9, 0.0, -2.0]]).repeat(5000, 1)
    params = SamplingParams(max_new_tokens=1, do_sample=True, top_p=0.9, stop_token_ids=[0])  # p = .51, .46, .03, ...
    tokens, _ = sample_tokens(logits, params, torch.Generator().manual_seed(1))
    assert set(tokens.tolist()) <= {0, 1} and len(set(tokens.tolist())) == 2


def full_forward_greedy(model, prompt_ids, prompt_mask, steps):
    """Greedy decoding without a cache: the whole left-padded sequence is re-run for every new token."""
    ids, mask = prompt_ids.clone(), prompt_mask.clone()
    tokens, log_probs = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, position_ids_from_attention_mask(mask), build_attention_mask(mask),
                           runtime_gather_output=True)[:, -1, :TINY["vocab_size"]].float()
            token = logits.argmax(-1)
            tokens.append(token)
            log_probs.append(torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0])
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(token)[:, None]], 1)
    return torch.stack(tokens, 1), torch.stack(log_probs, 1)


def test_kv_cached_greedy_decoding_equals_full_forwards_on_left_padded_prompts(model):
    g = torch.Generator().manual_seed(3)
    lengths = [7, 3, 5]
    prompt_ids = torch.zeros(3, 7, dtype=torch.long)
    prompt_mask = torch.zeros(3, 7, dtype=torch.long)
    for row, n in enumerate(lengths):
        prompt_ids[row, 7 - n:] = torch.randint(5, 300, (n,), generator=g)
        prompt_mask[row, 7 - n:] = 1
    params = SamplingParams(max_new_tokens=6, do_sample=False, stop_token_ids=[1], pad_token_id=0, ignore_eos=True)
    out = generate(model, prompt_ids, prompt_mask, params, TINY["vocab_size"])
    expected_tokens, expected_log_probs = full_forward_greedy(model, prompt_ids, prompt_mask, 6)
    assert torch.equal(out.responses, expected_tokens)
    torch.testing.assert_close(out.sampler_log_probs, expected_log_probs, rtol=0, atol=1e-5)
    assert out.response_mask.all() and not out.has_eos.any()


def test_a_stop_token_ends_the_response_and_pads_after_it(model):
    prompt_ids = torch.randint(5, 300, (2, 4), generator=torch.Generator().manual_seed(4))
    prompt_mask = torch.ones_like(prompt_ids)
    free = generate(model, prompt_ids, prompt_mask, SamplingParams(max_new_tokens=5, stop_token_ids=[1],
                                                                   pad_token_id=0, ignore_eos=True), 300)
    stop = int(free.responses[0, 1])  # make row 0's second greedy token the stop token
    out = generate(model, prompt_ids, prompt_mask, SamplingParams(max_new_tokens=5, stop_token_ids=[stop],
                                                                  pad_token_id=0), 300)
    row0 = out.responses[0].tolist()
    assert row0[:2] == free.responses[0, :2].tolist() and out.has_eos[0]
    assert out.response_mask[0].tolist()[:2] == [1, 1] and set(out.response_mask[0].tolist()[2:]) <= {0}
    assert set(row0[2:]) <= {0} and (out.sampler_log_probs[0, 2:] == 0).all()


def test_sampling_params_reject_bad_values():
    for kwargs, message in (({"max_new_tokens": 0}, "max-new-tokens"), ({"temperature": 0.0}, "temperature"),
                            ({"top_k": -1}, "top-k"), ({"top_p": 0.0}, "top-p"), ({"stop_token_ids": []}, "stop")):
        base = {"max_new_tokens": 4, "stop_token_ids": [2]}
        with pytest.raises(ValueError, match=message):
            SamplingParams(**{**base, **kwargs})


def test_lean_decoder_and_megatron_inference_path_decode_the_same_tokens(model, monkeypatch):
    """The CPU decoder over the model's weights against megatron-core's own inference path, sampled, with a stop
    token and left padding: same tokens, log-probs within fp32 rounding."""
    from posttrain.trl_ppo import rollout
    from posttrain.trl_ppo.lean_decoder import LeanDecoder

    assert LeanDecoder.supports(model)
    g = torch.Generator().manual_seed(8)
    prompt_ids = torch.randint(5, 300, (4, 6), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :3] = 0
    prompt_mask[2, :1] = 0
    prompt_ids[prompt_mask == 0] = 0
    params = SamplingParams(max_new_tokens=8, do_sample=True, temperature=1.3, stop_token_ids=[7, 11, 13],
                            pad_token_id=0)
    lean = generate(model, prompt_ids, prompt_mask, params, 300, torch.Generator().manual_seed(9))
    monkeypatch.setattr(rollout.LeanDecoder, "supports", staticmethod(lambda m: False))
    reference = generate(model, prompt_ids, prompt_mask, params, 300, torch.Generator().manual_seed(9))
    assert torch.equal(lean.responses, reference.responses)
    assert torch.equal(lean.response_mask, reference.response_mask) and torch.equal(lean.has_eos, reference.has_eos)
    torch.testing.assert_close(lean.sampler_log_probs, reference.sampler_log_probs, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_decoder_products_equal_f_linear_on_every_cpu(dtype):
    """oneDNN packs bf16 weights only on some CPUs (AVX512-BW/VL/DQ or AVX-NE-CONVERT); on the others the lean
    decoder's products must still run, through ``F.linear``, in fp32 and bf16 alike."""
    from posttrain.trl_ppo.lean_decoder import _Linear

    g = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 64, generator=g).to(dtype)
    bias = torch.randn(48, generator=g).to(dtype)
    x = torch.randn(2, 5, 64, generator=g).to(dtype)
    linear = _Linear(weight, bias, rows=10)
    tol = {"rtol": 0, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, weight, bias), **tol)
