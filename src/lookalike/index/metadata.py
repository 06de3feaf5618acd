"""``meta.sqlite``: image rows, the log of vector-set changes, block digests, counters.

SQLite is the source of truth of an index: which images exist, their metadata, which row
(``slot``) of the vector file holds each one's descriptor, and the ``ops`` log from which
any reader can bring a faiss checkpoint up to date. WAL mode lets readers keep a consistent
snapshot while the single writer commits; ``synchronous=FULL`` makes each commit durable.

``images.path`` is the display form of the file name (:func:`~lookalike.index.conf.
display_path`: valid UTF-8), ``images.raw_path`` its bytes when they are not UTF-8 (else
NULL); an image is identified by its file system bytes (``coalesce(raw_path, path)``, one
unique index). ``images.seq`` is the ops seq of the row's last vector change (for
``'error'`` rows, the newest seq when the row was written), so "changed since seq X" is one
query. ``vector_blocks`` holds a digest per block of the vector file's committed rows.
``kv`` keys: ``schema_version``; ``n_rows`` (committed rows of the vector file);
``vectors_file`` (its current name); ``block_rows`` (rows per digest block);
``ops_pruned_through`` (ops with a seq up to this were deleted by a compaction, so replay
must start from a checkpoint at least that recent).

Schema 1 (before non-UTF-8 names and block digests) is read as it is, its blocks
unchecked; a writer migrates it in place (:func:`lookalike.index.upgrade.migrate_schema`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import numpy as np

from lookalike.errors import IndexStateError
from lookalike.index.conf import ImageRecord, NewImage, display_path, display_text, fs_bytes
from lookalike.index.vectors import BLOCK_ROWS, DEFAULT_NAME, Block
from lookalike.storage import Database

logger = logging.getLogger(__name__)

DB_NAME = "meta.sqlite"
SCHEMA_VERSION = 2

IMAGES_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    raw_path BLOB,
    content_hash TEXT,
    size INTEGER,
    mtime REAL,
    width INTEGER,
    height INTEGER,
    metadata TEXT NOT NULL DEFAULT '{{}}',
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    error TEXT,
    slot INTEGER,
    seq INTEGER NOT NULL,
    added TEXT,
    updated TEXT
)"""
KEY = "coalesce(raw_path, CAST(path AS BLOB))"  # an image's file system bytes
IMAGES_INDEXES = (
    f"CREATE UNIQUE INDEX IF NOT EXISTS images_name ON images({KEY})",
    "CREATE INDEX IF NOT EXISTS images_path ON images(path)",
    "CREATE INDEX IF NOT EXISTS images_status ON images(status)",
)
BLOCKS_TABLE = """
CREATE TABLE IF NOT EXISTS vector_blocks (
    block INTEGER PRIMARY KEY,
    rows INTEGER NOT NULL,
    digest TEXT NOT NULL
)"""
OPS_TABLE = """
CREATE TABLE IF NOT EXISTS ops (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('add', 'remove')),
    image_id INTEGER NOT NULL,
    slot INTEGER
)"""
_SCHEMA = (
    ";\n".join([IMAGES_TABLE.format(name="images"), *IMAGES_INDEXES, OPS_TABLE, BLOCKS_TABLE]) + ";"
)

COLUMNS = "id, path, content_hash, size, mtime, width, height, metadata, status, error"
RECORD_COLUMNS = COLUMNS + ", raw_path"
PAGE = 1000  # rows fetched per query when iterating


def to_record(row: tuple) -> ImageRecord:
    """An :class:`ImageRecord` from a row selected with :data:`RECORD_COLUMNS`."""
    return ImageRecord(
        id=int(row[0]),
        path=row[1],
        content_hash=row[2],
        size=row[3],
        mtime=row[4],
        width=row[5],
        height=row[6],
        metadata=json.loads(row[7]) if row[7] else {},
        status=row[8],
        error=row[9],
        raw_path=None if row[10] is None else bytes(row[10]),
    )


def stored_name(path: str) -> tuple[str, bytes | None]:
    """``(display form, bytes or None)``: how a file name is stored (None: it is UTF-8)."""
    raw = fs_bytes(path)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return display_path(raw), raw


def _is_text(path: str) -> bool:
    """Whether ``path`` is valid text (a display form may be), not a file system form
    carrying bytes that are not UTF-8."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json(value: object) -> str:
    """JSON SQLite can store: text that is not UTF-8 (surrogate escapes) is escaped."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, ensure_ascii=True, sort_keys=True)
    return text


