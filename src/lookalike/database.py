"""A SQLite database file as lookalike's stores use it (:class:`Database`): WAL mode,
``synchronous=FULL``, explicit transactions and a ``kv`` table; and the check of a file's
size against its header's page count (:func:`check_sqlite_size`). Part of the storage
helper, :mod:`lookalike.storage`, which re-exports both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from lookalike.confined import check_entry, open_fd, storage_error
from lookalike.errors import IndexStateError, StorageError

T = TypeVar("T")

logger = logging.getLogger(__name__)

SIDE_FILES = ("-wal", "-shm", "-journal")  # what SQLite keeps beside a database file

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


__all__ = ["SIDE_FILES", "SQLITE_MAGIC", "Database", "check_sqlite_size"]
