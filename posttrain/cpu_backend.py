"""Run megatron-core 0.16.1 on a CPU-only torch build.

Stock megatron-core assumes CUDA for bookkeeping even where the arithmetic would run anywhere: rotary
embeddings and the default causal mask are built on ``"cuda"``, DDP allocates its gradient buffers with
``device=torch.cuda.current_device()``, the optimizer keeps its loss scale on the GPU and ``clip_grads`` asserts
``param.grad.type() == 'torch.cuda.FloatTensor'``, the pipeline schedules count tokens on ``"cuda"``,
``dist_checkpointing`` calls ``torch.cuda.synchronize()``, and the model-parallel RNG tracker stores CUDA
generator states.

:func:`activate` adapts all of that in two layers, once per process, and only when
``torch.cuda.is_available()`` is false (with a GPU it does nothing, so NCCL, Transformer Engine and apex paths
stay untouched):

1. **Stubs** for the ``torch.cuda`` calls megatron-core makes for bookkeeping: ``current_device`` returns the
   CPU device; ``synchronize``, ``empty_cache``, streams and events are no-ops; the CUDA RNG functions
   (``get_rng_state``, ``set_rng_state``, ``manual_seed``) and the RNG tracker's private get/set helpers act on
   the CPU default generator, so ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()``
   work unchanged.
2. A :class:`torch.overrides.TorchFunctionMode` (:class:`CudaToCpuMode`) that rewrites every ``device=``
   argument naming CUDA to CPU (tensor factories, ``Tensor.to``, ``new_*``), makes ``Tensor.cuda()`` and
   ``pin_memory()`` no-ops, and answers ``Tensor.type()`` with the ``torch.cuda.*`` name the optimizer and
   ``clip_grads`` expect. A TorchFunctionMode is per thread: :func:`activate` enters it in the calling thread
   (the main thread, through :func:`posttrain.distributed.initialize_distributed`); call
   :func:`enter_thread` in any other thread that runs megatron-core.

It also keeps freed memory in the process (:func:`keep_freed_memory`), as torch's CUDA caching allocator does on
a GPU, where glibc's ``malloc`` serves the tensors: by default it gives blocks above its mmap threshold their own
mapping (unmapped on free) and trims the top of the heap, so every step's activations, logits and gradients fault
their pages in again, each zeroed by the kernel (measured in docs/performance.md). Where ``pretrain_gpt.py`` has
preloaded tcmalloc (:mod:`posttrain.allocator`) that is not needed and not done.

The one place this is switched on is :func:`posttrain.distributed.initialize_distributed`.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from posttrain import allocator, cpu_matmul

_CPU = torch.device("cpu")
_LOCK = threading.Lock()
_ACTIVE = False
_THREAD_STATE = threading.local()

# torch.Tensor.type() names for CPU tensors -> the CUDA names megatron-core compares against.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    """True for ``"cuda"``, ``"cuda:1"``, ``torch.device("cuda", 0)`` (ints are left alone: CPU has none)."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    return False


def _to_cpu_device(device: Any) -> Any:
    return _CPU if _is_cuda_device(device) else device


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement requests to CPU for every torch call made while the mode is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.is_pinned:
            return False
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


class _NoOpStream:
    """Stand-in for ``torch.cuda.Stream``: every method is a no-op; usable as a context manager."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoOpEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NoOpEvent(_NoOpStream):
    """Stand-in for ``torch.cuda.Event``; ``elapsed_time`` is 0 ms."""

    def record(self, *args, **kwargs):
        pass

    def elapsed_time(self, other) -> float:
        return 0.0


def _noop(name: str, result: Any = None):
    """A fresh no-op function per stubbed name (torch.compile's rule table rejects one object under two names)."""

    def noop(*args, **kwargs):
        return result

    noop.__name__ = noop.__qualname__ = name
    return noop


def _install_stubs() -> None:
    """Layer 1: replace the bookkeeping ``torch.cuda`` calls and the RNG tracker's state helpers."""
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.synchronize = _noop("synchronize")
    cuda.empty_cache = _noop("empty_cache")
    cuda.set_device = _noop("set_device")
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpEvent
    cuda.current_stream = lambda *a, **k: _NoOpStream()
    cuda.default_stream = lambda *a, **k: _NoOpStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = _noop("memory_allocated", 0)
    cuda.max_memory_allocated = _noop("max_memory_allocated", 0)
    cuda.reset_peak_memory_stats = _noop("reset_peak_memory_stats")

    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    cuda.get_rng_state = get_rng_state
    cuda.set_rng_state = set_rng_state
    cuda.manual_seed = manual_seed
    cuda.manual_seed_all = _noop("manual_seed_all")  # torch.manual_seed calls it after seeding the CPU generator
    cuda.random.get_rng_state = get_rng_state
    cuda.random.set_rng_state = set_rng_state

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = (
        lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())
    mcore_random._set_cuda_rng_state = (
        lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))
    # On CPU the tracked "CUDA" states are the CPU generator's states, so the tracker's check that the CPU
    # state is unchanged inside fork() is always tripped by dropout; it says nothing useful here.
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)

    # The MoE all-to-all dispatcher turns its split sizes into NumPy arrays only for CUDA tensors; on CPU they stay
    # tensors, which all_to_all_single rejects. Convert CPU tensors too when NumPy is asked for.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def enter_thread() -> None:
    """Enter :class:`CudaToCpuMode` in the calling thread (idempotent). No-op unless :func:`activate` ran."""
    if not _ACTIVE or getattr(_THREAD_STATE, "mode", None) is not None:
        return
    mode = CudaToCpuMode()
    mode.__enter__()
    _THREAD_STATE.mode = mode


