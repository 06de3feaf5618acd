"""``meta.sqlite``: image rows, the log of vector-set changes, and a few counters.

SQLite is the source of truth of an index: which images exist, their metadata, which row
(``slot``) of the vector file holds each one's descriptor, and the ``ops`` log from which
any reader can bring a faiss checkpoint up to date. WAL mode lets readers keep a consistent
snapshot while the single writer commits; ``synchronous=FULL`` makes each commit durable.

``images.seq`` is the ops seq of the row's last vector change (for ``'error'`` rows, the
newest seq when the row was written), so "changed since seq X" is one query. ``kv`` keys:
``schema_version``; ``n_rows`` (committed rows of the vector file);
``vectors_file`` (its current name); ``ops_pruned_through`` (ops with a seq up to this were
deleted by a compaction, so replay must start from a checkpoint at least that recent).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from lookalike.index.conf import ImageRecord, NewImage
from lookalike.index.vectors import DEFAULT_NAME
from lookalike.storage import Database

logger = logging.getLogger(__name__)

DB_NAME = "meta.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT UNIQUE NOT NULL,
    content_hash TEXT,
    size INTEGER,
    mtime REAL,
    width INTEGER,
    height INTEGER,
    metadata TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    error TEXT,
    slot INTEGER,
    seq INTEGER NOT NULL,
    added TEXT,
    updated TEXT
);
CREATE INDEX IF NOT EXISTS images_status ON images(status);
CREATE TABLE IF NOT EXISTS ops (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('add', 'remove')),
    image_id INTEGER NOT NULL,
    slot INTEGER
);
"""

RECORD_COLUMNS = "id, path, content_hash, size, mtime, width, height, metadata, status, error"
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
    )


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
                "ops_pruned_through": 0,
            },
            damaged="the index is damaged, rebuild it into a new --index directory",
        )

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
                f"SELECT {RECORD_COLUMNS} FROM images WHERE id IN ({marks})", chunk
            ):
                found[int(row[0])] = to_record(row)
        return found

    def find_path(self, path: str) -> ImageRecord | None:
        row = self.conn.execute(
            f"SELECT {RECORD_COLUMNS} FROM images WHERE path = ?", (path,)
        ).fetchone()
        return None if row is None else to_record(row)

    def page(self, after_id: int, status: str | None) -> list[ImageRecord]:
        """The next :data:`PAGE` records with an id above ``after_id``."""
        where = "id > ?" + ("" if status is None else " AND status = ?")
        args: tuple = (after_id,) if status is None else (after_id, status)
        rows = self.conn.execute(
            f"SELECT {RECORD_COLUMNS} FROM images WHERE {where} ORDER BY id LIMIT {PAGE}", args
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

    def lookup_paths(self, paths: list[str]) -> dict[str, tuple[int, int | None]]:
        """``path -> (id, slot)`` for the paths already stored."""
        found: dict[str, tuple[int, int | None]] = {}
        for begin in range(0, len(paths), 500):
            chunk = paths[begin : begin + 500]
            marks = ",".join("?" * len(chunk))
            for image_id, path, slot in self.conn.execute(
                f"SELECT id, path, slot FROM images WHERE path IN ({marks})", chunk
            ):
                found[path] = (int(image_id), slot)
        return found

    def upsert_image(
        self, image_id: int | None, image: NewImage, slot: int | None, seq: int, stamp: str
    ) -> int:
        """Insert ``image`` (``image_id`` None) or replace the fields of row ``image_id``."""
        status = "ok" if image.error is None else "error"
        try:
            metadata = json.dumps(image.metadata or {}, ensure_ascii=False, sort_keys=True)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"metadata of {image.path} is not JSON-serialisable: {error}"
            ) from None
        fields = (
            image.content_hash,
            image.size,
            image.mtime,
            image.width,
            image.height,
            metadata,
            status,
            image.error,
            slot,
            seq,
            stamp,
        )
        if image_id is None:
            cur = self.conn.execute(
                "INSERT INTO images(content_hash, size, mtime, width, height, metadata, status, "
                "error, slot, seq, updated, path, added) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*fields, image.path, stamp),
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

    def prune_ops(self, through_seq: int) -> None:
        """Forget the ops up to ``through_seq`` (covered by a checkpoint)."""
        self.conn.execute("DELETE FROM ops WHERE seq <= ?", (through_seq,))
        self.kv_set("ops_pruned_through", through_seq)
