"""The files of a store directory: fixed names, never a link, digests taken while reading.

Every file an index (or its local-feature store) reads or writes is a fixed name inside its
directory. A name that comes from the store's own data (a ``kv`` entry, the manifest) is
checked to be a plain file name of the expected pattern first (:func:`plain_name`), so a
damaged or hostile entry like ``../../x`` never reaches the file system; the directory
entry is checked with ``lstat`` (:func:`check_entry`): absent, or a regular file (a symbolic
link, a directory, a fifo or a device is refused, naming it); and the file is opened with
``O_NOFOLLOW`` (:func:`open_fd`), which closes the race between the check and the open.
Only the store directory itself may be reached through a link the user made.

File contents are checked with blake2b-256 digests (hex, :func:`new_digest`), taken while a
file is written (:class:`DigestWriter`) or read (:func:`read_bytes`, :class:`DigestReader`).

Errors the environment causes while writing (a full disk, a read-only file system, a missing
permission) become one :class:`~lookalike.errors.StorageError` saying what to do
(:func:`storage_errors`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

from lookalike.errors import IndexStateError, StorageError

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a fifo planted at a fixed name never blocks us
READ_CHUNK = 1 << 22  # bytes read per call while hashing a file

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_READ_ONLY = {errno.EROFS}
_DENIED = {errno.EACCES, errno.EPERM}
_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a fifo"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


# -- names and directory entries -------------------------------------------------------------


def plain_name(name: object, pattern: re.Pattern[str] | None, source: str, damaged: str) -> str:
    """``name`` if it is a plain file name (no separator, not ``.``/``..``) that
    ``pattern`` matches in full; a name read from a store's own data goes through here.

    Args:
        name: the value read.
        pattern: what the store itself writes there (None: any plain name).
        source: where it was read, for the message (``"meta.sqlite's vectors_file"``).
        damaged: what to tell the user to do.

    Raises:
        IndexStateError: anything else (a path, an absolute name, an unexpected name).
    """
    ok = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and (pattern is None or pattern.fullmatch(name) is not None)
    )
    if not ok:
        raise IndexStateError(
            f"{source} is {name!r}, not a file name of this store (lookalike reads and writes "
            f"only fixed names inside it); {damaged}"
        )
    return name  # type: ignore[return-value]


class EntryRefused(IndexStateError):
    """A fixed name of a store is a link, a directory or another non-regular file."""


def refusal(path: Path, mode: int) -> EntryRefused:
    """The error for a directory entry at a fixed name that is not a regular file."""
    kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
    if stat.S_ISLNK(mode):
        return EntryRefused(
            f"{path} is a symbolic link; lookalike never follows links inside an index: move "
            "it away"
        )
    return EntryRefused(f"{path} is {kind}, not a file lookalike wrote: move it away")


def check_entry(path: Path) -> os.stat_result | None:
    """``lstat`` of a fixed name: None when absent, the stat of a regular file.

    Raises:
        IndexStateError: a symbolic link, directory, fifo, socket or device (named).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise refusal(path, st.st_mode)
    return st


def check_dir(path: Path) -> bool:
    """Whether the sub-directory ``path`` of a store exists (a real directory, not a link).

    Raises:
        IndexStateError: a symbolic link or anything else than a directory.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        if stat.S_ISLNK(st.st_mode):
            raise refusal(path, st.st_mode)
        raise EntryRefused(f"{path} is not a directory lookalike made: move it away")
    return True


def open_fd(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that never follows a symbolic link at ``path`` and opens only a regular
    file (``O_NOFOLLOW``, checked with ``fstat``); OSError otherwise as ``os.open`` raises it.

    Raises:
        IndexStateError: ``path`` is a link, a directory or another non-regular file.
    """
    try:
        fd = os.open(path, flags | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK, mode)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EMLINK):  # EMLINK: FreeBSD's O_NOFOLLOW
            raise refusal(path, stat.S_IFLNK) from None
        if error.errno in (errno.EISDIR, errno.ENXIO):
            st = os.lstat(path)
            raise refusal(path, st.st_mode) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refusal(path, st.st_mode)
        if O_NONBLOCK:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_read(path: Path) -> io.BufferedReader:
    """A binary file object reading ``path`` (see :func:`open_fd`)."""
    return os.fdopen(open_fd(path, os.O_RDONLY), "rb")


