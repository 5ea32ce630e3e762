"""Every PPO formula of posttrain, in one torch-only module.

Tensors and scalars go in; tensors and a metrics dict come out. Nothing here knows about Megatron, process
groups or argument objects: where a statistic must be global over the data-parallel (DP) group, the caller
injects the reduction (``reduce_fn``) or the global count, so the same function runs in a unit test and
under ``torchrun``. The module reads top to bottom in the order a PPO iteration uses it:

1. validation helpers and masked statistics (``masked_mean``, ``masked_whiten``),
2. KL estimators and KL controllers,
3. per-token rewards (``compute_rewards``) and score normalisation (``RunningMeanStd``),
4. advantage estimators (``compute_advantages``: ``gae``, ``grpo``, ``dr_grpo``, ``rloo``,
   ``reinforce_plus_plus``),
5. DAPO's batch shaping: dynamic sampling (``informative_groups``), overlong reward shaping
   (``overlong_penalty``) and overlong filtering (``overlong_filter_mask``),
6. loss aggregation (``agg_loss``),
7. policy losses (``vanilla``, ``gspo``, ``gspo_token``), value loss, entropy bonus, KL loss and ptx loss,
8. rollout/training mismatch: metrics and importance weights between the sampler's and the training
   forward's log-probabilities (``rollout_mismatch_metrics``, ``rollout_correction_weights``).

Log-probabilities and entropy come from the logits sharded over tensor-parallel ranks, so they are computed in
:mod:`posttrain.parallel` (``vocab_parallel_log_probs``, ``vocab_parallel_entropy``), not here.

The valid names of every choice come from here: ``kl_estimator_names()``, ``adv_estimator_names()`` and
``policy_loss_names()`` read the registries; ``LOSS_AGG_MODES`` and ``ROLLOUT_CORRECTION_MODES`` are tuples.

Conventions
-----------
* RL tensors are batch-first, ``[batch, response_len]``; position ``t`` holds the log-probability, value,
  reward, ... of response token ``t``.
* Masks are 1 for valid tokens and 0 for padding. Bool, integer and float masks are accepted; any other
  value than 0/1 raises ``ValueError``. A response mask is normally right-padded (a prefix of ones).
* KL divergences and entropies are in nats (natural logarithms).
* One set of names everywhere: ``log_probs``, ``old_log_probs``, ``ref_log_probs``, ``values``,
  ``old_values``, ``rewards``, ``advantages``, ``returns``, ``response_mask``, ``scores`` (``[batch]``,
  one sequence-level reward-model score per response).
* Every output tensor is float32 (float64 stays float64): bf16/fp16 inputs are upcast before any
  exponential, log-sum-exp, variance or sum, so half-precision inputs give finite, accurate results.
* Metrics are dicts of detached 0-dim tensors keyed by the names used in the docstrings; they are local
  to the tensors passed in (masked means over valid tokens; pads never dilute them).
* Bad input (shape mismatch, unknown estimator/loss name, a mask that is not 0/1) raises ``ValueError``
  naming the argument; an unknown name lists the valid choices.
* Every function names its source: the paper, or TRL (``trl/experimental/ppo/ppo_trainer.py``,
  ``trl/trainer/utils.py``), verl (``verl/trainer/ppo/core_algos.py``,
  ``verl/trainer/ppo/rollout_corr_helper.py``), slime or OpenRLHF (``openrlhf/models/loss.py``,
  ``openrlhf/models/utils.py``).

Where the sequence score goes
-----------------------------
The reward model gives one score per response. TRL (and MindSpeed-LLM, which follows it) adds it at index
``seq_len + 1`` -- the first pad after the EOS token -- when that index fits in the buffer, else at the
last token. That slot lies outside the policy mask (the policy loss never sees it) but inside the value
mask, and the score moves by one position depending on whether the response filled the buffer (trl#3750).
This project adds the score at the **last valid response token** (the EOS token when there is one), which
lies inside both masks: the score is the reward of the action that ended the episode, the state after it
is terminal (value 0), and the placement does not depend on the response length. verl and OpenRLHF place
it the same way.

Why the loss does not depend on DP size or micro-batch split
------------------------------------------------------------
A PPO mini-batch ``B`` is cut into pieces ``B[d, m]``: DP rank ``d`` of ``D`` processes micro-batches
``m = 1..M``. The loss we want is the full-mini-batch one, e.g. for ``token-mean``::

    L = sum_{(i,t) in B} mask[i,t] * l[i,t] / N,        N = sum_{(i,t) in B} mask[i,t].

If every piece returned its *own* mean, ``sum_{B[d,m]} mask*l / N[d,m]``, a token in a piece with few
valid tokens would weigh more than a token in a full piece, and the result would change with ``D`` and
``M`` (and with how responses of different lengths happen to be grouped). Instead the trainer counts the
valid tokens (and sequences) of each piece with :func:`loss_token_counts`, all-reduces them over the DP
group and all micro-batches of the mini-batch, and passes the totals to :func:`agg_loss`, which returns::

    L[d, m] = sum_{(i,t) in B[d,m]} mask[i,t] * l[i,t] / N.

Gradient accumulation sums ``grad L[d, m]`` over ``m``; summing over ``d`` then gives
``sum_{d,m} grad L[d, m] = grad L`` exactly, for every ``D`` and ``M``, because the division by the
global ``N`` is linear and every piece uses the same ``N``. ``seq-mean-token-mean`` and
``seq-mean-token-sum`` (and ``seq-mean-token-sum-norm``, whose per-sequence sum is divided by a constant
length) work the same way with the global number of sequences ``S`` (a sequence is never split across
pieces, so its per-sequence mean or sum is complete inside one piece). Any averaging done by
the framework must be undone by the caller with the matching factor, in one place: DDP averages gradients
over the DP group (multiply the loss by ``D``, or reduce gradients with a sum), and a pipeline schedule
that divides each micro-batch loss by ``M`` must be multiplied back by ``M``. Advantage whitening has the
same issue: TRL and MindSpeed-LLM whiten over the local rollout only, so the advantages depend on the DP
split; pass the DP all-reduce as ``reduce_fn`` to :func:`masked_whiten` (and :func:`compute_advantages`)
to whiten over the global batch instead.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Hashable, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    # masked statistics
    "masked_mean",
    "masked_whiten",
    # KL
    "KL_ESTIMATOR_REGISTRY",
    "register_kl_estimator",
    "get_kl_estimator_fn",
    "kl_estimator_names",
    "kl_penalty",
    "FixedKLController",
    "AdaptiveKLController",
    "build_kl_controller",
    # rewards
    "RunningMeanStd",
    "compute_rewards",
    # advantages
    "ADV_ESTIMATOR_REGISTRY",
    "register_adv_est",
    "get_adv_estimator_fn",
    "adv_estimator_names",
    "compute_gae",
    "compute_gae_advantages",
    "compute_grpo_advantages",
    "compute_dr_grpo_advantages",
    "compute_rloo_advantages",
    "compute_reinforce_plus_plus_advantages",
    "compute_advantages",
    # DAPO batch shaping
    "informative_groups",
    "overlong_penalty",
    "overlong_filter_mask",
    # losses
    "LOSS_AGG_MODES",
    "loss_token_counts",
    "agg_loss",
    "POLICY_LOSS_REGISTRY",
    "register_policy_loss",
    "get_policy_loss_fn",
    "policy_loss_names",
    "vanilla_policy_loss",
    "gspo_policy_loss",
    "gspo_token_policy_loss",
    "compute_policy_loss",
    "compute_value_loss",
    "explained_variance",
    "compute_entropy_loss",
    "compute_kl_loss",
    "compute_ptx_loss",
    # rollout / training mismatch
    "ROLLOUT_CORRECTION_MODES",
    "rollout_mismatch_metrics",
    "rollout_correction_weights",
]

Tensor = torch.Tensor
ReduceFn = Callable[[Tensor], Tensor]
"""Maps a 1-D tensor of local sums to the global sums (an all-reduce SUM over the DP group)."""
Metrics = Dict[str, Tensor]
Count = Union[int, float, Tensor]

WHITEN_EPS = 1e-8
"""Added to the variance before ``rsqrt`` in :func:`masked_whiten` (TRL's value)."""

LOG_RATIO_CLAMP = 20.0
"""Log-ratios are clamped to ``[-20, 20]`` before ``exp`` (verl) so that ``exp`` stays finite in fp32."""


# ----------------------------------------------------------------------------------------------------------
# 1. Validation helpers and masked statistics
# ----------------------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> list:
    return list(t.shape)


def _require_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_2d(name: str, value: object) -> Tensor:
    t = _require_tensor(name, value)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, response_len], got shape {_shape(t)}")
    return t


