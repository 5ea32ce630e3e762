"""Offline preprocessing on the real Alpaca / preference data with the real SmolLM2 tokenizer.

Every expectation is computed here, independently of the code under test: from the tokenizer itself
(``tok(text, add_special_tokens=False)``, ``tok.apply_chat_template``) on chat text written out literally, and the
output is read back with megatron-core's own ``IndexedDataset``.
"""
from __future__ import annotations

import filecmp
import io
import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.data.preprocess import main

REPO = Path(__file__).resolve().parents[2]
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
OUTPUT_SUFFIXES = ("_packed_input_ids_document.bin", "_packed_input_ids_document.idx",
                   "_packed_attention_mask_document.bin", "_packed_attention_mask_document.idx", "_meta.json")


# ----------------------------------------------------------------------------------------------------- helpers

def alpaca_prompt(row: dict) -> str:
    return row["instruction"] + ("\n" + row["input"] if row["input"] else "")


def chatml(user: str, system: str | None = QWEN_SYSTEM) -> str:
    head = "<|im_start|>system\n" + system + "<|im_end|>\n" if system else ""
    return head + "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n"


def expected_ids(tok, prompt_type: str, prompts: list[str]) -> list[list[int]]:
    """The tokenizer's own encoding of each templated prompt."""
    if prompt_type == "empty":
        return tok(prompts, add_special_tokens=False)["input_ids"]
    if prompt_type == "qwen":
        return tok([chatml(p) for p in prompts], add_special_tokens=False)["input_ids"]
    if prompt_type == "hf":
        return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False) for p in prompts]
    raise AssertionError(prompt_type)


def read_docs(prefix: Path, name: str = "packed_input_ids") -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(f"{prefix}_{name}_document")
    assert len(dataset.document_indices) == len(dataset) + 1  # one sequence per document
    return [np.array(dataset[i]) for i in range(len(dataset))]  # copies: the mmap closes with the dataset


def run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def preprocess(capsys, model_dir, data, prefix, prompt_type="empty", workers=1, *extra) -> dict:
    code, err = run(capsys, "--input", data, "--tokenizer-name-or-path", model_dir, "--tokenizer-type",
                    "PretrainedFromHF", "--output-prefix", prefix, "--prompt-type", prompt_type,
                    "--workers", workers, "--handler-name", "PPOAlpacaStyleInstructionHandler", *extra)
    assert code == 0, err
    return json.loads(Path(f"{prefix}_meta.json").read_text())


def assert_docs_equal(prefix: Path, expected: list[list[int]]) -> None:
    docs = read_docs(prefix)
    assert len(docs) == len(expected)
    for k, (doc, exp) in enumerate(zip(docs, expected)):
        assert doc.tolist() == list(exp), f"document {k}"
    masks = read_docs(prefix, "packed_attention_mask")
    assert [m.tolist() for m in masks] == [[1] * len(e) for e in expected]


def assert_same_files(prefix_a: Path, prefix_b: Path, suffixes=OUTPUT_SUFFIXES) -> None:
    """Byte-identical datasets; identical metadata apart from the file names it records."""
    for suffix in suffixes:
        if suffix.endswith(".json"):
            metas = [json.loads(Path(f"{p}{suffix}").read_text()) for p in (prefix_a, prefix_b)]
            for meta in metas:
                for entry in meta["datasets"].values():
                    entry.pop("prefix")
            assert metas[0] == metas[1]
        else:
            assert filecmp.cmp(f"{prefix_a}{suffix}", f"{prefix_b}{suffix}", shallow=False), suffix


def assert_failed_cleanly(code: int, err: str, prefix: Path, *needles: str) -> str:
    """Exit status 1, exactly one ``error:`` line holding ``needles``, no traceback, nothing written at ``prefix``."""
    assert code == 1
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    if prefix.parent.is_dir():
        left = [p.name for p in prefix.parent.iterdir() if p.name.startswith(prefix.name + "_") or ".tmp-" in p.name]
        assert left == [], left
    return errors[0]


# ------------------------------------------------------------------------------------ prompts: real data

