"""Tests of the reasoning-RL variants in posttrain.trl_ppo.core_algos: Dr. GRPO, GSPO, DAPO, rollout correction.

Every expected value is a direct transcription of the paper's equation written here as plain Python loops over
rows and tokens in float64 (or, for the gradients, the derivative of that equation worked out by hand); inputs are
float32 ragged batches and results must agree to 1e-6. No test compares the module with itself except where the
relation between two of its functions is the property under test (GSPO-token vs GSPO, weights of one vs none).
"""

import math

import pytest
import torch

from posttrain.trl_ppo import core_algos as ca
from tests.trl_ppo.test_core_algos import gen, lengths_mask, rows, run_ranks

ATOL = 1e-6


def close(actual, expected, atol=ATOL):
    """``actual`` (tensor) equals ``expected`` (nested Python floats) within ``atol``."""
    expected = torch.tensor(expected, dtype=torch.float64)
    actual = actual.detach().double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= atol, f"max abs error {err} > {atol}\nactual={actual}\nexpected={expected}"


def ragged_policy_batch(seed, lengths, width, log_ratio_scale=0.3, seq_adv=True):
    """float32 log-probs, old log-probs and advantages (sequence-constant if ``seq_adv``) for a ragged batch."""
    g = gen(seed)
    batch = len(lengths)
    old = -3 * torch.rand(batch, width, generator=g)
    new = old + log_ratio_scale * torch.randn(batch, width, generator=g)
    if seq_adv:
        adv = torch.randn(batch, 1, generator=g).expand(batch, width).contiguous()
    else:
        adv = torch.randn(batch, width, generator=g)
    return new, old, adv, lengths_mask(lengths, width)


def clip(x, low, high):
    return min(max(x, low), high)


# ----------------------------------------------------------------------------------------------------------
# Names come from the registries
# ----------------------------------------------------------------------------------------------------------


def test_name_functions_read_the_registries():
    assert ca.adv_estimator_names() == tuple(ca.ADV_ESTIMATOR_REGISTRY)
    assert ca.policy_loss_names() == tuple(ca.POLICY_LOSS_REGISTRY)
    assert ca.kl_estimator_names() == tuple(ca.KL_ESTIMATOR_REGISTRY)
    assert {"gae", "grpo", "dr_grpo", "rloo", "reinforce_plus_plus"} <= set(ca.adv_estimator_names())
    assert {"vanilla", "gspo", "gspo_token"} <= set(ca.policy_loss_names())
    assert "seq-mean-token-sum-norm" in ca.LOSS_AGG_MODES
    assert ca.ROLLOUT_CORRECTION_MODES == ("none", "tis", "mis")

    @ca.register_policy_loss("test_only_loss")
    def extra(**kwargs):
        """A throw-away registration: the name list must follow the registry."""
        return torch.zeros(()), {}

    try:
        assert ca.policy_loss_names()[-1] == "test_only_loss"
    finally:
        del ca.POLICY_LOSS_REGISTRY["test_only_loss"]
    assert "test_only_loss" not in ca.policy_loss_names()


@pytest.mark.parametrize("name", ["vanilla", "gspo", "gspo_token"])
def test_every_policy_loss_accepts_the_common_options(name):
    new, old, adv, mask = ragged_policy_batch(1, [3, 1, 4], 4)
    loss, metrics = ca.compute_policy_loss(
        name, new, old, adv, mask, clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=None,
        loss_agg_mode="seq-mean-token-sum-norm", global_token_count=8, global_seq_count=3, norm_length=4,
        token_weights=torch.ones(3, 4),
    )
    expected_keys = {"pg_loss", "abs_pg_loss", "ppo_ratio", "ppo_ratio_clamped", "pg_clipfrac", "pg_clipfrac_lower",
                     "approx_kl", "ppo_kl"}
    assert set(metrics) == expected_keys
    for value in metrics.values():
        assert value.dim() == 0 and not value.requires_grad
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------------------
# Dr. GRPO (Liu et al. 2025)
# ----------------------------------------------------------------------------------------------------------


def test_dr_grpo_advantage_is_the_group_mean_centred_score():
    g = gen(2)
    scores = torch.randn(11, generator=g)
    groups = ["a", "b", "a", "c", "b", "a", "d", "c", "b", "c", "c"]  # "d" is a single response
    lengths = [3, 5, 1, 4, 5, 2, 5, 0, 3, 5, 2]
    mask = lengths_mask(lengths, 5)
    adv, ret = ca.compute_advantages("dr_grpo", scores=scores, response_mask=mask, group_index=groups)

    s = scores.double().tolist()
    expected = []
    for i, key in enumerate(groups):
        members = [s[j] for j in range(len(groups)) if groups[j] == key]
        mean = sum(members) / len(members) if len(members) > 1 else 0.0  # one response: mean 0, as grpo
        expected.append([s[i] - mean if t < lengths[i] else 0.0 for t in range(5)])
    close(adv, expected)
    assert torch.equal(adv, ret)


