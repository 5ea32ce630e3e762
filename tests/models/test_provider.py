"""Megatron-core models built from HF checkpoints give HF transformers' numbers.

The real example model (SmolLM2-135M-Instruct) is converted once per session; its logits on real Alpaca prompts
(chat template, left-padded batch) are compared with HF transformers at TP=1 in process, and at TP=3 and PP=2 under
torchrun from the same checkpoint. (SmolLM2 has 9 attention heads and 3 KV heads, so TP must divide 3; tensor
parallelism with 2 ranks is shown on a tiny Qwen2 model.) Tiny randomly initialised Qwen2, Llama-3-RoPE, Mixtral
and Qwen2-MoE models cover the other architecture paths.

Reference convention: HF is run with ``attn_implementation="eager"`` and with the position ids the trainer uses for
left-padded rows (0 over the padding, then 0, 1, ...).

SmolLM2's logits reach ~40, and fp32 rounding alone moves them by ~1e-4 (HF's own fp32 logits differ from its
fp64 ones by 0.98e-4 on these prompts, megatron-core's by 0.83e-4 to 1.30e-4 at TP=1, TP=3 and PP=2 on the same
prompts and on held-out ones). A fixed 1e-4 bound against HF's fp32 logits can therefore fail on rounding alone. The SmolLM2
logits tests compare with HF in fp64 instead and allow megatron-core twice HF's own fp32 error plus 1e-5: a real
mapping or arithmetic bug moves logits by orders of magnitude more.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.torchrun_utils import run_torchrun

TOL = 1e-4
N_PROMPTS = 3
FP32_FACTOR, FP32_SLACK = 2.0, 1e-5  # megatron-core's fp32 error vs fp64 <= FP32_FACTOR x HF's own + FP32_SLACK


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def megatron_single_process():
    """megatron-core parallel state at TP = PP = EP = 1 in the pytest process."""
    from posttrain.distributed import destroy_distributed, initialize_distributed

    initialize_distributed(1, 1, 1, seed=1234)
    yield
    destroy_distributed()


def alpaca_batch(tokenizer, shared_data: Path, n: int = N_PROMPTS, offset: int = 0) -> dict:
    """``n`` real Alpaca prompts through the chat template, left-padded: input_ids, attention_mask, position_ids."""
    import pyarrow.parquet as pq

    from posttrain.models import position_ids_from_attention_mask

    rows = pq.read_table(shared_data / "alpaca_en_800.parquet").to_pylist()[offset:offset + n]
    texts = []
    for row in rows:
        prompt = row["instruction"] + ("\n" + row["input"] if row["input"] else "")
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True))
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any(), "batch should contain left padding"
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "position_ids": position_ids_from_attention_mask(enc["attention_mask"])}


def random_batch(vocab: int, lengths=(7, 11, 9), seed: int = 0) -> dict:
    """Left-padded batch of random tokens (for tiny random models)."""
    from posttrain.models import position_ids_from_attention_mask

    gen = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), seq), generator=gen)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, seq - length:] = 1
        ids[row, :seq - length] = 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_attention_mask(mask)}


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.08) -> None:
    """Give every weight (incl. biases and norms) random values so that every mapping matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else std * noise)


def hf_logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).logits.float()


def mcore_forward(model, batch: dict, **kwargs) -> torch.Tensor:
    from posttrain.models import build_attention_mask

    model.eval()
    with torch.no_grad():
        return model(batch["input_ids"], batch["position_ids"], build_attention_mask(batch["attention_mask"]),
                     **kwargs)


def max_diff_valid(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a.float() - b.float()).abs()[mask.bool()].max().item()


def assert_fp32_rounding_only(logits: torch.Tensor, ref64: torch.Tensor, hf32: torch.Tensor, mask: torch.Tensor,
                              label: str) -> None:
    """megatron-core's fp32 logits are as close to the fp64 reference as HF's own fp32 logits are (within
    ``FP32_FACTOR`` x HF's error + ``FP32_SLACK``, max over the real tokens)."""
    ours = (logits.double() - ref64).abs()[mask.bool()].max().item()
    theirs = (hf32.double() - ref64).abs()[mask.bool()].max().item()
    print(f"{label}: max |logit - fp64 HF| = {ours:.3g} (HF fp32: {theirs:.3g}; vs HF fp32: "
          f"{max_diff_valid(logits, hf32, mask):.3g})")
    assert theirs < 1e-3, "HF's fp32 and fp64 logits disagree: the reference is broken"
    assert ours <= FP32_FACTOR * theirs + FP32_SLACK


