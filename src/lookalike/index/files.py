"""Durable file primitives: atomic replace, directory fsync and the single-writer lock.

Every file that readers open by name is replaced atomically: written to ``<name>.tmp`` in
the same directory, flushed and fsynced, ``os.replace``d over the target, and the directory
fsynced so the rename itself survives a power cut. A ``*.tmp`` left by a crash is never read
and is deleted by the next writer.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from lookalike.errors import IndexLockedError, IndexStateError

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
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path(path: Path) -> Path:
    """The scratch name used while ``path`` is being written."""
    return path.with_name(path.name + TMP_SUFFIX)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Create or replace ``path`` atomically; ``write(tmp)`` fills the scratch file."""
    tmp = tmp_path(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Create or replace ``path`` with ``data`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def remove_durably(paths: list[Path]) -> None:
    """Delete files (missing ones are fine) and make the deletions durable."""
    if not paths:
        return
    for path in paths:
        path.unlink(missing_ok=True)
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
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
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
