"""convert_ckpt.py: round trips HF -> posttrain -> HF on tiny models, value-head handling, and bad input.

Every bad input must give one ``error: ...`` line, exit status 1 and no output directory (nor a hidden partial
one). Most cases call ``posttrain.models.convert.main(argv)`` in process; one runs the real CLI in a subprocess.
(The real SmolLM2 round trip is in tests/models/test_provider.py, next to its converted checkpoint.)
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.torchrun_utils import REPO


def run_main(capsys, *argv) -> tuple[int, str]:
    from posttrain.models.convert import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_clean_failure(code: int, err: str, save_dir: Path, *fragments: str) -> None:
    """Exit 1, one ``error:`` line naming what is wrong, nothing left behind."""
    assert code == 1
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not save_dir.exists()
    assert not [p for p in save_dir.parent.iterdir() if p.name.startswith(f".{save_dir.name}")]


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.08) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else std * noise)


def assert_same_safetensors(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(left) == set(right)
    for name, tensor in left.items():
        assert right[name].dtype == tensor.dtype and torch.equal(right[name], tensor), name


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def tokenizer_dir(example_model_dir) -> Path:
    return example_model_dir


@pytest.fixture(scope="module")
def qwen2_dir(work) -> Path:
    """Tiny Qwen2 causal LM, bf16 weights (QKV bias, untied embeddings, vocabulary 300 -> padded 384)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    randomize_(model, seed=1)
    model = model.to(torch.bfloat16)
    model.save_pretrained(work / "qwen2_hf")
    return work / "qwen2_hf"


@pytest.fixture(scope="module")
def qwen2_ckpt(qwen2_dir, work) -> Path:
    from posttrain.models.convert import main

    out = work / "qwen2_ckpt"
    assert main(["--direction", "hf2mcore", "--load-dir", str(qwen2_dir), "--save-dir", str(out),
                 "--model-type-hf", "qwen2"]) == 0
    return out


# ----------------------------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------------------------


def test_qwen2_round_trip_is_bit_exact(qwen2_dir, qwen2_ckpt, work, capsys):
    from posttrain.models import read_checkpoint_meta

    meta = read_checkpoint_meta(qwen2_ckpt)
    assert (meta["model_kind"], meta["vocab_size"], meta["padded_vocab_size"]) == ("causal_lm", 300, 384)
    out = work / "qwen2_back"
    code, err = run_main(capsys, "--direction", "mcore2hf", "--load-dir", qwen2_ckpt, "--save-dir", out)
    assert code == 0, err
    assert_same_safetensors(qwen2_dir, out)  # bf16 in, bf16 out (the config's dtype)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["dtype"] == "bfloat16"


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_round_trip_is_bit_exact(kind, work, capsys):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True))
    else:
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
            vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1]))
    randomize_(model, seed=2)
    src, ckpt, back = work / f"{kind}_hf", work / f"{kind}_ckpt", work / f"{kind}_back"
    model.save_pretrained(src)
    assert run_main(capsys, "--direction", "hf2mcore", "--load-dir", src, "--save-dir", ckpt,
                    "--target-expert-parallel-size", "2")[0] == 0
    assert run_main(capsys, "--direction", "mcore2hf", "--load-dir", ckpt, "--save-dir", back)[0] == 0
    assert_same_safetensors(src, back)


def test_value_round_trip_and_head_bias(qwen2_dir, work, capsys):
    """Sequence classifier -> value checkpoint (bias 0) -> sequence classifier; a non-zero bias needs a flag."""
    from transformers import AutoModelForSequenceClassification, Qwen2ForSequenceClassification

    from posttrain.models import build_model, load_model_checkpoint, read_checkpoint_meta, save_model_checkpoint

    seqcls = Qwen2ForSequenceClassification.from_pretrained(qwen2_dir, num_labels=1, dtype=torch.float32)
    randomize_(seqcls.score, seed=3, std=0.3)
    src = work / "qvalue_hf"
    seqcls.save_pretrained(src)
    ckpt, back = work / "qvalue_ckpt", work / "qvalue_back"
    assert run_main(capsys, "--direction", "hf2mcore", "--load-dir", src, "--save-dir", ckpt)[0] == 0
    assert read_checkpoint_meta(ckpt)["model_kind"] == "value"
    assert run_main(capsys, "--direction", "mcore2hf", "--load-dir", ckpt, "--save-dir", back)[0] == 0
    assert_same_safetensors(src, back)
    assert json.loads((back / "config.json").read_text())["architectures"] == ["Qwen2ForSequenceClassification"]

    # a trained head with a bias: refused unless --drop-value-head-bias (then HF scores = ours - bias)
    meta = read_checkpoint_meta(ckpt)
    model = build_model(meta["hf_config"], "value")
    load_model_checkpoint(model, ckpt)
    with torch.no_grad():
        model.value_head.linear.bias.fill_(0.5)
    biased = save_model_checkpoint(model, work / "qvalue_biased")
    refused = work / "qvalue_biased_hf"
    code, err = run_main(capsys, "--direction", "mcore2hf", "--load-dir", biased, "--save-dir", refused)
    assert_clean_failure(code, err, refused, "value head bias is 0.5", "--drop-value-head-bias")
    code, err = run_main(capsys, "--direction", "mcore2hf", "--load-dir", biased, "--save-dir", refused,
                         "--drop-value-head-bias")
    assert code == 0, err
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForSequenceClassification.from_pretrained(refused, attn_implementation="eager").eval()
    model.eval()
    with torch.no_grad():
        ours = model(ids, torch.arange(6).expand(2, 6), None)[:, -1]
        theirs = hf(input_ids=ids).logits[:, 0]
    assert (ours - 0.5 - theirs).abs().max() < 1e-4


