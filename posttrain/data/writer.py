"""All-or-nothing writing of several Megatron indexed datasets that share one prefix, and of the extra columns kept
beside them.

The binary format is megatron-core's (:class:`megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`); this
module only decides names, dtypes and the order in which files appear:

1. every dataset is built under temporary names ``<name>.bin.tmp-<pid>`` / ``<name>.idx.tmp-<pid>``;
2. on :meth:`IndexedDatasetWriter.commit` the metadata file (and, with extra columns, ``<prefix>_extra.parquet``)
   is written the same way, any old ``.idx`` of these datasets is removed (and an old extra-columns file a run
   without extra columns would leave stale), then the ``.bin`` files, the extra-columns file, the metadata and
   finally the ``.idx`` files are renamed into place, the primary dataset's ``.idx`` last. A dataset only loads
   once its ``.idx`` exists, so a run that stops at any point never leaves a dataset that loads with the wrong
   content;
3. on any error (or Ctrl-C) :meth:`IndexedDatasetWriter.abort` deletes the temporary files, so a failed run leaves
   no ``.bin``/``.idx`` behind. A run killed outright (``kill -9``) cannot; the next run writing to the same prefix
   removes what it left (:func:`remove_stale_temporary_outputs`).

:func:`missing_directories`, :func:`make_directories` and :func:`remove_empty_directories` create the missing
directories of ``--output-prefix`` for a run and remove them again when it fails.

Extra columns (``--extra-columns``) are one parquet table, ``<prefix>_extra.parquet``, with one row per document in
document order and one column per extra column, the values as read (strings, numbers, lists, ...; null stays
null). They are held in memory until the commit, which writes them with ``pyarrow.parquet``.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import resource
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from posttrain.atomic import remove_stale_temporary_files
from posttrain.data.errors import DataError
from posttrain.data.handlers import EncodedChunk, OutputSpec
from posttrain.environment import silence_known_warnings

logger = logging.getLogger("posttrain.data.writer")


def indexed_dataset_module():
    """Import ``megatron.core.datasets.indexed_dataset`` without megatron's warnings about optional GPU libraries."""
    with warnings.catch_warnings():
        silence_known_warnings()
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def dataset_prefix(prefix: str, name: str) -> str:
    """Path prefix (without ``.bin``/``.idx``) of dataset ``name``: ``<prefix>_<name>_document``."""
    return f"{prefix}_{name}_document"


def meta_path(prefix: str) -> str:
    """Path of the metadata file written beside the datasets: ``<prefix>_meta.json``."""
    return f"{prefix}_meta.json"


def extra_path(prefix: str) -> str:
    """Path of the extra columns kept beside the datasets (``--extra-columns``): ``<prefix>_extra.parquet``."""
    return f"{prefix}_extra.parquet"


