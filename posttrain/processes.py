"""Child processes die with the process that started them.

megatron-core's ``dist_checkpointing`` (torch_dist strategy) forks writer processes for every save, and once per
process starts a :mod:`multiprocessing` manager (spawn context) that collects their results. Nothing tells them
when the trainer is killed with SIGKILL (``kill -9``, the OOM killer, a scheduler's hard kill): a writer caught
mid-save then waits forever (seen blocked in a futex wait), the manager serves forever, and both remain,
reparented to init, holding hundreds of MB each (measured on the tiny test model: a writer 554 MB RSS, the manager
273 MB, and multiprocessing's resource tracker, which waits for both, 13 MB).

Two measures, both Linux-only (elsewhere they do nothing):

* :func:`bind_children_to_parent` registers an :func:`os.register_at_fork` hook: every child forked from the main
  thread of this process asks the kernel for ``SIGKILL`` when its parent dies (``prctl(PR_SET_PDEATHSIG)``),
  then checks that the parent is still the one that forked it (if it died in between, the child kills itself).
  This covers ``multiprocessing`` fork-context workers (megatron's writers, preprocessing's pool) and
  ``subprocess`` children started with a ``preexec_fn``. Forks from other threads are left alone: the kernel's
  notion of "parent" is the forking *thread*, and a short-lived thread would take its children with it.
  Called by :func:`posttrain.distributed.initialize_distributed` (every training and conversion entry point) and
  by preprocessing.
* :func:`bind_checkpoint_writer_manager` makes megatron-core start that manager with an initializer that sets
  the same parent-death signal (a spawned process runs no fork hook). megatron-core keeps the queue in a module
  global (``megatron.core.dist_checkpointing.strategies.filesystem_async._results_queue``) created by
  ``_get_write_results_queue()`` when a rank first has something to write; that function is replaced by one that
  fills the same global the same way, at the same moment, from a manager started with the initializer.

multiprocessing's resource tracker needs neither: it exits when the last process holding its pipe (this process,
the manager, the writers) is gone.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from typing import Callable, Optional

PR_SET_PDEATHSIG = 1
"""``prctl`` option: signal sent to this process when its parent thread exits (``<linux/prctl.h>``)."""

_LOCK = threading.Lock()
_INSTALLED = False
_PRCTL: Optional[Callable[..., int]] = None
_FORKING_PID = 0
_FORKING_FROM_MAIN_THREAD = False
_MANAGER = None


def _load_prctl() -> Optional[Callable[..., int]]:
    """libc's ``prctl`` (loaded in the parent: ``dlopen`` after a fork of a threaded process can deadlock)."""
    global _PRCTL
    if _PRCTL is None and sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            return None
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        prctl.restype = ctypes.c_int
        _PRCTL = prctl
    return _PRCTL


def die_with_parent(parent_pid: int) -> None:
    """Make the calling process receive SIGKILL when its parent dies; if the parent is no longer
    ``parent_pid`` (it died before this call), die now.

    Runs in a freshly forked child, or as the initializer of a spawned process (then with the spawner's pid).
    """
    prctl = _load_prctl()
    if prctl is None:
        return
    if prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return  # not permitted here: the child lives as it would without this module
    if os.getppid() != parent_pid:  # the parent died between the fork and prctl: the signal will never come
        os.kill(os.getpid(), signal.SIGKILL)


def _before_fork() -> None:
    global _FORKING_PID, _FORKING_FROM_MAIN_THREAD
    _FORKING_PID = os.getpid()
    _FORKING_FROM_MAIN_THREAD = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    if _FORKING_FROM_MAIN_THREAD:
        die_with_parent(_FORKING_PID)


def bind_children_to_parent() -> bool:
    """Install the fork hook of the module docstring, once per process (idempotent; forked children inherit it).

    Returns:
        True when the hook is installed (Linux with a usable ``prctl``), False where it cannot be.
    """
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return True
        if _load_prctl() is None:
            return False
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _INSTALLED = True
        return True


def _write_results_queue():
    """megatron-core's ``_get_write_results_queue`` with a manager process that dies with this process."""
    global _MANAGER
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        from multiprocessing.managers import SyncManager

        # the spawn context, as megatron-core uses: a forked manager would copy this process's CUDA state
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        _MANAGER = manager
        filesystem_async._results_queue = manager.Queue()
    return filesystem_async._results_queue


def bind_checkpoint_writer_manager() -> None:
    """Make megatron-core's checkpoint writer start its results-queue manager as a process that dies with this
    one (see the module docstring). Call it before ``dist_checkpointing.save``, in the thread that saves (the
    main thread); idempotent. A no-op without ``prctl``, and with a megatron-core that has no such queue (another
    version), or that already made its queue.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _load_prctl() is None or getattr(filesystem_async, "_results_queue", False) is not None:
        return
    if callable(getattr(filesystem_async, "_get_write_results_queue", None)):
        filesystem_async._get_write_results_queue = _write_results_queue
