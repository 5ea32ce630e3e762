"""Preference pairs as the reward-model trainer consumes them: length policy, skip counting and batching.

The pairs come from ``preprocess_data.py --handler-name AlpacaStylePairwiseHandler`` (read with
:class:`posttrain.data.prompt_dataset.PairwiseDataset`): each is ``prompt_ids + chosen_ids`` and
``prompt_ids + rejected_ids`` with a shared prompt length and an optional margin.

Length policy (``--truncation``), for a pair whose longer sequence has more than ``--seq-length`` tokens:

* ``skip`` (default): the pair is not used and is counted as ``too_long``.
* ``truncate``: the prompt keeps its **last** tokens (the question and the assistant prefix; what is cut is the
  start of a long history or system prompt), but never fewer than ``--max-prompt-length`` unless it is shorter
  than that; then both responses are cut to the tokens that remain, **keeping their final token** (the
  template's end-of-turn token): a response of ``n`` tokens cut to ``k`` is its first ``k - 1`` tokens followed by
  its last one, as OpenRLHF's ``RewardDataset`` forces EOS on truncated sequences. The score is therefore always
  read at an end-of-turn token, the position it is read at for complete responses and for PPO rollouts that
  stopped at EOS. A pair whose truncated responses become identical is counted as
  ``identical_after_truncation`` and skipped.

Pairs are also skipped (and counted) when a response is empty (``empty_response``) or when both responses are the
same tokens (``identical_responses``); the preprocessing handler already drops most of these, this catches datasets
written by other tools.

Batches (:func:`collate_pairs`): ``b`` pairs become ``2b`` rows ``[chosen_1..chosen_b; rejected_1..rejected_b]``,
right-padded to a common length, so chosen and rejected are scored in the same forward pass.
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from posttrain.data.prompt_dataset import PairwiseDataset
from posttrain.errors import InputError

TRUNCATION_MODES = ("skip", "truncate")
SKIP_REASONS = ("too_long", "empty_response", "identical_responses", "identical_after_truncation")


class RewardDataError(InputError, ValueError):
    """A pairwise dataset that cannot be used (message names the path and what is wrong)."""


@dataclass(frozen=True)
class RewardPair:
    """One usable pair after the length policy.

    Attributes:
        chosen_ids: int64 ``[prompt_len + chosen_len]`` (at most ``seq_length`` tokens).
        rejected_ids: int64 ``[prompt_len + rejected_len]``.
        prompt_length: number of leading prompt tokens (shared by both).
        margin: the pair's margin (0.0 without a margin column).
    """

    chosen_ids: torch.Tensor
    rejected_ids: torch.Tensor
    prompt_length: int
    margin: float


class RewardPairs:
    """The usable pairs of one preprocessed pairwise dataset.

    Args:
        prefix: the ``--output-prefix`` given to ``preprocess_data.py``.
        seq_length: the longest sequence fed to the model, in tokens.
        truncation: ``skip`` or ``truncate`` (see the module docstring).
        max_prompt_length: with ``truncate``, the prompt tokens always kept (None: ``seq_length // 2``).

    Attributes:
        source: the underlying :class:`PairwiseDataset`.
        indices: int64 ``[num_usable]``, source index of each usable pair.
        skipped: reason -> number of pairs skipped (every reason in :data:`SKIP_REASONS`).
        truncated: number of usable pairs that were truncated.
        pad_token_id: padding id from the dataset metadata (EOS when the tokenizer has none; 0 without metadata).

    Raises:
        RewardDataError: the prefix names no pairwise dataset (or a prompt-only one), an option is out of range,
            or no pair is usable.
    """

    def __init__(self, prefix: str | os.PathLike, seq_length: int, truncation: str = "skip",
                 max_prompt_length: Optional[int] = None) -> None:
        if truncation not in TRUNCATION_MODES:
            raise RewardDataError(f"--truncation must be one of {', '.join(TRUNCATION_MODES)}, got {truncation!r}")
        if seq_length < 2:
            raise RewardDataError(f"--seq-length must be >= 2, got {seq_length}")
        self.seq_length = int(seq_length)
        self.truncation = truncation
        self.max_prompt_length = int(seq_length // 2 if max_prompt_length is None else max_prompt_length)
        if not 1 <= self.max_prompt_length < self.seq_length:
            raise RewardDataError(f"--max-prompt-length must be in [1, --seq-length {seq_length}), got "
                                  f"{self.max_prompt_length}")
        self.source = _open_pairwise(os.fspath(prefix))
        self.pad_token_id = self.source.pad_token_id if self.source.pad_token_id is not None else 0
        self._plan = {}
        self.skipped = collections.Counter({reason: 0 for reason in SKIP_REASONS})
        self.truncated = 0
        keep = []
        chosen_lengths = self.source.chosen.sequence_lengths.astype(np.int64)
        rejected_lengths = self.source.rejected.sequence_lengths.astype(np.int64)
        for i, (prompt, n_chosen, n_rejected) in enumerate(zip(self.source.prompt_lengths, chosen_lengths,
                                                               rejected_lengths)):
            reason = self._check(i, int(prompt), int(n_chosen), int(n_rejected))
            if reason is None:
                keep.append(i)
            else:
                self.skipped[reason] += 1
        self.indices = np.asarray(keep, dtype=np.int64)
        if len(self.indices) == 0:
            raise RewardDataError(f"{prefix}: no usable pair out of {len(self.source)} "
                                  f"(skipped: {self.skipped_text()})")

    def _check(self, i: int, prompt: int, n_chosen: int, n_rejected: int) -> Optional[str]:
        """Skip reason of source pair ``i`` or None; records the truncation plan of kept pairs."""
        chosen, rejected = n_chosen - prompt, n_rejected - prompt
        if chosen <= 0 or rejected <= 0:
            return "empty_response"
        if chosen == rejected and self._same_tokens(i, prompt, chosen, rejected):
            return "identical_responses"
        longest = prompt + max(chosen, rejected)
        if longest <= self.seq_length:
            return None
        if self.truncation == "skip":
            return "too_long"
        prompt_keep = min(prompt, max(self.max_prompt_length, self.seq_length - max(chosen, rejected)))
        budget = self.seq_length - prompt_keep
        keep_chosen, keep_rejected = min(chosen, budget), min(rejected, budget)
        if keep_chosen == keep_rejected and self._same_tokens(i, prompt, keep_chosen - 1, keep_rejected - 1) \
                and self.source.chosen[i][prompt + chosen - 1] == self.source.rejected[i][prompt + rejected - 1]:
            return "identical_after_truncation"
        self._plan[i] = (prompt - prompt_keep, keep_chosen, keep_rejected)
        self.truncated += 1
        return None

    def _same_tokens(self, i: int, prompt: int, chosen: int, rejected: int) -> bool:
        a = self.source.chosen[i][prompt:prompt + chosen]
        b = self.source.rejected[i][prompt:prompt + rejected]
        return a.shape == b.shape and bool(np.array_equal(a, b))

    def __len__(self) -> int:
        """Number of usable pairs."""
        return len(self.indices)

    def __getitem__(self, index: int) -> RewardPair:
        """Usable pair ``index`` (``0 <= index < len``), truncated when its plan says so."""
        source_index = int(self.indices[index])
        pair = self.source[source_index]
        plan = self._plan.get(source_index)
        if plan is None:
            return RewardPair(pair.chosen_ids, pair.rejected_ids, pair.prompt_length, pair.margin)
        cut, keep_chosen, keep_rejected = plan
        prompt = pair.prompt_length
        return RewardPair(_cut(pair.chosen_ids, cut, prompt + keep_chosen),
                          _cut(pair.rejected_ids, cut, prompt + keep_rejected), prompt - cut, pair.margin)

    def skipped_text(self) -> str:
        """``too_long=3, empty_response=0, ...``."""
        return ", ".join(f"{reason}={self.skipped[reason]}" for reason in SKIP_REASONS)

    def summary(self) -> str:
        """One line: usable, skipped (by reason) and truncated pairs."""
        total = len(self.source)
        return (f"{len(self)} of {total} pairs used (skipped: {self.skipped_text()}; truncated to "
                f"{self.seq_length} tokens: {self.truncated})")


def _cut(ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``ids[start:end]`` with its last position replaced by ``ids[-1]`` (the response's final token) when ``end``
    cuts the sequence short; ``ids`` is ``[prompt_len + response_len]``."""
    if end >= ids.shape[0]:
        return ids[start:]
    return torch.cat([ids[start:end - 1], ids[-1:]])


def _open_pairwise(prefix: str) -> PairwiseDataset:
    try:
        return PairwiseDataset(prefix)
    except FileNotFoundError as exc:
        hint = ""
        if os.path.exists(f"{prefix}_packed_input_ids_document.idx"):
            hint = " (this is a prompt dataset; preprocess with --handler-name AlpacaStylePairwiseHandler)"
        raise RewardDataError(f"{prefix}: not a pairwise dataset: {exc}{hint}") from None
    except ValueError as exc:
        raise RewardDataError(f"{prefix}: {exc}") from None


def collate_pairs(pairs: Sequence[RewardPair], pad_token_id: int, length: Optional[int] = None,
                  weights: Optional[Sequence[float]] = None) -> dict[str, torch.Tensor]:
    """Batch ``b`` pairs as ``2b`` right-padded rows, chosen first.

    Args:
        pairs: the pairs of one micro-batch.
        pad_token_id: id written at padded positions (they are masked, the value only has to be a valid id).
        length: pad every row to this many tokens (None: to the longest row).
        weights: per pair, 1 for real pairs and 0 for filler rows (None: all ones).

    Returns:
        ``input_ids`` int64 ``[2b, s]`` (rows ``0..b-1`` chosen, ``b..2b-1`` rejected), ``attention_mask`` int64
        ``[2b, s]`` (1 on real tokens), ``response_mask`` int64 ``[2b, s]`` (1 on response tokens), ``margin``
        float32 ``[b]``, ``weights`` float32 ``[b]``; all on the CPU (the trainer moves each micro-batch once).

    Raises:
        ValueError: no pairs, or a row longer than ``length``.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    rows = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    longest = max(int(r.shape[0]) for r in rows)
    width = longest if length is None else int(length)
    if longest > width:
        raise ValueError(f"a sequence has {longest} tokens, more than the padded length {width}")
    input_ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long, device="cpu")
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    response_mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    prompt_lengths = [p.prompt_length for p in pairs] * 2
    for k, row in enumerate(rows):
        input_ids[k, :row.shape[0]] = row.to(torch.long)
        attention_mask[k, :row.shape[0]] = 1
        response_mask[k, prompt_lengths[k]:row.shape[0]] = 1
    margin = torch.tensor([float(p.margin) for p in pairs], dtype=torch.float32, device="cpu")
    w = (torch.ones(len(pairs), device="cpu") if weights is None
         else torch.as_tensor(weights, dtype=torch.float32, device="cpu"))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "margin": margin, "weights": w}
