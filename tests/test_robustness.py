"""End to end on the tiny PPO model of tests/trl_ppo/test_trainer.py: tensors on the right device, a run killed
inside a checkpoint save, and a disk that fills up during a save.

* Device placement: PPO (two option sets) and reward-model training run in this process under
  :class:`tests.device_guard.DeviceGuard`, which lists every tensor posttrain creates without ``device=`` (see
  that module for why a recording mode and not ``torch.set_default_device("meta")``).
* Orphans: a trainer killed with SIGKILL while megatron-core's checkpoint writer processes run must take them,
  and the writer's manager process, with it (:mod:`posttrain.processes`).
* Full disk: a save that runs out of space (a small tmpfs) or hits the file-size limit (``RLIMIT_FSIZE``) ends
  the run with one ``error:`` line; the partial iteration directory is gone and the previous checkpoint and
  tracker file are untouched.
* Bad input that is only found once the stage has started (checkpoint kinds, data sizes, resume directories):
  one ``error:`` line and exit status 1.
"""
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from posttrain import cpu_backend
from tests.device_guard import PACKAGE_DIR, DeviceGuard
from tests.torchrun_utils import REPO
from tests.trl_ppo.test_trainer import assets  # noqa: F401 - the module-scoped fixture: tiny actor, reward, prompts

pytestmark = pytest.mark.filterwarnings("ignore")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def ppo_argv(assets, save, iters, *extra):
    """Flags of a tiny single-process PPO run (2 prompts per iteration, 4 new tokens)."""
    return ["--stage", "trl_ppo", "--ref-model", str(assets / "actor"), "--reward-model", str(assets / "rm"),
            "--data-path", str(assets / "alpaca"), "--micro-batch-size", "2", "--global-batch-size", "2",
            "--train-iters", str(iters), "--max-new-tokens", "4", "--save", str(save), "--log-interval", "1",
            "--sample-interval", "0", *map(str, extra)]


def run_trainer(argv, **kwargs):
    """``python pretrain_gpt.py ARGV`` (one process, no torchrun: its stderr is the trainer's own)."""
    return subprocess.run([sys.executable, "pretrain_gpt.py", *argv], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=900, **kwargs)


def file_digests(directory):
    """``relative path -> sha256`` of every file under ``directory``."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------------
# Device placement
# ----------------------------------------------------------------------------------------------------------------

INJECTED_SOURCE = """
def misplaced_float(value):
    noise = torch.rand(1, generator=torch.Generator().manual_seed(0), device="cpu")
    return float(torch.zeros(3).sum()) + 0 * float(noise) + _float(value)
"""


def test_the_guard_names_a_misplaced_tensor_made_in_posttrain(monkeypatch):
    """A posttrain function is replaced by one that creates ``torch.zeros(3)``; the function is compiled under a
    file name inside the package, which is what makes a frame posttrain's; it also makes a generator without a
    device. Calls from elsewhere, calls with ``device=`` and ``*_like`` calls are not reported; ``torch.Generator``
    is the real class again after the guard, and generators made before it still count as generators."""
    from posttrain.training import metrics

    fake_file = PACKAGE_DIR / "training" / "injected.py"
    namespace = {"torch": torch, "_float": metrics._float}
    exec(compile(INJECTED_SOURCE, str(fake_file), "exec"), namespace)
    monkeypatch.setattr(metrics, "_float", namespace["misplaced_float"])
    guard = DeviceGuard()
    with guard:
        accumulator = metrics.MetricAccumulator()
        accumulator.mean("loss", 1.5, weight=2.0)
        accumulator.mean("loss", 0.5, weight=2.0)
        torch.zeros(3)  # this test's own calls: not posttrain's
        torch.Generator()
        torch.zeros_like(torch.ones(2, device="cpu"))
        assert isinstance(torch.default_generator, torch.Generator)
        reduced = accumulator.reduce()
    assert reduced == {"loss": 1.0}
    assert torch.Generator is torch._C.Generator
    assert [(v.function, Path(v.filename), v.lineno) for v in guard.violations] == [
        ("Generator", fake_file, 3), ("zeros", fake_file, 4)]
    assert guard.report() == ("posttrain/training/injected.py:3 torch.Generator without device=\n"
                              "posttrain/training/injected.py:4 torch.zeros without device=")


def run_guarded(main, argv) -> DeviceGuard:
    """Run a stage's ``main(argv)`` in this process under the guard; assert it succeeded."""
    cpu_backend.activate()  # its mode first (a no-op with CUDA), so the guard is the innermost mode
    guard = DeviceGuard()
    with guard:
        code = main(argv)
    assert code == 0
    return guard