def test_causal_lm_to_value_with_fresh_head(qwen2_dir, qwen2_ckpt, work, capsys):
    """HF causal LM -> critic (hf2mcore) and posttrain causal LM -> critic (mcore2mcore) give the same model."""
    from posttrain.models import build_model, load_model_checkpoint, read_checkpoint_meta

    from_hf, from_mcore = work / "critic_from_hf", work / "critic_from_mcore"
    code, err = run_main(capsys, "--direction", "hf2mcore", "--load-dir", qwen2_dir, "--save-dir", from_hf,
                         "--model-kind", "value")
    assert_clean_failure(code, err, from_hf, "--init-value-head")
    assert run_main(capsys, "--direction", "hf2mcore", "--load-dir", qwen2_dir, "--save-dir", from_hf,
                    "--model-kind", "value", "--init-value-head", "--seed", "5")[0] == 0
    assert run_main(capsys, "--direction", "mcore2mcore", "--load-dir", qwen2_ckpt, "--save-dir", from_mcore,
                    "--model-kind", "value", "--init-value-head", "--seed", "5")[0] == 0
    states = []
    for ckpt in (from_hf, from_mcore):
        meta = read_checkpoint_meta(ckpt)
        assert meta["model_kind"] == "value" and meta["extra"]["value_head"] == "initialized"
        model = build_model(meta["hf_config"], "value", value_head_seed=99)
        load_model_checkpoint(model, ckpt)
        states.append(model.state_dict())
    for name, tensor in states[0].items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, states[1][name]), name
    head = states[0]["value_head.linear.weight"]
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(head, torch.randn(head.shape, generator=gen) * 0.02)
    assert states[0]["value_head.linear.bias"].item() == 0.0


def test_tokenizer_files_travel_with_the_checkpoint(qwen2_dir, tokenizer_dir, work, capsys):
    from transformers import AutoTokenizer

    ckpt, back = work / "qwen2_tok_ckpt", work / "qwen2_tok_back"
    assert run_main(capsys, "--direction", "hf2mcore", "--load-dir", qwen2_dir, "--save-dir", ckpt,
                    "--tokenizer-dir", tokenizer_dir)[0] == 0
    assert AutoTokenizer.from_pretrained(ckpt)("hello").input_ids == \
        AutoTokenizer.from_pretrained(tokenizer_dir)("hello").input_ids
    assert run_main(capsys, "--direction", "mcore2hf", "--load-dir", ckpt, "--save-dir", back)[0] == 0
    assert (back / "tokenizer.json").is_file() and (back / "chat_template.jinja").is_file()


# ----------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------


