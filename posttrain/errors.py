"""The project's error types: what is the user's fault, and what is not.

Every problem caused by the user's input (a flag, a file, a checkpoint, a dataset, a reward function, a full
disk) is raised as a subclass of :class:`InputError` with a one-line message naming the flag, file or row at
fault. The entry points (``pretrain_gpt.py``, ``convert_ckpt.py``, ``preprocess_data.py``) print such an error as
one ``error: <message>`` line and exit with status 1. Anything else is an internal bug and keeps its traceback.

The concrete classes live beside the code that raises them (``ArgumentError`` in :mod:`posttrain.arguments`,
``CheckpointError`` in :mod:`posttrain.models.checkpoint`, ``DataError`` in :mod:`posttrain.data.errors`, ...);
most also derive from ``ValueError`` for callers that catch that.
"""
from __future__ import annotations


class InputError(Exception):
    """A problem with the user's input, described in one line that names the flag, file or row at fault."""


class InputFileNotFoundError(InputError, FileNotFoundError):
    """A file or directory the user named (or one it must contain) does not exist."""


class TrainingDivergedError(RuntimeError):
    """A loss, score or gradient norm became NaN/inf: the run stops and keeps its last checkpoint."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
