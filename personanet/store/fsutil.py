"""Durable files: the one atomic write and the one lock every writer uses.

A write that must survive a crash goes to a temporary file in the same folder, is
fsynced, renamed over its target and the folder is fsynced, so after a crash a reader
finds the old file or the new one, never half of one. A writer that needs more than
one file (an artifact version, a checkpoint) fsyncs each file of a temporary folder and
hands it to `publish_folder`.

The lock is `filelock`'s (flock underneath, with a timeout and re-entry), one per
lock file and process, whose holder writes its pid into the file so that a process
that gives up waiting can say who holds it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from personanet.errors import LockBusyError, OutputError

if TYPE_CHECKING:
    from filelock import BaseFileLock

#: prefix of every temporary file this module writes; a crash can leave one behind,
#: never in place of the target
TMP_PREFIX = ".tmp-"


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a just-created or renamed entry of `directory` durable (best effort).

    Some platforms and filesystems cannot open or fsync a folder; the data itself is
    already synced by then, so that is not an error.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Path, *, mode: int = 0o644, exclusive: bool = False
                 ) -> Iterator[IO[bytes]]:
    """A binary file to stream into; on a clean exit it replaces `path` all at once.

    The temporary file is created with `mode` (set with fchmod, so the umask does not
    weaken a 0600), fsynced, renamed over `path` and the folder fsynced. On any error the
    temporary file is removed and `path` is untouched. With `exclusive`, `path` must not
    exist: it is hard-linked into place, which fails if `path` appeared meanwhile, so
    even a race never overwrites (OutputError).

    Example::

        with atomic_write(target, mode=0o600) as fh:
            frame.write_parquet(fh)
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{secrets.token_hex(6)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with open(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    except FileExistsError:
        raise OutputError(f"{path} exists; refusing to overwrite it") from None
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        # After a replace the name is gone; after a link or an error it must go.
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644,
                       exclusive: bool = False) -> None:
    """Write `data` to `path` all or nothing, durably (see `atomic_write`)."""
    with atomic_write(path, mode=mode, exclusive=exclusive) as fh:
        fh.write(data)


def publish_folder(tmp: Path, final: Path) -> None:
    """Rename a fully written temporary folder to `final`, durably, all at once.

    Its files must already be fsynced; the folder itself is fsynced before the rename
    and its parent after, so after a crash `final` is either absent or complete.
    """
    fsync_path(tmp)
    os.rename(tmp, final)
    fsync_dir(final.parent)


# --------------------------------------------------------------------------- the lock


def _lock_for(lock_file: Path) -> BaseFileLock:
    from filelock import FileLock

    # One instance per file in this process (is_singleton), shared by its threads
    # (thread_local=False): a process re-enters its own lock instead of waiting on it,
    # so `run` can hold the root's lock across every stage. The file is kept on release
    # (preserve_lock_file), so every holder, and older personanet versions that flock the
    # same name, lock one inode. The timeout is the caller's, given to each acquire.
    return FileLock(lock_file, mode=0o600, thread_local=False,
                    is_singleton=True, preserve_lock_file=True, on_acquired=_write_pid)


def _write_pid(fd: int) -> None:
    # Waiters open the file without truncating it, so the holder's pid stays readable.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def lock_holder(lock_file: Path) -> int | None:
    """The pid the current (or last) holder of `lock_file` wrote, if any."""
    try:
        text = Path(lock_file).read_text("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def hold_lock(lock_file: Path, *, timeout: float, what: str) -> Iterator[None]:
    """Hold the exclusive lock on `lock_file`, waiting at most `timeout` seconds.

    Re-entrant within a process. A wait that runs out raises LockBusyError (exit 75)
    naming `what` and the holder's pid. The lock file's folder must exist.

    Example::

        with hold_lock(root / ".personanet.lock", timeout=60, what=f"artifact root {root}"):
            ...  # no other personanet process writes under root meanwhile
    """
    from filelock import Timeout

    # filelock keys its one instance per process by the canonical path, so "root" and
    # "./root" re-enter rather than deadlock (tests/test_fsutil.py checks it).
    lock = _lock_for(Path(lock_file))
    try:
        lock.acquire(timeout=max(timeout, 0.0))
    except Timeout:
        pid = lock_holder(lock_file)
        holder = f" (pid {pid})" if pid is not None else ""
        raise LockBusyError(
            f"{what} is locked by another personanet process{holder}; waited {timeout:g}s: "
            "retry later or raise --lock-timeout") from None
    try:
        yield
    finally:
        lock.release()
