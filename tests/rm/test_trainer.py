"""Reward-model stage: the pairwise loss, the pair data, and ``pretrain_gpt.py --stage rm`` end to end.

The end-to-end tests use a tiny random Llama (2 layers, hidden 64, the example model's tokenizer) written as a
Hugging Face directory and converted with ``convert_ckpt.py``, and real preference pairs from ``../shared/data``.
Every training run is a real ``pretrain_gpt.py`` process (``torchrun`` for 2 ranks).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from posttrain.rm.loss import (
    finalize_pair_stats,
    pair_stats,
    pairwise_loss,
    pairwise_ranking_loss,
)
from tests.torchrun_utils import REPO

TINY_CONFIG = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, rope_theta=10000.0)


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(args: list[str], nproc: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``args`` (a script and its flags) with python, or under torchrun with ``nproc`` ranks."""
    launcher = [sys.executable] if nproc == 0 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    return subprocess.run(launcher + args, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _metrics(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------------------------------------------
# The loss, against the formula written out in Python floats
# ----------------------------------------------------------------------------------------------------------------


def _reference_loss(c: float, r: float, m: float = 0.0) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-(c - r - m))))


@pytest.mark.parametrize("with_margin", [False, True])
def test_pairwise_loss_matches_the_formula(with_margin):
    chosen = [1.5, -0.25, 0.0, 3.0, -2.0]
    rejected = [0.5, 0.75, 0.0, -1.0, -2.5]
    margin = [0.5, 0.0, 1.0, 2.0, 0.25] if with_margin else [0.0] * 5
    expected = [_reference_loss(c, r, m) for c, r, m in zip(chosen, rejected, margin)]
    m = torch.tensor(margin) if with_margin else None
    per_pair = pairwise_ranking_loss(torch.tensor(chosen), torch.tensor(rejected), m)
    assert per_pair.dtype == torch.float32
    assert per_pair.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)

    loss, sums = pairwise_loss(torch.tensor(chosen), torch.tensor(rejected), m)
    assert float(loss) == pytest.approx(sum(expected) / 5, rel=1e-6)
    stats = finalize_pair_stats(sums)
    assert stats["loss"] == pytest.approx(sum(expected) / 5, rel=1e-9)
    # accuracy compares the raw scores: pairs 0, 3, 4 are ranked right, the tie (pair 2) is not, margins ignored
    assert stats["accuracy"] == pytest.approx(3 / 5)
    assert stats["reward_margin_mean"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / 5)
    assert stats["chosen_reward_mean"] == pytest.approx(sum(chosen) / 5)
    assert stats["rejected_reward_mean"] == pytest.approx(sum(rejected) / 5)
    assert stats["num_pairs"] == 5


def test_pairwise_loss_gradient_normaliser_and_weights():
    chosen = torch.tensor([0.3, -1.2, 2.0, 0.1], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.1, 0.4, -1.0, 0.1], dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    loss, sums = pairwise_loss(chosen, rejected, weights=weights, normalizer=8.0)
    expected = sum(_reference_loss(c, r) for c, r in zip([0.3, -1.2, 2.0], [0.1, 0.4, -1.0])) / 8.0
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    loss.backward()
    # d/dc of -log sigmoid(c - r) is -(1 - sigmoid(c - r)); padding rows get no gradient
    for i, (c, r) in enumerate(zip([0.3, -1.2, 2.0], [0.1, 0.4, -1.0])):
        g = -(1.0 - 1.0 / (1.0 + math.exp(-(c - r)))) / 8.0
        assert float(chosen.grad[i]) == pytest.approx(g, rel=1e-10)
        assert float(rejected.grad[i]) == pytest.approx(-g, rel=1e-10)
    assert float(chosen.grad[3]) == 0.0
    assert finalize_pair_stats(sums)["num_pairs"] == 3


def test_pairwise_loss_is_finite_for_extreme_scores_and_rejects_bad_shapes():
    per_pair = pairwise_ranking_loss(torch.tensor([-200.0, 200.0]), torch.tensor([200.0, -200.0]))
    assert per_pair.tolist() == pytest.approx([400.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        pairwise_ranking_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="1-D"):
        pairwise_ranking_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="margin"):
        pairwise_ranking_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2))
    assert math.isnan(finalize_pair_stats(pair_stats(torch.zeros(2), torch.zeros(2), weights=torch.zeros(2)))["loss"])


# ----------------------------------------------------------------------------------------------------------------
# Pair data: skip counting, truncation, batching
# ----------------------------------------------------------------------------------------------------------------


