"""The verifiable-reward example: its problem generator, its rule-based reward and its launch script.

The generator must give training and held-out splits that are disjoint and exactly checkable; the reward must score
correct, wrong and malformed answers as posttrain/rewards/arithmetic.py documents, on every generated problem inside
the model's real chat template; the script's dry run must print flags that exist, and the script must run GRPO end to
end on SmolLM2-135M-Instruct (two iterations, no critic), scoring the held-out answers as an independent check does.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from posttrain.rewards import arithmetic
from posttrain.rewards.arithmetic import Problem, all_problems, parse_answer, problem_from_prompt, split_problems
from posttrain.trl_ppo.models import RewardFunction
from tests.examples.test_scripts import commands, dry_run, flag_values, help_flags, torchrun_command
from tests.torchrun_utils import REPO

SCRIPT = "examples/mcore/smollm2/grpo_arithmetic_smollm2_135m.sh"


def chat_prompt(problem: str) -> str:
    """A prompt as the trainer decodes it: SmolLM2's chat template around the generator's instruction."""
    return ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{arithmetic.INSTRUCTION.format(problem=problem)}<|im_end|>\n"
            "<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------------------------------
# problems and splits
# ----------------------------------------------------------------------------------------------------------------

def test_generator_writes_disjoint_splits_whose_answers_are_exact(tmp_path):
    proc = subprocess.run([sys.executable, "tools/make_arithmetic_data.py", "--output-dir", str(tmp_path),
                           "--max-operand", "12", "--eval-size", "64", "--seed", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    train = pq.read_table(tmp_path / "arithmetic_train.parquet").to_pylist()
    held_out = pq.read_table(tmp_path / "arithmetic_eval.parquet").to_pylist()
    assert len(held_out) == 64
    for row in train + held_out:
        problem = problem_from_prompt(row["instruction"])
        assert problem.text == row["problem"]
        a, op, b = row["problem"].split()
        assert row["answer"] == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert "Answer: " in row["instruction"]
        assert 0 <= problem.a <= 12 and 0 <= problem.b <= 12
    train_keys = {problem_from_prompt(r["instruction"]).key for r in train}
    held_keys = [problem_from_prompt(r["instruction"]).key for r in held_out]
    assert len(set(held_keys)) == 64  # no held-out problem twice, not even as b + a
    assert not train_keys & set(held_keys)
    # every problem of the range that is not held out (in either order) is trained on, once
    train_texts = [r["problem"] for r in train]
    assert len(train_texts) == len(set(train_texts))
    assert set(train_texts) == {p.text for p in all_problems(12) if p.key not in set(held_keys)}


def test_generator_is_reproducible_and_the_seed_changes_the_split(tmp_path):
    def held_out(seed, where):
        proc = subprocess.run([sys.executable, "tools/make_arithmetic_data.py", "--output-dir", str(where),
                               "--max-operand", "9", "--eval-size", "20", "--seed", str(seed)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return pq.read_table(where / "arithmetic_eval.parquet").column("problem").to_pylist()

    assert held_out(0, tmp_path / "a") == held_out(0, tmp_path / "b")
    assert held_out(0, tmp_path / "a") != held_out(1, tmp_path / "c")


def test_generator_refuses_a_held_out_set_that_leaves_nothing_to_train_on(tmp_path):
    proc = subprocess.run([sys.executable, "tools/make_arithmetic_data.py", "--output-dir", str(tmp_path),
                           "--max-operand", "2", "--eval-size", "100"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot hold out 100")
    assert not list(tmp_path.iterdir())


def test_both_orders_of_a_sum_land_on_the_same_side():
    train, held_out = split_problems(all_problems(6), eval_size=10, seed=5)
    held = {p.key for p in held_out}
    for p in train:
        assert p.key not in held
        if p.op == "+":
            assert Problem(p.b, "+", p.a) in train
    assert Problem(2, "+", 5).key == Problem(5, "+", 2).key != Problem(5, "-", 2).key
    assert Problem(3, "-", 7).answer == -4 and Problem(3, "+", 7).answer == 10


# ----------------------------------------------------------------------------------------------------------------
# the reward
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem, response, expected", [
    ("7 + 6", "Answer: 13", 1.0),
    ("7 + 6", "7 + 6 = 13\nAnswer: 13", 1.0),
    ("7 + 6", "answer:13.", 1.0),                      # letter case and spacing are free, a full stop may follow
    ("3 - 11", "Answer: -8", 1.0),
    ("20 + 20", "**Answer: 40**", 1.0),                # markdown around it is fine
    ("7 + 6", "Answer: 12", 0.0),                      # wrong
    ("3 - 11", "Answer: 8", 0.0),                      # sign missing
    ("7 + 6", "Answer: 12\nAnswer: 13", 0.0),          # the first answer counts
    ("7 + 6", "The answer is 13.", 0.0),               # right number, not in the format
    ("7 + 6", "7 + 6 = 13", 0.0),
    ("7 + 6", "Answer: 13.5", 0.0),                    # not an integer
    ("7 + 6", "Answer: 130", 0.0),                     # a longer number is not 13
    ("7 + 6", "Answer: thirteen", 0.0),
    ("7 + 6", "", 0.0),
])
def test_reward_scores_correct_wrong_and_malformed_answers(problem, response, expected):
    assert arithmetic.reward([chat_prompt(problem)], [response]) == [expected]


def test_format_reward_pays_a_little_for_a_well_formed_wrong_answer_only():
    prompts = [chat_prompt("9 + 9")] * 3
    assert arithmetic.reward_with_format(prompts, ["Answer: 18", "Answer: 17", "18"]) == [1.0, 0.1, 0.0]


def test_reward_reads_the_problem_from_the_prompt_and_refuses_a_prompt_without_one():
    assert problem_from_prompt(chat_prompt("12 - 19")) == Problem(12, "-", 19)
    assert parse_answer("Answer: -7") == -7 and parse_answer("no answer") is None
    with pytest.raises(ValueError, match="no 'a \\+ b' or 'a - b' problem"):
        arithmetic.reward(["Write a poem."], ["Answer: 1"])


def exact(problem_text: str) -> int:
    """The result of ``"a + b"`` / ``"a - b"``, computed here independently of posttrain.rewards.arithmetic."""
    a, op, b = problem_text.split()
    return int(a) + int(b) if op == "+" else int(a) - int(b)


def test_reward_on_every_generated_problem_in_the_real_chat_template(tmp_path, example_model_dir):
    from transformers import AutoTokenizer

    proc = subprocess.run([sys.executable, "tools/make_arithmetic_data.py", "--output-dir", str(tmp_path),
                           "--max-operand", "20", "--eval-size", "256"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = (pq.read_table(tmp_path / "arithmetic_train.parquet").to_pylist()
            + pq.read_table(tmp_path / "arithmetic_eval.parquet").to_pylist())
    assert len(rows) > 21 * 21 * 2 - 256 and len({r["problem"] for r in rows}) == len(rows)
    tok = AutoTokenizer.from_pretrained(example_model_dir)
    # the prompt as the trainer decodes it: chat template applied at preprocessing, ids decoded back to text
    prompts = [tok.decode(tok.apply_chat_template([{"role": "user", "content": r["instruction"]}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=True)
                          ["input_ids"]) for r in rows]
    assert prompts[0].startswith("<|im_start|>system") and prompts[0].endswith("<|im_start|>assistant\n")
    answers = [exact(r["problem"]) for r in rows]
    assert any(x < 0 for x in answers) and max(answers) == 40
    cases = {  # response -> expected score
        "right": ([f"Answer: {x}" for x in answers], 1.0),
        "worked": ([f"{r['problem']} = {x}.\nAnswer: {x}" for r, x in zip(rows, answers)], 1.0),
        "off by one": ([f"Answer: {x + 1}" for x in answers], 0.0),
        "sign flipped": ([f"Answer: {-x}" for x in answers if x != 0], 0.0),
        "no format": ([f"The result is {x}." for x in answers], 0.0),
    }
    for name, (responses, expected) in cases.items():
        scored = prompts if name != "sign flipped" else [p for p, x in zip(prompts, answers) if x != 0]
        assert arithmetic.reward(scored, responses) == [expected] * len(responses), name


def test_the_trainer_loads_the_reward_by_its_flag_value_and_probes_it():
    fn = RewardFunction("posttrain.rewards.arithmetic:reward")
    fn.probe()  # the trainer's start-up call ("What is 1 + 1?", "2"): a malformed answer, scored 0
    scores = fn([chat_prompt("4 + 4"), chat_prompt("4 - 4")], ["Answer: 8", "Answer: 8"])
    assert scores.tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------------------------------------------
# the launch script
# ----------------------------------------------------------------------------------------------------------------

def test_script_dry_run_prints_a_valid_grpo_command(tmp_path):
    proc = dry_run(SCRIPT, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmds = commands(proc.stdout)
    assert cmds[0] == ["bash", "scripts/install.sh"]
    python = str(tmp_path / "venv" / "bin" / "python")
    assert {c[0] for c in cmds if any(part.endswith(".py") for part in c)} == {python}  # POSTTRAIN_VENV

    launch = torchrun_command(cmds)
    entry = launch.index("pretrain_gpt.py")
    assert flag_values(launch[:entry])["--nproc_per_node"] == ["2"]
    train = flag_values(launch[entry + 1:])
    assert train["--stage"] == ["trl_ppo"]
    unknown = sorted(set(train) - {"--stage"} - help_flags("pretrain_gpt.py", "--stage", "trl_ppo"))
    assert not unknown, unknown
    # GRPO on the rule-based reward alone, sampled groups, greedy validation on every held-out problem
    assert train["--adv-estimator"] == ["grpo"] and int(train["--n-samples-per-prompt"][0]) >= 2
    assert "--reward-model" not in train and "--do-sample" in train and "--eval-do-sample" not in train
    assert "--critic-model" not in train and "--critic-lr" not in train  # GRPO has no critic
    assert "--skip-eval-at-start" not in train
    spec = train["--reward-function"][0]
    RewardFunction(spec).probe()
    data = [c for c in cmds if "tools/make_arithmetic_data.py" in c]
    assert len(data) == 1
    assert train["--eval-samples"] == flag_values(data[0])["--eval-size"] and int(train["--eval-samples"][0]) >= 64
    assert train["--data-path"][0].endswith("arith_train") and train["--eval-data-path"][0].endswith("arith_eval")
    gbs, group, mini, mbs = (int(train[f][0]) for f in ("--global-batch-size", "--n-samples-per-prompt",
                                                        "--ppo-mini-batch-size", "--micro-batch-size"))
    assert gbs % 2 == 0 and (gbs * group) % mini == 0 and mini % (2 * mbs) == 0

    # every other tool it runs is printed with flags that tool has
    for tool in ("convert_ckpt.py", "preprocess_data.py", "tools/make_arithmetic_data.py", "tools/plot_metrics.py"):
        found = [c for c in cmds if tool in c]
        assert found, tool
        for cmd in found:
            flags = set(flag_values(cmd[cmd.index(tool) + 1:]))
            assert not flags - help_flags(tool), (tool, sorted(flags - help_flags(tool)))
    preprocess = [flag_values(c[c.index("preprocess_data.py") + 1:]) for c in cmds if "preprocess_data.py" in c]
    assert {p["--handler-name"][0] for p in preprocess} == {"PPOAlpacaStyleInstructionHandler"}
    assert cmds[-1][1] == "tools/plot_metrics.py"
    assert not (tmp_path / "out").exists() and not (tmp_path / "venv").exists()


def test_script_settings_come_from_the_environment(tmp_path):
    proc = dry_run(SCRIPT, tmp_path, ITERS="3", GROUP="4", GBS="4", MINI="16", MBS="4", LR="2e-6",
                   DYNAMIC_SAMPLING="0", EVAL_SIZE="64")
    assert proc.returncode == 0, proc.stderr
    cmds = commands(proc.stdout)
    train = flag_values(torchrun_command(cmds))
    assert train["--train-iters"] == ["3"] and train["--n-samples-per-prompt"] == ["4"]
    assert train["--global-batch-size"] == ["4"] and train["--ppo-mini-batch-size"] == ["16"]
    assert train["--lr"] == ["2e-6"] and train["--eval-samples"] == ["64"]
    assert "--dynamic-sampling" not in train
    data = [c for c in cmds if "tools/make_arithmetic_data.py" in c][0]
    assert flag_values(data)["--eval-size"] == ["64"]


ANSWER = re.compile(r"answer:[ \t]*(-?\d+)", re.IGNORECASE)


def independent_score(prompt: str, response: str) -> float:
    """1 when the first well-formed ``Answer: <int>`` of the response (not followed by more digits or a decimal
    part) is the result of the prompt's last problem, else 0."""
    a, op, b = re.findall(r"(\d+) ([+-]) (\d+)", prompt)[-1]
    for found in ANSWER.finditer(response):
        if not re.match(r"\.?\d", response[found.end():]):
            return float(int(found.group(1)) == exact(f"{a} {op} {b}"))
    return 0.0


