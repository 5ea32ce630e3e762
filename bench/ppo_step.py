"""Seconds per PPO iteration of posttrain against TRL's ``PPOTrainer``, on the same model, prompts and settings.

Workload P: SmolLM2-135M-Instruct as actor, reference, critic and reward model (critic and reward: the same
weights with a fresh value head), 8 real Alpaca prompts (``../shared/data/alpaca_en_800.parquet``, the first
8 rows after posttrain's preprocessing; both systems train on exactly these 8 every iteration), 64 new tokens
sampled at temperature 1.0 (top-p 1.0, no top-k), one PPO epoch of one mini-batch (one actor and one critic
optimiser step), one process.

For each precision in ``--dtypes`` it runs, one after the other in fresh processes:

* **posttrain**: ``pretrain_gpt.py --stage trl_ppo`` (``--micro-batch-size 8 --global-batch-size 8
  --max-new-tokens 64 --do-sample --temperature 1.0 --top-p 1.0 --max-samples 8 [--bf16]``), seconds per
  iteration read from ``time/iteration`` in its ``metrics.jsonl``. TRL generates exactly ``response_length``
  tokens (no stop token); when posttrain offers ``--ignore-eos`` it is passed so posttrain does the same,
  otherwise responses stop at EOS and the decode loop ends once all 8 have ended (the table says which);
* **TRL** 0.29.1 (``trl.experimental.ppo``, ``bench/trl_ppo_reference.py``) in its own virtual environment
  ``.venv-trl`` (created here when missing, with torch pinned to the project's 2.13.0 and transformers to the
  project's version, so it can never change the project's pins), ``bf16`` on/off as TRL's ``PPOConfig.bf16``.
  With trl 0.29.1 ``PPOConfig(bf16=True)`` does not reach the ``Accelerator`` PPOTrainer builds, so TRL's "bf16"
  row computes in fp32 (the table's note shows accelerate's ``mixed_precision``); ``--trl-autocast`` adds
  ``ACCELERATE_MIXED_PRECISION=bf16`` for real bf16 autocast.

Each run does ``--warmup`` untimed iterations then ``--iters`` timed ones; the table gives the median, the peak
resident memory of the whole process tree (polled with psutil; ``peak RSS`` is up to the last timed iteration,
i.e. without posttrain's final checkpoint save), the ratio posttrain / TRL, the load average before each run and
how many cores other processes kept busy during it (``others``: system-wide CPU time minus this run's, per
second), and the median CPU seconds (all threads) per iteration (``cpu-s/iter``, less sensitive to other load
than wall time; about 2x the wall time on an idle 2-core machine). Before each run it waits (up to ``--max-wait`` seconds in all) until other processes use less than
``--max-busy`` cores.

It also prints, from the same run:

* the per-phase ratios posttrain / TRL (generate, experience, train; medians of the timed iterations);
* this machine's fp32 (or bf16) **GEMM rate**: ``--gemm-size``-square matmuls in a fresh process with the same
  thread count, timed just before and just after each system's run (the table gives the median and the best);
* the **training phase's achieved GFLOP/s** and its fraction of the GEMM rate measured beside it. The FLOPs are
  counted from the model shape and the actual token counts (:func:`train_flops`): with ``B`` sequences of ``S``
  positions (``S`` = padded prompt length + response length, pads included: they are computed), ``L`` layers,
  hidden ``h``, ``n_q`` query heads and ``n_kv`` key/value heads of width ``d``, MLP width ``f`` (SwiGLU: three
  ``h x f`` matrices) and padded vocabulary ``V``, one forward costs
  ``2 B S (L (h d (n_q + 2 n_kv) + n_q d h + 3 h f) + h V) + 4 B S^2 n_q d L`` FLOPs (matmul weights, then the
  ``QK^T`` and ``PV`` products over the full ``S x S`` score matrix that the attention computes); the critic's
  forward has no ``h V`` term (a scalar head). A training step is forward + backward = 3x its forward; the train
  phase of one PPO epoch of one mini-batch is one actor step plus one critic step. Elementwise work (norms,
  softmax, optimiser) is not counted, so the fraction is what the GEMMs achieve of the matmul peak.

Usage (after ``bash scripts/install.sh``; everything else is prepared into ``--workdir``)::

    .venv/bin/python bench/ppo_step.py                       # fp32 and bf16, posttrain and TRL
    .venv/bin/python bench/ppo_step.py --dtypes bf16 --skip-trl --iters 3
    .venv/bin/python bench/ppo_step.py --posttrain-repo /tmp/pt_copy   # time a patched checkout
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_VENV = REPO / ".venv-trl"
TRL_VERSION = "0.29.1"
TORCH_VERSION = "2.13.0"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_en_800.parquet"
BATCH = 8
NEW_TOKENS = 64
GIB = 1024 ** 3


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def run_checked(cmd, **kwargs) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"error: {' '.join(map(str, cmd[:3]))} ... exited with {proc.returncode}")
    return proc.stdout


# ------------------------------------------------------------------------------------------------ preparation
def prepare(workdir: Path, data: Path, py: str, posttrain_repo: Path) -> dict:
    """HF model, actor / value checkpoints, preprocessed prompts and their token ids for TRL (idempotent)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(posttrain_repo))
    hf_dir = run_checked([py, REPO / "tools" / "prepare_example_model.py"], env=env).strip().splitlines()[-1]
    actor, value = workdir / "actor_mcore", workdir / "value_mcore"
    if not (actor / "posttrain_checkpoint.json").is_file():
        log(f"converting {hf_dir} -> {actor}")
        run_checked([py, REPO / "convert_ckpt.py", "--direction", "hf2mcore", "--load-dir", hf_dir,
                     "--save-dir", actor, "--overwrite"], env=env)
    if not (value / "posttrain_checkpoint.json").is_file():
        log(f"converting {hf_dir} -> {value} (fresh value head)")
        run_checked([py, REPO / "convert_ckpt.py", "--direction", "hf2mcore", "--load-dir", hf_dir,
                     "--save-dir", value, "--model-kind", "value", "--init-value-head", "--overwrite"], env=env)
    prefix = workdir / "data" / "alpaca"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if not Path(f"{prefix}_packed_input_ids_document.idx").is_file():
        if not data.is_file():
            raise SystemExit(f"error: prompt data {data} not found (expected ../shared/data beside the checkout)")
        log(f"preprocessing {data}")
        run_checked([py, REPO / "preprocess_data.py", "--input", data, "--tokenizer-type", "PretrainedFromHF",
                     "--tokenizer-name-or-path", hf_dir, "--output-prefix", prefix, "--workers", "1",
                     "--handler-name", "PPOAlpacaStyleInstructionHandler", "--prompt-type", "hf",
                     "--seq-length", "256"], env=env)
    prompts_json = workdir / "prompts.json"
    # the rows posttrain trains on with --max-samples 8 (truncated to --max-prompt-length 256 as it does)
    code = ("import json,sys; from posttrain.data.prompt_dataset import PromptDataset; d=PromptDataset(sys.argv[1]);"
            f"json.dump([d[i][-256:].tolist() for i in range({BATCH})], open(sys.argv[2], 'w'))")
    run_checked([py, "-c", code, prefix, prompts_json], env=env)
    lengths = [len(p) for p in json.loads(prompts_json.read_text())]
    log(f"prompts: {len(lengths)} rows, lengths {lengths}")
    return {"hf_dir": hf_dir, "actor": str(actor), "value": str(value), "prefix": str(prefix),
            "prompts_json": str(prompts_json), "prompt_lengths": lengths}


