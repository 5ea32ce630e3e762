"""The pairwise ranking loss of reward-model training and its metrics, in pure torch.

Nothing here knows about Megatron or process groups: scores go in, a loss and a vector of sums come out; the
trainer reduces the sums over the data-parallel group and turns them into means with :func:`finalize_pair_stats`.

The loss (InstructGPT, Ouyang et al. 2022, eq. 1; the optional margin is Llama 2's, Touvron et al. 2023, eq. 2)::

    l = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - m)

computed as ``softplus(-(r_c - r_r - m))``, which is exact and finite for any score difference (``-logsigmoid``
of a large negative number would otherwise lose precision in the exponent). ``m`` is the per-pair margin (0 when
the data has none). Scores are in the reward model's units (the value head's output, no normalisation); the loss is
in nats.

Why the loss does not depend on DP size or micro-batch split
------------------------------------------------------------
A global batch of ``G`` pairs (``--global-batch-size``) is cut into ``D`` data-parallel slices of ``M`` micro-batches
of ``b`` pairs each (``G = D * M * b``, checked at start-up). We want the gradient of the mean over the ``G`` pairs,
``L = sum_p l_p / G``. The micro-batch ``(d, m)`` returns ``L[d, m] = sum_{p in (d, m)} l_p / normalizer``; then

* megatron's schedule divides each micro-batch loss by ``M`` before the backward pass and accumulates the
  gradients of the ``M`` micro-batches,
* megatron's DDP averages the gradients over the ``D`` data-parallel ranks,

so the applied gradient is ``grad sum_{d,m} L[d, m] / (D * M)``, which equals ``grad L`` exactly when
``normalizer = G / (D * M) = b``: the trainer passes ``normalizer = micro_batch_size``. Every micro-batch holds
exactly ``b`` real pairs during training (no padding rows), so this is the same for every ``(d, m)``. Reported
metrics never come from the loss tensor: each micro-batch returns raw sums (:func:`pair_stats`), which are summed
over micro-batches and all-reduced over the DP group before division by the global pair count.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor

STAT_FIELDS = ("loss_sum", "correct", "reward_margin_sum", "chosen_reward_sum", "rejected_reward_sum", "count")
"""Order of the entries of the sums vector returned by :func:`pair_stats`."""

METRIC_NAMES = ("loss", "accuracy", "reward_margin_mean", "chosen_reward_mean", "rejected_reward_mean")
"""Keys of the dict returned by :func:`finalize_pair_stats`."""


def _check_scores(chosen_scores: Tensor, rejected_scores: Tensor, margin: Optional[Tensor],
                  weights: Optional[Tensor]) -> None:
    for name, value in (("chosen_scores", chosen_scores), ("rejected_scores", rejected_scores)):
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a 1-D tensor [num_pairs], got {shape}")
    if chosen_scores.shape != rejected_scores.shape:
        raise ValueError(f"chosen_scores {list(chosen_scores.shape)} and rejected_scores "
                         f"{list(rejected_scores.shape)} must have the same shape")
    for name, value in (("margin", margin), ("weights", weights)):
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != chosen_scores.shape):
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a tensor of shape {list(chosen_scores.shape)}, got {shape}")


def pairwise_ranking_loss(chosen_scores: Tensor, rejected_scores: Tensor,
                          margin: Optional[Tensor] = None) -> Tensor:
    """Per-pair loss ``-log sigmoid(r_c - r_r - m)`` (see the module docstring).

    Args:
        chosen_scores: ``[num_pairs]`` scores of the preferred responses.
        rejected_scores: ``[num_pairs]`` scores of the other responses.
        margin: ``[num_pairs]`` required score gap per pair, or None (0).

    Returns:
        ``[num_pairs]`` float32 losses in nats (float64 inputs stay float64).

    Raises:
        ValueError: the inputs are not 1-D tensors of the same shape.
    """
    _check_scores(chosen_scores, rejected_scores, margin, None)
    dtype = torch.float64 if chosen_scores.dtype == torch.float64 else torch.float32
    diff = chosen_scores.to(dtype) - rejected_scores.to(dtype)
    if margin is not None:
        diff = diff - margin.to(dtype)
    return torch.nn.functional.softplus(-diff)


def pair_stats(chosen_scores: Tensor, rejected_scores: Tensor, margin: Optional[Tensor] = None,
               weights: Optional[Tensor] = None) -> Tensor:
    """Sums over the pairs of a micro-batch, to be reduced over micro-batches and DP ranks.

    Args:
        chosen_scores, rejected_scores, margin: as in :func:`pairwise_ranking_loss`.
        weights: ``[num_pairs]`` 1 for real pairs, 0 for padding rows (evaluation pads its last micro-batch);
            None means all ones.

    Returns:
        Detached float64 ``[6]``, in the order of :data:`STAT_FIELDS`: sum of losses, number of pairs with
        ``r_c > r_r`` (strictly; the margin is not used), sum of ``r_c - r_r``, sum of ``r_c``, sum of ``r_r``,
        number of pairs.
    """
    _check_scores(chosen_scores, rejected_scores, margin, weights)
    with torch.no_grad():
        chosen = chosen_scores.detach().double()
        rejected = rejected_scores.detach().double()
        w = torch.ones_like(chosen) if weights is None else weights.detach().double()
        losses = pairwise_ranking_loss(chosen, rejected, None if margin is None else margin.detach().double())
        return torch.stack([(w * losses).sum(), (w * (chosen > rejected).double()).sum(),
                            (w * (chosen - rejected)).sum(), (w * chosen).sum(), (w * rejected).sum(), w.sum()])


def pairwise_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Optional[Tensor] = None,
                  weights: Optional[Tensor] = None, normalizer: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Loss to back-propagate for one micro-batch, and its sums.

    Args:
        chosen_scores, rejected_scores, margin: as in :func:`pairwise_ranking_loss`.
        weights: as in :func:`pair_stats` (padding rows contribute nothing to the loss either).
        normalizer: the loss is ``sum_p w_p * l_p / normalizer``; None uses ``sum_p w_p`` (the micro-batch mean).
            The trainer passes the micro-batch size (see the module docstring for why that makes the gradient the
            one of the global-batch mean under any DP size and micro-batch count).

    Returns:
        ``(loss, sums)``: the 0-dim float32 loss with gradient, and :func:`pair_stats`.

    Raises:
        ValueError: bad shapes, or a normalizer <= 0.
    """
    losses = pairwise_ranking_loss(chosen_scores, rejected_scores, margin)
    _check_scores(chosen_scores, rejected_scores, margin, weights)
    w = torch.ones_like(losses) if weights is None else weights.to(losses.dtype)
    denominator = float(w.sum()) if normalizer is None else float(normalizer)
    if not denominator > 0:
        raise ValueError(f"normalizer must be > 0, got {denominator}")
    loss = (w * losses).sum() / denominator
    return loss, pair_stats(chosen_scores, rejected_scores, margin, weights)


def finalize_pair_stats(sums: Tensor) -> dict[str, float]:
    """Means from (reduced) sums of :func:`pair_stats`.

    Args:
        sums: ``[6]`` in the order of :data:`STAT_FIELDS`, summed over every micro-batch and DP rank.

    Returns:
        ``{"loss", "accuracy", "reward_margin_mean", "chosen_reward_mean", "rejected_reward_mean"}`` as floats
        (means over the pairs; NaN when the count is 0), plus ``"num_pairs"``.
    """
    values = [float(v) for v in sums.double().tolist()]
    if len(values) != len(STAT_FIELDS):
        raise ValueError(f"sums must have {len(STAT_FIELDS)} entries ({', '.join(STAT_FIELDS)}), got {len(values)}")
    count = values[-1]
    means = [v / count if count > 0 else float("nan") for v in values[:-1]]
    result = dict(zip(METRIC_NAMES, means))
    result["num_pairs"] = int(round(count))
    return result