def test_dr_grpo_ignores_norm_by_std_and_takes_contiguous_groups():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0])
    mask = torch.ones(6, 2)
    adv, _ = ca.compute_advantages("dr_grpo", scores=scores, response_mask=mask, n_samples_per_prompt=3,
                                   norm_by_std=True)
    close(adv[:, 0], [2 / 3, -1 / 3, -1 / 3, -4 / 3, 5 / 3, -1 / 3])
    with pytest.raises(ValueError, match="'dr_grpo' needs scores"):
        ca.compute_advantages("dr_grpo", response_mask=mask, n_samples_per_prompt=3)
    with pytest.raises(ValueError, match="n_samples_per_prompt"):
        ca.compute_advantages("dr_grpo", scores=scores, response_mask=mask, n_samples_per_prompt=4)


def dr_grpo_objective(log_probs, old_log_probs, advantages, mask, eps, max_len):
    """Liu et al. 2025, section 3.2: (1/G) sum_i sum_t min(r A, clip(r, 1 +- eps) A), the per-response token sum
    divided by the constant generation budget instead of |o_i| (their listing); G counts non-empty responses."""
    total, responses = 0.0, 0
    for lp_row, old_row, a_row, m_row in zip(rows(log_probs), rows(old_log_probs), rows(advantages), rows(mask)):
        if not any(m_row):
            continue
        responses += 1
        seq = 0.0
        for lp, old, a, m in zip(lp_row, old_row, a_row, m_row):
            if m:
                r = math.exp(lp - old)
                seq += min(r * a, clip(r, 1 - eps, 1 + eps) * a)
        total += seq / max_len
    return total / responses


def test_dr_grpo_loss_with_seq_mean_token_sum_norm_matches_the_paper():
    lengths = [6, 2, 0, 4, 1, 6]
    new, old, adv, mask = ragged_policy_batch(3, lengths, 6)
    loss, metrics = ca.compute_policy_loss("vanilla", new, old, adv, mask, clip_ratio=0.2, clip_ratio_c=None,
                                           loss_agg_mode="seq-mean-token-sum-norm", norm_length=10)
    expected = -dr_grpo_objective(new, old, adv, mask, 0.2, 10)
    close(loss, expected)
    close(metrics["pg_loss"], expected)


# ----------------------------------------------------------------------------------------------------------
# seq-mean-token-sum-norm aggregation: definition, DP / micro-batch invariance
# ----------------------------------------------------------------------------------------------------------

AGG_LENGTHS = [7, 1, 3, 0, 6, 2, 7, 4]
NORM_LENGTH = 9


def sum_norm_reference(loss_mat, mask, norm_length):
    """sum over non-empty rows of (sum of valid token losses / norm_length), divided by the number of those rows."""
    total, count = 0.0, 0
    for l_row, m_row in zip(rows(loss_mat), rows(mask)):
        if any(m_row):
            count += 1
            total += sum(l for l, m in zip(l_row, m_row) if m) / norm_length
    return total / count


def test_seq_mean_token_sum_norm_matches_its_definition():
    g = gen(4)
    x = torch.randn(len(AGG_LENGTHS), 7, generator=g)
    mask = lengths_mask(AGG_LENGTHS, 7)
    close(ca.agg_loss(x, mask, "seq-mean-token-sum-norm", norm_length=NORM_LENGTH),
          sum_norm_reference(x, mask, NORM_LENGTH))


def test_seq_mean_token_sum_norm_does_not_depend_on_the_padded_width():
    """The normaliser is a constant: padding the batch wider (a longer rollout elsewhere) changes nothing."""
    g = gen(5)
    x = torch.randn(4, 5, generator=g)
    mask = lengths_mask([5, 2, 3, 1], 5)
    wide_x = torch.cat([x, torch.randn(4, 6, generator=g)], dim=1)
    wide_mask = torch.cat([mask, torch.zeros(4, 6)], dim=1)
    narrow = ca.agg_loss(x, mask, "seq-mean-token-sum-norm", norm_length=16)
    wide = ca.agg_loss(wide_x, wide_mask, "seq-mean-token-sum-norm", norm_length=16)
    assert narrow.item() == pytest.approx(wide.item(), abs=1e-8)
    close(narrow, sum_norm_reference(x, mask, 16))


def per_token_loss(x, w):
    return torch.sin(x * w) + (x - w) ** 2


@pytest.mark.parametrize("n_pieces", [1, 2, 4])
def test_seq_mean_token_sum_norm_split_into_micro_batches_gives_the_full_batch_gradient(n_pieces):
    g = gen(6)
    x = torch.randn(len(AGG_LENGTHS), 7, generator=g, dtype=torch.float64)
    w = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()
    mask = lengths_mask(AGG_LENGTHS, 7)
    full = sum(per_token_loss(x[i, :n], w[:n]).sum() / NORM_LENGTH
               for i, n in enumerate(AGG_LENGTHS) if n) / sum(1 for n in AGG_LENGTHS if n)
    (expected,) = torch.autograd.grad(full, w)

    pieces = list(zip(x.chunk(n_pieces), mask.chunk(n_pieces)))
    tokens, seqs = sum(ca.loss_token_counts(m) for _, m in pieces).tolist()
    total = sum(ca.agg_loss(per_token_loss(xp, w), mp, "seq-mean-token-sum-norm", tokens, seqs, NORM_LENGTH)
                for xp, mp in pieces)
    (grad,) = torch.autograd.grad(total, w)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    assert total.item() == pytest.approx(full.item(), abs=1e-12)


