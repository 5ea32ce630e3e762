"""Critic and reward models: a megatron-core ``GPTModel`` whose LM output layer is replaced by a scalar head.

As in MindSpeed-LLM's reward model, the head is a ``[hidden] -> 1`` linear layer with a bias, run in fp32 on the
last pipeline stage after the final RMSNorm. It is replicated on every tensor-parallel rank: the hidden states
entering it are complete on each rank, so its weight and its gradient are the same everywhere (it is initialised
from its own seeded generator, independent of the RNG state of the rank). It is part of ``sharded_state_dict()``,
so ``dist_checkpointing`` saves and reshards it like any other weight (one copy, replicated over TP and DP).

A HF ``*ForSequenceClassification`` model with ``num_labels=1`` is the same network without the bias (its
``score`` layer); :func:`gather_last_token_scores` picks the value of the last real token, as HF does.
:func:`pool_scores` also offers ``response_mean``, the mean of the per-token values over the response tokens
(the head is linear, so this is the head applied to the mean-pooled response hidden state).
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule


class ValueHead(torch.nn.Module):
    """Scalar head ``values = hidden @ w.T + b`` computed in fp32.

    Args:
        hidden_size: input width.
        init_std: standard deviation of the normal initialisation of ``w`` (``b`` starts at 0).
        seed: seed of the private generator used for ``w`` (same value on every rank).

    The head is created on the CPU and drawn from a CPU generator, so its initial weights are the same on every
    device; :class:`GPTValueModel` moves it to the model's device.
    """

    def __init__(self, hidden_size: int, init_std: float = 0.02, seed: int = 1234):
        super().__init__()
        # drawn on the host from a CPU generator (the same weights on every device); the model moves it after
        self.linear = torch.nn.Linear(hidden_size, 1, bias=True, dtype=torch.float32, device="cpu")
        self.reset_parameters(init_std, seed)

    @torch.no_grad()
    def reset_parameters(self, init_std: float = 0.02, seed: int = 1234) -> None:
        """Re-draw the weight from ``N(0, init_std^2)`` with a generator seeded by ``seed``; zero the bias."""
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        weight = torch.randn(self.linear.weight.shape, generator=generator, dtype=torch.float32, device="cpu")
        self.linear.weight.copy_(weight * init_std)
        self.linear.bias.zero_()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Args: hidden_states ``[seq, batch, hidden]`` (any float dtype). Returns: ``[seq, batch]`` fp32."""
        weight = self.linear.weight.float()
        bias = self.linear.bias.float()
        return torch.nn.functional.linear(hidden_states.float(), weight, bias).squeeze(-1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Replicated ``ShardedTensor`` s (one copy over TP and DP ranks) for ``dist_checkpointing``."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {}, sharded_offsets, tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=metadata["dp_cp_group"])


class GPTValueModel(GPTModel):
    """``GPTModel`` whose last stage ends in a :class:`ValueHead` instead of the LM output layer.

    Takes ``GPTModel`` 's arguments (``share_embeddings_and_output_weights`` is forced off: there is no output
    layer to tie) plus ``head_init_std`` / ``head_seed`` for the head. The head lives where megatron-core puts
    the other weights (CPU with ``use_cpu_initialization``, else the current GPU).

    Raises:
        ValueError: ``config.sequence_parallel`` is set (the head needs the hidden states of every position).

    Forward: ``model(input_ids [b, s], position_ids [b, s], attention_mask [b, 1, s, s] | None)`` returns
    ``values [b, s]`` fp32 on the last pipeline stage and hidden states ``[s, b, h]`` elsewhere.
    """

    def __init__(self, *args, head_init_std: float = 0.02, head_seed: int = 1234, **kwargs):
        kwargs["share_embeddings_and_output_weights"] = False
        super().__init__(*args, **kwargs)
        if self.config.sequence_parallel:
            raise ValueError("a value model does not support sequence_parallel (its head needs every position)")
        if self.post_process:
            # The vocabulary projection GPTModel built is not used by a value model.
            del self.output_layer
            self.output_layer = None
            self.value_head = ValueHead(self.config.hidden_size, head_init_std, head_seed)
            if not self.config.use_cpu_initialization and torch.cuda.is_available():
                self.value_head.to(torch.cuda.current_device())

    def _postprocess(self, hidden_states, *args, **kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError("a value model takes no labels")
        if not self.post_process:
            return hidden_states
        # [s, b, h] -> [s, b] -> [b, s]
        return self.value_head(hidden_states).transpose(0, 1).contiguous()

    def shared_embedding_or_output_weight(self):
        """Only the input embedding exists (None off the first stage)."""
        return self.embedding.word_embeddings.weight if self.pre_process else None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Embedding, decoder and value head; no output layer (``LanguageModule`` 's tying logic does not apply)."""
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets, metadata)


def gather_last_token_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Value at the last real token of each row (left or right padding), as HF sequence classifiers score.

    Args:
        values: ``[batch, seq]`` per-token values.
        attention_mask: ``[batch, seq]``, 1 / True for real tokens.

    Returns:
        ``[batch]`` scores, dtype of ``values``.

    Raises:
        ValueError: the shapes differ or a row has no real token.
    """
    if values.shape != attention_mask.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and attention_mask {tuple(attention_mask.shape)} must both "
                         "be [batch, seq]")
    mask = attention_mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("attention_mask has a row without any real token")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).argmax(-1)
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


SCORE_POOLINGS = ("last", "response_mean")
"""How a reward model turns per-token head outputs into one score per sequence (checkpoint key ``score_pooling``).

* ``last``: the value at the last real token (HF ``*ForSequenceClassification``, TRL, OpenRLHF, verl).
* ``response_mean``: the mean of the values over the response tokens. It reads every response token instead of
  one position, which makes a reward model far more sample-efficient on small preference sets. HF sequence
  classifiers cannot express it: such a model exports to HF as ``*ForTokenClassification`` (per-token scores).
"""


def checkpoint_score_pooling(meta: dict) -> str:
    """The ``score_pooling`` recorded in a value checkpoint's metadata (``extra``), ``last`` when absent.

    Raises:
        ValueError: the recorded pooling is not one of :data:`SCORE_POOLINGS`.
    """
    pooling = (meta.get("extra") or {}).get("score_pooling") or "last"
    if pooling not in SCORE_POOLINGS:
        raise ValueError(f"unknown score_pooling {pooling!r} in checkpoint metadata "
                         f"(expected one of {', '.join(SCORE_POOLINGS)})")
    return pooling


def pool_scores(values: torch.Tensor, attention_mask: torch.Tensor, response_mask: Optional[torch.Tensor] = None,
                pooling: str = "last") -> torch.Tensor:
    """One score per sequence from per-token values.

    Args:
        values: ``[batch, seq]`` per-token head outputs.
        attention_mask: ``[batch, seq]``, 1 / True for real tokens.
        response_mask: ``[batch, seq]``, 1 / True for response tokens (aligned with ``values``; needed for
            ``response_mean``).
        pooling: one of :data:`SCORE_POOLINGS`.

    Returns:
        ``[batch]`` scores: ``last`` as :func:`gather_last_token_scores`; ``response_mean`` is
        ``sum(values * response_mask) / sum(response_mask)`` per row, in the dtype of ``values``.

    Raises:
        ValueError: unknown pooling, missing or misshapen ``response_mask``, a row without a response token.
    """
    if pooling == "last":
        return gather_last_token_scores(values, attention_mask)
    if pooling != "response_mean":
        raise ValueError(f"score pooling must be one of {', '.join(SCORE_POOLINGS)}, got {pooling!r}")
    if response_mask is None or response_mask.shape != values.shape:
        raise ValueError(f"response_mean pooling needs a response_mask shaped like values {tuple(values.shape)}")
    mask = (response_mask.bool() & attention_mask.bool()).to(values.dtype)
    count = mask.sum(-1)
    if not bool((count > 0).all()):
        raise ValueError("response_mask has a row without any response token")
    return (values * mask).sum(-1) / count
