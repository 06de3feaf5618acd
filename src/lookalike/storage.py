"""The one storage helper of lookalike: durable files, SQLite transactions, the writer lock.

Both on-disk stores (the index, :mod:`lookalike.index`, and its local features,
:mod:`lookalike.local.store`) are built from these pieces:

* **Atomic replace** (:func:`atomic_write`): a file that readers open by name is written to
  a scratch name in the same directory, flushed and fsynced, ``os.replace``d over the target,
  and the directory fsynced so the rename itself survives a power cut. A scratch file left by
  a crash is never read and is deleted by the next writer.
* **A SQLite database** (:class:`Database`): WAL mode (readers keep a snapshot while one
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
from collections.abc import Callable, Iterable, Iterator
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
from lookalike.errors import IndexLockedError, IndexStateError, StorageError

T = TypeVar("T")

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
SIDE_FILES = ("-wal", "-shm", "-journal")  # what SQLite keeps beside a database file


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


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_sqlite_size(path: Path, damaged: str, attempts: int = 3) -> None:
    """``IndexStateError`` when the SQLite file at ``path`` is shorter than its header says.

    SQLite takes a truncated file's missing pages as absent, so its rows would silently go
    missing; the header's page count (when valid: the change counter equals the
    version-valid-for number) is the size a sound file has at least, unless a write-ahead
    log is beside it: a checkpoint interrupted (by a full disk) or running in another
    process leaves pages only in the log, which SQLite reads from there; a short file is also
    looked at again before it is called damaged. A stat or two and one 100-byte read.
    """
    wal = path.with_name(path.name + "-wal")
    for attempt in range(attempts):
        st = check_entry(wal)
        if st is not None and st.st_size > 0:
            return
        fd = open_fd(path, os.O_RDONLY)
        try:
            header = os.pread(fd, 100, 0)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
            return  # not a database at all: SQLite says so when it is opened
        page = int.from_bytes(header[16:18], "big")
        page = 65536 if page == 1 else page
        pages = int.from_bytes(header[28:32], "big")
        if header[24:28] != header[92:96] or size >= pages * page:
            return
        if attempt + 1 < attempts:
            time.sleep(0.05 * (attempt + 1))
    raise IndexStateError(
        f"{path} is truncated ({size} bytes; its header says {pages} pages of {page}); {damaged}"
    )


class Database:
    """A SQLite file with explicit transactions and a ``kv`` table.

    Args:
        path: the database file.
        schema: ``CREATE TABLE IF NOT EXISTS`` statements run when creating; a ``kv(key TEXT
            PRIMARY KEY, value TEXT)`` table is always added.
        create: create the file and schema if missing (writers); readers require the file.
        initial: ``kv`` entries set when creating (existing keys are kept).
        damaged: what to tell the user when the file is missing or unreadable.

    Raises:
        IndexStateError: the file is missing (without ``create``) or not a readable database.
    """

    def __init__(
        self,
        path: Path,
        schema: str = "",
        *,
        create: bool = False,
        initial: dict[str, object] | None = None,
        damaged: str = "rebuild it",
    ) -> None:
        self.path = path
        self.damaged = damaged
        self.read_only = False  # opened without write access (a read-only directory)
        self.unwritable: StorageError | None = None  # why writes are refused (a full disk)
        # SQLite opens these by name and follows links: each must be a plain file or absent
        exists = check_entry(path) is not None
        for suffix in SIDE_FILES:
            check_entry(path.with_name(path.name + suffix))
        if not create and not exists:
            raise IndexStateError(f"{path} is missing; {damaged}")
        if exists:
            check_sqlite_size(path, damaged)
        try:
            self.conn = self._connect("rwc" if create else "rw")
        except sqlite3.OperationalError as error:
            mapped = storage_error(error, path)
            if create and mapped is not None:
                raise mapped from None
            if not create and mapped is not None and os.access(path.parent, os.W_OK):
                # a full disk: SQLite cannot make its shared-memory file; read without it
                # where that is sound, and refuse writes saying why
                self.unwritable = mapped
                try:
                    self.conn = self._connect_read_only(error)
                except IndexStateError:
                    raise mapped from None
            elif create or os.access(path.parent, os.W_OK):
                raise IndexStateError(f"cannot open {path} ({error}); {damaged}") from None
            else:
                self.conn = self._connect_read_only(error)
        try:
            if create:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.executescript(
                    schema + "\nCREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT);"
                )
                with self.write():
                    for key, value in (initial or {}).items():
                        self.conn.execute(
                            "INSERT OR IGNORE INTO kv(key, value) VALUES (?, ?)", (key, str(value))
                        )
        except sqlite3.DatabaseError as error:
            with contextlib.suppress(Exception):
                self.conn.close()
            mapped = storage_error(error, path)
            if mapped is not None:
                raise mapped from None
            raise IndexStateError(f"cannot open {path} ({error}); {damaged}") from None

    def _connect(self, mode: str) -> sqlite3.Connection:
        """A connection in ``mode`` (``rwc``, ``rw``, ``ro``, ``ro&immutable=1``), checked by
        one read (SQLite opens lazily); ``DatabaseError`` for a damaged file."""
        uri = f"{self.path.resolve().as_uri()}?mode={mode}"
        # isolation_level=None: no implicit transactions, we issue BEGIN ourselves.
        conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        try:
            if not mode.startswith("ro"):
                conn.execute("PRAGMA synchronous=FULL")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except UnicodeDecodeError:  # SQLite's message quotes a garbled schema
            conn.close()
            raise IndexStateError(
                f"cannot open {self.path} (its schema is garbled); {self.damaged}"
            ) from None
        except sqlite3.DatabaseError as error:
            conn.close()
            if isinstance(error, sqlite3.OperationalError):
                raise
            raise IndexStateError(f"cannot open {self.path} ({error}); {self.damaged}") from None
        return conn

    def _connect_read_only(self, error: sqlite3.OperationalError) -> sqlite3.Connection:
        """A directory this process cannot write: read-only, or, when SQLite cannot make
        the WAL index file either (no writer has it open), immutable: the file is then
        taken not to change while it is open, which a directory nobody here can write
        guarantees for this process."""
        self.read_only = True
        for mode in ("ro", "ro&immutable=1"):
            wal = self.path.with_name(f"{self.path.name}-wal")
            if "immutable" in mode and wal.exists() and wal.stat().st_size > 0:
                # immutable reads the main file only: committed changes still in the WAL
                # would be silently missing
                raise IndexStateError(
                    f"cannot open {self.path} read-only: its directory is not writable and "
                    f"{wal.name} holds commits a read-only reader cannot apply; open it once "
                    "where it is writable (any lookalike command checkpoints it)"
                )
            try:
                conn = self._connect(mode)
            except sqlite3.OperationalError as last:
                error = last
                continue
            logger.debug("opened %s read-only (%s)", self.path, mode)
            return conn
        raise IndexStateError(f"cannot open {self.path} read-only ({error}); {self.damaged}")

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), rolled back on any exception.

        SQLite's lock serialises the writers of every process; readers never wait.
        """
        if self.unwritable is not None:
            raise self.unwritable
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            mapped = storage_error(error, self.path)
            if mapped is not None:
                raise mapped from None
            raise
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException as error:
            if self.conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            mapped = storage_error(error, self.path) if isinstance(error, sqlite3.Error) else None
            if mapped is not None:
                raise mapped from None
            raise

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query inside sees the same committed state."""
        self.conn.execute("BEGIN")
        try:
            yield self.conn
        finally:
            self.conn.execute("COMMIT")

    def data_version(self) -> int:
        """A number that changes whenever another connection commits (``PRAGMA
        data_version``): a change check costing one statement."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def kv_get(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def kv_int(self, key: str, default: int = 0) -> int:
        value = self.kv_get(key)
        return default if value is None else int(value)

    def kv_set(self, key: str, value: object) -> None:
        self.conn.execute(
            "INSERT INTO kv(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, str(value)),
        )

    def kv_delete(self, key: str) -> None:
        self.conn.execute("DELETE FROM kv WHERE key = ?", (key,))

    @contextlib.contextmanager
    def damage_as_error(self) -> Iterator[None]:
        """What SQLite raises for a damaged file (a malformed page, garbled text), as one
        ``IndexStateError`` naming the file; locked, busy and I/O errors pass through."""
        try:
            yield
        except UnicodeDecodeError:  # SQLite's message quotes garbled bytes
            raise IndexStateError(
                f"{self.path} is damaged (garbled text); {self.damaged}"
            ) from None
        except sqlite3.DatabaseError as error:
            text = str(error)
            if isinstance(error, sqlite3.OperationalError) and "decode" not in text:
                raise
            raise IndexStateError(f"{self.path} is damaged ({text}); {self.damaged}") from None

    def integrity_problems(self) -> list[str]:
        """What SQLite's ``PRAGMA integrity_check`` finds (empty: the file is sound)."""
        try:
            rows = self.conn.execute("PRAGMA integrity_check").fetchall()
        except sqlite3.DatabaseError as error:
            return [str(error)]
        found = [str(row[0]) for row in rows]
        return [] if found == ["ok"] else found


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
