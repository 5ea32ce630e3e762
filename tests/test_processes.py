"""posttrain.processes: children die with a parent that is killed with SIGKILL.

Each test starts an intermediate Python process (the "parent"), lets it start a child, kills the parent with
SIGKILL and watches the child. The end-to-end case (a PPO run killed inside a checkpoint save) is in
tests/test_robustness.py.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from posttrain.atomic import pid_alive
from tests.torchrun_utils import REPO

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only")

FORKING_PARENT = """
import os, sys, time
from posttrain.processes import bind_children_to_parent
if sys.argv[1] == "bound":
    assert bind_children_to_parent()
pid = os.fork()
if pid == 0:
    time.sleep(600)
    os._exit(0)
print(pid, flush=True)
time.sleep(600)
"""

MANAGER_PARENT = """
import os, time
from megatron.core.dist_checkpointing.strategies import filesystem_async
from posttrain import processes
if __name__ == "__main__":
    processes.bind_checkpoint_writer_manager()
    assert processes._MANAGER is None  # started when a save first needs it, as megatron-core does
    queue = filesystem_async._get_write_results_queue()
    assert filesystem_async._get_write_results_queue() is queue is filesystem_async._results_queue
    queue.put("through the manager")
    assert queue.get() == "through the manager"
    print(processes._MANAGER._process.pid, flush=True)
    time.sleep(600)
"""


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _start_parent(args):
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)


def _kill_parent_and_wait_for(parent, child_pid, deadline_s=60.0):
    """SIGKILL the parent; return True when ``child_pid`` is gone within the deadline (a zombie counts as gone)."""
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + deadline_s
    while pid_alive(child_pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_forked_child_dies_with_its_killed_parent():
    parent = _start_parent(["-c", FORKING_PARENT, "bound"])
    child = int(parent.stdout.readline())
    try:
        assert _kill_parent_and_wait_for(parent, child)
    finally:
        if pid_alive(child):
            os.kill(child, signal.SIGKILL)


def test_without_the_hook_the_forked_child_outlives_its_parent():
    """The control: the situation the hook exists for (the child is reparented and keeps running)."""
    parent = _start_parent(["-c", FORKING_PARENT, "unbound"])
    child = int(parent.stdout.readline())
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert pid_alive(child)
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_child_whose_parent_died_before_it_asked_for_the_signal_kills_itself():
    code = ("import os; from posttrain.processes import die_with_parent; "
            "die_with_parent(os.getppid() + 1); print('still here')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL and "still here" not in proc.stdout


def test_the_checkpoint_writers_manager_serves_megatron_and_dies_with_its_killed_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(MANAGER_PARENT)  # a file: the spawned manager re-imports the parent's __main__
    parent = _start_parent([str(script)])
    line = parent.stdout.readline()
    assert line.strip().isdigit(), "the parent failed before starting the manager"
    manager = int(line)
    try:
        assert pid_alive(manager)
        assert _kill_parent_and_wait_for(parent, manager)
    finally:
        if pid_alive(manager):
            os.kill(manager, signal.SIGKILL)