@contextlib.contextmanager
def suspended():
    """Leave :class:`CudaToCpuMode` for the duration of a block in the calling thread (no-op when not entered).

    For code that never asks for CUDA (plain torch ops on CPU tensors, e.g. the lean rollout decoder): it is
    spared the mode's Python call on every op.
    """
    mode = getattr(_THREAD_STATE, "mode", None)
    if mode is None:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


def activate() -> bool:
    """Adapt megatron-core to CPU torch if, and only if, CUDA is absent (idempotent).

    Returns:
        True when the CPU backend is active after the call, False when CUDA is available (nothing changed).
    """
    global _ACTIVE
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if not _ACTIVE:
            _install_stubs()
            if allocator.loaded_allocator() == "glibc":  # tcmalloc & co. reuse freed memory on their own
                keep_freed_memory()
            cpu_matmul.install()
            _ACTIVE = True
    enter_thread()
    return True


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_",
               "GLIBC_TUNABLES")


def keep_freed_memory(trim_threshold: int = (1 << 31) - 1) -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of returning it to the kernel.

    A training step frees and re-allocates the same tensors (activations, logits ``[b, response_len, V]``,
    gradients) every micro-batch. With glibc's defaults a block above the mmap threshold (at most 32 MiB: logits,
    embedding gradients) gets its own mapping, unmapped when freed, and the top of the heap is returned once
    128 KiB-64 MiB of it are free; the next allocation faults the pages in again and the kernel zeroes each one.
    On a virtual machine such a fault can cost tens of microseconds. Here every block comes from the heap
    (``M_MMAP_MAX = 0``) and up to ``trim_threshold`` bytes of free heap stay mapped, so after the first
    iterations a step faults no page in (docs/performance.md). The resident size is then the high-water mark of
    the heap, as with torch's CUDA caching allocator; the memory is not handed back between steps.

    Args:
        trim_threshold: bytes of free memory at the top of the heap that are kept (glibc takes an ``int``).

    Returns:
        True when the settings were applied; False where the C library is not glibc or the user set glibc's own
        ``MALLOC_*_`` variables or ``GLIBC_TUNABLES`` (theirs win).
    """
    if user_malloc_settings():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in ((_M_MMAP_MAX, 0),
                                                              (_M_TRIM_THRESHOLD, trim_threshold)))


def user_malloc_settings() -> list[str]:
    """The glibc ``malloc`` variables the user set (``MALLOC_*_``, ``GLIBC_TUNABLES``); where there are any,
    :func:`keep_freed_memory` leaves their settings in force."""
    return [name for name in _MALLOC_ENV if name in os.environ]


def is_active() -> bool:
    """True once :func:`activate` has adapted this process to CPU."""
    return _ACTIVE


def bf16_matmul_speedup(m: int = 512, k: int = 576, n: int = 1536, repeats: int = 5) -> float:
    """How many times faster a bf16 matrix product runs than an fp32 one on this CPU, measured now.

    CPUs differ by an order of magnitude here: with AMX bf16 is several times faster than fp32, with AVX512-BF16
    alone it is slower, and without either torch emulates it 10-100× slower. The shape defaults to a
    SmolLM2-135M MLP product over 512 tokens (``[m, k] @ [k, n]``); each dtype is timed as the best of
    ``repeats`` runs after a warm-up, in the calling thread's torch thread count.

    The fp32 time is that of the faster of the two fp32 kernels a run can use (torch's default BLAS and oneDNN,
    see :mod:`posttrain.cpu_matmul`).

    Returns:
        fp32 time / bf16 time (above 1: bf16 is faster). Takes well under a second on any CPU where bf16 is
        not emulated, at most a few seconds where it is.
    """
    import time

    fp32 = cpu_matmul.fp32_matmul_seconds(m, k, n, repeats)
    a = torch.randn(m, k, device="cpu").to(torch.bfloat16)
    b = torch.randn(k, n, device="cpu").to(torch.bfloat16)
    start = time.perf_counter()
    a @ b  # warm-up
    best = time.perf_counter() - start
    if best <= 10 * fp32:  # otherwise emulated bf16: one product says enough
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    return fp32 / best


def choose_precision(min_speedup: float = 1.3) -> tuple[str, float]:
    """``("bf16", speedup)`` when bf16 products run at least ``min_speedup``× faster than fp32 on this CPU (see
    :func:`bf16_matmul_speedup`), else ``("fp32", speedup)``. With a CUDA GPU: ``("bf16", nan)`` (every GPU
    megatron-core targets has bf16 tensor cores)."""
    if torch.cuda.is_available():
        return "bf16", float("nan")
    speedup = bf16_matmul_speedup()
    return ("bf16" if speedup >= min_speedup else "fp32"), speedup
