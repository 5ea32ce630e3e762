"""Offline preprocessing: input rows -> templated, tokenized Megatron indexed datasets.

::

    python preprocess_data.py --input ./dataset/train-00000-of-00001.parquet \\
        --tokenizer-name-or-path ./model_from_hf/Llama-3.2-1B-Instruct --tokenizer-type PretrainedFromHF \\
        --output-prefix ./finetune_dataset/alpaca --workers 16 --log-interval 1000 \\
        --handler-name PPOAlpacaStyleInstructionHandler --prompt-type empty

Pipeline (:func:`run_preprocess`): the main process reads the input files in order (:mod:`~posttrain.data.sources`),
pulls each row's fields out with the handler (:mod:`~posttrain.data.handlers`, type errors are fatal there) and
cuts the rows into chunks. Chunks are templated and tokenized (:mod:`~posttrain.data.templates`,
:mod:`~posttrain.data.tokenizer`) in the same process (``--workers 1``, the tokenizer's own threads batch-encode
each chunk) or in a ``multiprocessing.Pool`` of ``--workers`` processes (each with its own tokenizer, batch-encoding
on one thread). Results come back in submission order, so the output is byte-identical for any ``--workers``. The
main process appends them to the indexed datasets (:mod:`~posttrain.data.writer`), which appear only when the run
succeeds.

Exit status of :func:`main`: 0 on success, 1 for a data or option problem (one ``error: ...`` line on stderr, no
dataset file left behind), 2 for a malformed command line, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from posttrain.arguments import add_dataclass_args, arg, dataclass_from_args
from posttrain.data.errors import DataError
from posttrain.data.handlers import (
    DatasetHandler,
    EncodedChunk,
    get_handler,
    handler_names,
)
from posttrain.data.sources import InputFile, discover_inputs, open_input
from posttrain.data.templates import get_template, template_names
from posttrain.data.tokenizer import TOKENIZER_TYPES, TokenizerSpec
from posttrain.data.writer import (
    IndexedDatasetWriter,
    indexed_dataset_module,
    make_directories,
    meta_path,
    missing_directories,
    numpy_dtype,
    remove_empty_directories,
)
from posttrain.errors import InputError, one_line
from posttrain.processes import bind_children_to_parent

logger = logging.getLogger("posttrain.data.preprocess")

META_FORMAT_VERSION = 1
MAX_SKIP_EXAMPLES = 5


def _parse_map_keys(text: str) -> dict[str, str] | None:
    """``--map-keys`` text -> dict ("" -> None).

    Raises:
        DataError: not valid JSON, or not a JSON object.
    """
    if not text:
        return None
    try:
        map_keys = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"--map-keys is not valid JSON ({exc.msg}): {text}") from None
    if not isinstance(map_keys, dict):
        raise DataError(f"--map-keys must be a JSON object, got {text}")
    return map_keys


@dataclass(kw_only=True)
class PreprocessConfig:
    """Options of one preprocessing run: the ``preprocess_data.py`` flags, generated from these fields (same names;
    ``output_prefix`` is ``--output-prefix``).

    Attributes:
        input: a file, a directory or a glob of ``.parquet``/``.json``/``.jsonl`` files.
        output_prefix: datasets are written to ``<output_prefix>_<name>_document.{bin,idx}``; missing directories
            are created.
        tokenizer_type: ``PretrainedFromHF`` or ``SentencePieceTokenizer``.
        tokenizer_name_or_path: Hugging Face directory or Hub name (``PretrainedFromHF``).
        tokenizer_model: SentencePiece ``.model`` file (``SentencePieceTokenizer``).
        handler_name: a registered handler (:func:`~posttrain.data.handlers.handler_names`).
        prompt_type: a registered template (:func:`~posttrain.data.templates.template_names`).
        map_keys: field -> column name overrides (e.g. ``{"prompt": "question"}``), or that object as JSON text
            (the command line); ``__post_init__`` parses the text, and "" means none.
        system_prompt: replaces the template's default system prompt ("" removes it); a row's own system column
            still wins.
        extra_columns: input columns kept unchanged beside the prompts (``<output_prefix>_extra.parquet``, one row
            per document), for a ``--reward-function`` that reads them; PPO prompts only.
        seq_length: rows whose sequence is ``>= seq_length`` tokens are skipped and counted (None: no limit).
        max_samples: read only this many input rows: the first ones, or a random subset (kept in input order)
            when ``seed`` is set.
        seed: seed of the ``max_samples`` subset.
        workers: tokenizing processes; 1 tokenizes in the main process.
        log_interval: a progress line every this many input rows.
        chunk_size: rows per task sent to a worker (at most ``log_interval``).
        progress_bar: show a tqdm bar; None shows it when stderr is a terminal (no flag).

    Raises (from ``__post_init__``):
        DataError: a value out of range, an unknown handler / prompt type / tokenizer type, a tokenizer type without
            its path, or bad ``map_keys``; the message names the flag.
    """

    input: str = arg(help="a .parquet/.json/.jsonl file, a directory of them, or a glob pattern", group="input")
    handler_name: str = arg("PPOAlpacaStyleInstructionHandler", "one of: " + ", ".join(handler_names()),
                            group="input")
    map_keys: dict[str, str] | str | None = arg(
        None, 'JSON object mapping fields to columns, e.g. \'{"prompt": "instruction", "query": "input", '
              '"system": "system"}\' (default: the handler\'s column names)', group="input", type=str)
    extra_columns: list[str] = arg(default_factory=list, group="input", help=(
        "input columns to keep unchanged beside the prompts, for a --reward-function that reads them (e.g. "
        "--extra-columns answer data_source); written to <prefix>_extra.parquet, one row per prompt "
        "(PPOAlpacaStyleInstructionHandler only)"))
    max_samples: int | None = arg(None, "read at most this many input rows (default: all)", group="input")
    seed: int | None = arg(None, "with --max-samples: pick a random subset of rows with this seed (default: the "
                                 "first rows)", group="input")
    tokenizer_type: str = arg("PretrainedFromHF", " or ".join(TOKENIZER_TYPES), group="tokenizer and template")
    tokenizer_name_or_path: str | None = arg(None, "Hugging Face tokenizer directory or name (needed by "
                                                   "PretrainedFromHF)", group="tokenizer and template")
    tokenizer_model: str | None = arg(None, "SentencePiece .model file (needed by SentencePieceTokenizer)",
                                      group="tokenizer and template")
    prompt_type: str = arg("empty", "one of: " + ", ".join(template_names()), group="tokenizer and template")
    system_prompt: str | None = arg(None, "replace the template's default system prompt ('' for none; default: "
                                          "the template's)", group="tokenizer and template")
    seq_length: int | None = arg(None, "skip (and count) rows whose sequence has at least this many tokens "
                                       "(default: no limit)", group="tokenizer and template")
    output_prefix: str = arg(help="write <prefix>_<name>_document.{bin,idx} and <prefix>_meta.json (missing "
                                  "directories are created)", group="output and performance")
    workers: int = arg(1, "tokenizing processes", group="output and performance")
    chunk_size: int = arg(512, "rows per worker task (at most --log-interval)", group="output and performance")
    log_interval: int = arg(1000, "log progress every this many rows", group="output and performance")
    progress_bar: bool | None = None

    def __post_init__(self) -> None:
        for name in ("workers", "log_interval", "chunk_size"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("seq_length", "max_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DataError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise DataError(f"--tokenizer-type {self.tokenizer_type!r} is unknown; valid types: "
                            + ", ".join(TOKENIZER_TYPES))
        if self.tokenizer_type == "PretrainedFromHF" and not self.tokenizer_name_or_path:
            raise DataError("--tokenizer-type PretrainedFromHF needs --tokenizer-name-or-path")
        if self.tokenizer_type == "SentencePieceTokenizer" and not self.tokenizer_model:
            raise DataError("--tokenizer-type SentencePieceTokenizer needs --tokenizer-model")
        if isinstance(self.map_keys, str):
            self.map_keys = _parse_map_keys(self.map_keys)
        if self.map_keys is not None and not isinstance(self.map_keys, dict):
            raise DataError(f"--map-keys must be a JSON object, got {self.map_keys!r}")
        get_template(self.prompt_type)
        self.extra_columns = list(self.extra_columns or ())
        # checks the --map-keys fields and --extra-columns
        get_handler(self.handler_name)(self.map_keys, self.system_prompt, self.extra_columns)

    @property
    def tokenizer_spec(self) -> TokenizerSpec:
        """The :class:`~posttrain.data.tokenizer.TokenizerSpec` named by the tokenizer options."""
        return TokenizerSpec(self.tokenizer_type, self.tokenizer_name_or_path, self.tokenizer_model)


@dataclass
class PreprocessResult:
    """What a run wrote.

    Attributes:
        rows: input rows read (after ``max_samples``).
        documents: documents written (one per row kept).
        skipped: skip reason -> number of rows.
        tokens: token ids written, over all token datasets.
        elapsed_s: wall time of the whole run, seconds.
        process_s: wall time of reading, tokenizing and writing (after the tokenizer is loaded), seconds.
        datasets: output name -> dataset path prefix (without ``.bin``/``.idx``).
        meta_path: path of the metadata file.
        meta: its content.
    """

    rows: int
    documents: int
    skipped: dict[str, int]
    tokens: int
    elapsed_s: float
    process_s: float
    datasets: dict[str, str]
    meta_path: str
    meta: dict = field(repr=False, default_factory=dict)


# ----------------------------------------------------------------------------------------------- worker side

_WORKER = None  # (key, handler, bound template, tokenizer, seq_length) of this process


def _worker_key(config: PreprocessConfig) -> tuple:
    return (config.tokenizer_spec, config.handler_name, json.dumps(config.map_keys, sort_keys=True),
            config.system_prompt, config.prompt_type, config.seq_length)


def _build_worker_state(config: PreprocessConfig, tokenizer=None) -> tuple:
    handler = get_handler(config.handler_name)(config.map_keys, config.system_prompt)
    tokenizer = tokenizer if tokenizer is not None else config.tokenizer_spec.load()
    template = get_template(config.prompt_type).bind(tokenizer)
    return (_worker_key(config), handler, template, tokenizer, config.seq_length)


def _init_worker(config: PreprocessConfig) -> None:
    """Pool initializer: one tokenizer per worker, single-threaded (the processes are the parallelism).

    A worker forked from the main process inherits its already-loaded tokenizer; a spawned one loads it here.
    """
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _WORKER is None or _WORKER[0] != _worker_key(config):
        _WORKER = _build_worker_state(config)


def _encode_rows(rows: list[tuple]) -> EncodedChunk:
    _, handler, template, tokenizer, seq_length = _WORKER
    return handler.encode(rows, template, tokenizer, seq_length)


class _Done:
    """An already-computed result with the ``AsyncResult.get`` interface (``--workers 1``)."""

    def __init__(self, value: EncodedChunk) -> None:
        self.value = value

    def get(self) -> EncodedChunk:
        return self.value


def _make_pool(config: PreprocessConfig):
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # Forked workers inherit the environment: disable the tokenizer's thread pool in them from the start.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return context.Pool(config.workers, initializer=_init_worker, initargs=(config,))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


# ------------------------------------------------------------------------------------------------- main side

def _select_rows(total: int, max_samples: int | None, seed: int | None) -> np.ndarray | None:
    """Global indices of the rows to read (sorted), or None for all rows."""
    if max_samples is None or max_samples >= total:
        return None
    if seed is None:
        return np.arange(max_samples, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(total, size=max_samples, replace=False))


def _iter_chunks(sources: Sequence[InputFile], handler: DatasetHandler, selection: np.ndarray | None,
                 chunk_size: int) -> Iterator[tuple[list[tuple], np.ndarray, list[tuple]]]:
    """Yield ``(rows, refs, extras)`` chunks of at most ``chunk_size`` rows; ``refs`` is int64 ``[n, 2]``: the file
    index and the file row number of each row; ``extras`` the row's ``--extra-columns`` values (empty tuples
    without them)."""
    rows: list[tuple] = []
    extras: list[tuple] = []
    refs: list[np.ndarray] = []  # per batch: [n, 2] int64 (file index, row)
    offset = 0  # global index of the current file's first row
    for file_index, source in enumerate(sources):
        if selection is not None and offset > selection[-1]:
            break  # every selected row has been read: leave the remaining files unopened
        for batch in source.batches(handler.wanted_columns):
            if selection is not None:
                first = offset + batch.start
                if first > selection[-1]:
                    break  # past the last selected row: read no further batches
                lo, hi = np.searchsorted(selection, [first, first + batch.num_rows])
                if lo == hi:
                    continue
                if hi - lo < batch.num_rows:
                    batch = batch.select((selection[lo:hi] - first).tolist())
            rows += handler.extract(batch)
            extras += handler.extract_extras(batch)
            numbers = (np.arange(batch.start, batch.start + batch.num_rows) if batch.row_numbers is None
                       else np.asarray(batch.row_numbers, dtype=np.int64))
            refs.append(np.stack([np.full(batch.num_rows, file_index), numbers], axis=1))
            if len(rows) >= chunk_size:
                all_refs = np.concatenate(refs)
                start = 0
                while len(rows) - start >= chunk_size:
                    yield (rows[start:start + chunk_size], all_refs[start:start + chunk_size],
                           extras[start:start + chunk_size])
                    start += chunk_size
                rows, refs, extras = rows[start:], [all_refs[start:]], extras[start:]
        offset += source.num_rows
    if rows:
        yield rows, np.concatenate(refs), extras


def _check_control_tokens(template, tokenizer, prompt_type: str) -> None:
    for text in template.control_strings:
        if text and tokenizer.single_token_id(text) is None:
            logger.warning("--prompt-type %s writes %r, which is not a single token of this tokenizer: it is "
                           "encoded as ordinary text", prompt_type, text)


class _Stats:
    """Running counts of a run."""

    def __init__(self, handler: DatasetHandler, token_outputs: list[str]) -> None:
        self.reasons = handler.skip_reasons
        self.rows = 0
        self.documents = 0
        self.skipped = np.zeros(len(self.reasons) + 1, dtype=np.int64)
        self.examples: dict[str, list[tuple[int, int]]] = {r: [] for r in self.reasons}
        self.token_outputs = token_outputs
        self.tokens = 0
        self.length = {n: [None, None, 0] for n in token_outputs}  # min, max, sum

    def add(self, chunk: EncodedChunk, refs: np.ndarray) -> None:
        self.rows += len(chunk.status)
        counts = np.bincount(chunk.status, minlength=len(self.reasons) + 1)
        self.skipped += counts
        self.documents += int(counts[0])
        if counts[0] != len(chunk.status):
            for position in np.flatnonzero(chunk.status):
                examples = self.examples[self.reasons[chunk.status[position] - 1]]
                if len(examples) < MAX_SKIP_EXAMPLES:
                    examples.append((int(refs[position, 0]), int(refs[position, 1])))
        for name in self.token_outputs:
            lengths = chunk.arrays[name][1]
            if lengths.size:
                stat = self.length[name]
                low, high = int(lengths.min()), int(lengths.max())
                stat[0] = low if stat[0] is None else min(stat[0], low)
                stat[1] = high if stat[1] is None else max(stat[1], high)
                stat[2] += int(lengths.sum())
                self.tokens += int(lengths.sum())

    def skipped_dict(self) -> dict[str, int]:
        return {reason: int(self.skipped[k + 1]) for k, reason in enumerate(self.reasons)}


def _progress_line(stats: _Stats, elapsed: float) -> str:
    elapsed = max(elapsed, 1e-9)
    return (f"processed {stats.rows:,} rows: {stats.documents:,} documents written, "
            f"{stats.rows - stats.documents:,} skipped | {stats.rows / elapsed:,.1f} docs/s | "
            f"{stats.tokens / elapsed:,.0f} tokens/s | {elapsed:.1f} s")


def run_preprocess(config: PreprocessConfig) -> PreprocessResult:
    """Run one preprocessing job (see the module docstring).

    Args:
        config: the options.

    Returns:
        A :class:`PreprocessResult` describing the files written.

    Raises:
        DataError: bad option, unreadable input, missing column, wrong cell type, unloadable tokenizer, an output
            directory that cannot be created, or no row left to write. No ``.bin``/``.idx`` file of this run is left
            behind, nor a directory it created.

    Pool workers die with this process even when it is killed (:mod:`posttrain.processes`).
    """
    global _WORKER
    started = time.perf_counter()
    bind_children_to_parent()
    handler = get_handler(config.handler_name)(config.map_keys, config.system_prompt, config.extra_columns)
    get_template(config.prompt_type)
    files = discover_inputs(config.input)
    new_dirs = missing_directories(config.output_prefix)
    sources = [open_input(path) for path in files]
    for source in sources:
        handler.check_columns(source)
    state = _build_worker_state(config)
    _, _, template, tokenizer, _ = state
    _check_control_tokens(template, tokenizer, config.prompt_type)
    total_rows = sum(s.num_rows for s in sources)
    selection = _select_rows(total_rows, config.max_samples, config.seed)
    num_rows = total_rows if selection is None else len(selection)
    outputs = handler.outputs()
    token_outputs = [o.name for o in outputs if o.kind == "token"]
    logger.info("%s: %d file(s), %d rows to read; handler %s, prompt type %s, tokenizer %s (vocabulary %d), "
                "%d worker(s)", config.input, len(files), num_rows, handler.name, config.prompt_type,
                config.tokenizer_spec.describe(), tokenizer.vocab_size, config.workers)

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    indexed_dataset_module()  # the one-time megatron import is start-up, not processing time

    show_bar = sys.stderr.isatty() if config.progress_bar is None else config.progress_bar
    stats = _Stats(handler, token_outputs)
    process_start = time.perf_counter()
    next_log = config.log_interval
    pool = None
    _WORKER = state
    finished = False
    try:
        make_directories(new_dirs, config.output_prefix)
        with IndexedDatasetWriter(config.output_prefix, outputs, tokenizer.vocab_size,
                                  config.extra_columns) as writer, \
                tqdm(total=num_rows, unit=" docs", disable=not show_bar, file=sys.stderr, dynamic_ncols=True) as bar, \
                (logging_redirect_tqdm(loggers=[logging.getLogger("posttrain.data")]) if show_bar else contextlib.nullcontext()):
            if config.workers > 1:
                pool = _make_pool(config)
            pending: collections.deque = collections.deque()
            max_pending = 4 * config.workers

            def consume() -> None:
                nonlocal next_log
                result, refs, extras = pending.popleft()
                chunk = result.get()
                writer.add_chunk(chunk, [values for values, status in zip(extras, chunk.status) if status == 0])
                stats.add(chunk, refs)
                bar.update(len(chunk.status))
                if stats.rows >= next_log:
                    logger.info(_progress_line(stats, time.perf_counter() - process_start))
                    next_log = (stats.rows // config.log_interval + 1) * config.log_interval

            # Chunks no larger than the log interval, so that progress lines come as often as asked.
            chunk_size = min(config.chunk_size, config.log_interval)
            for rows, refs, extras in _iter_chunks(sources, handler, selection, chunk_size):
                if pool is not None:
                    pending.append((pool.apply_async(_encode_rows, (rows,)), refs, extras))
                else:
                    pending.append((_Done(_encode_rows(rows)), refs, extras))
                while len(pending) > max_pending or (pool is None and pending):
                    consume()
            while pending:
                consume()
            if pool is not None:
                pool.close()
                pool.join()
                pool = None
            if stats.documents == 0:
                reasons = ", ".join(f"{k}={v}" for k, v in stats.skipped_dict().items() if v) or "no rows"
                raise DataError(f"no document written: all {stats.rows} rows were skipped ({reasons})")
            meta = _build_meta(config, handler, template, tokenizer, sources, stats, outputs)
            datasets = writer.commit(meta)
        finished = True
    finally:
        _WORKER = None
        if pool is not None:
            pool.terminate()
            pool.join()
        if not finished:
            remove_empty_directories(new_dirs)
    now = time.perf_counter()
    process_s, elapsed = now - process_start, now - started
    skipped = stats.skipped_dict()
    logger.info("done: " + _progress_line(stats, process_s))
    logger.info("wrote %d documents (%d tokens) to %s_*_document.{bin,idx} and %s; skipped: %s; total %.1f s",
                stats.documents, stats.tokens, config.output_prefix, meta_path(config.output_prefix),
                ", ".join(f"{k}={v}" for k, v in skipped.items()), elapsed)
    return PreprocessResult(rows=stats.rows, documents=stats.documents, skipped=skipped, tokens=stats.tokens,
                            elapsed_s=elapsed, process_s=process_s, datasets=datasets,
                            meta_path=meta_path(config.output_prefix), meta=meta)




def _build_meta(config: PreprocessConfig, handler: DatasetHandler, template, tokenizer,
                sources: Sequence[InputFile], stats: _Stats, outputs) -> dict:
    """The ``<prefix>_meta.json`` content; deterministic (no timings), so reruns give identical files."""
    ids = tokenizer.describe_ids()
    lengths = {}
    for name, (low, high, total) in stats.length.items():
        lengths[name] = {"min": low, "max": high, "mean": round(total / max(stats.documents, 1), 3)}
    prefix_name = os.path.basename(config.output_prefix)
    return {
        "format_version": META_FORMAT_VERSION,
        "handler": handler.name,
        "prompt_type": config.prompt_type,
        "end_of_turn": template.end_of_turn,
        "system_prompt": config.system_prompt,
        "tokenizer": {"type": config.tokenizer_type, "name_or_path": config.tokenizer_spec.describe(), **ids},
        **ids,
        "input_files": [os.path.abspath(s.path) for s in sources],
        "columns": handler.columns,
        "extra_columns": handler.extra_columns,
        "extra_file": f"{prefix_name}_extra.parquet" if handler.extra_columns else None,
        "seq_length": config.seq_length,
        "max_samples": config.max_samples,
        "seed": config.seed,
        "rows": stats.rows,
        "documents": stats.documents,
        "skipped": stats.skipped_dict(),
        "skipped_examples": {reason: [f"{sources[f].path} row {r}" for f, r in refs]
                             for reason, refs in stats.examples.items() if refs},
        "tokens": stats.tokens,
        "lengths": lengths,
        "datasets": {o.name: {"prefix": f"{prefix_name}_{o.name}_document", "kind": o.kind,
                              "dtype": np.dtype(numpy_dtype(o.kind, tokenizer.vocab_size)).name}
                     for o in outputs},
    }


# ---------------------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """The ``preprocess_data.py`` argument parser (MindSpeed-LLM flag names, generated from
    :class:`PreprocessConfig`)."""
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Template and tokenize prompts (or preference pairs) into Megatron indexed datasets.")
    add_dataclass_args(parser, PreprocessConfig, "preprocessing")
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    package_logger = logging.getLogger("posttrain.data")
    if not any(isinstance(h, _StderrHandler) for h in package_logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """Turn parsed flags into a :class:`PreprocessConfig`.

    Raises:
        DataError: see :class:`PreprocessConfig` (bad ``--map-keys``, a numeric flag out of range, ...).
    """
    return dataclass_from_args(PreprocessConfig, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of ``preprocess_data.py``.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 1 data/option error (``error: ...`` printed on stderr), 130 interrupted.
        A malformed command line exits with status 2 from argparse.
    """
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        run_preprocess(config_from_args(args))
    except (InputError, OSError) as exc:  # the user's data or options, a permission or a full disk: one line
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no dataset written", file=sys.stderr)
        return 130
    return 0