def project_version(py: str, dist: str) -> str:
    return run_checked([py, "-c", f"import importlib.metadata as m; print(m.version('{dist}'))"]).strip()


def ensure_trl_venv(py: str) -> str:
    """``.venv-trl`` with trl==0.29.1, torch==2.13.0 and the project's transformers version; returns its python."""
    trl_py = TRL_VENV / "bin" / "python"
    check = ("import torch, trl, transformers, trl.experimental.ppo; "
             "print(torch.__version__, trl.__version__, transformers.__version__)")
    transformers_version = project_version(py, "transformers")
    if trl_py.exists():
        probe = subprocess.run([str(trl_py), "-c", check], capture_output=True, text=True)
        parts = probe.stdout.split()
        if (probe.returncode == 0 and parts[0].split("+")[0] == TORCH_VERSION and parts[1] == TRL_VERSION
                and parts[2] == transformers_version):
            return str(trl_py)
        log(f"{TRL_VENV} is incomplete or has other versions ({probe.stdout.strip() or probe.stderr[-200:]}); "
            "reinstalling into it")
    else:
        log(f"creating {TRL_VENV} (trl=={TRL_VERSION}, torch=={TORCH_VERSION}, transformers=={transformers_version})")
        base = getattr(sys, "_base_executable", None) or sys.executable
        run_checked([base, "-m", "venv", TRL_VENV])
    constraints = TRL_VENV / "constraints.txt"
    constraints.write_text(f"torch=={TORCH_VERSION}\ntransformers=={transformers_version}\n")
    pip = [trl_py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", constraints]
    run_checked(pip + [f"torch=={TORCH_VERSION}"])
    run_checked(pip + [f"trl=={TRL_VERSION}", f"transformers=={transformers_version}", "psutil"])
    out = run_checked([trl_py, "-c", check]).split()
    if out[0].split("+")[0] != TORCH_VERSION or out[1] != TRL_VERSION:
        raise SystemExit(f"error: {TRL_VENV} has torch {out[0]}, trl {out[1]}")
    log(f"{TRL_VENV}: torch {out[0]}, trl {out[1]}, transformers {out[2]}")
    return str(trl_py)


# ------------------------------------------------------------------------------------------------ measuring
def _cpu_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields) - idle) / hz, sum(fields) / hz


