"""The project's model checkpoint directory: megatron-core ``dist_checkpointing`` data plus what rebuilds the model.

Layout::

    <directory>/
        posttrain_checkpoint.json   format version, model kind, the HF config.json dict, vocab sizes, dtype, ...
        tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json, ...  (copied)
        model/                      dist_checkpointing data (torch_dist): loads at any TP / PP / EP

Because the weights are written with ``dist_checkpointing`` (every tensor stored with its global shape), a
checkpoint written at one tensor / pipeline / expert parallel layout loads at any other; the vocabulary padding may
differ too (padded rows are zero). ``AutoTokenizer.from_pretrained(<directory>)`` works because the tokenizer files
sit at the top level. An optimizer checkpoint can be written next to ``model/`` by the trainer; this module only
handles the model (see :func:`model_sharded_state_dict` to combine them).

Saving is collective (every rank calls it) and atomic: data goes to a hidden sibling directory ``.<name>.tmp``
which rank 0 renames to ``<name>`` once every rank has finished (:class:`posttrain.atomic.AtomicDirectory`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import torch

from posttrain.atomic import AtomicDirectory
from posttrain.errors import InputError, InputFileNotFoundError
from posttrain.models.provider import (
    MODEL_KINDS,
    model_info,
    parse_hf_config,
    unwrap_model,
)
from posttrain.processes import bind_checkpoint_writer_manager

META_FILE = "posttrain_checkpoint.json"
MODEL_SUBDIR = "model"
FORMAT_NAME = "posttrain-mcore-model"
FORMAT_VERSION = 1

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
"""Files copied from a tokenizer directory (those that exist)."""

_ARCH_FIELDS = ("model_type", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                "ffn_hidden_size", "vocab_size", "num_experts", "moe_ffn_hidden_size")

log = logging.getLogger(__name__)


class CheckpointError(InputError, ValueError):
    """Not a posttrain checkpoint, or it does not fit the model (message names the directory)."""


# ----------------------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------------------


def is_checkpoint(directory: str | Path) -> bool:
    """True when ``directory`` holds ``posttrain_checkpoint.json`` and a ``model/`` subdirectory."""
    directory = Path(directory)
    return (directory / META_FILE).is_file() and (directory / MODEL_SUBDIR).is_dir()


def read_checkpoint_meta(directory: str | Path) -> dict:
    """Read ``posttrain_checkpoint.json``.

    Returns:
        The metadata dict: ``format``, ``format_version``, ``model_kind``, ``hf_config``, ``vocab_size`` (real),
        ``padded_vocab_size`` (at save time), ``make_vocab_size_divisible_by``, ``dtype``, ``iteration``,
        ``parallel`` (TP / PP / EP at save time), ``extra``.

    Raises:
        CheckpointError: the directory is missing, is not a posttrain checkpoint, or its metadata is unreadable or
            of a newer format version.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{directory}: not a posttrain model checkpoint (no {META_FILE})")
    if not (directory / MODEL_SUBDIR).is_dir():
        raise CheckpointError(f"{directory}: incomplete checkpoint (no {MODEL_SUBDIR}/ directory)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_path}: not a posttrain model checkpoint (format is not {FORMAT_NAME!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta['format_version']} is newer than this posttrain "
                              f"({FORMAT_VERSION})")
    for field in ("model_kind", "hf_config", "vocab_size"):
        if field not in meta:
            raise CheckpointError(f"{meta_path}: field {field!r} is missing")
    if meta["model_kind"] not in MODEL_KINDS:
        raise CheckpointError(f"{meta_path}: unknown model_kind {meta['model_kind']!r}")
    return meta


