"""The host memory allocator of a CPU run: tcmalloc where it is installed, glibc's ``malloc`` otherwise.

On CPU every tensor comes from the C library's ``malloc``. A PPO step allocates and frees thousands of blocks of
0.1-100 MiB in an order that changes between the generation, experience and training phases; glibc's heap, even
with freed memory kept (:func:`posttrain.cpu_backend.keep_freed_memory`), ends up with about 1 GiB of free holes
of 0.8-2.3 MiB between live blocks, too small for the next phase's tensors, so the resident size stays 1.0-1.3 GiB
above the live peak (docs/performance.md, "Sixth pass"). tcmalloc (gperftools' ``libtcmalloc_minimal``) serves
such blocks from page spans that it reuses across sizes; with it workload P's resident peak is what is live plus
the libraries. (PyTorch's performance tuning guide suggests tcmalloc or jemalloc for CPU workloads; jemalloc measured
worse here.)

An allocator cannot be swapped once the process has started, so :func:`use_tcmalloc` re-executes the entry point
with ``LD_PRELOAD`` before anything heavy is imported. It does so only on a host without an NVIDIA GPU (a GPU run's
host allocator is left as it is) and only where the library is installed (Debian/Ubuntu package
``libtcmalloc-minimal4``; ``scripts/install.sh`` installs it where it can). ``POSTTRAIN_CPU_ALLOCATOR`` chooses:
``auto`` (default), ``tcmalloc`` (an error where it is missing) or ``glibc`` (never preload). An allocator the
user preloads (tcmalloc, jemalloc or mimalloc in ``LD_PRELOAD``) is left in force.

This module imports nothing but the standard library.
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Optional, Sequence

ENV = "POSTTRAIN_CPU_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "glibc")
_REEXECUTED = "POSTTRAIN_ALLOCATOR_REEXECUTED"
# tcmalloc prints a "large alloc" line with a stack for every block above this many bytes (default 1 GiB).
_REPORT = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"
_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


class AllocatorError(RuntimeError):
    """``POSTTRAIN_CPU_ALLOCATOR`` names an unknown allocator or one that is not installed."""


def loaded_allocator() -> str:
    """``"tcmalloc"``, ``"jemalloc"`` or ``"mimalloc"`` when such a library is mapped into this process, else
    ``"glibc"``."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = maps.read()
    except OSError:  # not Linux
        return "glibc"
    return next((name for name in _ALLOCATORS if f"/lib{name}" in mapped), "glibc")


def find_tcmalloc() -> Optional[str]:
    """The file name of the installed tcmalloc (``libtcmalloc_minimal.so.4``; the full one as a fallback), or None.

    A bare library name is what ``LD_PRELOAD`` searches the linker's paths for."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def describe(kept: bool = False) -> str:
    """How this process allocates host memory, for the start-up line, e.g. ``tcmalloc (libtcmalloc_minimal.so.4,
    preloaded)`` or ``glibc malloc, freed memory kept (POSTTRAIN_CPU_ALLOCATOR=glibc)``.

    Args:
        kept: glibc keeps freed memory (:func:`posttrain.cpu_backend.keep_freed_memory`, applied when the CPU
            backend is switched on unless the user set glibc's own variables); said after ``glibc malloc``.
    """
    loaded = loaded_allocator()
    if loaded != "glibc":
        preloaded = [item for item in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if loaded in item]
        return f"{loaded} ({os.path.basename(preloaded[0])}, preloaded)" if preloaded else loaded
    choice = os.environ.get(ENV, "auto")
    if choice == "glibc":
        why = f"{ENV}=glibc"
    elif find_tcmalloc() is None:
        why = "no tcmalloc installed: apt-get install libtcmalloc-minimal4"
    else:
        why = "not started through pretrain_gpt.py"
    return f"glibc malloc{', freed memory kept' if kept else ''} ({why})"


def _nvidia_gpu_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def tcmalloc_to_preload(environ: Optional[dict] = None) -> Optional[str]:
    """The tcmalloc library :func:`use_tcmalloc` preloads in a process started with ``environ`` (default: this
    one's), or None where it keeps the allocator as it is: ``POSTTRAIN_CPU_ALLOCATOR=glibc``, ``auto`` on a host
    with an NVIDIA GPU or without tcmalloc, or an allocator (tcmalloc, jemalloc, mimalloc) in ``LD_PRELOAD``
    already.

    Raises:
        AllocatorError: an unknown ``POSTTRAIN_CPU_ALLOCATOR``, or ``tcmalloc`` where none is installed.
    """
    environ = os.environ if environ is None else environ
    choice = environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise AllocatorError(f"{ENV}={environ[ENV]!r}: choose one of {', '.join(CHOICES)}")
    if choice == "glibc" or any(name in environ.get("LD_PRELOAD", "") for name in _ALLOCATORS):
        return None
    if choice == "auto" and _nvidia_gpu_present():
        return None
    library = find_tcmalloc()
    if library is None and choice == "tcmalloc":
        raise AllocatorError(f"{ENV}=tcmalloc, but no tcmalloc library is installed "
                             "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")
    return library


def preload_environment(library: str, environ: Optional[dict] = None) -> dict:
    """A copy of ``environ`` (default: this process's) with ``library`` added to ``LD_PRELOAD`` and tcmalloc's
    report of every block above 1 GiB (a stack trace on stderr each time) switched off unless set."""
    env = dict(os.environ if environ is None else environ)
    env["LD_PRELOAD"] = " ".join(filter(None, (env.get("LD_PRELOAD", ""), library)))
    env.setdefault(_REPORT, str(1 << 40))
    return env


def use_tcmalloc(argv: Optional[Sequence[str]] = None) -> None:
    """Re-execute this process with tcmalloc preloaded where :func:`tcmalloc_to_preload` names one (see module).

    Call first thing in an entry point's ``__main__`` block: when it preloads, it does not return (``os.execve``
    replaces the process and keeps its PID, so ``torchrun``'s agent still watches the same worker). It returns
    without doing anything when an allocator is preloaded already, when there is nothing to preload, and after one
    re-execution (a library that fails to preload never loops).

    Args:
        argv: the command line to run again (default: this interpreter's own, ``sys.orig_argv``).

    Raises:
        AllocatorError: see :func:`tcmalloc_to_preload`.
    """
    if loaded_allocator() != "glibc" or os.environ.get(_REEXECUTED):
        return
    library = tcmalloc_to_preload()
    if library is None:
        return
    env = preload_environment(library)
    env[_REEXECUTED] = "1"
    command = list(argv) if argv is not None else [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, env)
