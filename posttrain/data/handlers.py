"""Dataset handlers (``--handler-name``): which columns a row has and which indexed datasets it becomes.

A handler runs in two places. In the main process, :meth:`DatasetHandler.extract` pulls its fields out of a
batch of input rows and checks their types (a wrong type is a :class:`~posttrain.data.errors.DataError` naming the
file, row and column). In the worker processes, :meth:`DatasetHandler.encode` templates and tokenizes a chunk of
those rows and returns flat arrays per output dataset, plus a status per row: written, or skipped with a reason
(counted, never fatal).

Registered handlers:

* ``PPOAlpacaStyleInstructionHandler``: PPO prompts. Fields ``prompt`` (default column ``instruction``),
  ``query`` (``input``, optional) and ``system`` (no default column). The prompt text is
  ``instruction``, followed by ``"\\n" + input`` when ``input`` is a non-empty string. Outputs
  ``packed_input_ids`` (the templated prompt's ids, ending where the reply begins) and ``packed_attention_mask``
  (ones, same length), one document per prompt.
* ``AlpacaStylePairwiseHandler``: preference pairs for reward-model training. Fields ``prompt``, ``chosen``,
  ``rejected`` (required), ``history`` (optional: earlier turns as a JSON list of ``[role, text]`` pairs, roles
  ``human``/``user``, ``gpt``/``assistant``, or ``system`` first), ``margin`` and ``system`` (no default column).
  Outputs ``chosen_input_ids`` and ``rejected_input_ids`` (prompt ids followed by the response's ids, the response
  being ``text + end_of_turn`` encoded on its own), ``prompt_length`` (one int32 per pair, the number of leading
  prompt ids shared by both sequences) and, when a margin column is mapped, ``margin`` (one float32 per pair).

The system prompt of a row is its ``system`` column when that is non-empty, else (pairwise) a ``system`` turn at
the start of ``history``, else ``--system-prompt`` when given ("" meaning none), else the template's default.

Extra columns (``--extra-columns``, PPO prompts only): input columns kept as they are, one value per written
prompt, for a ``--reward-function`` that needs them (a reference answer, a data source). The handler checks that
every file has them and pulls them out of each row (:meth:`DatasetHandler.extract_extras`); they never reach the
template or the tokenizer. :mod:`posttrain.data.writer` stores them beside the token datasets.
"""
from __future__ import annotations

import itertools
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from posttrain.data.errors import DataError
from posttrain.data.sources import MISSING, ColumnBatch, InputFile


@dataclass(frozen=True)
class FieldSpec:
    """One logical field of a handler.

    Attributes:
        key: the name used in ``--map-keys``.
        default_column: the column read when ``--map-keys`` does not name one (None: not read unless mapped).
        required: whether a file without the column is an error (a mapped column is always required).
        kind: ``"text"`` (string), ``"history"`` (list of turns) or ``"number"``.
    """

    key: str
    default_column: str | None
    required: bool
    kind: str = "text"


@dataclass(frozen=True)
class OutputSpec:
    """One indexed dataset a handler writes, ``<prefix>_<name>_document.{bin,idx}``.

    Attributes:
        name: dataset name between the prefix and ``_document``.
        kind: ``"token"`` (token ids, dtype chosen from the vocabulary size), ``"mask"`` (uint8),
            ``"int32"`` or ``"float32"``.
    """

    name: str
    kind: str


@dataclass
class EncodedChunk:
    """The result of encoding a chunk of ``n`` rows.

    Attributes:
        status: int8 ``[n]``; 0 for a written row, ``k > 0`` for a row skipped for reason
            ``handler.skip_reasons[k - 1]``.
        arrays: output name -> ``(values, lengths)``: the written rows' items concatenated (1-D) and the item count
            of each written row (int64 ``[n_written]``), in row order.
    """

    status: np.ndarray
    arrays: dict[str, tuple[np.ndarray, np.ndarray]]


def _flatten(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
               "bot": "assistant", "system": "system"}