def wait_until_quiet(max_busy: float, budget: dict, window: float = 5.0) -> float:
    """Wait until other processes use < ``max_busy`` cores (measured over ``window`` s); returns that usage."""
    while True:
        b0, _ = _cpu_busy_seconds()
        time.sleep(window)
        b1, _ = _cpu_busy_seconds()
        busy = (b1 - b0) / window
        if busy < max_busy or budget["left"] <= 0:
            if busy >= max_busy:
                log(f"other processes use {busy:.2f} cores; wait budget spent, measuring anyway")
            return busy
        pause = min(60.0, budget["left"])
        log(f"machine busy ({busy:.2f} cores in use, load {os.getloadavg()[0]:.2f}); waiting {pause:.0f} s "
            f"({budget['left']:.0f} s of waiting left)")
        time.sleep(pause)
        budget["left"] -= pause + window


def _tree_rss(proc) -> int:
    """Resident memory of the process tree: RSS of a lone process; the sum of PSS (shared pages split between
    the processes sharing them) when it has children, e.g. workers forked by a checkpoint save, whose RSS would
    count the parent's copy-on-write pages again."""
    import psutil

    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss if len(procs) > 1 else p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def _tree_cpu(proc) -> float:
    """User + system CPU seconds of the process tree so far (live processes)."""
    import psutil

    total = 0.0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_measured(cmd, env, log_path: Path, done=None, progress=None) -> dict:
    """Run ``cmd``; poll the RSS of its process tree. ``done()`` True marks the end of the timed part;
    ``progress()`` (iterations finished so far) lets it record the tree's CPU seconds at each iteration end."""
    import psutil

    load_before = os.getloadavg()
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, _ = _cpu_busy_seconds()
    start = time.perf_counter()
    with open(log_path, "w") as out:
        popen = subprocess.Popen([str(c) for c in cmd], env=env, stdout=out, stderr=subprocess.STDOUT)
        proc = psutil.Process(popen.pid)
        peak = peak_timed = 0
        timed_over = False
        cpu_marks: list[float] = []
        while popen.poll() is None:
            if progress is not None:
                finished = progress()
                if finished > len(cpu_marks):
                    cpu_marks.extend([_tree_cpu(proc)] * (finished - len(cpu_marks)))
            rss = _tree_rss(proc)
            peak = max(peak, rss)
            if not timed_over:
                peak_timed = max(peak_timed, rss)
                timed_over = bool(done and done())
            time.sleep(0.1)
    wall = time.perf_counter() - start
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, _ = _cpu_busy_seconds()
    own = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    if popen.returncode:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"error: {cmd[1]} exited with {popen.returncode}; log {log_path}:\n{tail}")
    return {"wall_s": wall, "peak_rss": peak_timed or peak, "peak_rss_total": peak, "cpu_marks": cpu_marks,
            "ru_maxrss": usage1.ru_maxrss * 1024, "load_before": load_before, "load_after": os.getloadavg(),
            "own_cores": own / wall, "others_cores": max(0.0, (busy1 - busy0 - own) / wall)}


