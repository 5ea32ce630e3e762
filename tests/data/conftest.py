"""Fixtures of the preprocessing tests: the example model's tokenizer and the real Alpaca rows."""
import pyarrow.parquet as pq
import pytest


@pytest.fixture(scope="module")
def tok(example_model_dir):
    """The example model's Hugging Face tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(example_model_dir))


@pytest.fixture(scope="module")
def alpaca_rows(shared_data):
    """The rows of ../shared/data/alpaca_en_800.parquet as dicts."""
    return pq.read_table(shared_data / "alpaca_en_800.parquet").to_pylist()
