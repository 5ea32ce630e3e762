"""Rollout: KV-cached generation with a megatron-core GPT model under TP and PP.

Prompts are left-padded (position ids 0 over the pads, then 0, 1, ...; pads are masked as keys), responses are
right-padded with ``pad_token_id``. The prompt is encoded once (prefill) into a key/value cache; every later step
feeds one token per sequence. On a CPU with one tensor- and pipeline-parallel rank the forwards run through
:class:`~posttrain.trl_ppo.lean_decoder.LeanDecoder` (the model's own weights, plain torch ops); otherwise through
megatron-core's ``StaticInferenceContext``: the model is called directly without pipeline parallelism, and through
megatron's forward-only pipeline schedule with it, so stages exchange activations as in training; the last stage
samples from the logits gathered over tensor-parallel ranks and broadcasts the tokens to the other stages.

Sampling (``do_sample``) draws from ``softmax(logits / temperature)`` restricted by ``top_k`` / ``top_p``, with a
``torch.Generator`` seeded per iteration and data-parallel rank, so tensor-parallel ranks draw identical tokens
and a resumed run draws exactly what an uninterrupted run would. Greedy decoding takes the argmax.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from posttrain import parallel
from posttrain.models.provider import (
    build_attention_mask,
    position_ids_from_attention_mask,
)
from posttrain.training.engine import forward_backward
from posttrain.trl_ppo.lean_decoder import LeanDecoder


@dataclass
class SamplingParams:
    """How responses are drawn.

    Attributes:
        max_new_tokens: response budget in tokens.
        do_sample: sample (True) or greedy argmax (False).
        temperature: logits are divided by it before sampling (and in the training forward, as TRL does).
        top_k: keep the k most likely tokens (0: all).
        top_p: nucleus sampling, keep the smallest set with cumulative probability >= top_p (1.0: all).
        stop_token_ids: a sequence ends after emitting any of these (EOS and ``--stop-token-ids``).
        pad_token_id: fills responses after their end.
        ignore_eos: keep generating after a stop token, up to ``max_new_tokens`` (vLLM's ``ignore_eos``; for
            benchmarks on equal work, the stop token then counts as an ordinary token and ``has_eos`` is False).
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: Sequence[int] = field(default_factory=list)
    pad_token_id: int = 0
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be >= 1")
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0")
        if self.top_k < 0:
            raise ValueError("--top-k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("--top-p must be in (0, 1]")
        if not self.stop_token_ids:
            raise ValueError("no stop token: the tokenizer has no EOS and --stop-token-ids is empty")


@dataclass
class GenerationOutput:
    """Responses of one batch of prompts.

    Attributes:
        responses: ``[batch, response_len]`` int64, right-padded with ``pad_token_id``.
        response_mask: ``[batch, response_len]`` 1 for generated tokens up to and including the stop token.
        sampler_log_probs: ``[batch, response_len]`` fp32 log-probabilities (nats) of the sampled tokens under
            ``softmax(logits / temperature)`` as the sampler computed them from the KV-cached forward (0 at pads).
        has_eos: ``[batch]`` bool, the response ended with a stop token (not by the budget).
    """

    responses: torch.Tensor
    response_mask: torch.Tensor
    sampler_log_probs: torch.Tensor
    has_eos: torch.Tensor


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering: removed entries become ``-inf``.

    Args:
        logits: ``[batch, vocab]`` (already divided by the temperature).

    Returns:
        ``[batch, vocab]`` filtered logits (a new tensor when anything is filtered).
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]):
    """Pick the next token of each sequence.

    Args:
        logits: ``[batch, vocab]`` fp32 full-vocabulary logits (real vocabulary only).
        params: sampling parameters.
        generator: RNG for sampling (unused when greedy).

    Returns:
        ``(tokens [batch] int64, log_probs [batch] fp32)`` where ``log_probs`` is the token's log-probability
        under ``softmax(logits / temperature)`` (unfiltered, the distribution the trainer scores).
    """
    scaled = logits.float() / params.temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    if params.do_sample:
        filtered = filter_logits(scaled, params.top_k, params.top_p)
        # Gumbel-max: argmax(logits + Gumbel noise) is a sample of softmax(logits), one fused pass over the vocab
        uniform = torch.rand(filtered.shape, generator=generator, dtype=torch.float32,
                             device=filtered.device).clamp_(1e-20, 1.0)
        tokens = (filtered - torch.log(-torch.log(uniform))).argmax(-1)
    else:
        tokens = scaled.argmax(-1)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)


