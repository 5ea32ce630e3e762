"""Checkpoint conversion between Hugging Face directories and posttrain (megatron-core) checkpoints.

Directions (``--direction``):

* ``hf2mcore``: an HF ``*ForCausalLM`` directory -> actor / reference checkpoint (``--model-kind causal_lm``), an
  HF ``*ForSequenceClassification`` directory (``num_labels=1``, the ``score`` head) -> reward / critic checkpoint
  (``--model-kind value``; head bias 0), or an HF causal LM -> value checkpoint with a fresh head
  (``--model-kind value --init-value-head``).
* ``mcore2hf``: a posttrain checkpoint -> an HF directory that ``transformers`` loads (``*ForCausalLM``,
  ``*ForSequenceClassification``, or ``*ForTokenClassification`` for a reward model scored with
  ``response_mean`` pooling; vocabulary padding dropped; config and tokenizer files written). A sequence
  classifier pads with a token no scored sequence ends with (:func:`classifier_pad_token`), so that HF scores the
  same token as posttrain.
* ``mcore2mcore``: a causal-LM posttrain checkpoint -> value checkpoint with a fresh head
  (``--model-kind value --init-value-head``).

The conversion builds the full model at TP = PP = EP = 1 in one process (CPU is enough) and writes with
``dist_checkpointing``, so the result loads at any parallel layout. A fresh value head is
``N(0, value_head_init_std^2)`` from a generator seeded with ``--seed``, bias 0.

The command-line flags are generated from :class:`ConvertConfig`. Every failure (bad flags, damaged or
inconsistent input files) is reported as one ``error: ...`` line with exit status 1, and leaves no output
directory behind (outputs are written to a hidden sibling and renamed at the end; missing parent directories of
``--save-dir`` are created for the write and removed again if it fails).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from posttrain.arguments import (
    ArgumentError,
    add_dataclass_args,
    arg,
    dataclass_from_args,
)
from posttrain.data.templates import FormatTemplate, get_template, template_names
from posttrain.errors import InputError
from posttrain.models.checkpoint import (
    CheckpointError,
    check_tokenizer_dir,
    is_checkpoint,
    load_model_checkpoint,
    read_checkpoint_meta,
    save_model_checkpoint,
    tokenizer_files,
    verify_checkpoint_files,
)
from posttrain.models.hf_mapping import (
    HF_ARCHITECTURES,
    HFCheckpointReader,
    check_hf_checkpoint,
    detect_hf_head,
    load_hf_into_model,
    mcore_to_hf,
    save_hf_safetensors,
)
from posttrain.models.provider import (
    MODEL_KINDS,
    SUPPORTED_MODEL_TYPES,
    build_model,
    load_hf_config,
    padded_vocab_size,
    parse_hf_config,
    validate_parallel_layout,
)
from posttrain.models.value_model import checkpoint_score_pooling

DIRECTIONS = ("hf2mcore", "mcore2hf", "mcore2mcore")
TARGET_FLAGS = ("--target-tensor-parallel-size", "--target-pipeline-parallel-size", "--target-expert-parallel-size")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(ArgumentError):
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


def _check_output(save_dir: Path, load_dir: Path, overwrite: bool) -> list[Path]:
    """Check ``--save-dir`` before any work; return its missing parent directories, outermost first.

    Raises:
        ConversionError: it is ``--load-dir``, it exists without ``overwrite``, or a part of its path is a file.
    """
    if save_dir.resolve() == load_dir.resolve():
        raise ConversionError(f"--save-dir {save_dir} is the same as --load-dir")
    if save_dir.exists() and not overwrite:
        raise ConversionError(f"--save-dir {save_dir} already exists (pass --overwrite to replace it)")
    missing = []
    parent = save_dir.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise ConversionError(f"--save-dir {save_dir}: {parent} is not a directory")
    return missing[::-1]


@contextlib.contextmanager
def _parents_created(directories: Sequence[Path], save_dir: Path):
    """Create the missing parents of ``--save-dir`` for the duration of the write; remove them again (when still
    empty) if the write fails, so that a failed conversion leaves nothing behind."""
    made = []
    try:
        for directory in directories:
            try:
                directory.mkdir()
            except FileExistsError:
                if not directory.is_dir():
                    raise ConversionError(f"--save-dir {save_dir}: {directory} is not a directory") from None
                continue
            except OSError as exc:
                raise ConversionError(f"--save-dir {save_dir}: cannot create {directory} "
                                      f"({exc.strerror or exc})") from None
            made.append(directory)
        yield
    except BaseException:
        for directory in reversed(made):
            try:
                directory.rmdir()
            except OSError:
                break
        raise


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
    new_parents = _check_output(save_dir, load_dir, overwrite)

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
    with _parents_created(new_parents, save_dir):
        return save_model_checkpoint(model, save_dir, hf_config=hf_config, model_kind=kind, tokenizer_dir=tokenizer,
                                     extra_meta=extra, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                     overwrite=True)


def hf_config_for_export(hf_config: dict, model_kind: str, dtype: torch.dtype, score_pooling: str = "last",
                         pad_token_id: Optional[int] = None) -> dict:
    """The ``config.json`` written by :func:`convert_mcore_to_hf` (architecture class, dtype, labels, padding).

    A value model with ``score_pooling`` ``last`` becomes ``*ForSequenceClassification``; with ``response_mean``
    it becomes ``*ForTokenClassification`` (per-token scores; the config records ``score_pooling``).
    ``pad_token_id`` replaces the config's (None keeps it; see :func:`classifier_pad_token`). Warns when a
    sequence classifier ends up without ``pad_token_id`` (HF then scores only batches of one row).
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
    if pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    if model_kind == "value":
        config["id2label"] = {"0": "LABEL_0"}
        config["label2id"] = {"LABEL_0": 0}
        config.pop("num_labels", None)
        if score_pooling == "last" and config.get("pad_token_id") is None:
            warnings.warn("config has no pad_token_id: HF sequence classifiers then score only batches of one "
                          "row (set pad_token_id in config.json)")
    else:
        for key in ("id2label", "label2id", "num_labels", "problem_type"):
            config.pop(key, None)
    return config