GEMM_CODE = """
import json, sys, time, torch
n, reps, dtype = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3])
a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
kernels = {"default": lambda: torch.mm(a, b)}
if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    bt = b.t()
    kernels["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
per_kernel = {}
for name, fn in kernels.items():
    fn()
    rates = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); rates.append(2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    per_kernel[name] = rates
best = max(per_kernel, key=lambda k: max(per_kernel[k]))
print(json.dumps({"gflops": per_kernel[best], "kernel": best, "per_kernel": per_kernel,
                  "threads": torch.get_num_threads()}))
"""


def gemm_rate(py: str, precision: str, threads, size: int, reps: int = 5) -> dict:
    """GFLOP/s of ``size``-square matmuls (fp32 or bf16) in a fresh process with the runs' thread count: the
    faster of torch's default kernel (MKL for fp32 in the x86 wheels) and oneDNN, the two kernels a CPU run of
    posttrain can use (``posttrain.cpu_matmul``); the machine's matmul rate is the best it reaches."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    dtype = "bfloat16" if precision == "bf16" else "float32"
    result = json.loads(run_checked([py, "-c", GEMM_CODE, str(size), str(reps), dtype],
                                    env=env).strip().splitlines()[-1])
    log("GEMM rate " + ", ".join(f"{name} {statistics.median(rates):.0f}" for name, rates in result["per_kernel"].items())
        + f" GFLOP/s (median of {reps}): {result['kernel']} is the reference")
    return result


def model_shape(hf_dir: str) -> dict:
    """The numbers :func:`train_flops` needs, from the HF ``config.json``."""
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    vocab = cfg["vocab_size"]
    return {"layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"], "heads": heads,
            "kv_heads": cfg.get("num_key_value_heads", heads),
            "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads, "ffn": cfg["intermediate_size"],
            "vocab_padded": -(-vocab // 128) * 128}


def forward_flops(shape: dict, batch: int, seq: int, lm_head: bool) -> float:
    """FLOPs of one forward over ``batch`` x ``seq`` positions (see the module docstring for the formula)."""
    h, d, L = shape["hidden"], shape["head_dim"], shape["layers"]
    per_layer = h * d * (shape["heads"] + 2 * shape["kv_heads"]) + shape["heads"] * d * h + 3 * h * shape["ffn"]
    weights = L * per_layer + (h * shape["vocab_padded"] if lm_head else 0)
    attention = 4 * batch * seq * seq * shape["heads"] * d * L
    return 2 * batch * seq * weights + attention


def train_flops(shape: dict, batch: int, seq: int) -> float:
    """FLOPs of the train phase of workload P: one actor and one critic step (forward + backward = 3 forwards)."""
    return 3 * (forward_flops(shape, batch, seq, lm_head=True) + forward_flops(shape, batch, seq, lm_head=False))


def posttrain_supports(py: str, posttrain_repo: Path, flag: str) -> bool:
    env = dict(os.environ, PYTHONPATH=str(posttrain_repo))
    out = subprocess.run([py, str(posttrain_repo / "pretrain_gpt.py"), "--stage", "trl_ppo", "--help"],
                         capture_output=True, text=True, env=env).stdout
    return flag in out


def run_posttrain(prep: dict, precision: str, args, py: str, out_dir: Path) -> dict:
    run_dir = out_dir / f"posttrain_{precision}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    total = args.warmup + args.iters
    ignore_eos = posttrain_supports(py, args.posttrain_repo, "--ignore-eos") and not args.stop_at_eos
    cmd = [py, args.posttrain_repo / "pretrain_gpt.py", "--stage", "trl_ppo", "--ref-model", prep["actor"],
           "--reward-model", prep["value"], "--data-path", prep["prefix"], "--max-samples", str(BATCH),
           "--micro-batch-size", str(BATCH), "--global-batch-size", str(BATCH), "--train-iters", str(total),
           "--max-new-tokens", str(NEW_TOKENS), "--do-sample", "--temperature", "1.0", "--top-p", "1.0",
           "--save", run_dir, "--log-interval", "1", "--sample-interval", "0"]
    cmd += ["--bf16"] if precision == "bf16" else []
    cmd += ["--ignore-eos"] if ignore_eos else []
    cmd += args.posttrain_args
    env = dict(os.environ, PYTHONPATH=str(args.posttrain_repo))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    metrics_path = run_dir / "metrics.jsonl"

    def progress() -> int:
        return len(metrics_path.read_text().splitlines()) if metrics_path.exists() else 0

    def done() -> bool:
        return progress() >= total

    log(f"posttrain {precision}: {total} iterations ({'--ignore-eos' if ignore_eos else 'stopping at EOS'})")
    measured = run_measured(cmd, env, run_dir / "log.txt", done, progress)
    marks = measured.pop("cpu_marks")
    measured["host_memory"] = host_memory(run_dir / "log.txt")
    log(f"posttrain {precision}: host memory {measured['host_memory']}")
    cpu = [b - a for a, b in zip(marks, marks[1:])][max(0, args.warmup - 1):]
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    timed = records[args.warmup:]
    phases = {k: statistics.median(r[f"time/{k}"] for r in timed) for k in ("generate", "experience", "train")}
    measured.update({
        "iteration_s": [r["time/iteration"] for r in records], "median_s": statistics.median(
            r["time/iteration"] for r in timed), "phases_s": phases,
        "response_length_mean": statistics.mean(r["response_length"] for r in timed),
        "full_length": ignore_eos, "note": "--ignore-eos" if ignore_eos else "EOS stops",
        "cpu_s": cpu, "median_cpu_s": statistics.median(cpu) if cpu else float("nan"),
    })
    if not args.keep_checkpoints:
        for item in run_dir.glob("iter_*"):
            shutil.rmtree(item, ignore_errors=True)
    return measured


def host_memory(log_path: Path) -> str:
    """The allocator posttrain's start-up line names (``| host memory ...``); checkouts older than
    posttrain.allocator always kept glibc's freed memory."""
    match = re.search(r"\| host memory (.+)$", log_path.read_text(errors="replace"), re.M)
    return match.group(1).strip() if match else "glibc malloc, freed memory kept"


