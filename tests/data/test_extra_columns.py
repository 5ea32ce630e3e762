"""preprocess_data.py --extra-columns: input columns kept unchanged beside the prompts, one row per written prompt
(``<prefix>_extra.parquet``), on real Alpaca rows with computed answer columns."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from tests.data.test_preprocess import (
    alpaca_prompt,
    assert_failed_cleanly,
    expected_ids,
    preprocess,
    read_docs,
    run,
)

def answer_rows(alpaca_rows, n: int) -> list[dict]:
    """Real Alpaca rows plus computed columns: ``answer`` (the word count of the reference output, as text),
    ``level`` (an int, the input's length in characters) and ``data_source``."""
    return [{"instruction": r["instruction"], "input": r["input"], "answer": str(len(r["output"].split())),
             "level": len(r["input"]), "data_source": f"alpaca_en_800/{k}"} for k, r in enumerate(alpaca_rows[:n])]


def test_extra_columns_are_kept_per_written_prompt(capsys, tmp_path, example_model_dir, tok, alpaca_rows):
    rows = answer_rows(alpaca_rows, 60)
    rows[3]["instruction"] = "   "       # skipped: empty prompt
    rows[8]["answer"] = None             # null stays null
    data = tmp_path / "answers.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    lengths = [len(ids) for ids in expected_ids(tok, "empty", [alpaca_prompt(r) for r in rows])]
    kept = [r for r, n in zip(rows, lengths) if r["instruction"].strip() and n < 40]
    assert 20 < len(kept) < 59  # the length limit skips some rows: the kept values must follow the documents

    meta = preprocess(capsys, example_model_dir, data, tmp_path / "ds", "empty", 1, "--seq-length", 40,
                      "--chunk-size", 7, "--extra-columns", "answer", "level")
    assert meta["extra_columns"] == ["answer", "level"] and meta["extra_file"] == "ds_extra.parquet"
    assert meta["documents"] == len(kept) == len(read_docs(tmp_path / "ds"))
    stored = pq.read_table(tmp_path / "ds_extra.parquet")
    assert stored.column_names == ["answer", "level"]
    assert stored.to_pylist() == [{"answer": r["answer"], "level": r["level"]} for r in kept]
    assert stored.schema.field("level").type == pa.int64()

    # a later run without extra columns at the same prefix leaves no stale file behind
    meta = preprocess(capsys, example_model_dir, data, tmp_path / "ds", "empty", 1, "--max-samples", 10)
    assert meta["extra_columns"] == [] and meta["extra_file"] is None
    assert not (tmp_path / "ds_extra.parquet").exists()


def test_extra_columns_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, shared_data, example_model_dir,
                                                                alpaca_rows):
    common = ("--tokenizer-name-or-path", example_model_dir)
    # a column the file does not have: named, with the file and the columns present
    code, err = run(capsys, "--input", shared_data / "alpaca_en_800.parquet", *common,
                    "--output-prefix", tmp_path / "a", "--extra-columns", "answer")
    assert_failed_cleanly(code, err, tmp_path / "a", "'answer'", "--extra-columns", "alpaca_en_800.parquet",
                          "instruction, input, output, text")
    # a JSON row without it: file and row named
    rows = answer_rows(alpaca_rows, 30)
    del rows[17]["answer"]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, err = run(capsys, "--input", data, *common, "--output-prefix", tmp_path / "b", "--extra-columns", "answer")
    assert_failed_cleanly(code, err, tmp_path / "b", str(data), "row 17", "'answer'")
    # values of no common type
    rows = answer_rows(alpaca_rows, 30)
    rows[20]["answer"] = 7
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, err = run(capsys, "--input", data, *common, "--output-prefix", tmp_path / "c", "--extra-columns", "answer")
    assert_failed_cleanly(code, err, tmp_path / "c", "--extra-columns", "'answer'", "int", "str")
    # preference pairs do not keep extra columns
    code, err = run(capsys, "--input", shared_data / "dpo_en_250.parquet", *common, "--output-prefix", tmp_path / "d",
                    "--handler-name", "AlpacaStylePairwiseHandler", "--extra-columns", "history")
    assert_failed_cleanly(code, err, tmp_path / "d", "--extra-columns", "AlpacaStylePairwiseHandler")