@pytest.mark.parametrize("prompt_type", ["empty", "qwen", "hf"])
def test_alpaca_800_ids_equal_tokenizer_encoding(capsys, tmp_path, shared_data, example_model_dir, tok,
                                                 alpaca_rows, prompt_type):
    data = shared_data / "alpaca_en_800.parquet"
    meta = preprocess(capsys, example_model_dir, data, tmp_path / "w1", prompt_type, 1)
    expected = expected_ids(tok, prompt_type, [alpaca_prompt(r) for r in alpaca_rows])
    assert_docs_equal(tmp_path / "w1", expected)

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(f"{tmp_path / 'w1'}_packed_input_ids_document").index.dtype == np.uint16
    assert meta["documents"] == 800 and meta["rows"] == 800
    assert meta["skipped"] == {"empty_prompt": 0, "too_long": 0}
    assert (meta["eos_token_id"], meta["pad_token_id"], meta["bos_token_id"]) == (2, 2, 1)
    assert meta["vocab_size"] == len(tok) == 49152
    assert meta["tokens"] == sum(len(e) for e in expected)
    assert meta["lengths"]["packed_input_ids"]["max"] == max(len(e) for e in expected)
    assert (meta["handler"], meta["prompt_type"]) == ("PPOAlpacaStyleInstructionHandler", prompt_type)
    assert meta["input_files"] == [str(data.resolve())]

    preprocess(capsys, example_model_dir, data, tmp_path / "w2", prompt_type, 2, "--chunk-size", 64)
    assert_same_files(tmp_path / "w1", tmp_path / "w2")


def test_jsonl_input(capsys, tmp_path, example_model_dir, tok, alpaca_rows):
    data = tmp_path / "alpaca.jsonl"
    lines = [json.dumps({"instruction": r["instruction"], "input": r["input"], "output": r["output"]},
                        ensure_ascii=False) for r in alpaca_rows]
    lines.insert(10, "")  # blank lines are not rows
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    preprocess(capsys, example_model_dir, data, tmp_path / "w1", "qwen", 1)
    assert_docs_equal(tmp_path / "w1", expected_ids(tok, "qwen", [alpaca_prompt(r) for r in alpaca_rows]))
    preprocess(capsys, example_model_dir, data, tmp_path / "w2", "qwen", 2, "--chunk-size", 100)
    assert_same_files(tmp_path / "w1", tmp_path / "w2")


def test_json_array_input(capsys, tmp_path, example_model_dir, tok, alpaca_rows):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(alpaca_rows[:120], ensure_ascii=False, indent=1), encoding="utf-8")
    preprocess(capsys, example_model_dir, data, tmp_path / "out", "empty")
    assert_docs_equal(tmp_path / "out", expected_ids(tok, "empty", [alpaca_prompt(r) for r in alpaca_rows[:120]]))


def test_directory_and_glob_of_parquet_shards(capsys, tmp_path, shared_data, example_model_dir, tok, alpaca_rows):
    table = pq.read_table(shared_data / "alpaca_en_800.parquet")
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(table.slice(0, 400), shards / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(400), shards / "train-00001-of-00002.parquet", row_group_size=150)
    (shards / "README.md").write_text("not data")
    out = tmp_path / "out"
    out.mkdir()
    meta = preprocess(capsys, example_model_dir, shards, out / "w1", "hf", 1)
    assert len(meta["input_files"]) == 2
    assert_docs_equal(out / "w1", expected_ids(tok, "hf", [alpaca_prompt(r) for r in alpaca_rows]))
    preprocess(capsys, example_model_dir, shards, out / "w2", "hf", 2, "--chunk-size", 128)
    assert_same_files(out / "w1", out / "w2", OUTPUT_SUFFIXES[:-1])
    preprocess(capsys, example_model_dir, f"{shards}/train-*.parquet", out / "glob", "hf", 1)
    assert_same_files(out / "w1", out / "glob")


def test_chinese_alpaca(capsys, tmp_path, shared_data, example_model_dir, tok):
    data = shared_data / "alpaca_zh_1000.parquet"
    rows = pq.read_table(data).to_pylist()
    assert len(rows) == 1000
    meta = preprocess(capsys, example_model_dir, data, tmp_path / "w1", "qwen", 1)
    assert meta["documents"] == 1000
    assert_docs_equal(tmp_path / "w1", expected_ids(tok, "qwen", [alpaca_prompt(r) for r in rows]))
    preprocess(capsys, example_model_dir, data, tmp_path / "w2", "qwen", 2)
    assert_same_files(tmp_path / "w1", tmp_path / "w2")


def test_seq_length_skips_and_counts_long_prompts(capsys, tmp_path, shared_data, example_model_dir, tok,
                                                  alpaca_rows):
    expected = expected_ids(tok, "qwen", [alpaca_prompt(r) for r in alpaca_rows])
    limit = 60
    kept = [e for e in expected if len(e) < limit]
    assert 0 < len(kept) < 800
    meta = preprocess(capsys, example_model_dir, shared_data / "alpaca_en_800.parquet", tmp_path / "out", "qwen",
                      2, "--seq-length", limit, "--chunk-size", 50)
    assert_docs_equal(tmp_path / "out", kept)
    assert meta["skipped"] == {"empty_prompt": 0, "too_long": 800 - len(kept)}
    first_long = next(k for k, e in enumerate(expected) if len(e) >= limit)
    assert meta["skipped_examples"]["too_long"][0].endswith(f"row {first_long}")


