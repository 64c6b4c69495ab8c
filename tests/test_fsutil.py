"""The one atomic write and the one lock (personanet/store/fsutil.py).

Mutations seen caught: the rename made before the fsync/close (a failed write then replaced
the target), `exclusive` ignored (an existing key file overwritten), the pid callback
removed (the busy message lost the holder's pid).
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import pytest

from personanet.errors import LockBusyError, OutputError
from personanet.store.fsutil import atomic_write, atomic_write_bytes, hold_lock, lock_holder


def test_atomic_write_replaces_the_file_with_the_given_mode(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as fh:
        fh.write(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_exclusive_write_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_bytes(b"the only copy")
    with pytest.raises(OutputError, match="exists"):
        atomic_write_bytes(target, b"another", exclusive=True)
    assert target.read_bytes() == b"the only copy"
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_busy_lock_names_the_holder_and_times_out(tmp_path: Path) -> None:
    lock_file = tmp_path / ".lock"
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"4242\n", 0)
        with pytest.raises(LockBusyError, match=r"pid 4242"), \
                hold_lock(lock_file, timeout=0.1, what="the test root"):
            pass
    finally:
        os.close(fd)


def test_lock_is_reentrant_and_records_this_process(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with hold_lock(tmp_path / ".lock", timeout=0.1, what="root"):
        assert lock_holder(tmp_path / ".lock") == os.getpid()
        # The same file by another spelling is the same lock, re-entered, not waited on.
        with hold_lock(Path(".lock"), timeout=0.1, what="root"):
            pass
    assert (tmp_path / ".lock").exists()  # kept, so every holder locks one inode