class DatasetHandler(ABC):
    """Base class of the handlers.

    Args:
        map_keys: ``--map-keys``, field key -> column name; keys not given use the defaults.
        system_prompt: ``--system-prompt``; None keeps the template's default system prompt, "" removes it.
        extra_columns: ``--extra-columns``, input columns kept as they are beside each written row (only for
            handlers whose :attr:`keeps_extra_columns` is true).

    Raises:
        DataError: ``map_keys`` names an unknown field or maps it to something other than a column name;
            ``extra_columns`` given to a handler that does not keep them, empty or repeated.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    fields: ClassVar[tuple[FieldSpec, ...]]
    skip_reasons: ClassVar[tuple[str, ...]]
    keeps_extra_columns: ClassVar[bool] = False
    """Whether ``--extra-columns`` is accepted (the training side reads them for this handler's datasets)."""

    def __init__(self, map_keys: Mapping[str, str] | None = None, system_prompt: str | None = None,
                 extra_columns: Sequence[str] = ()) -> None:
        map_keys = dict(map_keys or {})
        known = {f.key for f in self.fields}
        unknown = sorted(set(map_keys) - known)
        if unknown:
            raise DataError(f"--map-keys: unknown key(s) {', '.join(map(repr, unknown))} for {self.name}; "
                            f"valid keys: {', '.join(f.key for f in self.fields)}")
        for key, column in map_keys.items():
            if not isinstance(column, str) or not column:
                raise DataError(f"--map-keys: the column for {key!r} must be a non-empty string, got {_short(column)}")
        self.columns: dict[str, str | None] = {}
        self.required: dict[str, bool] = {}
        for spec in self.fields:
            self.columns[spec.key] = map_keys.get(spec.key, spec.default_column)
            self.required[spec.key] = spec.required or spec.key in map_keys
        self.system_prompt = system_prompt
        extra_columns = list(extra_columns or ())
        if extra_columns and not self.keeps_extra_columns:
            keepers = ", ".join(sorted(n for n, h in _HANDLERS.items() if h.keeps_extra_columns))
            raise DataError(f"--extra-columns: {self.name} does not keep extra columns (only {keepers} does)")
        for column in extra_columns:
            if not isinstance(column, str) or not column:
                raise DataError(f"--extra-columns: column names must be non-empty strings, got {_short(column)}")
        repeated = sorted({c for c in extra_columns if extra_columns.count(c) > 1})
        if repeated:
            raise DataError(f"--extra-columns: {', '.join(map(repr, repeated))} given more than once")
        self.extra_columns: list[str] = extra_columns

    @property
    def wanted_columns(self) -> list[str]:
        """The input columns this handler reads (deduplicated, fields first, then extra columns)."""
        return list(dict.fromkeys([*(c for c in self.columns.values() if c is not None), *self.extra_columns]))

    def check_columns(self, source: InputFile) -> None:
        """Check that ``source`` has every required column.

        Raises:
            DataError: names the missing column, the field it serves and the file, and lists the columns present.
        """
        for key, column in self.columns.items():
            if column is not None and self.required[key] and column not in source.columns:
                present = ", ".join(source.columns) or "none"
                raise DataError(f"{source.path}: missing column {column!r} (field {key!r}; set another with "
                                f"--map-keys); columns present: {present}")
        for column in self.extra_columns:
            if column not in source.columns:
                present = ", ".join(source.columns) or "none"
                raise DataError(f"{source.path}: missing column {column!r} (--extra-columns); columns present: "
                                f"{present}")

    @abstractmethod
    def outputs(self) -> list[OutputSpec]:
        """The datasets written, the first being the primary one (its ``.idx`` is renamed last)."""

    def extract(self, batch: ColumnBatch) -> list[tuple]:
        """Pull this handler's fields out of ``batch``, type-checked, in :attr:`fields` order.

        Returns:
            One tuple per row: str/None for text fields, a tuple of ``(role, text)`` turns for history, a float for
            numbers (None when the cell is null).

        Raises:
            DataError: a cell of the wrong type, naming the file, row and column.
        """
        per_field = []
        for spec in self.fields:
            column = self.columns[spec.key]
            values = batch.columns.get(column) if column is not None else None
            if values is None:
                per_field.append(itertools.repeat(None, batch.num_rows))
                continue
            if spec.kind == "text" and all(type(v) is str for v in values):
                per_field.append(values)  # the common case, checked in one pass
                continue
            convert = {"text": self._text, "history": self._history, "number": self._number}[spec.kind]
            per_field.append([convert(v, batch, i, column, self.required[spec.key]) for i, v in enumerate(values)])
        return list(zip(*per_field)) if per_field else [()] * batch.num_rows

    def extract_extras(self, batch: ColumnBatch) -> list[tuple]:
        """The :attr:`extra_columns` of every row of ``batch``, unchanged (None for null).

        Returns:
            One tuple per row, values in :attr:`extra_columns` order (empty tuples without extra columns).

        Raises:
            DataError: a JSON row lacks one of the columns (names the file, row and column).
        """
        if not self.extra_columns:
            return [()] * batch.num_rows
        per_column = [batch.columns[c] for c in self.extra_columns]
        for column, values in zip(self.extra_columns, per_column):
            for i, value in enumerate(values):
                if value is MISSING:
                    raise DataError(f"{batch.path} row {batch.row(i)}: missing column {column!r} (--extra-columns)")
        return list(zip(*per_column))

    @staticmethod
    def _missing(value: Any, batch: ColumnBatch, i: int, column: str, required: bool) -> bool:
        if value is MISSING:
            if required:
                raise DataError(f"{batch.path} row {batch.row(i)}: missing column {column!r}")
            return True
        return value is None

    def _text(self, value: Any, batch: ColumnBatch, i: int, column: str, required: bool) -> str | None:
        if type(value) is str:
            return value
        if self._missing(value, batch, i, column, required):
            return None
        raise DataError(f"{batch.path} row {batch.row(i)}: column {column!r} holds "
                        f"{type(value).__name__} {_short(value)}, expected a string")

    def _number(self, value: Any, batch: ColumnBatch, i: int, column: str, required: bool) -> float | None:
        if self._missing(value, batch, i, column, required):
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise DataError(f"{batch.path} row {batch.row(i)}: column {column!r} holds "
                        f"{type(value).__name__} {_short(value)}, expected a number")

    def _history(self, value: Any, batch: ColumnBatch, i: int, column: str, required: bool) -> tuple:
        where = f"{batch.path} row {batch.row(i)}: column {column!r}"
        if self._missing(value, batch, i, column, required):
            return ()
        if isinstance(value, str):
            if not value.strip():
                return ()
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(value, (list, tuple)):
            raise DataError(f"{where}: expected a list of [role, text] turns, got {type(value).__name__}")
        turns = []
        for turn in value:
            if isinstance(turn, dict):
                role, text = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
            elif isinstance(turn, (list, tuple)) and len(turn) == 2:
                role, text = turn
            else:
                raise DataError(f"{where}: expected [role, text] turns, got {_short(turn)}")
            if not isinstance(role, str) or role.lower() not in _ROLE_NAMES:
                raise DataError(f"{where}: unknown role {_short(role)} (expected one of "
                                f"{', '.join(sorted(_ROLE_NAMES))})")
            if not isinstance(text, str):
                raise DataError(f"{where}: turn text must be a string, got {type(text).__name__}")
            turns.append((_ROLE_NAMES[role.lower()], text))
        return tuple(turns)

    def system_messages(self, system: str | None) -> list[dict[str, str]]:
        """The leading system message for a row whose system column holds ``system`` (see the module docstring).

        An empty-content system message means "no system prompt, not even the template's default".
        """
        if system:
            return [{"role": "system", "content": system}]
        if self.system_prompt is not None:
            return [{"role": "system", "content": self.system_prompt}]
        return []

    @abstractmethod
    def encode(self, rows: Sequence[tuple], template, tokenizer, seq_length: int | None) -> EncodedChunk:
        """Template and tokenize rows produced by :meth:`extract`.

        Args:
            rows: ``n`` field tuples.
            template: the :class:`~posttrain.data.templates.BoundTemplate`.
            tokenizer: the :class:`~posttrain.data.tokenizer.TextTokenizer`.
            seq_length: rows whose sequence is at least this many tokens are skipped (None: no limit).

        Returns:
            The :class:`EncodedChunk` for the ``n`` rows.
        """


class PPOAlpacaStyleInstructionHandler(DatasetHandler):
    """PPO prompts from Alpaca-style rows (see the module docstring)."""

    name = "PPOAlpacaStyleInstructionHandler"
    description = "PPO prompts: instruction [+ '\\n' + input], templated up to the assistant's reply"
    fields = (FieldSpec("prompt", "instruction", True), FieldSpec("query", "input", False),
              FieldSpec("system", None, False))
    skip_reasons = ("empty_prompt", "too_long")
    keeps_extra_columns = True

    def outputs(self) -> list[OutputSpec]:
        return [OutputSpec("packed_input_ids", "token"), OutputSpec("packed_attention_mask", "mask")]

    def encode(self, rows: Sequence[tuple], template, tokenizer, seq_length: int | None) -> EncodedChunk:
        empty, too_long = 1, 2
        status = np.zeros(len(rows), dtype=np.int8)
        texts, index = [], []
        for i, (prompt, query, system) in enumerate(rows):
            text = prompt or ""
            if query:
                text = text + "\n" + query
            if not text.strip():
                status[i] = empty
                continue
            texts.append(template.render_prompt(self.system_messages(system) + [{"role": "user", "content": text}]))
            index.append(i)
        kept = []
        for i, ids in zip(index, tokenizer.encode_batch(texts)):
            if not ids:
                status[i] = empty
            elif seq_length is not None and len(ids) >= seq_length:
                status[i] = too_long
            else:
                kept.append(ids)
        flat, lengths = _flatten(kept)
        return EncodedChunk(status, {"packed_input_ids": (flat, lengths),
                                     "packed_attention_mask": (np.ones(flat.shape[0], dtype=np.uint8), lengths)})


class AlpacaStylePairwiseHandler(DatasetHandler):
    """Preference pairs (prompt, chosen, rejected[, history, margin, system]); see the module docstring."""

    name = "AlpacaStylePairwiseHandler"
    description = "preference pairs: prompt (+history) followed by the chosen / the rejected response"
    fields = (FieldSpec("prompt", "prompt", True), FieldSpec("chosen", "chosen", True),
              FieldSpec("rejected", "rejected", True), FieldSpec("history", "history", False, "history"),
              FieldSpec("margin", None, False, "number"), FieldSpec("system", None, False))
    skip_reasons = ("empty_prompt", "empty_response", "identical_responses", "bad_history", "too_long")

    def outputs(self) -> list[OutputSpec]:
        specs = [OutputSpec("chosen_input_ids", "token"), OutputSpec("rejected_input_ids", "token"),
                 OutputSpec("prompt_length", "int32")]
        if self.columns["margin"] is not None:
            specs.append(OutputSpec("margin", "float32"))
        return specs

    def conversation(self, prompt: str, history: Sequence[tuple[str, str]], system: str | None) -> list | None:
        """Messages for ``history`` + the ``prompt`` user turn, or None when the turns do not alternate
        user/assistant (a ``system`` turn is allowed only first)."""
        turns = list(history)
        if turns and turns[0][0] == "system":
            history_system = turns.pop(0)[1]
            messages = self.system_messages(system) if system else [{"role": "system", "content": history_system}]
        else:
            messages = self.system_messages(system)
        for k, (role, text) in enumerate(turns):
            if role != ("user" if k % 2 == 0 else "assistant"):
                return None
        if len(turns) % 2:
            return None
        return messages + [{"role": r, "content": t} for r, t in turns] + [{"role": "user", "content": prompt}]

    def encode(self, rows: Sequence[tuple], template, tokenizer, seq_length: int | None) -> EncodedChunk:
        reason = {name: k + 1 for k, name in enumerate(self.skip_reasons)}
        status = np.zeros(len(rows), dtype=np.int8)
        eot = template.end_of_turn
        prompts, chosens, rejecteds, margins, index = [], [], [], [], []
        for i, (prompt, chosen, rejected, history, margin, system) in enumerate(rows):
            if not prompt or not prompt.strip():
                status[i] = reason["empty_prompt"]
            elif not chosen or not chosen.strip() or not rejected or not rejected.strip():
                status[i] = reason["empty_response"]
            elif chosen.strip() == rejected.strip():
                status[i] = reason["identical_responses"]
            else:
                messages = self.conversation(prompt, history or (), system)
                if messages is None:
                    status[i] = reason["bad_history"]
                    continue
                prompts.append(template.render_prompt(messages))
                chosens.append(chosen + eot)
                rejecteds.append(rejected + eot)
                margins.append(0.0 if margin is None else margin)
                index.append(i)
        n = len(index)
        encoded = tokenizer.encode_batch(prompts + chosens + rejecteds)
        chosen_seqs, rejected_seqs, prompt_lengths, kept_margins = [], [], [], []
        for k, i in enumerate(index):
            p, c, r = encoded[k], encoded[n + k], encoded[2 * n + k]
            if seq_length is not None and max(len(p) + len(c), len(p) + len(r)) >= seq_length:
                status[i] = reason["too_long"]
                continue
            chosen_seqs.append(p + c)
            rejected_seqs.append(p + r)
            prompt_lengths.append(len(p))
            kept_margins.append(margins[k])
        ones = np.ones(len(chosen_seqs), dtype=np.int64)
        arrays = {"chosen_input_ids": _flatten(chosen_seqs), "rejected_input_ids": _flatten(rejected_seqs),
                  "prompt_length": (np.asarray(prompt_lengths, dtype=np.int32), ones)}
        if self.columns["margin"] is not None:
            arrays["margin"] = (np.asarray(kept_margins, dtype=np.float32), ones)
        return EncodedChunk(status, arrays)


_HANDLERS: dict[str, type[DatasetHandler]] = {}


def register_handler(cls: type[DatasetHandler]) -> type[DatasetHandler]:
    """Register a handler class under ``cls.name`` (usable as a decorator)."""
    _HANDLERS[cls.name] = cls
    return cls


def get_handler(name: str) -> type[DatasetHandler]:
    """The handler class registered as ``name``.

    Raises:
        DataError: unknown name; the message lists the valid ones.
    """
    try:
        return _HANDLERS[name]
    except KeyError:
        raise DataError(f"--handler-name {name!r} is unknown; valid handlers: " + ", ".join(sorted(_HANDLERS))) \
            from None


def handler_names() -> list[str]:
    """Names of all registered handlers, sorted."""
    return sorted(_HANDLERS)


register_handler(PPOAlpacaStyleInstructionHandler)
register_handler(AlpacaStylePairwiseHandler)