def test_max_samples_first_rows_or_seeded_subset(capsys, tmp_path, shared_data, example_model_dir, tok,
                                                 alpaca_rows):
    data = shared_data / "alpaca_en_800.parquet"
    expected = expected_ids(tok, "empty", [alpaca_prompt(r) for r in alpaca_rows])
    preprocess(capsys, example_model_dir, data, tmp_path / "first", "empty", 1, "--max-samples", 100)
    assert_docs_equal(tmp_path / "first", expected[:100])

    preprocess(capsys, example_model_dir, data, tmp_path / "s1", "empty", 1, "--max-samples", 100, "--seed", 7)
    preprocess(capsys, example_model_dir, data, tmp_path / "s2", "empty", 2, "--max-samples", 100, "--seed", 7)
    assert_same_files(tmp_path / "s1", tmp_path / "s2")
    docs = [d.tolist() for d in read_docs(tmp_path / "s1")]
    assert len(docs) == 100 and docs != expected[:100]
    position = 0  # the subset keeps input order: each document appears later in the input than the previous one
    for doc in docs:
        position = expected.index(doc, position) + 1
    preprocess(capsys, example_model_dir, data, tmp_path / "s3", "empty", 1, "--max-samples", 100, "--seed", 8)
    assert [d.tolist() for d in read_docs(tmp_path / "s3")] != docs


