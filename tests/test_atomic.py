"""posttrain.atomic: directories appear complete or not at all; a full disk is one line; dead writers' debris goes."""
import errno
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from posttrain import atomic
from posttrain.atomic import (
    AtomicDirectory,
    DiskFullError,
    FileSizeLimitError,
    remove_stale_temporaries,
    remove_stale_temporary_files,
)
from posttrain.errors import InputError


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_directory_appears_only_when_complete_and_replaces_the_old_one(tmp_path):
    final = tmp_path / "deep" / "ckpt"
    with AtomicDirectory(final) as tmp:
        (tmp / "a").write_text("1")
        assert not final.exists() and tmp.name == ".ckpt.tmp" and (tmp / atomic.WRITER_FILE).is_file()
    assert (final / "a").read_text() == "1" and not (final / atomic.WRITER_FILE).exists()
    with AtomicDirectory(final) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["ckpt"]


def test_a_failed_write_leaves_the_previous_directory_and_no_debris(tmp_path):
    final = tmp_path / "ckpt"
    with AtomicDirectory(final) as tmp:
        (tmp / "old").write_text("kept")
    with pytest.raises(RuntimeError, match="writer broke"):
        with AtomicDirectory(final) as tmp:
            (tmp / "new").write_text("partial")
            raise RuntimeError("writer broke")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (final / "old").read_text() == "kept"


def test_disk_full_is_a_one_line_input_error_and_the_partial_is_removed(tmp_path):
    final = tmp_path / "ckpt"
    with pytest.raises(DiskFullError) as info:
        with AtomicDirectory(final, what="checkpoint iteration 3") as tmp:
            (tmp / "shard").write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
    message = str(info.value)
    assert "ENOSPC" in message and "checkpoint iteration 3" in message and str(tmp_path) in message
    assert "\n" not in message and list(tmp_path.iterdir()) == []


def test_a_writer_failure_on_a_full_file_system_counts_as_enospc(tmp_path, monkeypatch):
    """megatron's checkpoint writer reports a full disk as a generic worker failure; the free space decides."""
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: SimpleNamespace(free=1024))
    with pytest.raises(DiskFullError):
        with AtomicDirectory(tmp_path / "ckpt"):
            raise RuntimeError("Worker failure: unexpected pos 704 vs 598")


def test_a_file_at_the_file_size_limit_makes_a_writer_failure_one_efbig_line(tmp_path, monkeypatch):
    """Under ``ulimit -f`` the kernel writes a file up to the limit, then refuses (EFBIG); megatron's writer reports
    that as a generic worker failure."""
    monkeypatch.setattr(atomic.resource, "getrlimit", lambda which: (4096, 4096))
    final = tmp_path / "ckpt"
    with pytest.raises(FileSizeLimitError) as info:
        with AtomicDirectory(final, what="checkpoint iteration 2") as tmp:
            (tmp / "shard.distcp").write_bytes(b"x" * 4096)
            raise RuntimeError("Worker failure: unexpected pos 704 vs 598")
    message = str(info.value)
    assert info.value.errno == errno.EFBIG and isinstance(info.value, InputError)
    for needle in ("EFBIG", "4096 bytes", "ulimit -f", "checkpoint iteration 2", str(tmp_path)):
        assert needle in message, needle
    assert "\n" not in message and list(tmp_path.iterdir()) == []


def test_an_efbig_error_under_a_file_size_limit_is_reported_as_such(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.resource, "getrlimit", lambda which: (1 << 30, 1 << 30))
    with pytest.raises(FileSizeLimitError, match="1073741824 bytes"):
        with AtomicDirectory(tmp_path / "ckpt"):
            raise OSError(errno.EFBIG, "File too large")


@pytest.mark.parametrize("limit", [atomic.resource.RLIM_INFINITY, 1 << 20], ids=["unlimited", "not-reached"])
def test_other_writer_failures_keep_their_own_exception(tmp_path, monkeypatch, limit):
    monkeypatch.setattr(atomic.resource, "getrlimit", lambda which: (limit, limit))
    with pytest.raises(RuntimeError, match="writer broke"):
        with AtomicDirectory(tmp_path / "ckpt") as tmp:
            (tmp / "shard.distcp").write_bytes(b"x" * 100)
            raise RuntimeError("writer broke")
    assert list(tmp_path.iterdir()) == []


def test_only_temporaries_of_dead_writers_are_removed(tmp_path):
    host = socket.gethostname()
    dead, alive, other_host, unmarked = (tmp_path / ".iter_0000001.tmp", tmp_path / ".iter_0000002.tmp",
                                         tmp_path / ".iter_0000003.tmp", tmp_path / ".iter_0000004.tmp")
    for path, writer in ((dead, f"{host}:{dead_pid()}"), (alive, f"{host}:{os.getpid()}"),
                         (other_host, "elsewhere:1"), (unmarked, None)):
        path.mkdir()
        if writer:
            (path / atomic.WRITER_FILE).write_text(writer)
    (tmp_path / "iter_0000001").mkdir()
    assert remove_stale_temporaries(tmp_path, r"^\.iter_\d+\.tmp$") == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".iter_0000002.tmp", ".iter_0000003.tmp",
                                                          ".iter_0000004.tmp", "iter_0000001"]


def test_stale_temporary_files_are_removed_by_pid(tmp_path):
    dead_file = tmp_path / f"data_document.bin.tmp-{dead_pid()}"
    live_file = tmp_path / f"data_document.bin.tmp-{os.getpid()}"
    for path in (dead_file, live_file):
        path.write_text("x")
    assert remove_stale_temporary_files(tmp_path.iterdir()) == [dead_file]
    assert live_file.exists()
