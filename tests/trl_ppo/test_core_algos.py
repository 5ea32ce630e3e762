"""Tests of posttrain.trl_ppo.core_algos.

Every expected value comes from an independent reference written here: plain Python loops over the paper's
recursions, the stdlib ``statistics`` module, float64 torch formulas written differently from the module, or
a transcription of TRL's PPO train loop (trl 0.29.1, ``trl/experimental/ppo/ppo_trainer.py``). No test
compares the module with itself.
"""

import ast
import math
import pathlib
import statistics
import threading

import pytest
import torch

from posttrain.trl_ppo import core_algos as ca

CORE_ALGOS_PATH = pathlib.Path(ca.__file__)


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lengths_mask(lengths, width, dtype=torch.float32):
    """Right-padded mask with ``lengths[i]`` leading ones in row ``i``."""
    idx = torch.arange(width).unsqueeze(0)
    return (idx < torch.tensor(lengths).unsqueeze(1)).to(dtype)


def rows(t):
    return t.double().tolist()


class ThreadAllReduce:
    """A SUM all-reduce between threads, one thread per simulated DP rank.

    Each rank writes its local sums, waits for the others, and reads the element-wise sum (added in rank order,
    so every rank gets bit-identical results) -- what ``torch.distributed.all_reduce`` does across processes.
    """

    def __init__(self, world_size):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots = [None] * world_size

    def reduce_fn(self, rank):
        def fn(local):
            self.slots[rank] = local.clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total = total + other
            self.barrier.wait()
            return total

        return fn


def run_ranks(world_size, work):
    """Runs ``work(rank, reduce_fn)`` on ``world_size`` threads and returns the results in rank order."""
    comm = ThreadAllReduce(world_size)
    results, errors = [None] * world_size, []

    def target(rank):
        try:
            results[rank] = work(rank, comm.reduce_fn(rank))
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)
            comm.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def assert_finite(*tensors):
    for t in tensors:
        assert torch.isfinite(t).all(), t


# ----------------------------------------------------------------------------------------------------------
# The module's own contract
# ----------------------------------------------------------------------------------------------------------


def test_module_imports_only_torch_and_stdlib_math_helpers():
    allowed = {"__future__", "math", "dataclasses", "typing", "enum", "torch"}
    tree = ast.parse(CORE_ALGOS_PATH.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= allowed, imported - allowed


def test_public_functions_have_docstrings():
    for name in ca.__all__:
        obj = getattr(ca, name)
        if callable(obj) and not isinstance(obj, dict):
            assert obj.__doc__ and len(obj.__doc__) > 40, name


def test_registries_hold_the_documented_names():
    assert {"k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs"} <= set(ca.KL_ESTIMATOR_REGISTRY)
    assert {"gae", "grpo", "rloo", "reinforce_plus_plus"} <= set(ca.ADV_ESTIMATOR_REGISTRY)
    assert "vanilla" in ca.POLICY_LOSS_REGISTRY
    assert ca.LOSS_AGG_MODES == ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


# ----------------------------------------------------------------------------------------------------------
# GAE against the paper's recursion
# ----------------------------------------------------------------------------------------------------------


def gae_reference(rewards, values, lengths, gamma, lam):
    """Schulman et al. 2016 as plain loops: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}.

    The episode of row i is its first ``lengths[i]`` steps; V after the last step is 0. Pads get 0.
    """
    advantages, returns = [], []
    for r, v, n in zip(rewards, values, lengths):
        width = len(r)
        adv = [0.0] * width
        running = 0.0
        for t in range(n - 1, -1, -1):
            next_value = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_value - v[t]
            running = delta + gamma * lam * running
            adv[t] = running
        advantages.append(adv)
        returns.append([adv[t] + v[t] if t < n else 0.0 for t in range(width)])
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)])
def test_gae_matches_paper_recursion_on_ragged_masks(gamma, lam):
    lengths = [1, 5, 9, 0, 3, 9, 7]
    width = 9
    g = gen(0)
    rewards = torch.randn(len(lengths), width, generator=g, dtype=torch.float64)
    values = torch.randn(len(lengths), width, generator=g, dtype=torch.float64)
    mask = lengths_mask(lengths, width)
    # Garbage at pads must not matter.
    rewards_dirty = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e6))
    values_dirty = torch.where(mask.bool(), values, torch.full_like(values, -1e6))

    adv, ret = ca.compute_gae(rewards_dirty, values_dirty, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = gae_reference(rows(rewards), rows(values), lengths, gamma, lam)

    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64), rtol=0, atol=1e-10)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_values():
    lengths = [4, 6, 2]
    width = 6
    g = gen(1)
    rewards = torch.randn(3, width, generator=g, dtype=torch.float64)
    values = torch.randn(3, width, generator=g, dtype=torch.float64)
    adv, ret = ca.compute_gae(rewards, values, lengths_mask(lengths, width), gamma=1.0, lam=1.0)
    for i, n in enumerate(lengths):
        for t in range(width):
            if t < n:
                reward_to_go = sum(rewards[i, k].item() for k in range(t, n))
                assert adv[i, t].item() == pytest.approx(reward_to_go - values[i, t].item(), abs=1e-10)
                assert ret[i, t].item() == pytest.approx(reward_to_go, abs=1e-10)
            else:
                assert adv[i, t].item() == 0.0 and ret[i, t].item() == 0.0


def test_gae_advantages_are_whitened_over_valid_tokens_with_zero_pads():
    lengths = [3, 8, 5, 1]
    mask = lengths_mask(lengths, 8)
    g = gen(2)
    rewards = torch.randn(4, 8, generator=g)
    values = torch.randn(4, 8, generator=g)
    adv, ret = ca.compute_advantages("gae", rewards=rewards, values=values, response_mask=mask, gamma=1.0, lam=0.95)
    valid = adv[mask.bool()].tolist()
    assert statistics.fmean(valid) == pytest.approx(0.0, abs=1e-6)
    assert statistics.stdev(valid) == pytest.approx(1.0, abs=1e-5)
    assert (adv[~mask.bool()] == 0).all() and (ret[~mask.bool()] == 0).all()
    assert not adv.requires_grad


# ----------------------------------------------------------------------------------------------------------
# TRL's PPO formulas (trl 0.29.1, trl/experimental/ppo/ppo_trainer.py), transcribed in their written form
# ----------------------------------------------------------------------------------------------------------

TRL_INVALID_LOGPROB = 1.0


def trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask):
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    mask_sum = mask.sum()
    bessel_correction = mask_sum / (mask_sum - 1)
    return variance * bessel_correction


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_ppo_step(
    logprobs,
    ref_logprobs,
    values,
    scores,
    sequence_lengths,
    new_logprobs,
    vpred,
    *,
    kl_coef,
    kl_estimator,
    gamma,
    lam,
    cliprange,
    cliprange_value,
    score_index=None,
):
    """TRL's rollout post-processing (steps 3-6) and one PPO micro-step on the whole batch.

    ``sequence_lengths`` is TRL's ``first_true_indices(response == pad) - 1`` (index of the last real token).
    ``score_index`` overrides TRL's reward index (``seq_len + 1`` when it fits, else ``seq_len``); everything
    else follows the trainer line by line.
    """
    batch, gen_length = logprobs.shape
    response_idxs = torch.arange(gen_length).repeat(batch, 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, TRL_INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, TRL_INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)

    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    if score_index is not None:
        actual_end = score_index
    rewards[actual_start, actual_end] += scores

    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = trl_masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)

    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, TRL_INVALID_LOGPROB)
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * trl_masked_mean(vf_loss_max, ~padding_mask_p1)
    logprobs_diff = new_logprobs - logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = trl_masked_mean(pg_loss_max, ~padding_mask)
    return {
        "rewards": rewards,
        "advantages": advantages,
        "returns": returns,
        "pg_loss": pg_loss,
        "vf_loss": vf_loss,
        "padding_mask": padding_mask,
        "padding_mask_p1": padding_mask_p1,
        "reward_index": actual_end,
    }


def random_rollout(seed, batch, width):
    g = gen(seed)
    logprobs = -torch.rand(batch, width, generator=g) * 3
    ref_logprobs = logprobs + 0.3 * torch.randn(batch, width, generator=g)
    new_logprobs = logprobs + 0.4 * torch.randn(batch, width, generator=g)
    values = torch.randn(batch, width, generator=g)
    vpred = values + 0.5 * torch.randn(batch, width, generator=g)
    scores = 2 * torch.randn(batch, generator=g)
    return logprobs, ref_logprobs, new_logprobs, values, vpred, scores