def same_allocator_environment(env: dict, posttrain_host_memory: str) -> tuple[dict, str]:
    """``env`` for TRL with the allocator posttrain ran with: tcmalloc preloaded (as posttrain.allocator does), or
    glibc's variables for what posttrain.cpu_backend.keep_freed_memory sets."""
    if posttrain_host_memory.startswith("tcmalloc"):
        sys.path.insert(0, str(REPO))
        from posttrain.allocator import find_tcmalloc, preload_environment

        return preload_environment(find_tcmalloc(), env), "tcmalloc preloaded, as in posttrain"
    return (dict(env, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str((1 << 31) - 1)),
            "glibc keeps freed memory, as in posttrain")


def run_trl(prep: dict, precision: str, args, trl_py: str, out_dir: Path, posttrain_host_memory: str) -> dict:
    run_dir = out_dir / f"trl_{precision}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    result = run_dir / "result.json"
    cmd = [trl_py, REPO / "bench" / "trl_ppo_reference.py", "--model", prep["hf_dir"], "--prompts",
           prep["prompts_json"], "--precision", precision, "--iters", str(args.iters), "--warmup",
           str(args.warmup), "--batch-size", str(BATCH), "--response-length", str(NEW_TOKENS),
           "--output-dir", run_dir / "trainer", "--result", result]
    cmd += ["--autocast"] if args.trl_autocast and precision == "bf16" else []
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    allocator = "the C library's default malloc"
    if args.trl_same_allocator:
        env, allocator = same_allocator_environment(env, posttrain_host_memory)
    log(f"TRL {precision}: {args.warmup + args.iters} iterations (host memory: {allocator})")
    measured = run_measured(cmd, env, run_dir / "log.txt")
    measured.pop("cpu_marks")
    data = json.loads(result.read_text())
    timed = data["iteration_s"][args.warmup:]
    cpu = data.get("iteration_cpu_s", [])[args.warmup:]
    phases = data.get("phases_s", [])[args.warmup:]
    if phases:
        measured["phases_s"] = {k: statistics.median(p[k] for p in phases) for k in ("generate", "experience", "train")}
    measured.update({"iteration_s": data["iteration_s"], "median_s": statistics.median(timed), "cpu_s": cpu,
                     "median_cpu_s": statistics.median(cpu) if cpu else float("nan"),
                     "response_lengths": data["response_lengths"], "versions": {
                         k: data[k] for k in ("torch", "transformers", "trl", "threads")},
                     "host_memory": allocator,
                     "note": f"{max(data['response_lengths'] or [0])} tokens/response, "
                             f"mixed_precision={data.get('mixed_precision')}"})
    return measured


