"""(c) Two reward-model iterations and two PPO iterations of the SmolLM2 example on one GPU (nccl), each a
``torchrun ... pretrain_gpt.py`` subprocess as a user runs it; (d) the trained actor back to Hugging Face
(``convert_ckpt.py --direction mcore2hf``) and into posttrain again.

Figures recorded: wall time, peak GPU memory (``nvidia-smi``, the device's use above what was in use before),
throughput, and for the PPO training phase the model FLOPs utilisation (MFU) against the H200's dense bf16 peak
(``tests/gpu/support.py`` says how the FLOPs are counted).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.gpu import support
from tests.torchrun_utils import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs an NVIDIA GPU: torch.cuda.is_available() is False")

ITERS = 2
TIMEOUT_S = 240


def _torchrun(stage: str, args: list[str], log: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="4", CUDA_DEVICE_MAX_CONNECTIONS="1")
    cmd = support.python_command("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                                 "pretrain_gpt.py", "--stage", stage, *args)
    return support.run_measured(cmd, log, timeout=TIMEOUT_S, env=env, cwd=REPO)


def _metrics(save_dir: Path) -> list[dict]:
    path = save_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


@pytest.fixture(scope="module")
def ppo_run(actor_ckpt, value_ckpt, prompt_prefix, workdir, results):
    save = workdir / "ppo"
    out = _torchrun("trl_ppo", [
        "--ref-model", str(actor_ckpt), "--reward-model", str(value_ckpt), "--data-path", str(prompt_prefix),
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
        "--micro-batch-size", "8", "--global-batch-size", "16", "--rollout-batch-size", "16",
        "--train-iters", str(ITERS), "--lr", "1e-6", "--critic-lr", "5e-6", "--bf16",
        "--max-prompt-length", "128", "--max-new-tokens", "32", "--do-sample", "--temperature", "1.0",
        "--top-p", "1.0", "--kl-coef", "0.05", "--missing-eos-penalty", "1.0",
        "--save", str(save), "--save-interval", str(ITERS), "--log-interval", "1"], workdir / "ppo.log")
    return save, out


def test_reward_model_two_iterations_on_one_gpu(value_ckpt, pair_prefix, hf_config, workdir, results):
    save = workdir / "rm"
    out = _torchrun("rm", [
        "--pretrained-checkpoint", str(value_ckpt), "--data-path", str(pair_prefix),
        "--seq-length", "512", "--truncation", "truncate", "--max-prompt-length", "128",
        "--micro-batch-size", "4", "--global-batch-size", "16", "--train-iters", str(ITERS),
        "--lr", "5e-5", "--bf16", "--save", str(save), "--log-interval", "1"], workdir / "rm.log")
    records = _metrics(save)
    figures = {"returncode": out["returncode"], "wall_s": out["wall_s"], "peak_gpu_mib": out["peak_gpu_mib"]}
    if records:
        last = records[-1]
        rows = 2 * last["num_pairs"]
        mean_len = last["tokens"] / rows
        flops = 3 * support.forward_flops_per_token(hf_config, mean_len / 2, lm_head=False) * last["tokens"]
        figures.update(iterations=len(records), loss=[r["loss"] for r in records],
                       tokens_per_s=last.get("tokens_per_s"), iteration_time_s=last.get("iteration_time_s"),
                       mfu_last_iteration=round(support.mfu(flops, last["iteration_time_s"]), 5))
    results.record("rm_2_iterations_1_gpu", **figures)
    assert out["returncode"] == 0, out["log_tail"]
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records), records
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)


def test_ppo_two_iterations_on_one_gpu(ppo_run, hf_config, prompt_prefix, results):
    save, out = ppo_run
    records = _metrics(save)
    figures = {"returncode": out["returncode"], "wall_s": out["wall_s"], "peak_gpu_mib": out["peak_gpu_mib"]}
    if records:
        meta = json.loads(Path(f"{prompt_prefix}_meta.json").read_text())
        prompt_mean = min(float(meta["lengths"]["packed_input_ids"]["mean"]), 128.0)
        per_iteration = []
        for r in records:
            flops = support.ppo_train_flops(hf_config, r["num_sequences"], prompt_mean, r["response_length"])
            per_iteration.append({
                "iteration": r["iteration"], "time_generate_s": r.get("time/generate"),
                "time_experience_s": r.get("time/experience"), "time_train_s": r.get("time/train"),
                "generated_tokens_per_s": r.get("perf/generated_tokens_per_s"),
                "train_tflop": round(flops / 1e12, 3),
                "train_mfu": round(support.mfu(flops, r["time/train"]), 5)})
        figures.update(iterations=per_iteration, prompt_tokens_mean=prompt_mean,
                       mfu_note="model FLOPs of actor + critic forward and backward over real tokens (dataset-mean "
                                "prompt length, logged response length) / time/train / peak_tflops_bf16_dense")
    results.record("ppo_2_iterations_1_gpu", **figures)
    assert out["returncode"] == 0, out["log_tail"]
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    for r in records:
        for key in ("pg_loss", "vf_loss", "kl", "score_mean", "response_length", "entropy"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["iteration"], key, r.get(key))
    assert (save / f"iter_{ITERS:07d}" / "actor" / "posttrain_checkpoint.json").is_file()


def test_trained_actor_round_trip_through_hugging_face(ppo_run, hf_config, workdir, results, megatron_one_gpu):
    save, out = ppo_run
    actor = save / f"iter_{ITERS:07d}" / "actor"
    if not (actor / "posttrain_checkpoint.json").is_file():
        pytest.fail(f"the PPO run left no trained actor at {actor} (see test_ppo_two_iterations_on_one_gpu)")
    hf_dir, back = workdir / "actor_hf", workdir / "actor_back_mcore"
    export = support.run_measured(support.python_command(
        "convert_ckpt.py", "--direction", "mcore2hf", "--load-dir", str(actor), "--save-dir", str(hf_dir),
        "--overwrite"), workdir / "mcore2hf.log", timeout=300, cwd=REPO)
    again = support.run_measured(support.python_command(
        "convert_ckpt.py", "--direction", "hf2mcore", "--load-dir", str(hf_dir), "--save-dir", str(back),
        "--overwrite"), workdir / "hf2mcore_back.log", timeout=300, cwd=REPO)
    results.record("convert_mcore2hf_trained_actor", wall_s=export["wall_s"], peak_gpu_mib=export["peak_gpu_mib"],
                   returncode=export["returncode"])
    assert export["returncode"] == 0, export["log_tail"]
    assert again["returncode"] == 0, again["log_tail"]

    # every tensor survives posttrain -> HF -> posttrain exactly; the HF model computes the posttrain logits
    from transformers import AutoModelForCausalLM

    from posttrain.models import (build_attention_mask, build_model, load_model_checkpoint,
                                  position_ids_from_attention_mask)

    trained, returned = (build_model(hf_config, "causal_lm", transformer_impl="local") for _ in range(2))
    load_model_checkpoint(trained, actor)
    load_model_checkpoint(returned, back)
    mismatched = [k for k, v in trained.state_dict().items()
                  if torch.is_tensor(v) and not torch.equal(v, returned.state_dict()[k])]
    ids = torch.arange(1, 33, device=megatron_one_gpu.device).reshape(2, 16) * 97 % hf_config["vocab_size"]
    mask = torch.ones_like(ids)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").cuda()
    with torch.no_grad():
        ours = trained.eval()(ids, position_ids_from_attention_mask(mask), build_attention_mask(mask))
        theirs = hf(input_ids=ids).logits
    diff = float((ours[..., :hf_config["vocab_size"]].float() - theirs.float()).abs().max())
    results.record("convert_mcore2hf_trained_actor", tensors_changed_by_round_trip=len(mismatched),
                   hf_vs_megatron_fp32_max_abs_logit_diff=diff)
    assert not mismatched, mismatched[:5]
    assert diff <= 1e-3 * max(1.0, float(theirs.abs().max())), diff
