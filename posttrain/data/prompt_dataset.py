"""Training-side readers of the preprocessed datasets, and the data-parallel prompt sampler.

* :class:`PromptDataset` reads ``<prefix>_packed_input_ids_document`` (PPO prompts): item ``i`` is the 1-D int64
  tensor of prompt ``i``'s token ids, ending where the assistant's reply begins.
* :class:`PairwiseDataset` reads the preference-pair datasets: item ``i`` is a :class:`PreferencePair`.
* :class:`PromptSampler` decides which prompts each data-parallel rank takes at each iteration:

  - epoch ``e`` visits the dataset in the order ``numpy.random.default_rng([seed, e]).permutation(N)``
    (``range(N)`` when ``shuffle=False``): the same order on every rank and on every run;
  - an iteration takes the next ``global_batch_size`` (``G``) indices of that order; an epoch has ``N // G``
    iterations, the ``N % G`` indices left at the end of an order are not used in that epoch (they are
    different ones each epoch);
  - rank ``r`` of ``dp_size`` takes positions ``[r * G / dp_size, (r + 1) * G / dp_size)`` of the global batch,
    so ranks get disjoint, equal-size slices, and the global batch of an iteration does not depend on
    ``dp_size``;
  - the position (epoch, samples consumed in the epoch) is saved by :meth:`PromptSampler.state_dict` and restored
    by :meth:`PromptSampler.load_state_dict`; resuming gives exactly the batches an uninterrupted run would have.

The metadata file ``<prefix>_meta.json`` written beside the datasets gives the special ids
(``eos_token_id``, ``pad_token_id``, ``bos_token_id``; pad is EOS when the tokenizer has none) and the extra columns
kept at preprocessing (``extra_columns``, stored in ``<prefix>_extra.parquet``, one row per prompt). Datasets
written by other tools without that file still load; those ids are then None and there are no extra columns.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Sequence

import numpy as np
import torch

from posttrain.data.errors import DatasetFormatError, DatasetNotFoundError
from posttrain.data.writer import dataset_prefix, extra_path, indexed_dataset_module, meta_path

PROMPT_IDS = "packed_input_ids"
PROMPT_MASK = "packed_attention_mask"
CHOSEN_IDS = "chosen_input_ids"
REJECTED_IDS = "rejected_input_ids"
PROMPT_LENGTH = "prompt_length"
MARGIN = "margin"


def _base_prefix(prefix: str, names: Sequence[str]) -> str:
    """Accept either the ``--output-prefix`` or the path prefix of one of its datasets."""
    prefix = str(prefix)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    for name in names:
        tail = f"_{name}_document"
        if prefix.endswith(tail):
            return prefix[: -len(tail)]
    return prefix


def _open(prefix: str, name: str, required: bool = True):
    path = dataset_prefix(prefix, name)
    module = indexed_dataset_module()
    if not module.IndexedDataset.exists(path):
        if not required:
            return None
        raise DatasetNotFoundError(f"{path}.bin / {path}.idx not found (run preprocess_data.py with "
                                f"--output-prefix {prefix})")
    dataset = module.IndexedDataset(path)
    if len(dataset.document_indices) != len(dataset) + 1:
        raise DatasetFormatError(f"{path}: expected one sequence per document, found {len(dataset)} sequences in "
                         f"{len(dataset.document_indices) - 1} documents")
    return dataset


def _read_meta(prefix: str) -> dict | None:
    path = meta_path(prefix)
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


class _MetaMixin:
    meta: dict | None

    @property
    def eos_token_id(self) -> int | None:
        """End-of-sequence id from the metadata file (None without one)."""
        return (self.meta or {}).get("eos_token_id")

    @property
    def pad_token_id(self) -> int | None:
        """Padding id from the metadata file (EOS when the tokenizer has no pad token; None without a file)."""
        return (self.meta or {}).get("pad_token_id")

    @property
    def bos_token_id(self) -> int | None:
        """Beginning-of-sequence id from the metadata file (None without one or when the tokenizer has none)."""
        return (self.meta or {}).get("bos_token_id")


class PromptDataset(torch.utils.data.Dataset, _MetaMixin):
    """The PPO prompts of one preprocessing run.

    Args:
        prefix: the ``--output-prefix`` used when preprocessing (the path prefix of
            ``<prefix>_packed_input_ids_document`` is accepted too).

    Attributes:
        meta: content of ``<prefix>_meta.json``, or None when the file is absent.
        extra_columns: the columns kept with ``preprocess_data.py --extra-columns`` (``[]`` without them).

    Raises:
        FileNotFoundError: the prompt dataset's ``.bin``/``.idx`` do not exist.
        ValueError: a document holds more than one sequence (not a prompt dataset); the metadata names extra
            columns but ``<prefix>_extra.parquet`` is missing, lacks one of them or holds another number of rows.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = _base_prefix(os.fspath(prefix), [PROMPT_IDS, PROMPT_MASK])
        self.dataset = _open(self.prefix, PROMPT_IDS)
        self.meta = _read_meta(self.prefix)
        self.extra_columns: list[str] = list((self.meta or {}).get("extra_columns") or [])
        self._extras = self._read_extras() if self.extra_columns else None

    def _read_extras(self):
        """The ``pyarrow.Table`` of the extra columns, checked against the metadata and the prompt count."""
        import pyarrow as pa  # heavy: imported only for datasets with extra columns
        import pyarrow.parquet as pq

        path = extra_path(self.prefix)
        try:
            table = pq.read_table(path, columns=self.extra_columns)
        except FileNotFoundError:
            raise DatasetFormatError(f"{path} not found: {meta_path(self.prefix)} lists extra columns "
                                     f"{', '.join(self.extra_columns)} (rerun preprocess_data.py)") from None
        except (pa.ArrowException, OSError) as exc:
            raise DatasetFormatError(f"{path}: cannot read the extra columns {', '.join(self.extra_columns)} "
                                     f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        if table.num_rows != len(self):
            raise DatasetFormatError(f"{path}: {table.num_rows} rows of extra columns for {len(self)} prompts")
        return table

    def extras(self, indices: Sequence[int]) -> dict[str, list]:
        """The extra columns of prompts ``indices``: column -> one value per index, in the order given (strings,
        numbers, lists, ... as they were in the input; None for null). Empty without extra columns.

        Raises:
            IndexError: an index outside ``[-len, len)``.
        """
        positions = [_check_index(i, len(self)) for i in indices]
        if self._extras is None:
            return {}
        import pyarrow as pa  # already imported by _read_extras

        rows = self._extras.take(pa.array(positions, type=pa.int64()))
        return {name: rows.column(name).to_pylist() for name in self.extra_columns}

    def __len__(self) -> int:
        """Number of prompts."""
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Token ids of prompt ``index``: int64 tensor ``[prompt_len]``.

        Raises:
            IndexError: ``index`` outside ``[-len, len)``.
        """
        index = _check_index(index, len(self))
        return torch.from_numpy(self.dataset[index].astype(np.int64))

    @property
    def lengths(self) -> np.ndarray:
        """Prompt lengths in tokens, int32 ``[len]``."""
        return self.dataset.sequence_lengths

    def batch(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """Prompts ``indices`` as a list of int64 tensors (see :func:`pad_sequences` to batch them)."""
        return [self[int(i)] for i in indices]


class PreferencePair(NamedTuple):
    """One preference pair.

    Attributes:
        chosen_ids: int64 ``[prompt_length + chosen_len]``: prompt ids then the preferred response's ids.
        rejected_ids: int64 ``[prompt_length + rejected_len]``: same prompt ids then the other response's ids.
        prompt_length: number of leading prompt ids (identical in both sequences).
        margin: preference margin (0.0 when the data had no margin column).
    """

    chosen_ids: torch.Tensor
    rejected_ids: torch.Tensor
    prompt_length: int
    margin: float


class PairwiseDataset(torch.utils.data.Dataset, _MetaMixin):
    """Preference pairs written by ``AlpacaStylePairwiseHandler``.

    Args:
        prefix: the ``--output-prefix`` used when preprocessing.

    Attributes:
        meta: content of ``<prefix>_meta.json``, or None.
        has_margin: whether a ``margin`` dataset exists.

    Raises:
        FileNotFoundError: a required dataset is missing.
        ValueError: the datasets disagree on the number of pairs.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = _base_prefix(os.fspath(prefix), [CHOSEN_IDS, REJECTED_IDS, PROMPT_LENGTH, MARGIN])
        self.chosen = _open(self.prefix, CHOSEN_IDS)
        self.rejected = _open(self.prefix, REJECTED_IDS)
        self.prompt_length = _open(self.prefix, PROMPT_LENGTH)
        self.margin = _open(self.prefix, MARGIN, required=False)
        self.has_margin = self.margin is not None
        sizes = {len(d) for d in (self.chosen, self.rejected, self.prompt_length, self.margin) if d is not None}
        if len(sizes) != 1:
            raise DatasetFormatError(f"{self.prefix}: the pair datasets hold different numbers of documents "
                                     f"{sorted(sizes)}")
        self._prompt_lengths = np.concatenate(self.prompt_length[0:len(self.prompt_length)]).astype(np.int64) \
            if len(self.prompt_length) else np.zeros(0, dtype=np.int64)
        self.meta = _read_meta(self.prefix)

    def __len__(self) -> int:
        """Number of pairs."""
        return len(self.chosen)

    def __getitem__(self, index: int) -> PreferencePair:
        """Pair ``index`` (see :class:`PreferencePair`).

        Raises:
            IndexError: ``index`` outside ``[-len, len)``.
        """
        index = _check_index(index, len(self))
        margin = float(self.margin[index][0]) if self.margin is not None else 0.0
        return PreferencePair(torch.from_numpy(self.chosen[index].astype(np.int64)),
                              torch.from_numpy(self.rejected[index].astype(np.int64)),
                              int(self._prompt_lengths[index]), margin)

    @property
    def prompt_lengths(self) -> np.ndarray:
        """Prompt length of every pair, int64 ``[len]``."""
        return self._prompt_lengths


def _check_index(index: int, size: int) -> int:
    index = int(index)
    if index < 0:
        index += size
    if not 0 <= index < size:
        raise IndexError(f"index {index} out of range for {size} items")
    return index


def pad_sequences(sequences: Sequence[torch.Tensor], pad_token_id: int, side: str = "left",
                  pad_to_multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad 1-D token sequences into a batch.

    Args:
        sequences: ``b`` int tensors ``[len_i]``.
        pad_token_id: id written at padded positions.
        side: ``"left"`` (prompts for generation) or ``"right"``.
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Returns:
        ``(input_ids, attention_mask)``, both int64 ``[b, s]`` with ``s = max len_i`` rounded up; the mask is 1 on
        real tokens and 0 on padding; on the device of tensor inputs, on the CPU for lists.

    Raises:
        ValueError: empty ``sequences``, unknown ``side`` or ``pad_to_multiple_of < 1``.
    """
    if not sequences:
        raise ValueError("pad_sequences needs at least one sequence")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be at least 1, got {pad_to_multiple_of}")
    seqs = [torch.as_tensor(seq, dtype=torch.long, device=seq.device if torch.is_tensor(seq) else "cpu")
            for seq in sequences]
    input_ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_token_id,
                                                padding_side=side)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(seq) for seq in seqs], batch_first=True,
                                           padding_value=0, padding_side=side)
    extra = -input_ids.shape[1] % pad_to_multiple_of
    if extra:
        pad = (extra, 0) if side == "left" else (0, extra)
        input_ids = torch.nn.functional.pad(input_ids, pad, value=pad_token_id)
        mask = torch.nn.functional.pad(mask, pad, value=0)
    return input_ids, mask


class PromptSampler:
    """Per-rank batches of prompt indices, reshuffled each epoch, resumable (see the module docstring).

    Args:
        num_samples: dataset size ``N``.
        global_batch_size: prompts per iteration over all data-parallel ranks, ``G``.
        dp_rank: this rank's data-parallel index.
        dp_size: number of data-parallel ranks; must divide ``G``.
        seed: shuffling seed (epoch ``e`` uses ``default_rng([seed, e])``).
        shuffle: False visits ``range(N)`` in order every epoch.

    Raises:
        ValueError: ``G`` not divisible by ``dp_size``, ``dp_rank`` out of range, or ``N < G``.

    Iterating yields, forever (epoch after epoch), this rank's int64 indices ``[G / dp_size]`` of the next
    iteration and advances the position.
    """

    def __init__(self, num_samples: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 1234, shuffle: bool = True) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                             f"dp_size {dp_size}")
        if num_samples < global_batch_size:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {global_batch_size}")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch = 0
        self.consumed_samples = 0  # global samples consumed in the current epoch
        self.total_consumed_samples = 0
        self._order_epoch, self._order = None, None

    @property
    def local_batch_size(self) -> int:
        """Indices per rank per iteration, ``G / dp_size``."""
        return self.global_batch_size // self.dp_size

    @property
    def batches_per_epoch(self) -> int:
        """Iterations per epoch, ``N // G``."""
        return self.num_samples // self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The visiting order of epoch ``epoch``: a permutation of ``range(N)``, int64 ``[N]``."""
        if self._order_epoch != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples)
            self._order_epoch, self._order = epoch, order.astype(np.int64)
        return self._order

    def global_batch(self, iteration: int) -> np.ndarray:
        """Indices of every rank at iteration ``iteration`` (counted from 0 with a constant ``G``), int64 ``[G]``."""
        epoch, position = divmod(int(iteration), self.batches_per_epoch)
        start = position * self.global_batch_size
        return self.epoch_order(epoch)[start:start + self.global_batch_size].copy()

    def local_batch(self, iteration: int) -> np.ndarray:
        """This rank's slice of :meth:`global_batch`, int64 ``[G / dp_size]``."""
        return self._local(self.global_batch(iteration))

    def _local(self, global_indices: np.ndarray) -> np.ndarray:
        start = self.dp_rank * self.local_batch_size
        return global_indices[start:start + self.local_batch_size]

    def next_global_batch(self) -> np.ndarray:
        """The next iteration's indices for all ranks, int64 ``[G]``; advances the position."""
        if self.consumed_samples + self.global_batch_size > self.num_samples:
            self.epoch += 1
            self.consumed_samples = 0
        start = self.consumed_samples
        batch = self.epoch_order(self.epoch)[start:start + self.global_batch_size].copy()
        self.consumed_samples += self.global_batch_size
        self.total_consumed_samples += self.global_batch_size
        return batch

    def __iter__(self) -> "PromptSampler":
        return self

    def __next__(self) -> np.ndarray:
        """This rank's indices of the next iteration, int64 ``[G / dp_size]``."""
        return self._local(self.next_global_batch())

    def state_dict(self) -> dict:
        """The position, to store in a checkpoint: epoch, samples consumed (global counts) and the settings that
        define the order."""
        return {"epoch": self.epoch, "consumed_samples": self.consumed_samples,
                "total_consumed_samples": self.total_consumed_samples, "num_samples": self.num_samples,
                "seed": self.seed, "shuffle": self.shuffle, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (the global batch size and DP size may differ from the saved run).

        Raises:
            ValueError: the saved dataset size, seed or shuffle setting differ from this sampler's (the order would
                not be the same).
        """
        for key in ("num_samples", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r}, this sampler {getattr(self, key)!r}")
        self.epoch = int(state["epoch"])
        self.consumed_samples = int(state["consumed_samples"])
        self.total_consumed_samples = int(state.get("total_consumed_samples", 0))
