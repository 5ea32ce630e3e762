"""Model slots: one builder for every model a stage uses (PPO's actor, reference, critic and reward; the RM stage's
reward model), so a new stage needs only its loss and its data.

:func:`build_model_slot` reads a posttrain checkpoint's metadata, builds the megatron model for this rank's
pipeline stage, loads the weights (a value model may start from a causal-LM checkpoint and keep its fresh head;
nothing else may be missing), and either freezes the model (no gradients, eval mode) or wraps it in megatron DDP
with an optimiser and LR schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from posttrain.arguments import ModelArgs, OptimizerArgs
from posttrain.models.checkpoint import (
    CheckpointError,
    load_model_checkpoint,
    read_checkpoint_meta,
)
from posttrain.models.provider import ModelInfo, build_model, model_info, unwrap_model
from posttrain.training.engine import build_optimizer, wrap_ddp


@dataclass
class ModelSlot:
    """A model with its role.

    Attributes:
        name: the role (``actor``, ``critic``, ``reward``, ...); also its directory name in training checkpoints.
        model: the megatron model (``Float16Module`` with bf16).
        source: the checkpoint directory it was loaded from. meta: that checkpoint's metadata.
        ddp, optimizer, scheduler: for trained slots only.
        save_meta: extra metadata written with the model in training checkpoints (e.g. a reward model's pooling).
    """

    name: str
    model: torch.nn.Module
    source: Path
    meta: dict
    ddp: Optional[torch.nn.Module] = None
    optimizer: Optional[object] = None
    scheduler: Optional[object] = None
    save_meta: dict = field(default_factory=dict)

    @property
    def trained(self) -> bool:
        return self.ddp is not None

    @property
    def runnable(self) -> torch.nn.Module:
        """What forward passes go through: the DDP wrapper of a trained model, else the model."""
        return self.ddp if self.ddp is not None else self.model

    @property
    def info(self) -> ModelInfo:
        return model_info(self.model)

    @property
    def hf_config(self) -> dict:
        return self.info.hf_config


def build_model_slot(name: str, source: str | Path, kind: str, model_args: ModelArgs, *, seed: int,
                     meta: Optional[dict] = None, optim_args: Optional[OptimizerArgs] = None, train_steps: int = 0,
                     lr: Optional[float] = None, value_head_init_std: float = 0.02,
                     frozen_params: tuple[str, ...] = (), **config_overrides) -> ModelSlot:
    """Build, load and (when ``optim_args`` is given) prepare for training one model.

    Args:
        name: the slot's role. source: posttrain checkpoint directory. kind: ``causal_lm`` or ``value``.
        model_args: precision, layer implementation, recomputation, vocabulary padding.
        seed: seeds a fresh value head (a value model built from a causal-LM checkpoint).
        meta: the checkpoint's metadata when already read (default: read it).
        optim_args: train this model (DDP + megatron optimiser); None freezes it.
        train_steps: optimiser steps the LR schedule decays over. lr: peak LR (default ``optim_args.lr``).
        value_head_init_std: std of a fresh value head.
        frozen_params: names (as in the unwrapped model's ``named_parameters``) that a trained model keeps fixed
            (on the pipeline stages that hold them).
        **config_overrides: extra ``TransformerConfig`` fields (e.g. ``moe_aux_loss_coeff``).

    Returns:
        The :class:`ModelSlot`.

    Raises:
        CheckpointError: the checkpoint is unreadable, of another architecture, or lacks a backbone tensor.
    """
    source = Path(source)
    meta = meta if meta is not None else read_checkpoint_meta(source)
    model = build_model(meta["hf_config"], kind, bf16=model_args.bf16,
                        make_vocab_size_divisible_by=model_args.make_vocab_size_divisible_by,
                        transformer_impl=model_args.transformer_impl, value_head_init_std=value_head_init_std,
                        value_head_seed=seed, **model_args.config_overrides(), **config_overrides)
    # a value model started from a causal LM keeps its fresh head; nothing else may be missing
    result = load_model_checkpoint(model, source, strict=meta.get("model_kind") == kind)
    missing = [k for k in result["missing_keys"] if not k.startswith("value_head")]
    if missing:
        raise CheckpointError(f"{source}: the {name} model's backbone is incomplete (missing {missing[:3]})")
    slot = ModelSlot(name=name, model=model, source=source, meta=meta)
    if optim_args is not None:
        params = dict(unwrap_model(model).named_parameters())
        for param_name in frozen_params:
            if param_name in params:  # a pipeline stage holds only its own layers
                params[param_name].requires_grad_(False)
        slot.ddp = wrap_ddp(model, optim_args.use_distributed_optimizer)
        slot.optimizer, slot.scheduler = build_optimizer(slot.ddp, optim_args, train_steps, bf16=model_args.bf16,
                                                         lr=lr)
    else:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return slot