def load_ckpt_model(ckpt: Path, **kwargs):
    from posttrain.models import (
        build_model,
        load_model_checkpoint,
        read_checkpoint_meta,
    )

    meta = read_checkpoint_meta(ckpt)
    model = build_model(meta["hf_config"], meta["model_kind"], **kwargs)
    load_model_checkpoint(model, ckpt)
    return model


def convert(*argv: str) -> None:
    from posttrain.models.convert import main

    assert main(list(argv)) == 0


def save_tiny(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------------------------------------------
# session data: converted checkpoints and HF references
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def smol_ckpt(example_model_dir, work) -> Path:
    out = work / "smol_ckpt"
    convert("--direction", "hf2mcore", "--load-dir", str(example_model_dir), "--save-dir", str(out))
    return out


@pytest.fixture(scope="module")
def smol_hf(example_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(example_model_dir, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def smol_batch(smol_ckpt, shared_data) -> dict:
    from transformers import AutoTokenizer

    return alpaca_batch(AutoTokenizer.from_pretrained(smol_ckpt), shared_data)


@pytest.fixture(scope="module")
def smol_ref(smol_hf, smol_batch) -> torch.Tensor:
    return hf_logits(smol_hf, smol_batch)


@pytest.fixture(scope="module")
def smol_ref64(example_model_dir, smol_batch) -> torch.Tensor:
    """HF logits in fp64 ``[b, s, V]`` (zero at padding): each row alone, unpadded, at positions 0..n-1.

    Rows are run one at a time because the left-padded batch gives NaN logits in fp64 with the installed
    transformers; without padding no mask is involved, and RoPE makes positions 0..n-1 equivalent to the shifted
    ones of the padded batch.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(example_model_dir, dtype=torch.float64,
                                                 attn_implementation="eager").eval()
    ids, mask = smol_batch["input_ids"], smol_batch["attention_mask"].bool()
    out = torch.zeros(*ids.shape, model.config.vocab_size, dtype=torch.float64)
    with torch.no_grad():
        for row in range(ids.shape[0]):
            out[row, mask[row]] = model(input_ids=ids[row, mask[row]][None]).logits[0]
    return out


@pytest.fixture(scope="module")
def reward_hf_dir(example_model_dir, work) -> Path:
    """An HF LlamaForSequenceClassification: the example model's trunk plus a random score head."""
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification.from_pretrained(example_model_dir, num_labels=1, pad_token_id=2,
                                                           dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=gen) * 0.05)
    out = work / "reward_hf"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (out / name).write_bytes((example_model_dir / name).read_bytes())
    return out


@pytest.fixture(scope="module")
def reward_ckpt(reward_hf_dir, work) -> Path:
    out = work / "reward_ckpt"
    convert("--direction", "hf2mcore", "--load-dir", str(reward_hf_dir), "--save-dir", str(out))
    return out


@pytest.fixture(scope="module")
def reward_ref(reward_hf_dir, smol_batch) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(reward_hf_dir, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=smol_batch["input_ids"], attention_mask=smol_batch["attention_mask"],
                     position_ids=smol_batch["position_ids"]).logits[:, 0].float()


def tiny_qwen2(**overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False, rms_norm_eps=1e-6, pad_token_id=0)
    fields.update(overrides)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**fields)).eval()
    randomize_(model, seed=1)
    return model


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        pad_token_id=0)).eval()
    randomize_(model, seed=2)
    return model