def test_seq_mean_token_sum_norm_under_simulated_dp_with_gradient_averaging():
    g = gen(7)
    x = torch.randn(len(AGG_LENGTHS), 7, generator=g, dtype=torch.float64)
    w = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()
    mask = lengths_mask(AGG_LENGTHS, 7)
    full = sum(per_token_loss(x[i, :n], w[:n]).sum() / NORM_LENGTH
               for i, n in enumerate(AGG_LENGTHS) if n) / sum(1 for n in AGG_LENGTHS if n)
    (expected,) = torch.autograd.grad(full, w)

    dp_size, micro = 2, 2
    rank_x, rank_m = x.chunk(dp_size), mask.chunk(dp_size)
    global_counts = run_ranks(dp_size, lambda rank, fn: fn(sum(ca.loss_token_counts(m)
                                                               for m in rank_m[rank].chunk(micro))))
    rank_grads = []
    for rank in range(dp_size):
        tokens, seqs = global_counts[rank].tolist()
        loss = sum(ca.agg_loss(per_token_loss(xm, w), mm, "seq-mean-token-sum-norm", tokens, seqs, NORM_LENGTH)
                   for xm, mm in zip(rank_x[rank].chunk(micro), rank_m[rank].chunk(micro)))
        rank_grads.append(torch.autograd.grad(loss * dp_size, w)[0])  # scaled to undo DDP's average
    torch.testing.assert_close(sum(rank_grads) / dp_size, expected, rtol=0, atol=1e-12)


def test_seq_mean_token_sum_norm_needs_a_positive_norm_length():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="norm_length"):
        ca.agg_loss(x, m, "seq-mean-token-sum-norm")
    for bad in (0, -4, float("nan")):
        with pytest.raises(ValueError, match="norm_length"):
            ca.agg_loss(x, m, "seq-mean-token-sum-norm", norm_length=bad)
    with pytest.raises(ValueError, match="norm_length"):
        ca.compute_value_loss(x, x, x, m, loss_agg_mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="norm_length"):
        ca.compute_entropy_loss(x, m, 0.01, loss_agg_mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="norm_length"):
        ca.compute_kl_loss(x, x, m, loss_agg_mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="norm_length"):
        ca.compute_policy_loss("gspo", x, x, x, m, loss_agg_mode="seq-mean-token-sum-norm")
    # the other modes ignore it
    assert ca.agg_loss(x + 1, m, "token-mean", norm_length=None).item() == 1.0


def test_seq_mean_token_sum_norm_all_masked_batch_is_zero_with_finite_gradient():
    w = torch.ones(3, requires_grad=True)
    loss = ca.agg_loss(w.expand(2, 3) * 5, torch.zeros(2, 3), "seq-mean-token-sum-norm", norm_length=3)
    (grad,) = torch.autograd.grad(loss, w)
    assert loss.item() == 0.0 and (grad == 0).all()


def test_value_entropy_and_kl_losses_aggregate_with_seq_mean_token_sum_norm():
    g = gen(8)
    lengths = [4, 1, 3]
    mask = lengths_mask(lengths, 4)
    entropy = torch.rand(3, 4, generator=g)
    loss, _ = ca.compute_entropy_loss(entropy, mask, 0.5, loss_agg_mode="seq-mean-token-sum-norm", norm_length=8)
    close(loss, -0.5 * sum_norm_reference(entropy, mask, 8))
    values, old_values, returns = (torch.randn(3, 4, generator=g) for _ in range(3))
    loss, _ = ca.compute_value_loss(values, old_values, returns, mask, cliprange_value=None,
                                    loss_agg_mode="seq-mean-token-sum-norm", norm_length=8)
    close(loss, sum_norm_reference(0.5 * (values - returns) ** 2, mask, 8))
    logp, ref = -torch.rand(3, 4, generator=g), -torch.rand(3, 4, generator=g)
    loss, _ = ca.compute_kl_loss(logp, ref, mask, kl_loss_coef=1.0, kl_estimator="k1", kl_clamp=None,
                                 loss_agg_mode="seq-mean-token-sum-norm", norm_length=8)
    close(loss, sum_norm_reference(logp - ref, mask, 8))


# ----------------------------------------------------------------------------------------------------------
# GSPO (Zheng et al. 2025)
# ----------------------------------------------------------------------------------------------------------