def verify_checkpoint_files(directory: str | Path) -> None:
    """Check that the files of ``<directory>/model/`` are complete, reading only headers and sizes.

    Reads megatron-core's ``metadata.json``, torch's ``.metadata`` (which lists, for every stored tensor, the
    ``.distcp`` file, byte offset and length holding it) and checks ``common.pt``'s zip directory, then checks that
    every listed ``.distcp`` file exists and is long enough. Bit flips inside a tensor are not detected (the format
    has no checksums).

    Raises:
        CheckpointError: a file is missing, empty, truncated or unreadable (the message names it).
    """
    # megatron-core and torch.distributed.checkpoint are heavy: imported on use, as elsewhere in this module
    from megatron.core.dist_checkpointing.core import maybe_load_config
    from torch.distributed.checkpoint import FileSystemReader

    model_dir = Path(directory) / MODEL_SUBDIR
    config_file = model_dir / "metadata.json"
    try:
        config = maybe_load_config(str(model_dir))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{config_file}: unreadable ({exc})") from None
    if config is None:
        raise CheckpointError(f"{model_dir}: not a dist_checkpointing directory (no metadata.json)")
    if config.sharded_backend != "torch_dist":
        raise CheckpointError(f"{config_file}: sharded backend {config.sharded_backend!r}, expected 'torch_dist'")
    common = model_dir / "common.pt"
    if not common.is_file():
        raise CheckpointError(f"{common}: missing from the checkpoint")
    try:
        with zipfile.ZipFile(common) as archive:
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{common}: unreadable ({exc}); the file is truncated or corrupt") from None
    if damaged is not None:
        raise CheckpointError(f"{common}: entry {damaged} is corrupt")
    metadata_file = model_dir / ".metadata"
    if not metadata_file.is_file():
        raise CheckpointError(f"{metadata_file}: missing from the checkpoint")
    try:
        metadata = FileSystemReader(str(model_dir)).read_metadata()
    except Exception as exc:  # unpickling a damaged file fails with many exception types; nothing else runs here
        raise CheckpointError(f"{metadata_file}: unreadable ({_first_line(exc)}); the file is truncated or "
                              "corrupt") from None
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = model_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {metadata_file.name})")
        actual = path.stat().st_size
        if actual < size:
            raise CheckpointError(f"{path}: truncated ({actual} bytes, {metadata_file.name} lists data up to byte "
                                  f"{size})")


def _param_dtype(model: torch.nn.Module) -> str:
    inner = unwrap_model(model)
    for param in inner.decoder.parameters():
        return str(param.dtype).replace("torch.", "")
    return "float32"


def tokenizer_files(tokenizer_dir: str | Path) -> list[Path]:
    """The files of :data:`TOKENIZER_FILES` present in a directory (possibly none)."""
    tokenizer_dir = Path(tokenizer_dir)
    return [tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]


def check_tokenizer_dir(tokenizer_dir: str | Path) -> list[Path]:
    """The tokenizer files of a directory.

    Raises:
        FileNotFoundError: the directory does not exist or holds no tokenizer file.
    """
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise InputFileNotFoundError(f"{tokenizer_dir}: tokenizer directory not found")
    files = tokenizer_files(tokenizer_dir)
    if not any(f.name not in ("generation_config.json",) for f in files):
        raise InputFileNotFoundError(f"{tokenizer_dir}: no tokenizer files (expected one of tokenizer.json, "
                                "tokenizer.model, vocab.json, ...)")
    return files


# ----------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------


