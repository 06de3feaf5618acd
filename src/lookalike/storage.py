"""The one storage helper of lookalike: durable files, SQLite transactions, the writer lock.

Both on-disk stores (the index, :mod:`lookalike.index`, and its local features,
:mod:`lookalike.local.store`) are built from these pieces:

* **Atomic replace** (:func:`atomic_write`): a file that readers open by name is written to
  a scratch name in the same directory, flushed and fsynced, ``os.replace``d over the target,
  and the directory fsynced so the rename itself survives a power cut. A scratch file left by
  a crash is never read and is deleted by the next writer.
* **A SQLite database** (:class:`~lookalike.database.Database`, in its own module and
  re-exported here): WAL mode (readers keep a snapshot while one
  writer commits), ``synchronous=FULL`` (a commit is durable), explicit transactions
  (:meth:`Database.write`, :meth:`Database.snapshot`) and a ``kv`` table of counters and names.
* **Append-then-commit files** (:func:`write_at`): records are written past the committed end
  that the database knows and fsynced *before* the transaction that references them commits,
  so bytes past the committed end (a crashed writer's) are never read and are overwritten by
  the next write.
* **Generation compaction** (:func:`write_new_file`, :func:`switch_data_file`): live records
  are copied into a new file under a new name, one transaction points the database at it, and
  the old file is deleted last; readers that still map the old one retry.
* **The single-writer lock** (:class:`WriterLock`).

Every file is a fixed name inside the store directory, checked and opened without following
links, and every checked file is hashed while it is written (:mod:`lookalike.confined`); a
write the environment refuses (full disk, read-only, permission) raises one
:class:`~lookalike.errors.StorageError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, TypeVar

from lookalike.confined import (
    DigestWriter,
    check_entry,
    open_fd,
    storage_error,
    storage_errors,
    unlink_entry,
)
from lookalike.database import (  # re-exported: the storage helper's database part
    SIDE_FILES,  # noqa: F401
    SQLITE_MAGIC,  # noqa: F401
    Database,
    check_sqlite_size,  # noqa: F401
)
from lookalike.errors import IndexLockedError, IndexStateError, StorageError

T = TypeVar("T")

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make renames and creations inside directory ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush the data of an already written file to stable storage."""
    fd = open_fd(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path(path: Path) -> Path:
    """The scratch name used while ``path`` is being written."""
    return path.with_name(path.name + TMP_SUFFIX)


def atomic_write(path: Path, write: Callable[[BinaryIO], None], unique: bool = False) -> str:
    """Create or replace ``path`` atomically; ``write(stream)`` fills the scratch file
    through a sequential (non-seekable) binary stream. Returns the digest of what was
    written (:func:`lookalike.confined.new_digest`).

    The scratch file is created fresh (``O_CREAT | O_EXCL | O_NOFOLLOW``, a stale one removed
    first), so nothing planted at its name is written through.

    ``unique``: a scratch name of this call only (``<name>.<random>.tmp``), for files that
    processes not holding the writer lock may replace (e.g. a searcher saving a DBA).

    Raises:
        IndexStateError: ``path`` is a link or another non-regular file.
        StorageError: the disk is full, the directory read-only or not writable.
    """
    tmp = tmp_path(path)
    if unique:
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    check_entry(path)
    with storage_errors(path):
        unlink_entry(tmp)
        fd = open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                stream = DigestWriter(fd)
                write(stream)  # type: ignore[arg-type]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            unlink_entry(tmp)
            raise
        fsync_dir(path.parent)
    return stream.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> str:
    """Create or replace ``path`` with ``data`` atomically; returns its digest."""
    return atomic_write(path, lambda stream: stream.write(data))


def write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    """Write every byte of ``data`` to ``fd`` (at ``offset``, else at the file position)."""
    view, written = memoryview(data).cast("B"), 0
    while written < len(view):
        if offset is None:
            written += os.write(fd, view[written:])
        else:
            written += os.pwrite(fd, view[written:], offset + written)


def write_at(path: Path, data: bytes | memoryview, offset: int, damaged: str) -> None:
    """Append-then-commit: write ``data`` at ``offset``, cut what follows, fsync.

    ``offset`` is the committed end the caller's database knows; bytes after it belong to a
    writer that crashed before its commit and are overwritten or cut.

    Args:
        path: the data file; created when missing.
        data: the bytes to write.
        offset: where they go, the committed end.
        damaged: what to tell the user when the file is shorter than ``offset`` (the
            database references bytes that are not there): how to rebuild.

    Raises:
        IndexStateError: the file holds fewer than ``offset`` bytes, or is not a regular file.
        StorageError: the disk is full, the directory read-only or not writable.
    """
    created = check_entry(path) is None
    with storage_errors(path):
        fd = open_fd(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size < offset:
                if created:  # leave no empty file behind that would read as "truncated"
                    unlink_entry(path)
                raise IndexStateError(
                    f"{path} holds {size} bytes but its database references {offset}; {damaged}"
                )
            write_all(fd, data, offset)
            end = offset + memoryview(data).nbytes
            if size > end:
                os.ftruncate(fd, end)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(path.parent)


def write_new_file(target: Path, chunks: Iterable[bytes | memoryview]) -> int:
    """Generation compaction, step one: write ``chunks`` as the new file ``target``, fsynced
    (its directory too); returns the bytes written. The caller then switches to it with
    :func:`switch_data_file`."""
    total = 0
    with storage_errors(target):
        unlink_entry(target)  # a stale one of an interrupted compaction (or anything planted)
        fd = open_fd(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for chunk in chunks:
                write_all(fd, chunk)
                total += memoryview(chunk).nbytes
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            unlink_entry(target)
            raise
        os.close(fd)
        fsync_dir(target.parent)
    return total


def switch_data_file(
    db: Database,
    key: str,
    target: Path,
    update: Callable[[sqlite3.Connection], None],
    is_name: Callable[[str], bool] = lambda name: True,
) -> Path | None:
    """Generation compaction, step two: one transaction runs ``update`` (pointing records at
    their new offsets) and names ``target`` under ``kv[key]``; then the old file is deleted
    (only when ``is_name`` says the old entry is a data file name of the store: a damaged
    entry is never taken for a path).

    Returns the old file's path (deleted), or None when it was already ``target``. A failed
    transaction deletes ``target`` (unless it is the file in use) and leaves the old state.
    """
    root = target.parent
    old: str | None = None
    try:
        with db.write() as conn:
            old = db.kv_get(key)
            update(conn)
            db.kv_set(key, target.name)
    except BaseException:
        if old != target.name:
            unlink_entry(target)
        raise
    if old is None or old == target.name or "/" in old or not is_name(old):
        return None
    remove_durably([root / old])
    return root / old


def read_retrying(
    read: Callable[[], T], what: str, check: Callable[[], None] | None = None, attempts: int = 5
) -> T:
    """``read()``, run again when a file it opened was replaced by a generation compaction
    in the meantime (``FileNotFoundError``: the database names the new one by now).

    Args:
        read: reads a consistent state (a snapshot of the database, then the file it names).
        what: the store, for the message when it keeps changing.
        check: called after each miss; raises when the file is missing for good (damage).
        attempts: tries before giving up.

    Raises:
        IndexStateError: still replaced after ``attempts`` tries.
    """
    for attempt in range(attempts):
        try:
            return read()
        except FileNotFoundError:
            if check is not None:
                check()
            time.sleep(0.02 * attempt)
    raise IndexStateError(f"{what} kept changing while it was being read; retry in a moment")


def remove_leftovers(root: Path, is_junk: Callable[[str], bool]) -> list[str]:
    """Delete the files of ``root`` whose names ``is_junk`` (crash leftovers); their names."""
    junk = [p for p in root.iterdir() if is_junk(p.name) and not _is_real_dir(p)]
    if junk:
        logger.info("removing leftovers of an interrupted writer: %s", sorted(p.name for p in junk))
        remove_durably(junk)
    return [p.name for p in junk]


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def remove_durably(paths: list[Path]) -> None:
    """Delete files (missing ones are fine) and make the deletions durable."""
    if not paths:
        return
    with storage_errors(paths[0]):
        for path in paths:
            unlink_entry(path)
        fsync_dir(paths[0].parent)


class WriterLock:
    """An exclusive, non-blocking lock on ``path`` held by one writer process at a time.

    POSIX ``flock`` on an open file description: the kernel drops it when the process dies,
    however it dies, so a crashed writer never leaves a stale lock. A second store in the
    same process also conflicts (each opens its own description). The holder's pid is
    written into the file so the error can name it. Falls back to :mod:`filelock` where
    ``fcntl`` is missing (Windows).
    """

    def __init__(self, path: Path, index_dir: Path) -> None:
        self.path = path
        self.index_dir = index_dir
        self._fd: int | None = None
        self._fallback = None

    @property
    def held(self) -> bool:
        return self._fd is not None or self._fallback is not None

    def acquire(self) -> None:
        """Take the lock or raise ``IndexLockedError`` at once (never waits)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            self._acquire_filelock()
            return
        try:
            fd = open_fd(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            mapped = storage_error(error, self.path)
            if mapped is not None:
                raise StorageError(
                    f"cannot open the lock file of index {self.index_dir} "
                    f"({error.strerror}); writing an index needs write access to its directory"
                ) from None
            raise IndexStateError(
                f"cannot open the lock file of index {self.index_dir} ({error.strerror}); "
                "writing an index needs write access to its directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise self._locked_error(holder) from None
        with contextlib.suppress(OSError):  # the pid only names the holder (a full disk)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        logger.debug("took the writer lock of %s", self.index_dir)

    def _acquire_filelock(self) -> None:  # pragma: no cover - Windows
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise self._locked_error("") from None
        self._fallback = lock

    def _locked_error(self, holder: str) -> IndexLockedError:
        who = f"another process (pid {holder})" if holder.isdigit() else "another process"
        return IndexLockedError(
            f"index {self.index_dir} is being written by {who}; wait for it to finish or stop "
            "it, then retry (searching the index meanwhile is fine)"
        )

    def release(self) -> None:
        """Drop the lock; harmless when not held."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the last descriptor releases the flock
            logger.debug("released the writer lock of %s", self.index_dir)
        if self._fallback is not None:  # pragma: no cover - Windows
            self._fallback.release()
            self._fallback = None
