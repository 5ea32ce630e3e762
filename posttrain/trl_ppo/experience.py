"""What one PPO iteration carries between its phases: the rollout batch and the micro-batches of the updates.

Shapes: sequences are ``[batch, prompt_len + response_len]`` with prompts left-padded and responses right-padded;
RL tensors are ``[batch, response_len]``. Token ``t`` of the response is predicted by the logits at position
``prompt_len + t - 1``, and the critic's value for that token is read at the same position (MindSpeed-LLM:
``logits[:, ctx-1:-1]``, ``values[:, ctx-1:-1]``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from posttrain.models.provider import (
    build_attention_mask,
    position_ids_from_attention_mask,
)


def pad_to_width(t: torch.Tensor, width: int, value, side: str) -> torch.Tensor:
    """Pad ``[rows, n]`` to ``[rows, width]`` with ``value`` on the ``left`` or ``right``."""
    extra = width - t.shape[1]
    if extra <= 0:
        return t
    return F.pad(t, (extra, 0) if side == "left" else (0, extra), value=value)


@dataclass
class RolloutBatch:
    """One rank's rollout and its experience.

    Attributes:
        prompt_ids: ``[batch, prompt_len]`` int64, left-padded. prompt_mask: ``[batch, prompt_len]`` 0/1.
        responses: ``[batch, response_len]`` int64, right-padded. response_mask: ``[batch, response_len]`` 0/1
            (1 up to and including the stop token).
        has_eos: ``[batch]`` bool. group_index: ``[batch]`` int64, the prompt each response answers.
        sampler_log_probs: ``[batch, response_len]`` the sampler's log-probs (nats).
        old_log_probs, ref_log_probs, values: ``[batch, response_len]`` fp32 (values: critic at rollout).
        scores: ``[batch]`` fp32 sequence scores. rewards, advantages, returns: ``[batch, response_len]`` fp32.
        loss_mask: ``[batch, response_len]`` the tokens the losses see (the response mask unless overlong
            filtering removed truncated responses).
        token_weights: ``[batch, response_len]`` importance weights of the rollout correction (None: off).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    group_index: torch.Tensor
    sampler_log_probs: torch.Tensor
    old_log_probs: Optional[torch.Tensor] = None
    ref_log_probs: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None
    rewards: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None
    loss_mask: Optional[torch.Tensor] = None
    token_weights: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def response_len(self) -> int:
        return self.responses.shape[1]

    @property
    def device(self) -> torch.device:
        return self.prompt_ids.device

    def input_ids(self) -> torch.Tensor:
        """``[batch, prompt_len + response_len]``."""
        return torch.cat([self.prompt_ids, self.responses], dim=1)

    def attention_mask(self) -> torch.Tensor:
        """``[batch, prompt_len + response_len]`` 1 on real tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def model_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, position_ids, attention_mask)`` as the megatron models take them (see
        :mod:`posttrain.models.provider`)."""
        mask = self.attention_mask()
        return self.input_ids(), position_ids_from_attention_mask(mask), build_attention_mask(mask)

    def _map(self, fn) -> "RolloutBatch":
        return RolloutBatch(**{f.name: (fn(getattr(self, f.name)) if getattr(self, f.name) is not None else None)
                               for f in fields(self)})

    def select(self, rows) -> "RolloutBatch":
        """The rows ``rows`` (a slice or an index tensor) of every tensor."""
        return self._map(lambda t: t[rows])

    def to(self, device: torch.device) -> "RolloutBatch":
        """Every tensor on ``device`` (one transfer per tensor; no-op when already there)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def split(self, size: int) -> list["RolloutBatch"]:
        """Consecutive pieces of ``size`` rows."""
        return [self.select(slice(i, i + size)) for i in range(0, self.batch_size, size)]

    @staticmethod
    def concat(pieces: Sequence["RolloutBatch"], pad_token_id: int) -> "RolloutBatch":
        """One batch from pieces generated separately (prompts re-padded on the left, responses on the right).

        Only the rollout fields (prompts, responses, masks, ``has_eos``, ``group_index``, sampler log-probs) and
        the scores (when every piece has them) are joined; other experience fields must still be empty.
        """
        prompt_len = max(p.prompt_len for p in pieces)
        response_len = max(p.response_len for p in pieces)
        return RolloutBatch(
            prompt_ids=torch.cat([pad_to_width(p.prompt_ids, prompt_len, pad_token_id, "left") for p in pieces]),
            prompt_mask=torch.cat([pad_to_width(p.prompt_mask, prompt_len, 0, "left") for p in pieces]),
            responses=torch.cat([pad_to_width(p.responses, response_len, pad_token_id, "right") for p in pieces]),
            response_mask=torch.cat([pad_to_width(p.response_mask, response_len, 0, "right") for p in pieces]),
            sampler_log_probs=torch.cat([pad_to_width(p.sampler_log_probs, response_len, 0.0, "right")
                                         for p in pieces]),
            has_eos=torch.cat([p.has_eos for p in pieces]),
            group_index=torch.cat([p.group_index for p in pieces]),
            scores=(torch.cat([p.scores for p in pieces]) if all(p.scores is not None for p in pieces) else None),
        )


@dataclass(frozen=True)
class GlobalCounts:
    """Valid tokens and non-empty sequences of a whole mini-batch, summed over its micro-batches and DP ranks
    (``core_algos.agg_loss`` divides by them, which makes the loss independent of DP size and micro-batching).

    Attributes:
        tokens, seqs: 0-dim float64 tensors. ptx_tokens: valid tokens of the mini-batch's ptx micro-batches.
    """

    tokens: torch.Tensor
    seqs: torch.Tensor
    ptx_tokens: Optional[torch.Tensor] = None


@dataclass
class PtxMicroBatch:
    """A micro-batch of pretraining documents for the ptx loss (right-padded, ``[micro_batch, seq]``).

    Attributes:
        input_ids, position_ids: ``[b, s]`` int64. attention_mask: ``[b, 1, s, s]`` bool, True = masked.
        labels: ``[b, s - 1]`` the next tokens. loss_mask: ``[b, s - 1]`` 1 where both token and label are real.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor

    @staticmethod
    def from_documents(docs: Sequence[torch.Tensor], seq_len: int, pad_token_id: int,
                       device: torch.device) -> "PtxMicroBatch":
        """Right-pad ``docs`` (each cut to ``seq_len`` tokens) into one micro-batch on ``device``."""
        # built on the host row by row, then moved in one transfer per tensor
        ids = torch.full((len(docs), seq_len), pad_token_id, dtype=torch.long, device="cpu")
        mask = torch.zeros((len(docs), seq_len), dtype=torch.long, device="cpu")
        for row, doc in enumerate(docs):
            doc = doc[:seq_len]
            ids[row, :doc.numel()] = doc
            mask[row, :doc.numel()] = 1
        ids, mask = ids.to(device), mask.to(device)
        return PtxMicroBatch(input_ids=ids, position_ids=position_ids_from_attention_mask(mask),
                             attention_mask=build_attention_mask(mask), labels=ids[:, 1:],
                             loss_mask=mask[:, 1:] * mask[:, :-1])

    def model_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids, self.position_ids, self.attention_mask
