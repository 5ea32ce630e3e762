"""Input files for preprocessing: finding them (``--input``) and reading their rows in column batches.

``--input`` is a file, a directory (its ``*.parquet``, ``*.json`` and ``*.jsonl`` files, sorted by name, not
recursive) or a glob pattern (matches sorted). Files are read in that order, rows in file order.

* Parquet is read with ``pyarrow.parquet`` in record batches, only the needed columns.
* ``.jsonl`` holds one JSON object per line (blank lines ignored).
* ``.json`` holds a JSON array of objects, or JSON lines.

Rows are numbered from 0 within each file (blank JSONL lines not counted); error messages say ``<file> row <n>``.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from posttrain.data.errors import DataError

SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".json")


def discover_inputs(spec: str) -> list[str]:
    """Resolve ``--input`` to the list of files to read, in reading order.

    Args:
        spec: a file, a directory or a glob pattern.

    Returns:
        Paths of the input files (at least one).

    Raises:
        DataError: nothing matches, a named file has an unsupported suffix, or a directory holds no input file.
    """
    if os.path.isdir(spec):
        files = sorted(os.path.join(spec, name) for name in os.listdir(spec)
                       if name.endswith(SUPPORTED_SUFFIXES) and not name.startswith(".")
                       and os.path.isfile(os.path.join(spec, name)))
        if not files:
            raise DataError(f"--input {spec}: the directory holds no {', '.join(SUPPORTED_SUFFIXES)} file")
        return files
    if os.path.isfile(spec):
        files = [spec]
    elif glob.has_magic(spec):
        files = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
        if not files:
            raise DataError(f"--input {spec}: the pattern matches no file")
    else:
        raise DataError(f"--input {spec}: no such file or directory")
    for path in files:
        if not path.endswith(SUPPORTED_SUFFIXES):
            raise DataError(f"--input {path}: unsupported file type (expected {', '.join(SUPPORTED_SUFFIXES)})")
    return files


@dataclass
class ColumnBatch:
    """A batch of rows of one file.

    Attributes:
        path: the file.
        start: index (from 0) of the batch's first row in the file.
        columns: column name -> list of cell values (Python objects; None for null); a column absent from the
            file is absent here. For JSON rows that lack a key, the value is the :data:`MISSING` marker.
        num_rows: number of rows.
        row_numbers: the file row number of each row when the batch is a selection of rows (None: consecutive
            rows from ``start``).
    """

    path: str
    start: int
    columns: dict[str, list[Any]]
    num_rows: int
    row_numbers: Sequence[int] | None = None

    def row(self, i: int) -> int:
        """File row number (from 0) of the batch's row ``i``."""
        return self.start + i if self.row_numbers is None else int(self.row_numbers[i])

    def select(self, positions: Sequence[int]) -> "ColumnBatch":
        """The rows at ``positions`` (indices into this batch, increasing), keeping their file row numbers."""
        columns = {name: [values[i] for i in positions] for name, values in self.columns.items()}
        return ColumnBatch(self.path, self.row(positions[0]) if len(positions) else self.start, columns,
                           len(positions), [self.row(i) for i in positions])


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""Marker for a key absent from one JSON row (distinct from an explicit null)."""


@dataclass
class InputFile:
    """One input file, opened: its row count and columns are known before reading.

    Attributes:
        path: the file.
        num_rows: number of rows.
        columns: the columns (parquet schema names; for JSON, every key seen in any row).
    """

    path: str
    num_rows: int
    columns: list[str]
    _rows: list[dict] | None = field(default=None, repr=False)

    def batches(self, wanted: Sequence[str], batch_size: int = 4096) -> Iterator[ColumnBatch]:
        """Yield the file's rows in order, in batches, restricted to the ``wanted`` columns that exist.

        Raises:
            DataError: the file cannot be read.
        """
        present = [c for c in wanted if c in self.columns]
        if self._rows is None:
            yield from self._parquet_batches(present, batch_size)
            return
        rows = self._rows
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            yield ColumnBatch(self.path, start, {c: [r.get(c, MISSING) for r in chunk] for c in present}, len(chunk))

    def _parquet_batches(self, present: list[str], batch_size: int) -> Iterator[ColumnBatch]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        start = 0
        try:
            parquet = pq.ParquetFile(self.path)
            for record_batch in parquet.iter_batches(batch_size=batch_size, columns=present):
                columns = {name: record_batch.column(name).to_pylist() for name in present}
                yield ColumnBatch(self.path, start, columns, record_batch.num_rows)
                start += record_batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{self.path}: cannot read parquet data near row {start} ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def open_input(path: str) -> InputFile:
    """Open one input file: read its schema (parquet) or parse it (JSON, JSON lines).

    Raises:
        DataError: unreadable or corrupt file, invalid JSON (with the line), or rows that are not objects.
    """
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
            return InputFile(path, parquet.metadata.num_rows, list(parquet.schema_arrow.names))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None
    try:
        with open(path, "r", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({_first_line(exc)})") from None
    rows = None
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of objects")
    if rows is None:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: invalid JSON on line {lineno} ({exc.msg})") from None
    keys: dict[str, None] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {index}: expected a JSON object, got {type(row).__name__}")
        keys.update(dict.fromkeys(row))
    return InputFile(path, len(rows), list(keys), _rows=rows)
