"""The last line of defence of the ``lookalike`` command: every fault becomes one line.

The stages raise :class:`~lookalike.errors.LookalikeError` for what a user can cause, and the
storage helper turns disk and permission faults into :class:`~lookalike.errors.StorageError`.
What still reaches :func:`lookalike.cli.main` as a plain ``OSError`` or ``sqlite3`` error is
mapped here by errno (or SQLite's message) to a message and an exit code; anything else is a
bug in lookalike, reported in one line too (its traceback is logged at DEBUG, ``-vv``).

Exit codes (documented in the README): 0 success; 1 any other error (an unreadable file
outside an index, a bug); 2 bad usage or configuration; 3 bad image (``search``: at least one
query failed); 4 wrong, missing or damaged index; 5 index locked by another writer; 6 the
disk is full or a directory is read-only or not permitted (the index stays valid); 130
interrupted.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from pathlib import Path

from lookalike.errors import (
    IndexLockedError,
    IndexStateError,
    LookalikeError,
    StorageError,
)

logger = logging.getLogger(__name__)

OTHER_ERROR = 1  # LookalikeError.exit_code: an error of no more specific kind, or a bug
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_PERMITTED = (errno.EROFS, errno.EACCES, errno.EPERM)
# SQLite's messages (it gives no errno) for a full disk and an unwritable directory
SQLITE_NO_SPACE = ("database or disk is full",)
SQLITE_NOT_PERMITTED = ("readonly database", "unable to open database file")
SQLITE_LOCKED = ("database is locked",)
SQLITE_IO = ("disk i/o error",)
# faiss reports a failed write as a RuntimeError naming strerror
FAISS_NO_SPACE = ("no space left on device", "disk quota exceeded")


def no_space(where: str | Path) -> str:
    return (
        f"no space left on the device holding {where}: free space and rerun; what was "
        "committed is kept"
    )


def fault(error: BaseException, index: Path | None) -> tuple[str, int]:
    """``(one-line message, exit code)`` for an error that reached the command line.

    Args:
        error: what the command raised.
        index: the command's ``--index`` directory, if it has one (names the place).
    """
    if isinstance(error, LookalikeError):
        return str(error), error.exit_code
    if isinstance(error, OSError):
        return _os_fault(error, index)
    if isinstance(error, sqlite3.Error):
        return _sqlite_fault(error, index)
    if isinstance(error, RuntimeError) and _mentions(error, FAISS_NO_SPACE):
        return no_space(index or "the index"), StorageError.exit_code
    if isinstance(error, MemoryError):
        return "out of memory: close other programs or use a smaller --chunk", OTHER_ERROR
    logger.debug("unexpected error", exc_info=error)
    name = type(error).__name__
    return (
        f"unexpected {name}: {error} (a bug in lookalike; rerun with -vv for the traceback "
        "and report it)",
        OTHER_ERROR,
    )


def _os_fault(error: OSError, index: Path | None) -> tuple[str, int]:
    where = error.filename or index or "the current directory"
    if error.errno in NO_SPACE:
        return no_space(where), StorageError.exit_code
    if error.errno == errno.EROFS:
        return (
            f"{where} is on a read-only file system: make it writable (or copy the index "
            "elsewhere) and rerun; what was committed is kept",
            StorageError.exit_code,
        )
    if error.errno in NOT_PERMITTED:
        return (
            f"permission denied: {where}: fix the permission and rerun; what was committed is kept",
            StorageError.exit_code,
        )
    if error.errno == errno.ENOENT and index is not None and _inside(error.filename, index):
        return (
            f"index file {error.filename} is missing: the index {index} is damaged; "
            f"`lookalike check --index {index}` names what to repair",
            IndexStateError.exit_code,
        )
    text = error.strerror or str(error)
    return (f"{text}: {error.filename}" if error.filename else text), OTHER_ERROR


def _sqlite_fault(error: sqlite3.Error, index: Path | None) -> tuple[str, int]:
    where = index / "meta.sqlite" if index is not None else "the index database"
    if _mentions(error, SQLITE_NO_SPACE):
        return no_space(index or where), StorageError.exit_code
    if _mentions(error, SQLITE_LOCKED):
        return (
            f"{where} is locked by another process: wait for it to finish and rerun",
            IndexLockedError.exit_code,
        )
    if _mentions(error, SQLITE_NOT_PERMITTED):
        return (
            f"cannot write {where} ({error}): the directory is read-only or not permitted; "
            "fix the permission and rerun; what was committed is kept",
            StorageError.exit_code,
        )
    if _mentions(error, SQLITE_IO):
        return f"disk I/O error on {where}: check the disk and rerun", StorageError.exit_code
    return (
        f"{where} is damaged ({error}): `lookalike check --index {index}` names what to repair",
        IndexStateError.exit_code,
    )


def _mentions(error: BaseException, words: tuple[str, ...]) -> bool:
    text = str(error).lower()
    return any(w in text for w in words)


def _inside(filename: object, folder: Path) -> bool:
    if not isinstance(filename, str | Path):
        return False
    try:
        return Path(filename).resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):
        return False