def _token_ids(value) -> set[int]:
    """``eos_token_id`` and the like: an int, a list of ints, or None."""
    if value is None:
        return set()
    if isinstance(value, (list, tuple)):
        return {int(v) for v in value if v is not None}
    return {int(value)}


def _end_of_turn_strings() -> set[str]:
    """The literal end-of-turn strings of posttrain's prompt templates (``<|im_end|>``, ``<|eot_id|>``, ...);
    ``{eos}`` (the tokenizer's EOS) is covered by the EOS ids."""
    strings = set()
    for name in template_names():
        template = get_template(name)
        if isinstance(template, FormatTemplate) and "{" not in template.end_of_turn:
            strings.add(template.end_of_turn)
    return strings


def classifier_pad_token(hf_config: dict, tokenizer_dir: Optional[Path]) -> tuple[Optional[int], Optional[str]]:
    """The padding token of an exported ``*ForSequenceClassification``: one a scored sequence never ends with.

    HF's sequence classifier scores the **last token whose id is not** ``pad_token_id`` (it ignores the attention
    mask; transformers 5, left and right padding alike). posttrain scores the last real token, which
    for a chat-templated response is its end-of-turn token; many tokenizers pad with that very token (SmolLM2:
    ``<|im_end|>``), and HF would then score the token before it. The pad id must therefore differ from every id
    a sequence can end with: EOS ids (``config.json``, ``generation_config.json``, the tokenizer), BOS, the special
    tokens the tokenizer's chat template writes, and the end-of-turn strings of posttrain's prompt templates.

    Choice: the config's (else the tokenizer's) pad token when it is none of those; otherwise the first of the
    tokenizer's other special tokens with ``pad`` in its text, then ``reserved`` / ``unused`` ones, then any other
    (the lowest id; the unknown token last).

    Args:
        hf_config: the model's ``config.json`` dict.
        tokenizer_dir: the tokenizer files written beside the model (None: no tokenizer).

    Returns:
        ``(pad id, pad token text)``; ``(None, None)`` when no such token exists (or, without a tokenizer, the
        config's pad id is an EOS / BOS id), ``(id, None)`` for a safe config pad id without a tokenizer.

    Raises:
        ConversionError: the tokenizer files do not load.
    """
    ends = _token_ids(hf_config.get("eos_token_id")) | _token_ids(hf_config.get("bos_token_id"))
    current = hf_config.get("pad_token_id")
    if tokenizer_dir is None:
        return (current, None) if current is not None and current not in ends else (None, None)
    from transformers import (
        AutoTokenizer,  # heavy; only an HF sequence-classifier export needs it
    )

    generation = tokenizer_dir / "generation_config.json"
    if generation.is_file():
        try:
            ends |= _token_ids(json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id"))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as exc:
            raise ConversionError(f"{generation}: not a valid generation config ({exc})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{tokenizer_dir}: the tokenizer files do not load ({str(exc).splitlines()[0]})") \
            from None
    ends |= {i for i in (tokenizer.eos_token_id, tokenizer.bos_token_id) if i is not None}
    specials = {int(i): token.content for i, token in tokenizer.added_tokens_decoder.items()
                if token.special and int(i) < int(hf_config["vocab_size"])}
    chat_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    end_strings = _end_of_turn_strings()
    ends |= {i for i, text in specials.items() if text in chat_template or text in end_strings}
    if current is None:
        current = tokenizer.pad_token_id
    if current is not None and current not in ends:
        return int(current), tokenizer.convert_ids_to_tokens(int(current))

    def rank(item: tuple[int, str]) -> tuple[int, int]:
        token_id, text = item
        lowered = text.lower()
        if "pad" in lowered:
            return 0, token_id
        if "reserved" in lowered or "unused" in lowered:
            return 1, token_id
        return (3 if token_id == tokenizer.unk_token_id else 2), token_id

    candidates = sorted(((i, t) for i, t in specials.items() if i not in ends), key=rank)
    return candidates[0] if candidates else (None, None)


def _set_tokenizer_pad(directory: Path, pad_id: int, pad_token: str) -> None:
    """Make the tokenizer files in ``directory`` pad with ``pad_token`` (``tokenizer_config.json``,
    ``special_tokens_map.json``, ``generation_config.json``, those that exist)."""
    for name, key, value in (("tokenizer_config.json", "pad_token", pad_token),
                             ("special_tokens_map.json", "pad_token", pad_token),
                             ("generation_config.json", "pad_token_id", pad_id)):
        path = directory / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if name == "generation_config.json" and key not in data:
            continue
        if isinstance(data.get(key), dict):  # an AddedToken written out in full
            data[key] = dict(data[key], content=value)
        else:
            data[key] = value
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_mcore_to_hf(load_dir: str | Path, save_dir: str | Path, *, tokenizer_dir: Optional[str | Path] = None,
                        dtype: Optional[str] = None, drop_value_head_bias: bool = False,
                        overwrite: bool = False) -> Path:
    """posttrain checkpoint -> HF directory (``config.json``, safetensors, tokenizer files).

    A reward / value model scored at the last token (``score_pooling`` ``last``) becomes
    ``*ForSequenceClassification`` whose ``pad_token_id`` (and the tokenizer's pad token) is a token a scored
    sequence never ends with (:func:`classifier_pad_token`), so that HF scores the same token as posttrain with
    left or right padding.

    Args:
        load_dir: posttrain checkpoint directory.
        save_dir: HF directory to create (missing parent directories are created).
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
        CheckpointError: not a posttrain checkpoint, a file of it is missing or damaged, or it does not load.
        ConversionError: non-zero value-head bias without ``drop_value_head_bias``, unknown dtype, ``save_dir``
            exists or a part of its path is a file, tokenizer files that do not load.
    """
    load_dir, save_dir = Path(load_dir), Path(save_dir)
    meta = read_checkpoint_meta(load_dir)
    hf_config, kind = meta["hf_config"], meta["model_kind"]
    pooling = checkpoint_score_pooling(meta) if kind == "value" else "last"
    arch = parse_hf_config(hf_config)
    dtype_name = dtype or arch.dtype or "float32"
    if dtype_name not in _DTYPES:
        raise ConversionError(f"--dtype {dtype_name!r} must be one of {', '.join(_DTYPES)}")
    verify_checkpoint_files(load_dir)
    copied = check_tokenizer_dir(tokenizer_dir) if tokenizer_dir is not None else tokenizer_files(load_dir)
    if not copied:
        warnings.warn(f"{load_dir}: no tokenizer files; the output has no tokenizer (pass --tokenizer-dir)")
    # the sequence classifier's padding token (token classifiers and causal LMs keep the config's)
    pad_id, pad_token = None, None
    sequence_classifier = kind == "value" and pooling == "last"
    if sequence_classifier:
        has_tokenizer = any(f.name != "generation_config.json" for f in copied)
        source = (Path(tokenizer_dir) if tokenizer_dir is not None else load_dir) if has_tokenizer else None
        pad_id, pad_token = classifier_pad_token(hf_config, source)
        old = hf_config.get("pad_token_id")
        if pad_id is None:
            warnings.warn(f"no token can pad the HF sequence classifier safely (pad_token_id {old} is an EOS / BOS "
                          "token or missing, and the tokenizer has no other special token): HF will score the "
                          "token before a final pad token")
        elif pad_id != old:
            warnings.warn(f"HF sequence classifier pads with {pad_token!r} (id {pad_id}) instead of pad_token_id "
                          f"{old}, which a scored sequence can end with (HF scores the last non-pad token)")
    new_parents = _check_output(save_dir, load_dir, overwrite)

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

    with _parents_created(new_parents, save_dir):
        partial = save_dir.parent / f".{save_dir.name}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        try:
            save_hf_safetensors(tensors, partial)
            config = hf_config_for_export(hf_config, kind, out_dtype, pooling, pad_token_id=pad_id)
            (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for path in copied:
                shutil.copy2(path, partial / path.name)
            if pad_token is not None:
                _set_tokenizer_pad(partial, pad_id, pad_token)
                if not (partial / "tokenizer_config.json").is_file():
                    warnings.warn(f"no tokenizer_config.json to record the pad token in: pad batches for the HF "
                                  f"sequence classifier with {pad_token!r} (id {pad_id})")
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
        CheckpointError: not a posttrain checkpoint, not a causal LM, or a file of it is missing or damaged.
        ConversionError: ``save_dir`` exists, or a part of its path is a file.
    """
    load_dir, save_dir = Path(load_dir), Path(save_dir)
    meta = read_checkpoint_meta(load_dir)
    if meta["model_kind"] != "causal_lm":
        raise ConversionError(f"{load_dir} already holds a {meta['model_kind']} model (--init-value-head needs a "
                              "causal LM)")
    validate_parallel_layout(parse_hf_config(meta["hf_config"]), *target_parallel, flag_names=TARGET_FLAGS)
    verify_checkpoint_files(load_dir)
    tokenizer = _source_tokenizer(load_dir, tokenizer_dir)
    new_parents = _check_output(save_dir, load_dir, overwrite)

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
    with _parents_created(new_parents, save_dir):
        return save_model_checkpoint(model, save_dir, hf_config=meta["hf_config"], model_kind="value",
                                     tokenizer_dir=tokenizer, extra_meta=extra,
                                     make_vocab_size_divisible_by=divisible_by, overwrite=True)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ConvertConfig:
    """One conversion: the ``convert_ckpt.py`` flags, by the same names (``load_dir`` is ``--load-dir``).

    Raises (from ``__post_init__``):
        ArgumentError: a value out of range or an inconsistent combination of flags; the message names the flag.
            Checks that need the files (the checkpoint's kind, the config's ``model_type``) happen in :func:`run`.
    """

    direction: str = arg(help="hf2mcore: HF -> posttrain; mcore2hf: posttrain -> HF; mcore2mcore: causal-LM "
                              "posttrain checkpoint -> value checkpoint (with --init-value-head)",
                         choices=list(DIRECTIONS))
    load_dir: str = arg(help="source directory (HF model or posttrain checkpoint)")
    save_dir: str = arg(help="output directory (must not exist unless --overwrite; missing parent directories "
                             "are created)")
    model_type_hf: Optional[str] = arg(None, "expected HF model_type (default: read from config.json)",
                                       choices=list(SUPPORTED_MODEL_TYPES))
    model_kind: Optional[str] = arg(None, "target model: causal_lm (actor/reference) or value (critic/reward); "
                                          "default: the source's kind (HF: value when it has a score head)",
                                    choices=list(MODEL_KINDS))
    init_value_head: bool = arg(False, "make a value model from a causal LM with a fresh head (N(0, std^2), bias 0)")
    value_head_init_std: float = arg(0.02, "std of a fresh value head")
    seed: int = arg(1234, "seed of a fresh value head")
    tokenizer_dir: Optional[str] = arg(None, "copy tokenizer files from here (default: from --load-dir)")
    make_vocab_size_divisible_by: int = arg(128, "vocabulary padding of the stored embedding (hf2mcore)")
    dtype: Optional[str] = arg(None, "dtype of the written HF weights (mcore2hf; default: the original config's "
                                     "dtype, float32 when it declares none)", choices=list(_DTYPES))
    drop_value_head_bias: bool = arg(False, "mcore2hf of a value model: drop a non-zero head bias (HF score has "
                                            "none)")
    overwrite: bool = arg(False, "replace an existing --save-dir")
    target_tensor_parallel_size: int = arg(1, "TP the model will be trained at: checked against the model "
                                              "(hf2mcore, mcore2mcore); the checkpoint itself loads at any layout")
    target_pipeline_parallel_size: int = arg(1, "PP the model will be trained at: checked against the model "
                                                "(hf2mcore, mcore2mcore); the checkpoint itself loads at any "
                                                "layout")
    target_expert_parallel_size: int = arg(1, "EP the model will be trained at: checked against the model "
                                              "(hf2mcore, mcore2mcore); the checkpoint itself loads at any layout")

    def __post_init__(self) -> None:
        for flag, value, valid in (("--direction", self.direction, DIRECTIONS),
                                   ("--model-type-hf", self.model_type_hf, SUPPORTED_MODEL_TYPES),
                                   ("--model-kind", self.model_kind, MODEL_KINDS),
                                   ("--dtype", self.dtype, tuple(_DTYPES))):
            if value is not None and value not in valid:
                raise ArgumentError(f"{flag} {value!r} must be one of {', '.join(valid)}")
        for flag, value in (("--load-dir", self.load_dir), ("--save-dir", self.save_dir)):
            if not value:
                raise ArgumentError(f"{flag} must not be empty")
        if not math.isfinite(self.value_head_init_std) or self.value_head_init_std < 0:
            raise ArgumentError(f"--value-head-init-std must be a finite number >= 0, got {self.value_head_init_std}")
        for flag, value in (("--make-vocab-size-divisible-by", self.make_vocab_size_divisible_by),
                            *zip(TARGET_FLAGS, self.target_parallel)):
            if value < 1:
                raise ArgumentError(f"{flag} must be >= 1, got {value}")
        if self.direction == "mcore2hf" and self.init_value_head:
            raise ArgumentError("--init-value-head is for hf2mcore / mcore2mcore")
        if self.direction == "mcore2mcore" and (self.model_kind != "value" or not self.init_value_head):
            raise ArgumentError("mcore2mcore converts a causal LM into a value model: pass --model-kind value "
                                "--init-value-head")
        if self.init_value_head and self.model_kind == "causal_lm":
            raise ArgumentError("--init-value-head needs --model-kind value (or no --model-kind)")

    @property
    def target_parallel(self) -> tuple[int, int, int]:
        """(TP, PP, EP) of the ``--target-*-parallel-size`` flags."""
        return (self.target_tensor_parallel_size, self.target_pipeline_parallel_size,
                self.target_expert_parallel_size)


def build_parser() -> argparse.ArgumentParser:
    """The ``convert_ckpt.py`` argument parser (flags generated from :class:`ConvertConfig`)."""
    parser = argparse.ArgumentParser(
        prog="convert_ckpt.py",
        description="Convert model checkpoints between Hugging Face directories and posttrain (megatron-core "
                    "dist_checkpointing) checkpoints. See docs/checkpoint.md.")
    add_dataclass_args(parser, ConvertConfig, "conversion")
    return parser


def run(config: ConvertConfig) -> Path:
    """Run one conversion.

    Returns:
        The written directory.

    Raises:
        ConversionError, CheckpointError, MappingError, UnsupportedModelError, FileNotFoundError: bad input (see
            the conversion functions).
    """
    if config.direction == "hf2mcore":
        return convert_hf_to_mcore(config.load_dir, config.save_dir, model_kind=config.model_kind,
                                   init_value_head=config.init_value_head, model_type=config.model_type_hf,
                                   tokenizer_dir=config.tokenizer_dir,
                                   make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
                                   value_head_init_std=config.value_head_init_std, seed=config.seed,
                                   overwrite=config.overwrite, target_parallel=config.target_parallel)
    if config.model_type_hf is not None and is_checkpoint(config.load_dir):
        stored = read_checkpoint_meta(config.load_dir)["hf_config"].get("model_type")
        if stored != config.model_type_hf:
            raise ConversionError(f"--model-type-hf {config.model_type_hf} but {config.load_dir} holds a {stored} "
                                  "model")
    if config.direction == "mcore2hf":
        if config.model_kind is not None and is_checkpoint(config.load_dir) and \
                read_checkpoint_meta(config.load_dir)["model_kind"] != config.model_kind:
            raise ConversionError(f"--model-kind {config.model_kind} differs from the checkpoint's model kind "
                                  "(use mcore2mcore to change it)")
        return convert_mcore_to_hf(config.load_dir, config.save_dir, tokenizer_dir=config.tokenizer_dir,
                                   dtype=config.dtype, drop_value_head_bias=config.drop_value_head_bias,
                                   overwrite=config.overwrite)
    return convert_mcore_to_value(config.load_dir, config.save_dir, value_head_init_std=config.value_head_init_std,
                                  seed=config.seed, tokenizer_dir=config.tokenizer_dir, overwrite=config.overwrite,
                                  target_parallel=config.target_parallel)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: returns 0 on success, 1 with a one-line ``error: ...`` on bad input (2 for bad flags)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = run(dataclass_from_args(ConvertConfig, args))
        except (InputError, OSError) as exc:  # the user's input, a permission or a full disk: one line
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"error: {message}", file=sys.stderr)
            return 1
        finally:
            for warning in caught:  # this package's notes; library warnings (megatron-core, transformers) dropped
                if Path(warning.filename).resolve().parent == Path(__file__).resolve().parent:
                    print(f"warning: {warning.message}", file=sys.stderr)
    print(f"converted {args.load_dir} -> {out} ({args.direction})")
    return 0