def model_sharded_state_dict(model: torch.nn.Module, prefix: str = "") -> dict:
    """The model's ``sharded_state_dict`` (wrappers removed), with keys prefixed by ``prefix``.

    Use it to save model and optimizer together, or to load the model part of a larger ``dist_checkpointing``
    checkpoint.
    """
    return unwrap_model(model).sharded_state_dict(prefix=prefix)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _broadcast_error(message: Optional[str]) -> Optional[str]:
    """Share rank 0's error message (or None) with every rank so all of them stop together."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return message
    box = [message]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def save_model_checkpoint(model: torch.nn.Module, directory: str | Path, *, hf_config: Optional[dict] = None,
                          model_kind: Optional[str] = None, tokenizer_dir: Optional[str | Path] = None,
                          iteration: Optional[int] = None, extra_meta: Optional[dict] = None,
                          make_vocab_size_divisible_by: Optional[int] = None, overwrite: bool = True,
                          atomic: bool = True) -> Path:
    """Write the model as a posttrain checkpoint directory (collective: every rank calls it).

    Args:
        model: a model from :func:`posttrain.models.build_model` (any wrapper, any TP / PP / EP).
        directory: the checkpoint directory to create.
        hf_config: HF config dict of the model (default: the one the model was built from).
        model_kind: ``causal_lm`` or ``value`` (default: the model's).
        tokenizer_dir: directory whose tokenizer files are copied in (None: no tokenizer).
        iteration: training iteration stored in the metadata.
        extra_meta: JSON-serialisable dict stored under ``extra``.
        make_vocab_size_divisible_by: recorded for rebuilding the model (default: the model's, else 128).
        overwrite: replace an existing ``directory`` (else raise).
        atomic: write into a hidden temporary and rename it into place (:class:`posttrain.atomic.AtomicDirectory`);
            False writes in place, for callers that publish a larger directory atomically themselves.

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: ``directory`` exists and ``overwrite`` is False, or model kind / config are unknown.
        FileNotFoundError: ``tokenizer_dir`` holds no tokenizer files.
    """
    from megatron.core import dist_checkpointing, parallel_state

    directory = Path(directory).absolute()
    inner = unwrap_model(model)
    info = model_info(model)
    hf_config = dict(hf_config if hf_config is not None else (info.hf_config if info else {}))
    model_kind = model_kind or (info.kind if info else None)
    if make_vocab_size_divisible_by is None:
        make_vocab_size_divisible_by = info.make_vocab_size_divisible_by if info else 128
    if not hf_config:
        raise CheckpointError(f"{directory}: hf_config is required (the model was not built by build_model)")
    if model_kind not in MODEL_KINDS:
        raise CheckpointError(f"{directory}: model_kind must be one of {', '.join(MODEL_KINDS)}, got {model_kind!r}")
    arch = parse_hf_config(hf_config)
    copied = check_tokenizer_dir(tokenizer_dir) if tokenizer_dir is not None else []
    error = None
    if _rank() == 0 and directory.exists() and not overwrite:
        error = f"{directory}: already exists (pass overwrite=True to replace it)"
    error = _broadcast_error(error)
    if error:
        raise CheckpointError(error)

    with (AtomicDirectory(directory, what=f"model checkpoint {directory.name}") if atomic
          else contextlib.nullcontext(directory)) as target:
        target = Path(target)
        if _rank() == 0:
            (target / MODEL_SUBDIR).mkdir(parents=True, exist_ok=True)
        _barrier()
        bind_checkpoint_writer_manager()  # its writer processes die with this one (posttrain.processes)
        dist_checkpointing.save(model_sharded_state_dict(model), str(target / MODEL_SUBDIR))
        if _rank() == 0:
            meta = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "model_kind": model_kind,
                "hf_config": hf_config,
                "model_type": arch.model_type,
                "vocab_size": arch.vocab_size,
                "padded_vocab_size": int(getattr(inner, "vocab_size", 0)),
                "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
                "dtype": _param_dtype(model),
                "iteration": iteration,
                "parallel": {
                    "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
                    "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
                    "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
                },
                "tokenizer_files": [f.name for f in copied],
                "extra": extra_meta or {},
            }
            for path in copied:
                shutil.copy2(path, target / path.name)
            (target / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _barrier()
    return directory


def _check_architecture(meta: dict, model: torch.nn.Module, directory: Path) -> None:
    info = model_info(model)
    if info is None:
        return
    want, have = parse_hf_config(meta["hf_config"]), parse_hf_config(info.hf_config)
    diffs = [f"{f} {getattr(want, f)} vs {getattr(have, f)}" for f in _ARCH_FIELDS
             if getattr(want, f) != getattr(have, f)]
    if diffs:
        raise CheckpointError(f"{directory}: checkpoint does not match the model (checkpoint vs model: "
                              f"{'; '.join(diffs)})")


_READ_ERRORS = (OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)
"""What reading a damaged ``.distcp`` file raises inside torch's checkpoint reader."""


def _read_failure(exc: BaseException) -> Optional[str]:
    """The first line of the read error behind a ``CheckpointException``, or None when some rank failed for
    another reason (a bug, which keeps its traceback)."""
    failures = [failure[0] for failure in exc.failures.values()]
    if not failures or not all(isinstance(f, _READ_ERRORS) for f in failures):
        return None
    if isinstance(failures[0], pickle.UnpicklingError):  # torch's text is advice about weights_only, not the cause
        return type(failures[0]).__name__
    return _first_line(failures[0])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_model_checkpoint(model: torch.nn.Module, directory: str | Path, strict: bool = True) -> dict:
    """Load a posttrain checkpoint into a model built at any TP / PP / EP (collective: every rank calls it).

    Args:
        model: a model from :func:`posttrain.models.build_model` (any wrapper).
        directory: the checkpoint directory.
        strict: require the checkpoint to hold exactly the model's kind and every tensor the model has. With
            False, tensors absent from the checkpoint keep their current values (e.g. loading a causal-LM
            checkpoint into a value model leaves its freshly initialised head) and a model-kind mismatch is
            allowed.

    Returns:
        The checkpoint metadata (see :func:`read_checkpoint_meta`), plus ``missing_keys``: model tensors the
        checkpoint did not provide (always empty when ``strict``).

    Raises:
        CheckpointError: not a posttrain checkpoint; a file of it is missing, truncated or unreadable (see
            :func:`verify_checkpoint_files`); its architecture (hidden size, layers, heads, vocabulary, ...) or kind
            differs from the model's; a tensor's global shape differs; or (``strict``) a tensor is missing.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    verify_checkpoint_files(directory)
    inner = unwrap_model(model)
    _check_architecture(meta, model, directory)
    kind = info.kind if (info := model_info(model)) else None
    if strict and kind is not None and kind != meta["model_kind"]:
        raise CheckpointError(f"{directory}: holds a {meta['model_kind']} model, cannot load it into a {kind} model "
                              "(use strict=False to load a causal LM into a value model)")
    sharded = model_sharded_state_dict(model)
    stored = dist_checkpointing.load_tensors_metadata(str(directory / MODEL_SUBDIR))
    missing = []
    for name, item in list(sharded.items()):
        if not isinstance(item, ShardedTensor):
            continue
        if item.key not in stored:
            missing.append(name)
            continue
        want, have = tuple(stored[item.key].global_shape), tuple(item.global_shape)
        if want != have and not item.allow_shape_mismatch:
            raise CheckpointError(f"{directory}: tensor {item.key} has shape {list(want)} in the checkpoint but "
                                  f"{list(have)} in the model")
    if missing and strict:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{directory}: checkpoint has no {', '.join(missing[:3])}{more}")
    for name in missing:
        sharded.pop(name)
        extra_state = name.rsplit(".", 1)[0] + "._extra_state"
        sharded.pop(extra_state, None)
    try:
        state = dist_checkpointing.load(sharded, str(directory / MODEL_SUBDIR),
                                        strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    except CheckpointException as exc:
        reason = _read_failure(exc)
        if reason is None:
            raise
        raise CheckpointError(f"{directory / MODEL_SUBDIR}: tensor data does not read back ({reason}); a .distcp "
                              "file is corrupt") from None
    result = inner.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    not_loaded = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if unexpected or (strict and not_loaded):
        raise CheckpointError(f"{directory}: state dict mismatch (missing {not_loaded[:3]}, unexpected "
                              f"{unexpected[:3]})")
    if missing:
        log.warning("%s: model tensors not in the checkpoint kept their values: %s", directory, ", ".join(missing))
    return dict(meta, missing_keys=missing)
