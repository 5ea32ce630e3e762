"""The one exception type of the data pipeline.

Every problem caused by the user's input (a missing column, a corrupt file, an unknown flag value) is raised as
:class:`DataError` with a one-line message that names the file, row or flag at fault. The command line turns it
into ``error: <message>`` on stderr and a non-zero exit status; library callers can catch it.
"""
from __future__ import annotations

from posttrain.errors import InputError


class DataError(InputError):
    """A problem with the user's data or options, described in one line.

    Args:
        message: one line naming the file, row or flag at fault and what was expected.
    """


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A preprocessed dataset's ``.bin`` / ``.idx`` files do not exist (message names the path prefix)."""


class DatasetFormatError(DataError, ValueError):
    """A preprocessed dataset exists but is not of the expected kind (message names the path)."""
