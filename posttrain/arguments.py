"""Command-line flags generated from dataclasses.

Each training stage describes its options as dataclasses whose fields carry a ``help`` text in their metadata;
:func:`add_dataclass_args` turns every field into a Megatron-style flag (``micro_batch_size`` ->
``--micro-batch-size``) and :func:`dataclass_from_args` builds the dataclass back from the parsed namespace, so
validation lives in one place: each dataclass's ``__post_init__``. There is no global ``get_args()``.

Fields declared with plain ``dataclasses.field`` (not :func:`arg`) are options of the Python API only and get no
flag. A field's ``group`` puts its flag under that heading of ``--help``; ``type`` overrides the conversion of the
flag's text that the annotation would imply (e.g. ``str`` for a value that ``__post_init__`` parses).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from posttrain.errors import InputError


def arg(default: Any = dataclasses.MISSING, help: str = "", choices=None, flag: Optional[str] = None,
        default_factory: Any = dataclasses.MISSING, aliases: tuple = (), group: Optional[str] = None,
        type: Optional[Callable[[str], Any]] = None) -> Any:
    """A dataclass field that becomes a command-line flag.

    Args:
        default, default_factory: the field's default (none: the flag is required).
        help: the flag's help text (``--help`` appends the default).
        choices: allowed values.
        flag: the flag's name (default: ``--`` + the field name with ``-`` for ``_``).
        aliases: further names of the same flag.
        group: heading of ``--help`` the flag is listed under (default: the dataclass's group).
        type: turns the flag's text into the value (default: implied by the annotation).
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "aliases": aliases, "group": group, "type": type}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] or X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return list, typing.get_args(tp)[0]
    return tp


def _shows_default(default: Any) -> bool:
    """Whether ``--help`` appends ``(default: ...)``: not for None (the help text says what happens) and not for
    an off switch (``False``); ``0`` and ``0.0`` are shown."""
    return default is not None and default is not False


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: Optional[str] = None) -> None:
    """Add one flag per :func:`arg` field of dataclass ``cls`` to ``parser`` (a group titled ``title``, or the
    field's own ``group``)."""
    groups = {None: parser.add_argument_group(title or cls.__name__)}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or "help" not in f.metadata:
            continue
        heading = f.metadata.get("group")
        if heading not in groups:
            groups[heading] = parser.add_argument_group(heading)
        group = groups[heading]
        names = [_flag_name(f), *f.metadata.get("aliases", ())]
        tp = f.metadata.get("type") or _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kwargs = {"dest": f.name, "help": f.metadata.get("help", "") + (f" (default: {default})"
                                                                        if _shows_default(default) else "")}
        if tp is bool:
            if default:
                group.add_argument(*names, action=argparse.BooleanOptionalAction, default=default, **kwargs)
            else:
                group.add_argument(*names, action="store_true", default=False, **kwargs)
            continue
        if isinstance(tp, tuple) and tp[0] is list:
            group.add_argument(*names, type=tp[1], nargs="+", default=default, **kwargs)
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        group.add_argument(*names, type=tp, default=default, required=required,
                           choices=f.metadata.get("choices"), **kwargs)