@pytest.mark.parametrize("options", [
    ["--eval-data-path", "{alpaca}", "--eval-samples", "3", "--ptx-coef", "0.1", "--pretrain-data-path", "{alpaca}",
     "--enable-ema", "--normalize-reward", "--kl-target", "0.1", "--entropy-coef", "0.01", "--rollout-batch-size",
     "1", "--save", "{save}"],
    ["--reward-function", "{rule}:constant", "--adv-estimator", "grpo", "--n-samples-per-prompt", "2",
     "--dynamic-sampling", "--dynamic-sampling-max-rounds", "2", "--use-kl-loss", "--overlong-buffer-len", "2",
     "--overlong-filter", "--rollout-correction", "tis"],
], ids=["validation-ptx-ema-save", "reward-function-dynamic-sampling-grpo"])
def test_ppo_creates_every_tensor_on_its_device(assets, tmp_path, options):
    """One PPO iteration (generation, experience, training, validation, ptx, EMA, reward model or function,
    dynamic sampling, a save) under the guard: no tensor of posttrain's without ``device=``. A recording mode and
    not ``torch.set_default_device("meta")``: under ``meta`` the run stops inside torch's checkpoint loader before
    posttrain creates a tensor (tests/device_guard.py says more)."""
    from posttrain.trl_ppo.trainer import main

    rule = tmp_path / "rule.py"
    rule.write_text("def constant(prompts, responses):\n    return [1.0] * len(responses)\n")
    values = {"alpaca": assets / "alpaca", "save": tmp_path / "out", "rule": rule}
    argv = ["--ref-model", str(assets / "actor"), "--data-path", str(assets / "alpaca"), "--micro-batch-size", "2",
            "--global-batch-size", "2", "--train-iters", "1", "--max-new-tokens", "6", "--do-sample",
            "--log-interval", "1", "--sample-interval", "1", "--log-samples", "2",
            *(item.format(**values) for item in options)]
    if "--reward-function" not in argv:
        argv += ["--reward-model", str(assets / "rm")]
    guard = run_guarded(main, argv)
    assert guard.violations == [], "tensors created without device=:\n" + guard.report()


@pytest.fixture(scope="module")
def pairs(assets, example_model_dir, shared_data):
    """16 real preference pairs, tokenized for the reward-model stage."""
    proc = subprocess.run([sys.executable, "preprocess_data.py", "--input", str(shared_data / "dpo_en_250.parquet"),
                           "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", str(example_model_dir),
                           "--output-prefix", str(assets / "pairs"), "--handler-name", "AlpacaStylePairwiseHandler",
                           "--prompt-type", "hf", "--workers", "1", "--max-samples", "16"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return assets / "pairs"


def test_reward_model_training_creates_every_tensor_on_its_device(assets, pairs, tmp_path):
    from posttrain.rm.trainer import main

    argv = ["--pretrained-checkpoint", str(assets / "actor"), "--data-path", str(pairs), "--eval-data-path",
            str(pairs), "--seq-length", "96", "--truncation", "truncate", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "1", "--save", str(tmp_path / "rm")]
    guard = run_guarded(main, argv)
    assert guard.violations == [], "tensors created without device=:\n" + guard.report()


# ----------------------------------------------------------------------------------------------------------------
# A trainer killed inside a checkpoint save leaves no process behind
# ----------------------------------------------------------------------------------------------------------------


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _describe(processes) -> str:
    lines = []
    for p in processes:
        try:
            lines.append(f"pid {p.pid} ppid {p.ppid()}: {' '.join(_cmdline(p))[:160]}")
        except psutil.Error:
            continue
    return "\n".join(lines)


def test_a_trainer_killed_inside_a_save_leaves_no_process_behind(assets, tmp_path):
    """``kill -9`` of the trainer while megatron-core's checkpoint writers run (iteration 3 or later, the
    manager started at the first save): neither the writers nor the manager survive it."""
    save = tmp_path / "save"
    log = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "pretrain_gpt.py", *ppo_argv(assets, save, 8, "--save-interval", 1)],
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=log)
    trainer = psutil.Process(proc.pid)
    descendants = []
    try:
        deadline = time.monotonic() + 600
        while not (save / ".iter_0000003.tmp").exists():
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no save of iteration 3 within 10 minutes"
            time.sleep(0.01)
        time.sleep(0.3)
        command = trainer.cmdline()
        while True:  # until a forked writer (a child with the trainer's command line) runs
            descendants = trainer.children(recursive=True)
            commands = [_cmdline(c) for c in descendants]
            if command in commands:
                break
            assert proc.poll() is None, "the run ended before a checkpoint writer process was seen"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert any("spawn_main" in " ".join(c) for c in commands), "no manager process was running"

        deadline = time.monotonic() + 30
        while any(_alive(p) for p in descendants) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in descendants if _alive(p)]
        survivors += [p for p in psutil.process_iter() if p.pid != os.getpid() and p not in survivors
                      and _alive(p) and str(save) in " ".join(_cmdline(p))]
        assert survivors == [], "processes outlived the killed trainer:\n" + _describe(survivors)
    finally:
        for p in [trainer, *descendants]:
            if _alive(p):
                p.kill()
        log.close()


