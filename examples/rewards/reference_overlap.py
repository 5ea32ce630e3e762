"""A rule-based reward for ``--reward-function`` that reads each prompt's reference answer.

The reference is an input column kept beside the prompts at preprocessing; for the Alpaca data it is ``output``::

    python preprocess_data.py --input ../shared/data/alpaca_en_800.parquet ... --extra-columns output
    torchrun ... pretrain_gpt.py --stage trl_ppo ... \\
        --reward-function examples/rewards/reference_overlap.py:unigram_f1

The trainer calls ``unigram_f1(prompts, responses, output=[...])`` with one reference per response (the reference
of the row the response's prompt came from); see docs/trl_ppo.md, "Rewards that see the answer".
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Optional

_WORD = re.compile(r"\w+")


def _words(text: Optional[str]) -> Counter:
    return Counter(_WORD.findall((text or "").lower()))


def unigram_f1(prompts: list[str], responses: list[str], output: list[Optional[str]]) -> list[float]:
    """Word-overlap F1 of each response with its reference (SQuAD's token F1 on lower-cased ``\\w+`` words).

    Args:
        prompts: the decoded prompts (unused: the reference already belongs to the prompt).
        responses: the decoded responses, special tokens removed.
        output: the reference answer of each response's prompt (None or empty: no reference).

    Returns:
        One score in ``[0, 1]`` per response: ``2·P·R / (P + R)`` with ``P`` the share of the response's words found
        in the reference and ``R`` the share of the reference's words found in the response (counted with
        multiplicity); 0 when they share no word or either is empty.
    """
    scores = []
    for response, reference in zip(responses, output):
        said, wanted = _words(response), _words(reference)
        common = sum((said & wanted).values())
        if common == 0:
            scores.append(0.0)
            continue
        precision, recall = common / sum(said.values()), common / sum(wanted.values())
        scores.append(2 * precision * recall / (precision + recall))
    return scores
