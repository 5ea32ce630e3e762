"""fp32 matrix products through oneDNN on CPUs where they run faster than torch's default BLAS.

On a CPU, torch computes an fp32 ``aten::mm`` with the BLAS it was built with (MKL in the x86 wheels). On some
CPUs that BLAS does not use the widest vector units the CPU has (MKL on AMD processors with AVX512 runs its
AVX2 kernels), while oneDNN, which torch also ships and uses for its own CPU inference kernels
(``torch.ops.mkldnn._linear_pointwise``), does. The shapes of a small transformer's layers (``[b·s, h] @ [h, f]``
with ``h`` in the hundreds) then run two to four times faster through oneDNN (docs/performance.md).

:func:`install` measures both on the machine at hand (:func:`onednn_speedup`) and, when oneDNN is at least
:data:`MIN_SPEEDUP` times faster, registers a CPU kernel for ``aten::mm`` that sends fp32 products of at least
:data:`MIN_WORK` multiply-adds to oneDNN and every other product to the original kernel. Because it replaces the
kernel under autograd, it serves every ``mm`` torch runs: the forward of megatron-core's linear layers and the
products of their backward passes alike. Both compute the same IEEE fp32 sums in a different order, so results
differ in the last bits (about 1e-6 relative), not in precision. ``bmm`` and the attention kernels are untouched.

``POSTTRAIN_CPU_MATMUL`` forces the choice: ``onednn``, ``blas`` (torch's default) or ``auto`` (measure; the
default). A process with CUDA never installs it (:func:`posttrain.cpu_backend.activate` runs only without CUDA).
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from typing import Optional

import torch

from posttrain.errors import InputError

ENV = "POSTTRAIN_CPU_MATMUL"
CHOICES = ("auto", "onednn", "blas")
MIN_SPEEDUP = 1.2
"""oneDNN must run the probe product this many times faster than the default BLAS to be chosen by ``auto``."""
MIN_WORK = 1 << 20
"""Products of fewer multiply-adds (``m·n·k``) stay with the default kernel: oneDNN's per-call set-up would
outweigh them."""

_LOCK = threading.RLock()
_LIBRARY: Optional[torch.library.Library] = None
_STATE: dict = {}


def _onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (``[m, k] @ [k, n]``, fp32) through oneDNN: a linear layer with weight ``b.T``."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")


def _blas_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` through torch's original CPU kernel (``aten::mm.out``, which :func:`install` leaves alone)."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=torch.result_type(a, b), device=a.device)
    return torch.ops.aten.mm.out(a, b, out=out)


def _plain_strides(t: torch.Tensor) -> bool:
    """Row- or column-major without zero strides (what the oneDNN call is given a memory layout for)."""
    return 0 not in t.stride() and (t.is_contiguous() or t.t().is_contiguous())


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The ``aten::mm`` CPU kernel :func:`install` registers."""
    if (a.dtype == torch.float32 and b.dtype == torch.float32 and a.shape[0] * a.shape[1] * b.shape[1] >= MIN_WORK
            and _plain_strides(a) and _plain_strides(b)):
        return _onednn_mm(a, b)
    return _blas_mm(a, b)


def _kernel_seconds(m: int, k: int, n: int, repeats: int) -> dict[str, float]:
    """Best of ``repeats`` timings (after a warm-up) of an fp32 ``[m, k] @ [k, n]`` per available kernel."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator)
    b = torch.randn(k, n, generator=generator)
    kernels = {"blas": _blas_mm}
    if _onednn_available():
        kernels["onednn"] = _onednn_mm
    times = {}
    for name, fn in kernels.items():
        fn(a, b)  # warm-up (oneDNN creates its kernel for the shape)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn(a, b)
            best = min(best, time.perf_counter() - start)
        times[name] = best
    return times


def onednn_speedup(m: int = 1024, k: int = 576, n: int = 1536, repeats: int = 5) -> float:
    """How many times faster oneDNN computes an fp32 ``[m, k] @ [k, n]`` than torch's default BLAS, measured now.

    The shape defaults to a SmolLM2-135M MLP product over 1024 tokens; each kernel is timed as the best of
    ``repeats`` runs after a warm-up, in the calling thread's torch thread count (tens of milliseconds in all).

    Returns:
        default time / oneDNN time (above 1: oneDNN is faster); 0.0 where oneDNN is not available.
    """
    times = _kernel_seconds(m, k, n, repeats)
    return times["blas"] / times["onednn"] if "onednn" in times else 0.0


def fp32_matmul_seconds(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Seconds of an fp32 ``[m, k] @ [k, n]`` with the faster of the two kernels (best of ``repeats``)."""
    return min(_kernel_seconds(m, k, n, repeats).values())


def _use(choice: str) -> None:
    """Register (``onednn``) or remove (``blas``) the ``aten::mm`` kernel of :func:`_mm`; caller holds the lock."""
    global _LIBRARY
    if choice == "onednn" and _LIBRARY is None:
        library = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": the point here
            library.impl("mm", _mm, "CPU")
        _LIBRARY = library
    elif choice == "blas" and _LIBRARY is not None:
        _LIBRARY._destroy()
        _LIBRARY = None
    _STATE["choice"] = choice


def install() -> str:
    """Choose the fp32 matrix-product kernel of this process (see the module docstring); idempotent.

    Returns:
        ``onednn`` or ``blas``, the choice in use (also :func:`describe`).

    Raises:
        InputError: ``POSTTRAIN_CPU_MATMUL`` is set to something else than ``auto``, ``onednn`` or ``blas``.
    """
    with _LOCK:
        if "choice" in _STATE:
            return _STATE["choice"]
        requested = os.environ.get(ENV, "auto").strip().lower() or "auto"
        if requested not in CHOICES:
            raise InputError(f"environment variable {ENV}={os.environ[ENV]!r}: expected one of "
                             f"{', '.join(CHOICES)}")
        speedup = None
        if requested == "auto":
            speedup = onednn_speedup()
            choice = "onednn" if speedup >= MIN_SPEEDUP else "blas"
        else:
            choice = requested if (requested == "blas" or _onednn_available()) else "blas"
        _STATE.update(requested=requested, speedup=speedup)
        _use(choice)
        return choice


def adopt_rank0_choice() -> str:
    """Make every rank of the default process group use global rank 0's choice (a collective; call it once the
    group exists, on every rank). Each rank measures on its own at start-up; where the two kernels are close,
    ranks could choose differently, and rank 0's choice is the one its start-up line reported.

    Returns:
        the choice in use on this rank afterwards.
    """
    import torch.distributed as dist

    mine = install()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    flag = torch.tensor([1 if mine == "onednn" else 0], dtype=torch.int32)
    dist.broadcast(flag, src=0)
    with _LOCK:
        _use("onednn" if int(flag) == 1 else "blas")
        return _STATE["choice"]


def describe() -> str:
    """One line naming the fp32 matrix-product kernel in use and why, e.g. ``oneDNN (2.41x the default BLAS
    measured at start-up)``; empty before :func:`install`."""
    if "choice" not in _STATE:
        return ""
    name = "oneDNN" if _STATE["choice"] == "onednn" else "default BLAS"
    if _STATE["speedup"] is None:
        return f"{name} ({ENV}={_STATE['requested']})"
    return f"{name} (oneDNN measured at {_STATE['speedup']:.2f}x the default BLAS at start-up)"