def gspo_reference(log_probs, old_log_probs, advantages, mask, low, high, token_level=False):
    """Eqs. 5 and 7 (``token_level``: eqs. 13-14) as loops, with the gradient worked out by hand.

    s_i = exp(mean over valid t of (log_probs - old_log_probs)); the objective is
    (1/G) sum_i (1/|y_i|) sum_t min(s_i A_it, clip(s_i) A_it). Its derivative w.r.t. log_probs[i, t]:
      GSPO: d s_i / d lp_it = s_i / |y_i|, and every token k of row i contributes its own unclipped term;
      GSPO-token: d s_ik / d lp_it = s_i if k == t else 0.
    The loss is minus the objective. Returns (loss, grad rows, per-token clipped flags, s per row).
    """
    lp, old, adv, m = rows(log_probs), rows(old_log_probs), rows(advantages), rows(mask)
    nonempty = [i for i in range(len(m)) if any(m[i])]
    n_resp = len(nonempty)
    loss = 0.0
    grad = [[0.0] * len(m[0]) for _ in m]
    clipped = [[None] * len(m[0]) for _ in m]
    s_rows = [1.0] * len(m)
    for i in nonempty:
        valid = [t for t in range(len(m[i])) if m[i][t]]
        n = len(valid)
        s = math.exp(sum(lp[i][t] - old[i][t] for t in valid) / n)
        s_rows[i] = s
        for t in valid:
            a = adv[i][t]
            unclipped, clipped_term = s * a, clip(s, 1 - low, 1 + high) * a
            loss -= min(unclipped, clipped_term) / n / n_resp
            active = unclipped <= clipped_term  # min picks the unclipped term: gradient flows
            clipped[i][t] = not active
            if active:
                if token_level:
                    grad[i][t] -= a * s / n / n_resp
                else:
                    for k in valid:
                        grad[i][k] -= a * s / n / n / n_resp
    return loss, grad, clipped, s_rows


GSPO_LENGTHS = [6, 2, 0, 5, 1, 6, 3, 4]


@pytest.mark.parametrize("low,high,scale", [(3e-4, 4e-4, 0.002), (0.05, 0.08, 0.3), (0.2, 0.28, 1.0)])
def test_gspo_matches_the_paper_in_value_gradient_and_metrics(low, high, scale):
    new, old, adv, mask = ragged_policy_batch(9, GSPO_LENGTHS, 6, log_ratio_scale=scale)
    new.requires_grad_()
    loss, metrics = ca.compute_policy_loss("gspo", new, old, adv, mask, clip_ratio_low=low, clip_ratio_high=high)
    (grad,) = torch.autograd.grad(loss, new)
    expected_loss, expected_grad, clipped, s_rows = gspo_reference(new, old, adv, mask, low, high)
    close(loss, expected_loss)
    close(grad, expected_grad)

    valid = [(i, t) for i, n in enumerate(GSPO_LENGTHS) for t in range(n)]
    flags = [clipped[i][t] for i, t in valid]
    assert any(flags) and not all(flags), "the case must exercise both branches"
    close(metrics["pg_clipfrac"], sum(flags) / len(valid))
    close(metrics["ppo_ratio"], sum(s_rows[i] for i, _ in valid) / len(valid))
    close(metrics["ppo_ratio_clamped"], sum(clip(s_rows[i], 1 - low, 1 + high) for i, _ in valid) / len(valid))
    d = [rows(new)[i][t] - rows(old)[i][t] for i, t in valid]
    close(metrics["ppo_kl"], -sum(d) / len(valid))
    close(metrics["approx_kl"], 0.5 * sum(x * x for x in d) / len(valid))
    assert metrics["pg_clipfrac_lower"].item() == 0.0


@pytest.mark.parametrize("low,high,scale", [(3e-4, 4e-4, 0.002), (0.05, 0.08, 0.3)])
def test_gspo_token_matches_the_paper_with_token_level_advantages(low, high, scale):
    new, old, adv, mask = ragged_policy_batch(10, GSPO_LENGTHS, 6, log_ratio_scale=scale, seq_adv=False)
    new.requires_grad_()
    loss, metrics = ca.compute_policy_loss("gspo_token", new, old, adv, mask, clip_ratio_low=low,
                                           clip_ratio_high=high)
    (grad,) = torch.autograd.grad(loss, new)
    expected_loss, expected_grad, clipped, _ = gspo_reference(new, old, adv, mask, low, high, token_level=True)
    close(loss, expected_loss)
    close(grad, expected_grad)
    flags = [clipped[i][t] for i, n in enumerate(GSPO_LENGTHS) for t in range(n)]
    assert any(flags) and not all(flags)
    close(metrics["pg_clipfrac"], sum(flags) / len(flags))


def test_gspo_token_equals_gspo_in_value_and_gradient_for_sequence_advantages():
    """The paper's remark: with A_it = A_i the two objectives, clipping and gradients coincide."""
    new, old, adv, mask = ragged_policy_batch(11, GSPO_LENGTHS, 6, log_ratio_scale=0.05)
    results = {}
    for name in ("gspo", "gspo_token"):
        leaf = new.clone().requires_grad_()
        loss, metrics = ca.compute_policy_loss(name, leaf, old, adv, mask, clip_ratio_low=0.01, clip_ratio_high=0.02)
        results[name] = (loss, torch.autograd.grad(loss, leaf)[0], metrics)
    (l1, g1, m1), (l2, g2, m2) = results["gspo"], results["gspo_token"]
    torch.testing.assert_close(l1, l2, rtol=0, atol=ATOL)
    torch.testing.assert_close(g1, g2, rtol=0, atol=ATOL)
    for key in m1:
        torch.testing.assert_close(m1[key], m2[key], rtol=0, atol=ATOL)
    # ...but with token-level advantages the gradients differ: GSPO mixes a row's tokens, GSPO-token does not
    adv_tok = adv + torch.linspace(-1, 1, 6)
    grads = []
    for name in ("gspo", "gspo_token"):
        leaf = new.clone().requires_grad_()
        # bounds so wide that nothing is clipped
        loss, _ = ca.compute_policy_loss(name, leaf, old, adv_tok, mask, clip_ratio_low=0.99, clip_ratio_high=100.0)
        grads.append(torch.autograd.grad(loss, leaf)[0])
    assert (grads[0] - grads[1]).abs().max().item() > 1e-3


