"""End-to-end PPO (``pretrain_gpt.py --stage trl_ppo``) on a tiny Llama model with the real tokenizer and prompts.

The tiny model (2 layers, hidden 64, SmolLM2's 49,152-token vocabulary) is converted with convert_ckpt.py into an
actor and a reward checkpoint; prompts are the real Alpaca prompts of ../shared/data, preprocessed with
preprocess_data.py. Layouts are compared on greedy rollouts: generated tokens (an exact fingerprint) and every
logged metric.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.torchrun_utils import REPO

pytestmark = pytest.mark.filterwarnings("ignore")


def _run(cmd, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, **kwargs)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, example_model_dir, shared_data):
    """Tiny actor and reward checkpoints (real tokenizer) and the preprocessed Alpaca prompts."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("ppo_assets")
    tokenizer = AutoTokenizer.from_pretrained(example_model_dir)
    torch.manual_seed(0)
    # a larger init scale than usual keeps the tiny model's greedy argmax away from near-ties
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2, max_position_embeddings=1024, initializer_range=0.1)
    LlamaForCausalLM(config).save_pretrained(root / "tiny_hf")
    tokenizer.save_pretrained(root / "tiny_hf")
    for name, extra in (("actor", []), ("rm", ["--model-kind", "value", "--init-value-head"])):
        proc = _run([sys.executable, "convert_ckpt.py", "--direction", "hf2mcore", "--load-dir", str(root / "tiny_hf"),
                     "--save-dir", str(root / name), *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run([sys.executable, "preprocess_data.py", "--input", str(shared_data / "alpaca_en_800.parquet"),
                 "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", str(example_model_dir),
                 "--output-prefix", str(root / "alpaca"), "--handler-name", "PPOAlpacaStyleInstructionHandler",
                 "--prompt-type", "hf", "--workers", "1", "--max-samples", "64"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def ppo(assets, out, nproc=1, extra=(), iters=2, reward_model=True):
    """Run PPO and return (process, metrics.jsonl records)."""
    rm = ["--reward-model", str(assets / "rm")] if reward_model else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "pretrain_gpt.py", "--stage", "trl_ppo", "--ref-model", str(assets / "actor"),
           *rm, "--data-path", str(assets / "alpaca"),
           "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters), "--lr", "1e-3",
           "--critic-lr", "1e-3", "--max-new-tokens", "12", "--kl-coef", "0.05", "--save", str(out),
           "--log-interval", "1", "--sample-interval", "0", *extra]
    proc = _run(cmd)
    path = Path(out) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return proc, records


def comparable(record):
    return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/"))}


def assert_same_metrics(ref, other, rel=1e-4, abs_tol=1e-6):
    assert [r["iteration"] for r in ref] == [r["iteration"] for r in other]
    for a, b in zip(ref, other):
        a, b = comparable(a), comparable(b)
        assert a.keys() == b.keys()
        assert a["rollout/token_checksum"] == b["rollout/token_checksum"], "generated tokens differ"
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=abs_tol), (a["iteration"], key)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_tp1")
    proc, records = ppo(assets, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, records


ACTOR_METRICS = ["pg_loss", "abs_pg_loss", "ppo_ratio", "ppo_ratio_clamped", "pg_clipfrac", "approx_kl", "entropy",
                 "kl", "kl_coef", "score_mean", "reward_mean", "response_length", "lr"]
CRITIC_METRICS = ["vf_loss", "vf_clipfrac", "explained_var", "vpred_mean", "critic_lr"]
REQUIRED_METRICS = ACTOR_METRICS + CRITIC_METRICS


def test_single_process_run_logs_every_metric_and_saves(reference):
    out, records = reference
    assert [r["iteration"] for r in records] == [1, 2]
    for record in records:
        for key in REQUIRED_METRICS:
            assert math.isfinite(record[key]), key
        # on-policy first epoch: the trainer's old log-probs are the numbers it trains from
        assert record["ppo_ratio"] == pytest.approx(1.0, abs=1e-5)
        assert record["pg_clipfrac"] == 0.0
        assert record["response_length"] >= 1 and record["response_length"] <= 12
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # actor == reference before the first update
    assert records[1]["kl"] != pytest.approx(0.0, abs=1e-6)  # the actor moved
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    for part in ("actor", "critic", "optimizer/actor", "optimizer/critic", "rng/rank0.pt", "trainer_state.json"):
        assert (out / "iter_0000002" / part).exists(), part


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"],
                                    ["--no-offload-grad-buffers"]], ids=["tp2", "pp2", "dp2-grad-buffers-held"])
def test_parallel_layouts_match_single_process(assets, reference, layout, tmp_path):
    """Every layout logs the single-process run's tokens and metrics; the DP = 2 run also keeps its gradient buffers
    allocated between steps, which the reference frees (the default)."""
    _, ref_records = reference
    proc, records = ppo(assets, tmp_path / "out", nproc=2, extra=layout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_metrics(ref_records, records)


def test_old_log_probs_from_the_rollout_train_on_the_sampler_numbers(assets, reference, tmp_path):
    """``--old-log-probs rollout`` (TRL's source) skips the actor's recompute: the sampler's log-probs are the old
    ones, so their gap is exactly 0, and in fp32 the run matches the recomputing one up to rounding."""
    _, ref_records = reference
    proc, records = ppo(assets, tmp_path / "out", extra=["--old-log-probs", "rollout"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(r["rollout/logprob_gap_max"] > 0.0 for r in ref_records)  # recomputed: rounding differs
    for ref, record in zip(ref_records, records):
        assert record["rollout/logprob_gap_max"] == 0.0
        assert record["rollout/token_checksum"] == ref["rollout/token_checksum"]
        for key in REQUIRED_METRICS:
            assert record[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-4), (record["iteration"], key)


def test_resume_reproduces_uninterrupted_run(assets, tmp_path):
    sampled = ["--do-sample", "--temperature", "1.0", "--save-interval", "2"]
    proc, full = ppo(assets, tmp_path / "full", extra=sampled, iters=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc, _ = ppo(assets, tmp_path / "half", extra=sampled, iters=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc, resumed = ppo(assets, tmp_path / "half", extra=sampled + ["--load", str(tmp_path / "half")], iters=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full[2:], resumed[2:]):
        assert comparable(a) == comparable(b)


def test_saved_actor_converts_to_hf(assets, reference, tmp_path):
    out, _ = reference
    proc = _run([sys.executable, "convert_ckpt.py", "--direction", "mcore2hf", "--load-dir",
                 str(out / "iter_0000002" / "actor"), "--save-dir", str(tmp_path / "hf")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    original = AutoModelForCausalLM.from_pretrained(assets / "tiny_hf")
    trained = dict(model.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in original.named_parameters())


def test_options_group_estimator_kl_loss_entropy_ptx_ema_reward_function(assets, tmp_path):
    reward_fn = tmp_path / "rule.py"
    reward_fn.write_text("def length_reward(prompts, responses):\n"
                         "    return [min(len(r), 40) / 40.0 for r in responses]\n")
    extra = ["--adv-estimator", "grpo", "--n-samples-per-prompt", "2", "--do-sample", "--use-kl-loss",
             "--entropy-coef", "0.01", "--ptx-coef", "0.1", "--pretrain-data-path", str(assets / "alpaca"),
             "--enable-ema", "--reward-function", f"{reward_fn}:length_reward", "--ppo-epochs", "2",
             "--ppo-mini-batch-size", "4", "--eval-data-path", str(assets / "alpaca"), "--eval-samples", "4",
             "--normalize-reward", "--kl-target", "0.1"]
    proc, records = ppo(assets, tmp_path / "out", extra=extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = records[-1]
    for key in ACTOR_METRICS + ["kl_loss", "ptx_loss", "eval/score_mean"]:
        assert math.isfinite(last[key]), key
    assert last["num_sequences"] == 8
    saved = tmp_path / "out" / "iter_0000002"
    assert (saved / "actor_ema" / "posttrain_checkpoint.json").is_file()
    # GRPO reads no values: no critic is built, trained, logged or saved
    assert not set(CRITIC_METRICS + ["critic_lr", "critic_grad_norm"]) & set(last)
    assert " critic |" not in proc.stdout
    assert (saved / "actor").is_dir() and (saved / "optimizer" / "actor").exists()
    assert not (saved / "critic").exists() and not (saved / "optimizer" / "critic").exists()
    # adaptive controller moved the coefficient off its initial value
    assert records[-1]["kl_coef"] != pytest.approx(0.3)


@pytest.mark.parametrize("extra, message", [
    (["--global-batch-size", "3"], "--global-batch-size 3 is not divisible"),
    (["--data-path", "/nonexistent/prefix"], "/nonexistent/prefix"),
    (["--ref-model", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["--top-p", "0"], "--top-p"),
    (["--lr-warmup-iters", "2"], "--lr-warmup-iters 2 must be smaller than the 2 optimiser steps"),
])
def test_bad_input_is_a_one_line_error(assets, tmp_path, extra, message):
    nproc = 2 if "--global-batch-size" in extra else 1
    proc, records = ppo(assets, tmp_path / "out", nproc=nproc, extra=extra)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split(errors[0])[0][-200:]
    assert not (tmp_path / "out" / "latest_checkpointed_iteration.txt").exists()


def test_mismatched_reward_vocabulary_is_rejected(assets, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "small_hf")
    proc = _run([sys.executable, "convert_ckpt.py", "--direction", "hf2mcore", "--load-dir", str(tmp_path / "small_hf"),
                 "--save-dir", str(tmp_path / "small_rm"), "--model-kind", "value", "--init-value-head"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd_extra = ["--reward-model", str(tmp_path / "small_rm")]
    proc, _ = ppo(assets, tmp_path / "out", extra=cmd_extra)
    assert proc.returncode != 0 and "vocabulary size 1000" in proc.stderr


def test_logged_learning_rates_are_those_of_the_steps_that_ran(assets, tmp_path):
    # cosine from the peak to --min-lr over the run's 2 optimiser steps (one per iteration), no warm-up:
    # step 1 runs at the peak, step 2 at min + (peak - min) * (1 + cos(pi * 1/2)) / 2
    extra = ["--lr", "1e-3", "--critic-lr", "5e-4", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
             "--lr-warmup-iters", "0"]
    proc, records = ppo(assets, tmp_path / "out", extra=extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    middle = (1 + math.cos(math.pi / 2)) / 2
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 1e-4 + (1e-3 - 1e-4) * middle], rel=1e-6)
    assert [r["critic_lr"] for r in records] == pytest.approx([5e-4, 1e-4 + (5e-4 - 1e-4) * middle], rel=1e-6)
    # the critic's mean prediction is logged once, as vpred_mean (value_mean was the same number twice)
    for record in records:
        assert "value_mean" not in record and math.isfinite(record["vpred_mean"])
    critic_lines = [line for line in proc.stdout.splitlines() if "| critic |" in line]
    assert len(critic_lines) == 2 and all("vpred_mean:" in line and "critic_lr:" in line for line in critic_lines)


def test_reward_function_reads_each_rows_answer(assets, tmp_path, shared_data, example_model_dir):
    """The answer column kept at preprocessing reaches the reward function beside the response to its own row:
    in training (also in a dynamic-sampling round whose prompt ids are offset by the dataset size) and in
    validation, where the rows are the held-out dataset's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def answer_dataset(source, rows, prefix):
        # every third row's answer is text no prompt holds, the others' the row's own instruction
        table = pq.read_table(source).slice(0, rows).to_pylist()
        data = [{"instruction": r["instruction"], "input": r["input"],
                 "answer": "an answer no prompt holds" if k % 3 == 0 else r["instruction"]}
                for k, r in enumerate(table)]
        pq.write_table(pa.Table.from_pylist(data), tmp_path / f"{prefix}.parquet")
        proc = _run([sys.executable, "preprocess_data.py", "--input", str(tmp_path / f"{prefix}.parquet"),
                     "--tokenizer-name-or-path", str(example_model_dir), "--output-prefix", str(tmp_path / prefix),
                     "--prompt-type", "hf", "--seq-length", "200", "--extra-columns", "answer"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        meta = json.loads((tmp_path / f"{prefix}_meta.json").read_text())
        assert meta["skipped"]["too_long"] == 0  # document k is row k
        return {r["instruction"]: (0.0 if k % 3 == 0 else 1.0) for k, r in enumerate(table)}

    expected = answer_dataset(shared_data / "alpaca_en_800.parquet", 24, "train")
    expected.update(answer_dataset(shared_data / "alpaca_en_199_eval.parquet", 8, "held_out"))
    rule = tmp_path / "rule.py"
    rule.write_text("def answer_in_prompt(prompts, responses, answer):\n"
                    "    return [1.0 if a and a in p else 0.0 for p, a in zip(prompts, answer)]\n")
    extra = ["--data-path", str(tmp_path / "train"), "--reward-function", f"{rule}:answer_in_prompt",
             "--adv-estimator", "grpo", "--n-samples-per-prompt", "2", "--do-sample", "--dynamic-sampling",
             "--dynamic-sampling-max-rounds", "2", "--eval-data-path", str(tmp_path / "held_out"),
             "--eval-samples", "4", "--log-samples", "8"]
    proc, records = ppo(assets, tmp_path / "out", extra=extra, iters=1, reward_model=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # a response's score depends on its prompt only, so no group is informative: a second round was drawn
    assert records[-1]["dynamic_sampling/rounds"] == 2
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    splits = [s["split"] for s in samples]
    assert splits.count("train") == 8 and splits.count("eval") == 8  # eval: iteration 0 and 1, 4 prompts each
    for sample in samples:
        rows = [instruction for instruction in expected if instruction in sample["prompt"]]
        assert len(rows) == 1, sample["prompt"]
        assert sample["score"] == expected[rows[0]], sample
    # held-out rows 0 and 3 have the foreign answer, rows 1 and 2 their own: both kinds were scored
    assert {s["score"] for s in samples if s["split"] == "eval"} == {0.0, 1.0}


def test_iteration_0_validation_runs_on_the_loaded_weights_before_any_update(assets, tmp_path):
    from tests.torchrun_utils import run_torchrun

    out = tmp_path / "out"
    args = ["--ref-model", str(assets / "actor"), "--reward-model", str(assets / "rm"),
            "--data-path", str(assets / "alpaca"), "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", "2", "--lr", "1e-3", "--critic-lr", "1e-3", "--max-new-tokens", "12",
            "--save", str(out), "--log-interval", "1", "--sample-interval", "0",
            "--eval-data-path", str(assets / "alpaca"), "--eval-samples", "4", "--eval-interval", "1"]
    [result] = run_torchrun("ppo_eval_order_worker.py", args, tmp_path / "worker", nproc=1)
    assert result["exit_code"] == 0
    events = result["events"]
    assert [(e["kind"], e["iteration"]) for e in events] == [
        ("evaluate", 0), ("step", 0), ("evaluate", 1), ("step", 1), ("evaluate", 2)]
    first = events[0]
    # before any update: no optimiser step, and the actor's weights are exactly the loaded ones
    assert first["actor_lr_steps"] == 0 and first["actor_ref_max_diff"] == 0.0
    # the comparison sees updates: after the first iteration the actor has moved off the loaded weights
    assert events[2]["actor_lr_steps"] == 1 and events[2]["actor_ref_max_diff"] > 0.0
    assert first["metrics"]["eval/kl"] == pytest.approx(0.0, abs=1e-6)
    assert events[2]["metrics"]["eval/kl"] != pytest.approx(0.0, abs=1e-6)
    # the iteration-0 numbers are the first record of metrics.jsonl, alone (no training metrics yet)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert "pg_loss" not in records[0]
    for key in ("eval/score_mean", "eval/score_stderr", "eval/response_length", "eval/eos_frac", "eval/kl",
                "eval/num_prompts"):
        assert records[0][key] == pytest.approx(first["metrics"][key], rel=1e-6, abs=1e-9), key
    assert records[0]["eval/num_prompts"] == 4
    assert records[1]["eval/score_mean"] == pytest.approx(events[2]["metrics"]["eval/score_mean"], rel=1e-6)


def _paired(before: dict, after: dict) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) of the per-prompt score differences ``after - before``."""
    import statistics

    assert before.keys() == after.keys()
    diffs = [after[p] - before[p] for p in before]
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def test_validation_score_gain_is_the_paired_difference_to_iteration_0_over_dp_ranks(assets, tmp_path):
    """eval/score_gain and eval/score_gain_stderr on 2 DP ranks, against the per-prompt scores each rank logged
    (prompts matched by text), and after a resume still relative to the iteration-0 validation."""
    from tests.torchrun_utils import run_torchrun

    rule = tmp_path / "rule.py"  # a score that depends on the response: sampled responses change it
    rule.write_text("def length_score(prompts, responses):\n"
                    "    return [len(r) / 100.0 for r in responses]\n")
    out = tmp_path / "out"
    args = ["--ref-model", str(assets / "actor"), "--reward-function", f"{rule}:length_score",
            "--data-path", str(assets / "alpaca"), "--adv-estimator", "grpo", "--n-samples-per-prompt", "2",
            "--do-sample", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
            "--max-new-tokens", "12", "--save", str(out), "--log-interval", "1", "--sample-interval", "0",
            "--eval-data-path", str(assets / "alpaca"), "--eval-samples", "6", "--eval-interval", "1",
            "--eval-do-sample", "--log-samples", "8"]
    results = run_torchrun("ppo_eval_order_worker.py", args + ["--train-iters", "2"], tmp_path / "run", nproc=2)

    def evaluations(results):
        """iteration -> (metrics of each rank, {prompt text: score} over both ranks)."""
        by_iteration = {}
        for result in results:
            assert result["exit_code"] == 0
            for event in result["events"]:
                if event["kind"] == "evaluate":
                    metrics, scores = by_iteration.setdefault(event["iteration"], ([], {}))
                    metrics.append(event["metrics"])
                    assert len(event["samples"]) == 3  # held-out prompts 0, 2, 4 on rank 0; 1, 3, 5 on rank 1
                    scores.update((s["prompt"], s["score"]) for s in event["samples"])
        for metrics, scores in by_iteration.values():
            assert len(scores) == 6  # six distinct prompts
            assert metrics[0] == metrics[1]  # reduced over the DP ranks
        return by_iteration

    evals = evaluations(results)
    assert sorted(evals) == [0, 1, 2]
    base_metrics, base_scores = evals[0]
    assert not {"eval/score_gain", "eval/score_gain_stderr"} & set(base_metrics[0])  # the baseline itself
    for iteration in (1, 2):
        metrics, scores = evals[iteration]
        gain, stderr = _paired(base_scores, scores)
        assert metrics[0]["eval/score_gain"] == pytest.approx(gain, rel=1e-9, abs=1e-12)
        assert metrics[0]["eval/score_gain_stderr"] == pytest.approx(stderr, rel=1e-9, abs=1e-12)
        assert stderr > 0  # sampled responses: the differences are not all equal
        assert metrics[0]["eval/score_gain"] == pytest.approx(
            metrics[0]["eval/score_mean"] - base_metrics[0]["eval/score_mean"], rel=1e-9, abs=1e-12)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert "eval/score_gain" not in records[0]
    for record in records[1:]:
        metrics = evals[record["iteration"]][0][0]
        for key in ("eval/score_gain", "eval/score_gain_stderr"):
            assert record[key] == pytest.approx(metrics[key], rel=1e-9, abs=1e-12), key

    # the checkpoint carries the baseline, held-out prompt i's iteration-0 score at position i (dealt i % 2)
    state = json.loads((out / "iter_0000002" / "trainer_state.json").read_text())
    assert state["eval_baseline"]["iteration"] == 0
    rank_scores = [[s["score"] for s in e["samples"]] for r in results for e in r["events"]
                   if e["kind"] == "evaluate" and e["iteration"] == 0]
    assert state["eval_baseline"]["scores"] == [rank_scores[i % 2][i // 2] for i in range(6)]

    # resumed: the first validation after the resume (iteration 3) is measured against iteration 0
    resumed = run_torchrun("ppo_eval_order_worker.py", args + ["--train-iters", "3", "--load", str(out)],
                           tmp_path / "resumed", nproc=2)
    after = evaluations(resumed)
    assert sorted(after) == [3]
    metrics, scores = after[3]
    gain, stderr = _paired(base_scores, scores)
    assert metrics[0]["eval/score_gain"] == pytest.approx(gain, rel=1e-9, abs=1e-12)
    assert metrics[0]["eval/score_gain_stderr"] == pytest.approx(stderr, rel=1e-9, abs=1e-12)


def test_checkpointed_validation_baseline_is_kept_only_for_the_same_held_out_prompts():
    """Resume: a checkpoint without a baseline (written before it was saved) or with one taken on other held-out
    prompts gives None, so the first validation after the resume becomes the baseline."""
    from types import SimpleNamespace

    from posttrain.trl_ppo.state import PPOState

    baseline = {"iteration": 0, "eval_data_path": "held_out", "scores": [0.0, 1.0, 0.5]}

    def trainer(path="held_out", n=3, eval_dataset=True):
        return SimpleNamespace(args=SimpleNamespace(eval_data_path=path), eval_dataset=[] if eval_dataset else None,
                               _num_eval_prompts=lambda: n)

    keep = PPOState._checkpointed_eval_baseline
    assert keep(trainer(), baseline) == baseline
    assert keep(trainer(), None) is None  # an older checkpoint
    assert keep(trainer(path="other"), baseline) is None
    assert keep(trainer(n=4), baseline) is None
    assert keep(trainer(eval_dataset=False), baseline) is None