def unlink_entry(path: Path) -> None:
    """Delete the directory entry ``path`` itself (a link is removed, never its target)."""
    Path(path).unlink(missing_ok=True)


# -- digests -----------------------------------------------------------------------------------


def new_digest() -> hashlib.blake2b:
    """The digest every checked file of a store uses: blake2b-256, hex."""
    return hashlib.blake2b(digest_size=32)


class DigestWriter(io.RawIOBase):
    """A write-only, non-seekable stream into ``fd`` that hashes what it writes (zip
    writers, as ``np.savez``, then write sequentially instead of seeking back)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.hash = new_digest()
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            written += os.write(self.fd, view[written:])
        self.hash.update(view)
        self.written += len(view)
        return len(view)

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


class DigestReader:
    """Reads a file sequentially, hashing every byte handed out (faiss's callback reader
    calls :meth:`read`); :meth:`finish` hashes the rest and returns the digest."""

    def __init__(self, path: Path) -> None:
        self.file = open_read(path)
        self.hash = new_digest()

    def read(self, n: int) -> bytes:
        data = self.file.read(n)
        self.hash.update(data)
        return data

    def finish(self) -> str:
        while chunk := self.file.read(READ_CHUNK):
            self.hash.update(chunk)
        return self.hash.hexdigest()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> DigestReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_bytes(path: Path) -> tuple[bytes, str]:
    """The whole content of ``path`` and its digest (see :func:`open_fd` for refusals)."""
    with DigestReader(path) as reader:
        chunks = []
        while chunk := reader.read(READ_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks), reader.finish()


def file_digest(path: Path) -> str:
    """The digest of the file at ``path`` (read, never kept)."""
    with DigestReader(path) as reader:
        return reader.finish()


# -- what the environment refuses ----------------------------------------------------------------


NEARLY_FULL = 1 << 20  # bytes free below which SQLite's "disk I/O error" means a full disk


def nearly_full(path: Path | str) -> bool:
    """Whether the file system holding ``path`` (or its nearest existing folder) has less
    than :data:`NEARLY_FULL` bytes free for this user."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        st = os.statvfs(where)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < NEARLY_FULL


def storage_error(error: BaseException, path: Path | str) -> StorageError | None:
    """The :class:`StorageError` for a write refused by the environment, None for others.

    SQLite reports a shared-memory or log file it cannot extend as "disk I/O error": on a
    file system with (nearly) no space left, that is a full disk.
    """
    reason = None
    if isinstance(error, OSError):
        code = error.errno
        if code in _FULL:
            reason = "the disk is full (or the quota is used up)"
            todo = "free some space and rerun"
        elif code in _READ_ONLY:
            reason = "the file system is read-only"
            todo = "mount it writable or work on a copy (searching it needs no write)"
        elif code in _DENIED:
            reason = "permission denied"
            todo = f"give this user write access to {Path(path).parent} and rerun"
    elif isinstance(error, sqlite3.OperationalError):
        text = str(error).lower()
        full = "disk is full" in text or ("disk i/o error" in text and nearly_full(path))
        if full:
            reason, todo = "the disk is full (or the quota is used up)", "free some space and rerun"
        elif "readonly database" in text or "read-only" in text:
            reason = "it is read-only"
            todo = f"give this user write access to {Path(path).parent} and rerun"
    if reason is None:
        return None
    return StorageError(
        f"cannot write {path}: {reason}; what was committed before is intact: {todo}"
    )


@contextlib.contextmanager
def storage_errors(path: Path | str) -> Iterator[None]:
    """Turn the environment's refusals of a write to ``path`` into one-line StorageErrors."""
    try:
        yield
    except (OSError, sqlite3.OperationalError) as error:
        mapped = storage_error(error, path)
        if mapped is None:
            raise
        raise mapped from None