def ours_ppo_step(logprobs, ref_logprobs, values, scores, new_logprobs, vpred, response_mask, *, kl_coef, kl_estimator,
                  gamma, lam, value_mask=None):
    rewards, _ = ca.compute_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef, kl_estimator=kl_estimator)
    advantages, returns = ca.compute_advantages(
        "gae", rewards=rewards, values=values, response_mask=response_mask, gamma=gamma, lam=lam
    )
    pg_loss, _ = ca.compute_policy_loss("vanilla", new_logprobs, logprobs, advantages, response_mask, clip_ratio=0.2)
    vf_loss, _ = ca.compute_value_loss(
        vpred, values, returns, response_mask if value_mask is None else value_mask, cliprange_value=0.2
    )
    return {"rewards": rewards, "advantages": advantages, "returns": returns, "pg_loss": pg_loss, "vf_loss": vf_loss}


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_matches_trl_when_responses_fill_the_buffer(kl_estimator):
    """Responses without pads: TRL puts the score on the last token too, so every number must agree."""
    batch, width = 6, 10
    logprobs, ref_logprobs, new_logprobs, values, vpred, scores = random_rollout(3, batch, width)
    seq_lengths = torch.full((batch,), width - 1)
    trl = trl_ppo_step(
        logprobs, ref_logprobs, values, scores, seq_lengths, new_logprobs, vpred,
        kl_coef=0.05, kl_estimator=kl_estimator, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2,
    )
    assert (trl["reward_index"] == width - 1).all()
    ours = ours_ppo_step(
        logprobs, ref_logprobs, values, scores, new_logprobs, vpred, torch.ones(batch, width),
        kl_coef=0.05, kl_estimator=kl_estimator, gamma=1.0, lam=0.95,
    )
    for key in ("rewards", "advantages", "returns", "pg_loss", "vf_loss"):
        torch.testing.assert_close(ours[key], trl[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_matches_trl_on_ragged_responses_with_the_score_on_the_last_token(kl_estimator):
    """Ragged responses, TRL's reward index set to ours (the last real token) and values 0 after it.

    The value loss is compared on TRL's value mask (one slot past the response), which our function takes as
    its mask argument.
    """
    batch, width = 7, 9
    logprobs, ref_logprobs, new_logprobs, values, vpred, scores = random_rollout(4, batch, width)
    seq_lengths = torch.tensor([0, 3, 8, 5, 7, 1, 6])  # index of the last real token
    response_mask = lengths_mask((seq_lengths + 1).tolist(), width)
    values = values * response_mask  # the critic's value after the last real token is 0 on both sides
    trl = trl_ppo_step(
        logprobs, ref_logprobs, values, scores, seq_lengths, new_logprobs, vpred,
        kl_coef=0.1, kl_estimator=kl_estimator, gamma=0.99, lam=0.95, cliprange=0.2, cliprange_value=0.2,
        score_index=seq_lengths,
    )
    assert torch.equal(~trl["padding_mask"], response_mask.bool())
    ours = ours_ppo_step(
        logprobs, ref_logprobs, values, scores, new_logprobs, vpred, response_mask,
        kl_coef=0.1, kl_estimator=kl_estimator, gamma=0.99, lam=0.95, value_mask=~trl["padding_mask_p1"],
    )
    for key in ("rewards", "advantages", "returns", "pg_loss", "vf_loss"):
        torch.testing.assert_close(ours[key], trl[key], rtol=0, atol=1e-6, msg=key)


def test_trl_own_placement_puts_the_score_outside_the_policy_mask():
    """Documents trl#3750: TRL's reward slot seq_len + 1 is a pad; ours is always inside the mask."""
    batch, width = 4, 6
    logprobs, ref_logprobs, new_logprobs, values, vpred, scores = random_rollout(5, batch, width)
    seq_lengths = torch.tensor([2, 5, 0, 3])
    trl = trl_ppo_step(
        logprobs, ref_logprobs, values, scores, seq_lengths, new_logprobs, vpred,
        kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2,
    )
    assert trl["reward_index"].tolist() == [3, 5, 1, 4]
    policy_mask = ~trl["padding_mask"]
    inside = policy_mask[torch.arange(batch), trl["reward_index"]]
    assert inside.tolist() == [False, True, False, False]  # only the buffer-filling response keeps it inside

    mask = lengths_mask((seq_lengths + 1).tolist(), width)
    rewards, _ = ca.compute_rewards(scores, logprobs, ref_logprobs, mask, 0.05)
    kl_reward = -0.05 * (logprobs - ref_logprobs) * mask
    for i, last in enumerate(seq_lengths.tolist()):
        assert rewards[i, last].item() == pytest.approx(kl_reward[i, last].item() + scores[i].item(), abs=1e-6)
    assert (rewards[~mask.bool()] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# masked_whiten
# ----------------------------------------------------------------------------------------------------------


def test_masked_whiten_gives_zero_mean_unit_std_on_valid_tokens():
    g = gen(6)
    x = 3.0 + 5.0 * torch.randn(6, 11, generator=g)
    mask = lengths_mask([11, 4, 7, 1, 0, 9], 11)
    w = ca.masked_whiten(x, mask)
    valid = w[mask.bool()].tolist()
    assert statistics.fmean(valid) == pytest.approx(0.0, abs=1e-6)
    assert statistics.stdev(valid) == pytest.approx(1.0, abs=1e-6)

    kept = ca.masked_whiten(x, mask, shift_mean=False)[mask.bool()].tolist()
    original = x[mask.bool()].tolist()
    assert statistics.fmean(kept) == pytest.approx(statistics.fmean(original), abs=1e-5)
    assert statistics.stdev(kept) == pytest.approx(1.0, abs=1e-6)


def test_masked_whiten_matches_the_direct_formula():
    g = gen(7)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64)
    mask = lengths_mask([8, 2, 5, 6, 3], 8)
    valid = x[mask.bool()].tolist()
    mean, var = statistics.fmean(valid), statistics.variance(valid)
    expected = (x - mean) / math.sqrt(var + 1e-8)
    torch.testing.assert_close(ca.masked_whiten(x, mask), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("world_size", [2, 3])
def test_masked_whiten_with_injected_reduction_equals_whitening_the_union(world_size):
    g = gen(8)
    x = 2.0 + torch.randn(6, 7, generator=g)
    mask = lengths_mask([7, 3, 1, 6, 0, 4], 7)
    shards = list(zip(x.chunk(world_size), mask.chunk(world_size)))

    whitened = run_ranks(world_size, lambda rank, fn: ca.masked_whiten(*shards[rank], reduce_fn=fn))
    union = torch.cat(whitened)

    valid = x[mask.bool()].tolist()
    expected = (x - statistics.fmean(valid)) / math.sqrt(statistics.variance(valid) + 1e-8)
    torch.testing.assert_close(union, expected, rtol=0, atol=1e-5)
    # ... and local whitening of the shards would not have given it.
    local = torch.cat([ca.masked_whiten(xs, ms) for xs, ms in shards])
    assert not torch.allclose(local, expected, atol=1e-3)


def test_gae_whitening_with_injected_reduction_equals_single_process():
    g = gen(9)
    rewards = torch.randn(4, 6, generator=g)
    values = torch.randn(4, 6, generator=g)
    mask = lengths_mask([6, 2, 4, 5], 6)
    shards = list(zip(rewards.chunk(2), values.chunk(2), mask.chunk(2)))

    def work(rank, fn):
        r, v, m = shards[rank]
        return ca.compute_advantages("gae", rewards=r, values=v, response_mask=m, reduce_fn=fn)[0]

    distributed = torch.cat(run_ranks(2, work))
    raw, _ = gae_reference(rows(rewards), rows(values), [6, 2, 4, 5], 1.0, 0.95)
    raw_valid = [a for row, n in zip(raw, [6, 2, 4, 5]) for a in row[:n]]
    mean, std = statistics.fmean(raw_valid), math.sqrt(statistics.variance(raw_valid) + 1e-8)
    expected = torch.tensor([[(a - mean) / std if t < n else 0.0 for t, a in enumerate(row)]
                             for row, n in zip(raw, [6, 2, 4, 5])])
    torch.testing.assert_close(distributed, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# KL estimators and controllers
# ----------------------------------------------------------------------------------------------------------


def test_kl_estimators_match_direct_formulas():
    g = gen(10)
    logp = -3 * torch.rand(4, 6, generator=g, dtype=torch.float64)
    ref = -3 * torch.rand(4, 6, generator=g, dtype=torch.float64)
    for name, formula in [
        ("k1", lambda p, q: math.log(p / q)),
        ("k2", lambda p, q: 0.5 * math.log(p / q) ** 2),
        ("k3", lambda p, q: q / p - 1 - math.log(q / p)),
        ("abs", lambda p, q: abs(math.log(p / q))),
    ]:
        got = ca.kl_penalty(name, logp, ref)
        expected = [[formula(math.exp(a), math.exp(b)) for a, b in zip(ra, rb)]
                    for ra, rb in zip(rows(logp), rows(ref))]
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12, msg=name)
    for alias, name in [("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")]:
        assert ca.get_kl_estimator_fn(alias) is ca.get_kl_estimator_fn(name)


def test_k3_is_non_negative_everywhere():
    g = gen(11)
    logp = 30 * torch.randn(64, 64, generator=g)
    ref = logp + torch.cat([30 * torch.randn(64, 32, generator=g), 1e-7 * torch.randn(64, 32, generator=g)], dim=1)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        kl = ca.kl_penalty("k3", logp.to(dtype), ref.to(dtype))
        assert_finite(kl)
        assert (kl >= 0).all()
    tiny = torch.tensor([[1e-8, -1e-8, 3e-6, 0.0]])
    assert (ca.kl_penalty("low_var_kl", tiny, torch.zeros_like(tiny)) >= 0).all()


def test_kl_clamp():
    logp = torch.tensor([[0.0, -5.0, -30.0]])
    ref = torch.tensor([[-30.0, 0.0, 0.0]])
    kl = ca.kl_penalty("k1", logp, ref, clamp=10.0)
    assert kl.tolist() == [[10.0, -5.0, -10.0]]
    assert ca.kl_penalty("k3", logp, ref, clamp=10.0).max().item() == 10.0


def test_adaptive_kl_controller_follows_ziegler_formula():
    ctl = ca.AdaptiveKLController(init_kl_coef=0.2, target_kl=6.0, horizon=10000)
    expected = 0.2
    for kl, n in [(9.0, 256), (6.6, 512), (0.0, 128), (torch.tensor(5.4), 64), (100.0, 10000)]:
        ctl.update(kl, n)
        error = min(max(float(kl) / 6.0 - 1, -0.2), 0.2)
        expected *= 1 + error * n / 10000
        assert ctl.value == pytest.approx(expected, rel=1e-12)

    restored = ca.AdaptiveKLController(init_kl_coef=0.2, target_kl=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller_and_factory():
    fixed = ca.build_kl_controller("fixed", 0.3)
    fixed.update(100.0, 1000)
    assert isinstance(fixed, ca.FixedKLController) and fixed.value == 0.3
    other = ca.FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.3
    adaptive = ca.build_kl_controller("adaptive", 0.1, target_kl=6.0, horizon=500)
    assert isinstance(adaptive, ca.AdaptiveKLController) and adaptive.horizon == 500
    with pytest.raises(ValueError, match="adaptive, fixed"):
        ca.build_kl_controller("pid", 0.1)
    with pytest.raises(ValueError, match="target_kl"):
        ca.build_kl_controller("adaptive", 0.1)
    with pytest.raises(ValueError, match="horizon"):
        ca.AdaptiveKLController(0.1, 6.0, horizon=0)


# ----------------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------------


def test_rewards_place_the_score_on_the_last_valid_token():
    g = gen(12)
    lengths = [3, 6, 1, 0, 5]
    mask = lengths_mask(lengths, 6)
    logp = -torch.rand(5, 6, generator=g)
    ref = -torch.rand(5, 6, generator=g)
    scores = torch.tensor([1.0, -2.0, 0.5, 7.0, 3.0])
    rewards, metrics = ca.compute_rewards(scores, logp, ref, mask, 0.2)
    for i, n in enumerate(lengths):
        for t in range(6):
            kl_reward = -0.2 * (logp[i, t].item() - ref[i, t].item()) if t < n else 0.0
            score = scores[i].item() if t == n - 1 else 0.0
            assert rewards[i, t].item() == pytest.approx(kl_reward + score, abs=1e-6)
    assert (rewards[3] == 0).all()  # an all-masked row gets nothing

    per_seq_kl = [sum(logp[i, t].item() - ref[i, t].item() for t in range(n)) for i, n in enumerate(lengths)]
    assert metrics["kl"].item() == pytest.approx(statistics.fmean(per_seq_kl), abs=1e-6)
    assert metrics["non_score_reward"].item() == pytest.approx(-0.2 * statistics.fmean(per_seq_kl), abs=1e-6)
    assert metrics["scores"].item() == pytest.approx(statistics.fmean(scores.tolist()), abs=1e-6)


def test_missing_eos_penalty_and_score_clip():
    mask = torch.ones(3, 4)
    logp = torch.zeros(3, 4)
    scores = torch.tensor([0.5, 0.5, 4.0])
    has_eos = torch.tensor([True, False, True])
    rewards, metrics = ca.compute_rewards(scores, logp, logp, mask, 0.1, has_eos=has_eos, missing_eos_penalty=1.0)
    assert rewards[:, -1].tolist() == [0.5, -0.5, 4.0]
    assert metrics["no_eos_frac"].item() == pytest.approx(1 / 3)
    clipped, _ = ca.compute_rewards(
        scores, logp, logp, mask, 0.1, has_eos=has_eos, missing_eos_penalty=3.0, score_clip=2.0
    )
    assert clipped[:, -1].tolist() == [0.5, -2.0, 2.0]
    with pytest.raises(ValueError, match="has_eos"):
        ca.compute_rewards(scores, logp, logp, mask, 0.1, missing_eos_penalty=1.0)


def test_score_normalisation_uses_running_statistics():
    mask = torch.ones(4, 3)
    logp = torch.zeros(4, 3)
    norm = ca.RunningMeanStd()
    first = [1.0, 2.0, 4.0, 9.0]
    second = [0.0, -3.0, 5.0, 2.0]
    ca.compute_rewards(torch.tensor(first), logp, logp, mask, 0.0, score_normalizer=norm)
    rewards, _ = ca.compute_rewards(torch.tensor(second), logp, logp, mask, 0.0, score_normalizer=norm)
    seen = first + second
    mean, std = statistics.fmean(seen), math.sqrt(statistics.pvariance(seen) + 1e-8)
    assert rewards[:, -1].tolist() == pytest.approx([(s - mean) / std for s in second], abs=1e-6)


def test_running_mean_std_matches_statistics_and_checkpoints():
    g = gen(13)
    batches = [torch.randn(n, generator=g) * 3 + 1 for n in (5, 17, 1, 8)]
    rms = ca.RunningMeanStd()
    for b in batches:
        rms.update(b)
    everything = [v for b in batches for v in b.tolist()]
    assert rms.mean == pytest.approx(statistics.fmean(everything), abs=1e-12)
    assert rms.var == pytest.approx(statistics.pvariance(everything), abs=1e-12)
    assert rms.count == len(everything)

    masked = ca.RunningMeanStd()
    masked.update(torch.tensor([1.0, 100.0, 3.0]), mask=torch.tensor([1, 0, 1]))
    assert (masked.mean, masked.var, masked.count) == (2.0, 1.0, 2.0)

    restored = ca.RunningMeanStd()
    restored.load_state_dict(rms.state_dict())
    x = torch.tensor([0.0, 2.0])
    torch.testing.assert_close(restored.normalize(x), (x - rms.mean) / math.sqrt(rms.var + 1e-8))


def test_running_mean_std_with_injected_reduction_equals_union():
    g = gen(14)
    shards = [torch.randn(6, generator=g), torch.randn(3, generator=g) + 4]

    def work(rank, fn):
        rms = ca.RunningMeanStd()
        rms.update(torch.tensor([0.5, 1.5]))  # same history on every rank
        rms.update(shards[rank], reduce_fn=fn)
        return rms.state_dict()

    states = run_ranks(2, work)
    everything = [0.5, 1.5] + shards[0].tolist() + shards[1].tolist()
    for state in states:
        assert state["mean"] == pytest.approx(statistics.fmean(everything), abs=1e-12)
        assert state["var"] == pytest.approx(statistics.pvariance(everything), abs=1e-12)
        assert state["count"] == len(everything)


# ----------------------------------------------------------------------------------------------------------
# Group estimators and REINFORCE++
# ----------------------------------------------------------------------------------------------------------


def group_members(groups):
    members = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    return members


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_per_group_formula(norm_by_std):
    g = gen(15)
    scores = torch.randn(10, generator=g, dtype=torch.float64)
    groups = ["a", "b", "a", "c", "b", "a", "d", "c", "b", "c"]  # "d" is a single response
    mask = lengths_mask([3, 5, 1, 4, 5, 2, 5, 0, 3, 5], 5)
    adv, ret = ca.compute_advantages(
        "grpo", scores=scores, response_mask=mask, group_index=groups, norm_by_std=norm_by_std
    )
    s = scores.tolist()
    for key, idx in group_members(groups).items():
        vals = [s[i] for i in idx]
        mean = statistics.fmean(vals) if len(vals) > 1 else 0.0
        std = statistics.stdev(vals) if len(vals) > 1 else 1.0
        for i in idx:
            expected = (s[i] - mean) / (std + 1e-6) if norm_by_std else s[i] - mean
            row = adv[i][mask[i].bool()]
            assert torch.allclose(row, torch.full_like(row, expected), atol=1e-12)
    assert (adv[~mask.bool()] == 0).all()
    assert torch.equal(adv, ret)


def test_rloo_matches_leave_one_out_formula_with_contiguous_groups():
    g = gen(16)
    scores = torch.randn(12, generator=g, dtype=torch.float64)
    mask = torch.ones(12, 4)
    adv, ret = ca.compute_advantages("rloo", scores=scores, response_mask=mask, n_samples_per_prompt=4)
    s = scores.tolist()
    for i in range(12):
        start = (i // 4) * 4
        others = [s[j] for j in range(start, start + 4) if j != i]
        assert adv[i, 0].item() == pytest.approx(s[i] - statistics.fmean(others), abs=1e-12)
    torch.testing.assert_close(adv[:, 0:1].expand(-1, 4), adv)
    assert torch.equal(adv, ret)
    single, _ = ca.compute_advantages(
        "rloo", scores=scores[:2], response_mask=mask[:2], group_index=torch.tensor([7, 3])
    )
    assert single[:, 0].tolist() == s[:2]


def test_grpo_with_tensor_group_index_equals_n_samples_per_prompt():
    g = gen(17)
    scores = torch.randn(8, generator=g)
    mask = torch.ones(8, 3)
    by_n, _ = ca.compute_advantages("grpo", scores=scores, response_mask=mask, n_samples_per_prompt=4)
    by_index, _ = ca.compute_advantages(
        "grpo", scores=scores, response_mask=mask, group_index=torch.tensor([5, 5, 5, 5, 2, 2, 2, 2])
    )
    s = scores.tolist()
    first = s[:4]
    expected = (s[0] - statistics.fmean(first)) / (statistics.stdev(first) + 1e-6)
    assert by_n[0, 0].item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(by_n, by_index)


def test_reinforce_plus_plus_is_whitened_discounted_return():
    g = gen(18)
    lengths = [4, 2, 6, 1]
    rewards = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = lengths_mask(lengths, 6)
    adv, ret = ca.compute_advantages("reinforce_plus_plus", rewards=rewards, response_mask=mask, gamma=0.9)
    r = rows(rewards)
    expected_returns = []
    for i, n in enumerate(lengths):
        row = [0.0] * 6
        for t in range(n):
            row[t] = sum(0.9 ** (k - t) * r[i][k] for k in range(t, n))
        expected_returns.append(row)
    torch.testing.assert_close(ret, torch.tensor(expected_returns, dtype=torch.float64), rtol=0, atol=1e-12)
    valid = [expected_returns[i][t] for i, n in enumerate(lengths) for t in range(n)]
    mean, std = statistics.fmean(valid), math.sqrt(statistics.variance(valid) + 1e-8)
    expected_adv = [[(v - mean) / std if t < n else 0.0 for t, v in enumerate(row)]
                    for row, n in zip(expected_returns, lengths)]
    torch.testing.assert_close(adv, torch.tensor(expected_adv, dtype=torch.float64), rtol=0, atol=1e-10)


def test_advantage_estimators_report_missing_inputs():
    mask = torch.ones(4, 3)
    with pytest.raises(ValueError, match="'gae' needs values"):
        ca.compute_advantages("gae", rewards=torch.zeros(4, 3), response_mask=mask)
    with pytest.raises(ValueError, match="'grpo' needs scores"):
        ca.compute_advantages("grpo", response_mask=mask, n_samples_per_prompt=2)
    with pytest.raises(ValueError, match="group_index or n_samples_per_prompt"):
        ca.compute_advantages("rloo", scores=torch.zeros(4), response_mask=mask)
    with pytest.raises(ValueError, match="n_samples_per_prompt"):
        ca.compute_advantages("grpo", scores=torch.zeros(4), response_mask=mask, n_samples_per_prompt=3)
    with pytest.raises(ValueError, match="group_index"):
        ca.compute_advantages("grpo", scores=torch.zeros(4), response_mask=mask, group_index=[1, 2])


# ----------------------------------------------------------------------------------------------------------
# Policy loss
# ----------------------------------------------------------------------------------------------------------


def policy_reference(log_probs, old_log_probs, advantages, mask, low, high, c):
    """Per-token PPO loss and MindSpeed/TRL/verl statistics as plain Python, over valid tokens."""
    losses, abs_losses, ratios, clipped, clipfrac, lower, sq = [], [], [], [], [], [], []
    for lp_row, old_row, a_row, m_row in zip(rows(log_probs), rows(old_log_probs), rows(advantages), rows(mask)):
        for lp, old, a, m in zip(lp_row, old_row, a_row, m_row):
            if not m:
                continue
            r = math.exp(lp - old)
            rc = min(max(r, 1 - low), 1 + high)
            l1, l2 = -a * r, -a * rc
            loss = max(l1, l2)
            capped = c is not None and a < 0 and loss > c * -a
            if capped:
                loss = c * -a
            losses.append(loss)
            abs_losses.append(max(abs(l1), abs(l2)))
            ratios.append(r)
            clipped.append(rc)
            clipfrac.append(1.0 if l2 > l1 else 0.0)
            lower.append(1.0 if capped else 0.0)
            sq.append((lp - old) ** 2)
    mean = statistics.fmean
    return {
        "pg_loss": mean(losses), "abs_pg_loss": mean(abs_losses), "ppo_ratio": mean(ratios),
        "ppo_ratio_clamped": mean(clipped), "pg_clipfrac": mean(clipfrac), "pg_clipfrac_lower": mean(lower),
        "approx_kl": 0.5 * mean(sq),
    }


@pytest.mark.parametrize("low,high,c", [(0.2, 0.2, 3.0), (0.2, 0.28, 3.0), (0.1, 0.3, None), (0.2, 0.2, 1.5)])
def test_vanilla_policy_loss_matches_direct_formula(low, high, c):
    g = gen(19)
    old = -3 * torch.rand(6, 8, generator=g, dtype=torch.float64)
    new = old + 0.8 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    adv = torch.randn(6, 8, generator=g, dtype=torch.float64)
    mask = lengths_mask([8, 3, 5, 1, 7, 6], 8)
    loss, metrics = ca.compute_policy_loss(
        "vanilla", new, old, adv, mask, clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=c
    )
    expected = policy_reference(new, old, adv, mask, low, high, c)
    assert loss.item() == pytest.approx(expected["pg_loss"], abs=1e-12)
    for key, value in expected.items():
        assert metrics[key].item() == pytest.approx(value, abs=1e-12), key
    assert metrics["ppo_kl"].item() == pytest.approx(
        statistics.fmean((old - new)[mask.bool()].tolist()), abs=1e-12
    )


def test_approx_kl_and_ratio_relate_to_trls_padded_buffer_means_as_documented():
    """docs/trl_ppo.md: TRL fills new and old log-probs with 1.0 at padded positions and averages over the whole
    buffer, which equals ``f * approx_kl`` and ``1 + f * (ppo_ratio - 1)`` with ``f`` the valid fraction."""
    g = gen(23)
    old = -3 * torch.rand(4, 6, generator=g, dtype=torch.float64)
    new = old + 0.5 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = lengths_mask([6, 2, 4, 1], 6)
    _, metrics = ca.compute_policy_loss("vanilla", new, old, torch.randn(4, 6, generator=g, dtype=torch.float64),
                                        mask)
    padding = ~mask.bool()
    diff = new.masked_fill(padding, 1.0) - old.masked_fill(padding, 1.0)  # TRL's INVALID_LOGPROB
    trl_approxkl, trl_ratio = 0.5 * (diff ** 2).mean().item(), diff.exp().mean().item()
    f = 13 / 24
    assert trl_approxkl == pytest.approx(f * metrics["approx_kl"].item(), rel=1e-12)
    assert trl_ratio == pytest.approx(1 + f * (metrics["ppo_ratio"].item() - 1), rel=1e-12)
    assert metrics["approx_kl"].item() > trl_approxkl  # padding only ever shrinks TRL's value


def test_ratio_of_one_gives_no_clipping():
    g = gen(20)
    logp = -torch.rand(5, 7, generator=g)
    adv = torch.randn(5, 7, generator=g)
    mask = lengths_mask([7, 2, 4, 1, 6], 7)
    loss, metrics = ca.compute_policy_loss("vanilla", logp, logp.clone(), adv, mask)
    assert metrics["pg_clipfrac"].item() == 0.0
    assert metrics["pg_clipfrac_lower"].item() == 0.0
    assert metrics["ppo_ratio"].item() == 1.0
    assert metrics["ppo_ratio_clamped"].item() == 1.0
    assert metrics["approx_kl"].item() == 0.0
    assert loss.item() == pytest.approx(-statistics.fmean(adv[mask.bool()].tolist()), abs=1e-6)


def test_dual_clip_bounds_the_loss_for_negative_advantages():
    g = gen(21)
    for _ in range(50):
        a = -3 * torch.rand(1, 1, generator=g)
        log_ratio = 6 * torch.rand(1, 1, generator=g)
        loss, _ = ca.compute_policy_loss("vanilla", log_ratio, torch.zeros(1, 1), a, torch.ones(1, 1), clip_ratio_c=3.0)
        assert loss.item() <= 3.0 * abs(a.item()) + 1e-6
    adv = -torch.ones(2, 4)
    huge = torch.full((2, 4), 5.0)
    loss, metrics = ca.compute_policy_loss("vanilla", huge, torch.zeros(2, 4), adv, torch.ones(2, 4))
    assert loss.item() == pytest.approx(3.0) and metrics["pg_clipfrac_lower"].item() == 1.0
    unbounded, _ = ca.compute_policy_loss("vanilla", huge, torch.zeros(2, 4), adv, torch.ones(2, 4), clip_ratio_c=None)
    assert unbounded.item() == pytest.approx(math.exp(5.0), rel=1e-6)
    positive, _ = ca.compute_policy_loss("vanilla", huge, torch.zeros(2, 4), -adv, torch.ones(2, 4))
    assert positive.item() == pytest.approx(-1.2)  # positive advantages: the usual clip, no dual clip


def test_policy_loss_ignores_garbage_at_pads_in_value_and_gradient():
    g = gen(22)
    old = -torch.rand(3, 5, generator=g)
    new = (old + 0.3 * torch.randn(3, 5, generator=g)).requires_grad_()
    adv = torch.randn(3, 5, generator=g)
    mask = lengths_mask([5, 2, 3], 5)
    pad = ~mask.bool()
    dirty_old = old.masked_fill(pad, float("-inf"))
    dirty_adv = adv.masked_fill(pad, float("nan"))
    loss, metrics = ca.compute_policy_loss("vanilla", new, dirty_old, dirty_adv, mask)
    (grad,) = torch.autograd.grad(loss, new)
    assert_finite(loss, grad, *metrics.values())
    assert (grad[pad] == 0).all()
    clean_new = new.detach()[mask.bool()].reshape(1, -1)
    clean_loss, clean_metrics = ca.compute_policy_loss(
        "vanilla",
        clean_new,
        old[mask.bool()].reshape(1, -1),
        adv[mask.bool()].reshape(1, -1),
        torch.ones_like(clean_new),
    )
    assert loss.item() == pytest.approx(clean_loss.item(), abs=1e-6)
    for key in metrics:
        assert metrics[key].item() == pytest.approx(clean_metrics[key].item(), abs=1e-6), key


def test_policy_loss_with_global_count_returns_this_micro_batch_share():
    g = gen(36)
    logp = -torch.rand(3, 4, generator=g)
    adv = torch.randn(3, 4, generator=g)
    mask = lengths_mask([4, 2, 3], 4)
    local, metrics = ca.compute_policy_loss("vanilla", logp + 0.1, logp, adv, mask)
    share, share_metrics = ca.compute_policy_loss("vanilla", logp + 0.1, logp, adv, mask, global_token_count=36)
    assert share.item() == pytest.approx(local.item() * 9 / 36, abs=1e-7)  # 9 local tokens of 36
    assert share_metrics["pg_loss"].item() == pytest.approx(metrics["pg_loss"].item())  # metrics stay local


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert ca.masked_mean(x, mask).item() == pytest.approx(7 / 3)
    assert ca.masked_mean(x, mask, dim=1).tolist() == [1.5, 4.0]
    assert ca.masked_mean(x, torch.zeros(2, 3)).item() == 0.0


def test_metrics_are_detached_zero_dim_tensors():
    logp = torch.zeros(2, 3, requires_grad=True)
    _, pm = ca.compute_policy_loss("vanilla", logp, torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3))
    _, vm = ca.compute_value_loss(logp, torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3))
    _, rm = ca.compute_rewards(torch.zeros(2), logp, torch.zeros(2, 3), torch.ones(2, 3), 0.1)
    assert {"pg_loss", "abs_pg_loss", "ppo_ratio", "ppo_ratio_clamped", "pg_clipfrac", "approx_kl"} <= set(pm)
    assert {"vf_loss", "vf_clipfrac", "explained_variance"} <= set(vm)
    for metrics in (pm, vm, rm):
        for key, value in metrics.items():
            assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, key


# ----------------------------------------------------------------------------------------------------------
# Value loss and explained variance
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cliprange", [0.2, None])
def test_value_loss_matches_direct_formula(cliprange):
    g = gen(23)
    old = torch.randn(4, 6, generator=g, dtype=torch.float64)
    new = old + 0.5 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    ret = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = lengths_mask([6, 1, 4, 3], 6)
    loss, metrics = ca.compute_value_loss(new, old, ret, mask, cliprange_value=cliprange)
    losses, clipped = [], []
    for v_row, o_row, r_row, m_row in zip(rows(new), rows(old), rows(ret), rows(mask)):
        for v, o, r, m in zip(v_row, o_row, r_row, m_row):
            if m:
                vc = v if cliprange is None else min(max(v, o - cliprange), o + cliprange)
                losses.append(0.5 * max((v - r) ** 2, (vc - r) ** 2))
                clipped.append(1.0 if (vc - r) ** 2 > (v - r) ** 2 else 0.0)
    assert loss.item() == pytest.approx(statistics.fmean(losses), abs=1e-12)
    assert metrics["vf_loss"].item() == pytest.approx(statistics.fmean(losses), abs=1e-12)
    assert metrics["vf_clipfrac"].item() == pytest.approx(statistics.fmean(clipped), abs=1e-12)
    if cliprange is None:
        assert metrics["vf_clipfrac"].item() == 0.0


def test_explained_variance():
    g = gen(24)
    ret = torch.randn(3, 5, generator=g, dtype=torch.float64)
    pred = ret + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = lengths_mask([5, 2, 4], 5)
    r = ret[mask.bool()].tolist()
    resid = (ret - pred)[mask.bool()].tolist()
    expected = 1 - statistics.pvariance(resid) / statistics.pvariance(r)
    assert ca.explained_variance(pred, ret, mask).item() == pytest.approx(expected, abs=1e-12)
    assert ca.explained_variance(ret, ret, mask).item() == 1.0
    assert ca.explained_variance(pred, torch.ones_like(ret), mask).item() == 0.0  # nothing to explain
    split = run_ranks(2, lambda rank, fn: ca.explained_variance(pred.chunk(2)[rank], ret.chunk(2)[rank],
                                                                 mask.chunk(2)[rank], reduce_fn=fn))
    for value in split:
        assert value.item() == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Loss aggregation: DP size and micro-batch split do not change the gradient
# ----------------------------------------------------------------------------------------------------------

AGG_LENGTHS = [7, 1, 3, 0, 6, 2, 7, 4]
NORM_LENGTH = 9


def agg_reference(loss_mat, mask, mode):
    """Full-batch loss written directly (all-masked sequences are not counted)."""
    per_seq_sum = (loss_mat * mask).sum(-1)
    per_seq_tokens = mask.sum(-1)
    nonempty = per_seq_tokens > 0
    if mode == "token-mean":
        return per_seq_sum.sum() / per_seq_tokens.sum()
    if mode == "seq-mean-token-mean":
        return (per_seq_sum[nonempty] / per_seq_tokens[nonempty]).mean()
    if mode == "seq-mean-token-sum-norm":
        return (per_seq_sum[nonempty] / NORM_LENGTH).mean()
    return per_seq_sum[nonempty].mean()


def make_loss_inputs():
    g = gen(25)
    x = torch.randn(len(AGG_LENGTHS), 7, generator=g)
    w = torch.randn(7, generator=g).requires_grad_()
    return x, w, lengths_mask(AGG_LENGTHS, 7)


def per_token_loss(x, w):
    return torch.sin(x * w) + (x - w) ** 2


@pytest.mark.parametrize("mode", ca.LOSS_AGG_MODES)
@pytest.mark.parametrize("n_pieces", [1, 2, 4])
def test_agg_loss_split_into_micro_batches_gives_the_full_batch_gradient(mode, n_pieces):
    x, w, mask = make_loss_inputs()
    (expected,) = torch.autograd.grad(agg_reference(per_token_loss(x, w), mask, mode), w)

    pieces = list(zip(x.chunk(n_pieces), mask.chunk(n_pieces)))
    token_count, seq_count = sum(ca.loss_token_counts(m) for _, m in pieces).tolist()
    assert (token_count, seq_count) == (sum(AGG_LENGTHS), sum(1 for n in AGG_LENGTHS if n))
    total = sum(ca.agg_loss(per_token_loss(xp, w), mp, mode, token_count, seq_count, NORM_LENGTH)
                for xp, mp in pieces)
    (grad,) = torch.autograd.grad(total, w)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ca.LOSS_AGG_MODES)
def test_agg_loss_under_simulated_dp_with_gradient_averaging(mode):
    """2 DP ranks x 2 micro-batches: all-reduced counts, per-rank accumulation, DDP mean times DP size."""
    x, w, mask = make_loss_inputs()
    (expected,) = torch.autograd.grad(agg_reference(per_token_loss(x, w), mask, mode), w)
    dp_size, micro = 2, 2
    rank_x, rank_m = x.chunk(dp_size), mask.chunk(dp_size)

    def counts(rank, fn):
        local = sum(ca.loss_token_counts(m) for m in rank_m[rank].chunk(micro))
        return fn(local)

    global_counts = run_ranks(dp_size, counts)
    rank_grads = []
    for rank in range(dp_size):
        tokens, seqs = global_counts[rank].tolist()
        loss = sum(ca.agg_loss(per_token_loss(xm, w), mm, mode, tokens, seqs, NORM_LENGTH)
                   for xm, mm in zip(rank_x[rank].chunk(micro), rank_m[rank].chunk(micro)))
        rank_grads.append(torch.autograd.grad(loss * dp_size, w)[0])  # scaled to undo DDP's average
    ddp_grad = sum(rank_grads) / dp_size
    torch.testing.assert_close(ddp_grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ca.LOSS_AGG_MODES)
def test_agg_loss_without_global_counts_is_the_batch_loss(mode):
    x, w, mask = make_loss_inputs()
    expected = agg_reference(per_token_loss(x, w), mask, mode)
    actual = ca.agg_loss(per_token_loss(x, w), mask, mode, norm_length=NORM_LENGTH)
    assert actual.item() == pytest.approx(expected.item(), abs=1e-6)


def test_local_normalisation_would_depend_on_the_split():
    """The reason for global counts: averaging per-micro-batch token means is not the full-batch mean."""
    x, w, mask = make_loss_inputs()
    full = agg_reference(per_token_loss(x, w), mask, "token-mean")
    averaged = sum(ca.agg_loss(per_token_loss(xp, w), mp) for xp, mp in zip(x.chunk(4), mask.chunk(4))) / 4
    assert abs(full.item() - averaged.item()) > 1e-3
    assert ca.agg_loss(per_token_loss(x, w), mask).item() == pytest.approx(full.item(), abs=1e-6)


def test_agg_loss_all_masked_batch_is_zero_with_finite_gradient():
    w = torch.ones(3, requires_grad=True)
    for mode in ca.LOSS_AGG_MODES:
        loss = ca.agg_loss(w.expand(2, 3) * 5, torch.zeros(2, 3), mode, norm_length=3)
        (grad,) = torch.autograd.grad(loss, w)
        assert loss.item() == 0.0 and (grad == 0).all()


# ----------------------------------------------------------------------------------------------------------
# Entropy bonus, KL loss, ptx loss
# ----------------------------------------------------------------------------------------------------------


def test_entropy_kl_and_ptx_loss_terms_match_direct_formulas():
    g = gen(30)
    mask = lengths_mask([4, 1, 3], 4)
    valid = mask.bool()
    entropy = torch.rand(3, 4, generator=g) * 2
    loss, metrics = ca.compute_entropy_loss(entropy, mask, entropy_coef=0.01)
    mean_entropy = statistics.fmean(entropy[valid].tolist())
    assert loss.item() == pytest.approx(-0.01 * mean_entropy, abs=1e-7)
    assert metrics["entropy"].item() == pytest.approx(mean_entropy, abs=1e-6)

    logp = -3 * torch.rand(3, 4, generator=g, dtype=torch.float64)
    ref = logp + 4 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    loss, metrics = ca.compute_kl_loss(logp, ref, mask)  # defaults: low_var_kl, coef 0.001, clamp 10
    per_token = [min(math.exp(b - a) - 1 - (b - a), 10.0) for a, b in zip(logp[valid].tolist(), ref[valid].tolist())]
    assert metrics["kl_loss"].item() == pytest.approx(statistics.fmean(per_token), abs=1e-10)
    assert loss.item() == pytest.approx(0.001 * statistics.fmean(per_token), abs=1e-12)

    ptx_logp = (-3 * torch.rand(3, 4, generator=g)).requires_grad_()
    loss, metrics = ca.compute_ptx_loss(ptx_logp, mask, ptx_coef=0.5)
    cross_entropy = -statistics.fmean(ptx_logp[valid].tolist())
    assert metrics["ptx_loss"].item() == pytest.approx(cross_entropy, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * cross_entropy, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, ptx_logp)
    torch.testing.assert_close(grad, -0.5 * mask / mask.sum())


# ----------------------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------------------


def full_pipeline(logp, ref, values, scores, mask, new_logp, new_values, adv_name="gae"):
    rewards, reward_metrics = ca.compute_rewards(scores, logp, ref, mask, 0.05)
    adv, ret = ca.compute_advantages(
        adv_name, rewards=rewards, values=values, scores=scores, response_mask=mask, n_samples_per_prompt=2
    )
    pg, pg_metrics = ca.compute_policy_loss("vanilla", new_logp, logp, adv, mask)
    vf, vf_metrics = ca.compute_value_loss(new_values, values, ret, mask)
    kl, kl_metrics = ca.compute_kl_loss(new_logp, ref, mask)
    return [rewards, adv, ret, pg, vf, kl, *reward_metrics.values(), *pg_metrics.values(), *vf_metrics.values(),
            *kl_metrics.values()]


def pipeline_inputs(seed, batch, width, dtype=torch.float32):
    g = gen(seed)
    logp = -3 * torch.rand(batch, width, generator=g)
    ref = logp + 0.2 * torch.randn(batch, width, generator=g)
    values = torch.randn(batch, width, generator=g)
    scores = torch.randn(batch, generator=g)
    new_logp = logp + 0.1 * torch.randn(batch, width, generator=g)
    new_values = values + 0.1 * torch.randn(batch, width, generator=g)
    return [t.to(dtype) for t in (logp, ref, values, scores)] + [new_logp.to(dtype), new_values.to(dtype)]


@pytest.mark.parametrize("adv_name", ["gae", "grpo", "rloo", "reinforce_plus_plus"])
def test_all_masked_row_produces_no_nan(adv_name):
    logp, ref, values, scores, new_logp, new_values = pipeline_inputs(31, 4, 5)
    mask = lengths_mask([5, 0, 3, 2], 5)
    new_logp.requires_grad_()
    outputs = full_pipeline(logp, ref, values, scores, mask, new_logp, new_values, adv_name)
    assert_finite(*outputs)
    rewards, adv = outputs[0], outputs[1]
    assert (rewards[1] == 0).all() and (adv[1] == 0).all()
    (grad,) = torch.autograd.grad(outputs[3] + outputs[5], new_logp)
    assert_finite(grad)


def test_fully_masked_batch_produces_no_nan():
    logp, ref, values, scores, new_logp, new_values = pipeline_inputs(32, 2, 3)
    mask = torch.zeros(2, 3)
    outputs = full_pipeline(logp, ref, values, scores, mask, new_logp, new_values)
    assert_finite(*outputs)
    assert outputs[3].item() == 0.0 and outputs[4].item() == 0.0
    torch.testing.assert_close(ca.masked_whiten(values, mask), values)


def test_response_of_length_one():
    logp, ref, values, scores, new_logp, new_values = pipeline_inputs(33, 4, 1)
    mask = torch.ones(4, 1)
    outputs = full_pipeline(logp, ref, values, scores, mask, new_logp, new_values)
    assert_finite(*outputs)
    rewards = outputs[0]
    expected = -0.05 * (logp - ref)[:, 0] + scores
    torch.testing.assert_close(rewards[:, 0], expected)
    adv_raw, ret = ca.compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv_raw[:, 0], rewards[:, 0] - values[:, 0])  # V after the only token is 0
    single = torch.ones(1, 1)
    w = ca.masked_whiten(torch.tensor([[3.0]]), single)
    assert w.item() == 0.0  # one valid value: nothing to scale, no division by zero


def test_bf16_inputs_give_finite_fp32_results_equal_to_fp32_on_the_same_values():
    bf16 = pipeline_inputs(34, 4, 6, dtype=torch.bfloat16)
    as_fp32 = [t.float() for t in bf16]
    mask = lengths_mask([6, 3, 1, 5], 6)
    out_bf16 = full_pipeline(*bf16[:4], mask, *bf16[4:])
    out_fp32 = full_pipeline(*as_fp32[:4], mask, *as_fp32[4:])
    assert_finite(*out_bf16)
    for a, b in zip(out_bf16, out_fp32):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bool_int_and_float_masks_are_equivalent():
    logp, ref, values, scores, new_logp, new_values = pipeline_inputs(35, 4, 5)
    lengths = [5, 2, 0, 4]
    results = [
        full_pipeline(logp, ref, values, scores, lengths_mask(lengths, 5, dtype), new_logp, new_values)
        for dtype in (torch.bool, torch.int64, torch.float32, torch.bfloat16)
    ]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def test_shape_mismatch_names_the_argument():
    a, b = torch.zeros(2, 5), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="old_log_probs has shape \\[2, 4\\] but log_probs has shape \\[2, 5\\]"):
        ca.compute_policy_loss("vanilla", a, b, a, torch.ones(2, 5))
    with pytest.raises(ValueError, match="response_mask has shape"):
        ca.compute_value_loss(a, a, a, torch.ones(2, 4))
    with pytest.raises(ValueError, match="values has shape"):
        ca.compute_gae(a, b, torch.ones(2, 5))
    with pytest.raises(ValueError, match="scores must have shape \\[2\\]"):
        ca.compute_rewards(torch.zeros(3), a, a, torch.ones(2, 5), 0.1)
    with pytest.raises(ValueError, match="log_probs must be 2-D"):
        ca.compute_rewards(torch.zeros(2), torch.zeros(2, 5, 1), torch.zeros(2, 5, 1), torch.ones(2, 5, 1), 0.1)
    with pytest.raises(ValueError, match="has_eos"):
        ca.compute_rewards(torch.zeros(2), a, a, torch.ones(2, 5), 0.1, has_eos=torch.ones(3, dtype=torch.bool))