def dataclass_from_args(cls, namespace: argparse.Namespace):
    """Build ``cls`` from the parsed namespace (runs the dataclass's validation; fields without a flag keep their
    defaults)."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
              if f.init and "help" in f.metadata and hasattr(namespace, f.name)}
    return cls(**values)


class ArgumentError(InputError, ValueError):
    """An invalid flag value or combination; the message names the flag."""


def check_range(flag: str, value, *, gt=None, ge=None, lt=None, le=None) -> None:
    """Raise :class:`ArgumentError` naming ``flag`` unless ``value`` lies in the given bounds.

    Args:
        flag: the flag as the user types it (``--clip-ratio``).
        value: the parsed value (None is accepted: an unset optional flag).
        gt, ge, lt, le: strict / inclusive lower and upper bounds (None: unbounded). NaN is always rejected.
    """
    if value is None:
        return
    bounds = [(gt, lambda v, b: v > b, ">"), (ge, lambda v, b: v >= b, ">="),
              (lt, lambda v, b: v < b, "<"), (le, lambda v, b: v <= b, "<=")]
    wanted = [f"{op} {bound}" for bound, _, op in bounds if bound is not None]
    if value != value or any(bound is not None and not ok(value, bound) for bound, ok, _ in bounds):
        raise ArgumentError(f"{flag} must be {' and '.join(wanted)}, got {value}")


@dataclass
class ParallelArgs:
    """Parallel layout (megatron-core names)."""

    tensor_model_parallel_size: int = arg(1, "TP: ranks sharing each layer")
    pipeline_model_parallel_size: int = arg(1, "PP: pipeline stages")
    expert_model_parallel_size: int = arg(1, "EP: ranks sharing the experts of MoE layers")
    seed: int = arg(1234, "random seed (Python, NumPy, torch, megatron RNG tracker, sampling)")


@dataclass
class ModelArgs:
    """How the models are built: precision, layer implementation, recomputation, vocabulary padding."""

    bf16: bool = arg(False, "bf16 parameters and compute (fp32 master weights and gradient reduction); on CPUs "
                            "without fast bf16 (no AMX) this is slower than fp32")
    transformer_impl: str = arg("auto", "layer implementation: transformer_engine (Transformer Engine layer spec, "
                                        "needs TE and CUDA), local (megatron-core's own layers), or auto (TE when "
                                        "importable with CUDA, else local)",
                                choices=["auto", "local", "transformer_engine"])
    recompute_granularity: Optional[str] = arg(None, "activation recomputation", choices=["full", "selective"])
    recompute_method: str = arg("uniform", "with --recompute-granularity full", choices=["uniform", "block"])
    recompute_num_layers: int = arg(1, "layers per recomputed chunk with --recompute-granularity full")
    make_vocab_size_divisible_by: int = arg(128, "pad the vocabulary to a multiple of this times TP")

    def __post_init__(self):
        check_range("--recompute-num-layers", self.recompute_num_layers, ge=1)
        check_range("--make-vocab-size-divisible-by", self.make_vocab_size_divisible_by, ge=1)

    def config_overrides(self) -> dict:
        """``TransformerConfig`` fields these flags set (recomputation)."""
        overrides: dict = {}
        if self.recompute_granularity:
            overrides["recompute_granularity"] = self.recompute_granularity
            if self.recompute_granularity == "full":
                overrides.update(recompute_method=self.recompute_method,
                                 recompute_num_layers=self.recompute_num_layers)
        return overrides


@dataclass
class OptimizerArgs:
    """Optimiser and learning-rate schedule (Megatron flag names)."""

    lr: float = arg(1e-6, "peak learning rate of the trained model (the actor in PPO)")
    min_lr: float = arg(0.0, "learning rate at the end of the decay")
    lr_decay_style: str = arg("constant", "learning-rate decay", choices=["constant", "linear", "cosine",
                                                                          "inverse-square-root"])
    lr_warmup_iters: int = arg(0, "linear warm-up iterations")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    adam_beta1: float = arg(0.9, "Adam beta1")
    adam_beta2: float = arg(0.95, "Adam beta2")
    adam_eps: float = arg(1e-8, "Adam epsilon")
    clip_grad: float = arg(1.0, "gradient clipping by global L2 norm (0 disables)")
    use_distributed_optimizer: bool = arg(False, "shard optimizer state over data-parallel ranks (ZeRO-1)")

    def __post_init__(self):
        check_range("--lr", self.lr, ge=0.0)
        check_range("--min-lr", self.min_lr, ge=0.0)
        if self.min_lr > self.lr and self.lr_decay_style != "constant":
            raise ArgumentError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        check_range("--lr-warmup-iters", self.lr_warmup_iters, ge=0)
        check_range("--weight-decay", self.weight_decay, ge=0.0)
        check_range("--adam-beta1", self.adam_beta1, ge=0.0, lt=1.0)
        check_range("--adam-beta2", self.adam_beta2, ge=0.0, lt=1.0)
        check_range("--adam-eps", self.adam_eps, gt=0.0)
        check_range("--clip-grad", self.clip_grad, ge=0.0)


@dataclass
class CheckpointArgs:
    """Loading and saving (Megatron flag names)."""

    load: Optional[str] = arg(None, "resume from this training checkpoint directory (written by --save)")
    save: Optional[str] = arg(None, "write checkpoints (and metrics.jsonl) here")
    save_interval: int = arg(0, "save every N iterations (0: only at the end when --save is given)")
    ckpt_keep_last: Optional[int] = arg(None, "keep only the newest N iter_* checkpoints under --save (default: all)")
    no_save_optim: bool = arg(False, "save models (and trainer state) without optimiser state: smaller, for export; "
                                     "a resume from such a checkpoint starts fresh optimisers")
    no_save_rng: bool = arg(False, "save without RNG states")
    no_load_optim: bool = arg(False, "with --load: do not restore optimiser and scheduler state")
    no_load_rng: bool = arg(False, "with --load: do not restore RNG states")

    def __post_init__(self):
        check_range("--save-interval", self.save_interval, ge=0)
        if self.ckpt_keep_last is not None:
            check_range("--ckpt-keep-last", self.ckpt_keep_last, ge=1)


@dataclass
class LoggingArgs:
    """Console, metrics.jsonl, TensorBoard and Weights & Biases logging."""

    log_interval: int = arg(1, "print metrics every N iterations")
    tensorboard_dir: Optional[str] = arg(None, "write TensorBoard scalars (and text samples) here")
    wandb_project: Optional[str] = arg(None, "log to this Weights & Biases project as well (needs the wandb "
                                             "package; WANDB_MODE=offline works without a network)")
    wandb_exp_name: Optional[str] = arg(None, "Weights & Biases run name (default: the --save directory's name)")
    wandb_save_dir: Optional[str] = arg(None, "Weights & Biases local directory (default: <save>/wandb)")

    def __post_init__(self):
        check_range("--log-interval", self.log_interval, ge=1)
        if (self.wandb_exp_name or self.wandb_save_dir) and not self.wandb_project:
            raise ArgumentError("--wandb-exp-name and --wandb-save-dir need --wandb-project")