# ------------------------------------------------------------------------------------------------ main
def print_report(results: list, prep: dict, args) -> None:
    """The tables: seconds per iteration, per-phase ratios, training GFLOP/s against the GEMM rate, targets."""
    print()
    print(f"workload P: SmolLM2-135M-Instruct x4, {BATCH} prompts x {NEW_TOKENS} new tokens, sampled, 1 PPO epoch; "
          f"median of {args.iters} iterations after {args.warmup} warm-up; {os.cpu_count()} CPUs, "
          f"{args.threads or 'default'} threads")
    header = (f"{'system':<10} {'dtype':<5} {'s/iter':>7} {'cpu-s/iter':>10} {'peak RSS GiB':>12} {'ratio':>6}  "
              f"{'gen/exp/train s':>17}  {'load 1m before':>14} {'others':>6}  note")
    print(header)
    print("-" * len(header))
    for row in results:
        trl = row.get("trl")
        for system in ("posttrain", "trl"):
            m = row.get(system)
            if m is None:
                continue
            ratio = f"{m['median_s'] / trl['median_s']:.2f}" if trl else "n/a"
            phases = "/".join(f"{v:.2f}" for v in m["phases_s"].values()) if "phases_s" in m else "-"
            print(f"{system:<10} {row['dtype']:<5} {m['median_s']:>7.2f} {m['median_cpu_s']:>10.1f} "
                  f"{m['peak_rss'] / GIB:>12.2f} "
                  f"{ratio if system == 'posttrain' else '1.00' if trl else 'n/a':>6}  {phases:>17}  "
                  f"{m['load_before'][0]:>14.2f} {m['others_cores']:>6.2f}  {m['note']}")
    print()
    for row in results:
        p = row["posttrain"]
        print(f"posttrain {row['dtype']}: peak RSS incl. final checkpoint save {p['peak_rss_total'] / GIB:.2f} GiB; "
              f"mean response length {p['response_length_mean']:.1f}")
        trl_memory = row.get("trl", {}).get("host_memory")
        print(f"host memory: posttrain {p.get('host_memory', '?')}"
              + (f"; TRL {trl_memory}" if trl_memory else ""))
    print()
    print("per phase (median s/iter):")
    for row in results:
        p, t = row["posttrain"], row.get("trl")
        for phase in ("generate", "experience", "train"):
            mine = p["phases_s"][phase]
            if t and "phases_s" in t:
                print(f"  {row['dtype']:<5} {phase:<10} posttrain {mine:6.2f}  TRL {t['phases_s'][phase]:6.2f}  "
                      f"ratio {mine / t['phases_s'][phase]:.2f}")
            else:
                print(f"  {row['dtype']:<5} {phase:<10} posttrain {mine:6.2f}")
    shape = model_shape(prep["hf_dir"])
    seq = max(prep["prompt_lengths"]) + NEW_TOKENS
    flops = train_flops(shape, BATCH, seq)
    print()
    print(f"training phase FLOPs per iteration: {flops / 1e9:.0f} GFLOP (actor + critic step, {BATCH} x {seq} "
          f"positions = padded prompt {max(prep['prompt_lengths'])} + {NEW_TOKENS} new tokens; "
          f"{sum(prep['prompt_lengths']) + BATCH * NEW_TOKENS} of {BATCH * seq} positions are real tokens)")
    unreliable = False
    for row in results:
        for system in ("posttrain", "trl"):
            m = row.get(system)
            if m is None or "phases_s" not in m:
                continue
            gemm = row["gemm_gflops"].get(system) or []
            note = "" if system == "trl" or m.get("full_length") else " (upper bound: responses stop at EOS)"
            achieved = flops / m["phases_s"]["train"] / 1e9
            line = f"  {row['dtype']:<5} {system:<10} train phase {m['phases_s']['train']:.2f} s: {achieved:.0f} GFLOP/s"
            if gemm:
                rate = statistics.median(gemm)
                line += (f" = {achieved / rate:.0%} of the GEMM rate measured around its run ({args.gemm_size}^3 "
                         f"matmuls, {len(gemm)} samples: median {rate:.0f} GFLOP/s, best {max(gemm):.0f})")
                unreliable |= achieved > rate
            print(line + note)
    if unreliable:
        print("  note: a fraction above 100% means other load changed between the GEMM samples and the run; "
              "rerun on a quieter machine")
    print()
    targets = {r["dtype"]: r for r in results}
    if "fp32" in targets and "trl" in targets["fp32"]:
        ratio = targets["fp32"]["posttrain"]["median_s"] / targets["fp32"]["trl"]["median_s"]
        print(f"target fp32 ratio <= 0.70: {ratio:.2f} ({'met' if ratio <= 0.70 else 'NOT met'})")
    if "bf16" in targets:
        t = targets["bf16"]["posttrain"]["median_s"]
        print(f"target bf16 <= 3.0 s/iter: {t:.2f} ({'met' if t <= 3.0 else 'NOT met'})")
    peak = max(r["posttrain"]["peak_rss"] for r in results) / GIB
    print(f"target peak RSS <= 6 GiB: {peak:.2f} ({'met' if peak <= 6 else 'NOT met'})")
    for row in results:
        gemm = row["gemm_gflops"]["posttrain"]
        if gemm and row["dtype"] == "fp32":
            frac = flops / row["posttrain"]["phases_s"]["train"] / 1e9 / statistics.median(gemm)
            verdict = "unreliable, see the note" if frac > 1 else "met" if frac >= 0.6 else "NOT met"
            print(f"target fp32 train phase >= 60% of the GEMM rate: {frac:.0%} ({verdict})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="posttrain vs TRL seconds per PPO iteration (workload P)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per run (>= 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--skip-trl", action="store_true", help="measure posttrain only")
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench" / "ppo_step",
                        help="model checkpoints, prompts and run outputs")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Alpaca prompts (parquet)")
    parser.add_argument("--posttrain-repo", type=Path, default=REPO,
                        help="checkout whose pretrain_gpt.py/posttrain package is timed (e.g. a patched copy)")
    parser.add_argument("--trl-autocast", action="store_true",
                        help="TRL bf16 with ACCELERATE_MIXED_PRECISION=bf16 (real autocast); without it TRL's "
                             "PPOConfig(bf16=True) computes in fp32 (see bench/trl_ppo_reference.py)")
    parser.add_argument("--trl-same-allocator", "--trl-keep-freed-memory", dest="trl_same_allocator",
                        action="store_true",
                        help="run TRL with the host allocator posttrain ran with (its start-up line): tcmalloc "
                             "preloaded, or glibc's settings of posttrain.cpu_backend.keep_freed_memory (no mmap'd "
                             "blocks, no heap trimming), so both sides pay the same page faults and fragmentation")
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="do not pass --ignore-eos even when posttrain has it")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for both systems (default: torch's choice, all cores); 1 gives CPU "
                             "seconds that hold up on a machine shared with other jobs")
    parser.add_argument("--max-busy", type=float, default=0.3,
                        help="wait while other processes keep more than this many cores busy")
    parser.add_argument("--max-wait", type=float, default=1200.0, help="seconds of waiting for a quiet machine")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep posttrain's final checkpoints")
    parser.add_argument("--gemm-size", type=int, default=3072,
                        help="matrix size of the GEMM-rate measurement (0: skip it)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("posttrain_args", nargs="*", help="after --: extra pretrain_gpt.py flags")
    args = parser.parse_args(argv)
    args.posttrain_repo = args.posttrain_repo.resolve()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in ("fp32", "bf16") for d in dtypes):
        parser.error("--dtypes takes fp32 and/or bf16")
    if args.iters < 1:
        parser.error("--iters must be >= 1")
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise SystemExit("error: psutil is needed (pip install psutil into the project's venv)")

    py = sys.executable
    workdir = args.workdir.resolve()
    prep = prepare(workdir, args.data.resolve(), py, args.posttrain_repo)
    trl_py = None if args.skip_trl else ensure_trl_venv(py)
    out_dir = workdir / "runs"
    budget = {"left": args.max_wait}
    results = []
    for precision in dtypes:
        row = {"dtype": precision}
        row["others_before"] = wait_until_quiet(args.max_busy, budget)
        # GEMM samples just before and just after each system's run; each system is compared with its own
        gemm = {"posttrain": [], "trl": []}
        if args.gemm_size:
            gemm["posttrain"] += gemm_rate(py, precision, args.threads, args.gemm_size)["gflops"]
        row["posttrain"] = run_posttrain(prep, precision, args, py, out_dir)
        if args.gemm_size:
            between = gemm_rate(py, precision, args.threads, args.gemm_size)["gflops"]
            gemm["posttrain"] += between
            gemm["trl"] += between
        log(f"posttrain {precision}: median {row['posttrain']['median_s']:.2f} s/iter, "
            f"iterations {[round(t, 2) for t in row['posttrain']['iteration_s']]}")
        if trl_py:
            wait_until_quiet(args.max_busy, budget)
            row["trl"] = run_trl(prep, precision, args, trl_py, out_dir, row["posttrain"]["host_memory"])
            if args.gemm_size:
                gemm["trl"] += gemm_rate(py, precision, args.threads, args.gemm_size)["gflops"]
            log(f"TRL {precision}: median {row['trl']['median_s']:.2f} s/iter, "
                f"iterations {[round(t, 2) for t in row['trl']['iteration_s']]}")
        row["gemm_gflops"] = gemm
        results.append(row)

    print_report(results, prep, args)
    out_json = args.json or workdir / "results.json"
    out_json.write_text(json.dumps(results, indent=2, default=str))
    log(f"results written to {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