def test_gspo_ignores_garbage_at_pads_in_value_and_gradient():
    new, old, adv, mask = ragged_policy_batch(12, [5, 2, 0, 3], 5)
    pad = ~mask.bool()
    for name in ("gspo", "gspo_token"):
        leaf = new.clone().requires_grad_()
        dirty_old = old.masked_fill(pad, float("-inf"))
        dirty_adv = adv.masked_fill(pad, float("nan"))
        loss, metrics = ca.compute_policy_loss(name, leaf, dirty_old, dirty_adv, mask, clip_ratio=0.1)
        (grad,) = torch.autograd.grad(loss, leaf)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(v) for v in metrics.values())
        assert (grad[pad] == 0).all()
        clean, _ = ca.compute_policy_loss(name, new, old, adv, mask, clip_ratio=0.1)
        assert loss.item() == pytest.approx(clean.item(), abs=1e-7)


def test_gspo_with_dual_clip_bounds_negative_advantages():
    log_ratio = torch.full((2, 3), 3.0)  # s = e^3
    adv = torch.tensor([[-1.0] * 3, [2.0] * 3])
    loss, metrics = ca.compute_policy_loss("gspo", log_ratio, torch.zeros(2, 3), adv, torch.ones(2, 3),
                                           clip_ratio=0.2, clip_ratio_c=3.0)
    # row 0: max(e^3, 1.2) capped at 3; row 1: max(-2 e^3, -2 * 1.2) = -2.4
    close(loss, (3.0 - 2.4) / 2)
    close(metrics["pg_clipfrac_lower"], 0.5)


# ----------------------------------------------------------------------------------------------------------
# Policy losses: token weights, DP and micro-batch invariance
# ----------------------------------------------------------------------------------------------------------

POLICY_LENGTHS = [6, 1, 3, 0, 5, 2, 6, 4]


def test_token_weights_multiply_the_vanilla_per_token_loss_before_aggregation():
    new, old, adv, mask = ragged_policy_batch(13, POLICY_LENGTHS, 6, seq_adv=False)
    weights = torch.rand(8, 6, generator=gen(14)) * 2
    new.requires_grad_()
    loss, metrics = ca.compute_policy_loss("vanilla", new, old, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.28,
                                           clip_ratio_c=None, token_weights=weights)
    total, grad = 0.0, [[0.0] * 6 for _ in range(8)]
    n_tokens = sum(POLICY_LENGTHS)
    for i, n in enumerate(POLICY_LENGTHS):
        for t in range(n):
            r = math.exp(rows(new)[i][t] - rows(old)[i][t])
            a, w = rows(adv)[i][t], rows(weights)[i][t]
            unclipped, clipped_term = r * a, clip(r, 0.8, 1.28) * a
            total -= w * min(unclipped, clipped_term)
            if unclipped <= clipped_term:
                grad[i][t] = -w * a * r / n_tokens
    close(loss, total / n_tokens)
    close(metrics["pg_loss"], total / n_tokens)
    close(torch.autograd.grad(loss, new)[0], grad)


@pytest.mark.parametrize("name", ["vanilla", "gspo", "gspo_token"])
def test_token_weights_of_one_change_nothing_and_are_never_differentiated(name):
    new, old, adv, mask = ragged_policy_batch(15, POLICY_LENGTHS, 6)
    plain, _ = ca.compute_policy_loss(name, new, old, adv, mask)
    weights = torch.ones(8, 6, requires_grad=True)
    weighted, _ = ca.compute_policy_loss(name, new, old, adv, mask, token_weights=weights)
    assert weighted.item() == plain.item()
    assert not weighted.requires_grad  # no path from the loss back to the weights
    with pytest.raises(ValueError, match="token_weights"):
        ca.compute_policy_loss(name, new, old, adv, mask, token_weights=-torch.ones(8, 6))
    with pytest.raises(ValueError, match="token_weights"):
        ca.compute_policy_loss(name, new, old, adv, mask, token_weights=torch.ones(8, 5))


