"""Bad input to ``--stage trl_ppo`` is caught before anything is built: every coefficient where the flags are
parsed, and the user's reward function by a probe call and at every call (type, length, finiteness, exceptions)."""
import re
import subprocess
import sys

import pytest

from posttrain.arguments import ArgumentError, dataclass_from_args
from posttrain.trl_ppo.models import RewardFunction, RewardFunctionError
from posttrain.trl_ppo.trainer import ARG_GROUPS, build_parser
from tests.torchrun_utils import REPO

BASE = ["--ref-model", "ACTOR", "--reward-model", "RM", "--data-path", "DATA"]


def parse(extra):
    args = build_parser().parse_args(BASE + extra)
    return [dataclass_from_args(cls, args) for cls, _ in ARG_GROUPS]


@pytest.mark.parametrize("extra, flag", [
    (["--clip-ratio", "-1"], "--clip-ratio"), (["--clip-ratio", "1"], "--clip-ratio"),
    (["--clip-ratio-low", "1.5"], "--clip-ratio-low"), (["--clip-ratio-high", "-0.1"], "--clip-ratio-high"),
    (["--clip-ratio-c", "0.5"], "--clip-ratio-c"), (["--cliprange-value", "0"], "--cliprange-value"),
    (["--kl-coef", "-0.1"], "--kl-coef"), (["--kl-target", "0"], "--kl-target"), (["--kl-clamp", "-1"], "--kl-clamp"),
    (["--gamma", "1.5"], "--gamma"), (["--lam", "-0.2"], "--lam"), (["--entropy-coef", "-1"], "--entropy-coef"),
    (["--ptx-coef", "-1"], "--ptx-coef"), (["--temperature", "0"], "--temperature"), (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.2"], "--top-p"), (["--top-k", "-3"], "--top-k"), (["--kl-loss-coef", "-1"], "--kl-loss-coef"),
    (["--ema-decay", "1"], "--ema-decay"), (["--missing-eos-penalty", "-1"], "--missing-eos-penalty"),
    (["--reward-clip", "0"], "--reward-clip"), (["--tis-cap", "0"], "--tis-cap"),
    (["--overlong-buffer-len", "200"], "--overlong-buffer-len"), (["--lr", "-1"], "--lr"),
    (["--critic-lr", "-1"], "--critic-lr"), (["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--ppo-epochs", "0"], "--ppo-epochs"), (["--eval-interval", "-1"], "--eval-interval"),
    (["--dynamic-sampling"], "--dynamic-sampling"), (["--adv-estimator", "grpo"], "--n-samples-per-prompt"),
    (["--save-interval", "-1"], "--save-interval"), (["--weight-decay", "-1"], "--weight-decay"),
])
def test_every_coefficient_is_checked_where_the_flags_are_parsed(extra, flag):
    with pytest.raises(ArgumentError, match=flag):
        parse(extra)


@pytest.mark.parametrize("argv, message", [
    (["--ref-model", "ACTOR", "--data-path", "DATA"], "give --reward-model, --reward-function, or both"),
    (BASE + ["--ptx-coef", "0.1"], "--ptx-coef needs --pretrain-data-path"),
    (BASE + ["--lr", "1e-5", "--min-lr", "1e-4", "--lr-decay-style", "cosine"],
     "--min-lr 0.0001 is larger than --lr 1e-05"),
    (BASE + ["--old-log-probs", "rollout", "--rollout-correction", "tis"],
     "--rollout-correction tis weighs the trainer's recomputed log-probs against the sampler's: it needs "
     "--old-log-probs recompute"),
], ids=["no-reward", "ptx-without-data", "min-lr-above-lr", "rollout-log-probs-with-correction"])
def test_flag_combinations_are_checked_where_the_flags_are_parsed(argv, message):
    with pytest.raises(ArgumentError) as info:
        [dataclass_from_args(cls, build_parser().parse_args(argv)) for cls, _ in ARG_GROUPS]
    assert str(info.value) == message


@pytest.mark.parametrize("extra, dp, message", [
    (["--global-batch-size", "4"], 3, "--global-batch-size 4 is not divisible by the data-parallel size 3"),
    (["--global-batch-size", "4", "--ppo-mini-batch-size", "3"], 1,
     "--ppo-mini-batch-size 3 does not divide the rollout of 4 sequences"),
    (["--global-batch-size", "4", "--micro-batch-size", "2", "--ppo-mini-batch-size", "2"], 2,
     "--ppo-mini-batch-size 2 is not divisible by data-parallel size 2 x --micro-batch-size 2"),
], ids=["global-batch", "mini-batch-vs-rollout", "mini-batch-vs-dp"])
def test_batch_sizes_are_checked_against_the_data_parallel_size(extra, dp, message):
    ppo = parse(extra)[0]
    with pytest.raises(ArgumentError, match=re.escape(message)):
        ppo.check_layout(dp)


def test_an_actor_without_an_eos_token_needs_stop_token_ids():
    from posttrain.trl_ppo.models import PPOModels

    with pytest.raises(ArgumentError, match="no EOS id in the dataset metadata or the actor's config: give "
                                            "--stop-token-ids"):
        PPOModels._special_tokens({"vocab_size": 300}, None, None, [])
    assert PPOModels._special_tokens({"vocab_size": 300}, None, None, [7]) == ([7], 7)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_plus_plus"])
def test_critic_free_estimators_have_no_critic_and_refuse_a_critic_checkpoint(estimator):
    group = ["--n-samples-per-prompt", "2"]
    assert not parse(["--adv-estimator", estimator] + group)[0].uses_critic
    assert not parse(["--adv-estimator", estimator, "--critic-lr", "1e-6"] + group)[0].uses_critic  # shared flags
    assert parse([])[0].uses_critic and parse(["--critic-model", "CRITIC"])[0].uses_critic  # gae reads values
    with pytest.raises(ArgumentError, match=f"^--critic-model: --adv-estimator {estimator} has no critic"):
        parse(["--adv-estimator", estimator, "--critic-model", "CRITIC"] + group)


def test_the_command_line_fails_in_one_line_before_building_or_writing_anything(tmp_path):
    proc = subprocess.run([sys.executable, "pretrain_gpt.py", "--stage", "trl_ppo", *BASE, "--clip-ratio=-1",
                           "--save", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: --clip-ratio must be > 0.0 and < 1.0, got -1.0"
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def write_module(tmp_path, body):
    path = tmp_path / "reward.py"
    path.write_text(body)
    return str(path)


GOOD = "def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n"


@pytest.mark.parametrize("body, message", [
    ("def score(prompts, responses):\n    return [1.0]\n", "returned 1 scores for 2 responses at iteration 3"),
    ("def score(prompts, responses):\n    return 1.0\n", "returned float at iteration 3"),
    ("def score(prompts, responses):\n    return ['a', 'b']\n", "returned str 'a' for row 0 at iteration 3"),
    ("def score(prompts, responses):\n    return [1.0, float('nan')]\n", "returned nan for row 1 at iteration 3"),
    ("def score(prompts, responses):\n    return [float('inf'), 0.0]\n", "returned inf for row 0 at iteration 3"),
    ("def score(prompts, responses):\n    return [True, False]\n", "returned bool True for row 0"),
    ("def score(prompts, responses):\n    raise ValueError('boom from user reward')\n",
     "raised ValueError: boom from user reward at iteration 3"),
    ("def score(prompts, responses):\n    return {}['missing']\n", "raised KeyError: 'missing' at iteration 3"),
])
def test_every_call_checks_what_the_function_returns(tmp_path, body, message):
    fn = RewardFunction(write_module(tmp_path, body) + ":score")
    with pytest.raises(RewardFunctionError) as info:
        fn(["p1", "p2"], ["r1", "r2"], where="at iteration 3")
    assert message in str(info.value) and "reward.py:score" in str(info.value)


def test_good_results_of_any_sequence_type_become_float_scores(tmp_path):
    import numpy as np
    import torch

    for body in (GOOD, "import numpy as np\ndef score(p, r):\n    return np.array([1, 2])\n",
                 "import torch\ndef score(p, r):\n    return torch.tensor([1.0, 2.0])\n"):
        fn = RewardFunction(write_module(tmp_path, body) + ":score")
        out = fn(["a", "b"], ["x", "yz"])
        assert out.dtype == torch.float32 and out.shape == (2,)
    assert np  # numpy arrays and tensors are accepted as well as lists


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "must look like module:callable"),
    ("/nonexistent/file.py:score", "FileNotFoundError"),
    ("posttrain.nonexistent_module:score", "ModuleNotFoundError"),
    ("posttrain.errors:no_such_name", "AttributeError"),
    ("posttrain.atomic:WRITER_FILE", "is not callable"),
])
def test_a_function_that_cannot_be_loaded_is_named(spec, message):
    with pytest.raises(RewardFunctionError, match=message):
        RewardFunction(spec)


def test_the_probe_call_fails_at_start_up(tmp_path):
    fn = RewardFunction(write_module(tmp_path, "def score(prompts, responses):\n    return [1.0, 2.0]\n") + ":score")
    with pytest.raises(RewardFunctionError, match="returned 2 scores for 1 responses at start-up"):
        fn.probe()
    RewardFunction(write_module(tmp_path, GOOD) + ":score").probe()


def test_extra_columns_are_passed_by_name_and_missing_ones_are_refused(tmp_path):
    body = ("def score(prompts, responses, answer, data_source='x'):\n"
            "    return [float(r.strip() == a) for r, a in zip(responses, answer)]\n")
    fn = RewardFunction(write_module(tmp_path, body) + ":score", columns=["answer", "data_source", "other"])
    assert fn.columns == ["answer", "data_source"]
    assert fn(["q1", "q2"], [" 4", "5"], {"answer": ["4", "6"], "data_source": ["a", "b"],
                                          "other": [1, 2]}).tolist() == [1.0, 0.0]
    with pytest.raises(RewardFunctionError, match="takes answer, which the prompt dataset does not provide"):
        RewardFunction(write_module(tmp_path, body) + ":score", columns=[])