def _check_same_shape(ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is None:
            continue
        _require_tensor(name, t)
        if t.shape != ref.shape:
            raise ValueError(
                f"{name} has shape {_shape(t)} but {ref_name} has shape {_shape(ref)}; they must match"
            )


def _as_mask(name: str, mask: object, shape: Optional[torch.Size] = None) -> Tensor:
    """Validates a 0/1 mask (bool, int or float) and returns it as a bool tensor."""
    m = _require_tensor(name, mask)
    if shape is not None and m.shape != shape:
        raise ValueError(f"{name} has shape {_shape(m)} but expected {list(shape)}")
    if m.dtype == torch.bool:
        return m
    if m.is_complex() or bool(((m != 0) & (m != 1)).any()):
        raise ValueError(f"{name} must hold only 0/1 values")
    return m != 0


def _upcast(t: Tensor) -> Tensor:
    """Float32 for half/bf16/float32/integer inputs, float64 kept as is."""
    return t if t.dtype == torch.float64 else t.float()


def _check_name(kind: str, name: object, valid: Sequence[str]) -> str:
    if not isinstance(name, str) or name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid choices: {', '.join(sorted(valid))}")
    return name


def _registrar(registry: Dict[str, Callable], kind: str, names: Sequence[str]) -> Callable[[Callable], Callable]:
    """The decorator behind the ``register_*`` functions: adds ``fn`` to ``registry`` under every name."""

    def decorator(fn: Callable) -> Callable:
        for name in names:
            if registry.get(name, fn) is not fn:
                raise ValueError(f"{kind} {name!r} is already registered")
            registry[name] = fn
        return fn

    return decorator


def _identity(x: Tensor) -> Tensor:
    return x


def masked_mean(values: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1.

    Masked positions are excluded with ``torch.where`` (not multiplied by 0), so a ``nan``/``inf`` at a pad
    cannot leak in. An all-masked input gives 0 instead of ``nan`` (TRL divides by zero there).

    Args:
        values: any shape, e.g. ``[batch, response_len]``.
        mask: 0/1 mask of the same shape.
        dim: reduce over this dimension only; ``None`` reduces over everything.

    Returns:
        0-dim tensor (or the reduced tensor when ``dim`` is given), at least float32.

    Raises:
        ValueError: on a shape mismatch or a mask that is not 0/1.
    """
    _require_tensor("values", values)
    _check_same_shape("values", values, mask=mask)
    m = _as_mask("mask", mask)
    x = _upcast(values)
    total = torch.where(m, x, 0.0).sum(dim=dim) if dim is not None else torch.where(m, x, 0.0).sum()
    count = m.sum(dim=dim) if dim is not None else m.sum()
    return total / count.clamp(min=1).to(total.dtype)


def _masked_moments(x: Tensor, m: Tensor, reduce_fn: ReduceFn) -> Tuple[Tensor, Tensor, Tensor]:
    """Global masked mean, Bessel-corrected variance and count, in two passes.

    ``reduce_fn`` is called twice: with ``[sum, count]``, then with ``[sum of squared deviations from the
    global mean]``. Two passes avoid the cancellation of ``sum_sq - N * mean**2``.
    """
    local = torch.stack([torch.where(m, x, 0.0).sum(), m.sum().to(x.dtype)])
    total, count = reduce_fn(local).unbind()
    safe_count = count.clamp(min=1)
    mean = total / safe_count
    sq = reduce_fn(torch.where(m, x - mean, 0.0).square().sum().reshape(1))[0]
    # Written as TRL writes it (mean of squares times N / (N - 1)); N = 0 or 1 gives variance 0.
    var = (sq / safe_count) * (count / (count - 1).clamp(min=1))
    return mean, var, count


def masked_whiten(
    values: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    reduce_fn: Optional[ReduceFn] = None,
) -> Tensor:
    """Whitens ``values`` with the mean and variance of the valid positions.

    ``whitened = (values - mean) * rsqrt(var + 1e-8)`` with the masked mean and the Bessel-corrected
    masked variance (TRL ``masked_whiten``, also verl and MindSpeed-LLM). With ``shift_mean=False`` the
    mean is added back (only the scale changes). Every position is transformed, pads included; callers that
    need zeros at pads mask afterwards (the GAE path does, as TRL does).

    Args:
        values: ``[batch, response_len]`` (any shape works).
        mask: 0/1 mask of the same shape; the statistics use positions where it is 1.
        shift_mean: if False, keep the original mean.
        reduce_fn: makes the statistics global. It receives a 1-D tensor of local sums and must return the
            element-wise global sums (an all-reduce SUM over the DP group); it is called twice, first with
            ``[sum, count]``, then with ``[sum of squared deviations]``. ``None`` means local statistics.

    Returns:
        Tensor shaped like ``values`` (at least float32). If no position is valid (globally), ``values``
        is returned unchanged (upcast).

    Raises:
        ValueError: on a shape mismatch or a mask that is not 0/1.
    """
    _require_tensor("values", values)
    _check_same_shape("values", values, mask=mask)
    m = _as_mask("mask", mask)
    x = _upcast(values)
    mean, var, count = _masked_moments(x, m, reduce_fn or _identity)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(count > 0, whitened, x)


# ----------------------------------------------------------------------------------------------------------
# 2. KL estimators and KL controllers
# ----------------------------------------------------------------------------------------------------------

KLEstimatorFn = Callable[[Tensor, Tensor], Tensor]
KL_ESTIMATOR_REGISTRY: Dict[str, KLEstimatorFn] = {}


def register_kl_estimator(*names: str) -> Callable[[KLEstimatorFn], KLEstimatorFn]:
    """Decorator registering a per-token KL estimator ``fn(log_probs, ref_log_probs) -> kl`` under names.

    Raises:
        ValueError: if a name is already taken by another function.
    """
    return _registrar(KL_ESTIMATOR_REGISTRY, "KL estimator", names)


def get_kl_estimator_fn(name: str) -> KLEstimatorFn:
    """Returns the KL estimator registered as ``name``.

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    return KL_ESTIMATOR_REGISTRY[_check_name("KL estimator", name, list(KL_ESTIMATOR_REGISTRY))]


@register_kl_estimator("k1", "kl")
def kl_k1(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """``k1 = log pi(a) - log pi_ref(a)``: unbiased, high variance, can be negative.

    Source: Schulman, "Approximating KL Divergence" (2020); TRL ``kl_estimator="k1"``.
    """
    return log_probs - ref_log_probs


@register_kl_estimator("abs")
def kl_abs(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """``|log pi(a) - log pi_ref(a)|``. Source: verl ``kl_penalty="abs"``."""
    return (log_probs - ref_log_probs).abs()


@register_kl_estimator("k2", "mse")
def kl_k2(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """``k2 = 0.5 * (log pi(a) - log pi_ref(a))**2``: biased, low variance, >= 0.

    Source: Schulman (2020); verl ``kl_penalty="mse"``.
    """
    return 0.5 * (log_probs - ref_log_probs).square()


@register_kl_estimator("k3", "low_var_kl")
def kl_k3(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """``k3 = (r - 1) - log r`` with ``r = pi_ref(a) / pi(a)``: unbiased, low variance, >= 0.

    ``log r`` is clamped to ``[-20, 20]`` before the exponential (as verl's ``low_var_kl``) so fp32 never
    overflows. ``r - 1`` is computed as ``expm1(log r)``: with ``exp(x) - 1`` a tiny positive ``x`` rounds
    to ``exp(x) == 1`` in fp32 and gives a negative estimate; the remaining rounding noise is clamped at 0.

    Source: Schulman (2020); TRL ``kl_estimator="k3"``; verl ``low_var_kl``.
    """
    log_ratio = (ref_log_probs - log_probs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.expm1(log_ratio) - log_ratio).clamp(min=0.0)


def kl_estimator_names() -> Tuple[str, ...]:
    """Names accepted by :func:`kl_penalty` (aliases included), in registration order."""
    return tuple(KL_ESTIMATOR_REGISTRY)


def kl_penalty(
    name: str,
    log_probs: Tensor,
    ref_log_probs: Tensor,
    clamp: Optional[float] = None,
) -> Tensor:
    """Per-token KL estimate between the policy and the reference policy, in nats.

    Args:
        name: a registered estimator: ``k1``/``kl``, ``k2``/``mse``, ``k3``/``low_var_kl``, ``abs``.
        log_probs: ``[batch, response_len]`` log-probabilities of the sampled tokens under the policy.
        ref_log_probs: ``[batch, response_len]`` the same under the reference policy.
        clamp: if given, the estimate is clamped to ``[-clamp, clamp]`` (OpenRLHF and verl use 10).

    Returns:
        ``[batch, response_len]`` KL estimate (at least float32). Pads are not masked here.

    Raises:
        ValueError: for an unknown name or a shape mismatch.
    """
    fn = get_kl_estimator_fn(name)
    _require_tensor("log_probs", log_probs)
    _check_same_shape("log_probs", log_probs, ref_log_probs=ref_log_probs)
    kl = fn(_upcast(log_probs), _upcast(ref_log_probs))
    if clamp is not None:
        if clamp <= 0:
            raise ValueError(f"clamp must be > 0 or None, got {clamp}")
        kl = kl.clamp(-clamp, clamp)
    return kl


def _as_float(name: str, value: Union[float, Tensor]) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {_shape(value)}")
        value = value.item()
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class FixedKLController:
    """A KL coefficient that never changes. Source: Ziegler et al. 2019; TRL/verl ``FixedKLController``.

    Args:
        kl_coef: the coefficient, >= 0.

    Attributes:
        value: the current KL coefficient.

    Raises:
        ValueError: if ``kl_coef`` is negative.
    """

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: Union[float, Tensor], n_steps: int) -> None:
        """No-op, kept for the common controller interface."""

    def state_dict(self) -> Dict[str, float]:
        """Returns ``{"value": kl_coef}`` for checkpointing."""
        return {"value": self.value}

    def load_state_dict(self, state_dict: Dict[str, float]) -> None:
        """Restores the coefficient saved by :meth:`state_dict`."""
        self.value = float(state_dict["value"])


class AdaptiveKLController:
    """Proportional controller steering the measured KL towards a target.

    Source: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2::

        e = clip(kl / target_kl - 1, -0.2, 0.2)
        kl_coef *= 1 + e * n_steps / horizon

    ``kl`` is the measured KL per response in nats (e.g. the ``kl`` metric of :func:`compute_rewards`) and
    ``n_steps`` the number of samples (responses) of the batch it was measured on.

    Args:
        init_kl_coef: starting coefficient, >= 0.
        target_kl: target KL, > 0 (nats).
        horizon: > 0, in samples (verl's default 10000).

    Attributes:
        value: the current KL coefficient.
        target_kl: the KL the controller steers towards, nats.
        horizon: the number of samples over which a full 20 % correction is applied.

    Raises:
        ValueError: on a negative coefficient or a non-positive target or horizon.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int = 10000):
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target_kl is None or target_kl <= 0:
            raise ValueError(f"target_kl must be > 0, got {target_kl}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target_kl = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: Union[float, Tensor], n_steps: int) -> None:
        """Applies one controller step.

        Args:
            current_kl: measured KL (nats), float or 1-element tensor.
            n_steps: number of samples the KL was measured on.
        """
        kl = _as_float("current_kl", current_kl)
        error = min(max(kl / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> Dict[str, float]:
        """Returns the coefficient and settings for checkpointing."""
        return {"value": self.value, "target_kl": self.target_kl, "horizon": self.horizon}

    def load_state_dict(self, state_dict: Dict[str, float]) -> None:
        """Restores the coefficient; ``target_kl``/``horizon`` stay as configured for the new run."""
        self.value = float(state_dict["value"])


KL_CONTROLLERS = ("fixed", "adaptive")


def build_kl_controller(
    kind: str,
    kl_coef: float,
    target_kl: Optional[float] = None,
    horizon: int = 10000,
) -> Union[FixedKLController, AdaptiveKLController]:
    """Creates a KL controller. Source: verl ``get_kl_controller``.

    Args:
        kind: ``"fixed"`` or ``"adaptive"``.
        kl_coef: the (initial) coefficient.
        target_kl: target KL in nats; required for ``"adaptive"``.
        horizon: controller horizon for ``"adaptive"``.

    Raises:
        ValueError: for an unknown kind (lists the valid ones) or invalid settings.
    """
    _check_name("KL controller", kind, KL_CONTROLLERS)
    if kind == "fixed":
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, horizon)


# ----------------------------------------------------------------------------------------------------------
# 3. Per-token rewards
# ----------------------------------------------------------------------------------------------------------


class RunningMeanStd:
    """Running mean and (population) variance of a scalar stream, e.g. reward-model scores.

    Batches are merged with the parallel algorithm of Chan et al. (1979), as in OpenAI baselines'
    ``RunningMeanStd`` (used for reward normalisation by OpenRLHF). Statistics are kept as Python floats
    (double precision) so they checkpoint exactly.

    Args:
        epsilon: added to the variance in :meth:`normalize`.

    Attributes:
        mean: running mean.
        var: running population variance (1.0 before the first update).
        count: number of values seen.
    """

    def __init__(self, epsilon: float = 1e-8):
        self.epsilon = float(epsilon)
        self.mean = 0.0
        self.var = 1.0
        self.count = 0.0

    @property
    def std(self) -> float:
        """``sqrt(var + epsilon)``."""
        return math.sqrt(self.var + self.epsilon)

    def update(self, x: Tensor, mask: Optional[Tensor] = None, reduce_fn: Optional[ReduceFn] = None) -> None:
        """Merges the values of a batch into the running statistics.

        Args:
            x: any shape, e.g. scores ``[batch]``.
            mask: optional 0/1 mask of the same shape selecting the values to use.
            reduce_fn: makes the batch statistics global over the DP group (see :func:`masked_whiten`);
                called twice with float64 tensors of local sums.

        Raises:
            ValueError: on a shape mismatch or a mask that is not 0/1.
        """
        _require_tensor("x", x)
        m = torch.ones_like(x, dtype=torch.bool) if mask is None else _as_mask("mask", mask, x.shape)
        xd = x.detach().to(torch.float64)
        reduce = reduce_fn or _identity
        total, n = reduce(torch.stack([torch.where(m, xd, 0.0).sum(), m.sum().to(torch.float64)])).tolist()
        if n <= 0:
            return
        batch_mean = total / n
        batch_m2 = reduce(torch.where(m, xd - batch_mean, 0.0).square().sum().reshape(1)).item()
        delta = batch_mean - self.mean
        new_count = self.count + n
        m2 = self.var * self.count + batch_m2 + delta * delta * self.count * n / new_count
        self.mean += delta * n / new_count
        self.var = m2 / new_count
        self.count = new_count

    def normalize(self, x: Tensor, shift_mean: bool = True) -> Tensor:
        """Returns ``(x - mean) / std`` (``x / std`` if ``shift_mean`` is False), at least float32."""
        x = _upcast(_require_tensor("x", x))
        if shift_mean:
            x = x - self.mean
        return x / self.std

    def state_dict(self) -> Dict[str, float]:
        """Returns ``{"mean", "var", "count"}`` for checkpointing."""
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state_dict: Dict[str, float]) -> None:
        """Restores the statistics saved by :meth:`state_dict`."""
        self.mean = float(state_dict["mean"])
        self.var = float(state_dict["var"])
        self.count = float(state_dict["count"])


def _last_valid_index(m: Tensor) -> Tensor:
    """``[batch]`` index of the last 1 of each mask row, -1 for an all-masked row."""
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    return torch.where(m, positions, -1).amax(dim=-1)


def compute_rewards(
    scores: Tensor,
    log_probs: Tensor,
    ref_log_probs: Tensor,
    response_mask: Tensor,
    kl_coef: Union[float, Tensor],
    *,
    kl_estimator: str = "k1",
    kl_clamp: Optional[float] = None,
    has_eos: Optional[Tensor] = None,
    missing_eos_penalty: Optional[float] = None,
    score_normalizer: Optional[RunningMeanStd] = None,
    score_clip: Optional[float] = None,
    reduce_fn: Optional[ReduceFn] = None,
) -> Tuple[Tensor, Metrics]:
    """Per-token rewards: a KL penalty on every token plus the sequence score on the last valid token.

    ::

        rewards[i, t] = -kl_coef * kl[i, t] * response_mask[i, t]
        rewards[i, last_i] += score_i,       last_i = last t with response_mask[i, t] == 1

    The score goes through, in this order: ``score -= missing_eos_penalty`` where ``has_eos`` is False
    (TRL's ``missing_eos_penalty``, on the raw scale), normalisation by ``score_normalizer`` (updated with
    this batch first, then applied: ``(score - mean) / std``), and clipping to ``[-score_clip, score_clip]``.
    See the module docstring for why the score is placed on the last valid token rather than on TRL's
    ``seq_len + 1``. An all-masked row gets no reward at all (its score is dropped).

    Source: Ziegler et al. 2019 (KL-penalised reward); TRL ``PPOTrainer.train`` steps 3-4; OpenRLHF
    ``compute_reward`` (placement at the last valid token, score clipping).

    Args:
        scores: ``[batch]`` reward-model score of each response.
        log_probs: ``[batch, response_len]`` policy log-probabilities of the response tokens at rollout.
        ref_log_probs: ``[batch, response_len]`` reference-policy log-probabilities.
        response_mask: ``[batch, response_len]`` 0/1, 1 for response tokens (EOS included).
        kl_coef: KL coefficient (float or 0-dim tensor), e.g. a controller's ``value``.
        kl_estimator: name of a registered KL estimator (see :func:`kl_penalty`).
        kl_clamp: optional clamp of the per-token KL, nats.
        has_eos: ``[batch]`` bool, whether each response ended with EOS; needed by ``missing_eos_penalty``.
        missing_eos_penalty: subtracted from the score of responses without EOS.
        score_normalizer: optional running statistics to normalise the scores with (mutated: updated).
        score_clip: optional clip of the final score, > 0.
        reduce_fn: makes the normaliser's batch statistics global over the data-parallel group (see
            :func:`masked_whiten`).

    Returns:
        ``(rewards, metrics)``: ``rewards`` is ``[batch, response_len]`` float32, 0 at pads. ``metrics``
        holds ``kl`` (mean over responses of the summed per-token KL, nats, TRL's ``objective/kl``),
        ``non_score_reward`` (mean over responses of the summed KL reward), ``scores`` (mean final score),
        ``rlhf_reward`` (``scores + non_score_reward``) and, when ``has_eos`` is given, ``no_eos_frac``.

    Raises:
        ValueError: on shape mismatches, a mask that is not 0/1, ``missing_eos_penalty`` without
            ``has_eos``, or an unknown estimator.
    """
    _check_2d("log_probs", log_probs)
    _check_same_shape("log_probs", log_probs, ref_log_probs=ref_log_probs, response_mask=response_mask)
    m = _as_mask("response_mask", response_mask)
    batch = log_probs.shape[0]
    _require_tensor("scores", scores)
    if scores.shape != (batch,):
        raise ValueError(f"scores must have shape [{batch}] (one per response), got {_shape(scores)}")
    eos = None
    if has_eos is not None:
        eos = _as_mask("has_eos", has_eos, torch.Size([batch]))
    if missing_eos_penalty is not None and eos is None:
        raise ValueError("has_eos ([batch] bool) is required when missing_eos_penalty is set")
    if score_clip is not None and score_clip <= 0:
        raise ValueError(f"score_clip must be > 0 or None, got {score_clip}")

    kl = torch.where(m, kl_penalty(kl_estimator, log_probs, ref_log_probs, clamp=kl_clamp), 0.0)
    non_score_reward = -kl_coef * kl

    s = _upcast(scores)
    if missing_eos_penalty is not None:
        s = torch.where(eos, s, s - missing_eos_penalty)
    if score_normalizer is not None:
        score_normalizer.update(s, reduce_fn=reduce_fn)
        s = score_normalizer.normalize(s)
    if score_clip is not None:
        s = s.clamp(-score_clip, score_clip)

    last = _last_valid_index(m)
    placed = torch.where(last >= 0, s, 0.0).to(non_score_reward.dtype)
    score_mat = torch.zeros_like(non_score_reward).scatter_(1, last.clamp(min=0).unsqueeze(1), placed.unsqueeze(1))
    rewards = non_score_reward + score_mat

    with torch.no_grad():
        metrics: Metrics = {
            "kl": kl.sum(dim=1).mean().detach(),
            "non_score_reward": non_score_reward.sum(dim=1).mean().detach(),
            "scores": s.mean().detach(),
        }
        metrics["rlhf_reward"] = metrics["scores"] + metrics["non_score_reward"]
        if eos is not None:
            metrics["no_eos_frac"] = (~eos).float().mean()
    return rewards, metrics


# ----------------------------------------------------------------------------------------------------------
# 4. Advantage estimators
# ----------------------------------------------------------------------------------------------------------

AdvantageFn = Callable[..., Tuple[Tensor, Tensor]]
ADV_ESTIMATOR_REGISTRY: Dict[str, AdvantageFn] = {}


def register_adv_est(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator registering an advantage estimator under ``name`` (verl's ``register_adv_est``).

    A registered function takes keyword arguments only -- the inputs of :func:`compute_advantages` -- and
    must accept (and ignore) the ones it does not use through ``**unused``; it returns
    ``(advantages, returns)``, both ``[batch, response_len]``.

    Raises:
        ValueError: if ``name`` is already taken by another function.
    """
    return _registrar(ADV_ESTIMATOR_REGISTRY, "advantage estimator", [name])


def get_adv_estimator_fn(name: str) -> AdvantageFn:
    """Returns the advantage estimator registered as ``name``.

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    return ADV_ESTIMATOR_REGISTRY[_check_name("advantage estimator", name, list(ADV_ESTIMATOR_REGISTRY))]


def _needs(estimator: str, **inputs: object) -> None:
    for name, value in inputs.items():
        if value is None:
            raise ValueError(f"advantage estimator {estimator!r} needs {name}")


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation, without whitening.

    Source: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", eq. 16, computed backwards as in TRL's train loop::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                      (the lambda-return, the critic's target)

    Masked positions carry no value: rewards and values where ``response_mask`` is 0 are treated as 0, so
    the value after the last valid token is 0 (the episode ended there) and advantages/returns are 0 at
    pads. Masks are expected to be right-padded; a 0 inside a row is a zero-reward, zero-value step.

    Args:
        rewards: ``[batch, response_len]`` per-token rewards (:func:`compute_rewards`).
        values: ``[batch, response_len]`` critic values at rollout.
        response_mask: ``[batch, response_len]`` 0/1.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, each ``[batch, response_len]`` (at least float32), 0 at pads.

    Raises:
        ValueError: on shape mismatches or a mask that is not 0/1.
    """
    _check_2d("rewards", rewards)
    _check_same_shape("rewards", rewards, values=values, response_mask=response_mask)
    m = _as_mask("response_mask", response_mask)
    with torch.no_grad():
        r = torch.where(m, _upcast(rewards), 0.0)
        v = torch.where(m, _upcast(values), 0.0)
        advantages = torch.zeros_like(r)
        next_value = torch.zeros_like(r[:, 0])
        last_gae = torch.zeros_like(r[:, 0])
        for t in reversed(range(r.shape[1])):
            delta = r[:, t] + gamma * next_value - v[:, t]
            last_gae = delta + gamma * lam * last_gae
            advantages[:, t] = last_gae
            next_value = v[:, t]
        returns = advantages + v
    return advantages, returns


@register_adv_est("gae")
def compute_gae_advantages(
    *,
    rewards: Optional[Tensor],
    values: Optional[Tensor],
    response_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    reduce_fn: Optional[ReduceFn] = None,
    **unused: object,
) -> Tuple[Tensor, Tensor]:
    """GAE advantages (whitened, pads set to 0) and lambda-returns.

    Source: Schulman et al. 2016; whitening as TRL (``masked_whiten`` over valid tokens, then
    ``masked_fill(pad, 0)``). With ``reduce_fn`` the whitening statistics are global over the DP group.

    Args:
        rewards: ``[batch, response_len]``.
        values: ``[batch, response_len]``.
        response_mask: ``[batch, response_len]`` 0/1.
        gamma: discount factor.
        lam: GAE lambda.
        whiten: whiten the advantages over valid tokens.
        reduce_fn: see :func:`masked_whiten`.
        **unused: inputs of other estimators, ignored.

    Returns:
        ``(advantages, returns)``, each ``[batch, response_len]`` float32; returns are not whitened.

    Raises:
        ValueError: if ``rewards`` or ``values`` is missing, on shape mismatches or a bad mask.
    """
    _needs("gae", rewards=rewards, values=values)
    advantages, returns = compute_gae(rewards, values, response_mask, gamma=gamma, lam=lam)
    if whiten:
        m = _as_mask("response_mask", response_mask)
        with torch.no_grad():
            advantages = torch.where(m, masked_whiten(advantages, m, reduce_fn=reduce_fn), 0.0)
    return advantages, returns


def _group_ids(
    batch: int,
    group_index: Optional[Union[Tensor, Sequence[Hashable]]],
    n_samples_per_prompt: Optional[int],
    device: torch.device,
) -> Tensor:
    """Dense group ids ``[batch]`` in ``0..G-1`` from a group index or a contiguous group size."""
    if group_index is not None:
        if isinstance(group_index, torch.Tensor):
            if group_index.shape != (batch,):
                raise ValueError(f"group_index must have shape [{batch}], got {_shape(group_index)}")
            return torch.unique(group_index, return_inverse=True)[1].to(device)
        keys = list(group_index)
        if len(keys) != batch:
            raise ValueError(f"group_index must have {batch} entries, got {len(keys)}")
        dense: Dict[Hashable, int] = {}
        return torch.tensor([dense.setdefault(k, len(dense)) for k in keys], dtype=torch.long, device=device)
    if n_samples_per_prompt is None:
        raise ValueError("group estimators need group_index or n_samples_per_prompt")
    if n_samples_per_prompt < 1 or batch % n_samples_per_prompt != 0:
        raise ValueError(
            f"n_samples_per_prompt must be >= 1 and divide the batch size {batch}, got {n_samples_per_prompt}"
        )
    return torch.arange(batch, device=device) // n_samples_per_prompt


def _group_stats(s: Tensor, ids: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-sample group size, group mean and unbiased group std (std 0 for a singleton group)."""
    n_groups = int(ids.max().item()) + 1 if ids.numel() else 0
    size = torch.zeros(n_groups, dtype=s.dtype, device=s.device).index_add_(0, ids, torch.ones_like(s))
    mean = torch.zeros_like(size).index_add_(0, ids, s) / size
    sq = torch.zeros_like(size).index_add_(0, ids, (s - mean[ids]).square())
    std = (sq / (size - 1).clamp(min=1)).sqrt()
    return size[ids], mean[ids], std[ids]


def _check_scores(scores: Tensor, response_mask: Tensor) -> Tuple[Tensor, Tensor]:
    _check_2d("response_mask", response_mask)
    m = _as_mask("response_mask", response_mask)
    _require_tensor("scores", scores)
    if scores.shape != (m.shape[0],):
        raise ValueError(f"scores must have shape [{m.shape[0]}] (one per response), got {_shape(scores)}")
    return _upcast(scores), m


@register_adv_est("grpo")
def compute_grpo_advantages(
    *,
    scores: Optional[Tensor],
    response_mask: Tensor,
    group_index: Optional[Union[Tensor, Sequence[Hashable]]] = None,
    n_samples_per_prompt: Optional[int] = None,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    **unused: object,
) -> Tuple[Tensor, Tensor]:
    """Group-relative advantages: ``A_i = (s_i - mean_g) / (std_g + eps)`` on every valid token.

    ``mean_g``/``std_g`` are the mean and unbiased standard deviation of the scores of the responses to
    the same prompt. A group of one response uses mean 0 and std 1 (verl). With ``norm_by_std=False`` the
    advantage is ``s_i - mean_g`` (Dr. GRPO, Liu et al. 2025).

    Source: Shao et al. 2024, "DeepSeekMath" (GRPO, outcome supervision); verl
    ``compute_grpo_outcome_advantage``.

    Args:
        scores: ``[batch]`` one score per response.
        response_mask: ``[batch, response_len]`` 0/1.
        group_index: ``[batch]`` prompt id of each response (tensor or sequence of hashables).
        n_samples_per_prompt: alternative to ``group_index`` when the responses of a prompt are contiguous.
        norm_by_std: divide by the group std.
        eps: added to the std.
        **unused: inputs of other estimators, ignored.

    Returns:
        ``(advantages, returns)``, both ``[batch, response_len]`` and equal, 0 at pads.

    Raises:
        ValueError: on missing scores or grouping, or bad shapes.
    """
    _needs("grpo", scores=scores)
    s, m = _check_scores(scores, response_mask)
    with torch.no_grad():
        size, mean, std = _group_stats(s, _group_ids(s.shape[0], group_index, n_samples_per_prompt, s.device))
        single = size < 2
        mean = torch.where(single, 0.0, mean)
        adv = s - mean
        if norm_by_std:
            adv = adv / (torch.where(single, 1.0, std) + eps)
        advantages = torch.where(m, adv.unsqueeze(1), 0.0)
    return advantages, advantages


@register_adv_est("dr_grpo")
def compute_dr_grpo_advantages(
    *,
    scores: Optional[Tensor],
    response_mask: Tensor,
    group_index: Optional[Union[Tensor, Sequence[Hashable]]] = None,
    n_samples_per_prompt: Optional[int] = None,
    **unused: object,
) -> Tuple[Tensor, Tensor]:
    """Dr. GRPO advantages: ``A_i = s_i - mean_g`` on every valid token, no division by the group std.

    ``mean_g`` is the mean score of the responses to the same prompt (a group of one response uses mean 0,
    as :func:`compute_grpo_advantages`). The std normalisation of GRPO weighs prompts whose responses
    agree (very easy or very hard ones) more; Dr. GRPO drops it, and drops GRPO's ``1 / |o_i|`` in the loss
    as well -- pair this estimator with ``loss_agg_mode="seq-mean-token-sum-norm"`` (:func:`agg_loss`).

    Source: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", section 3.2
    (GRPO's advantage without its std term); verl ``compute_grpo_outcome_advantage`` with
    ``norm_adv_by_std_in_grpo=False``. Same as ``compute_advantages("grpo", ..., norm_by_std=False)``;
    ``norm_by_std`` is ignored here.

    Args:
        scores: ``[batch]`` one score per response.
        response_mask: ``[batch, response_len]`` 0/1.
        group_index: ``[batch]`` prompt id of each response (tensor or sequence of hashables).
        n_samples_per_prompt: alternative to ``group_index`` when the responses of a prompt are contiguous.
        **unused: inputs of other estimators, ignored.

    Returns:
        ``(advantages, returns)``, both ``[batch, response_len]`` and equal, 0 at pads.

    Raises:
        ValueError: on missing scores or grouping, or bad shapes.
    """
    _needs("dr_grpo", scores=scores)
    return compute_grpo_advantages(
        scores=scores,
        response_mask=response_mask,
        group_index=group_index,
        n_samples_per_prompt=n_samples_per_prompt,
        norm_by_std=False,
    )


@register_adv_est("rloo")
def compute_rloo_advantages(
    *,
    scores: Optional[Tensor],
    response_mask: Tensor,
    group_index: Optional[Union[Tensor, Sequence[Hashable]]] = None,
    n_samples_per_prompt: Optional[int] = None,
    **unused: object,
) -> Tuple[Tensor, Tensor]:
    """REINFORCE leave-one-out: ``A_i = s_i - mean_{j != i} s_j`` over the same prompt's responses.

    Equals ``n / (n - 1) * (s_i - mean_g)`` for a group of ``n >= 2``; a group of one keeps its score
    (verl). Source: Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free");
    Ahmadian et al. 2024 (RLOO for RLHF); verl ``compute_rloo_outcome_advantage``.

    Args:
        scores: ``[batch]``.
        response_mask: ``[batch, response_len]`` 0/1.
        group_index: ``[batch]`` prompt id of each response.
        n_samples_per_prompt: alternative to ``group_index`` for contiguous groups.
        **unused: inputs of other estimators, ignored.

    Returns:
        ``(advantages, returns)``, both ``[batch, response_len]`` and equal, 0 at pads.

    Raises:
        ValueError: on missing scores or grouping, or bad shapes.
    """
    _needs("rloo", scores=scores)
    s, m = _check_scores(scores, response_mask)
    with torch.no_grad():
        size, mean, _ = _group_stats(s, _group_ids(s.shape[0], group_index, n_samples_per_prompt, s.device))
        adv = torch.where(size > 1, (s - mean) * size / (size - 1).clamp(min=1), s)
        advantages = torch.where(m, adv.unsqueeze(1), 0.0)
    return advantages, advantages


@register_adv_est("reinforce_plus_plus")
def compute_reinforce_plus_plus_advantages(
    *,
    rewards: Optional[Tensor],
    response_mask: Tensor,
    gamma: float = 1.0,
    reduce_fn: Optional[ReduceFn] = None,
    **unused: object,
) -> Tuple[Tensor, Tensor]:
    """REINFORCE++: discounted token-level return, whitened over the batch (no critic).

    ``G_t = r_t + gamma * G_{t+1}`` (rewards at pads treated as 0), ``A = masked_whiten(G)`` with pads set
    to 0. Source: Hu 2025, "REINFORCE++" (arXiv:2501.03262); verl
    ``compute_reinforce_plus_plus_outcome_advantage``.

    Args:
        rewards: ``[batch, response_len]`` per-token rewards (KL penalty included).
        response_mask: ``[batch, response_len]`` 0/1.
        gamma: discount factor.
        reduce_fn: see :func:`masked_whiten`.
        **unused: inputs of other estimators, ignored.

    Returns:
        ``(advantages, returns)``: whitened advantages and the un-whitened returns ``G``, 0 at pads.

    Raises:
        ValueError: if ``rewards`` is missing, on shape mismatches or a bad mask.
    """
    _needs("reinforce_plus_plus", rewards=rewards)
    _check_2d("rewards", rewards)
    _check_same_shape("rewards", rewards, response_mask=response_mask)
    m = _as_mask("response_mask", response_mask)
    with torch.no_grad():
        r = torch.where(m, _upcast(rewards), 0.0)
        returns = torch.zeros_like(r)
        running = torch.zeros_like(r[:, 0])
        for t in reversed(range(r.shape[1])):
            running = r[:, t] + gamma * running
            returns[:, t] = running
        advantages = torch.where(m, masked_whiten(returns, m, reduce_fn=reduce_fn), 0.0)
    return advantages, returns


def adv_estimator_names() -> Tuple[str, ...]:
    """Names accepted by :func:`compute_advantages`, in registration order (for a CLI's ``choices``)."""
    return tuple(ADV_ESTIMATOR_REGISTRY)


def compute_advantages(
    name: str,
    *,
    response_mask: Tensor,
    rewards: Optional[Tensor] = None,
    values: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    group_index: Optional[Union[Tensor, Sequence[Hashable]]] = None,
    n_samples_per_prompt: Optional[int] = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    norm_by_std: bool = True,
    reduce_fn: Optional[ReduceFn] = None,
) -> Tuple[Tensor, Tensor]:
    """Advantages and returns with the estimator registered as ``name``; computed without gradient.

    * ``gae``: needs ``rewards``, ``values`` (uses ``gamma``, ``lam``, ``whiten``, ``reduce_fn``); returns
      are the lambda-returns ``A + V``.
    * ``grpo``: needs ``scores`` and ``group_index`` or ``n_samples_per_prompt`` (uses ``norm_by_std``);
      returns equal the advantages.
    * ``dr_grpo``: as ``grpo`` without the std division (``norm_by_std`` ignored).
    * ``rloo``: needs ``scores`` and ``group_index`` or ``n_samples_per_prompt``; returns equal the
      advantages.
    * ``reinforce_plus_plus``: needs ``rewards`` (uses ``gamma``, ``reduce_fn``); returns are the
      discounted returns.

    Args:
        name: registered estimator name.
        response_mask: ``[batch, response_len]`` 0/1.
        rewards: ``[batch, response_len]`` per-token rewards.
        values: ``[batch, response_len]`` critic values at rollout.
        scores: ``[batch]`` sequence scores.
        group_index: ``[batch]`` prompt id per response.
        n_samples_per_prompt: responses per prompt, contiguous.
        gamma: discount factor.
        lam: GAE lambda.
        whiten: whiten GAE advantages.
        norm_by_std: divide ``grpo`` advantages by the group std.
        reduce_fn: global whitening statistics (see :func:`masked_whiten`).

    Returns:
        ``(advantages, returns)``, each ``[batch, response_len]`` float32, 0 at pads.

    Raises:
        ValueError: for an unknown name (lists valid ones), a missing input, bad shapes or a bad mask.
    """
    fn = get_adv_estimator_fn(name)
    return fn(
        response_mask=response_mask,
        rewards=rewards,
        values=values,
        scores=scores,
        group_index=group_index,
        n_samples_per_prompt=n_samples_per_prompt,
        gamma=gamma,
        lam=lam,
        whiten=whiten,
        norm_by_std=norm_by_std,
        reduce_fn=reduce_fn,
    )


# ----------------------------------------------------------------------------------------------------------
# 5. DAPO's batch shaping: dynamic sampling, overlong reward shaping, overlong filtering
# ----------------------------------------------------------------------------------------------------------


def informative_groups(
    scores: Tensor,
    group_index: Optional[Union[Tensor, Sequence[Hashable]]] = None,
    *,
    n_samples_per_prompt: Optional[int] = None,
    atol: float = 0.0,
    keep_singletons: bool = False,
) -> Tensor:
    """Dynamic sampling: which responses belong to a group whose scores are not all equal.

    A group (the responses to one prompt) is informative when ``max(scores) - min(scores) > atol``. With
    the default ``atol = 0`` that is exact float inequality: rule-based rewards (0/1, -1/1) are exactly
    equal or clearly different, and a group of equal scores gives every response a group-relative
    advantage of exactly 0 (``grpo``, ``dr_grpo``, ``rloo``), so it only dilutes the batch. A group of one
    response is not informative unless ``keep_singletons`` (verl's filter keeps such groups).

    Source: Yu et al. 2025, "DAPO", section 3.2 (eq. 11, the constraint
    ``0 < |{o_i correct}| < G``); verl's DAPO trainer (``filter_groups``: keeps a prompt when the std of its
    metric is > 0 or it has one response). The caller keeps sampling -- up to a bounded number of rounds --
    until enough informative groups fill the batch.

    Args:
        scores: ``[n]`` one score per response.
        group_index: ``[n]`` prompt id of each response (tensor or sequence of hashables); every response
            of a group must be in ``scores``.
        n_samples_per_prompt: alternative to ``group_index`` when the responses of a prompt are contiguous.
        atol: scores closer than this (max - min <= atol) count as equal; >= 0.
        keep_singletons: treat a group of one response as informative.

    Returns:
        ``[n]`` bool, True for the responses to keep.

    Raises:
        ValueError: if ``scores`` is not 1-D or holds nan, on a missing or mismatched grouping, or a
            negative ``atol``.
    """
    s = _require_tensor("scores", scores)
    if s.dim() != 1:
        raise ValueError(f"scores must be 1-D [n], got shape {_shape(s)}")
    if bool(torch.isnan(s).any()):
        raise ValueError("scores must not hold nan")
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    s = _upcast(s.detach())
    ids = _group_ids(s.shape[0], group_index, n_samples_per_prompt, s.device)
    if s.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=s.device)
    n_groups = int(ids.max().item()) + 1
    high = torch.full((n_groups,), -math.inf, dtype=s.dtype, device=s.device).scatter_reduce(0, ids, s, "amax")
    low = torch.full((n_groups,), math.inf, dtype=s.dtype, device=s.device).scatter_reduce(0, ids, s, "amin")
    keep = (high - low) > atol
    if keep_singletons:
        size = torch.zeros(n_groups, dtype=torch.long, device=s.device).index_add_(0, ids, torch.ones_like(ids))
        keep = keep | (size == 1)
    return keep[ids]


def overlong_penalty(
    response_lengths: Tensor,
    max_response_length: int,
    overlong_buffer_len: int,
    penalty_factor: float = 1.0,
) -> Tensor:
    """DAPO's soft overlong punishment, a reward added to the score of each response.

    With ``L_max = max_response_length``, ``L_cache = overlong_buffer_len`` and ``|y|`` the response
    length in tokens::

        R_length(y) = 0                                              |y| <= L_max - L_cache
                    = -penalty_factor * (|y| - (L_max - L_cache)) / L_cache    L_max - L_cache < |y| <= L_max
                    = -penalty_factor                                |y| > L_max

    i.e. 0 up to ``L_max - L_cache`` tokens, then linear down to ``-penalty_factor`` at ``L_max``.

    Source: Yu et al. 2025, "DAPO", section 3.4, eq. 13 (``penalty_factor = 1``; their run uses
    ``L_max = 20480``, ``L_cache = 4096``); verl's DAPO reward manager (``overlong_buffer.len``,
    ``overlong_buffer.penalty_factor``; identical for ``|y| <= L_max``, the only lengths a sampler capped at
    ``L_max`` produces, and without the floor at ``-penalty_factor`` beyond it).

    Args:
        response_lengths: ``[batch]`` response lengths in tokens (integer or float, >= 0), e.g.
            ``response_mask.sum(-1)``.
        max_response_length: ``L_max``, the response budget in tokens, >= 1.
        overlong_buffer_len: ``L_cache`` in tokens, in ``[1, max_response_length]``.
        penalty_factor: the penalty at ``L_max``, >= 0.

    Returns:
        ``[batch]`` float32 (float64 stays float64) rewards, <= 0.

    Raises:
        ValueError: if ``response_lengths`` is not 1-D or has negative or non-finite entries, or on invalid
            lengths or factor.
    """
    lengths = _require_tensor("response_lengths", response_lengths)
    if lengths.dim() != 1:
        raise ValueError(f"response_lengths must be 1-D [batch], got shape {_shape(lengths)}")
    x = _upcast(lengths.detach())
    if bool((~torch.isfinite(x) | (x < 0)).any()):
        raise ValueError("response_lengths must be finite and >= 0")
    if int(max_response_length) != max_response_length or max_response_length < 1:
        raise ValueError(f"max_response_length must be an integer >= 1, got {max_response_length}")
    if int(overlong_buffer_len) != overlong_buffer_len or not 1 <= overlong_buffer_len <= max_response_length:
        raise ValueError(
            f"overlong_buffer_len must be an integer in [1, max_response_length={max_response_length}], "
            f"got {overlong_buffer_len}"
        )
    factor = _as_float("penalty_factor", penalty_factor)
    if factor < 0:
        raise ValueError(f"penalty_factor must be >= 0, got {factor}")
    expected = max_response_length - overlong_buffer_len
    return -factor * ((x - expected) / overlong_buffer_len).clamp(0.0, 1.0)


def overlong_filter_mask(response_mask: Tensor, has_eos: Tensor) -> Tensor:
    """DAPO's overlong filtering: the loss mask without the responses that were truncated.

    A response that reached the budget without a stop token (EOS or another stop id) is cut short; its
    score judges an unfinished answer, so DAPO drops it from the loss. The returned mask is
    ``response_mask`` with the rows where ``has_eos`` is False set to 0. Use it for the loss and for
    :func:`loss_token_counts` alike, so the global normalisers count only the kept responses.

    Source: Yu et al. 2025, "DAPO", section 3.4 ("Overlong Filtering", masking the loss of truncated
    samples).

    Args:
        response_mask: ``[batch, response_len]`` 0/1.
        has_eos: ``[batch]`` 0/1 or bool, whether each response ended with a stop token.

    Returns:
        ``[batch, response_len]`` mask of ``response_mask``'s dtype.

    Raises:
        ValueError: on a bad mask or a ``has_eos`` that is not ``[batch]`` 0/1.
    """
    m = _as_mask("response_mask", _check_2d("response_mask", response_mask))
    eos = _as_mask("has_eos", has_eos, torch.Size([m.shape[0]]))
    return (m & eos.unsqueeze(-1)).to(response_mask.dtype)


# ----------------------------------------------------------------------------------------------------------
# 6. Loss aggregation
# ----------------------------------------------------------------------------------------------------------

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
"""Valid ``loss_agg_mode`` values of :func:`agg_loss` (and of every loss that aggregates with it)."""


def loss_token_counts(response_mask: Tensor) -> Tensor:
    """Local normalisers of :func:`agg_loss`: ``[number of valid tokens, number of non-empty sequences]``.

    The trainer sums this over all micro-batches of a mini-batch and all-reduces it (SUM) over the DP
    group, then passes the two entries as ``global_token_count`` and ``global_seq_count``.

    Args:
        response_mask: ``[batch, response_len]`` 0/1.

    Returns:
        int64 tensor of shape ``[2]``.

    Raises:
        ValueError: on a tensor that is not 2-D or a mask that is not 0/1.
    """
    m = _as_mask("response_mask", _check_2d("response_mask", response_mask))
    return torch.stack([m.sum(), m.any(dim=-1).sum()]).to(torch.int64)


def _normaliser(count: Optional[Count], local: Tensor, like: Tensor) -> Tensor:
    if count is None:
        count = local
    count = torch.as_tensor(count, device=like.device).to(like.dtype)
    if count.numel() != 1:
        raise ValueError(f"global counts must be scalars, got shape {_shape(count)}")
    return count.reshape(()).clamp(min=1)


def _check_norm_length(norm_length: Optional[float]) -> float:
    if norm_length is None:
        raise ValueError(
            "loss_agg_mode 'seq-mean-token-sum-norm' needs norm_length, a constant number of tokens such as the "
            "response budget (max_new_tokens)"
        )
    value = _as_float("norm_length", norm_length)
    if value <= 0:
        raise ValueError(f"norm_length must be > 0, got {value}")
    return value


def agg_loss(
    loss_mat: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    global_token_count: Optional[Count] = None,
    global_seq_count: Optional[Count] = None,
    norm_length: Optional[float] = None,
) -> Tensor:
    """Reduces a per-token loss to a scalar.

    With ``n_i`` the valid tokens of sequence ``i``, ``N = sum_i n_i`` and ``S`` the number of non-empty
    sequences:

    * ``token-mean``: ``sum_i sum_t mask * l / N`` (TRL, MindSpeed-LLM; DAPO's token-level loss, Yu et al.
      2025, eq. 12).
    * ``seq-mean-token-mean``: ``sum_i (sum_t mask * l / n_i) / S`` (GRPO, Shao et al. 2024, eq. 3; the
      GSPO objectives, Zheng et al. 2025, eqs. 5 and 13).
    * ``seq-mean-token-sum``: ``sum_i (sum_t mask * l) / S``.
    * ``seq-mean-token-sum-norm``: ``sum_i (sum_t mask * l / L) / S`` with the constant ``L = norm_length``
      (Dr. GRPO, Liu et al. 2025, section 3.2: the ``1/|o_i|`` of GRPO is replaced by one constant for every
      response, in their code the generation budget). ``L`` must not change between micro-batches, DP
      ranks or iterations, so it is passed in (normally ``max_new_tokens``) rather than read from the
      padded width of ``loss_mat``, which in this project is the longest response of a rollout.

    Without global counts ``N``/``S`` are those of this batch. With ``global_token_count`` /
    ``global_seq_count`` (summed over all micro-batches of the mini-batch and all DP ranks, see
    :func:`loss_token_counts`) the function returns this micro-batch's share ``sum / global``, and the sum
    of the shares is exactly the full-mini-batch loss; the module docstring explains why. All-masked
    sequences contribute nothing and are not counted; an all-masked batch gives 0 (not ``nan``).

    Source: verl ``agg_loss``; OpenRLHF ``aggregate_loss`` (global normalisation). verl's
    ``seq-mean-token-sum-norm`` returns ``sum_i (sum_t mask * l) / L`` for the micro-batch, without the
    ``1 / S``, and defaults ``L`` (its ``loss_scale_factor``) to the padded width; its actor then divides by
    the number of gradient-accumulation steps, so its loss is this one times the micro-batch size (same
    gradient direction, a different scale, which matters for gradient clipping).

    Args:
        loss_mat: ``[batch, response_len]`` per-token loss.
        response_mask: ``[batch, response_len]`` 0/1.
        loss_agg_mode: one of ``LOSS_AGG_MODES``.
        global_token_count: total valid tokens of the mini-batch (int, float or 0-dim tensor).
        global_seq_count: total non-empty sequences of the mini-batch.
        norm_length: ``L`` of ``seq-mean-token-sum-norm``, in tokens, > 0; ignored by the other modes.

    Returns:
        0-dim tensor (at least float32), differentiable w.r.t. ``loss_mat``.

    Raises:
        ValueError: for an unknown mode (lists valid ones), shape mismatches, a bad mask, or a missing or
            non-positive ``norm_length`` with ``seq-mean-token-sum-norm``.
    """
    _check_name("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    _check_2d("loss_mat", loss_mat)
    _check_same_shape("loss_mat", loss_mat, response_mask=response_mask)
    m = _as_mask("response_mask", response_mask)
    length = _check_norm_length(norm_length) if loss_agg_mode == "seq-mean-token-sum-norm" else None
    x = torch.where(m, _upcast(loss_mat), 0.0)
    if loss_agg_mode == "token-mean":
        return x.sum() / _normaliser(global_token_count, m.sum(), x)
    tokens_per_seq = m.sum(dim=-1)
    seq_loss = x.sum(dim=-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_loss = seq_loss / tokens_per_seq.clamp(min=1).to(x.dtype)
    elif length is not None:
        seq_loss = seq_loss / length
    return seq_loss.sum() / _normaliser(global_seq_count, (tokens_per_seq > 0).sum(), x)


# ----------------------------------------------------------------------------------------------------------
# 7. Losses
# ----------------------------------------------------------------------------------------------------------

PolicyLossFn = Callable[..., Tuple[Tensor, Metrics]]
POLICY_LOSS_REGISTRY: Dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator registering a policy loss under ``name`` (verl's ``register_policy_loss``).

    A registered function takes keyword arguments only: ``log_probs``, ``old_log_probs``, ``advantages``,
    ``response_mask`` (all ``[batch, response_len]``), the clip settings ``clip_ratio``, ``clip_ratio_low``,
    ``clip_ratio_high``, ``clip_ratio_c``, the aggregation settings ``loss_agg_mode``,
    ``global_token_count``, ``global_seq_count``, ``norm_length`` (see :func:`agg_loss`) and
    ``token_weights`` (an optional ``[batch, response_len]`` factor applied to the per-token loss before
    aggregation); it returns ``(loss, metrics)``.

    Raises:
        ValueError: if ``name`` is already taken by another function.
    """
    return _registrar(POLICY_LOSS_REGISTRY, "policy loss", [name])


def get_policy_loss_fn(name: str) -> PolicyLossFn:
    """Returns the policy loss registered as ``name``.

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    return POLICY_LOSS_REGISTRY[_check_name("policy loss", name, list(POLICY_LOSS_REGISTRY))]


def _clip_range(
    clip_ratio: float,
    clip_ratio_low: Optional[float],
    clip_ratio_high: Optional[float],
    clip_ratio_c: Optional[float],
) -> Tuple[float, float]:
    """Validated ``(low, high)`` clip epsilons; each side defaults to ``clip_ratio``."""
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    if not 0 <= low < 1:
        raise ValueError(f"clip_ratio_low must be in [0, 1), got {low}")
    if high < 0:
        raise ValueError(f"clip_ratio_high must be >= 0, got {high}")
    if clip_ratio_c is not None and clip_ratio_c <= 1:
        raise ValueError(f"clip_ratio_c must be > 1 (or None to disable dual-clip), got {clip_ratio_c}")
    return low, high


def _policy_inputs(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    token_weights: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Validates the inputs of a policy loss; returns ``(mask, log_ratio, advantages, weights)``.

    Pads are set to neutral values (log-ratio 0, advantage 0, weight 0), so that garbage there (-inf, nan)
    reaches neither the loss nor, through exp's backward, the gradient; TRL writes 1.0 at pads for this.
    The weights are detached.
    """
    _check_2d("log_probs", log_probs)
    _check_same_shape(
        "log_probs",
        log_probs,
        old_log_probs=old_log_probs,
        advantages=advantages,
        response_mask=response_mask,
        token_weights=token_weights,
    )
    m = _as_mask("response_mask", response_mask)
    log_ratio = torch.where(m, _upcast(log_probs) - _upcast(old_log_probs), 0.0)
    adv = torch.where(m, _upcast(advantages), 0.0)
    weights = None
    if token_weights is not None:
        weights = torch.where(m, _upcast(token_weights.detach()), 0.0)
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("token_weights must be finite and >= 0 at valid tokens")
    return m, log_ratio, adv, weights


def _clipped_surrogate(
    ratio: Tensor, adv: Tensor, low: float, high: float, clip_ratio_c: Optional[float]
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-token ``max(-A r, -A clip(r))`` with the optional dual clip; see :func:`vanilla_policy_loss`.

    Returns ``(losses, losses1, losses2, clipped_ratio, dual_clipped)``, all shaped like ``ratio``.
    """
    clipped_ratio = torch.clamp(ratio, 1.0 - low, 1.0 + high)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * clipped_ratio
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    dual_clipped = torch.zeros_like(pg_losses, dtype=torch.bool)
    if clip_ratio_c is not None:
        pg_losses3 = -adv * clip_ratio_c
        dual_clipped = (adv < 0) & (pg_losses > pg_losses3)
        pg_losses = torch.where(adv < 0, torch.minimum(pg_losses, pg_losses3), pg_losses)
    return pg_losses, pg_losses1, pg_losses2, clipped_ratio, dual_clipped


def _aggregate_policy_loss(
    pg_losses: Tensor,
    surrogate: Tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    ratio: Tensor,
    log_ratio: Tensor,
    m: Tensor,
    weights: Optional[Tensor],
    loss_agg_mode: str,
    global_token_count: Optional[Count],
    global_seq_count: Optional[Count],
    norm_length: Optional[float],
) -> Tuple[Tensor, Metrics]:
    """Applies the token weights, aggregates, and computes the metrics shared by every policy loss."""
    _, pg_losses1, pg_losses2, clipped_ratio, dual_clipped = surrogate
    if weights is not None:
        pg_losses = pg_losses * weights
    loss = agg_loss(pg_losses, m, loss_agg_mode, global_token_count, global_seq_count, norm_length)
    with torch.no_grad():
        metrics: Metrics = {
            "pg_loss": agg_loss(pg_losses, m, loss_agg_mode, norm_length=norm_length),
            "abs_pg_loss": masked_mean(torch.maximum(pg_losses1.abs(), pg_losses2.abs()), m),
            "ppo_ratio": masked_mean(ratio, m),
            "ppo_ratio_clamped": masked_mean(clipped_ratio, m),
            "pg_clipfrac": masked_mean((pg_losses2 > pg_losses1).to(pg_losses.dtype), m),
            "pg_clipfrac_lower": masked_mean(dual_clipped.to(pg_losses.dtype), m),
            "approx_kl": 0.5 * masked_mean(log_ratio.square(), m),
            "ppo_kl": masked_mean(-log_ratio, m),
        }
    return loss, {name: value.detach() for name, value in metrics.items()}


@register_policy_loss("vanilla")
def vanilla_policy_loss(
    *,
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_ratio: float = 0.2,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    clip_ratio_c: Optional[float] = 3.0,
    loss_agg_mode: str = "token-mean",
    global_token_count: Optional[Count] = None,
    global_seq_count: Optional[Count] = None,
    norm_length: Optional[float] = None,
    token_weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Metrics]:
    """PPO clipped surrogate with asymmetric clipping (DAPO's clip-higher) and dual-clip.

    ::

        r      = exp(log_probs - old_log_probs)                  (log-ratio clamped to +-20)
        l1     = -A * r
        l2     = -A * clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high)
        l      = max(l1, l2)
        l      = min(l, clip_ratio_c * |A|)   where A < 0        (dual-clip; skipped if clip_ratio_c is None)
        l      = l * token_weights                               (if given)
        loss   = agg_loss(l)

    With ``clip_ratio_c=None`` and ``token-mean`` this is minus DAPO's objective (Yu et al. 2025, eq. 8,
    clip-higher of section 3.1: ``eps_low = 0.2``, ``eps_high = 0.28``).

    Sources: Schulman et al. 2017 (PPO, eq. 7); Ye et al. 2020, "Mastering Complex Control in MOBA Games"
    (dual-clip); Yu et al. 2025, "DAPO" (asymmetric clip-higher); verl ``compute_policy_loss_vanilla``
    (which multiplies by its ``rollout_is_weights`` at the same place as ``token_weights``); TRL's
    ``pg_loss`` (identical when the dual clip is inactive).

    Args:
        log_probs: ``[batch, response_len]`` current policy log-probabilities (with gradient).
        old_log_probs: ``[batch, response_len]`` log-probabilities at rollout.
        advantages: ``[batch, response_len]``.
        response_mask: ``[batch, response_len]`` 0/1.
        clip_ratio: PPO epsilon, used for the side not given explicitly.
        clip_ratio_low: lower epsilon, in ``[0, 1)``; defaults to ``clip_ratio``.
        clip_ratio_high: upper epsilon, ``>= 0``; defaults to ``clip_ratio``.
        clip_ratio_c: dual-clip constant, ``> 1``; ``None`` disables dual-clip.
        loss_agg_mode: see :func:`agg_loss`.
        global_token_count: see :func:`agg_loss`.
        global_seq_count: see :func:`agg_loss`.
        norm_length: see :func:`agg_loss` (``seq-mean-token-sum-norm`` only).
        token_weights: optional ``[batch, response_len]`` factors >= 0, e.g. rollout-correction weights
            (:func:`rollout_correction_weights`); detached here, so they scale the gradient of each token
            and never receive one.

    Returns:
        ``(loss, metrics)``; ``loss`` is a differentiable 0-dim tensor. ``metrics`` (detached, local masked
        means over valid tokens): ``pg_loss`` (the weighted loss aggregated over this batch with local
        counts), ``abs_pg_loss`` (MindSpeed-LLM: mean of ``max(|l1|, |l2|)``, unweighted), ``ppo_ratio``
        (mean ``r``), ``ppo_ratio_clamped`` (mean clipped ``r``), ``pg_clipfrac`` (fraction with
        ``l2 > l1``), ``pg_clipfrac_lower`` (fraction capped by dual-clip), ``approx_kl`` (TRL's estimator
        ``0.5 * mean((log_probs - old_log_probs)**2)``, here over valid tokens; TRL averages over the padded
        buffer, see docs/trl_ppo.md), ``ppo_kl`` (verl: ``mean(old_log_probs - log_probs)``).

    Raises:
        ValueError: on shape mismatches, a bad mask, an invalid clip setting or aggregation mode, or
            negative / non-finite ``token_weights``.
    """
    low, high = _clip_range(clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c)
    m, log_ratio, adv, weights = _policy_inputs(log_probs, old_log_probs, advantages, response_mask, token_weights)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    surrogate = _clipped_surrogate(ratio, adv, low, high, clip_ratio_c)
    return _aggregate_policy_loss(
        surrogate[0], surrogate, ratio, log_ratio, m, weights, loss_agg_mode, global_token_count,
        global_seq_count, norm_length,
    )


def _sequence_log_ratio(log_ratio: Tensor, m: Tensor) -> Tensor:
    """``[batch]`` mean log-ratio over the valid tokens of each row (0 for an all-masked row)."""
    return log_ratio.sum(dim=-1) / m.sum(dim=-1).clamp(min=1).to(log_ratio.dtype)


@register_policy_loss("gspo")
def gspo_policy_loss(
    *,
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_ratio: float = 0.2,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    clip_ratio_c: Optional[float] = None,
    loss_agg_mode: str = "seq-mean-token-mean",
    global_token_count: Optional[Count] = None,
    global_seq_count: Optional[Count] = None,
    norm_length: Optional[float] = None,
    token_weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Metrics]:
    """GSPO: one importance ratio per response, clipped per response.

    Source: Zheng et al. 2025, "Group Sequence Policy Optimization" (arXiv:2507.18071), eqs. 5 and 7::

        s_i    = (pi(y_i) / pi_old(y_i)) ** (1 / |y_i|)
               = exp( (1 / |y_i|) * sum_{t valid} (log_probs - old_log_probs) )    (clamped to exp(+-20))
        l_it   = max(-A_it * s_i, -A_it * clip(s_i, 1 - clip_ratio_low, 1 + clip_ratio_high))
        loss   = agg_loss(l * token_weights)

    ``s_i`` carries the gradient of every token of response ``i``. The paper's objective (eq. 5) is
    ``(1/G) sum_i min(s_i A_i, clip(s_i) A_i)``, a mean over responses; written per token, that is the
    default ``loss_agg_mode="seq-mean-token-mean"`` (every token of a response holds the same ``l_i``).
    verl's ``compute_policy_loss_gspo`` is the token form (:func:`gspo_token_policy_loss`, equal to this one
    for sequence-level advantages) and always aggregates with ``seq-mean-token-mean``, whatever
    ``loss_agg_mode`` says; here another mode is honoured (``token-mean`` weighs a response by its length).
    GSPO expects sequence-level advantages ``A_i`` (constant over a response, as ``grpo``, ``dr_grpo`` and
    ``rloo`` give); token-varying advantages are used token by token with the shared ``s_i``.

    Clip range: ``s_i`` is a geometric mean of token ratios and stays close to 1, so the epsilons are
    orders of magnitude smaller than PPO's: the paper uses ``clip_ratio_low = 3e-4`` and
    ``clip_ratio_high = 4e-4`` (PPO's 0.2 would almost never clip). The dual clip is off by default (the
    paper has none); when ``clip_ratio_c`` is given it bounds ``-A_i * s_i`` for ``A_i < 0`` as in
    :func:`vanilla_policy_loss`.

    Args:
        log_probs: ``[batch, response_len]`` current policy log-probabilities (with gradient).
        old_log_probs: ``[batch, response_len]`` log-probabilities at rollout.
        advantages: ``[batch, response_len]``, normally constant along each response.
        response_mask: ``[batch, response_len]`` 0/1.
        clip_ratio: epsilon for the side not given explicitly.
        clip_ratio_low: lower epsilon, in ``[0, 1)``; defaults to ``clip_ratio``.
        clip_ratio_high: upper epsilon, ``>= 0``; defaults to ``clip_ratio``.
        clip_ratio_c: dual-clip constant, ``> 1``, or ``None`` (default: off).
        loss_agg_mode: see :func:`agg_loss`; default ``seq-mean-token-mean`` (the paper's).
        global_token_count: see :func:`agg_loss`.
        global_seq_count: see :func:`agg_loss`.
        norm_length: see :func:`agg_loss`.
        token_weights: optional ``[batch, response_len]`` factors >= 0, detached (see
            :func:`vanilla_policy_loss`).

    Returns:
        ``(loss, metrics)`` with the metric names of :func:`vanilla_policy_loss`; ``ppo_ratio`` and
        ``ppo_ratio_clamped`` average ``s_i`` over valid tokens, ``pg_clipfrac`` is the fraction of valid
        tokens whose response is clipped (the paper's "fraction of clipped tokens"), ``approx_kl`` and
        ``ppo_kl`` use the token log-ratios.

    Raises:
        ValueError: as :func:`vanilla_policy_loss`.
    """
    low, high = _clip_range(clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c)
    m, log_ratio, adv, weights = _policy_inputs(log_probs, old_log_probs, advantages, response_mask, token_weights)
    seq_log_ratio = _sequence_log_ratio(log_ratio, m).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(seq_log_ratio).unsqueeze(-1).expand_as(log_ratio)
    surrogate = _clipped_surrogate(ratio, adv, low, high, clip_ratio_c)
    return _aggregate_policy_loss(
        surrogate[0], surrogate, ratio, log_ratio, m, weights, loss_agg_mode, global_token_count,
        global_seq_count, norm_length,
    )


@register_policy_loss("gspo_token")
def gspo_token_policy_loss(
    *,
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_ratio: float = 0.2,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    clip_ratio_c: Optional[float] = None,
    loss_agg_mode: str = "seq-mean-token-mean",
    global_token_count: Optional[Count] = None,
    global_seq_count: Optional[Count] = None,
    norm_length: Optional[float] = None,
    token_weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Metrics]:
    """GSPO-token: GSPO's sequence ratio as the value, one token's gradient per term.

    Source: Zheng et al. 2025 (GSPO), eqs. 13-14; verl ``compute_policy_loss_gspo`` (whose "gspo" is this
    token form)::

        s_it   = sg[s_i] * pi(y_it) / sg[pi(y_it)]          (sg = stop-gradient; value s_i, see gspo)
        l_it   = max(-A_it * s_it, -A_it * clip(s_it, 1 - clip_ratio_low, 1 + clip_ratio_high))
        loss   = agg_loss(l * token_weights)                 (default seq-mean-token-mean, eq. 13)

    ``s_it`` equals ``s_i`` in value, so the clipping decisions are GSPO's, but its gradient is
    ``s_i * grad log pi(y_it)``: a token-level advantage ``A_it`` steers only its own token. With
    ``A_it = A_i`` along each response and ``seq-mean-token-mean``, loss and gradient equal
    :func:`gspo_policy_loss`'s, as the paper notes. ``sg[log s_i]`` is clamped to ``+-20``.

    Args:
        log_probs: ``[batch, response_len]`` current policy log-probabilities (with gradient).
        old_log_probs: ``[batch, response_len]`` log-probabilities at rollout.
        advantages: ``[batch, response_len]`` token-level advantages.
        response_mask: ``[batch, response_len]`` 0/1.
        clip_ratio: epsilon for the side not given explicitly.
        clip_ratio_low: lower epsilon, in ``[0, 1)`` (paper: 3e-4); defaults to ``clip_ratio``.
        clip_ratio_high: upper epsilon, ``>= 0`` (paper: 4e-4); defaults to ``clip_ratio``.
        clip_ratio_c: dual-clip constant, ``> 1``, or ``None`` (default: off).
        loss_agg_mode: see :func:`agg_loss`; default ``seq-mean-token-mean`` (the paper's).
        global_token_count: see :func:`agg_loss`.
        global_seq_count: see :func:`agg_loss`.
        norm_length: see :func:`agg_loss`.
        token_weights: optional ``[batch, response_len]`` factors >= 0, detached.

    Returns:
        ``(loss, metrics)`` as :func:`gspo_policy_loss`.

    Raises:
        ValueError: as :func:`vanilla_policy_loss`.
    """
    low, high = _clip_range(clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c)
    m, log_ratio, adv, weights = _policy_inputs(log_probs, old_log_probs, advantages, response_mask, token_weights)
    seq_log_ratio = _sequence_log_ratio(log_ratio, m).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    # log_ratio - sg[log_ratio] is 0 in value and has the gradient of log_probs.
    ratio = torch.exp(seq_log_ratio.unsqueeze(-1) + (log_ratio - log_ratio.detach()))
    surrogate = _clipped_surrogate(ratio, adv, low, high, clip_ratio_c)
    return _aggregate_policy_loss(
        surrogate[0], surrogate, ratio, log_ratio, m, weights, loss_agg_mode, global_token_count,
        global_seq_count, norm_length,
    )


def policy_loss_names() -> Tuple[str, ...]:
    """Names accepted by :func:`compute_policy_loss`, in registration order (for a CLI's ``choices``)."""
    return tuple(POLICY_LOSS_REGISTRY)


def compute_policy_loss(
    name: str,
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    **options: object,
) -> Tuple[Tensor, Metrics]:
    """Policy loss with the function registered as ``name``.

    ``"vanilla"``: :func:`vanilla_policy_loss` (PPO / GRPO / DAPO); ``"gspo"``: :func:`gspo_policy_loss`;
    ``"gspo_token"``: :func:`gspo_token_policy_loss`.

    Args:
        name: registered policy loss name.
        log_probs: ``[batch, response_len]`` current log-probabilities.
        old_log_probs: ``[batch, response_len]`` rollout log-probabilities.
        advantages: ``[batch, response_len]``.
        response_mask: ``[batch, response_len]`` 0/1.
        **options: loss options, e.g. ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``,
            ``clip_ratio_c``, ``loss_agg_mode``, ``global_token_count``, ``global_seq_count``,
            ``norm_length``, ``token_weights``.

    Returns:
        ``(loss, metrics)`` as documented by the registered function.

    Raises:
        ValueError: for an unknown name (lists valid ones) or invalid inputs.
    """
    fn = get_policy_loss_fn(name)
    return fn(
        log_probs=log_probs,
        old_log_probs=old_log_probs,
        advantages=advantages,
        response_mask=response_mask,
        **options,
    )


def explained_variance(
    values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    reduce_fn: Optional[ReduceFn] = None,
) -> Tensor:
    """Masked explained variance ``1 - Var[returns - values] / Var[returns]``.

    1 is a perfect critic, 0 no better than a constant, negative worse. Returns 0 when ``Var[returns]`` is
    0 (nothing to explain). Source: cleanrl ``explained_var``; verl ``critic/vf_explained_var``.

    Args:
        values: ``[batch, response_len]`` predictions.
        returns: ``[batch, response_len]`` targets.
        response_mask: ``[batch, response_len]`` 0/1.
        reduce_fn: global statistics over the DP group (see :func:`masked_whiten`).

    Returns:
        Detached 0-dim tensor.

    Raises:
        ValueError: on shape mismatches or a bad mask.
    """
    _check_2d("values", values)
    _check_same_shape("values", values, returns=returns, response_mask=response_mask)
    m = _as_mask("response_mask", response_mask)
    with torch.no_grad():
        ret = _upcast(returns)
        _, var_returns, _ = _masked_moments(ret, m, reduce_fn or _identity)
        _, var_residual, _ = _masked_moments(ret - _upcast(values), m, reduce_fn or _identity)
        ev = 1.0 - var_residual / var_returns.clamp(min=torch.finfo(var_returns.dtype).tiny)
        return torch.where(var_returns > 0, ev, torch.zeros_like(ev))


def compute_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    cliprange_value: Optional[float] = 0.2,
    loss_agg_mode: str = "token-mean",
    global_token_count: Optional[Count] = None,
    global_seq_count: Optional[Count] = None,
    norm_length: Optional[float] = None,
) -> Tuple[Tensor, Metrics]:
    """Clipped value loss ``0.5 * max((V - R)**2, (V_clip - R)**2)``, ``V_clip = clip(V, V_old +- eps_v)``.

    Source: Schulman et al. 2017 / OpenAI baselines ``ppo2`` (value clipping); TRL's ``vf_loss``
    (``0.5 * masked_mean(max(...))``); MindSpeed-LLM ``vf_loss``.

    Args:
        values: ``[batch, response_len]`` current critic predictions (with gradient).
        old_values: ``[batch, response_len]`` critic values at rollout.
        returns: ``[batch, response_len]`` targets (:func:`compute_advantages`).
        response_mask: ``[batch, response_len]`` 0/1.
        cliprange_value: ``eps_v`` (> 0); ``None`` disables clipping.
        loss_agg_mode: see :func:`agg_loss`.
        global_token_count: see :func:`agg_loss`.
        global_seq_count: see :func:`agg_loss`.
        norm_length: see :func:`agg_loss`.

    Returns:
        ``(loss, metrics)``; ``metrics`` (detached, local): ``vf_loss`` (loss with local counts),
        ``vf_clipfrac`` (fraction of tokens where the clipped term is larger), ``explained_variance``,
        ``vpred_mean`` (mean prediction).

    Raises:
        ValueError: on shape mismatches, a bad mask, a non-positive ``cliprange_value`` or bad mode.
    """
    _check_2d("values", values)
    _check_same_shape("values", values, old_values=old_values, returns=returns, response_mask=response_mask)
    m = _as_mask("response_mask", response_mask)
    if cliprange_value is not None and cliprange_value <= 0:
        raise ValueError(f"cliprange_value must be > 0 or None, got {cliprange_value}")
    v, old_v, ret = (torch.where(m, _upcast(t), 0.0) for t in (values, old_values, returns))
    if cliprange_value is None:
        v_clipped = v
    else:
        v_clipped = torch.clamp(v, old_v - cliprange_value, old_v + cliprange_value)
    vf_losses1 = (v - ret).square()
    vf_losses2 = (v_clipped - ret).square()
    vf_losses = 0.5 * torch.maximum(vf_losses1, vf_losses2)
    loss = agg_loss(vf_losses, m, loss_agg_mode, global_token_count, global_seq_count, norm_length)
    with torch.no_grad():
        metrics: Metrics = {
            "vf_loss": agg_loss(vf_losses, m, loss_agg_mode, norm_length=norm_length).detach(),
            "vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).to(vf_losses.dtype), m),
            "explained_variance": explained_variance(v, ret, m),
            "vpred_mean": masked_mean(v, m),
        }
    return loss, {name: value.detach() for name, value in metrics.items()}


def compute_entropy_loss(
    entropy: Tensor,
    response_mask: Tensor,
    entropy_coef: float,
    loss_agg_mode: str = "token-mean",
    global_token_count: Optional[Count] = None,
    global_seq_count: Optional[Count] = None,
    norm_length: Optional[float] = None,
) -> Tuple[Tensor, Metrics]:
    """Entropy bonus as a loss term: ``-entropy_coef * agg(entropy)`` (add it to the policy loss).

    Minimising it maximises the policy entropy. Source: Schulman et al. 2017 (PPO, eq. 9, ``c2 * S``);
    verl ``entropy_coeff``.

    Args:
        entropy: ``[batch, response_len]`` per-token entropy in nats (``posttrain.parallel.vocab_parallel_entropy``).
        response_mask: ``[batch, response_len]`` 0/1.
        entropy_coef: coefficient, >= 0.
        loss_agg_mode: see :func:`agg_loss`.
        global_token_count: see :func:`agg_loss`.
        global_seq_count: see :func:`agg_loss`.
        norm_length: see :func:`agg_loss`.

    Returns:
        ``(loss, metrics)``; ``metrics["entropy"]`` is the local masked mean entropy (nats).

    Raises:
        ValueError: on shape mismatches, a bad mask or mode.
    """
    loss = -entropy_coef * agg_loss(
        entropy, response_mask, loss_agg_mode, global_token_count, global_seq_count, norm_length
    )
    with torch.no_grad():
        metrics = {"entropy": masked_mean(entropy, response_mask).detach()}
    return loss, metrics


def compute_kl_loss(
    log_probs: Tensor,
    ref_log_probs: Tensor,
    response_mask: Tensor,
    kl_loss_coef: float = 0.001,
    kl_estimator: str = "low_var_kl",
    kl_clamp: Optional[float] = 10.0,
    loss_agg_mode: str = "token-mean",
    global_token_count: Optional[Count] = None,
    global_seq_count: Optional[Count] = None,
    norm_length: Optional[float] = None,
) -> Tuple[Tensor, Metrics]:
    """KL to the reference policy as a loss term, the alternative to the KL penalty in the reward.

    ``loss = kl_loss_coef * agg(kl_penalty(kl_estimator, log_probs, ref_log_probs, clamp=kl_clamp))``.
    Source: Shao et al. 2024 (GRPO puts the KL in the loss); verl ``use_kl_loss`` (defaults
    ``low_var_kl``, coefficient 0.001, clamp 10).

    Args:
        log_probs: ``[batch, response_len]`` current log-probabilities (with gradient).
        ref_log_probs: ``[batch, response_len]`` reference log-probabilities.
        response_mask: ``[batch, response_len]`` 0/1.
        kl_loss_coef: coefficient.
        kl_estimator: registered KL estimator name.
        kl_clamp: clamp of the per-token estimate (nats); ``None`` disables.
        loss_agg_mode: see :func:`agg_loss`.
        global_token_count: see :func:`agg_loss`.
        global_seq_count: see :func:`agg_loss`.
        norm_length: see :func:`agg_loss`.

    Returns:
        ``(loss, metrics)``; ``metrics["kl_loss"]`` is the local aggregated KL (nats, before the coefficient).

    Raises:
        ValueError: on an unknown estimator, shape mismatches, a bad mask or mode.
    """
    _check_2d("log_probs", log_probs)
    _check_same_shape("log_probs", log_probs, ref_log_probs=ref_log_probs, response_mask=response_mask)
    m = _as_mask("response_mask", response_mask)
    # Neutral values at pads keep garbage there out of the estimator's backward (see vanilla_policy_loss).
    lp, ref_lp = torch.where(m, _upcast(log_probs), 0.0), torch.where(m, _upcast(ref_log_probs), 0.0)
    kl = kl_penalty(kl_estimator, lp, ref_lp, clamp=kl_clamp)
    loss = kl_loss_coef * agg_loss(
        kl, response_mask, loss_agg_mode, global_token_count, global_seq_count, norm_length
    )
    with torch.no_grad():
        metrics = {"kl_loss": agg_loss(kl, response_mask, loss_agg_mode, norm_length=norm_length).detach()}
    return loss, metrics


def compute_ptx_loss(
    log_probs: Tensor,
    ptx_mask: Tensor,
    ptx_coef: float,
    global_token_count: Optional[Count] = None,
) -> Tuple[Tensor, Metrics]:
    """Pretraining-mix loss: ``ptx_coef * cross_entropy = -ptx_coef * token_mean(log pi(x))``.

    Source: Ouyang et al. 2022 (InstructGPT, eq. 2: ``+ gamma * E_{x ~ D_pretrain}[log pi(x)]`` in the
    objective, i.e. ``-gamma * ...`` in the loss); OpenRLHF ``ptx_coef``.

    Args:
        log_probs: ``[batch, seq_len]`` log-probabilities of the pretraining tokens (with gradient).
        ptx_mask: ``[batch, seq_len]`` 0/1, 1 for tokens that count.
        ptx_coef: coefficient gamma.
        global_token_count: total counted pretraining tokens of the mini-batch (see :func:`agg_loss`).

    Returns:
        ``(loss, metrics)``; ``metrics["ptx_loss"]`` is the local mean cross-entropy (nats per token).

    Raises:
        ValueError: on shape mismatches or a bad mask.
    """
    _check_2d("log_probs", log_probs)
    _check_same_shape("log_probs", log_probs, ptx_mask=ptx_mask)
    m = _as_mask("ptx_mask", ptx_mask)
    cross_entropy = -_upcast(log_probs)
    loss = ptx_coef * agg_loss(cross_entropy, m, "token-mean", global_token_count)
    with torch.no_grad():
        metrics = {"ptx_loss": masked_mean(cross_entropy, m).detach()}
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# 8. Rollout / training mismatch
# ----------------------------------------------------------------------------------------------------------

ROLLOUT_CORRECTION_MODES = ("none", "tis", "mis")
"""Valid ``mode`` values of :func:`rollout_correction_weights`."""


def _mismatch_inputs(old_log_probs: Tensor, sampler_log_probs: Tensor, response_mask: Tensor) -> Tuple[Tensor, Tensor]:
    """``(mask, log_ratio)`` with ``log_ratio = old_log_probs - sampler_log_probs`` (0 at pads), detached."""
    _check_2d("old_log_probs", old_log_probs)
    _check_same_shape("old_log_probs", old_log_probs, sampler_log_probs=sampler_log_probs, response_mask=response_mask)
    m = _as_mask("response_mask", response_mask)
    log_ratio = torch.where(m, _upcast(old_log_probs.detach()) - _upcast(sampler_log_probs.detach()), 0.0)
    return m, log_ratio


def rollout_mismatch_metrics(old_log_probs: Tensor, sampler_log_probs: Tensor, response_mask: Tensor) -> Metrics:
    """How far the sampler's log-probabilities are from the training forward's, on the sampled tokens.

    The sampler (inference kernels, KV cache, possibly another precision) and the training forward compute
    the same policy with different numerics; RL is then silently off-policy. With
    ``d = old_log_probs - sampler_log_probs`` over valid tokens:

    * ``mismatch_abs_diff_mean`` / ``mismatch_abs_diff_max``: mean and max of ``|d|`` (nats);
    * ``mismatch_kl``: ``KL(pi_sampler || pi_old)`` estimated with k3, ``mean((r - 1) - log r)``,
      ``r = pi_old / pi_sampler = exp(d)`` -- unbiased because the tokens were drawn from the sampler, and
      >= 0 (Schulman 2020; verl ``compute_offpolicy_metrics``' ``k3_kl``);
    * ``mismatch_kl_k1``: the k1 estimate ``mean(-d)`` of the same KL (unbiased, can be negative; verl's
      ``kl``).

    Both log-probabilities must be at the same sampling temperature. Metrics are local to the tensors
    passed in; an all-masked input gives zeros.

    Args:
        old_log_probs: ``[batch, response_len]`` log-probabilities of the sampled tokens from the training
            forward before the update (``pi_old``).
        sampler_log_probs: ``[batch, response_len]`` the same tokens' log-probabilities reported by the
            sampler.
        response_mask: ``[batch, response_len]`` 0/1.

    Returns:
        dict of detached 0-dim float32 tensors (nats).

    Raises:
        ValueError: on shape mismatches or a bad mask.
    """
    m, log_ratio = _mismatch_inputs(old_log_probs, sampler_log_probs, response_mask)
    with torch.no_grad():
        abs_diff = log_ratio.abs()
        # k3 depends only on ref_log_probs - log_probs, here log(pi_old / pi_sampler).
        k3 = kl_k3(torch.zeros_like(log_ratio), log_ratio)
        return {
            "mismatch_abs_diff_mean": masked_mean(abs_diff, m),
            "mismatch_abs_diff_max": abs_diff.amax() if abs_diff.numel() else abs_diff.new_zeros(()),
            "mismatch_kl": masked_mean(k3, m),
            "mismatch_kl_k1": masked_mean(-log_ratio, m),
        }


def rollout_correction_weights(
    old_log_probs: Tensor,
    sampler_log_probs: Tensor,
    response_mask: Tensor,
    mode: str = "tis",
    cap: float = 2.0,
) -> Tuple[Tensor, Metrics]:
    """Per-token importance weights ``pi_old / pi_sampler`` that correct for the sampler mismatch.

    With ``rho = exp(old_log_probs - sampler_log_probs)`` (log clamped to ``+-20``) on the sampled tokens:

    * ``tis`` (truncated importance sampling): ``w = min(rho, cap)``. Source: Yao et al. 2025, "Your
      Efficient RL Framework Secretly Brings You Off-Policy RL Training"; verl ``rollout_is="token"`` with
      ``rollout_is_threshold`` (default 2.0); slime ``--use-tis --tis-clip 2.0`` (its ``--tis-clip-low``
      defaults to 0, no lower bound, as here).
    * ``mis`` (masked importance sampling): ``w = rho`` where ``rho <= cap``, 0 elsewhere -- a token the
      trainer finds much likelier than the sampler did is dropped instead of capped. Source: Liu, Li et
      al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference
      Mismatch" (token-level MIS). verl's earlier ``rollout_is_mode="mask"`` zeroed weights outside
      ``[lower, cap]`` (lower defaulting to ``1 / cap``); current verl expresses masking as rejection
      sampling (``rollout_rs="token_k1"`` with lower and upper ratio bounds), which removes the rejected
      tokens from ``response_mask`` -- out of the loss *and* of the token count -- and leaves weight 1 on
      the kept ones unless TIS is also on. Here a masked token keeps its place in the normaliser with
      weight 0, and there is no lower bound.
    * ``none``: ``w = 1``.

    The weights multiply the per-token policy loss (``token_weights`` of every registered policy loss),
    as verl applies its rollout importance weights. They are detached: they change the measure the loss is
    averaged over, not the objective, so no gradient flows through them.

    Args:
        old_log_probs: ``[batch, response_len]`` training-forward log-probabilities before the update.
        sampler_log_probs: ``[batch, response_len]`` the sampler's log-probabilities of the same tokens.
        response_mask: ``[batch, response_len]`` 0/1.
        mode: one of ``ROLLOUT_CORRECTION_MODES``.
        cap: ``C`` > 0 (ignored by ``none``).

    Returns:
        ``(weights, metrics)``: ``weights`` is ``[batch, response_len]``, detached, float32 (float64 stays
        float64), 0 at pads. ``metrics`` (detached 0-dim, masked over valid tokens):
        ``rollout_is_weight_mean``, ``rollout_is_ratio_max`` (largest ``rho``), ``rollout_is_capped_frac``
        (fraction with ``rho > cap`` under ``tis``, else 0), ``rollout_is_masked_frac`` (the same under
        ``mis``, else 0).

    Raises:
        ValueError: for an unknown mode (lists the valid ones), a non-positive or non-finite ``cap``, shape
            mismatches or a bad mask.
    """
    _check_name("rollout correction mode", mode, ROLLOUT_CORRECTION_MODES)
    m, log_ratio = _mismatch_inputs(old_log_probs, sampler_log_probs, response_mask)
    if mode != "none":
        cap = _as_float("cap", cap)
        if cap <= 0:
            raise ValueError(f"cap must be > 0, got {cap}")
    with torch.no_grad():
        rho = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        over = m & (rho > cap) if mode != "none" else torch.zeros_like(m)
        if mode == "tis":
            weights = rho.clamp(max=cap)
        elif mode == "mis":
            weights = torch.where(over, 0.0, rho)
        else:
            weights = torch.ones_like(rho)
        weights = torch.where(m, weights, 0.0)
        zero = weights.new_zeros(())
        over_frac = masked_mean(over.to(weights.dtype), m)
        metrics: Metrics = {
            "rollout_is_weight_mean": masked_mean(weights, m),
            "rollout_is_ratio_max": torch.where(m, rho, 0.0).amax() if rho.numel() else zero,
            "rollout_is_capped_frac": over_frac if mode == "tis" else zero,
            "rollout_is_masked_frac": over_frac if mode == "mis" else zero,
        }
    return weights.detach(), metrics
