"""Measurement helpers of the GPU checks: results file, peak GPU memory of subprocesses, model FLOPs and MFU.

Nothing here needs a GPU to import (the unit tests of the arithmetic run on CPU).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

H200_BF16_DENSE_TFLOPS = 989.4
"""NVIDIA H200 SXM (and H100 SXM) peak dense bf16 tensor-core throughput, TFLOP/s, without sparsity."""


def peak_tflops() -> float:
    """The peak the MFU figures divide by: ``$POSTTRAIN_GPU_PEAK_TFLOPS`` or the H200's dense bf16 peak."""
    return float(os.environ.get("POSTTRAIN_GPU_PEAK_TFLOPS", H200_BF16_DENSE_TFLOPS))


class Results:
    """The JSON file the GPU checks write their figures into (one object per check, rewritten after each record).

    Layout: ``{"environment": {...}, "checks": {name: {figure: value, ...}}}``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data = {"environment": {}, "checks": {}}
        if self.path.is_file():
            self.data.update(json.loads(self.path.read_text()))

    def environment(self, **values) -> None:
        self.data["environment"].update(values)
        self._write()

    def record(self, check: str, **figures) -> None:
        self.data["checks"].setdefault(check, {}).update(figures)
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.path)


class GpuMemorySampler:
    """Peak device memory in use while a block runs, sampled with ``nvidia-smi`` (for work done by subprocesses).

    ``peak_mib`` is the largest ``memory.used`` of GPU ``index`` seen minus the value before the block (what other
    processes, this one included, already held); None when ``nvidia-smi`` is missing.
    """

    def __init__(self, index: int = 0, interval_s: float = 0.2):
        self.index, self.interval = index, interval_s
        self.available = shutil.which("nvidia-smi") is not None
        self.baseline: Optional[int] = None
        self.maximum: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read(self) -> Optional[int]:
        try:
            out = subprocess.run(["nvidia-smi", f"--id={self.index}", "--query-gpu=memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            return int(out.stdout.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            value = self._read()
            if value is not None:
                self.maximum = value if self.maximum is None else max(self.maximum, value)

    def __enter__(self):
        if self.available:
            self.baseline = self._read()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        return False

    @property
    def peak_mib(self) -> Optional[int]:
        if self.baseline is None or self.maximum is None:
            return None
        return max(0, self.maximum - self.baseline)


def run_measured(cmd: list[str], log: Path, timeout: float, env: Optional[dict] = None,
                 cwd: Optional[Path] = None) -> dict:
    """Run ``cmd`` with its output in ``log``; return ``{"returncode", "wall_s", "peak_gpu_mib", "log_tail"}``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with GpuMemorySampler() as memory, open(log, "w") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    text = log.read_text(errors="replace")
    return {"returncode": code, "wall_s": round(time.perf_counter() - start, 2), "peak_gpu_mib": memory.peak_mib,
            "log_tail": text[-4000:]}


def python_command(*args: str) -> list[str]:
    return [sys.executable, *args]


# ----------------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------------

def matmul_params(hf_config: dict, lm_head: bool) -> int:
    """Weights every token is multiplied with in one forward of a dense decoder (embeddings excluded, output
    projection included when ``lm_head``): attention q/k/v/o and the SwiGLU MLP of every layer."""
    h = hf_config["hidden_size"]
    heads = hf_config["num_attention_heads"]
    kv = hf_config.get("num_key_value_heads") or heads
    head_dim = hf_config.get("head_dim") or h // heads
    ffn = hf_config["intermediate_size"]
    per_layer = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h + 3 * h * ffn
    return hf_config["num_hidden_layers"] * per_layer + (h * hf_config["vocab_size"] if lm_head else 0)


def forward_flops_per_token(hf_config: dict, context: float, lm_head: bool) -> float:
    """Forward FLOPs of one token: ``2 x matmul_params`` plus attention scores and weighted values
    (``4 x layers x heads x head_dim x context``, ``context`` the mean number of keys a query attends to)."""
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    attention = 4 * hf_config["num_hidden_layers"] * heads * head_dim * context
    return 2 * matmul_params(hf_config, lm_head) + attention


def ppo_train_flops(hf_config: dict, sequences: float, prompt_tokens: float, response_tokens: float) -> float:
    """FLOPs of one PPO training phase with one epoch and one mini-batch: a forward and a backward (3 x forward)
    of the actor and of the critic over ``sequences`` rows of ``prompt_tokens + response_tokens`` real tokens
    (padding excluded: model FLOPs, not hardware FLOPs)."""
    tokens = sequences * (prompt_tokens + response_tokens)
    context = (prompt_tokens + response_tokens) / 2  # causal: the mean query sees half the sequence
    per_token = forward_flops_per_token(hf_config, context, lm_head=True) \
        + forward_flops_per_token(hf_config, context, lm_head=False)
    return 3 * per_token * tokens


def mfu(flops: float, seconds: float, gpus: int = 1, peak: Optional[float] = None) -> float:
    """Model FLOPs utilisation: ``flops / seconds`` over ``gpus x peak`` TFLOP/s."""
    peak = peak_tflops() if peak is None else peak
    return flops / seconds / (gpus * peak * 1e12)