class _MegatronForward:
    """Inference forwards through megatron-core's model with its static KV cache: called directly without
    pipeline parallelism, through the forward-only pipeline schedule with it (stages exchange activations)."""

    def __init__(self, model, batch: int, max_len: int):
        self.model = model
        self.context = StaticInferenceContext(batch, max_len)
        self.pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1

    def _run(self, input_ids, position_ids, attention_mask) -> Optional[torch.Tensor]:
        """``[batch, V_padded]`` fp32 logits of the last position on the last stage, None elsewhere."""
        if not self.pipelined:
            out = self.model(input_ids, position_ids, attention_mask, inference_context=self.context,
                             runtime_gather_output=True)
            return out[:, -1, :].float()
        batch, seq = input_ids.shape

        def step(_, wrapped):
            out = wrapped(input_ids, position_ids, attention_mask, inference_context=self.context,
                          runtime_gather_output=True)
            return out, lambda output: (torch.zeros((), device=output.device),
                                        {"logits": output[:, -1, :].float()})

        results = forward_backward(self.model, step, [None], seq_length=seq, micro_batch_size=batch,
                                   forward_only=True)
        return results[0]["logits"] if results else None

    def prefill(self, input_ids, position_ids, attention_mask):
        logits = self._run(input_ids, position_ids, attention_mask)
        self.context.increment_sequence_len_offset(input_ids.shape[1])
        return logits

    def step(self, tokens, position_ids, key_mask):
        self.context.enable_decode_mode()
        logits = self._run(tokens[:, None], position_ids[:, None], key_mask)
        self.context.increment_sequence_len_offset(1)
        return logits


class _LeanForward:
    """The same forwards through :class:`~posttrain.trl_ppo.lean_decoder.LeanDecoder` (CPU, TP = PP = 1)."""

    def __init__(self, model, batch: int, max_len: int):
        self.decoder = LeanDecoder(model, batch, max_len)

    def prefill(self, input_ids, position_ids, attention_mask):
        return self.decoder.prefill(input_ids, attention_mask)

    def step(self, tokens, position_ids, key_mask):
        return self.decoder.step(tokens, key_mask)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams,
             vocab_size: int, generator: Optional[torch.Generator] = None) -> GenerationOutput:
    """Generate responses for a left-padded batch of prompts with a KV cache.

    The forwards run through :class:`~posttrain.trl_ppo.lean_decoder.LeanDecoder` where it applies (CPU, one
    tensor- and pipeline-parallel rank, dense local-spec model), else through megatron-core's inference path
    (the model called directly with PP = 1, the pipeline schedule with PP > 1).

    Args:
        model: the actor (megatron GPT model, any wrapper), in eval mode.
        prompt_ids: ``[batch, prompt_len]`` int64, left-padded.
        prompt_mask: ``[batch, prompt_len]`` 1 for real prompt tokens.
        params: sampling parameters.
        vocab_size: real vocabulary size (logits of padded entries are never sampled).
        generator: sampling RNG on the model's device (same seed on every tensor-parallel rank).

    Returns:
        :class:`GenerationOutput` with ``response_len = number of decoding steps`` (<= ``max_new_tokens``; the
        loop stops once every sequence has ended).
    """
    batch, prompt_len = prompt_ids.shape
    max_len = prompt_len + params.max_new_tokens
    forward = (_LeanForward if LeanDecoder.supports(model) else _MegatronForward)(model, batch, max_len)
    prompt_mask = prompt_mask.long()
    positions = position_ids_from_attention_mask(prompt_mask)
    next_position = positions[:, -1] + 1
    device = prompt_ids.device
    stop = torch.tensor(sorted(set(int(t) for t in params.stop_token_ids)), dtype=torch.long, device=device)

    logits = forward.prefill(prompt_ids, positions, build_attention_mask(prompt_mask))

    tokens_out, logp_out, mask_out = [], [], []
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    has_eos = torch.zeros(batch, dtype=torch.bool, device=device)
    key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # True = a key that may be attended
    key_mask[:, :prompt_len] = prompt_mask.bool()
    for step in range(params.max_new_tokens):
        if logits is not None:
            tokens, logps = sample_tokens(logits[:, :vocab_size], params, generator)
            packed = torch.stack([tokens.float(), logps], dim=0)
        else:
            packed = None
        packed = parallel.broadcast_from_last_stage(packed, (2, batch), torch.float32)
        tokens, logps = packed[0].long(), packed[1]
        tokens = torch.where(done, torch.full_like(tokens, params.pad_token_id), tokens)
        alive = ~done
        tokens_out.append(tokens)
        logp_out.append(torch.where(alive, logps, torch.zeros_like(logps)))
        mask_out.append(alive)
        ended = alive & torch.isin(tokens, stop) if not params.ignore_eos else torch.zeros_like(alive)
        has_eos |= ended
        done |= ended
        if step == params.max_new_tokens - 1 or bool(done.all()):
            break
        key_mask[:, prompt_len + step] = alive
        decode_mask = ~key_mask[:, None, None, :prompt_len + step + 1]  # [batch, 1, 1, kv_len], True = masked
        logits = forward.step(tokens, next_position, decode_mask)
        next_position = next_position + 1

    return GenerationOutput(responses=torch.stack(tokens_out, 1), response_mask=torch.stack(mask_out, 1).long(),
                            sampler_log_probs=torch.stack(logp_out, 1), has_eos=has_eos)
