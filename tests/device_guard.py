"""A torch function mode that records tensors posttrain creates without saying where they go.

On a CPU-only machine every tensor lands on the CPU whatever the code says, so a factory call without
``device=`` (``torch.zeros(n)``) passes every CPU test and then fails on a GPU with "expected all tensors to be on
the same device". :class:`DeviceGuard` makes that visible on the CPU: while it is active, every call of a tensor
factory (:data:`FACTORIES`) made directly from code of the ``posttrain`` package without a ``device=`` argument
is recorded with its file and line, and so is every ``torch.Generator()`` made there without a device (a
generator on the CPU cannot drive sampling on a GPU). Frames of torch itself, of this module and of posttrain's CPU backend mode
(which sits between a caller and torch when CUDA is absent) are skipped to find the caller; a call made from
megatron-core, transformers or any other library is not posttrain's and is not recorded. ``*_like`` and
``Tensor.new_*`` factories inherit their device from a tensor and are not checked.

Why a recording mode and not ``torch.set_default_device("meta")``: the default device applies to every library
in the process, not only to posttrain. Tried on the tiny PPO run, it stops while the first model checkpoint loads,
inside ``torch.distributed.checkpoint`` ("Found unsupported type ShardedTensor for meta device loading"), before
posttrain has created a single tensor of its own; megatron-core and torch would have to be made meta-clean first,
and even then a run stops at the first failing operation, with a message that names an operator rather than the
line that made the tensor. The mode below lets the run finish, attributes each call to posttrain or not by its
stack, and lists every offending line at once.

Its blind spot: a tensor made with an explicit but wrong device (``device="cpu"`` for one that belongs on the GPU)
is not caught; those are the deliberate host tensors the convention asks to be written out, and a reviewer finds
them with ``grep 'device="cpu"'``.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import posttrain

PACKAGE_DIR = Path(posttrain.__file__).resolve().parent
TORCH_DIR = Path(torch.__file__).resolve().parent
SKIPPED_FILES = {Path(__file__).resolve(), PACKAGE_DIR / "cpu_backend.py"}

FACTORIES = frozenset({
    torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.range, torch.rand, torch.randn,
    torch.randint, torch.randperm, torch.tensor, torch.as_tensor, torch.linspace, torch.logspace, torch.eye,
    torch.empty_strided, torch.scalar_tensor, torch.tril_indices, torch.triu_indices, torch.normal,
    torch.sparse_coo_tensor,
})
"""Torch functions that create a tensor on the default device unless ``device=`` says otherwise."""

_GENERATOR = torch.Generator
"""The real generator class; :class:`DeviceGuard` replaces ``torch.Generator`` by a recording subclass while it is
active (``torch.Generator`` is a class, not a function, so a torch function mode does not see it)."""


class _GeneratorMeta(type(_GENERATOR)):
    """Keeps ``isinstance(g, torch.Generator)`` true for generators made before the guard (``torch.default_generator``,
    megatron-core's RNG trackers) while ``torch.Generator`` is the recording subclass."""

    def __instancecheck__(cls, obj):
        return isinstance(obj, _GENERATOR)


@dataclass(frozen=True)
class Violation:
    """A factory call from posttrain without ``device=``: the function's name and the caller's file and line."""

    function: str
    filename: str
    lineno: int

    def __str__(self) -> str:
        try:
            where = Path(self.filename).resolve().relative_to(PACKAGE_DIR.parent)
        except ValueError:
            where = Path(self.filename)
        return f"{where}:{self.lineno} torch.{self.function} without device="


def _skipped(filename: str) -> bool:
    path = Path(filename).resolve()
    return path in SKIPPED_FILES or path.is_relative_to(TORCH_DIR)


class DeviceGuard(TorchFunctionMode):
    """Records factory calls and ``torch.Generator()`` calls from posttrain without ``device=`` (see the module
    docstring).

    Use as a context manager in the thread that runs posttrain; :attr:`violations` lists what was found (each
    distinct call site once, in the order first seen). The calls themselves run unchanged.
    """

    def __init__(self):
        super().__init__()
        self.violations: list[Violation] = []
        self._seen: set[tuple[str, int, str]] = set()
        self._lock = threading.Lock()

    def __enter__(self):
        guard = self

        class Generator(_GENERATOR, metaclass=_GeneratorMeta):
            def __new__(cls, *args, **kwargs):
                if not args and kwargs.get("device") is None:
                    guard._check_caller("Generator", sys._getframe(1))
                return super().__new__(cls, *args, **kwargs)

        self._outer_generator = torch.Generator
        torch.Generator = Generator
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback):
        torch.Generator = self._outer_generator
        return super().__exit__(exc_type, exc_value, traceback)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            self._check_caller(func.__name__, sys._getframe(1))
        return func(*args, **kwargs)

    def _check_caller(self, name: str, frame) -> None:
        """Record ``name`` when the first frame from ``frame`` outwards that is not torch's (nor this module's, nor
        the CPU backend's) is posttrain's."""
        while frame is not None and _skipped(frame.f_code.co_filename):
            frame = frame.f_back
        if frame is None:
            return
        filename = frame.f_code.co_filename
        if not Path(filename).resolve().is_relative_to(PACKAGE_DIR):
            return
        key = (filename, frame.f_lineno, name)
        with self._lock:
            if key not in self._seen:
                self._seen.add(key)
                self.violations.append(Violation(name, filename, frame.f_lineno))

    def report(self) -> str:
        """One line per offending call site (empty when there is none)."""
        return "\n".join(str(v) for v in self.violations)