def _write_pairs(prefix: Path, pairs: list[tuple[list[int], list[int], list[int]]], vocab: int = 1000) -> None:
    """Write (prompt, chosen response, rejected response) token lists in the pairwise handler's layout."""
    from posttrain.data.handlers import EncodedChunk, OutputSpec
    from posttrain.data.writer import IndexedDatasetWriter

    outputs = [OutputSpec("chosen_input_ids", "token"), OutputSpec("rejected_input_ids", "token"),
               OutputSpec("prompt_length", "int32")]
    chosen = [p + c for p, c, _ in pairs]
    rejected = [p + r for p, _, r in pairs]

    def flat(seqs):
        return (np.asarray([t for s in seqs for t in s], dtype=np.int32),
                np.asarray([len(s) for s in seqs], dtype=np.int64))

    chunk = EncodedChunk(np.zeros(len(pairs), dtype=np.int8), {
        "chosen_input_ids": flat(chosen), "rejected_input_ids": flat(rejected),
        "prompt_length": (np.asarray([len(p) for p, _, _ in pairs], dtype=np.int32), np.ones(len(pairs), np.int64))})
    with IndexedDatasetWriter(str(prefix), outputs, vocab) as writer:
        writer.add_chunk(chunk)
        writer.commit({"pad_token_id": 0, "eos_token_id": 2, "vocab_size": vocab})


def test_reward_pairs_count_skips_and_truncate(tmp_path):
    from posttrain.rm.data import RewardPairs, collate_pairs

    prompt = list(range(10, 20))  # 10 tokens
    pairs = [
        (prompt, [30, 31], [40, 41, 42]),                 # fits
        (prompt, [30, 31], [30, 31]),                     # identical responses
        (prompt, [], [40]),                               # empty chosen response
        (prompt, list(range(100, 120)), list(range(200, 225))),  # 35 tokens: too long for 16
        (prompt, [50] * 14 + [51, 2], [50] * 14 + [52, 2]),  # differs only at token 15: identical once truncated
    ]
    _write_pairs(tmp_path / "d", pairs)

    skip = RewardPairs(tmp_path / "d", seq_length=16)
    assert len(skip) == 1
    assert dict(skip.skipped) == {"too_long": 2, "empty_response": 1, "identical_responses": 1,
                                  "identical_after_truncation": 0}

    cut = RewardPairs(tmp_path / "d", seq_length=16, truncation="truncate", max_prompt_length=4)
    assert len(cut) == 2 and cut.truncated == 1
    assert dict(cut.skipped) == {"too_long": 0, "empty_response": 1, "identical_responses": 1,
                                 "identical_after_truncation": 1}
    long_pair = cut[1]
    # the prompt keeps its last 4 tokens (the longer response needs more than 16 - 10), responses fill the rest
    # and keep their final (end-of-turn) token
    assert long_pair.prompt_length == 4
    assert long_pair.chosen_ids.tolist() == prompt[-4:] + list(range(100, 111)) + [119]
    assert long_pair.rejected_ids.tolist() == prompt[-4:] + list(range(200, 211)) + [224]

    batch = collate_pairs([cut[0], cut[1]], pad_token_id=0)
    assert batch["input_ids"].shape == (4, 16)
    assert batch["input_ids"][0].tolist() == prompt + [30, 31] + [0] * 4       # chosen rows first
    assert batch["input_ids"][2].tolist() == prompt + [40, 41, 42] + [0] * 3   # then the rejected rows
    assert batch["attention_mask"].sum(1).tolist() == [12, 16, 13, 16]
    assert batch["response_mask"].sum(1).tolist() == [2, 12, 3, 12]
    assert batch["response_mask"][1, 4:16].all() and not batch["response_mask"][1, :4].any()


def test_reward_pairs_reject_a_prompt_dataset_and_a_missing_path(tmp_path):
    from posttrain.rm.data import RewardDataError, RewardPairs

    with pytest.raises(RewardDataError, match="not a pairwise dataset"):
        RewardPairs(tmp_path / "nothing", seq_length=64)
    _write_pairs(tmp_path / "d", [([1, 2], [3], [3])])
    with pytest.raises(RewardDataError, match="no usable pair.*identical_responses=1"):
        RewardPairs(tmp_path / "d", seq_length=64)


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing of bad input (AlpacaStylePairwiseHandler)
# ----------------------------------------------------------------------------------------------------------------