def test_unknown_names_list_the_valid_choices():
    x = torch.zeros(2, 3)
    valid_kl = "abs, k1, k2, k3, kl, low_var_kl, mse"
    with pytest.raises(ValueError, match=f"unknown KL estimator 'k4'; valid choices: {valid_kl}"):
        ca.kl_penalty("k4", x, x)
    with pytest.raises(ValueError, match="valid choices: dr_grpo, gae, grpo, reinforce_plus_plus, rloo"):
        ca.compute_advantages("ppo", rewards=x, values=x, response_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="unknown policy loss 'clip'; valid choices: .*vanilla"):
        ca.compute_policy_loss("clip", x, x, x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="valid choices: seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm, token-mean"):
        ca.agg_loss(x, torch.ones(2, 3), "sum")
    with pytest.raises(ValueError, match="valid choices"):
        ca.compute_kl_loss(x, x, torch.ones(2, 3), kl_estimator="full")


@pytest.mark.parametrize("bad", [torch.tensor([[1, 2, 0]]), torch.tensor([[0.5, 1.0, 0.0]]),
                                 torch.tensor([[1.0, float("nan"), 0.0]]), torch.tensor([[-1, 1, 0]])])
def test_mask_with_values_other_than_zero_and_one_is_rejected(bad):
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="response_mask must hold only 0/1 values"):
        ca.compute_policy_loss("vanilla", x, x, x, bad)
    with pytest.raises(ValueError, match="response_mask must hold only 0/1 values"):
        ca.compute_advantages("gae", rewards=x, values=x, response_mask=bad)
    with pytest.raises(ValueError, match="response_mask must hold only 0/1 values"):
        ca.compute_rewards(torch.zeros(1), x, x, bad, 0.1)
    with pytest.raises(ValueError, match="^mask must hold only 0/1 values"):
        ca.masked_whiten(x, bad)
    with pytest.raises(ValueError, match="ptx_mask must hold only 0/1 values"):
        ca.compute_ptx_loss(x, bad, 1.0)


def test_invalid_settings_are_rejected():
    x, m = torch.zeros(1, 3), torch.ones(1, 3)
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        ca.compute_policy_loss("vanilla", x, x, x, m, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="clip_ratio_low"):
        ca.compute_policy_loss("vanilla", x, x, x, m, clip_ratio_low=1.0)
    with pytest.raises(ValueError, match="cliprange_value"):
        ca.compute_value_loss(x, x, x, m, cliprange_value=0.0)
    with pytest.raises(ValueError, match="score_clip"):
        ca.compute_rewards(torch.zeros(1), x, x, m, 0.1, score_clip=-1.0)
    with pytest.raises(ValueError, match="kl_coef"):
        ca.FixedKLController(-0.1)