@pytest.mark.parametrize("name", ["vanilla", "gspo", "gspo_token"])
@pytest.mark.parametrize("mode", ca.LOSS_AGG_MODES)
def test_policy_losses_under_simulated_dp_and_micro_batches_give_the_full_batch_gradient(name, mode):
    """2 DP ranks x 2 micro-batches with all-reduced counts: same loss and gradient as the whole batch at once."""
    new, old, adv, mask = ragged_policy_batch(16, POLICY_LENGTHS, 6, log_ratio_scale=0.1, seq_adv=name == "gspo")
    weights = 0.5 + torch.rand(8, 6, generator=gen(17))
    options = {"clip_ratio_low": 0.02, "clip_ratio_high": 0.03, "loss_agg_mode": mode, "norm_length": 6}
    leaf = new.clone().requires_grad_()
    full, _ = ca.compute_policy_loss(name, leaf, old, adv, mask, token_weights=weights, **options)
    (expected,) = torch.autograd.grad(full, leaf)

    dp_size, micro = 2, 2
    split = [t.chunk(dp_size) for t in (old, adv, mask, weights)]
    global_counts = run_ranks(dp_size, lambda rank, fn: fn(sum(ca.loss_token_counts(m)
                                                               for m in split[2][rank].chunk(micro))))
    leaf = new.clone().requires_grad_()
    rank_leaf = leaf.chunk(dp_size)
    total, rank_grads = 0.0, []
    for rank in range(dp_size):
        tokens, seqs = global_counts[rank].tolist()
        pieces = zip(*(t.chunk(micro) for t in (rank_leaf[rank],) + tuple(s[rank] for s in split)))
        loss = sum(ca.compute_policy_loss(name, lp, o, a, m, token_weights=w, global_token_count=tokens,
                                          global_seq_count=seqs, **options)[0]
                   for lp, o, a, m, w in pieces)
        total += loss.item()
        rank_grads.append(torch.autograd.grad(loss * dp_size, leaf)[0])  # scaled to undo DDP's average
    assert total == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(sum(rank_grads) / dp_size, expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# DAPO (Yu et al. 2025)
# ----------------------------------------------------------------------------------------------------------


def dapo_objective(log_probs, old_log_probs, advantages, mask, eps_low, eps_high):
    """DAPO eq. 8: (1 / sum_i |o_i|) sum_i sum_t min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)."""
    total, tokens = 0.0, 0
    for lp_row, old_row, a_row, m_row in zip(rows(log_probs), rows(old_log_probs), rows(advantages), rows(mask)):
        for lp, old, a, m in zip(lp_row, old_row, a_row, m_row):
            if m:
                r = math.exp(lp - old)
                total += min(r * a, clip(r, 1 - eps_low, 1 + eps_high) * a)
                tokens += 1
    return total / tokens


def test_vanilla_asymmetric_clip_is_dapo_clip_higher():
    new, old, adv, mask = ragged_policy_batch(18, [7, 2, 5, 0, 1, 7], 7, log_ratio_scale=0.4, seq_adv=False)
    loss, _ = ca.compute_policy_loss("vanilla", new, old, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.28,
                                     clip_ratio_c=None, loss_agg_mode="token-mean")
    close(loss, -dapo_objective(new, old, adv, mask, 0.2, 0.28))
    # the decoupled bounds: r = 1.25 with A > 0 is inside [0.8, 1.28] (symmetric 0.2 would clip it at 1.2),
    # r = 0.75 with A < 0 is clipped at 0.8
    log_ratio = torch.tensor([[math.log(1.25), math.log(0.75)]])
    loss, metrics = ca.compute_policy_loss("vanilla", log_ratio, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]),
                                           torch.ones(1, 2), clip_ratio_low=0.2, clip_ratio_high=0.28,
                                           clip_ratio_c=None)
    close(loss, (-1.25 + 0.8) / 2)
    close(metrics["pg_clipfrac"], 0.5)


def informative_reference(scores, groups, atol=0.0, keep_singletons=False):
    members = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(scores[i])
    keep = {}
    for key, vals in members.items():
        keep[key] = (max(vals) - min(vals) > atol) or (keep_singletons and len(vals) == 1)
    return [keep[key] for key in groups]


def test_informative_groups_drops_groups_with_identical_rewards():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0,  # all correct: dropped
                           0.0, 1.0, 0.0, 0.0,  # mixed: kept
                           0.0, 0.0, 0.0, 0.0,  # all wrong: dropped
                           -1.0, 1.0,           # mixed: kept
                           5.0])                # a single response: dropped unless keep_singletons
    groups = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 4]
    keep = ca.informative_groups(scores, groups)
    assert keep.dtype == torch.bool
    assert keep.tolist() == informative_reference(scores.tolist(), groups)
    assert keep.tolist() == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 2 + [False]
    singles = ca.informative_groups(scores, torch.tensor(groups), keep_singletons=True)
    assert singles.tolist() == informative_reference(scores.tolist(), groups, keep_singletons=True)
    assert singles[-1].item() is True