def test_script_runs_grpo_end_to_end_without_a_critic(tmp_path, example_model_dir):
    out = tmp_path / "arith"
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "GBS", "MBS")}
    env.update(OUT=str(out), ITERS="2", GBS="2", GROUP="4", MINI="8", MBS="4", MAX_NEW_TOKENS="12", EVAL_SIZE="16",
               EVAL_INTERVAL="0", DYNAMIC_SAMPLING="1", PRECISION="auto")
    proc = subprocess.run(["bash", "examples/mcore/smollm2/grpo_arithmetic_smollm2_135m.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "DP 2" in proc.stdout and " critic |" not in proc.stdout

    records = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]  # validation before the first update, then training
    before, after = records[0], records[-1]
    for record in records[1:]:
        assert 0.0 <= record["score_mean"] <= 1.0 and record["num_sequences"] == 8
        assert 1 <= record["dynamic_sampling/rounds"] <= 3
        assert record["dynamic_sampling/drawn_groups"] == 2 * record["dynamic_sampling/rounds"]
        assert math.isfinite(record["pg_loss"]) and math.isfinite(record["actor_grad_norm"])
        assert not {"vf_loss", "value_mean", "critic_lr"} & set(record)  # no critic
    for record in (before, after):
        assert record["eval/num_prompts"] == 16
        mean, se = record["eval/score_mean"], record["eval/score_stderr"]
        assert mean * 16 == pytest.approx(round(mean * 16))  # an accuracy: a count of right answers over 16
        assert se == pytest.approx(math.sqrt(mean * (1 - mean) / 15), abs=1e-9)
    # the summary the script prints is the metrics file's
    assert (f"held-out accuracy before (iteration 0): {before['eval/score_mean']:.3f} +- "
            f"{before['eval/score_stderr']:.3f} on 16 problems") in proc.stdout
    assert f"held-out accuracy after (iteration 2): {after['eval/score_mean']:.3f}" in proc.stdout
    assert f"paired gain {after['eval/score_gain']:+.3f} +- {after['eval/score_gain_stderr']:.3f}" in proc.stdout
    assert after["eval/score_gain"] == pytest.approx(after["eval/score_mean"] - before["eval/score_mean"])

    # held-out responses (rank 0's half) are scored as an independent check scores them, and were never trained on
    samples = [json.loads(line) for line in (out / "grpo" / "samples.jsonl").read_text().splitlines()]
    held_out = [s for s in samples if s["split"] == "eval"]
    trained = [s for s in samples if s["split"] == "train"]
    assert len(held_out) == 2 * 8 and trained
    train_problems = set(pq.read_table(out / "data" / "arithmetic_train.parquet").column("problem").to_pylist())
    for row in held_out:
        assert row["score"] == independent_score(row["prompt"], row["response"]), row
        problem = re.findall(r"(\d+ [+-] \d+)", row["prompt"])[-1]
        assert problem not in train_problems
    for row in trained:
        assert row["score"] == independent_score(row["prompt"], row["response"]), row

    saved = out / "grpo" / "iter_0000002"
    assert (saved / "actor" / "posttrain_checkpoint.json").is_file() and not (saved / "critic").exists()
    assert (out / "grpo_curves.png").stat().st_size > 1000