@pytest.fixture(scope="module")
def tiny(work) -> dict:
    """Tiny HF models (dir) and their converted checkpoints (ckpt)."""
    from transformers import Qwen2ForSequenceClassification

    out = {}
    qwen = tiny_qwen2()
    out["qwen2_hf"] = save_tiny(qwen, work / "qwen2_hf")
    convert("--direction", "hf2mcore", "--load-dir", str(out["qwen2_hf"]), "--save-dir", str(work / "qwen2_ckpt"))
    out["qwen2_ckpt"] = work / "qwen2_ckpt"

    value = Qwen2ForSequenceClassification.from_pretrained(out["qwen2_hf"], num_labels=1).eval()
    randomize_(value.score, seed=3, std=0.3)
    out["qvalue_hf"] = save_tiny(value, work / "qvalue_hf")
    convert("--direction", "hf2mcore", "--load-dir", str(out["qvalue_hf"]), "--save-dir", str(work / "qvalue_ckpt"))
    out["qvalue_ckpt"] = work / "qvalue_ckpt"

    out["mixtral_hf"] = save_tiny(tiny_mixtral(), work / "mixtral_hf")
    convert("--direction", "hf2mcore", "--load-dir", str(out["mixtral_hf"]), "--save-dir",
            str(work / "mixtral_ckpt"))
    out["mixtral_ckpt"] = work / "mixtral_ckpt"
    return out


@pytest.fixture(scope="module")
def tiny_batch() -> dict:
    return random_batch(300)


@pytest.fixture(scope="module")
def dist2(smol_ckpt, reward_ckpt, tiny, smol_batch, tiny_batch, work) -> tuple[Path, list[dict]]:
    """One 2-rank torchrun launch running every 2-rank case; returns (out_dir, per-rank reports)."""
    out_dir = work / "dist2"
    out_dir.mkdir()
    cases = {  # grouped by layout: the worker re-creates the parallel groups only when the layout changes
        "smol_pp2": ("tp1pp2ep1", smol_ckpt, smol_batch),
        "reward_pp2": ("tp1pp2ep1", reward_ckpt, smol_batch),
        "qvalue_pp2": ("tp1pp2ep1", tiny["qvalue_ckpt"], tiny_batch),
        "qwen2_tp2": ("tp2pp1ep1", tiny["qwen2_ckpt"], tiny_batch),
        "qvalue_tp2_save": ("tp2pp1ep1", tiny["qvalue_ckpt"], tiny_batch),
        "mixtral_ep2": ("tp1pp1ep2", tiny["mixtral_ckpt"], tiny_batch),
    }
    torch.save({name: batch for name, (_, _, batch) in cases.items()}, out_dir / "inputs.pt")
    args = []
    for name, (layout, ckpt, _) in cases.items():
        args += ["--case", f"{name}:{layout}:{ckpt}"]
    return out_dir, run_torchrun("models_worker.py", args, out_dir, nproc=2)


# ----------------------------------------------------------------------------------------------------------------
# masks and helpers
# ----------------------------------------------------------------------------------------------------------------


def test_build_attention_mask_left_and_right_padding():
    from posttrain.models import build_attention_mask

    mask = build_attention_mask(torch.tensor([[0, 1, 1], [1, 1, 0]]))
    assert mask.shape == (2, 1, 3, 3) and mask.dtype == torch.bool
    allowed = ~mask[:, 0]
    # left padding: real tokens 1, 2 see themselves and earlier real tokens, never the pad
    assert allowed[0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    # right padding: causal over the real tokens (the pad query's row does not matter; it is never empty)
    assert allowed[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_gather_last_token_scores_left_and_right_padding():
    from posttrain.models import gather_last_token_scores

    values = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert gather_last_token_scores(values, mask).tolist() == [3.0, 6.0, 11.0]
    with pytest.raises(ValueError, match="without any real token"):
        gather_last_token_scores(values, torch.zeros(3, 4))


def test_pool_scores_last_and_response_mean_against_a_loop():
    from posttrain.models.value_model import checkpoint_score_pooling, pool_scores

    torch.manual_seed(0)
    values = torch.randn(3, 6)
    attention = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    response = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])  # row 1: 1 pad masked
    expected = []
    for row in range(3):
        picked = [values[row, t].item() for t in range(6) if attention[row, t] and response[row, t]]
        expected.append(sum(picked) / len(picked))
    assert pool_scores(values, attention, response, "response_mean").tolist() == pytest.approx(expected, abs=1e-6)
    assert pool_scores(values, attention, response, "last").tolist() == [values[0, 5], values[1, 3], values[2, 5]]
    with pytest.raises(ValueError, match="without any response token"):
        pool_scores(values, attention, torch.zeros(3, 6), "response_mean")
    with pytest.raises(ValueError, match="needs a response_mask"):
        pool_scores(values, attention, None, "response_mean")
    with pytest.raises(ValueError, match="must be one of last, response_mean"):
        pool_scores(values, attention, response, "max")
    assert checkpoint_score_pooling({"extra": {}}) == "last"
    assert checkpoint_score_pooling({"extra": {"score_pooling": "response_mean"}}) == "response_mean"
    with pytest.raises(ValueError, match="unknown score_pooling 'max'"):
        checkpoint_score_pooling({"extra": {"score_pooling": "max"}})