# ----------------------------------------------------------------------------------------------------------------
# A full disk (or the file-size limit) during a save
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_checkpoint(assets, tmp_path_factory):
    """A ``--save`` directory holding iteration 1 of a tiny PPO run."""
    save = tmp_path_factory.mktemp("first_checkpoint") / "save"
    proc = run_trainer(ppo_argv(assets, save, 1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return save


def resume_one_iteration(assets, save, **kwargs):
    """Resume ``save`` (iteration 1) for one more iteration, saving into it."""
    return run_trainer(ppo_argv(assets, save, 2, "--load", save), **kwargs)


def assert_save_failed_cleanly(proc, save, before, *needles):
    """Exit 1 with one ``error:`` line holding ``needles`` and no traceback; no temporary left; iteration 1 and the
    tracker as they were."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in save.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000001"]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == before["tracker"]
    assert file_digests(save / "iter_0000001") == before["iteration"]
    return errors[0]


def snapshot(save):
    return {"tracker": (save / "latest_checkpointed_iteration.txt").read_text(),
            "iteration": file_digests(save / "iter_0000001")}


def test_a_disk_that_fills_up_during_a_save_is_one_enospc_line(assets, first_checkpoint, tmp_path):
    """The second save lands on a tmpfs with room for half a checkpoint more than the first."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    size = sum(p.stat().st_size for p in first_checkpoint.rglob("*") if p.is_file())
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the RLIMIT_FSIZE test covers the "
                    "failure path")
    try:
        save = mount_point / "save"
        shutil.copytree(first_checkpoint, save)
        before = snapshot(save)
        proc = resume_one_iteration(assets, save)
        assert_save_failed_cleanly(proc, save, before, "ENOSPC", "checkpoint iteration 2", str(save))
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_save_stopped_by_the_file_size_limit_is_one_efbig_line(assets, first_checkpoint, tmp_path):
    """The second save runs under ``RLIMIT_FSIZE`` = 1 MiB (``ulimit -f``): every write past it fails with EFBIG
    (Python ignores SIGXFSZ), and a checkpoint shard of the tiny model is ~12 MB."""
    save = tmp_path / "save"
    shutil.copytree(first_checkpoint, save)
    before = snapshot(save)
    limit = 1 << 20

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = resume_one_iteration(assets, save, preexec_fn=limit_file_size)
    assert_save_failed_cleanly(proc, save, before, "EFBIG", f"{limit} bytes", "ulimit -f",
                               "checkpoint iteration 2", str(save))


# ----------------------------------------------------------------------------------------------------------------
# Bad input found after start-up
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage, flags, message", [
    ("ppo", ["--load", "{empty}"], "--load {empty}: no latest_checkpointed_iteration.txt (not a PPO checkpoint)"),
    ("ppo", ["--reward-model", "{actor}"], "--reward-model {actor} is a causal_lm checkpoint; it needs a value head"),
    ("ppo", ["--ref-model", "{rm}"], "--ref-model {rm} is a value checkpoint; the actor needs a causal LM"),
    ("ppo", ["--max-samples", "1"], "--data-path {alpaca}: 1 prompts cannot fill one --global-batch-size of 2"),
    ("ppo", ["--max-prompt-length", "1", "--prompt-truncation", "skip"],
     "iteration 1: every prompt of this rank's batch is longer than --max-prompt-length 1 (--prompt-truncation skip)"),
    ("rm", ["--global-batch-size", "32"], "--data-path {pairs}: 16 usable pairs cannot fill one --global-batch-size "
                                          "of 32"),
    ("rm", ["--load", "{empty}", "--pretrained-checkpoint", None],
     "--load {empty}: no latest_checkpointed_iteration.txt (not a --stage rm --save directory)"),
    ("rm", ["--pretrained-checkpoint", None], "give --pretrained-checkpoint (the SFT model or a value checkpoint) or "
                                            "--load"),
], ids=["ppo-load-nothing", "ppo-causal-reward", "ppo-value-actor", "ppo-few-prompts", "ppo-long-prompts",
        "rm-few-pairs", "rm-load-nothing", "rm-no-start"])
def test_bad_input_found_after_start_up_is_one_line(assets, pairs, tmp_path, capsys, stage, flags, message):
    from posttrain.rm.trainer import main as rm_main
    from posttrain.trl_ppo.trainer import main as ppo_main

    (tmp_path / "empty").mkdir()
    values = {"empty": tmp_path / "empty", "actor": assets / "actor", "rm": assets / "rm", "alpaca": assets / "alpaca",
              "pairs": pairs}
    if stage == "ppo":
        main, argv = ppo_main, ppo_argv(assets, tmp_path / "out", 1)[2:]
    else:
        main = rm_main
        argv = ["--pretrained-checkpoint", str(assets / "actor"), "--data-path", str(pairs), "--seq-length", "96",
                "--truncation", "truncate", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters",
                "1", "--save", str(tmp_path / "out")]
    for flag, value in zip(flags[::2], flags[1::2]):  # a flag of the case replaces the default one (None: drops it)
        if flag in argv:
            del argv[argv.index(flag):argv.index(flag) + 2]
        if value is not None:
            argv += [flag, value.format(**values)]
    assert main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message.format(**values)}"), errors
    assert not (tmp_path / "out" / "latest_checkpointed_iteration.txt").exists()
