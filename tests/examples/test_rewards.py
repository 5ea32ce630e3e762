"""examples/rewards/reference_overlap.py: the documented rule-based reward that reads a reference column."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from posttrain.trl_ppo.models import RewardFunction
from tests.torchrun_utils import REPO

SPEC = f"{REPO / 'examples' / 'rewards' / 'reference_overlap.py'}:unigram_f1"


def test_unigram_f1_on_real_references(shared_data):
    rows = pq.read_table(shared_data / "alpaca_en_800.parquet").slice(0, 6).to_pylist()
    fn = RewardFunction(SPEC, columns=["instruction", "input", "output", "text"])
    assert fn.columns == ["output"]  # the one column its signature names
    references = [r["output"] for r in rows]
    prompts = [r["instruction"] for r in rows]
    # a response equal to its reference scores 1; an empty one, or one without a reference, 0
    assert fn(prompts, references, {"output": references}).tolist() == [1.0] * 6
    assert fn(prompts[:2], ["", references[1]], {"output": [references[0], None]}).tolist() == [0.0, 0.0]
    # 4 response words, 3 reference words, 2 shared: P = 1/2, R = 2/3, F1 = 4/7 (case and punctuation ignored)
    score = fn(["q"], ["The cat ran away."], {"output": ["the CAT sat"]})
    assert score.tolist() == pytest.approx([4 / 7])
