"""posttrain.allocator: CPU jobs started through pretrain_gpt.py run with tcmalloc preloaded where it is installed."""
import os
import subprocess
import sys

import pytest

from posttrain import allocator
from tests.torchrun_utils import REPO

needs_tcmalloc = pytest.mark.skipif(allocator.find_tcmalloc() is None,
                                    reason="tcmalloc is not installed (scripts/install.sh installs it as root)")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", allocator.ENV, "POSTTRAIN_ALLOCATOR_REEXECUTED")}
    env.update(extra)
    return env


def _start(env: dict) -> subprocess.CompletedProcess:
    """pretrain_gpt.py up to its first flag check: the start-up line, then a one-line error (exit 1)."""
    return subprocess.run([sys.executable, "pretrain_gpt.py", "--stage", "rm", "--data-path", "unused"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


@needs_tcmalloc
@pytest.mark.skipif(allocator._nvidia_gpu_present(), reason="GPU hosts keep their allocator")
def test_a_cpu_job_runs_with_tcmalloc_mapped_and_says_so():
    proc = _start(_env())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = next(item for item in proc.stdout.splitlines() if item.startswith("[rm] "))
    # the start-up line reads /proc/self/maps: the library is mapped into the process that trains
    assert line.endswith(f"| host memory tcmalloc ({allocator.find_tcmalloc()}, preloaded)"), line


def test_glibc_can_be_chosen_and_keeps_freed_memory():
    proc = _start(_env(**{allocator.ENV: "glibc"}))
    assert proc.returncode == 1, proc.stderr
    line = next(item for item in proc.stdout.splitlines() if item.startswith("[rm] "))
    assert line.endswith("| host memory glibc malloc, freed memory kept (POSTTRAIN_CPU_ALLOCATOR=glibc)"), line


def test_an_unknown_allocator_is_one_line_before_anything_is_imported():
    proc = _start(_env(**{allocator.ENV: "jemalloc"}))
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: POSTTRAIN_CPU_ALLOCATOR='jemalloc': choose one of auto, tcmalloc, "
                                   "glibc"), proc.stderr
    assert proc.stdout == ""  # no start-up line: nothing ran


@needs_tcmalloc
@pytest.mark.skipif(allocator._nvidia_gpu_present(), reason="GPU hosts keep their allocator")
def test_the_process_is_run_again_once_with_its_pid_and_arguments():
    code = ("import os, sys\n"
            "from posttrain.allocator import loaded_allocator, use_tcmalloc\n"
            "print(os.getpid(), loaded_allocator(), sys.argv[1:], flush=True)\n"
            "use_tcmalloc()\n"
            "print('done', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code, "a", "--b"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    first, second, done = proc.stdout.splitlines()
    pid = first.split()[0]
    assert first == f"{pid} glibc ['a', '--b']"
    assert second == f"{pid} tcmalloc ['a', '--b']"  # the same process, run again with the library preloaded
    assert done == "done"


def test_the_choice_follows_the_variable_the_gpu_and_what_is_installed(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "_nvidia_gpu_present", lambda: False)
    assert allocator.tcmalloc_to_preload({}) == "libtcmalloc_minimal.so.4"
    assert allocator.tcmalloc_to_preload({allocator.ENV: "glibc"}) is None
    assert allocator.tcmalloc_to_preload({"LD_PRELOAD": "/x/libtcmalloc_minimal.so.4"}) is None  # loaded already
    monkeypatch.setattr(allocator, "_nvidia_gpu_present", lambda: True)
    assert allocator.tcmalloc_to_preload({}) is None  # auto leaves a GPU host's allocator alone
    assert allocator.tcmalloc_to_preload({allocator.ENV: "tcmalloc"}) == "libtcmalloc_minimal.so.4"
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert allocator.tcmalloc_to_preload({}) is None
    with pytest.raises(allocator.AllocatorError, match="apt-get install libtcmalloc-minimal4"):
        allocator.tcmalloc_to_preload({allocator.ENV: "tcmalloc"})


def test_the_preload_environment_adds_to_a_users_preload_and_silences_large_block_reports():
    env = allocator.preload_environment("libtcmalloc_minimal.so.4", {"LD_PRELOAD": "libfoo.so", "X": "1"})
    assert env["LD_PRELOAD"] == "libfoo.so libtcmalloc_minimal.so.4" and env["X"] == "1"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    mine = allocator.preload_environment("libtcmalloc_minimal.so.4", {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"})
    assert mine["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"  # the user's own setting wins


def test_an_allocator_the_user_preloads_is_left_in_force(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "_nvidia_gpu_present", lambda: False)
    for library in ("/usr/lib/libjemalloc.so.2", "libmimalloc.so", "/opt/libtcmalloc.so.4"):
        assert allocator.tcmalloc_to_preload({"LD_PRELOAD": library}) is None
    assert allocator.tcmalloc_to_preload({"LD_PRELOAD": "libfoo.so"}) == "libtcmalloc_minimal.so.4"