def test_padded_vocab_size_follows_megatron():
    from posttrain.models import padded_vocab_size

    assert padded_vocab_size(49152, 128, 1) == 49152
    assert padded_vocab_size(49152, 128, 3) == 49152
    assert padded_vocab_size(300, 128, 1) == 384
    assert padded_vocab_size(300, 128, 2) == 512
    assert padded_vocab_size(151936, 128, 2) == 152064


def test_transformer_config_from_smollm2(example_model_dir):
    from posttrain.models import load_hf_config, transformer_config_from_hf

    config = transformer_config_from_hf(load_hf_config(example_model_dir))
    assert (config.num_layers, config.hidden_size, config.num_attention_heads, config.num_query_groups,
            config.kv_channels, config.ffn_hidden_size) == (30, 576, 9, 3, 64, 1536)
    assert config.normalization == "RMSNorm" and config.gated_linear_unit and not config.add_bias_linear
    assert config.layernorm_epsilon == pytest.approx(1e-5) and config.hidden_dropout == 0.0


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2 logits vs HF
# ----------------------------------------------------------------------------------------------------------------


def test_smollm2_logits_match_hf_tp1(smol_ckpt, smol_batch, smol_ref, smol_ref64, smol_hf):
    from posttrain.models import real_vocab_size

    model = load_ckpt_model(smol_ckpt)
    logits = mcore_forward(model, smol_batch)
    assert logits.shape[:2] == smol_batch["input_ids"].shape and logits.shape[-1] == model.vocab_size
    logits = logits[..., :real_vocab_size(model)]
    assert_fp32_rounding_only(logits, smol_ref64, smol_ref, smol_batch["attention_mask"], "SmolLM2 TP1")
    # Same absolute positions (0..s-1 per row) as megatron-core's RoPE, and the same attention kernel (on CPU the
    # local spec runs torch's scaled_dot_product_attention, as HF's "sdpa" implementation): identical arithmetic.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smol_hf.name_or_path, dtype=torch.float32,
                                              attn_implementation="sdpa" if not torch.cuda.is_available()
                                              else "eager").eval()
    with torch.no_grad():
        same_pos = hf(input_ids=smol_batch["input_ids"], attention_mask=smol_batch["attention_mask"]).logits
    assert max_diff_valid(logits, same_pos, smol_batch["attention_mask"]) <= 1e-5


def test_smollm2_logits_match_hf_tp3_under_torchrun(smol_ckpt, smol_batch, smol_ref, smol_ref64, work):
    out_dir = work / "dist3"
    out_dir.mkdir()
    torch.save({"smol_tp3": smol_batch}, out_dir / "inputs.pt")
    reports = run_torchrun("models_worker.py", ["--case", f"smol_tp3:tp3pp1ep1:{smol_ckpt}"], out_dir, nproc=3)
    assert [r["smol_tp3"]["tp_rank"] for r in reports] == [0, 1, 2]
    logits = torch.load(out_dir / "smol_tp3.pt")
    assert_fp32_rounding_only(logits, smol_ref64, smol_ref, smol_batch["attention_mask"], "SmolLM2 TP3")


def test_smollm2_logits_match_hf_pp2_under_torchrun(dist2, smol_batch, smol_ref, smol_ref64):
    out_dir, reports = dist2
    assert [r["smol_pp2"]["last_stage"] for r in reports] == [False, True]
    logits = torch.load(out_dir / "smol_pp2.pt")
    assert_fp32_rounding_only(logits, smol_ref64, smol_ref, smol_batch["attention_mask"], "SmolLM2 PP2")