def test_cli_unsupported_architecture_one_line_error(work):
    src = work / "gpt2_hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    out = work / "gpt2_out"
    proc = subprocess.run([sys.executable, str(REPO / "convert_ckpt.py"), "--direction", "hf2mcore", "--load-dir",
                           str(src), "--save-dir", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert_clean_failure(proc.returncode, proc.stderr, out, "model_type 'gpt2' is not supported",
                         "llama, qwen2, mixtral, qwen2_moe")


def test_missing_config_and_safetensors(qwen2_dir, work, capsys):
    empty = work / "empty_hf"
    empty.mkdir()
    out = work / "out_missing"
    code, err = run_main(capsys, "--direction", "hf2mcore", "--load-dir", empty, "--save-dir", out)
    assert_clean_failure(code, err, out, str(empty), "no config.json")
    shutil.copy(qwen2_dir / "config.json", empty / "config.json")
    code, err = run_main(capsys, "--direction", "hf2mcore", "--load-dir", empty, "--save-dir", out)
    assert_clean_failure(code, err, out, str(empty), "no model.safetensors")
    code, err = run_main(capsys, "--direction", "mcore2hf", "--load-dir", empty, "--save-dir", out)
    assert_clean_failure(code, err, out, str(empty), "not a posttrain model checkpoint")


def test_target_tensor_parallel_must_divide_heads(example_model_dir, qwen2_dir, work, capsys):
    out = work / "out_tp"
    code, err = run_main(capsys, "--direction", "hf2mcore", "--load-dir", example_model_dir, "--save-dir", out,
                         "--target-tensor-parallel-size", "2")
    assert_clean_failure(code, err, out, "--target-tensor-parallel-size 2 does not divide num_attention_heads 9")
    code, err = run_main(capsys, "--direction", "hf2mcore", "--load-dir", qwen2_dir, "--save-dir", out,
                         "--target-tensor-parallel-size", "4")  # 4 heads but only 2 KV heads
    assert_clean_failure(code, err, out, "--target-tensor-parallel-size 4 does not divide num_key_value_heads 2")


@pytest.mark.parametrize("field, value, fragment", [
    ("hidden_size", 32, "model.embed_tokens.weight has shape [300, 64] but config.json implies [300, 32]"),
    ("vocab_size", 320, "model.embed_tokens.weight has shape [300, 64] but config.json implies [320, 64]"),
])
def test_weights_that_do_not_match_the_config(field, value, fragment, qwen2_dir, work, capsys):
    src = work / f"bad_{field}"
    src.mkdir()
    config = json.loads((qwen2_dir / "config.json").read_text())
    config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").symlink_to(qwen2_dir / "model.safetensors")
    out = work / f"out_bad_{field}"
    code, err = run_main(capsys, "--direction", "hf2mcore", "--load-dir", src, "--save-dir", out)
    assert_clean_failure(code, err, out, "model.safetensors", fragment)


def test_checkpoint_that_does_not_match_its_metadata(qwen2_ckpt, work, capsys):
    bad = work / "bad_ckpt"
    bad.mkdir()
    (bad / "model").symlink_to(qwen2_ckpt / "model")
    meta = json.loads((qwen2_ckpt / "posttrain_checkpoint.json").read_text())
    meta["hf_config"]["intermediate_size"] = 256
    (bad / "posttrain_checkpoint.json").write_text(json.dumps(meta))
    out = work / "out_bad_ckpt"
    code, err = run_main(capsys, "--direction", "mcore2hf", "--load-dir", bad, "--save-dir", out)
    assert_clean_failure(code, err, out, str(bad), "decoder.layers.mlp.linear_fc2.weight",
                         "[2, 64, 128] in the checkpoint but [2, 64, 256] in the model")


def test_inconsistent_flags(qwen2_dir, qwen2_ckpt, work, capsys):
    out = work / "out_flags"
    cases = [
        (("--direction", "hf2mcore", "--load-dir", qwen2_dir, "--model-type-hf", "llama"), "--model-type-hf llama"),
        (("--direction", "mcore2mcore", "--load-dir", qwen2_ckpt), "--model-kind value --init-value-head"),
        (("--direction", "hf2mcore", "--load-dir", qwen2_dir, "--tokenizer-dir", work / "nowhere"), "nowhere"),
        (("--direction", "mcore2hf", "--load-dir", qwen2_ckpt, "--model-kind", "value"), "--model-kind value"),
    ]
    for args, fragment in cases:
        code, err = run_main(capsys, *args, "--save-dir", out)
        assert_clean_failure(code, err, out, fragment)
    # an existing output directory is never overwritten without --overwrite
    out.mkdir()
    code, err = run_main(capsys, "--direction", "mcore2hf", "--load-dir", qwen2_ckpt, "--save-dir", out)
    assert code == 1 and "already exists" in err and out.is_dir() and not any(out.iterdir())


def test_sharded_safetensors_in_and_out(qwen2_dir, work, capsys):
    """A checkpoint split over several safetensors files with an index converts like a single file, and the
    shard writer produces an index transformers reads."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from posttrain.models.hf_mapping import SAFE_INDEX, HFCheckpointReader, save_hf_safetensors

    sharded = work / "qwen2_sharded"
    sharded.mkdir()
    shutil.copy(qwen2_dir / "config.json", sharded / "config.json")
    written = save_hf_safetensors(load_file(qwen2_dir / "model.safetensors"), sharded, max_shard_bytes=40_000)
    assert SAFE_INDEX in written and len(written) > 3
    assert HFCheckpointReader(sharded).keys() == set(load_file(qwen2_dir / "model.safetensors"))
    reference = AutoModelForCausalLM.from_pretrained(qwen2_dir)
    loaded = AutoModelForCausalLM.from_pretrained(sharded)
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ckpt, back = work / "qwen2_sharded_ckpt", work / "qwen2_sharded_back"
    assert run_main(capsys, "--direction", "hf2mcore", "--load-dir", sharded, "--save-dir", ckpt)[0] == 0
    assert run_main(capsys, "--direction", "mcore2hf", "--load-dir", ckpt, "--save-dir", back)[0] == 0
    assert_same_safetensors(qwen2_dir, back)
