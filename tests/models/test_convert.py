"""convert_ckpt.py: round trips HF -> posttrain -> HF on tiny models, value-head handling, and bad input.

Every bad input must give one ``error: ...`` line, exit status 1 and no output directory (nor a hidden partial
one). Most cases call ``posttrain.models.convert.main(argv)`` in process; one runs the real CLI in a subprocess.
(The real SmolLM2 round trip is in tests/models/test_provider.py, next to its converted checkpoint.)
"""
from __future__ import annotations

import json
import re
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
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
    )

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
    from transformers import (
        AutoModelForSequenceClassification,
        Qwen2ForSequenceClassification,
    )

    from posttrain.models import (
        build_model,
        load_model_checkpoint,
        read_checkpoint_meta,
        save_model_checkpoint,
    )

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
    from posttrain.models import (
        build_model,
        load_model_checkpoint,
        read_checkpoint_meta,
    )

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

    from posttrain.models.hf_mapping import (
        SAFE_INDEX,
        HFCheckpointReader,
        save_hf_safetensors,
    )

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


# ----------------------------------------------------------------------------------------------------------------
# damaged files
# ----------------------------------------------------------------------------------------------------------------


def _truncate(path: Path, size: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 if size is None else size])


def _garble(path: Path) -> None:
    """Overwrite the middle of a file with other bytes (same size)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 4:3 * len(data) // 4] = b"\x07" * (3 * len(data) // 4 - len(data) // 4)
    path.write_bytes(bytes(data))


def _shard_index_dir(src: Path, dst: Path) -> None:
    """``dst``: ``src`` as several safetensors shards with an index; the second shard truncated."""
    from safetensors.torch import load_file

    from posttrain.models.hf_mapping import save_hf_safetensors

    (dst / "model.safetensors").unlink()
    save_hf_safetensors(load_file(src / "model.safetensors"), dst, max_shard_bytes=40_000)
    _truncate(next(p for p in sorted(dst.glob("model-*.safetensors")) if "00002" in p.name))


# (name, source: hf or ckpt, damage, fragments of the error line)
DAMAGED = [
    ("safetensors_empty", "hf", lambda d: _truncate(d / "model.safetensors", 0),
     ["model.safetensors: not a readable safetensors file (0 bytes", "empty, truncated or corrupt"]),
    ("safetensors_truncated", "hf", lambda d: _truncate(d / "model.safetensors"),
     ["model.safetensors: not a readable safetensors file", "file not fully covered"]),
    ("safetensors_header_cut", "hf", lambda d: _truncate(d / "model.safetensors", 100),
     ["model.safetensors: not a readable safetensors file (100 bytes"]),
    ("safetensors_shard_truncated", "hf", None, ["model-00002-of-", "not a readable safetensors file"]),
    ("distcp_missing", "ckpt", lambda d: (d / "model" / "__0_1.distcp").unlink(),
     ["model/__0_1.distcp: missing (listed in .metadata)"]),
    ("distcp_truncated", "ckpt", lambda d: _truncate(d / "model" / "__0_1.distcp"),
     ["model/__0_1.distcp: truncated (", ".metadata lists data up to byte"]),
    ("distcp_empty", "ckpt", lambda d: _truncate(d / "model" / "__0_0.distcp", 0),
     ["model/__0_0.distcp: truncated (0 bytes"]),
    ("distcp_garbled", "ckpt", lambda d: _garble(d / "model" / "__0_1.distcp"),
     ["tensor data does not read back", "a .distcp file is corrupt"]),
    ("torch_metadata_missing", "ckpt", lambda d: (d / "model" / ".metadata").unlink(),
     ["model/.metadata: missing from the checkpoint"]),
    ("torch_metadata_truncated", "ckpt", lambda d: _truncate(d / "model" / ".metadata"),
     ["model/.metadata: unreadable", "truncated or corrupt"]),
    ("common_pt_missing", "ckpt", lambda d: (d / "model" / "common.pt").unlink(),
     ["model/common.pt: missing from the checkpoint"]),
    ("common_pt_truncated", "ckpt", lambda d: _truncate(d / "model" / "common.pt"),
     ["model/common.pt: unreadable", "truncated or corrupt"]),
    ("dist_config_missing", "ckpt", lambda d: (d / "model" / "metadata.json").unlink(),
     ["model: not a dist_checkpointing directory (no metadata.json)"]),
    ("dist_config_bad_json", "ckpt", lambda d: (d / "model" / "metadata.json").write_text("{"),
     ["model/metadata.json: unreadable"]),
]


@pytest.mark.parametrize("name, source, damage, fragments", DAMAGED, ids=[case[0] for case in DAMAGED])
def test_damaged_files_give_one_line_errors(name, source, damage, fragments, qwen2_dir, qwen2_ckpt, work, capsys):
    """Empty, truncated, missing or garbled files of either format: one ``error:`` line naming the file, no
    traceback, no output. Checkpoints are checked in both directions that read them (mcore2hf, mcore2mcore)."""
    damaged = work / f"damaged_{name}"
    shutil.copytree(qwen2_dir if source == "hf" else qwen2_ckpt, damaged)
    if damage is None:
        _shard_index_dir(qwen2_dir, damaged)
    else:
        damage(damaged)
    runs = ([("hf2mcore",)] if source == "hf" else
            [("mcore2hf",), ("mcore2mcore", "--model-kind", "value", "--init-value-head")])
    for direction, *flags in runs:
        out = work / f"out_damaged_{name}_{direction}"
        code, err = run_main(capsys, "--direction", direction, "--load-dir", damaged, "--save-dir", out, *flags)
        assert_clean_failure(code, err, out, str(damaged), *fragments)


def test_trainer_loading_a_damaged_checkpoint_gets_a_checkpoint_error(qwen2_ckpt, work):
    """The same checks guard ``load_model_checkpoint``, which the trainers call."""
    from posttrain.models import (
        CheckpointError,
        build_model,
        load_model_checkpoint,
        read_checkpoint_meta,
    )

    damaged = work / "damaged_for_load"
    shutil.copytree(qwen2_ckpt, damaged)
    _truncate(damaged / "model" / "__0_0.distcp")
    model = build_model(read_checkpoint_meta(damaged)["hf_config"], "causal_lm")
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: truncated"):
        load_model_checkpoint(model, damaged)


# ----------------------------------------------------------------------------------------------------------------
# output directories
# ----------------------------------------------------------------------------------------------------------------


def test_missing_parent_directories_are_created(qwen2_dir, qwen2_ckpt, work, capsys):
    """``--save-dir ckpt/actor`` works when ``ckpt/`` does not exist, in every direction."""
    from transformers import AutoModelForCausalLM

    from posttrain.models import is_checkpoint

    root = work / "new_parents"
    cases = [("hf2mcore", qwen2_dir, root / "a" / "ckpt" / "actor", ()),
             ("mcore2mcore", qwen2_ckpt, root / "b" / "ckpt" / "critic", ("--model-kind", "value",
                                                                         "--init-value-head")),
             ("mcore2hf", qwen2_ckpt, root / "c" / "hf" / "actor", ())]
    for direction, src, out, flags in cases:
        code, err = run_main(capsys, "--direction", direction, "--load-dir", src, "--save-dir", out, *flags)
        assert code == 0, err
    assert is_checkpoint(cases[0][2]) and is_checkpoint(cases[1][2])
    assert AutoModelForCausalLM.from_pretrained(cases[2][2]).config.architectures == ["Qwen2ForCausalLM"]


def test_failed_conversion_removes_the_parents_it_created(qwen2_dir, qwen2_ckpt, work, capsys):
    from posttrain.models import (
        build_model,
        load_model_checkpoint,
        read_checkpoint_meta,
        save_model_checkpoint,
    )

    model = build_model(read_checkpoint_meta(qwen2_ckpt)["hf_config"], "value")
    load_model_checkpoint(model, qwen2_ckpt, strict=False)
    with torch.no_grad():
        model.value_head.linear.bias.fill_(0.5)
    biased = save_model_checkpoint(model, work / "parents_biased")
    top = work / "parents_never"
    out = top / "x" / "hf"
    code, err = run_main(capsys, "--direction", "mcore2hf", "--load-dir", biased, "--save-dir", out)
    assert code == 1 and "--drop-value-head-bias" in err  # fails at the last check before writing
    assert not top.exists()

    blocker = work / "parents_file"
    blocker.write_text("a file, not a directory")
    out = blocker / "ckpt"
    code, err = run_main(capsys, "--direction", "hf2mcore", "--load-dir", qwen2_dir, "--save-dir", out)
    assert code == 1 and f"{blocker} is not a directory" in err and blocker.is_file()


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------


def test_help_shows_every_default(capsys):
    """Every flag with a value default shows it; flags defaulting to None say in words what happens."""
    import argparse

    from posttrain.models.convert import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.required or action.default is False:
            continue
        if action.default is None:
            assert "default" in action.help, action.dest
        else:
            assert f"(default: {action.default})" in action.help, action.dest
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for shown in ("(default: 0.02)", "(default: 1234)", "(default: 128)", "(default: 1)"):
        assert shown in text


@pytest.mark.parametrize("flags, fragment", [
    (("--value-head-init-std", "-0.1"), "--value-head-init-std must be a finite number >= 0, got -0.1"),
    (("--value-head-init-std", "nan"), "--value-head-init-std must be a finite number >= 0, got nan"),
    (("--make-vocab-size-divisible-by", "0"), "--make-vocab-size-divisible-by must be >= 1, got 0"),
    (("--target-tensor-parallel-size", "0"), "--target-tensor-parallel-size must be >= 1, got 0"),
    (("--target-expert-parallel-size", "-2"), "--target-expert-parallel-size must be >= 1, got -2"),
    (("--direction", "mcore2hf", "--init-value-head"), "--init-value-head is for hf2mcore / mcore2mcore"),
    (("--direction", "mcore2mcore", "--model-kind", "value"), "pass --model-kind value --init-value-head"),
    (("--init-value-head", "--model-kind", "causal_lm"), "--init-value-head needs --model-kind value"),
])
def test_flag_values_are_checked_before_any_work(flags, fragment, work, capsys):
    """Range and combination checks of :class:`ConvertConfig` (they run before the source is even read)."""
    from posttrain.arguments import ArgumentError, dataclass_from_args
    from posttrain.models.convert import ConvertConfig, build_parser

    out = work / "out_flag_values"
    argv = ["--direction", "hf2mcore", "--load-dir", str(work / "nowhere"), "--save-dir", str(out), *flags]
    code, err = run_main(capsys, *argv)
    assert_clean_failure(code, err, out, fragment)
    with pytest.raises(ArgumentError, match=re.escape(fragment)):
        dataclass_from_args(ConvertConfig, build_parser().parse_args(argv))


def test_cli_flags_come_from_the_config_dataclass():
    """One flag per :class:`ConvertConfig` field, same destination, choices where the field has them."""
    import dataclasses

    from posttrain.models.convert import ConvertConfig, build_parser

    actions = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    assert set(actions) == {f.name for f in dataclasses.fields(ConvertConfig)}
    assert actions["direction"].choices == ["hf2mcore", "mcore2hf", "mcore2mcore"] and actions["direction"].required
    assert actions["dtype"].choices == ["float32", "bfloat16", "float16"] and actions["dtype"].default is None
    assert actions["target_pipeline_parallel_size"].option_strings == ["--target-pipeline-parallel-size"]


# ----------------------------------------------------------------------------------------------------------------
# reward models exported to HF score the same tokens as posttrain
# ----------------------------------------------------------------------------------------------------------------

PAIR_SEQ_LENGTH = 640  # pairs with a longer sequence are skipped (keeps the CPU forward passes short)


@pytest.fixture(scope="module")
def smol_reward(example_model_dir, work) -> dict:
    """A small SmolLM2-based reward model in both poolings, exported to HF.

    The trunk is SmolLM2-135M-Instruct's embedding, first two layers and final norm (real weights, real tokenizer
    and chat template); the head is fresh (``N(0, 0.05^2)``, seed 11). ``last``: bias 0 ->
    ``LlamaForSequenceClassification``; ``response_mean``: the same head with bias 0.25 ->
    ``LlamaForTokenClassification``.
    """
    from transformers import LlamaForCausalLM

    from posttrain.models import (
        build_model,
        load_model_checkpoint,
        read_checkpoint_meta,
        save_model_checkpoint,
    )
    from posttrain.models.checkpoint import tokenizer_files
    from posttrain.models.convert import main

    src = work / "smol2_hf"
    LlamaForCausalLM.from_pretrained(example_model_dir, num_hidden_layers=2, dtype=torch.float32).save_pretrained(src)
    for path in tokenizer_files(example_model_dir):
        if not (src / path.name).exists():
            shutil.copy(path, src / path.name)
    last = work / "smol2_rm_last"
    assert main(["--direction", "hf2mcore", "--load-dir", str(src), "--save-dir", str(last), "--model-kind",
                 "value", "--init-value-head", "--value-head-init-std", "0.05", "--seed", "11"]) == 0
    model = build_model(read_checkpoint_meta(last)["hf_config"], "value")
    load_model_checkpoint(model, last)
    with torch.no_grad():
        model.value_head.linear.bias.fill_(0.25)
    mean = save_model_checkpoint(model, work / "smol2_rm_mean", tokenizer_dir=last,
                                 extra_meta={"score_pooling": "response_mean"})
    out = {"last": last, "response_mean": mean}
    for pooling in ("last", "response_mean"):
        out[f"{pooling}_hf"] = work / f"smol2_rm_{pooling}_hf"
        assert main(["--direction", "mcore2hf", "--load-dir", str(out[pooling]), "--save-dir",
                     str(out[f"{pooling}_hf"])]) == 0
    return out


@pytest.fixture(scope="module")
def dpo_pairs(smol_reward, shared_data, work) -> dict:
    """Held-out preference pairs (dpo_en_50_eval) through posttrain's preprocessing with the chat template:
    ``rows`` (chosen rows then rejected rows, token ids) and ``prompt_lengths``."""
    from posttrain.data.preprocess import PreprocessConfig, run_preprocess
    from posttrain.data.prompt_dataset import PairwiseDataset

    prefix = work / "dpo_eval" / "pairs"
    run_preprocess(PreprocessConfig(input=str(shared_data / "dpo_en_50_eval.parquet"), output_prefix=str(prefix),
                                    tokenizer_name_or_path=str(smol_reward["last"]), prompt_type="hf",
                                    handler_name="AlpacaStylePairwiseHandler", seq_length=PAIR_SEQ_LENGTH))
    pairs = PairwiseDataset(prefix)
    items = [pairs[i] for i in range(len(pairs))]
    return {"rows": [p.chosen_ids for p in items] + [p.rejected_ids for p in items],
            "prompt_lengths": [p.prompt_length for p in items] * 2, "pairs": len(items)}


def _batches(n: int, size: int = 8):
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def _posttrain_scores(ckpt: Path, rows, prompt_lengths, pooling: str) -> torch.Tensor:
    """Scores as the reward-model and PPO trainers compute them: right-padded rows, ``pool_scores``."""
    from posttrain.data.prompt_dataset import pad_sequences
    from posttrain.models import (
        build_attention_mask,
        build_model,
        load_model_checkpoint,
        position_ids_from_attention_mask,
        read_checkpoint_meta,
    )
    from posttrain.models.value_model import pool_scores

    model = build_model(read_checkpoint_meta(ckpt)["hf_config"], "value")
    load_model_checkpoint(model, ckpt)
    model.eval()
    scores = []
    for batch in _batches(len(rows)):
        ids, mask = pad_sequences([rows[k] for k in batch], 0, side="right")
        response = torch.zeros_like(mask)
        for r, k in enumerate(batch):
            response[r, prompt_lengths[k]:len(rows[k])] = 1
        with torch.no_grad():
            values = model(ids, position_ids_from_attention_mask(mask), build_attention_mask(mask))
        scores.append(pool_scores(values, mask, response, pooling))
    return torch.cat(scores)


def _hf_scores(model, tokenizer, rows, prompt_lengths, side: str, token_mean: bool) -> torch.Tensor:
    """Scores from transformers: batches padded by the exported tokenizer on ``side``; a sequence classifier's
    logit, or the mean of a token classifier's logits over the response tokens."""
    tokenizer.padding_side = side
    scores = []
    for batch in _batches(len(rows)):
        enc = tokenizer.pad({"input_ids": [rows[k].tolist() for k in batch]}, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits.float()
        if not token_mean:
            scores.append(logits[:, 0])
            continue
        width = enc["input_ids"].shape[1]
        for r, k in enumerate(batch):
            start = width - len(rows[k]) if side == "left" else 0
            scores.append(logits[r, start + prompt_lengths[k]:start + len(rows[k]), 0].mean()[None])
    return torch.cat(scores)


def test_exported_sequence_classifier_scores_the_end_of_turn_token(smol_reward, dpo_pairs):
    """``last`` pooling: posttrain scores each response's last token, ``<|im_end|>``. SmolLM2 pads with that very
    token, and HF's sequence classifier scores the last token that is not padding; the export therefore pads with
    another token, and HF's scores equal posttrain's with left and with right padding."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf_dir = smol_reward["last_hf"]
    rows, prompt_lengths = dpo_pairs["rows"], dpo_pairs["prompt_lengths"]
    assert dpo_pairs["pairs"] >= 10
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(int(row[-1]) == end_of_turn for row in rows)  # the token both sides must score
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    pad = config["pad_token_id"]
    assert pad == tokenizer.pad_token_id and pad not in (end_of_turn, config["eos_token_id"], config["bos_token_id"])
    assert not any(pad in row.tolist() for row in rows)

    ours = _posttrain_scores(smol_reward["last"], rows, prompt_lengths, "last")
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for side in ("left", "right"):
        theirs = _hf_scores(model, tokenizer, rows, prompt_lengths, side, token_mean=False)
        diff = (theirs - ours).abs().max().item()
        print(f"last pooling, {side} padding: max |HF - posttrain| = {diff:.3g}")
        assert diff <= 1e-4, side
    n = dpo_pairs["pairs"]
    assert ((ours[:n] > ours[n:]) == (theirs[:n] > theirs[n:])).all()

    # the source's pad token (<|im_end|>) makes HF score the token before it: the check above would catch it
    model.config.pad_token_id = end_of_turn
    tokenizer.pad_token = "<|im_end|>"
    stale = _hf_scores(model, tokenizer, rows, prompt_lengths, "right", token_mean=False)
    assert (stale - ours).abs().max().item() > 1e-2


def test_exported_token_classifier_mean_equals_response_mean(smol_reward, dpo_pairs):
    """``response_mean`` pooling: the mean of HF's per-token logits over the response tokens is posttrain's
    score (head bias included), with left and with right padding."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    hf_dir = smol_reward["response_mean_hf"]
    rows, prompt_lengths = dpo_pairs["rows"], dpo_pairs["prompt_lengths"]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"] and config["score_pooling"] == "response_mean"
    ours = _posttrain_scores(smol_reward["response_mean"], rows, prompt_lengths, "response_mean")
    model = AutoModelForTokenClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert model.score.bias.item() == pytest.approx(0.25)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    for side in ("left", "right"):
        theirs = _hf_scores(model, tokenizer, rows, prompt_lengths, side, token_mean=True)
        diff = (theirs - ours).abs().max().item()
        print(f"response_mean pooling, {side} padding: max |HF - posttrain| = {diff:.3g}")
        assert diff <= 1e-4, side


@pytest.mark.parametrize("name, damage, fragment", [
    ("tokenizer_json_truncated", lambda d: _truncate(d / "tokenizer.json", 5000), "the tokenizer files do not load"),
    ("generation_config_bad", lambda d: (d / "generation_config.json").write_text("[1,"),
     "generation_config.json: not a valid generation config"),
])
def test_reward_export_with_damaged_tokenizer_files(name, damage, fragment, smol_reward, work, capsys):
    """The sequence-classifier export reads the tokenizer to choose its pad token: damaged tokenizer files give one
    error line, not a traceback."""
    damaged = work / f"damaged_rm_{name}"
    shutil.copytree(smol_reward["last"], damaged)
    damage(damaged)
    out = work / f"out_damaged_rm_{name}"
    code, err = run_main(capsys, "--direction", "mcore2hf", "--load-dir", damaged, "--save-dir", out)
    assert_clean_failure(code, err, out, str(damaged), fragment)