# ----------------------------------------------------------------------------------------------------------------
# reward model vs HF sequence classifier
# ----------------------------------------------------------------------------------------------------------------


def test_reward_scores_match_hf_sequence_classifier(reward_ckpt, smol_batch, reward_ref):
    from posttrain.models import (
        gather_last_token_scores,
        read_checkpoint_meta,
        unwrap_model,
    )

    assert read_checkpoint_meta(reward_ckpt)["model_kind"] == "value"
    model = load_ckpt_model(reward_ckpt)
    inner = unwrap_model(model)
    assert inner.output_layer is None and inner.value_head.linear.bias.item() == 0.0
    values = mcore_forward(model, smol_batch)
    assert values.shape == smol_batch["input_ids"].shape and values.dtype == torch.float32
    scores = gather_last_token_scores(values, smol_batch["attention_mask"])
    diff = (scores - reward_ref).abs().max().item()
    print(f"reward TP1 max |score diff| vs HF = {diff:.3g}; scores {scores.tolist()}")
    assert diff <= TOL


def test_reward_scores_match_hf_pp2_under_torchrun(dist2, smol_batch, reward_ref):
    from posttrain.models import gather_last_token_scores

    out_dir, reports = dist2
    assert [r["reward_pp2"]["has_value_head"] for r in reports] == [False, True]
    values = torch.load(out_dir / "reward_pp2.pt")
    diff = (gather_last_token_scores(values, smol_batch["attention_mask"]) - reward_ref).abs().max().item()
    print(f"reward PP2 max |score diff| vs HF = {diff:.3g}")
    assert diff <= TOL


# ----------------------------------------------------------------------------------------------------------------
# round trip of the real model
# ----------------------------------------------------------------------------------------------------------------


