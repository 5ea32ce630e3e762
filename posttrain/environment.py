"""What a run is built from, said once, and the library notices that say nothing actionable, silenced in one place.

* :func:`silence_known_warnings` installs narrow ``warnings`` filters (by category, message and, where the
  emitting module is stable, module) for notices every CPU or GPU run of this project would print and no user can
  act on: megatron-core's fall-backs when Transformer Engine or apex are not installed (the start-up line below
  says which implementations are in use instead), torch's ``ShardedTensor`` and
  ``torch.distributed.checkpoint.load_state_dict`` deprecations raised through megatron-core's
  ``dist_checkpointing``, megatron-core's ``cuda_graph_scope="full"`` deprecation raised by its
  own default value, and the notice of torch's weights-only unpickler that a file was pickled with another
  protocol than ``torch.save``'s default (files that ``dist_checkpointing`` writes, read back with
  ``torch.load(weights_only=True)``). Every other warning still shows. The entry points (``pretrain_gpt.py``,
  ``convert_ckpt.py``, ``preprocess_data.py``) call it before they import megatron-core.
* :func:`startup_line` describes the implementations a stage runs with: device and process-group backend,
  precision, layer implementation (``local`` or ``transformer_engine``), norm, optimiser and multi-tensor kernels
  (Transformer Engine / apex fused ones or the torch / megatron-core fall-backs; torch's Adam runs its fused
  kernel). :func:`posttrain.training.run_stage` prints it once, on rank 0, before a stage starts.

megatron-core is imported only inside :func:`implementations` (a heavy import that the entry points make after
:func:`silence_known_warnings`).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

KNOWN_HARMLESS_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # (category, message regex matched at the start of the message, module regex; "" = any module)
    (UserWarning, r"(Transformer Engine and Apex are|Apex is|Transformer Engine is) not installed", r"megatron"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor", ""),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions",
     r"megatron\.core\.dist_checkpointing"),
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope", r"megatron\.core\.transformer"),
    (UserWarning, r"Detected pickle protocol \d+ in the checkpoint, which was not the default pickle protocol", ""),
)
"""The notices :func:`silence_known_warnings` hides: ``(category, message regex, module regex)``."""


def silence_known_warnings() -> None:
    """Ignore the notices of :data:`KNOWN_HARMLESS_WARNINGS` in this process (idempotent; other warnings keep
    their default handling). Call it before importing megatron-core: some of them are raised at import time."""
    for category, message, module in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def cpu_bf16_support() -> str:
    """Which bf16 instructions this CPU has: ``"AMX"`` (fast), ``"AVX512-BF16"`` (slower than fp32 on some CPUs,
    faster on others: measure, :func:`posttrain.cpu_backend.bf16_matmul_speedup`), ``"none"`` (emulated: much
    slower than fp32), or ``"unknown"`` (no ``/proc/cpuinfo``)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return "none"


def _owner(obj) -> str:
    """``transformer_engine``, ``apex``, ``torch`` or ``megatron`` for the module an object comes from."""
    module = getattr(obj, "__module__", "") or ""
    for name in ("transformer_engine", "apex", "torch", "megatron"):
        if module.startswith(name):
            return name
    return module or "?"


def implementations(bf16: bool = False, transformer_impl: str = "auto") -> dict[str, str]:
    """The implementations a model built with these settings uses on this machine.

    Reads megatron-core's own choices (the optimiser class, norm class and multi-tensor applier it selected at
    import time), so what is reported is what runs. Imports megatron-core (heavy).

    Args:
        bf16: ``--bf16``. transformer_impl: ``--transformer-impl`` (``auto``, ``local``, ``transformer_engine``).

    Returns:
        ``device``, ``backend``, ``precision``, ``layers``, ``norm``, ``optimizer``, ``multi_tensor`` (human-readable
        strings), and on CPU ``allocator`` (:func:`posttrain.allocator.describe`).
    """
    from megatron.core.models import backends
    from megatron.core.optimizer import Adam
    from megatron.core.optimizer import optimizer as megatron_optimizer

    from posttrain.models.provider import transformer_engine_available

    cuda = torch.cuda.is_available()
    if cuda:
        device = f"cuda ({torch.cuda.device_count()} x {torch.cuda.get_device_name()})"
    else:
        device = "cpu"
    use_te = transformer_engine_available() if transformer_impl == "auto" else transformer_impl == "transformer_engine"
    if bf16:
        precision = "bf16 (fp32 master weights and gradient reduction)"
        if not cuda:
            # measured, not inferred from the instruction set: AVX512-BF16 without AMX is slower than fp32 on some
            # CPUs and twice as fast on others
            from posttrain.cpu_backend import bf16_matmul_speedup

            support = {"AMX": "AMX", "AVX512-BF16": "AVX512-BF16, no AMX", "none": "no bf16 instructions"}.get(
                cpu_bf16_support(), "bf16 instructions unknown")
            speedup = bf16_matmul_speedup()
            precision += f"; this CPU ({support}) multiplies bf16 at {speedup:.2f}x fp32's speed"
            if speedup < 1.0:
                precision += ": fp32 is faster here"
    else:
        precision = "fp32"
    norm_class = backends.LNImpl.__name__
    norm = "transformer_engine" if use_te else {"WrappedTorchNorm": "torch", "FusedLayerNorm": "apex"}.get(
        norm_class, _owner(backends.LNImpl)) + f" ({norm_class})"
    if not cuda:
        from posttrain import cpu_matmul

        cpu_matmul.install()
        precision += f", fp32 products {cpu_matmul.describe()}"
    from posttrain import allocator, cpu_backend

    extra = {} if cuda else {"allocator": allocator.describe(kept=not cpu_backend.user_malloc_settings())}
    return {**extra,
        "device": device,
        "backend": "nccl" if cuda else "gloo",
        "precision": precision,
        # the local spec's core attention on CPU (posttrain.models.provider._layer_spec)
        "layers": "transformer_engine" if use_te else ("local" if cuda else "local, attention torch SDPA"),
        "norm": norm,
        # posttrain.training.engine.use_fused_torch_adam switches megatron's torch fall-back to torch's fused kernel
        "optimizer": f"{_owner(Adam)} {Adam.__name__}" + (" (fused)" if _owner(Adam) == "torch" else ""),
        "multi_tensor": {"megatron": "torch fallback (megatron-core local)"}.get(
            _owner(megatron_optimizer.multi_tensor_applier), _owner(megatron_optimizer.multi_tensor_applier)),
    }


def startup_line(stage: str, bf16: bool = False, transformer_impl: str = "auto", world_size: int = 1) -> str:
    """One line naming what ``stage`` runs with, e.g. ``[trl_ppo] cpu, gloo, 2 processes | fp32 | layers local |
    norm torch (WrappedTorchNorm) | optimizer torch AdamW (fused) | multi-tensor ops torch fallback (megatron-core
    local)``.
    """
    info = implementations(bf16, transformer_impl)
    processes = f"{world_size} process{'es' if world_size != 1 else ''}"
    line = (f"[{stage}] {info['device']}, {info['backend']}, {processes} | {info['precision']} | "
            f"layers {info['layers']} | norm {info['norm']} | optimizer {info['optimizer']} | "
            f"multi-tensor ops {info['multi_tensor']}")
    return line + (f" | host memory {info['allocator']}" if "allocator" in info else "")


def launcher_world() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment, ``(0, 1)`` under plain ``python`` (no process group
    needed)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1
