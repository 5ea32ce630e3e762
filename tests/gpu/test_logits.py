"""(a) Megatron logits against Hugging Face on the GPU: SmolLM2, left-padded real prompts, fp32 and bf16, with the
local layer spec and (when importable) the Transformer Engine spec.

The reference is HF in fp32. fp32 Megatron must agree with it to rounding; bf16 Megatron must be no further from
it than HF's own bf16 forward is (twice that distance at most), which is the accuracy bf16 can promise.
"""
from __future__ import annotations

import time

import pytest
import torch

from tests.gpu.conftest import left_padded_prompts, peak_memory_mib

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs an NVIDIA GPU: torch.cuda.is_available() is False")

BATCH = 6


@pytest.fixture(scope="module")
def batch(prompt_prefix, megatron_one_gpu):
    ids, mask, _ = left_padded_prompts(prompt_prefix, BATCH, megatron_one_gpu.device)
    return ids, mask


@pytest.fixture(scope="module")
def hf_logits(hf_model_dir, batch):
    """HF logits ``{dtype: [b, s, V] fp32}`` for fp32 and bf16 weights (eager attention, explicit positions)."""
    from transformers import AutoModelForCausalLM

    from posttrain.models import position_ids_from_attention_mask

    ids, mask = batch
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=dtype, attn_implementation="eager").cuda()
        with torch.no_grad():
            out[name] = model(input_ids=ids, attention_mask=mask,
                              position_ids=position_ids_from_attention_mask(mask)).logits.float()
        del model
    torch.cuda.empty_cache()
    return out


def _distance(logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> dict:
    valid = mask.bool()
    diff = (logits[valid] - reference[valid]).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "top1_agreement": float((logits[valid].argmax(-1) == reference[valid].argmax(-1)).float().mean()),
            "reference_abs_max": float(reference[valid].abs().max())}


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_megatron_logits_match_hf(impl, actor_ckpt, hf_config, batch, hf_logits, te_available, results):
    if impl == "transformer_engine" and not te_available:
        pytest.skip("Transformer Engine is not importable with CUDA here: the TE layer spec cannot be built")
    from posttrain.models import (build_attention_mask, build_model, load_model_checkpoint,
                                  position_ids_from_attention_mask)

    ids, mask = batch
    vocab = hf_config["vocab_size"]
    hf_bf16 = _distance(hf_logits["bf16"], hf_logits["fp32"], mask)
    results.record("logits_hf_bf16_vs_hf_fp32", **hf_bf16)
    for precision in ("fp32", "bf16"):
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model = build_model(hf_config, "causal_lm", bf16=precision == "bf16", transformer_impl=impl)
        load_model_checkpoint(model, actor_ckpt)
        model.eval()
        with torch.no_grad():
            logits = model(ids, position_ids_from_attention_mask(mask), build_attention_mask(mask))
        torch.cuda.synchronize()
        logits = logits[..., :vocab].float()
        figures = _distance(logits, hf_logits["fp32"], mask)
        figures.update(wall_s=round(time.perf_counter() - start, 2), peak_gpu_mib=peak_memory_mib(),
                       tokens=int(mask.sum()))
        results.record(f"logits_{impl}_{precision}_vs_hf_fp32", **figures)
        del model
        torch.cuda.empty_cache()
        if precision == "fp32" and impl == "local":
            # the same fp32 arithmetic in another order: rounding only
            assert figures["max_abs_diff"] <= 1e-3 * max(1.0, figures["reference_abs_max"]), figures
        elif precision == "fp32":
            # Transformer Engine may run fp32 GEMMs in TF32: at least as close as a bf16 forward
            assert figures["max_abs_diff"] <= max(hf_bf16["max_abs_diff"], 1e-3), (figures, hf_bf16)
        else:
            assert figures["mean_abs_diff"] <= 2 * hf_bf16["mean_abs_diff"] + 1e-3, (figures, hf_bf16)
            assert figures["max_abs_diff"] <= 2 * hf_bf16["max_abs_diff"] + 1e-2, (figures, hf_bf16)
        assert figures["top1_agreement"] >= min(0.98, hf_bf16["top1_agreement"] - 0.02), (figures, hf_bf16)
