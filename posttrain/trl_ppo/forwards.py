"""Forward passes of the PPO trainer's models over a rollout (a mixin of
:class:`posttrain.trl_ppo.trainer.PPOTrainer`, which owns ``args``, ``vocab_size`` and the model slots):
causal-LM forwards whose output layer sees only response positions, log-probs of the sampled tokens, values,
scores, and :meth:`PPOForwards._forward_only`, which runs any slot through megatron's schedule in micro-batches
without gradients.
"""
from __future__ import annotations

from typing import Callable

import torch

from posttrain import parallel
from posttrain.models.provider import unwrap_model
from posttrain.models.value_model import pool_scores
from posttrain.training import ModelSlot, forward_backward
from posttrain.trl_ppo.experience import RolloutBatch
from posttrain.trl_ppo.lean_decoder import LeanForward


class PPOForwards:
    """Forward helpers of :class:`~posttrain.trl_ppo.trainer.PPOTrainer`."""

    # ------------------------------------------------------------------ forward helpers
    @staticmethod
    def _lm_forward(model: torch.nn.Module, mb: RolloutBatch) -> torch.Tensor:
        """A causal-LM forward whose output layer sees only the positions that predict response tokens
        (``prompt_len - 1 .. prompt_len + response_len - 2``): logits ``[b, response_len, V/TP]`` on the last
        pipeline stage. Prompt positions need no logits, so the output layer and the logits' memory shrink to the
        response part."""
        inner = unwrap_model(model)
        if not inner.post_process:
            return model(*mb.model_inputs())
        start, end = mb.prompt_len - 1, mb.prompt_len + mb.response_len - 1
        handle = inner.decoder.register_forward_hook(lambda module, args, hidden: hidden[start:end])  # [s, b, h]
        try:
            return model(*mb.model_inputs())
        finally:
            handle.remove()

    @staticmethod
    def _lm_hidden_forward(model: torch.nn.Module, mb: RolloutBatch) -> torch.Tensor:
        """:meth:`_lm_forward` without the output layer: the final hidden states ``[response_len, b, h]`` (after
        the final norm) of the positions that predict response tokens, for
        :func:`~posttrain.models.output_head.chosen_token_log_probs`. One pipeline stage only (the model is both
        first and last stage); megatron's ``GPTModel`` returns the decoder's output when it does no
        post-processing, which is switched off for this call."""
        inner = unwrap_model(model)
        start, end = mb.prompt_len - 1, mb.prompt_len + mb.response_len - 1
        handle = inner.decoder.register_forward_hook(lambda module, args, hidden: hidden[start:end])  # [s, b, h]
        post_process, inner.post_process = inner.post_process, False
        try:
            return model(*mb.model_inputs())
        finally:
            inner.post_process = post_process
            handle.remove()

    def _fused_output_head(self) -> bool:
        """Whether the actor's loss computes its log-probs from the final hidden states chunk by chunk
        (:func:`~posttrain.models.output_head.chosen_token_log_probs`, no ``[b, response_len, V]`` logits) instead
        of from megatron's output layer: on CPU (no CUDA; the GPU path stays megatron's), with one tensor- and one
        pipeline-parallel rank (one process holds the whole output layer), and without an entropy bonus (whose
        gradient needs the whole softmax)."""
        return (not torch.cuda.is_available() and parallel.tp_world_size() == 1 and parallel.pp_world_size() == 1
                and not self.args.entropy_coef)

    def _output_weight(self) -> torch.Tensor:
        """The actor's output-layer weight over the real vocabulary, ``[vocab_size, h]`` (a view: gradients reach
        the parameter, or the embedding it is tied to)."""
        inner = unwrap_model(self.actor.model)
        weight = (inner.shared_embedding_or_output_weight() if inner.share_embeddings_and_output_weights
                  else inner.output_layer.weight)
        return weight[:self.vocab_size]

    def _response_logits(self, output: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[b, response_len, V/TP]`` divided by the temperature, padded vocabulary entries masked.

        The vocab-parallel kernels then work in place on this tensor: it is the forward's own output (or a copy),
        which nothing else reads, and whose autograd node keeps no reference to it."""
        logits = output.float()
        if self.args.temperature != 1.0:
            logits = logits.div_(self.args.temperature)
        return parallel.mask_padded_vocab(logits, self.vocab_size)

    def _log_probs(self, output: torch.Tensor, mb: RolloutBatch) -> torch.Tensor:
        return parallel.vocab_parallel_log_probs(self._response_logits(output), mb.responses)

    @staticmethod
    def _values(output: torch.Tensor, mb: RolloutBatch) -> torch.Tensor:
        """``[b, response_len]`` critic values at the positions that predict the response tokens."""
        p, r = mb.prompt_len, mb.response_len
        return output[:, p - 1:p + r - 1].float()

    def _scores(self, output: torch.Tensor, mb: RolloutBatch) -> torch.Tensor:
        """``[b, 1]`` reward-model scores with the reward checkpoint's pooling."""
        response_mask = torch.cat([torch.zeros_like(mb.prompt_mask), mb.response_mask], dim=1)
        return pool_scores(output.float(), mb.attention_mask(), response_mask, self.models.score_pooling)[:, None]

    def _forward_only(self, slot: ModelSlot, batch: RolloutBatch,
                      compute: Callable[[torch.Tensor, RolloutBatch], torch.Tensor], width: int) -> torch.Tensor:
        """Run ``slot`` over ``batch`` in micro-batches; ``compute(output, mb) -> [mb, width]`` on the last stage
        (a causal LM's output holds the response positions only, see :meth:`_lm_forward`).

        On CPU at TP = PP = 1 (:meth:`LeanForward.supports`) the micro-batches go through
        :class:`~posttrain.trl_ppo.lean_decoder.LeanForward` instead of megatron's schedule: the same function of
        the same weights, without megatron-core's per-module overhead.

        Returns ``[batch, width]`` fp32 on every pipeline stage.
        """
        if LeanForward.supports(slot.model):
            return self._lean_forward_only(slot, batch, compute)
        forward = self._lm_forward if slot.info.kind == "causal_lm" else _forward

        def step(mb, model):
            output = forward(model, mb)
            return output, lambda out: (torch.zeros((), device=out.device),
                                        {"out": compute(out, mb).detach().float()})

        slot.runnable.eval()
        with torch.no_grad():
            results = forward_backward(slot.runnable, step, batch.split(self.args.micro_batch_size),
                                       seq_length=batch.prompt_len + batch.response_len,
                                       micro_batch_size=self.args.micro_batch_size, forward_only=True)
        local = torch.cat([r["out"] for r in results], 0) if results else None
        return parallel.broadcast_from_last_stage(local, (batch.batch_size, width), torch.float32)

    def _lean_forward_only(self, slot: ModelSlot, batch: RolloutBatch,
                           compute: Callable[[torch.Tensor, RolloutBatch], torch.Tensor]) -> torch.Tensor:
        """:meth:`_forward_only` through :class:`LeanForward` (one process holds the whole model)."""
        lean = LeanForward(slot.model)
        causal = slot.info.kind == "causal_lm"
        outputs = []
        for mb in batch.split(self.args.micro_batch_size):
            input_ids, _, mask = mb.model_inputs()
            positions = slice(mb.prompt_len - 1, mb.prompt_len + mb.response_len - 1) if causal else None
            outputs.append(compute(lean(input_ids, mask, positions), mb).detach().float())
        return torch.cat(outputs, 0)



def _forward(model: torch.nn.Module, mb) -> torch.Tensor:
    """A plain forward of a micro-batch (anything with ``model_inputs()``)."""
    return model(*mb.model_inputs())
