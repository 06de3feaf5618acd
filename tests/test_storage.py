"""The storage helper: SQLite transactions and kv, append-then-commit writes, generation
compaction, atomic replace, leftovers, the writer lock. Real files in ``tmp_path``; a lock
held by another process runs in a subprocess (``flock`` belongs to an open file
description, and the kernel drops it when its process dies)."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import read_only_view
from index_helpers import run_python

import lookalike.storage as storage
from lookalike.errors import IndexLockedError, IndexStateError, StorageError
from lookalike.storage import (
    Database,
    WriterLock,
    atomic_write,
    atomic_write_bytes,
    remove_leftovers,
    switch_data_file,
    write_at,
    write_new_file,
)

SCHEMA = "CREATE TABLE IF NOT EXISTS items (x INTEGER NOT NULL);"
DAMAGED = "the store is damaged, delete it"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store.sqlite"


@pytest.fixture
def db(db_path: Path):
    database = Database(db_path, SCHEMA, create=True, initial={"gen": 0, "name": "a"})
    yield database
    database.close()


def count(db: Database) -> int:
    return db.conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]


# -- Database ------------------------------------------------------------------------------


def test_write_commits_and_an_exception_rolls_back(db: Database, db_path: Path) -> None:
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other = Database(db_path)
    with db.write() as conn:
        conn.execute("INSERT INTO items VALUES (1)")
        db.kv_set("gen", 1)
    assert count(other) == 1 and other.kv_int("gen") == 1  # committed: another connection sees
    with pytest.raises(KeyError), db.write() as conn:
        conn.execute("INSERT INTO items VALUES (2)")
        db.kv_set("gen", 2)
        raise KeyError("a bug in the caller")
    assert not db.conn.in_transaction
    assert count(db) == count(other) == 1 and db.kv_int("gen") == other.kv_int("gen") == 1
    with pytest.raises(sqlite3.IntegrityError), db.write() as conn:
        conn.execute("INSERT INTO items VALUES (3)")
        conn.execute("INSERT INTO items VALUES (NULL)")  # the statement fails: all is undone
    assert count(db) == 1
    other.close()


def test_snapshot_is_isolated_from_other_commits(db: Database, db_path: Path) -> None:
    other = Database(db_path)
    with db.snapshot():
        assert count(db) == 0
        with other.write() as conn:
            conn.execute("INSERT INTO items VALUES (1)")
            other.kv_set("name", "b")
        assert count(db) == 0 and db.kv_get("name") == "a"  # the state the snapshot began in
    assert count(db) == 1 and db.kv_get("name") == "b"
    other.close()


def test_kv_get_set_int_delete(db: Database, db_path: Path) -> None:
    assert db.kv_get("name") == "a" and db.kv_int("gen") == 0
    assert db.kv_get("missing") is None and db.kv_get("missing", "x") == "x"
    assert db.kv_int("missing") == 0 and db.kv_int("missing", 7) == 7
    with db.write():
        db.kv_set("gen", 12)
        db.kv_set("name", "b")  # replaces
        db.kv_delete("missing")  # deleting an absent key is fine
    assert db.kv_int("gen") == 12 and db.kv_get("gen") == "12" and db.kv_get("name") == "b"
    with db.write():
        db.kv_delete("name")
    assert db.kv_get("name") is None
    again = Database(db_path, SCHEMA, create=True, initial={"gen": 99, "new": 1})
    assert again.kv_int("gen") == 12 and again.kv_int("new") == 1  # initial keeps existing keys
    again.close()


def test_data_version_changes_when_another_connection_commits(db: Database, db_path: Path):
    other = Database(db_path)
    before = db.data_version()
    with db.write():
        db.kv_set("gen", 1)
    assert db.data_version() == before  # its own commits do not count
    with other.write():
        other.kv_set("gen", 2)
    after = db.data_version()
    assert after != before and db.data_version() == after  # stable until the next commit
    other.close()


def test_missing_or_broken_database_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IndexStateError) as info:
        Database(tmp_path / "nope.sqlite", damaged=DAMAGED)
    assert str(info.value) == f"{tmp_path / 'nope.sqlite'} is missing; {DAMAGED}"
    assert not (tmp_path / "nope.sqlite").exists()  # a reader creates nothing
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    for create in (False, True):
        with pytest.raises(IndexStateError, match=f"cannot open .*not a database.*; {DAMAGED}"):
            Database(tmp_path / "junk.sqlite", SCHEMA, create=create, damaged=DAMAGED)


def test_a_truncated_database_is_refused_unless_its_log_holds_the_pages(tmp_path: Path):
    """SQLite reads a truncated file's missing pages as absent rows: the header's page
    count is checked first (a write-ahead log beside it may hold those pages)."""
    path = tmp_path / "t.sqlite"
    db = Database(path, SCHEMA, create=True, damaged=DAMAGED)
    with db.write() as conn:
        conn.executemany("INSERT INTO kv(key, value) VALUES (?, ?)",
                         [(f"k{i}", "x" * 500) for i in range(100)])  # fmt: skip
    db.close()
    size = path.stat().st_size
    assert size > 4 * 4096 and not path.with_name("t.sqlite-wal").exists()
    Database(path, damaged=DAMAGED).close()  # sound: opens
    with open(path, "r+b") as f:
        f.truncate(size - 4096 - 100)
    with pytest.raises(IndexStateError, match=f"t.sqlite is truncated .*; {DAMAGED}"):
        Database(path, damaged=DAMAGED)
    path.with_name("t.sqlite-wal").write_bytes(b"\0" * 32)  # a log: its pages may be there
    storage.check_sqlite_size(path, DAMAGED)


# -- append-then-commit ------------------------------------------------------------------------


def test_write_at_writes_at_the_offset_and_cuts_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    write_at(path, b"abcdef", 0, DAMAGED)  # creates the file
    assert path.read_bytes() == b"abcdef"
    write_at(path, b"XY", 2, DAMAGED)  # the committed end was 2: "cdef" was a crashed write
    assert path.read_bytes() == b"abXY"
    write_at(path, np.arange(3, dtype=np.uint8), 4, DAMAGED)  # appending at the end
    assert path.read_bytes() == b"abXY\x00\x01\x02"
    write_at(path, memoryview(b"Z"), 7, DAMAGED)
    assert path.read_bytes() == b"abXY\x00\x01\x02Z"
    write_at(path, b"", 3, DAMAGED)  # nothing to write: only the cut
    assert path.read_bytes() == b"abX"


def test_write_at_refuses_a_file_shorter_than_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"abc")
    with pytest.raises(IndexStateError) as info:
        write_at(path, b"x", 10, DAMAGED)
    assert str(info.value) == (
        f"{path} holds 3 bytes but its database references 10; {DAMAGED}"
    )  # fmt: skip
    assert path.read_bytes() == b"abc"
    with pytest.raises(IndexStateError, match="holds 0 bytes"):
        write_at(tmp_path / "gone.bin", b"x", 4, DAMAGED)
    assert not (tmp_path / "gone.bin").exists()  # refused: no empty file left behind


# -- generation compaction -----------------------------------------------------------------------


def test_switch_points_kv_at_the_new_file_and_deletes_the_old(db: Database, db_path: Path):
    root = db_path.parent
    (root / "data.0.bin").write_bytes(b"old old old")
    with db.write():
        db.kv_set("data_file", "data.0.bin")
    target = root / "data.1.bin"
    assert write_new_file(target, [b"ab", memoryview(b"cd"), np.ones(2, np.uint8)]) == 6
    assert target.read_bytes() == b"abcd\x01\x01"

    def update(conn: sqlite3.Connection) -> None:
        assert conn.in_transaction  # one transaction with the switch
        conn.execute("INSERT INTO items VALUES (1)")

    assert switch_data_file(db, "data_file", target, update) == root / "data.0.bin"
    assert not (root / "data.0.bin").exists() and target.exists()
    other = Database(db_path)
    assert other.kv_get("data_file") == "data.1.bin" and count(other) == 1
    other.close()
    # already pointing at the target: nothing deleted
    assert switch_data_file(db, "data_file", target, lambda conn: None) is None
    assert target.exists()
    # no previous file recorded
    (root / "other.bin").write_bytes(b"x")
    assert switch_data_file(db, "other_file", root / "other.bin", lambda conn: None) is None
    assert db.kv_get("other_file") == "other.bin" and (root / "other.bin").exists()


def test_failed_switch_deletes_the_target_and_keeps_the_old(db: Database, db_path: Path):
    root = db_path.parent
    (root / "data.0.bin").write_bytes(b"old")
    with db.write():
        db.kv_set("data_file", "data.0.bin")
    target = root / "data.1.bin"
    write_new_file(target, [b"new"])

    def update(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO items VALUES (1)")
        raise RuntimeError("a writer appended meanwhile")

    with pytest.raises(RuntimeError, match="appended"):
        switch_data_file(db, "data_file", target, update)
    assert not target.exists() and (root / "data.0.bin").read_bytes() == b"old"
    assert db.kv_get("data_file") == "data.0.bin" and count(db) == 0  # rolled back
    # a failure while the target is the file in use must not delete it
    with pytest.raises(RuntimeError):
        switch_data_file(db, "data_file", root / "data.0.bin", update)
    assert (root / "data.0.bin").read_bytes() == b"old"


def test_write_new_file_removes_a_partial_target(tmp_path: Path) -> None:
    def chunks():
        yield b"first"
        raise OSError("read error")

    with pytest.raises(OSError, match="read error"):
        write_new_file(tmp_path / "data.2.bin", chunks())
    assert not (tmp_path / "data.2.bin").exists()


# -- atomic replace, leftovers -------------------------------------------------------------------


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "state.json"
    atomic_write_bytes(path, b"one")
    digest = atomic_write(path, lambda stream: stream.write(b"two"))
    assert path.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert digest == hashlib.blake2b(b"two", digest_size=32).hexdigest()

    def failing(stream) -> None:
        stream.write(b"half")
        raise OSError("disk full")

    for unique in (False, True):
        with pytest.raises(OSError, match="disk full"):
            atomic_write(path, failing, unique=unique)
        assert path.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == [path.name]

    def no_rename(src: object, dst: object) -> None:
        raise PermissionError("rename refused")

    monkeypatch.setattr(storage.os, "replace", no_rename)
    with pytest.raises(PermissionError):
        atomic_write_bytes(path, b"three")
    assert path.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_unique_scratch_files_of_concurrent_writers_differ(tmp_path: Path) -> None:
    path = tmp_path / "dba.npz"
    both_writing = threading.Barrier(2, timeout=10)
    scratch: dict[str, set[str]] = {}
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        def write(stream) -> None:
            stream.write(name.encode() * 1000)
            both_writing.wait()  # both scratch files exist at once
            scratch[name] = {p.name for p in tmp_path.iterdir()}
            both_writing.wait()

        try:
            atomic_write(path, write, unique=True)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    (seen,) = {frozenset(names) for names in scratch.values()}
    assert len(seen) == 2  # two scratch files at once, neither overwriting the other
    assert all(n.startswith("dba.npz.") and n.endswith(".tmp") for n in seen)
    assert path.read_bytes() in (b"a" * 1000, b"b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["dba.npz"]  # no scratch left


def test_remove_leftovers(tmp_path: Path) -> None:
    for name in ("a.tmp", "b.index.tmp", "keep.txt", "data.3.bin"):
        (tmp_path / name).write_text(name)
    removed = remove_leftovers(tmp_path, lambda n: n.endswith(".tmp") or n == "data.3.bin")
    assert sorted(removed) == ["a.tmp", "b.index.tmp", "data.3.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    assert remove_leftovers(tmp_path, lambda n: n.endswith(".tmp")) == []


# -- the writer lock -----------------------------------------------------------------------------


def test_second_lock_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    first, second = WriterLock(tmp_path / "lock", tmp_path), WriterLock(tmp_path / "lock", tmp_path)
    first.acquire()
    assert first.held and (tmp_path / "lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(IndexLockedError) as info:
        second.acquire()  # same process, another open file description: refused too
    message = str(info.value)
    assert f"index {tmp_path} is being written by another process (pid {os.getpid()})" in message
    assert "retry" in message and not second.held
    first.release()
    assert not first.held and (tmp_path / "lock").read_text() == ""
    first.release()  # harmless
    second.acquire()  # released: free again
    assert second.held
    second.release()


CHILD_LOCK = """
import sys, time
from pathlib import Path
from lookalike.storage import WriterLock
WriterLock(Path(sys.argv[1]) / "lock", Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    child = run_python(CHILD_LOCK, str(tmp_path))
    try:
        assert child.stdout.readline().strip() == "locked", child.stderr.read()
        lock = WriterLock(tmp_path / "lock", tmp_path)
        with pytest.raises(IndexLockedError, match=f"pid {child.pid}"):
            lock.acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    lock.acquire()  # the kernel dropped the dead holder's lock: no stale lock file
    assert lock.held and (tmp_path / "lock").read_text() == f"{os.getpid()}\n"
    lock.release()


def test_a_database_in_a_read_only_directory_opens_read_only(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    db = Database(folder / "x.sqlite", create=True, initial={"n": 3})
    db.close()  # the last connection closed: no WAL index file left to share
    with read_only_view(folder) as ro:
        reader = Database(ro / "x.sqlite")
        try:
            assert reader.read_only and reader.kv_int("n") == 3
            with pytest.raises(StorageError, match=r"x\.sqlite: it is read-only"), reader.write():
                reader.kv_set("n", 4)
        finally:
            reader.close()
        assert sorted(p.name for p in ro.iterdir()) == ["x.sqlite"]  # nothing written


def test_a_read_only_copy_with_unapplied_wal_commits_is_refused(tmp_path: Path) -> None:
    """Opened immutable, SQLite would read the main file only: refuse rather than lie."""
    import shutil

    live = tmp_path / "live"
    live.mkdir()
    db = Database(live / "x.sqlite", create=True, initial={"n": 1})
    db.conn.execute("PRAGMA wal_autocheckpoint=0")
    with db.write():
        db.kv_set("n", 2)  # committed, but only in x.sqlite-wal
    folder = tmp_path / "copy"
    folder.mkdir()
    shutil.copy(live / "x.sqlite", folder / "x.sqlite")
    shutil.copy(live / "x.sqlite-wal", folder / "x.sqlite-wal")  # a copy without the -shm
    db.close()
    assert (folder / "x.sqlite-wal").stat().st_size > 0
    with read_only_view(folder) as ro, pytest.raises(IndexStateError, match=r"x\.sqlite-wal"):
        Database(ro / "x.sqlite")