def missing_directories(prefix: str) -> list[str]:
    """The directories of ``--output-prefix`` that do not exist yet, outermost first.

    Raises:
        DataError: an existing part of the path is not a directory.
    """
    directory = os.path.dirname(os.path.abspath(prefix))
    missing = []
    while not os.path.exists(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    if not os.path.isdir(directory):
        raise DataError(f"--output-prefix {prefix}: {directory} is not a directory")
    return missing[::-1]


def make_directories(directories: Sequence[str], prefix: str) -> None:
    """Create ``directories`` (outermost first).

    Raises:
        DataError: one cannot be created (permissions, a file in the way).
    """
    for directory in directories:
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise DataError(f"--output-prefix {prefix}: {directory} is not a directory") from None
        except OSError as exc:
            raise DataError(f"--output-prefix {prefix}: cannot create {directory} ({exc.strerror or exc})") from None


def remove_empty_directories(directories: Sequence[str]) -> None:
    """Remove the directories a failed run created (innermost first), as long as they are empty."""
    for directory in reversed(directories):
        try:
            os.rmdir(directory)
        except OSError:
            return


def numpy_dtype(kind: str, vocab_size: int) -> type:
    """The on-disk dtype of an output kind.

    Token ids use megatron's ``DType.optimal_dtype(vocab_size)``: uint16 below 65,500 ids, else int32.
    Masks are uint8, ``int32`` and ``float32`` are themselves.
    """
    if kind == "token":
        return indexed_dataset_module().DType.optimal_dtype(vocab_size)
    return {"mask": np.uint8, "int32": np.int32, "float32": np.float32}[kind]


def remove_stale_temporary_outputs(prefix: str, outputs: Sequence[OutputSpec]) -> list[Path]:
    """Remove the temporary files (``<dataset>.bin.tmp-<pid>``, ``<dataset>.idx.tmp-<pid>``,
    ``<prefix>_meta.json.tmp-<pid>``) that earlier runs writing ``outputs`` to ``prefix`` left when they were killed.

    A file is removed only when no process ``<pid>`` runs on this host; files of other prefixes or datasets are
    not touched. (On a file system shared between hosts, two runs writing one prefix at the same time conflict
    anyway: their outputs replace each other.)

    Returns:
        The removed paths.
    """
    names = {meta_path(prefix)} | {dataset_prefix(prefix, o.name) + ext for o in outputs for ext in (".bin", ".idx")}
    candidates = [Path(path) for path in glob.glob(glob.escape(prefix) + "_*.tmp-*")
                  if path.rsplit(".tmp-", 1)[0] in names]
    return remove_stale_temporary_files(candidates)


class IndexedDatasetWriter:
    """Builds the output datasets of one preprocessing run, one document per written row.

    Args:
        prefix: ``--output-prefix``; datasets go to ``<prefix>_<name>_document.{bin,idx}``.
        outputs: the datasets, primary first (see :class:`~posttrain.data.handlers.OutputSpec`).
        vocab_size: number of token ids; picks the token dtype and bounds the ids written.
        extra_columns: names of the extra columns (``--extra-columns``) that :meth:`add_chunk` receives per
            document and :meth:`commit` writes to ``<prefix>_extra.parquet`` (none: no such file).

    Raises:
        DataError: the output directory does not exist or is not writable.

    Temporary files that killed runs left for the same prefix are removed first
    (:func:`remove_stale_temporary_outputs`).
    """

    def __init__(self, prefix: str, outputs: Sequence[OutputSpec], vocab_size: int,
                 extra_columns: Sequence[str] = ()) -> None:
        directory = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(directory):
            raise DataError(f"--output-prefix {prefix}: the directory {directory} does not exist")
        for path in remove_stale_temporary_outputs(prefix, outputs):
            logger.info("removed %s (left by a run that was killed)", path)
        module = indexed_dataset_module()
        self.prefix = prefix
        self.outputs = list(outputs)
        self.vocab_size = vocab_size
        self.dtypes = {o.name: numpy_dtype(o.kind, vocab_size) for o in self.outputs}
        self.documents = 0
        suffix = f".tmp-{os.getpid()}"
        self._final = {o.name: dataset_prefix(prefix, o.name) for o in self.outputs}
        self._tmp_bin = {n: p + ".bin" + suffix for n, p in self._final.items()}
        self._tmp_idx = {n: p + ".idx" + suffix for n, p in self._final.items()}
        self._tmp_meta = meta_path(prefix) + suffix
        self.extra_columns = list(extra_columns)
        self._extras: dict[str, list] = {name: [] for name in self.extra_columns}
        self._tmp_extra = extra_path(prefix) + suffix
        self._builders = {}
        self._moved: list[str] = []
        self._done = False
        try:
            for o in self.outputs:
                self._builders[o.name] = module.IndexedDatasetBuilder(self._tmp_bin[o.name], dtype=self.dtypes[o.name])
        except OSError as exc:
            self.abort()
            raise DataError(f"--output-prefix {prefix}: cannot write ({exc.strerror or exc})") from None

    def add_chunk(self, chunk: EncodedChunk, extras: Sequence[tuple] = ()) -> int:
        """Append the written rows of ``chunk``, one document each, in order.

        Args:
            chunk: the encoded rows.
            extras: with extra columns, one tuple of their values (in ``extra_columns`` order) per **written** row
                of ``chunk``, in row order.

        Returns:
            The number of documents added.

        Raises:
            DataError: a token id outside ``[0, vocab_size)`` (the tokenizer and the vocabulary size disagree), or
                the output cannot be written (full disk, file-size limit; the temporary files are removed).
            ValueError: ``extras`` does not hold one tuple per written row (a caller's bug).
        """
        try:
            return self._add_chunk(chunk, extras)
        except OSError as exc:
            raise self._write_failure(exc) from None

    def _add_chunk(self, chunk: EncodedChunk, extras: Sequence[tuple]) -> int:
        import torch

        added = None
        for o in self.outputs:
            values, lengths = chunk.arrays[o.name]
            if added is None:
                added = len(lengths)
            if o.kind == "token" and values.size and (values.min() < 0 or values.max() >= self.vocab_size):
                raise DataError(f"token id {int(values.max())} outside the vocabulary of {self.vocab_size} ids")
            builder = self._builders[o.name]
            add_item, end_document = builder.add_item, builder.end_document
            for item in torch.from_numpy(np.ascontiguousarray(values)).split(lengths.tolist()):
                add_item(item)
                end_document()
        if self.extra_columns:
            if len(extras) != (added or 0):
                raise ValueError(f"{len(extras)} rows of extra columns for {added or 0} documents")
            for name, values in zip(self.extra_columns, zip(*extras) if extras else [()] * len(self.extra_columns)):
                self._extras[name].extend(values)
        self.documents += added or 0
        return added or 0

    def _write_extras(self) -> None:
        """Write the extra columns to the temporary ``<prefix>_extra.parquet`` (one row per document).

        Raises:
            DataError: a column whose values have no common type (e.g. numbers in some rows, text in others).
        """
        import pyarrow as pa  # heavy: imported only when extra columns are kept
        import pyarrow.parquet as pq

        arrays = []
        for name in self.extra_columns:
            try:
                arrays.append(pa.array(self._extras[name]))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                kinds = sorted({type(v).__name__ for v in self._extras[name] if v is not None})
                raise DataError(f"--extra-columns: column {name!r} mixes values of types {', '.join(kinds)} "
                                f"that cannot be stored together ({str(exc).splitlines()[0]})") from None
        pq.write_table(pa.table(arrays, names=self.extra_columns), self._tmp_extra)

    def commit(self, meta: dict) -> dict[str, str]:
        """Finalize every dataset, write ``meta`` as ``<prefix>_meta.json``, and move everything into place.

        Returns:
            Output name -> final path prefix of its dataset.

        Raises:
            DataError: a dataset does not load back with the expected number of documents, or the output cannot
                be written (full disk, file-size limit); nothing is left behind.
        """
        module = indexed_dataset_module()
        try:
            for o in self.outputs:
                self._builders[o.name].finalize(self._tmp_idx[o.name])
            if self.extra_columns:
                self._write_extras()
            with open(self._tmp_meta, "w", encoding="utf-8") as handle:
                json.dump(meta, handle, indent=2, sort_keys=True)
                handle.write("\n")
            for name in self._final:
                if os.path.exists(self._final[name] + ".idx"):
                    os.remove(self._final[name] + ".idx")
            if not self.extra_columns and os.path.exists(extra_path(self.prefix)):
                os.remove(extra_path(self.prefix))  # a previous run's extra columns would not match these rows
            moves = [(self._tmp_bin[name], self._final[name] + ".bin") for name in self._final]
            if self.extra_columns:
                moves.append((self._tmp_extra, extra_path(self.prefix)))
            moves.append((self._tmp_meta, meta_path(self.prefix)))
            moves += [(self._tmp_idx[o.name], self._final[o.name] + ".idx") for o in reversed(self.outputs)]
            for source, target in moves:
                os.replace(source, target)
                self._moved.append(target)
            self._done = True
        except OSError as exc:
            raise self._write_failure(exc) from None
        except BaseException:
            self.abort()
            raise
        for name, path in self._final.items():
            dataset = module.IndexedDataset(path)
            if len(dataset) != self.documents or len(dataset.document_indices) != self.documents + 1:
                del dataset
                self.abort()
                raise DataError(f"{path}: wrote {self.documents} documents but {len(dataset)} load back")
        if self.extra_columns:
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(extra_path(self.prefix)).metadata.num_rows
            if rows != self.documents:
                self.abort()
                raise DataError(f"{extra_path(self.prefix)}: wrote {self.documents} rows but {rows} load back")
        return dict(self._final)

    def _write_failure(self, exc: OSError) -> DataError:
        """Remove every file of this run and describe why writing failed, in one line naming the output."""
        self.abort()
        if exc.errno == errno.ENOSPC:
            reason = "no space left on device (ENOSPC)"
        elif exc.errno == errno.EFBIG:
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            reason = (f"file size limit of {limit} bytes (RLIMIT_FSIZE, ulimit -f) exceeded (EFBIG)"
                      if limit != resource.RLIM_INFINITY else "file too large for the file system (EFBIG)")
        else:
            reason = exc.strerror or str(exc)
        return DataError(f"--output-prefix {self.prefix}: cannot write ({reason}); no dataset was written")

    def abort(self) -> None:
        """Close and delete every temporary file, and any file a failed :meth:`commit` already moved into place."""
        for builder in self._builders.values():
            try:
                builder.data_file.close()
            except Exception:
                pass
        moved_idx = [p for p in self._moved if p.endswith(".idx")]
        leftovers = [*moved_idx, *self._tmp_idx.values(), *self._tmp_bin.values(), self._tmp_meta, self._tmp_extra,
                     *self._moved]
        for path in dict.fromkeys(leftovers):
            if os.path.exists(path):
                os.remove(path)
        self._moved.clear()

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._done:
            self.abort()