def test_map_keys_system_column_and_system_prompt(capsys, tmp_path, example_model_dir, tok, alpaca_rows):
    rows = alpaca_rows[:60]
    systems = ["You are terse." if k % 3 == 0 else ("" if k % 3 == 1 else None) for k in range(len(rows))]
    table = pa.table({"question": [r["instruction"] for r in rows], "context": [r["input"] for r in rows],
                      "sys": pa.array(systems, pa.string())})
    data = tmp_path / "custom.parquet"
    pq.write_table(table, data)
    keys = json.dumps({"prompt": "question", "query": "context", "system": "sys"})
    preprocess(capsys, example_model_dir, data, tmp_path / "qwen", "qwen", 1, "--map-keys", keys)
    texts = [chatml(alpaca_prompt(r), s or QWEN_SYSTEM) for r, s in zip(rows, systems)]
    assert_docs_equal(tmp_path / "qwen", tok(texts, add_special_tokens=False)["input_ids"])

    preprocess(capsys, example_model_dir, data, tmp_path / "hf", "hf", 1, "--map-keys", keys)
    expected = [tok.apply_chat_template(([{"role": "system", "content": s}] if s else [])
                                        + [{"role": "user", "content": alpaca_prompt(r)}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
                for r, s in zip(rows, systems)]
    assert_docs_equal(tmp_path / "hf", expected)

    # --system-prompt replaces the template's default; a row's own system column still wins; "" removes it.
    preprocess(capsys, example_model_dir, data, tmp_path / "flag", "qwen", 1, "--map-keys", keys,
               "--system-prompt", "You are a helpful assistant.")
    texts = [chatml(alpaca_prompt(r), s or "You are a helpful assistant.") for r, s in zip(rows, systems)]
    assert_docs_equal(tmp_path / "flag", tok(texts, add_special_tokens=False)["input_ids"])
    preprocess(capsys, example_model_dir, data, tmp_path / "none", "qwen", 1, "--map-keys",
               json.dumps({"prompt": "question", "query": "context"}), "--system-prompt", "")
    texts = [chatml(alpaca_prompt(r), None) for r in rows]
    assert_docs_equal(tmp_path / "none", tok(texts, add_special_tokens=False)["input_ids"])


def test_other_templates_written_out(capsys, tmp_path, shared_data, example_model_dir, tok, alpaca_rows):
    data = shared_data / "alpaca_en_800.parquet"
    prompts = [alpaca_prompt(r) for r in alpaca_rows[:40]]
    literal = {
        "chatml": [chatml(p, None) for p in prompts],
        "alpaca": ["Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n" + p + "\n\n### Response:\n" for p in prompts],
        "llama3": [tok.bos_token + "<|start_header_id|>user<|end_header_id|>\n\n" + p
                   + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" for p in prompts],
    }
    for prompt_type, texts in literal.items():
        preprocess(capsys, example_model_dir, data, tmp_path / prompt_type, prompt_type, 1, "--max-samples", 40)
        assert_docs_equal(tmp_path / prompt_type, tok(texts, add_special_tokens=False)["input_ids"])
    # llama3's header tokens are not in SmolLM2's vocabulary: said once per string, then encoded as text.
    code, err = run(capsys, "--input", data, "--tokenizer-name-or-path", example_model_dir, "--output-prefix",
                    tmp_path / "warn", "--prompt-type", "llama3", "--max-samples", 5)
    assert code == 0 and "'<|eot_id|>', which is not a single token" in err


def test_sentencepiece_tokenizer(capsys, tmp_path, shared_data, alpaca_rows):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(r["instruction"] + "\n" + r["output"] for r in alpaca_rows),
                                   model_writer=model, vocab_size=600, model_type="bpe", minloglevel=2)
    (tmp_path / "sp.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    data = shared_data / "alpaca_en_800.parquet"
    prompts = [alpaca_prompt(r) for r in alpaca_rows[:200]]
    common = ["--input", data, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
              tmp_path / "sp.model", "--max-samples", 200]
    code, err = run(capsys, *common, "--output-prefix", tmp_path / "empty", "--prompt-type", "empty")
    assert code == 0, err
    assert [d.tolist() for d in read_docs(tmp_path / "empty")] == sp.encode(prompts)
    meta = json.loads((tmp_path / "empty_meta.json").read_text())
    assert (meta["vocab_size"], meta["bos_token_id"], meta["eos_token_id"]) == (600, sp.bos_id(), sp.eos_id())
    # llama3 writes "<s>" (a control piece) first: it becomes the BOS id, the text after it is encoded.
    code, err = run(capsys, *common, "--output-prefix", tmp_path / "llama3", "--prompt-type", "llama3",
                    "--workers", 2)
    assert code == 0, err
    for doc, prompt in zip(read_docs(tmp_path / "llama3"), prompts):
        rest = ("<|start_header_id|>user<|end_header_id|>\n\n" + prompt
                + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        assert doc.tolist() == [sp.bos_id()] + sp.encode(rest)
    code, err = run(capsys, *common, "--output-prefix", tmp_path / "hf", "--prompt-type", "hf")
    assert_failed_cleanly(code, err, tmp_path / "hf", "--prompt-type hf")


# ------------------------------------------------------------------------------------------------ bad input

def test_missing_column_names_column_and_file(capsys, tmp_path, shared_data, example_model_dir):
    data = shared_data / "dpo_en_250.parquet"
    code, err = run(capsys, "--input", data, "--tokenizer-name-or-path", example_model_dir,
                    "--output-prefix", tmp_path / "out")
    assert_failed_cleanly(code, err, tmp_path / "out", "'instruction'", str(data))
    code, err = run(capsys, "--input", shared_data / "alpaca_en_800.parquet", "--tokenizer-name-or-path",
                    example_model_dir, "--output-prefix", tmp_path / "out", "--map-keys", '{"query": "context"}')
    assert_failed_cleanly(code, err, tmp_path / "out", "'context'", "alpaca_en_800.parquet")


def test_non_string_cell_mid_run_leaves_nothing(capsys, tmp_path, example_model_dir, alpaca_rows):
    out = tmp_path / "out"
    out.mkdir()
    data = tmp_path / "bad.jsonl"
    rows = [{"instruction": r["instruction"], "input": r["input"]} for r in alpaca_rows[:300]]
    rows[250]["instruction"] = 12345
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, err = run(capsys, "--input", data, "--tokenizer-name-or-path", example_model_dir,
                    "--output-prefix", out / "ds", "--chunk-size", 16, "--workers", 2)
    assert_failed_cleanly(code, err, out / "ds", str(data), "row 250", "'instruction'", "int")
    code, err = run(capsys, "--input", data, "--tokenizer-name-or-path", example_model_dir,
                    "--output-prefix", out / "first", "--max-samples", 250)   # the bad row is not read
    assert code == 0, err
    table = pa.table({"instruction": pa.array(range(10)), "input": pa.array([""] * 10)})
    pq.write_table(table, tmp_path / "ints.parquet")
    code, err = run(capsys, "--input", tmp_path / "ints.parquet", "--tokenizer-name-or-path", example_model_dir,
                    "--output-prefix", out / "ds")
    assert_failed_cleanly(code, err, out / "ds", "row 0", "'instruction'", "expected a string")


def test_empty_and_whitespace_prompts_are_counted_skips(capsys, tmp_path, example_model_dir, tok, alpaca_rows):
    rows = [{"instruction": r["instruction"], "input": r["input"]} for r in alpaca_rows[:20]]
    rows[3]["instruction"], rows[3]["input"] = "", ""
    rows[7]["instruction"], rows[7]["input"] = "  \n\t ", ""
    rows[11]["instruction"], rows[11]["input"] = None, None
    rows[12]["instruction"], rows[12]["input"] = "", "only an input"
    del rows[15]["input"]  # the optional input column may be absent from a JSON row
    data = tmp_path / "gaps.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    meta = preprocess(capsys, example_model_dir, data, tmp_path / "out", "qwen")
    assert meta["skipped"] == {"empty_prompt": 3, "too_long": 0} and meta["documents"] == 17
    prompts = [(r["instruction"] or "") + ("\n" + r["input"] if r.get("input") else "")
               for k, r in enumerate(rows) if k not in (3, 7, 11)]
    assert_docs_equal(tmp_path / "out", expected_ids(tok, "qwen", prompts))
    assert [e.rsplit(" ", 1)[1] for e in meta["skipped_examples"]["empty_prompt"]] == ["3", "7", "11"]


def test_corrupt_and_unreadable_inputs(capsys, tmp_path, shared_data, example_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all" * 100)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes((shared_data / "alpaca_en_800.parquet").read_bytes()[:200_000])
    broken_json = tmp_path / "broken.jsonl"
    broken_json.write_text('{"instruction": "a", "input": ""}\n{"instruction": oops}\n')
    for path, needle in [(garbage, str(garbage)), (truncated, str(truncated)), (broken_json, "line 2"),
                         (tmp_path / "missing.parquet", "no such file"), (tmp_path / "*.nothing", "matches no file")]:
        code, err = run(capsys, "--input", path, "--tokenizer-name-or-path", example_model_dir,
                        "--output-prefix", out / "ds")
        assert_failed_cleanly(code, err, out / "ds", needle)


def test_bad_options(capsys, tmp_path, shared_data, example_model_dir):
    data = shared_data / "alpaca_en_800.parquet"
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "a_file").write_text("not a directory")
    base = ["--input", data, "--output-prefix", out / "ds"]
    model = ["--tokenizer-name-or-path", example_model_dir]
    cases = [
        (base + model + ["--handler-name", "NoSuchHandler"], ["NoSuchHandler", "PPOAlpacaStyleInstructionHandler",
                                                              "AlpacaStylePairwiseHandler"]),
        (base + model + ["--prompt-type", "nope"], ["'nope'", "qwen", "llama3", "empty", "hf"]),
        (base + ["--tokenizer-name-or-path", tmp_path / "no-such-model"], ["no-such-model", "no such file"]),
        (base + ["--tokenizer-name-or-path", out], ["cannot load a tokenizer"]),
        (["--input", data, "--output-prefix", tmp_path / "a_file" / "ds"] + model,
         ["--output-prefix", "a_file is not a directory"]),
        (base + model + ["--map-keys", "{not json"], ["--map-keys"]),
        (base + model + ["--map-keys", '{"answer": "output"}'], ["'answer'", "prompt, query, system"]),
        (base + model + ["--workers", "0"], ["--workers must be at least 1, got 0"]),
        (base + model + ["--chunk-size", "-5"], ["--chunk-size must be at least 1, got -5"]),
        (base + model + ["--max-samples", "0"], ["--max-samples must be at least 1, got 0"]),
        (base + model + ["--map-keys", "[1, 2]"], ["--map-keys must be a JSON object"]),
        (base + model + ["--tokenizer-type", "Tiktoken"], ["--tokenizer-type 'Tiktoken' is unknown",
                                                           "PretrainedFromHF, SentencePieceTokenizer"]),
        (base, ["--tokenizer-type PretrainedFromHF needs --tokenizer-name-or-path"]),
        (base + ["--tokenizer-type", "SentencePieceTokenizer"], ["needs --tokenizer-model"]),
        (base + model + ["--seq-length", "3"], ["no document written", "too_long=800"]),
    ]
    for args, needles in cases:
        code, err = run(capsys, *args)
        assert_failed_cleanly(code, err, out / "ds", *needles)


def test_option_checks_live_in_the_config(tmp_path, example_model_dir):
    """The same checks guard :class:`PreprocessConfig` built in Python; ``--map-keys`` text is parsed there."""
    from posttrain.data.errors import DataError
    from posttrain.data.preprocess import PreprocessConfig

    common = dict(input="x.parquet", output_prefix=str(tmp_path / "ds"), tokenizer_name_or_path=str(example_model_dir))
    assert PreprocessConfig(**common, map_keys='{"prompt": "question"}').map_keys == {"prompt": "question"}
    assert PreprocessConfig(**common, map_keys="").map_keys is None
    for bad, message in [(dict(log_interval=0), "--log-interval must be at least 1"),
                         (dict(seq_length=-1), "--seq-length must be at least 1"),
                         (dict(prompt_type="vicuna"), "--prompt-type 'vicuna' is unknown"),
                         (dict(handler_name="Nope"), "--handler-name 'Nope' is unknown"),
                         (dict(map_keys="{oops"), "--map-keys is not valid JSON"),
                         (dict(map_keys={"answer": "output"}), "'answer'")]:
        with pytest.raises(DataError, match=re.escape(message)):
            PreprocessConfig(**common, **bad)


def test_output_prefix_directories_are_created(capsys, tmp_path, shared_data, example_model_dir, tok, alpaca_rows):
    """``--output-prefix a/b/prefix`` creates ``a/b``; a failed run removes the directories it created."""
    data = shared_data / "alpaca_en_800.parquet"
    prefix = tmp_path / "a" / "b" / "alpaca"
    preprocess(capsys, example_model_dir, data, prefix, "empty", 1, "--max-samples", 20)
    assert_docs_equal(prefix, expected_ids(tok, "empty", [alpaca_prompt(r) for r in alpaca_rows[:20]]))

    never = tmp_path / "c" / "d" / "ds"
    code, err = run(capsys, "--input", data, "--tokenizer-name-or-path", example_model_dir, "--output-prefix", never,
                    "--seq-length", 3, "--max-samples", 20)
    assert_failed_cleanly(code, err, never, "no document written")
    assert not (tmp_path / "c").exists()


def test_flags_and_help_come_from_the_config():
    """One flag per :class:`PreprocessConfig` option (``progress_bar`` is Python-only), the MindSpeed-LLM names,
    and every value default shown by ``--help``."""
    import argparse
    import dataclasses

    from posttrain.data.preprocess import PreprocessConfig, build_parser

    actions = {a.dest: a for a in build_parser()._actions if not isinstance(a, argparse._HelpAction)}
    assert set(actions) == {f.name for f in dataclasses.fields(PreprocessConfig)} - {"progress_bar"}
    assert actions["output_prefix"].option_strings == ["--output-prefix"] and actions["output_prefix"].required
    assert actions["handler_name"].default == "PPOAlpacaStyleInstructionHandler"
    for action in actions.values():
        if action.required:
            continue
        if action.default is None:
            assert "default" in action.help or "needed by" in action.help, action.dest
        else:
            assert f"(default: {action.default})" in action.help, action.dest


def test_failed_run_keeps_previous_dataset(capsys, tmp_path, shared_data, example_model_dir, tok, alpaca_rows):
    data = shared_data / "alpaca_en_800.parquet"
    preprocess(capsys, example_model_dir, data, tmp_path / "ds", "empty", 1, "--max-samples", 50)
    before = {s: Path(f"{tmp_path / 'ds'}{s}").read_bytes() for s in OUTPUT_SUFFIXES}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "fine"}\n{"instruction": ["not", "a", "string"]}\n')
    code, err = run(capsys, "--input", bad, "--tokenizer-name-or-path", example_model_dir,
                    "--output-prefix", tmp_path / "ds")
    assert code == 1 and "row 1" in err
    assert {s: Path(f"{tmp_path / 'ds'}{s}").read_bytes() for s in OUTPUT_SUFFIXES} == before
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == []
    assert_docs_equal(tmp_path / "ds", expected_ids(tok, "empty", [alpaca_prompt(r) for r in alpaca_rows[:50]]))


def test_temporaries_of_killed_runs_for_the_same_prefix_are_removed_at_start(capsys, tmp_path, shared_data,
                                                                               example_model_dir):
    """A run killed with SIGKILL leaves ``<dataset>.bin.tmp-<pid>`` files; the next run writing the same prefix
    removes those whose process is gone, and nothing else."""
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead, alive = finished.pid, running.pid
    stale = [f"ds_packed_input_ids_document.bin.tmp-{dead}", f"ds_packed_input_ids_document.idx.tmp-{dead}",
             f"ds_packed_attention_mask_document.bin.tmp-{dead}", f"ds_meta.json.tmp-{dead}"]
    kept = [f"ds_packed_input_ids_document.bin.tmp-{alive}",   # a run still writing
            f"other_packed_input_ids_document.bin.tmp-{dead}",  # another prefix
            f"ds_notes.txt.tmp-{dead}"]                         # not a file this writer makes
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    try:
        preprocess(capsys, example_model_dir, shared_data / "alpaca_en_800.parquet", tmp_path / "ds", "empty", 1,
                   "--max-samples", 4)
    finally:
        running.kill()
        running.wait()
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == sorted(kept)
    assert len(read_docs(tmp_path / "ds")) == 4


def test_an_output_that_cannot_be_written_is_one_line_naming_the_prefix(tmp_path, shared_data, example_model_dir):
    """Writes past the file-size limit (``ulimit -f``, 20,000 bytes here) fail with EFBIG, as a full disk fails with
    ENOSPC: one ``error:`` line naming ``--output-prefix`` and the cause; every file of the run removed."""
    limit = 20_000

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, REPO / "preprocess_data.py", "--input",
                           shared_data / "alpaca_en_800.parquet", "--tokenizer-name-or-path", example_model_dir,
                           "--output-prefix", tmp_path / "ds"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size)
    line = assert_failed_cleanly(proc.returncode, proc.stderr, tmp_path / "ds", f"--output-prefix {tmp_path / 'ds'}",
                                 "EFBIG", f"{limit} bytes")
    assert line.endswith("no dataset was written")


def test_command_line_script(tmp_path, shared_data, example_model_dir):
    script = REPO / "preprocess_data.py"
    ok = subprocess.run([sys.executable, script, "--input", shared_data / "alpaca_en_800.parquet",
                         "--tokenizer-name-or-path", example_model_dir, "--tokenizer-type", "PretrainedFromHF",
                         "--output-prefix", tmp_path / "alpaca", "--workers", "2", "--log-interval", "100",
                         "--handler-name", "PPOAlpacaStyleInstructionHandler", "--prompt-type", "empty",
                         "--max-samples", "300", "--chunk-size", "50"],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr.count("docs/s") >= 3 and "tokens/s" in ok.stderr and "wrote 300 documents" in ok.stderr
    assert "Traceback" not in ok.stderr and "Warning" not in ok.stderr
    bad = subprocess.run([sys.executable, script, "--input", shared_data / "alpaca_en_800.parquet",
                          "--tokenizer-name-or-path", example_model_dir, "--output-prefix", tmp_path / "x",
                          "--prompt-type", "vicuna"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --prompt-type 'vicuna' is unknown")
    assert "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------------ preference pairs

def pair_messages(row: dict, system_default: str | None = None) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = [{"role": roles[role], "content": text} for role, text in json.loads(row["history"])]
    if system_default and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_default})
    return messages + [{"role": "user", "content": row["prompt"]}]


def chatml_pair_prompt(row: dict, system_default: str | None = QWEN_SYSTEM) -> str:
    text = ""
    for message in pair_messages(row, system_default):
        if message["role"] == "assistant":
            text += message["content"] + "<|im_end|>\n"
        elif message["role"] == "user":
            text += "<|im_start|>user\n" + message["content"] + "<|im_end|>\n<|im_start|>assistant\n"
        else:
            text += "<|im_start|>system\n" + message["content"] + "<|im_end|>\n"
    return text


def run_pairs(capsys, model_dir, data, prefix, prompt_type, *extra) -> dict:
    code, err = run(capsys, "--input", data, "--tokenizer-name-or-path", model_dir, "--output-prefix", prefix,
                    "--prompt-type", prompt_type, "--handler-name", "AlpacaStylePairwiseHandler", *extra)
    assert code == 0, err
    return json.loads(Path(f"{prefix}_meta.json").read_text())


def test_pairs_hf_template_equal_chat_template(capsys, tmp_path, shared_data, example_model_dir, tok):
    data = shared_data / "dpo_en_250.parquet"
    rows = pq.read_table(data).to_pylist()
    expected, skipped = [], 0
    for row in rows:
        prompt = tok.apply_chat_template(pair_messages(row), add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
        chosen = prompt + tok(row["chosen"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rejected = prompt + tok(row["rejected"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        if max(len(chosen), len(rejected)) >= 1024:
            skipped += 1
        else:
            expected.append((chosen, rejected, len(prompt)))
    assert 0 < skipped < 250
    meta = run_pairs(capsys, example_model_dir, data, tmp_path / "w1", "hf", "--seq-length", 1024)
    assert meta["documents"] == 250 - skipped == len(expected)
    assert meta["skipped"]["too_long"] == skipped and sum(meta["skipped"].values()) == skipped
    chosen = read_docs(tmp_path / "w1", "chosen_input_ids")
    rejected = read_docs(tmp_path / "w1", "rejected_input_ids")
    lengths = read_docs(tmp_path / "w1", "prompt_length")
    assert [c.tolist() for c in chosen] == [e[0] for e in expected]
    assert [r.tolist() for r in rejected] == [e[1] for e in expected]
    assert [x.tolist() for x in lengths] == [[e[2]] for e in expected]
    assert not Path(f"{tmp_path / 'w1'}_margin_document.idx").exists()
    run_pairs(capsys, example_model_dir, data, tmp_path / "w2", "hf", "--seq-length", 1024, "--workers", 2,
              "--chunk-size", 32)
    for name in ("chosen_input_ids", "rejected_input_ids", "prompt_length"):
        for ext in (".bin", ".idx"):
            suffix = f"_{name}_document{ext}"
            assert filecmp.cmp(f"{tmp_path / 'w1'}{suffix}", f"{tmp_path / 'w2'}{suffix}", shallow=False)


def test_pairs_qwen_history_written_out(capsys, tmp_path, shared_data, example_model_dir, tok):
    data = shared_data / "dpo_en_250.parquet"
    rows = pq.read_table(data).to_pylist()
    assert any(json.loads(r["history"])[:1] and json.loads(r["history"])[0][0] == "system" for r in rows)
    assert any(len(json.loads(r["history"])) >= 4 for r in rows)
    meta = run_pairs(capsys, example_model_dir, data, tmp_path / "q", "qwen")
    assert meta["documents"] == 250 and meta["end_of_turn"] == "<|im_end|>"
    chosen = read_docs(tmp_path / "q", "chosen_input_ids")
    lengths = read_docs(tmp_path / "q", "prompt_length")
    for row, doc, length in zip(rows, chosen, lengths):
        prompt = tok(chatml_pair_prompt(row), add_special_tokens=False)["input_ids"]
        assert doc.tolist() == prompt + tok(row["chosen"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert length.tolist() == [len(prompt)]


def test_pairs_margin_skips_and_missing_columns(capsys, tmp_path, shared_data, example_model_dir, tok):
    rows = pq.read_table(shared_data / "dpo_en_250.parquet").slice(0, 30).to_pylist()
    rows[0]["rejected"] = rows[0]["chosen"]                       # identical responses
    rows[1]["chosen"] = ""                                        # empty response
    rows[2]["rejected"] = "   "                                   # whitespace response
    rows[3]["prompt"] = " "                                       # empty prompt
    rows[4]["history"] = json.dumps([["gpt", "I speak first"]])   # does not start with a user turn
    margins = [0.25 * k - 2 for k in range(30)]
    table = pa.table({"question": [r["prompt"] for r in rows], "good": [r["chosen"] for r in rows],
                      "bad": [r["rejected"] for r in rows], "history": [r["history"] for r in rows],
                      "score_gap": margins})
    data = tmp_path / "pairs.parquet"
    pq.write_table(table, data)
    keys = json.dumps({"prompt": "question", "chosen": "good", "rejected": "bad", "margin": "score_gap"})
    meta = run_pairs(capsys, example_model_dir, data, tmp_path / "m", "chatml", "--map-keys", keys)
    assert meta["skipped"] == {"empty_prompt": 1, "empty_response": 2, "identical_responses": 1,
                               "bad_history": 1, "too_long": 0}
    assert meta["documents"] == 25
    stored = read_docs(tmp_path / "m", "margin")
    assert [m.dtype for m in stored[:1]] == [np.float32]
    assert [float(m[0]) for m in stored] == [margins[k] for k in range(5, 30)]
    rejected = read_docs(tmp_path / "m", "rejected_input_ids")
    for row, doc in zip(rows[5:], rejected):
        prompt = tok(chatml_pair_prompt(row, None), add_special_tokens=False)["input_ids"]
        assert doc.tolist() == prompt + tok(row["rejected"] + "<|im_end|>", add_special_tokens=False)["input_ids"]

    code, err = run(capsys, "--input", shared_data / "alpaca_en_800.parquet", "--tokenizer-name-or-path",
                    example_model_dir, "--output-prefix", tmp_path / "x", "--handler-name",
                    "AlpacaStylePairwiseHandler", "--map-keys", '{"prompt": "instruction"}')
    assert_failed_cleanly(code, err, tmp_path / "x", "'chosen'", "alpaca_en_800.parquet")

