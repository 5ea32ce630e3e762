"""Atomic publication of output directories, and the clean-up of what dead writers left behind.

Every directory posttrain writes (a model checkpoint, a training checkpoint ``iter_XXXXXXX``) is written into a
hidden temporary sibling ``.<name>.tmp`` and renamed into place only once complete, so a run that stops at any
point (Ctrl-C, ``kill -9``, a full disk) never leaves a directory that looks complete but is not. The temporary
directory holds a ``WRITER`` file with the writer's host and process id: a later run removes temporaries whose
writer is gone (:func:`remove_stale_temporaries`) and leaves those of a live writer alone.

A write that fails because the disk is full is reported as :class:`DiskFullError` (one line naming ENOSPC and
the directory) after the partial directory has been removed; the previous output, if any, is untouched. A write
stopped by the process's file-size limit (``RLIMIT_FSIZE``, ``ulimit -f``; the kernel answers EFBIG) is reported
the same way as :class:`FileSizeLimitError`.

Under ``torch.distributed`` every rank calls :class:`AtomicDirectory` (it is collective): rank 0 creates, renames
and removes; all ranks write in between.
"""
from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import socket
from pathlib import Path
from typing import Iterable, Optional

import torch

from posttrain.errors import InputError

WRITER_FILE = "WRITER"
LOW_SPACE_BYTES = 1 << 20
"""A failed write with less free space than this (1 MiB) on the target's file system is reported as ENOSPC."""


class DiskFullError(InputError, OSError):
    """No space left on the device while writing an output (the partial output has been removed)."""


class FileSizeLimitError(InputError, OSError):
    """A file of an output hit the process's file-size limit, ``RLIMIT_FSIZE`` (the partial output has been
    removed)."""


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _writer_gone(writer: str) -> bool:
    """True when the ``host:pid`` writer record names a process of this host that no longer runs."""
    host, _, pid = writer.strip().rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host's writer (shared file system): not ours to judge
    return not pid_alive(int(pid))


def is_disk_full(exc: BaseException, directory: Path) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is ENOSPC, or the file system of ``directory`` is
    (nearly) full: megatron's checkpoint writer reports a full disk as a generic worker failure."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free < LOW_SPACE_BYTES
    except OSError:
        return False


def file_size_limit(exc: BaseException, directory: Path) -> Optional[int]:
    """The process's file-size limit in bytes when it stopped the write that raised ``exc`` under ``directory``,
    else None.

    It did when ``exc`` (or an exception it was raised from) is EFBIG, or when the limit is finite and a file
    under ``directory`` has reached it: megatron's checkpoint writer reports EFBIG as a generic worker failure,
    and the kernel writes a file up to the limit before refusing more.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == resource.RLIM_INFINITY:
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
            return soft
        exc = exc.__cause__ or exc.__context__
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                if os.stat(os.path.join(root, name)).st_size >= soft:
                    return soft
            except OSError:
                continue
    return None


def remove_stale_temporaries(parent: str | Path, pattern: str = r"^\..*\.tmp$") -> list[Path]:
    """Remove temporary directories under ``parent`` whose writer process is gone (rank 0 only).

    Args:
        parent: the directory holding the outputs.
        pattern: regular expression the temporary's name must match.

    Returns:
        The removed paths. A temporary without a readable ``WRITER`` record, or whose writer still runs or runs on
        another host, is kept.
    """
    parent = Path(parent)
    removed: list[Path] = []
    if _rank() != 0 or not parent.is_dir():
        return removed
    for path in parent.iterdir():
        if not path.is_dir() or not re.match(pattern, path.name):
            continue
        try:
            writer = (path / WRITER_FILE).read_text()
        except OSError:
            continue
        if _writer_gone(writer):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_stale_temporary_files(paths: Iterable[str | Path]) -> list[Path]:
    """Remove files named ``<anything>.tmp-<pid>`` among ``paths`` whose process ``pid`` is gone.

    Returns:
        The removed paths.
    """
    removed = []
    for path in map(Path, paths):
        match = re.search(r"\.tmp-(\d+)$", path.name)
        if match and path.is_file() and not pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class AtomicDirectory:
    """Write a directory atomically (collective under ``torch.distributed``).

    ::

        with AtomicDirectory(final) as tmp:
            ...  # every rank writes under tmp
        # final now exists, complete; on an exception tmp is gone and final is as it was

    Args:
        final: the directory to publish. Its parent is created when missing.
        replace: an existing ``final`` is replaced (renamed aside, then deleted); otherwise it must not exist.
        what: how error messages call the output (e.g. ``checkpoint iteration 10``).

    Raises (on exit):
        DiskFullError: the write failed for lack of space (the partial directory is removed first).
        FileSizeLimitError: a file hit the process's file-size limit (likewise).
    """

    def __init__(self, final: str | Path, replace: bool = True, what: Optional[str] = None):
        self.final = Path(final).absolute()
        self.tmp = self.final.parent / f".{self.final.name}.tmp"
        self.replace = replace
        self.what = what or str(self.final)

    def __enter__(self) -> Path:
        if _rank() == 0:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
            (self.tmp / WRITER_FILE).write_text(f"{socket.gethostname()}:{os.getpid()}\n")
        _barrier()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            full = is_disk_full(exc, self.final.parent)
            limit = None if full else file_size_limit(exc, self.tmp)
            if _rank() == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            if full:
                raise DiskFullError(errno.ENOSPC, f"no space left on device (ENOSPC) writing {self.what} under "
                                                  f"{self.final.parent}; the partial output was removed; free space "
                                                  "there and run again") from exc
            if limit is not None:
                raise FileSizeLimitError(errno.EFBIG, f"file size limit of {limit} bytes (RLIMIT_FSIZE, ulimit -f) "
                                                      f"exceeded (EFBIG) writing {self.what} under "
                                                      f"{self.final.parent}; the partial output was removed; raise "
                                                      "the limit (ulimit -f unlimited)") from exc
            return False
        _barrier()
        if _rank() == 0:
            (self.tmp / WRITER_FILE).unlink(missing_ok=True)
            old = self.final.parent / f".{self.final.name}.old"
            if self.final.exists():
                if not self.replace:
                    shutil.rmtree(self.tmp, ignore_errors=True)
                    raise FileExistsError(f"{self.final}: already exists")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(self.final, old)
                os.replace(self.tmp, self.final)
                shutil.rmtree(old)
            else:
                os.replace(self.tmp, self.final)
        _barrier()
        return False


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace the file ``path`` with ``text`` in one rename (readers see the old or the new content)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
