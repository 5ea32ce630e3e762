"""Checkpoint conversion between Hugging Face directories and posttrain (megatron-core) checkpoints.

Directions (``--direction``):

* ``hf2mcore``: an HF ``*ForCausalLM`` directory -> actor / reference checkpoint (``--model-kind causal_lm``), an
  HF ``*ForSequenceClassification`` directory (``num_labels=1``, the ``score`` head) -> reward / critic checkpoint
  (``--model-kind value``; head bias 0), or an HF causal LM -> value checkpoint with a fresh head
  (``--model-kind value --init-value-head``).
* ``mcore2hf``: a posttrain checkpoint -> an HF directory that ``transformers`` loads (``*ForCausalLM``,
  ``*ForSequenceClassification``, or ``*ForTokenClassification`` for a reward model scored with
  ``response_mean`` pooling; vocabulary padding dropped; config and tokenizer files written).
* ``mcore2mcore``: a causal-LM posttrain checkpoint -> value checkpoint with a fresh head
  (``--model-kind value --init-value-head``).

The conversion builds the full model at TP = PP = EP = 1 in one process (CPU is enough) and writes with
``dist_checkpointing``, so the result loads at any parallel layout. A fresh value head is
``N(0, value_head_init_std^2)`` from a generator seeded with ``--seed``, bias 0.

Every failure is reported as one ``error: ...`` line with exit status 1, and leaves no output directory behind
(outputs are written to a hidden sibling and renamed at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from posttrain.errors import InputError
from posttrain.models.checkpoint import (CheckpointError, check_tokenizer_dir, is_checkpoint, load_model_checkpoint,
                                         read_checkpoint_meta, save_model_checkpoint, tokenizer_files)
from posttrain.models.hf_mapping import (HF_ARCHITECTURES, HFCheckpointReader, MappingError, check_hf_checkpoint,
                                         detect_hf_head, load_hf_into_model, mcore_to_hf, save_hf_safetensors)
from posttrain.models.provider import (MODEL_KINDS, SUPPORTED_MODEL_TYPES, UnsupportedModelError, build_model,
                                       load_hf_config, padded_vocab_size, parse_hf_config, validate_parallel_layout)
from posttrain.models.value_model import checkpoint_score_pooling

DIRECTIONS = ("hf2mcore", "mcore2hf", "mcore2mcore")
TARGET_FLAGS = ("--target-tensor-parallel-size", "--target-pipeline-parallel-size", "--target-expert-parallel-size")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(InputError, ValueError):
    """Inconsistent conversion request (message names the flag or directory)."""


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _single_process() -> None:
    """Set up megatron-core at TP = PP = EP = 1 in this process (the conversions are not distributed)."""
    from megatron.core import parallel_state

    from posttrain.distributed import initialize_distributed

    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ConversionError("checkpoint conversion runs in a single process (start it with python, not torchrun)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError("checkpoint conversion runs in a single process (WORLD_SIZE > 1)")
    if parallel_state.model_parallel_is_initialized() and (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size()) == (1, 1, 1):
        return
    initialize_distributed(1, 1, 1)


def _check_output(save_dir: Path, load_dir: Path, overwrite: bool) -> None:
    if save_dir.resolve() == load_dir.resolve():
        raise ConversionError(f"--save-dir {save_dir} is the same as --load-dir")
    if save_dir.exists() and not overwrite:
        raise ConversionError(f"--save-dir {save_dir} already exists (pass --overwrite to replace it)")
    if not save_dir.parent.is_dir():
        raise ConversionError(f"--save-dir {save_dir}: parent directory {save_dir.parent} does not exist")


def _source_tokenizer(load_dir: Path, tokenizer_dir: Optional[str | Path]) -> Optional[Path]:
    if tokenizer_dir is not None:
        check_tokenizer_dir(tokenizer_dir)
        return Path(tokenizer_dir)
    if any(f.name != "generation_config.json" for f in tokenizer_files(load_dir)):
        return load_dir
    warnings.warn(f"{load_dir}: no tokenizer files; the output has no tokenizer (pass --tokenizer-dir)")
    return None


# ----------------------------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------------------------


def convert_hf_to_mcore(load_dir: str | Path, save_dir: str | Path, *, model_kind: Optional[str] = None,
                        init_value_head: bool = False, model_type: Optional[str] = None,
                        tokenizer_dir: Optional[str | Path] = None, make_vocab_size_divisible_by: int = 128,
                        value_head_init_std: float = 0.02, seed: int = 1234, overwrite: bool = False,
                        target_parallel: tuple[int, int, int] = (1, 1, 1)) -> Path:
    """HF directory -> posttrain checkpoint.

    Args:
        load_dir: HF model directory (``config.json`` + safetensors).
        save_dir: checkpoint directory to create.
        model_kind: ``causal_lm`` or ``value``; None: ``value`` for a ``score`` head, else ``causal_lm``.
        init_value_head: required to turn a causal LM into a value model (fresh head).
        model_type: expected HF ``model_type`` (checked against ``config.json``).
        tokenizer_dir: where the tokenizer files come from (default: ``load_dir``).
        make_vocab_size_divisible_by: vocabulary padding of the stored embedding.
        value_head_init_std, seed: fresh value head initialisation.
        overwrite: replace an existing ``save_dir``.
        target_parallel: (TP, PP, EP) the checkpoint is meant to be trained at; only checked against the model
            (the checkpoint itself loads at any layout the model allows).

    Returns:
        ``save_dir``.

    Raises:
        ValueError: ``target_parallel`` does not divide the model (heads, KV heads, layers, experts).
        FileNotFoundError: missing config, safetensors or tokenizer files.
        UnsupportedModelError: the architecture is not supported.
        MappingError: the weights do not match ``config.json`` (shape, missing or unused tensors).
        ConversionError: inconsistent flags, or ``save_dir`` exists.
    """
    load_dir, save_dir = Path(load_dir), Path(save_dir)
    hf_config = load_hf_config(load_dir)
    arch = parse_hf_config(hf_config)
    if model_type is not None and model_type != arch.model_type:
        raise ConversionError(f"--model-type-hf {model_type} but {load_dir}/config.json has model_type "
                              f"{arch.model_type}")
    validate_parallel_layout(arch, *target_parallel, flag_names=TARGET_FLAGS)
    reader = HFCheckpointReader(load_dir)
    source_kind = detect_hf_head(reader.keys())
    kind = model_kind or source_kind
    if kind not in MODEL_KINDS:
        raise ConversionError(f"--model-kind {kind!r} must be one of {', '.join(MODEL_KINDS)}")
    if kind == "causal_lm" and source_kind == "value":
        raise ConversionError(f"{load_dir} is a sequence classifier (score head): it converts to --model-kind value")
    if kind == "value" and source_kind == "causal_lm" and not init_value_head:
        raise ConversionError(f"{load_dir} is a causal LM without a score head: pass --init-value-head to give "
                              "the value model a fresh head")
    if init_value_head and (kind != "value" or source_kind == "value"):
        raise ConversionError("--init-value-head needs --model-kind value and a causal-LM source")
    fresh_head = kind == "value" and source_kind == "causal_lm"
    check_hf_checkpoint(reader, arch, kind, padded_vocab_size(arch.vocab_size, make_vocab_size_divisible_by, 1),
                        include_value_head=not fresh_head)
    tokenizer = _source_tokenizer(load_dir, tokenizer_dir)
    _check_output(save_dir, load_dir, overwrite)

    _single_process()
    model = build_model(hf_config, kind, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                        transformer_impl="local", perform_initialization=False,
                        value_head_init_std=value_head_init_std, value_head_seed=seed)
    load_hf_into_model(reader, model, arch, kind, include_value_head=not fresh_head)
    token_classifier = any(a.endswith("ForTokenClassification") for a in hf_config.get("architectures") or ())
    extra = {"converted_from": str(load_dir.absolute()), "source_kind": source_kind,
             "score_pooling": (hf_config.get("score_pooling") or "response_mean") if token_classifier else None,
             "value_head": ("initialized" if fresh_head else "from score") if kind == "value" else None,
             "value_head_init_std": value_head_init_std if fresh_head else None,
             "seed": seed if fresh_head else None}
    return save_model_checkpoint(model, save_dir, hf_config=hf_config, model_kind=kind, tokenizer_dir=tokenizer,
                                 extra_meta=extra, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                 overwrite=True)


def hf_config_for_export(hf_config: dict, model_kind: str, dtype: torch.dtype, score_pooling: str = "last") -> dict:
    """The ``config.json`` written by :func:`convert_mcore_to_hf` (architecture class, dtype, labels).

    A value model with ``score_pooling`` ``last`` becomes ``*ForSequenceClassification``; with ``response_mean``
    it becomes ``*ForTokenClassification`` (per-token scores; the config records ``score_pooling``). Warns when a
    value model has no ``pad_token_id`` (HF sequence classifiers need it to score batches).
    """
    config = dict(hf_config)
    causal_cls, seqcls_cls = HF_ARCHITECTURES[config["model_type"]]
    if model_kind == "causal_lm":
        config["architectures"] = [causal_cls]
    elif score_pooling == "last":
        config["architectures"] = [seqcls_cls]
    else:
        config["architectures"] = [causal_cls.replace("ForCausalLM", "ForTokenClassification")]
        config["score_pooling"] = score_pooling
    dtype_name = str(dtype).replace("torch.", "")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    if model_kind == "value":
        config["id2label"] = {"0": "LABEL_0"}
        config["label2id"] = {"LABEL_0": 0}
        config.pop("num_labels", None)
        if config.get("pad_token_id") is None:
            warnings.warn("config has no pad_token_id: HF sequence classifiers then score only batches of one "
                          "row (set pad_token_id in config.json)")
    else:
        for key in ("id2label", "label2id", "num_labels", "problem_type"):
            config.pop(key, None)
    return config


def convert_mcore_to_hf(load_dir: str | Path, save_dir: str | Path, *, tokenizer_dir: Optional[str | Path] = None,
                        dtype: Optional[str] = None, drop_value_head_bias: bool = False,
                        overwrite: bool = False) -> Path:
    """posttrain checkpoint -> HF directory (``config.json``, safetensors, tokenizer files).

    Args:
        load_dir: posttrain checkpoint directory.
        save_dir: HF directory to create.
        tokenizer_dir: tokenizer files to copy (default: those stored in the checkpoint).
        dtype: ``float32`` / ``bfloat16`` / ``float16``; None: the dtype declared in the original ``config.json``
            (``float32`` when none).
        drop_value_head_bias: write a value model whose head bias is non-zero anyway (HF's ``score`` layer has
            no bias, so every score shifts by ``-bias``); otherwise that is an error. A reward model trained with
            ``--score-pooling response_mean`` is written as ``*ForTokenClassification`` (``num_labels=1``, score
            bias kept): its per-token logits are the head's outputs, to be averaged over the response tokens.
        overwrite: replace an existing ``save_dir``.

    Returns:
        ``save_dir``.

    Raises:
        CheckpointError: not a posttrain checkpoint, or it does not load.
        ConversionError: non-zero value-head bias without ``drop_value_head_bias``, unknown dtype, ``save_dir``
            exists.
    """
    load_dir, save_dir = Path(load_dir), Path(save_dir)
    meta = read_checkpoint_meta(load_dir)
    hf_config, kind = meta["hf_config"], meta["model_kind"]
    pooling = checkpoint_score_pooling(meta) if kind == "value" else "last"
    arch = parse_hf_config(hf_config)
    dtype_name = dtype or arch.dtype or "float32"
    if dtype_name not in _DTYPES:
        raise ConversionError(f"--dtype {dtype_name!r} must be one of {', '.join(_DTYPES)}")
    copied = check_tokenizer_dir(tokenizer_dir) if tokenizer_dir is not None else tokenizer_files(load_dir)
    if not copied:
        warnings.warn(f"{load_dir}: no tokenizer files; the output has no tokenizer (pass --tokenizer-dir)")
    _check_output(save_dir, load_dir, overwrite)

    _single_process()
    divisible_by = int(meta.get("make_vocab_size_divisible_by") or 128)
    model = build_model(hf_config, kind, make_vocab_size_divisible_by=divisible_by, transformer_impl="local",
                        perform_initialization=False)
    load_model_checkpoint(model, load_dir, strict=True)
    state = model.state_dict()
    out_dtype = _DTYPES[dtype_name]
    # a response_mean reward model becomes *ForTokenClassification, whose score layer has a bias
    token_classifier = kind == "value" and pooling != "last"
    tensors = mcore_to_hf(state, arch, kind, model.vocab_size, dtype=out_dtype, value_head_bias=token_classifier)
    if kind == "value" and not token_classifier:
        bias = float(state["value_head.linear.bias"].item())
        if bias != 0.0:
            if not drop_value_head_bias:
                raise ConversionError(
                    f"{load_dir}: value head bias is {bias:.6g}; HF's score layer has no bias (pass "
                    "--drop-value-head-bias to drop it: every score then shifts by a constant)")
            warnings.warn(f"dropping value head bias {bias:.6g}: HF scores are shifted by {-bias:.6g}")

    partial = save_dir.parent / f".{save_dir.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        save_hf_safetensors(tensors, partial)
        config = hf_config_for_export(hf_config, kind, out_dtype, pooling)
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for path in copied:
            shutil.copy2(path, partial / path.name)
        if save_dir.exists():
            shutil.rmtree(save_dir)
        partial.rename(save_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return save_dir


def convert_mcore_to_value(load_dir: str | Path, save_dir: str | Path, *, value_head_init_std: float = 0.02,
                           seed: int = 1234, tokenizer_dir: Optional[str | Path] = None,
                           overwrite: bool = False, target_parallel: tuple[int, int, int] = (1, 1, 1)) -> Path:
    """Causal-LM posttrain checkpoint -> value checkpoint with a freshly initialised head (same trunk weights).

    Raises:
        CheckpointError: not a posttrain checkpoint, or not a causal LM.
        ConversionError: ``save_dir`` exists.
    """
    load_dir, save_dir = Path(load_dir), Path(save_dir)
    meta = read_checkpoint_meta(load_dir)
    if meta["model_kind"] != "causal_lm":
        raise ConversionError(f"{load_dir} already holds a {meta['model_kind']} model (--init-value-head needs a "
                              "causal LM)")
    validate_parallel_layout(parse_hf_config(meta["hf_config"]), *target_parallel, flag_names=TARGET_FLAGS)
    tokenizer = _source_tokenizer(load_dir, tokenizer_dir)
    _check_output(save_dir, load_dir, overwrite)

    _single_process()
    divisible_by = int(meta.get("make_vocab_size_divisible_by") or 128)
    model = build_model(meta["hf_config"], "value", make_vocab_size_divisible_by=divisible_by,
                        transformer_impl="local", perform_initialization=False,
                        value_head_init_std=value_head_init_std, value_head_seed=seed)
    loaded = load_model_checkpoint(model, load_dir, strict=False)
    unexpected_missing = [k for k in loaded["missing_keys"] if not k.startswith("value_head.")]
    if unexpected_missing:
        raise CheckpointError(f"{load_dir}: checkpoint has no {', '.join(unexpected_missing[:3])}")
    extra = {"converted_from": str(load_dir.absolute()), "source_kind": "causal_lm", "value_head": "initialized",
             "value_head_init_std": value_head_init_std, "seed": seed}
    return save_model_checkpoint(model, save_dir, hf_config=meta["hf_config"], model_kind="value",
                                 tokenizer_dir=tokenizer, extra_meta=extra,
                                 make_vocab_size_divisible_by=divisible_by, overwrite=True)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``convert_ckpt.py`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="convert_ckpt.py",
        description="Convert model checkpoints between Hugging Face directories and posttrain (megatron-core "
                    "dist_checkpointing) checkpoints. See docs/checkpoint.md.")
    parser.add_argument("--direction", required=True, choices=DIRECTIONS,
                        help="hf2mcore: HF -> posttrain; mcore2hf: posttrain -> HF; mcore2mcore: causal-LM "
                             "posttrain checkpoint -> value checkpoint (with --init-value-head)")
    parser.add_argument("--load-dir", required=True, help="source directory (HF model or posttrain checkpoint)")
    parser.add_argument("--save-dir", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--model-type-hf", choices=SUPPORTED_MODEL_TYPES, default=None,
                        help="expected HF model_type (default: read from config.json)")
    parser.add_argument("--model-kind", choices=MODEL_KINDS, default=None,
                        help="target model: causal_lm (actor/reference) or value (critic/reward); default: the "
                             "source's kind (HF: value when it has a score head)")
    parser.add_argument("--init-value-head", action="store_true",
                        help="make a value model from a causal LM with a fresh head (N(0, std^2), bias 0)")
    parser.add_argument("--value-head-init-std", type=float, default=0.02, help="std of a fresh value head")
    parser.add_argument("--seed", type=int, default=1234, help="seed of a fresh value head")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="copy tokenizer files from here (default: from --load-dir)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="vocabulary padding of the stored embedding (hf2mcore)")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default=None,
                        help="dtype of the written HF weights (mcore2hf; default: the original config's dtype)")
    parser.add_argument("--drop-value-head-bias", action="store_true",
                        help="mcore2hf of a value model: drop a non-zero head bias (HF score has none)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save-dir")
    for flag, name in (("--target-tensor-parallel-size", "TP"), ("--target-pipeline-parallel-size", "PP"),
                       ("--target-expert-parallel-size", "EP")):
        parser.add_argument(flag, type=int, default=1,
                            help=f"{name} the model will be trained at: checked against the model (hf2mcore, "
                                 "mcore2mcore); the checkpoint itself loads at any layout")
    return parser


def run(args: argparse.Namespace) -> Path:
    """Run the conversion an argument namespace describes (see :func:`build_parser`)."""
    target = (args.target_tensor_parallel_size, args.target_pipeline_parallel_size, args.target_expert_parallel_size)
    if args.direction == "hf2mcore":
        return convert_hf_to_mcore(args.load_dir, args.save_dir, model_kind=args.model_kind,
                                   init_value_head=args.init_value_head, model_type=args.model_type_hf,
                                   tokenizer_dir=args.tokenizer_dir,
                                   make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                   value_head_init_std=args.value_head_init_std, seed=args.seed,
                                   overwrite=args.overwrite, target_parallel=target)
    if args.model_type_hf is not None and is_checkpoint(args.load_dir):
        stored = read_checkpoint_meta(args.load_dir)["hf_config"].get("model_type")
        if stored != args.model_type_hf:
            raise ConversionError(f"--model-type-hf {args.model_type_hf} but {args.load_dir} holds a {stored} model")
    if args.direction == "mcore2hf":
        if args.init_value_head:
            raise ConversionError("--init-value-head is for hf2mcore / mcore2mcore")
        if args.model_kind is not None and is_checkpoint(args.load_dir) and \
                read_checkpoint_meta(args.load_dir)["model_kind"] != args.model_kind:
            raise ConversionError(f"--model-kind {args.model_kind} differs from the checkpoint's model kind "
                                  "(use mcore2mcore to change it)")
        return convert_mcore_to_hf(args.load_dir, args.save_dir, tokenizer_dir=args.tokenizer_dir, dtype=args.dtype,
                                   drop_value_head_bias=args.drop_value_head_bias, overwrite=args.overwrite)
    if args.model_kind != "value" or not args.init_value_head:
        raise ConversionError("mcore2mcore converts a causal LM into a value model: pass --model-kind value "
                              "--init-value-head")
    return convert_mcore_to_value(args.load_dir, args.save_dir, value_head_init_std=args.value_head_init_std,
                                  seed=args.seed, tokenizer_dir=args.tokenizer_dir, overwrite=args.overwrite,
                                  target_parallel=target)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: returns 0 on success, 1 with a one-line ``error: ...`` on bad input (2 for bad flags)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = run(args)
        except (ConversionError, CheckpointError, MappingError, UnsupportedModelError, FileNotFoundError,
                ValueError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"error: {message}", file=sys.stderr)
            return 1
        finally:
            for warning in caught:  # this package's notes; library warnings (megatron-core, transformers) dropped
                if Path(warning.filename).resolve().parent == Path(__file__).resolve().parent:
                    print(f"warning: {warning.message}", file=sys.stderr)
    print(f"converted {args.load_dir} -> {out} ({args.direction})")
    return 0