class MetaDB(Database):
    """``meta.sqlite`` of one index (see the module docstring).

    Args:
        path: the database file.
        create: create the file and schema if missing (writers); readers require it.
    """

    def __init__(self, path: Path, create: bool = False) -> None:
        super().__init__(
            path,
            _SCHEMA,
            create=create,
            initial={
                "schema_version": SCHEMA_VERSION,
                "n_rows": 0,
                "vectors_file": DEFAULT_NAME,
                "block_rows": BLOCK_ROWS,
                "ops_pruned_through": 0,
            },
            damaged="the index is damaged, rebuild it into a new --index directory",
        )
        self.detect()

    def detect(self) -> None:
        """Read which schema the file has (schema 1: no ``raw_path``, no block digests)."""
        try:
            columns = {row[1] for row in self.conn.execute("PRAGMA table_info(images)")}
            tables = {row[0] for row in self.conn.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as error:
            raise IndexStateError(f"cannot read {self.path} ({error}); {self.damaged}") from None
        if "images" not in tables or "ops" not in tables or "kv" not in tables:
            raise IndexStateError(f"{self.path} holds no index tables; {self.damaged}")
        self.has_raw = "raw_path" in columns
        self.has_blocks = "vector_blocks" in tables
        self._columns = RECORD_COLUMNS if self.has_raw else COLUMNS + ", NULL"
        self._key = KEY if self.has_raw else "CAST(path AS BLOB)"

    def schema_version(self) -> int:
        return self.kv_int("schema_version", 1)

    def block_rows(self) -> int:
        return self.kv_int("block_rows", BLOCK_ROWS)

    # -- block digests ----------------------------------------------------------------------

    def blocks(self) -> dict[int, Block]:
        """The recorded block digests of the current vector file (none for schema 1)."""
        if not self.has_blocks:
            return {}
        rows = self.conn.execute("SELECT block, rows, digest FROM vector_blocks").fetchall()
        return {int(b): Block(int(b), int(n), d) for b, n, d in rows}

    def blocks_of(self, indices: list[int]) -> dict[int, Block]:
        """The recorded digests of the blocks ``indices`` (those recorded)."""
        if not self.has_blocks or not indices:
            return {}
        if len(indices) > 256:  # a large read: the range it spans, in one query
            wanted = set(indices)
            rows = self.conn.execute(
                "SELECT block, rows, digest FROM vector_blocks WHERE block BETWEEN ? AND ?",
                (min(indices), max(indices)),
            ).fetchall()
            rows = [r for r in rows if r[0] in wanted]
        else:
            marks = ",".join("?" * len(indices))
            rows = self.conn.execute(
                f"SELECT block, rows, digest FROM vector_blocks WHERE block IN ({marks})", indices
            ).fetchall()
        return {int(b): Block(int(b), int(n), d) for b, n, d in rows}

    def block(self, index: int) -> Block | None:
        if not self.has_blocks:
            return None
        row = self.conn.execute(
            "SELECT block, rows, digest FROM vector_blocks WHERE block = ?", (index,)
        ).fetchone()
        return None if row is None else Block(int(row[0]), int(row[1]), row[2])

    def set_blocks(self, blocks: list[Block], replace_all: bool = False) -> None:
        """Record block digests (call inside :meth:`write`)."""
        if replace_all:
            self.conn.execute("DELETE FROM vector_blocks")
        self.conn.executemany(
            "INSERT OR REPLACE INTO vector_blocks(block, rows, digest) VALUES (?, ?, ?)",
            [(b.index, b.rows, b.digest) for b in blocks],
        )

    def images_at_slots(self, slots: list[int]) -> list[tuple[int, str]]:
        """``(id, path)`` of the images whose current vector is at one of ``slots``."""
        found: list[tuple[int, str]] = []
        for begin in range(0, len(slots), 500):
            chunk = [int(s) for s in slots[begin : begin + 500]]
            marks = ",".join("?" * len(chunk))
            found += self.conn.execute(
                f"SELECT id, path FROM images WHERE slot IN ({marks}) AND status = 'ok'", chunk
            ).fetchall()
        return sorted(found)

    # -- small queries (run inside or outside a transaction) --------------------------------

    def last_seq(self) -> int:
        """The seq of the newest op ever logged (0 if none), pruned ones included."""
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'ops'").fetchone()
        return 0 if row is None else int(row[0])

    def log_op(self, op: str, image_id: int, slot: int | None) -> int:
        """Append to the ops log; returns the new seq."""
        cur = self.conn.execute(
            "INSERT INTO ops(op, image_id, slot) VALUES (?, ?, ?)", (op, image_id, slot)
        )
        return int(cur.lastrowid)

    def counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall()
        out = {"ok": 0, "error": 0}
        out.update({status: int(n) for status, n in rows})
        return out

    def count_ok(self) -> int:
        row = self.conn.execute("SELECT COUNT(*) FROM images WHERE status = 'ok'").fetchone()
        return int(row[0])

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, slots)`` int64 of every searchable image, ordered by id."""
        rows = self.conn.execute(
            "SELECT id, slot FROM images WHERE status = 'ok' AND slot IS NOT NULL ORDER BY id"
        ).fetchall()
        arr = np.array(rows, dtype=np.int64).reshape(-1, 2)
        return arr[:, 0].copy(), arr[:, 1].copy()

    def live_with_seq(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, slots, seqs)`` int64 of every searchable image, ordered by id; ``seqs`` is
        the ops seq of each row's last vector change."""
        rows = self.conn.execute(
            "SELECT id, slot, seq FROM images WHERE status = 'ok' AND slot IS NOT NULL ORDER BY id"
        ).fetchall()
        arr = np.array(rows, dtype=np.int64).reshape(-1, 3)
        return arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy()

    def ops_after(self, seq: int, limit: int) -> list[tuple[int, str, int, int | None]]:
        """Up to ``limit`` ops with a seq above ``seq``, oldest first."""
        return self.conn.execute(
            "SELECT seq, op, image_id, slot FROM ops WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()

    def get(self, ids: list[int]) -> dict[int, ImageRecord]:
        found: dict[int, ImageRecord] = {}
        for begin in range(0, len(ids), 500):
            chunk = ids[begin : begin + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                f"SELECT {self._columns} FROM images WHERE id IN ({marks})", chunk
            ):
                found[int(row[0])] = to_record(row)
        return found

    def find_path(self, path: str) -> ImageRecord | None:
        """The record of ``path``: its file system form, or the display form of a name that
        is not UTF-8 (as ``info`` shows it)."""
        key = fs_bytes(path)
        row = self.conn.execute(
            f"SELECT {self._columns} FROM images WHERE {self._key} = ?", (key,)
        ).fetchone()
        if row is None and self.has_raw and _is_text(path):
            row = self.conn.execute(
                f"SELECT {self._columns} FROM images WHERE path = ? AND raw_path IS NOT NULL",
                (path,),
            ).fetchone()
        return None if row is None else to_record(row)

    def page(self, after_id: int, status: str | None) -> list[ImageRecord]:
        """The next :data:`PAGE` records with an id above ``after_id``."""
        where = "id > ?" + ("" if status is None else " AND status = ?")
        args: tuple = (after_id,) if status is None else (after_id, status)
        rows = self.conn.execute(
            f"SELECT {self._columns} FROM images WHERE {where} ORDER BY id LIMIT {PAGE}", args
        ).fetchall()
        return [to_record(row) for row in rows]

    def slots_of(self, ids: list[int]) -> dict[int, tuple[str, int | None]]:
        """``id -> (status, slot)`` for the ids that exist."""
        found: dict[int, tuple[str, int | None]] = {}
        for begin in range(0, len(ids), 500):
            chunk = ids[begin : begin + 500]
            marks = ",".join("?" * len(chunk))
            for image_id, status, slot in self.conn.execute(
                f"SELECT id, status, slot FROM images WHERE id IN ({marks})", chunk
            ):
                found[int(image_id)] = (status, slot)
        return found

    # -- writes (call inside :meth:`write`) -------------------------------------------------

    def lookup_paths(
        self, paths: list[str], display: bool = False
    ) -> dict[str, tuple[int, int | None]]:
        """``path -> (id, slot)`` for the paths already stored, keyed as given.

        Args:
            paths: file system forms (bytes that are not UTF-8 as surrogate escapes).
            display: also match the display form of a stored name that is not UTF-8
                (a name typed as ``info`` shows it); a writer adding files never does.
        """
        keys: dict[bytes, str] = {}
        for path in paths:
            keys.setdefault(fs_bytes(path), path)
        found: dict[str, tuple[int, int | None]] = {}
        wanted = list(keys)
        for begin in range(0, len(wanted), 500):
            chunk = wanted[begin : begin + 500]
            marks = ",".join("?" * len(chunk))
            for image_id, key, slot in self.conn.execute(
                f"SELECT id, {self._key}, slot FROM images WHERE {self._key} IN ({marks})", chunk
            ):
                found[keys[bytes(key)]] = (int(image_id), slot)
        rest = [p for p in paths if p not in found and _is_text(p)]
        if display and rest and self.has_raw:
            for begin in range(0, len(rest), 500):
                chunk = rest[begin : begin + 500]
                marks = ",".join("?" * len(chunk))
                for image_id, path, slot in self.conn.execute(
                    f"SELECT id, path, slot FROM images WHERE path IN ({marks}) "
                    "AND raw_path IS NOT NULL",
                    chunk,
                ):
                    found.setdefault(path, (int(image_id), slot))
        return found

    def upsert_image(
        self,
        image_id: int | None,
        image: NewImage,
        slot: int | None,
        seq: int,
        stamp: str,
        new_id: int | None = None,
    ) -> int:
        """Insert ``image`` (``image_id`` None; as id ``new_id`` when given, else the next
        free one) or replace the fields of row ``image_id``."""
        status = "ok" if image.error is None else "error"
        try:
            metadata = _json(image.metadata or {})
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"metadata of {display_path(image.path)} is not JSON-serialisable: {error}"
            ) from None
        fields = (
            image.content_hash,
            image.size,
            image.mtime,
            image.width,
            image.height,
            metadata,
            status,
            None if image.error is None else display_text(image.error),
            slot,
            seq,
            stamp,
        )
        if image_id is None:
            path, raw = stored_name(image.path)
            cur = self.conn.execute(
                "INSERT INTO images(content_hash, size, mtime, width, height, metadata, status, "
                "error, slot, seq, updated, path, raw_path, added, id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*fields, path, raw, stamp, new_id),
            )
            return int(cur.lastrowid)
        self.conn.execute(
            "UPDATE images SET content_hash = ?, size = ?, mtime = ?, width = ?, height = ?, "
            "metadata = ?, status = ?, error = ?, slot = ?, seq = ?, updated = ? WHERE id = ?",
            (*fields, image_id),
        )
        return image_id

    def set_row_seq(self, image_id: int, seq: int) -> None:
        self.conn.execute("UPDATE images SET seq = ? WHERE id = ?", (seq, image_id))

    def delete_images(self, ids: list[int]) -> list[tuple[int, int | None]]:
        """Delete rows; returns ``(id, slot)`` of those that existed."""
        found = self.slots_of(ids)
        for begin in range(0, len(ids), 500):
            chunk = ids[begin : begin + 500]
            marks = ",".join("?" * len(chunk))
            self.conn.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)
        return [(image_id, slot) for image_id, (_, slot) in sorted(found.items())]

    def set_metadata(self, image_id: int, metadata: str, stamp: str) -> bool:
        cur = self.conn.execute(
            "UPDATE images SET metadata = ?, updated = ? WHERE id = ?", (metadata, stamp, image_id)
        )
        return cur.rowcount > 0

    def reassign_slots(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Point each image at its row of a compacted vector file."""
        self.conn.executemany(
            "UPDATE images SET slot = ? WHERE id = ?",
            zip(slots.tolist(), ids.tolist(), strict=True),
        )

    def mark_for_redescription(self, ids: list[int], reason: str, seq: int, stamp: str) -> None:
        """Take images out of the searchable set so that the next indexing run describes
        them again (status ``'error'`` with ``reason``, no slot, size and mtime cleared)."""
        self.conn.executemany(
            "UPDATE images SET status = 'error', error = ?, slot = NULL, size = NULL, "
            "mtime = NULL, seq = ?, updated = ? WHERE id = ?",
            [(reason, seq, stamp, int(i)) for i in ids],
        )

    def prune_ops(self, through_seq: int) -> None:
        """Forget the ops up to ``through_seq`` (covered by a checkpoint)."""
        self.conn.execute("DELETE FROM ops WHERE seq <= ?", (through_seq,))
        self.kv_set("ops_pruned_through", through_seq)