def test_smollm2_round_trip_is_bit_exact_and_loads_in_transformers(example_model_dir, smol_ckpt, work, smol_batch,
                                                                   smol_ref):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work / "smol_back"
    convert("--direction", "mcore2hf", "--load-dir", str(smol_ckpt), "--save-dir", str(out))
    original, back = load_file(example_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer("hello").input_ids == AutoTokenizer.from_pretrained(
        example_model_dir)("hello").input_ids
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert max_diff_valid(hf_logits(model, smol_batch), smol_ref, smol_batch["attention_mask"]) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# tiny Qwen2 (QKV bias, untied embeddings, vocabulary padding differs between TP1 and TP2)
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_qwen2_logits_match_hf(tiny, tiny_batch):
    from transformers import AutoModelForCausalLM

    ref = hf_logits(AutoModelForCausalLM.from_pretrained(tiny["qwen2_hf"], attn_implementation="eager").eval(),
                    tiny_batch)
    model = load_ckpt_model(tiny["qwen2_ckpt"])
    assert model.vocab_size == 384 and not model.share_embeddings_and_output_weights
    assert model.decoder.layers[0].self_attention.linear_qkv.bias.abs().sum() > 0
    logits = mcore_forward(model, tiny_batch)[..., :300]
    assert max_diff_valid(logits, ref, tiny_batch["attention_mask"]) <= TOL


def test_tiny_qwen2_tp2_matches_hf(dist2, tiny, tiny_batch):
    from transformers import AutoModelForCausalLM

    out_dir, reports = dist2
    assert [r["qwen2_tp2"]["padded_vocab_size"] for r in reports] == [512, 512]
    ref = hf_logits(AutoModelForCausalLM.from_pretrained(tiny["qwen2_hf"], attn_implementation="eager").eval(),
                    tiny_batch)
    diff = max_diff_valid(torch.load(out_dir / "qwen2_tp2.pt"), ref, tiny_batch["attention_mask"])
    print(f"tiny Qwen2 TP2 max |logit diff| vs HF = {diff:.3g}")
    assert diff <= TOL


def _qvalue_ref(tiny, batch):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny["qvalue_hf"], attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(**batch).logits[:, 0]


def test_value_head_tp2_replicated_and_pp2_last_stage_only(dist2, tiny, tiny_batch):
    from posttrain.models import gather_last_token_scores

    out_dir, reports = dist2
    ref = _qvalue_ref(tiny, tiny_batch)
    tp2 = [r["qvalue_tp2_save"] for r in reports]
    assert tp2[0]["value_head_sha"] == tp2[1]["value_head_sha"]
    assert not any(r["has_output_layer"] for r in tp2)
    assert [r["qvalue_pp2"]["has_value_head"] for r in reports] == [False, True]
    for case in ("qvalue_tp2_save", "qvalue_pp2"):
        scores = gather_last_token_scores(torch.load(out_dir / f"{case}.pt"), tiny_batch["attention_mask"])
        assert (scores - ref).abs().max().item() <= TOL, case


def test_value_checkpoint_saved_at_tp2_loads_at_tp1(dist2, tiny, tiny_batch):
    from posttrain.models import (
        gather_last_token_scores,
        read_checkpoint_meta,
        unwrap_model,
    )

    out_dir, _ = dist2
    saved = out_dir / "qvalue_tp2_save_ckpt"
    assert read_checkpoint_meta(saved)["parallel"]["tensor_model_parallel_size"] == 2
    original = unwrap_model(load_ckpt_model(tiny["qvalue_ckpt"]))
    resharded = unwrap_model(load_ckpt_model(saved))
    for (name, a), (_, b) in zip(original.state_dict().items(), resharded.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    scores = gather_last_token_scores(mcore_forward(resharded, tiny_batch), tiny_batch["attention_mask"])
    assert (scores - _qvalue_ref(tiny, tiny_batch)).abs().max().item() <= TOL


@pytest.mark.parametrize("rope", [
    # megatron-core's built-in llama3 parameters; other llama3 parameters; linear interpolation
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 4.0},
], ids=["llama3", "llama3-custom", "linear"])
def test_rope_scaling_matches_hf(rope, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.models import build_model
    from posttrain.models.provider import padded_vocab_size, parse_hf_config

    batch = random_batch(200, lengths=(20, 32, 25))
    config = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64 * 1024,
                         rope_parameters=dict(rope, rope_theta=500000.0), tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    hf.config._attn_implementation = "eager"
    randomize_(hf, seed=4)
    hf_config = json.loads(config.to_json_string())
    arch = parse_hf_config(hf_config)
    assert arch.rope_type == rope["rope_type"]
    model = build_model(hf_config, "causal_lm")
    model.load_state_dict(_state_from_hf_model(hf, arch, padded_vocab_size(200, 128, 1), tmp_path), strict=False)
    diff = max_diff_valid(mcore_forward(model, batch)[..., :200], hf_logits(hf, batch), batch["attention_mask"])
    assert diff <= TOL


def _state_from_hf_model(hf_model, arch, padded, directory: Path):
    """Save an in-memory HF model as transformers does and map it with the converter's reader and rules."""
    from posttrain.models.hf_mapping import HFCheckpointReader, hf_to_mcore

    hf_model.save_pretrained(directory)
    return hf_to_mcore(HFCheckpointReader(directory), arch, "causal_lm", padded)


# ----------------------------------------------------------------------------------------------------------------
# mixture of experts
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_mixtral_matches_hf_ep1(tiny, tiny_batch):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny["mixtral_hf"], attn_implementation="eager").eval()
    model = load_ckpt_model(tiny["mixtral_ckpt"])
    assert model.config.num_moe_experts == 4 and model.config.moe_token_dispatcher_type == "alltoall"
    logits = mcore_forward(model, tiny_batch)[..., :300]
    diff = max_diff_valid(logits, hf_logits(hf, tiny_batch), tiny_batch["attention_mask"])
    print(f"tiny Mixtral EP1 max |logit diff| vs HF = {diff:.3g}")
    assert diff <= TOL


def test_tiny_mixtral_ep2_matches_ep1(dist2, tiny, tiny_batch):
    out_dir, _ = dist2
    ep1 = mcore_forward(load_ckpt_model(tiny["mixtral_ckpt"]), tiny_batch)[..., :300]
    ep2 = torch.load(out_dir / "mixtral_ep2.pt")
    diff = max_diff_valid(ep2, ep1, tiny_batch["attention_mask"])
    print(f"tiny Mixtral EP2 vs EP1 max |logit diff| = {diff:.3g}")
    assert diff <= 1e-5


def test_tiny_qwen2_moe_with_shared_expert_gate_matches_hf(tiny_batch, tmp_path):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from posttrain.models import build_model
    from posttrain.models.provider import padded_vocab_size, parse_hf_config

    for norm_topk_prob in (False, True):
        config = Qwen2MoeConfig(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
                                norm_topk_prob=norm_topk_prob, max_position_embeddings=128)
        torch.manual_seed(0)
        hf = Qwen2MoeForCausalLM(config).eval()
        hf.config._attn_implementation = "eager"
        randomize_(hf, seed=5)
        hf_config = json.loads(config.to_json_string())
        arch = parse_hf_config(hf_config)
        assert arch.moe_layer_pattern == (1, 0, 1) and arch.moe_pre_softmax == (not norm_topk_prob)
        model = build_model(hf_config, "causal_lm")
        assert model.config.moe_shared_expert_gate
        state = _state_from_hf_model(hf, arch, padded_vocab_size(300, 128, 1), tmp_path / str(norm_topk_prob))
        model.load_state_dict(state, strict=False)
        diff = max_diff_valid(mcore_forward(model, tiny_batch)[..., :300], hf_logits(hf, tiny_batch),
                              tiny_batch["attention_mask"])
        assert diff <= TOL, (norm_topk_prob, diff)


# ----------------------------------------------------------------------------------------------------------------
# checkpoint API
# ----------------------------------------------------------------------------------------------------------------


def test_checkpoint_api_and_errors(tiny, work, tiny_batch):
    from posttrain.models import (
        CheckpointError,
        build_model,
        is_checkpoint,
        load_model_checkpoint,
        read_checkpoint_meta,
        save_model_checkpoint,
        unwrap_model,
    )

    ckpt = tiny["qwen2_ckpt"]
    assert is_checkpoint(ckpt) and not is_checkpoint(tiny["qwen2_hf"])
    meta = read_checkpoint_meta(ckpt)
    assert meta["vocab_size"] == 300 and meta["padded_vocab_size"] == 384 and meta["dtype"] == "float32"
    with pytest.raises(CheckpointError, match="not a posttrain model checkpoint"):
        read_checkpoint_meta(tiny["qwen2_hf"])

    # save / load with iteration and extra metadata; overwrite=False refuses an existing directory
    model = load_ckpt_model(ckpt)
    out = save_model_checkpoint(model, work / "api_ckpt", iteration=7, extra_meta={"note": "x"})
    assert read_checkpoint_meta(out)["iteration"] == 7 and read_checkpoint_meta(out)["extra"] == {"note": "x"}
    assert not any(p.name.startswith(".") for p in work.iterdir() if "api_ckpt" in p.name)
    with pytest.raises(CheckpointError, match="already exists"):
        save_model_checkpoint(model, out, overwrite=False)

    # a model of another size is refused with the differing fields named
    other = dict(meta["hf_config"], hidden_size=32, intermediate_size=64)
    with pytest.raises(CheckpointError, match="hidden_size 64 vs 32"):
        load_model_checkpoint(build_model(other, "causal_lm"), ckpt)
    # a causal LM does not load into a value model unless strict=False (fresh head kept)
    value = build_model(meta["hf_config"], "value", value_head_seed=9)
    with pytest.raises(CheckpointError, match="causal_lm model, cannot load it into a value model"):
        load_model_checkpoint(value, ckpt)
    head_before = unwrap_model(value).value_head.linear.weight.clone()
    loaded = load_model_checkpoint(value, ckpt, strict=False)
    assert sorted(loaded["missing_keys"]) == ["value_head.linear.bias", "value_head.linear.weight"]
    assert torch.equal(unwrap_model(value).value_head.linear.weight, head_before)
    assert torch.equal(unwrap_model(value).embedding.word_embeddings.weight,
                       unwrap_model(model).embedding.word_embeddings.weight)


def test_bf16_models_and_checkpoints(tiny, work, tiny_batch):
    """bf16 through Float16Module: fp32 outputs close to the fp32 model (value head computed in fp32); a bf16
    checkpoint loads into an fp32 model exactly."""
    from megatron.core.transformer.module import Float16Module

    from posttrain.models import (
        gather_last_token_scores,
        read_checkpoint_meta,
        save_model_checkpoint,
        unwrap_model,
    )

    fp32_logits = mcore_forward(load_ckpt_model(tiny["qwen2_ckpt"]), tiny_batch)
    bf16_model = load_ckpt_model(tiny["qwen2_ckpt"], bf16=True)
    assert isinstance(bf16_model, Float16Module) and unwrap_model(bf16_model) is bf16_model.module
    assert next(bf16_model.module.decoder.parameters()).dtype == torch.bfloat16
    bf16_logits = mcore_forward(bf16_model, tiny_batch)
    assert bf16_logits.dtype == torch.float32
    assert max_diff_valid(bf16_logits, fp32_logits, tiny_batch["attention_mask"]) < 0.05 * fp32_logits.abs().max()

    value = load_ckpt_model(tiny["qvalue_ckpt"], bf16=True)
    # bf16 parameters like the rest of the model (fp32 master copies live in the optimizer); fp32 arithmetic
    assert unwrap_model(value).value_head.linear.weight.dtype == torch.bfloat16
    values = mcore_forward(value, tiny_batch)
    assert values.dtype == torch.float32
    scores = gather_last_token_scores(values, tiny_batch["attention_mask"])
    assert (scores - _qvalue_ref(tiny, tiny_batch)).abs().max() < 0.05

    bf16 = bf16_model
    from posttrain.models import unwrap_model

    bf16 = load_ckpt_model(tiny["qwen2_ckpt"], bf16=True)
    out = save_model_checkpoint(bf16, work / "bf16_ckpt")
    assert read_checkpoint_meta(out)["dtype"] == "bfloat16"
    fp32 = unwrap_model(load_ckpt_model(out))
    for (name, a), (_, b) in zip(unwrap_model(bf16).state_dict().items(), fp32.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert b.dtype == torch.float32 and torch.equal(a.float(), b), name


TINY_LLAMA_CONFIG = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("changes, error, message", [
    (dict(hidden_act="gelu"), "UnsupportedModelError", "hidden_act 'gelu' is not supported"),
    (dict(attention_bias=True), "UnsupportedModelError", "llama attention_bias / mlp_bias = true is not supported"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=64), "UnsupportedModelError",
     "sliding-window attention (sliding_window=64) is not supported"),
    (dict(num_key_value_heads=3), "UnsupportedModelError",
     "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}), "UnsupportedModelError",
     "rope_type 'yarn' is not supported (supported: default, llama3, linear)"),
    (dict(num_attention_heads=0), "ModelConfigError",
     "llama config: num_attention_heads must be an integer >= 1, got 0"),
    (dict(hidden_size=-64), "ModelConfigError", "llama config: hidden_size must be an integer >= 1, got -64"),
], ids=["activation", "llama-bias", "sliding-window", "kv-heads", "rope-type", "zero-heads", "negative-hidden"])
def test_unsupported_or_invalid_configs_are_named_in_one_line(changes, error, message):
    from posttrain.models import provider

    with pytest.raises(getattr(provider, error)) as info:
        provider.parse_hf_config({**TINY_LLAMA_CONFIG, **changes})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_config_file_that_is_not_a_model_config_is_named(tmp_path):
    from posttrain.models.provider import ModelConfigError, load_hf_config

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="config.json: not a valid JSON file"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(ModelConfigError, match="config.json: no 'model_type' field"):
        load_hf_config(tmp_path)


def test_expert_parallelism_of_a_dense_model_is_refused():
    from posttrain.models.provider import ParallelLayoutError, parse_hf_config, validate_parallel_layout

    with pytest.raises(ParallelLayoutError, match="--expert-model-parallel-size 2 needs a mixture-of-experts model "
                                                  r"\(llama is dense\)"):
        validate_parallel_layout(parse_hf_config(TINY_LLAMA_CONFIG), 1, 1, 2)
