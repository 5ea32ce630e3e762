"""Infrastructure every stage shares (PPO, reward model, and any later one).

* :mod:`~posttrain.training.engine`: megatron DDP, optimiser and LR schedule, forward-backward schedules.
* :mod:`~posttrain.training.slots`: :class:`ModelSlot` and :func:`build_model_slot`, one builder for every model.
* :mod:`~posttrain.training.checkpoint`: :class:`TrainingCheckpoint`, one layout, atomic commit, retention.
* :mod:`~posttrain.training.metrics`: :class:`MetricAccumulator`, :class:`MetricsLogger`, :class:`Timer`.
* :mod:`~posttrain.training.entry`: :func:`run_stage`, the one failure path of the entry points.

A stage brings its flags (dataclasses), its data and its loss; see :mod:`posttrain.rm.trainer` for the smallest.
"""
from posttrain.training.checkpoint import (
           TrainingCheckpoint,
           iteration_dir,
           read_latest_iteration,
)
from posttrain.training.engine import (
           build_optimizer,
           forward_backward,
           optimizer_step,
           release_grad_buffers,
           restore_grad_buffers,
           wrap_ddp,
           zero_grad,
)
from posttrain.training.entry import is_rank0, print_rank0, run_stage
from posttrain.training.metrics import MetricAccumulator, MetricsLogger, Timer
from posttrain.training.slots import ModelSlot, build_model_slot

__all__ = ["MetricAccumulator", "MetricsLogger", "ModelSlot", "Timer", "TrainingCheckpoint", "build_model_slot",
           "build_optimizer", "forward_backward", "is_rank0", "iteration_dir", "optimizer_step", "print_rank0",
           "read_latest_iteration", "release_grad_buffers", "restore_grad_buffers", "run_stage", "wrap_ddp",
           "zero_grad"]