def _preprocess(example_model_dir: Path, source: Path, prefix: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run(["preprocess_data.py", "--input", str(source), "--handler-name", "AlpacaStylePairwiseHandler",
                 "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", str(example_model_dir),
                 "--prompt-type", "hf", "--output-prefix", str(prefix), *extra])


def test_preprocessing_counts_bad_pairs_and_rejects_missing_columns(example_model_dir, tmp_path):
    rows = [{"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."},
            {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hi!"},
            {"prompt": "Name a colour.", "chosen": "", "rejected": "Blue."},
            {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "   "}]
    good = tmp_path / "pairs.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _ok(_preprocess(example_model_dir, good, tmp_path / "ok"))
    meta = json.loads((tmp_path / "ok_meta.json").read_text())
    assert meta["documents"] == 1
    assert meta["skipped"]["identical_responses"] == 1 and meta["skipped"]["empty_response"] == 2

    bad = tmp_path / "no_rejected.jsonl"
    bad.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"]}) + "\n" for r in rows))
    proc = _preprocess(example_model_dir, bad, tmp_path / "bad")
    assert proc.returncode == 1
    [line] = _error_lines(proc)
    assert "rejected" in line
    assert not list(tmp_path.glob("bad*")), "a failed run left files behind"


# ----------------------------------------------------------------------------------------------------------------
# pretrain_gpt.py --stage rm on a tiny model
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, example_model_dir, shared_data):
    """A tiny random Llama written as an HF directory and converted to a causal-LM checkpoint, and 32 real pairs
    tokenized with the example model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("rm_tiny")
    hf_dir = root / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(example_model_dir / name, hf_dir / name)
    _ok(_run(["convert_ckpt.py", "--direction", "hf2mcore", "--load-dir", str(hf_dir), "--save-dir",
              str(root / "causal_lm"), "--model-kind", "causal_lm"]))
    _ok(_preprocess(example_model_dir, shared_data / "dpo_en_250.parquet", root / "train", "--max-samples", "32"))
    return root


def _rm_args(tiny: Path, save: Path, *extra: str) -> list[str]:
    return ["pretrain_gpt.py", "--stage", "rm", "--pretrained-checkpoint", str(tiny / "causal_lm"),
            "--data-path", str(tiny / "train"), "--seq-length", "96", "--truncation", "truncate",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3", "--save", str(save),
            "--seed", "5", *extra]


@pytest.fixture(scope="module")
def fit_run(tiny, tmp_path_factory):
    """TP = PP = DP = 1, fp32, from the causal LM (fresh head): 4 epochs of the 32 pairs (16 iterations of 8),
    checkpoints at 8 and 16, evaluated on the training pairs at the end."""
    save = tmp_path_factory.mktemp("rm_fit") / "rm"
    proc = _ok(_run(_rm_args(tiny, save, "--num-epochs", "4", "--save-interval", "8", "--log-interval", "4",
                             "--eval-data-path", str(tiny / "train"))))
    return save, proc


def test_tiny_model_fits_training_pairs_and_saves_a_usable_reward_model(tiny, fit_run, tmp_path):
    """Training accuracy reaches >= 0.9; the saved reward model, converted to HF ``LlamaForSequenceClassification``,
    ranks the training pairs the same way."""
    save, proc = fit_run
    assert "with a fresh scalar head" in proc.stdout
    records = _metrics(save)
    assert [r["iteration"] for r in records] == list(range(1, 17))  # 4 epochs x 32 // 8
    assert records[-1]["eval/accuracy"] >= 0.9 and records[-1]["eval/num_pairs"] == 32
    assert records[-1]["eval/loss"] < 0.5 * records[0]["loss"]
    for key in ("loss", "accuracy", "reward_margin_mean", "chosen_reward_mean", "rejected_reward_mean"):
        assert all(math.isfinite(r[key]) for r in records)

    # layout: tracker, iter dirs with the value checkpoint, optimizer and trainer state; the path is printed
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "16"
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000008", "iter_0000016"]
    model_dir = save / "iter_0000016" / "model"
    assert f"reward model checkpoint: {model_dir}" in proc.stdout
    meta = json.loads((model_dir / "posttrain_checkpoint.json").read_text())
    assert meta["model_kind"] == "value" and meta["iteration"] == 16
    assert (model_dir / "tokenizer.json").is_file()
    assert (save / "iter_0000016" / "optimizer" / "model").is_dir() and (save / "iter_0000016" / "rng").is_dir()
    assert json.loads((save / "iter_0000016" / "trainer_state.json").read_text())["iteration"] == 16

    # an independent implementation scores the pairs: HF transformers on the exported checkpoint
    hf = tmp_path / "hf_rm"
    _ok(_run(["convert_ckpt.py", "--direction", "mcore2hf", "--load-dir", str(model_dir), "--save-dir", str(hf)]))
    from transformers import AutoModelForSequenceClassification

    from posttrain.rm.data import RewardPairs

    model = AutoModelForSequenceClassification.from_pretrained(hf, dtype=torch.float32).eval()
    pairs = RewardPairs(tiny / "train", seq_length=96, truncation="truncate")
    correct = 0
    with torch.no_grad():
        for i in range(len(pairs)):
            pair = pairs[i]
            chosen = model(pair.chosen_ids[None]).logits.item()
            rejected = model(pair.rejected_ids[None]).logits.item()
            correct += chosen > rejected
    assert correct / len(pairs) == pytest.approx(records[-1]["eval/accuracy"])


def test_response_mean_pooling_is_recorded_and_matches_hf_token_scores(tiny, tmp_path):
    """``--score-pooling response_mean``: the checkpoint records it, HF export writes a
    ``*ForTokenClassification``, and the trainer's accuracy and margin equal the mean of that model's per-token
    logits over the response tokens, computed by transformers."""
    save = tmp_path / "rm"
    proc = _ok(_run(_rm_args(tiny, save, "--train-iters", "4", "--score-pooling", "response_mean",
                             "--eval-data-path", str(tiny / "train"))))
    assert "score pooling response_mean" in proc.stdout
    model_dir = save / "iter_0000004" / "model"
    meta = json.loads((model_dir / "posttrain_checkpoint.json").read_text())
    assert meta["extra"]["score_pooling"] == "response_mean"
    _ok(_run(["convert_ckpt.py", "--direction", "mcore2hf", "--load-dir", str(model_dir), "--save-dir",
              str(tmp_path / "hf")]))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"] and config["score_pooling"] == "response_mean"
    from transformers import AutoModelForTokenClassification

    from posttrain.rm.data import RewardPairs

    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert model.config.num_labels == 1
    pairs = RewardPairs(tiny / "train", seq_length=96, truncation="truncate")
    margins = []
    with torch.no_grad():
        for i in range(len(pairs)):
            pair = pairs[i]
            scores = [model(ids[None]).logits[0, pair.prompt_length:, 0].mean().item()
                      for ids in (pair.chosen_ids, pair.rejected_ids)]
            margins.append(scores[0] - scores[1])
    record = _metrics(save)[-1]
    assert sum(m > 0 for m in margins) / len(pairs) == pytest.approx(record["eval/accuracy"])
    assert sum(margins) / len(margins) == pytest.approx(record["eval/reward_margin_mean"], abs=1e-4)

    # and back: the token classifier converts to a value checkpoint that keeps the pooling and the head bias
    _ok(_run(["convert_ckpt.py", "--direction", "hf2mcore", "--load-dir", str(tmp_path / "hf"), "--save-dir",
              str(tmp_path / "back")]))
    back = json.loads((tmp_path / "back" / "posttrain_checkpoint.json").read_text())
    assert back["model_kind"] == "value" and back["extra"]["score_pooling"] == "response_mean"
    _ok(_run(["convert_ckpt.py", "--direction", "mcore2hf", "--load-dir", str(tmp_path / "back"), "--save-dir",
              str(tmp_path / "hf2")]))
    from safetensors.torch import load_file

    first, second = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert first.keys() == second.keys() and "score.bias" in first
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("pooling", ["last", "response_mean"])
def test_ppo_scores_rollouts_with_the_reward_models_pooling(pooling):
    """The PPO trainer's reward read-out on a left-padded prompt / right-padded response batch."""
    from types import SimpleNamespace

    from posttrain.trl_ppo.experience import RolloutBatch
    from posttrain.trl_ppo.trainer import PPOTrainer

    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    response_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    batch = RolloutBatch(prompt_ids=torch.zeros(2, 3, dtype=torch.long), prompt_mask=prompt_mask,
                         responses=torch.zeros(2, 4, dtype=torch.long), response_mask=response_mask,
                         has_eos=torch.tensor([True, False]), group_index=torch.arange(2),
                         sampler_log_probs=torch.zeros(2, 4))
    output = torch.arange(14, dtype=torch.float32).reshape(2, 7)  # per-token head outputs over prompt + response
    trainer = SimpleNamespace(models=SimpleNamespace(score_pooling=pooling))
    scores = PPOTrainer._scores(trainer, output, batch)[:, 0].tolist()
    if pooling == "last":
        assert scores == [output[0, 4].item(), output[1, 6].item()]  # the last real response token
    else:
        assert scores == pytest.approx([(3 + 4) / 2, (10 + 11 + 12 + 13) / 4])  # response tokens only


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2"],
    ["--pipeline-model-parallel-size", "2"],
    ["--micro-batch-size", "1"],  # DP = 2 with 4 micro-batches of 1 pair per rank (the reference: 4 of 2)
], ids=["tp2", "pp2", "dp2"])
def test_parallel_layouts_match_world_size_one(tiny, fit_run, layout, tmp_path):
    """The first 4 iterations under TP = 2, PP = 2 or DP = 2 equal those of the world-size-1 run (fp32)."""
    save = tmp_path / "rm"
    _ok(_run(_rm_args(tiny, save, "--train-iters", "4", *layout), nproc=2))
    ref, got = _metrics(fit_run[0])[:4], _metrics(save)
    assert len(got) == 4
    for a, b in zip(ref, got):
        for key in ("loss", "accuracy", "reward_margin_mean", "chosen_reward_mean", "rejected_reward_mean"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (key, a["iteration"])
        assert b["tokens"] == a["tokens"]


def test_bf16_run_at_dp2_tracks_fp32_and_saves_a_bf16_reward_model(tiny, fit_run, tmp_path):
    """``--bf16`` (megatron's mixed-precision optimizer, fp32 main weights) at DP = 2: the first iteration's loss
    is the fp32 run's within bf16 rounding, training proceeds, and the saved reward model is bf16."""
    save = tmp_path / "rm"
    _ok(_run(_rm_args(tiny, save, "--train-iters", "4", "--micro-batch-size", "1", "--bf16"), nproc=2))
    ref, got = _metrics(fit_run[0])[:4], _metrics(save)
    assert [r["iteration"] for r in got] == [1, 2, 3, 4]
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], abs=2e-2)
    assert all(math.isfinite(r["loss"]) and r["step_skipped"] == 0.0 for r in got)
    meta = json.loads((save / "iter_0000004" / "model" / "posttrain_checkpoint.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["model_kind"] == "value"


def test_resume_continues_exactly(tiny, fit_run, tmp_path):
    save = tmp_path / "rm"
    save.mkdir()
    shutil.copytree(fit_run[0] / "iter_0000008", save / "iter_0000008")
    (save / "latest_checkpointed_iteration.txt").write_text("8")
    proc = _ok(_run(_rm_args(tiny, save, "--num-epochs", "4", "--load", str(save))))
    assert "resumed from" in proc.stdout
    ref, got = _metrics(fit_run[0]), _metrics(save)
    assert [r["iteration"] for r in got] == list(range(9, 17))
    for a, b in zip(ref[8:], got):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["consumed_pairs"] == a["consumed_pairs"]


def test_bad_data_path_is_one_line_error_and_writes_nothing(tiny, tmp_path):
    save = tmp_path / "rm"
    args = _rm_args(tiny, save, "--train-iters", "2")
    args[args.index("--data-path") + 1] = str(tmp_path / "missing")
    proc = _run(args)
    assert proc.returncode == 1
    [line] = _error_lines(proc)
    assert "not a pairwise dataset" in line and "missing" in line
    assert not save.exists()


def test_global_batch_not_divisible_by_dp_times_micro_batch(tiny, tmp_path):
    save = tmp_path / "rm"
    proc = _run(_rm_args(tiny, save, "--train-iters", "2", "--global-batch-size", "6"), nproc=2)
    assert proc.returncode != 0
    [line] = _error_lines(proc)
    assert "--global-batch-size 6 is not divisible by data-parallel size 2 x --micro-batch-size 2 = 4" in line
    assert not save.exists()


@pytest.mark.parametrize("flags, message", [
    (dict(train_iters=2, num_epochs=1), "exactly one of --train-iters and --num-epochs"),
    (dict(), "exactly one of --train-iters and --num-epochs"),
    (dict(train_iters=2, global_batch_size=6, micro_batch_size=4), "--global-batch-size 6 is not divisible by "
                                                                    "--micro-batch-size 4"),
    (dict(train_iters=2, data_path=None), "--data-path is required"),
])
def test_flag_errors_name_the_flag(flags, message):
    from posttrain.arguments import ArgumentError
    from posttrain.rm.trainer import RewardModelArgs

    with pytest.raises(ArgumentError, match=message.replace("-", r"\-")):
        RewardModelArgs(**{"data_path": "pairs", **flags})
