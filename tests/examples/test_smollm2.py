"""The real example: SmolLM2-135M-Instruct on real Alpaca prompts, PPO at DP=2 over 2 processes (CPU; bf16 only where this
CPU multiplies bf16 faster than fp32, tools/choose_precision.py).

Runs the README's main-job script with a short schedule (2 iterations, 16 new tokens) and a reward model with a
fresh value head (training the example reward model is its own, longer job), then checks the metrics file.
"""
import json
import math
import os
import subprocess

from tests.torchrun_utils import REPO
from tests.trl_ppo.test_trainer import REQUIRED_METRICS


def test_smollm2_ppo_example_runs_two_iterations_at_dp2(tmp_path, example_model_dir, shared_data):
    out = tmp_path / "smollm2"
    env = dict(os.environ, OUT=str(out), RM="fresh", TP="1", ITERS="2", GBS="4", MBS="2", MAX_NEW_TOKENS="16",
               PRECISION="auto", EVAL_INTERVAL="2", EVAL_SAMPLES="4", SAVE_INTERVAL="2",
               DATA=str(shared_data / "alpaca_en_800.parquet"),
               EVAL_DATA=str(shared_data / "alpaca_en_199_eval.parquet"))
    proc = subprocess.run(["bash", "examples/mcore/smollm2/trl_ppo_smollm2_135m.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]  # validation before the first update, then training
    assert set(records[0]) >= {"eval/score_mean", "eval/score_stderr", "eval/kl"}
    records = records[1:]
    for record in records:
        for key in REQUIRED_METRICS:
            assert isinstance(record[key], float) and math.isfinite(record[key]), (record["iteration"], key)
    assert math.isfinite(records[-1]["eval/score_mean"])
    assert "DP 2" in proc.stdout  # SmolLM2 (9 heads, 3 KV heads) cannot be split over TP=2
    # the trained actor came back as a Hugging Face model
    assert (out / "actor_hf" / "config.json").is_file() and (out / "actor_hf" / "model.safetensors").is_file()
