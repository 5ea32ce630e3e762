"""Process-group set-up shared by every entry point.

:func:`initialize_distributed` reads torchrun's environment (or runs as a single process when started with plain
``python``), picks ``nccl`` with CUDA and ``gloo`` without (switching on :mod:`posttrain.cpu_backend` in the
latter case: the one place it is activated), builds megatron-core's tensor / pipeline / data / expert parallel
groups and seeds every RNG. It also makes every child process this process forks die with it
(:func:`posttrain.processes.bind_children_to_parent`), so a killed run leaves no checkpoint writer behind.
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from posttrain.errors import InputError
from posttrain.processes import bind_children_to_parent

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(InputError, ValueError):
    """Parallel sizes or the launcher's environment do not fit together (message names the flag or variable)."""


@dataclass(frozen=True)
class ParallelState:
    """What :func:`initialize_distributed` set up.

    Attributes:
        rank: global rank. world_size: number of processes. local_rank: rank on this host.
        backend: ``"nccl"`` or ``"gloo"``. device: where models live (``cuda:<local_rank>`` or ``cpu``).
        tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size,
        data_parallel_size: the layout (DP = world / (TP x PP)).
        cpu_backend: True when megatron-core was adapted to CPU torch.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    expert_model_parallel_size: int
    data_parallel_size: int
    cpu_backend: bool


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read_launcher_env() -> tuple[int, int, int]:
    """Return (rank, world_size, local_rank) from torchrun's variables, or (0, 1, 0) when none is set.

    Raises:
        DistributedSetupError: some but not all torchrun variables are set, or one is not an integer.
    """
    present = [name for name in _TORCHRUN_VARS if name in os.environ]
    if not present:
        # plain `python`: a private single-rank group (nothing is exported, so child processes, e.g. a torchrun
        # started from this one, do not inherit a port this process holds)
        return 0, 1, 0
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise DistributedSetupError(
            f"environment variable {missing[0]} is not set (torchrun sets {', '.join(_TORCHRUN_VARS)}; "
            "start with torchrun or plain python)")
    values = []
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        try:
            values.append(int(os.environ[name]))
        except ValueError:
            raise DistributedSetupError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None
    return values[0], values[1], values[2]


def validate_parallel_sizes(world_size: int, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                            expert_model_parallel_size: int = 1) -> int:
    """Check that the parallel layout fits the world size and return the data-parallel size.

    Raises:
        DistributedSetupError: a size is < 1, TP x PP does not divide the world size, or EP does not divide the
            data-parallel size (expert parallelism is carved out of the data-parallel ranks).
    """
    for flag, value in (("--tensor-model-parallel-size", tensor_model_parallel_size),
                        ("--pipeline-model-parallel-size", pipeline_model_parallel_size),
                        ("--expert-model-parallel-size", expert_model_parallel_size)):
        if int(value) < 1:
            raise DistributedSetupError(f"{flag} must be >= 1, got {value}")
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world_size % model_parallel:
        raise DistributedSetupError(
            f"--tensor-model-parallel-size {tensor_model_parallel_size} x --pipeline-model-parallel-size "
            f"{pipeline_model_parallel_size} = {model_parallel} does not divide the world size {world_size}")
    data_parallel = world_size // model_parallel
    if data_parallel % expert_model_parallel_size:
        raise DistributedSetupError(
            f"--expert-model-parallel-size {expert_model_parallel_size} does not divide the data-parallel size "
            f"{data_parallel} (world {world_size} / TP {tensor_model_parallel_size} / PP "
            f"{pipeline_model_parallel_size})")
    return data_parallel


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron-core's model-parallel RNG tracker.

    Follows Megatron-LM: pipeline stage ``p`` uses ``seed + 100 * p`` so stages draw different dropout masks;
    the tracker then derives the tensor-parallel and data-parallel streams from it.
    """
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize_distributed(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                           expert_model_parallel_size: int = 1, seed: int = 1234,
                           timeout_minutes: float = 30.0) -> ParallelState:
    """Create the process group and megatron-core's parallel groups, then seed all RNGs; children this process
    forks from now on die with it (:mod:`posttrain.processes`).

    Idempotent for the same layout; a second call with another layout re-creates the model-parallel groups.

    Args:
        tensor_model_parallel_size: TP, ranks sharing each layer.
        pipeline_model_parallel_size: PP, pipeline stages.
        expert_model_parallel_size: EP, ranks sharing the experts of MoE layers.
        seed: base seed (see :func:`seed_everything`).
        timeout_minutes: collective timeout.

    Returns:
        The resulting :class:`ParallelState`.

    Raises:
        DistributedSetupError: inconsistent launcher variables or parallel sizes.
    """
    from megatron.core import parallel_state

    bind_children_to_parent()
    rank, world_size, local_rank = _read_launcher_env()
    data_parallel = validate_parallel_sizes(world_size, tensor_model_parallel_size, pipeline_model_parallel_size,
                                            expert_model_parallel_size)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend, device = "nccl", torch.device("cuda", torch.cuda.current_device())
    else:
        from posttrain import cpu_backend

        cpu_backend.activate()
        backend, device = "gloo", torch.device("cpu")

    if not torch.distributed.is_initialized():
        init_method = None if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{_free_port()}"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                             init_method=init_method, timeout=timedelta(minutes=timeout_minutes))
    if not use_cuda:
        from posttrain import cpu_matmul

        cpu_matmul.adopt_rank0_choice()  # one kernel on every rank, the one rank 0's start-up line named
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
    )
    seed_everything(seed)
    return ParallelState(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, device=device,
                         tensor_model_parallel_size=tensor_model_parallel_size,
                         pipeline_model_parallel_size=pipeline_model_parallel_size,
                         expert_model_parallel_size=expert_model_parallel_size,
                         data_parallel_size=data_parallel, cpu_backend=not use_cuda)


def destroy_distributed() -> None:
    """Tear down megatron-core's groups and the default process group (for tests and clean exits)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