def test_informative_groups_with_shuffled_ids_contiguous_groups_and_tolerance():
    g = gen(19)
    scores = torch.randint(0, 2, (24,), generator=g).float()
    groups = [f"p{k}" for k in torch.randperm(24, generator=g).remainder(6).tolist()]
    assert ca.informative_groups(scores, groups).tolist() == informative_reference(scores.tolist(), groups)
    contiguous = ca.informative_groups(scores, n_samples_per_prompt=4)
    assert contiguous.tolist() == informative_reference(scores.tolist(), [i // 4 for i in range(24)])
    near = torch.tensor([0.5, 0.5 + 1e-9, 0.0, 0.25], dtype=torch.float64)
    assert ca.informative_groups(near, [0, 0, 1, 1]).tolist() == [True, True, True, True]
    assert ca.informative_groups(near, [0, 0, 1, 1], atol=1e-6).tolist() == [False, False, True, True]


def test_informative_groups_rejects_bad_inputs():
    with pytest.raises(ValueError, match="scores must be 1-D"):
        ca.informative_groups(torch.zeros(2, 2), [0, 0])
    with pytest.raises(ValueError, match="scores must not hold nan"):
        ca.informative_groups(torch.tensor([1.0, float("nan")]), [0, 0])
    with pytest.raises(ValueError, match="atol"):
        ca.informative_groups(torch.zeros(2), [0, 0], atol=-1.0)
    with pytest.raises(ValueError, match="group_index"):
        ca.informative_groups(torch.zeros(3), [0, 0])
    with pytest.raises(ValueError, match="group_index or n_samples_per_prompt"):
        ca.informative_groups(torch.zeros(3))


def overlong_reference(length, l_max, l_cache, factor):
    """DAPO eq. 13, scaled by ``factor``."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return factor * ((l_max - l_cache) - length) / l_cache
    return -factor


@pytest.mark.parametrize("l_max,l_cache,factor", [(20, 6, 1.0), (20, 6, 0.5), (16, 16, 2.0), (9, 1, 1.0)])
def test_overlong_penalty_matches_dapo_eq_13(l_max, l_cache, factor):
    lengths = list(range(l_max + 3))
    penalty = ca.overlong_penalty(torch.tensor(lengths), l_max, l_cache, factor)
    assert penalty.dtype == torch.float32
    close(penalty, [overlong_reference(n, l_max, l_cache, factor) for n in lengths])
    assert penalty[l_max - l_cache].item() == 0.0
    assert penalty[l_max].item() == pytest.approx(-factor)


def test_overlong_penalty_rejects_bad_inputs():
    lengths = torch.tensor([3, 5])
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        ca.overlong_penalty(lengths, 10, 0)
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        ca.overlong_penalty(lengths, 10, 11)
    with pytest.raises(ValueError, match="max_response_length"):
        ca.overlong_penalty(lengths, 0, 1)
    with pytest.raises(ValueError, match="penalty_factor"):
        ca.overlong_penalty(lengths, 10, 4, -1.0)
    with pytest.raises(ValueError, match="response_lengths must be 1-D"):
        ca.overlong_penalty(lengths.reshape(1, 2), 10, 4)
    with pytest.raises(ValueError, match="response_lengths must be finite and >= 0"):
        ca.overlong_penalty(torch.tensor([-1, 3]), 10, 4)


def test_overlong_filter_removes_truncated_responses_from_the_loss_and_the_counts():
    lengths = [6, 6, 2, 4, 6]
    has_eos = torch.tensor([True, False, True, True, False])  # rows 1 and 4 hit the budget without a stop token
    new, old, adv, mask = ragged_policy_batch(20, lengths, 6, seq_adv=False)
    for dtype in (torch.float32, torch.bool, torch.int64):
        filtered = ca.overlong_filter_mask(mask.to(dtype), has_eos)
        assert filtered.dtype == dtype
        assert filtered.to(torch.float32).tolist() == [[float(t < n and e) for t in range(6)]
                                                       for n, e in zip(lengths, has_eos.tolist())]
    filtered = ca.overlong_filter_mask(mask, has_eos)
    assert ca.loss_token_counts(filtered).tolist() == [6 + 2 + 4, 3]
    loss, _ = ca.compute_policy_loss("vanilla", new, old, adv, filtered, clip_ratio_c=None)
    kept = [i for i, e in enumerate(has_eos.tolist()) if e]
    close(loss, -dapo_objective(new[kept], old[kept], adv[kept], mask[kept], 0.2, 0.2))
    with pytest.raises(ValueError, match="has_eos"):
        ca.overlong_filter_mask(mask, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="has_eos must hold only 0/1"):
        ca.overlong_filter_mask(mask, torch.tensor([1, 2, 0, 1, 1]))


# ----------------------------------------------------------------------------------------------------------
# Rollout / training mismatch
# ----------------------------------------------------------------------------------------------------------


def mismatch_batch(seed, lengths, width, scale=0.5):
    g = gen(seed)
    sampler = -4 * torch.rand(len(lengths), width, generator=g)
    old = sampler + scale * torch.randn(len(lengths), width, generator=g)
    return old, sampler, lengths_mask(lengths, width)


def valid_pairs(old, sampler, lengths):
    return [(rows(old)[i][t], rows(sampler)[i][t]) for i, n in enumerate(lengths) for t in range(n)]


def test_rollout_mismatch_metrics_match_direct_formulas_and_ignore_pads():
    lengths = [5, 1, 0, 3, 5]
    old, sampler, mask = mismatch_batch(21, lengths, 5)
    pad = ~mask.bool()
    metrics = ca.rollout_mismatch_metrics(old.masked_fill(pad, float("nan")), sampler.masked_fill(pad, 7.0), mask)
    pairs = valid_pairs(old, sampler, lengths)
    diffs = [o - s for o, s in pairs]
    k3 = [math.exp(d) - 1 - d for d in diffs]  # r = pi_old / pi_sampler on tokens drawn from the sampler
    close(metrics["mismatch_abs_diff_mean"], sum(abs(d) for d in diffs) / len(diffs))
    close(metrics["mismatch_abs_diff_max"], max(abs(d) for d in diffs))
    close(metrics["mismatch_kl"], sum(k3) / len(k3))
    close(metrics["mismatch_kl_k1"], -sum(diffs) / len(diffs))
    assert metrics["mismatch_kl"].item() >= 0
    for value in metrics.values():
        assert value.dim() == 0 and not value.requires_grad
    same = ca.rollout_mismatch_metrics(sampler, sampler, mask)
    assert all(v.item() == 0.0 for v in same.values())
    empty = ca.rollout_mismatch_metrics(old, sampler, torch.zeros(5, 5))
    assert all(v.item() == 0.0 for v in empty.values())


@pytest.mark.parametrize("mode,cap", [("tis", 2.0), ("tis", 1.1), ("mis", 2.0), ("mis", 1.1), ("none", 2.0)])
def test_rollout_correction_weights_match_direct_formulas(mode, cap):
    lengths = [6, 2, 0, 4, 6, 1]
    old, sampler, mask = mismatch_batch(22, lengths, 6, scale=0.8)
    weights, metrics = ca.rollout_correction_weights(old, sampler, mask, mode=mode, cap=cap)
    expected, over, kept = [], 0, []
    for i, n in enumerate(lengths):
        row = []
        for t in range(6):
            if t >= n:
                row.append(0.0)
                continue
            rho = math.exp(rows(old)[i][t] - rows(sampler)[i][t])
            over += rho > cap
            if mode == "tis":
                w = min(rho, cap)  # truncated importance sampling
            elif mode == "mis":
                w = rho if rho <= cap else 0.0  # masked importance sampling
            else:
                w = 1.0
            row.append(w)
            kept.append(w)
        expected.append(row)
    close(weights, expected)
    n_valid = sum(lengths)
    close(metrics["rollout_is_weight_mean"], sum(kept) / n_valid)
    if mode != "none":
        assert 0 < over < n_valid, "the case must exercise both branches"
    close(metrics["rollout_is_capped_frac"], over / n_valid if mode == "tis" else 0.0)
    close(metrics["rollout_is_masked_frac"], over / n_valid if mode == "mis" else 0.0)


def test_tis_weights_are_detached_and_scale_each_token_gradient():
    lengths = [5, 3, 5, 1]
    old, sampler, mask = mismatch_batch(23, lengths, 5)
    sampler = sampler.clone().requires_grad_()
    old_leaf = old.clone().requires_grad_()
    weights, metrics = ca.rollout_correction_weights(old_leaf, sampler, mask, mode="tis", cap=1.5)
    assert not weights.requires_grad and all(not v.requires_grad for v in metrics.values())

    g = gen(24)
    adv = torch.randn(4, 5, generator=g)
    new = (old + 0.1 * torch.randn(4, 5, generator=g)).requires_grad_()
    loss, _ = ca.compute_policy_loss("vanilla", new, old_leaf, adv, mask, token_weights=weights)
    grad_new, grad_sampler = torch.autograd.grad(loss, (new, sampler), allow_unused=True)
    assert grad_sampler is None  # nothing flows into the sampler's log-probs
    plain, _ = ca.compute_policy_loss("vanilla", new, old, adv, mask)
    (grad_plain,) = torch.autograd.grad(plain, new)
    torch.testing.assert_close(grad_new, grad_plain * weights, rtol=0, atol=1e-7)


def test_rollout_correction_rejects_bad_inputs():
    old, sampler, mask = mismatch_batch(25, [3, 2], 3)
    with pytest.raises(ValueError, match="unknown rollout correction mode 'is'; valid choices: mis, none, tis"):
        ca.rollout_correction_weights(old, sampler, mask, mode="is")
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="cap"):
            ca.rollout_correction_weights(old, sampler, mask, mode="tis", cap=bad)
    with pytest.raises(ValueError, match="sampler_log_probs has shape"):
        ca.rollout_correction_weights(old, sampler[:, :2], mask)
    with pytest.raises(ValueError, match="sampler_log_probs has shape"):
        ca.rollout_mismatch_metrics(old, sampler[:1], mask)
    with pytest.raises(ValueError, match="old_log_probs must be 2-D"):
        ca.rollout_mismatch_metrics(old[0], sampler[0], mask[0])
    with pytest.raises(ValueError, match="response_mask must hold only 0/1"):
        ca.rollout_correction_weights(old, sampler, mask * 2)


def test_unknown_names_of_the_variants_list_the_valid_choices():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="unknown policy loss 'gspo_seq'; valid choices: gspo, gspo_token, vanilla"):
        ca.compute_policy_loss("gspo_seq", x, x, x, m)
    with pytest.raises(ValueError, match="unknown advantage estimator 'drgrpo'; valid choices: dr_grpo, gae, grpo"):
        ca.compute_advantages("drgrpo", scores=torch.zeros(2), response_mask=m, n_samples_per_prompt=2)
    with pytest.raises(ValueError, match="valid choices: .*seq-mean-token-sum-norm"):
        ca.agg_loss(x, m, "seq-sum")
