"""Compact on-disk local features of an index directory: ``<index>/local/``.

::

    local/local.sqlite    image id -> (offset, n, width, height, tag); kv: what the records are
                          (extractor settings, storage encoding; another extractor is refused),
                          data file, data end
    local/features.bin    records back to back, append-only (features.<gen>.bin after compact)

Which local features an index *keeps* (``index --local``) is recorded in the index manifest;
``local.sqlite`` only describes the bytes it stores, so that they are never decoded as
something else. Stores of format 1 kept that description in ``local/manifest.json``: it is
moved into ``local.sqlite`` the first time the store is opened from a writable directory
(the names, the description, creation and that upgrade are in :mod:`lookalike.local.layout`).

A record holds the ``n`` keypoints of one image, best score first (so its first ``k`` are its
top ``k``), 8-byte aligned, in one contiguous range: reading an image is one slice of a
memory map.

====================  ==========================================================================
``uint16 (n, 2)``     keypoints as ``(x + 0.5) / width * 65535`` (and y / height), rounded: 0.06
                      px steps at 4000 px, where float16 has 2 px steps (and overflows at 65504)
``float16 (n,)``      scores
``(n, d)``            descriptors: uint8 for binary ones, for SIFT (integer-valued, lossless) and
                      for RootSIFT with ``quantize=True`` (x 512); float16 otherwise
====================  ==========================================================================

Durability as for the global vectors, with the same helpers (:mod:`lookalike.storage`): a
record is written past the committed end (``kv.data_end``) and fsynced *before* the SQLite
transaction that references it commits, so bytes past the committed end (a crashed writer)
are never read and are overwritten by the next write. Writers from several processes are
serialised by SQLite's write lock; readers never wait. Replacing or removing an image leaves
dead bytes until :meth:`compact`, which writes a fresh file under a new name and switches to
it in one transaction (generation compaction).

SQLite ids are the index's image ids. The optional per-image ``tag`` (e.g. the content hash
from ``meta.sqlite``) lets a reader treat features of an image that was updated since as
missing (see :meth:`LocalFeatureStore.get_many`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lookalike.confined import open_fd
from lookalike.errors import ConfigError, IndexStateError
from lookalike.local.encoding import RecordCodec
from lookalike.local.features import default_local_settings, local_feature_class
from lookalike.local.layout import (
    DATA_NAME,
    DB_NAME,
    FORMAT,
    FORMAT_VERSION,
    LOCAL_DIR,
    META_KEY,
    OLD_MANIFEST_NAME,
    check_description,
    connect,
    create_store,
    damaged,
    data_name,
    has_local_store,
    read_description,
    stored_extractor,
    upgrade_description,
)
from lookalike.storage import (
    TMP_SUFFIX,
    read_retrying,
    remove_leftovers,
    switch_data_file,
    write_at,
    write_new_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_NAME",
    "DB_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "LOCAL_DIR",
    "META_KEY",
    "OLD_MANIFEST_NAME",
    "LocalFeatureStore",
    "has_local_store",
    "read_description",
    "stored_extractor",
]


class LocalFeatureStore:
    """Local features of the images of one index, keyed by image id.

    Args:
        index_dir: the index directory (must exist); features live in ``index_dir/local``.
        name: extractor name (``sift``, ``rootsift``, ``orb``, ``akaze``, ``aliked``).
        settings: :meth:`LocalExtractor.settings` of the extractor that makes the features;
            compared with the stored ones when the store exists (None accepts them), and
            recorded when it is created (None: the defaults of ``name``).
        quantize: store RootSIFT as uint8 instead of float16 (fixed at creation; None
            accepts what the store has, and means False when creating).
        create: create the store when missing; False raises instead.

    Raises:
        IndexStateError: the store holds another extractor's features or other settings,
            is damaged, or is missing with ``create=False``.
        ConfigError: unknown name, or ``quantize`` for descriptors other than RootSIFT.
    """

    def __init__(
        self,
        index_dir: str | Path,
        name: str,
        settings: dict | None = None,
        *,
        quantize: bool | None = None,
        create: bool = True,
    ) -> None:
        local_feature_class(name)  # unknown names fail first, with the valid list
        if settings is not None and settings.get("name") != name:
            raise ConfigError(f"settings describe {settings.get('name')!r}, not {name!r}")
        index_dir = Path(index_dir).expanduser()
        if not index_dir.is_dir():
            raise IndexStateError(f"index directory {index_dir} does not exist; create it first")
        self.root = index_dir / LOCAL_DIR
        self.name = name
        self._mutex = threading.RLock()
        self._map: np.memmap | None = None
        self._map_name: str | None = None
        self._closed = False
        if not has_local_store(index_dir):
            if not create:
                raise IndexStateError(
                    f"index {index_dir} has no local features; build it with --local {name}"
                )
            create_store(self.root, settings or default_local_settings(name), bool(quantize))
        self._db = connect(self.root, create=False)
        self._conn = self._db.conn
        try:
            with self._db.damage_as_error():
                # the store's records are read as they are: a damaged page would give NULL
                # offsets or garbled tags, so the (small) database is checked first
                problems = self._conn.execute("PRAGMA quick_check").fetchall()
            if problems != [("ok",)]:
                raise IndexStateError(
                    f"{self.root / DB_NAME} is damaged ({problems[0][0].splitlines()[-1]}); "
                    f"{damaged(self.root)}"
                )
            meta = read_description(self.root, self._conn)
            self.manifest = upgrade_description(self._db, self.root, meta)
            check_description(self.manifest, self.root, name, settings, quantize)
        except BaseException:
            self._db.close()
            raise
        self.settings: dict = self.manifest["extractor"]
        self.dim = int(self.settings["dim"])
        self.binary = bool(self.settings["binary"])
        self.max_keypoints = int(self.settings["max_keypoints"])
        storage = self.manifest["storage"]
        self._codec = RecordCodec(
            name,
            self.dim,
            self.binary,
            self.max_keypoints,
            np.dtype(storage["descriptors"]),
            storage["scale"],
        )

    def close(self) -> None:
        """Close the database and drop the memory map; the store is unusable afterwards."""
        with self._mutex:
            if not self._closed:
                self._closed = True
                self._map = None
                self._db.close()

    def __enter__(self) -> LocalFeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalFeatureStore({str(self.root)!r}, {self.name!r})"

    # -- transactions --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise IndexStateError(f"local feature store {self.root} is closed; open it again")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; SQLite's lock serialises writers of every process."""
        self._check_open()
        with self._db.damage_as_error(), self._db.write() as conn:
            yield conn

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        self._check_open()
        with self._db.damage_as_error(), self._db.snapshot() as conn:
            yield conn

    def _kv(self, key: str) -> str | None:
        return self._db.kv_get(key)

    def _set_kv(self, key: str, value: object) -> None:
        self._db.kv_set(key, value)

    def record_bytes(self, n: int) -> int:
        """Bytes of a record of ``n`` keypoints, padding included."""
        return self._codec.record_bytes(n)

    # -- writing --------------------------------------------------------------------------

    def put(self, id: int, feats: dict, tag: str | None = None) -> None:
        """Store (or replace) the features of image ``id``; see :meth:`put_many`."""
        self.put_many([(id, feats)], None if tag is None else [tag])

    def put_many(
        self, items: Iterable[tuple[int, dict]], tags: Sequence[str | None] | None = None
    ) -> None:
        """Store (or replace) the features of several images in one atomic commit.

        Args:
            items: ``(image id, features)`` pairs; features as an extractor returns them;
                more than ``max_keypoints`` keypoints keeps the highest scores.
            tags: one optional string per item (e.g. the image's content hash) that
                :meth:`get_many` can check.

        Raises:
            ValueError: malformed features, a repeated id, or tags of another length.
        """
        items = [(int(i), f) for i, f in items]
        tags = [None] * len(items) if tags is None else list(tags)
        if len(tags) != len(items):
            raise ValueError(f"{len(items)} items but {len(tags)} tags")
        if len({i for i, _ in items}) != len(items):
            raise ValueError("an image id appears twice in one put_many() batch; pass it once")
        if not items:
            return
        encoded = [self._codec.encode(f) for _, f in items]
        with self._mutex, self._write():
            name, end = data_name(self._kv("data_file"), self.root), int(self._kv("data_end"))
            rows, offset = [], end
            for (image_id, _), (record, n, w, h), tag in zip(items, encoded, tags, strict=True):
                rows.append((image_id, offset, n, w, h, tag))
                offset += len(record)
            # durable before the commit that references it
            data = b"".join(r for r, *_ in encoded)
            write_at(self.root / name, data, end, damaged(self.root))
            self._conn.executemany(
                "INSERT OR REPLACE INTO features(id, offset, n, width, height, tag) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._set_kv("data_end", offset)

    def remove(self, ids: Iterable[int]) -> int:
        """Forget the features of ``ids`` (unknown ids are ignored); returns how many."""
        wanted = sorted({int(i) for i in ids})
        removed = 0
        with self._mutex, self._write():
            for begin in range(0, len(wanted), 500):
                chunk = wanted[begin : begin + 500]
                marks = ",".join("?" * len(chunk))
                cur = self._conn.execute(f"DELETE FROM features WHERE id IN ({marks})", chunk)
                removed += cur.rowcount
        return removed

    def compact(self) -> None:
        """Rewrite the live records into ``features.<gen>.bin`` and drop the old file.

        Generation compaction (:func:`lookalike.storage.switch_data_file`): the new file is
        complete and fsynced before the transaction that points every id at its new offset
        commits; a crash before that leaves the old state, and the orphan file is deleted by
        the next compaction. Readers retry when their file disappears.
        """
        with self._mutex:
            with self._snapshot():
                name, end = data_name(self._kv("data_file"), self.root), int(self._kv("data_end"))
                gen = int(self._kv("gen")) + 1
                rows = self._conn.execute(
                    "SELECT id, offset, n FROM features ORDER BY id"
                ).fetchall()
            remove_leftovers(self.root, lambda n: _is_data_name(n, name) or n.endswith(TMP_SUFFIX))
            sizes = [self.record_bytes(n) for _, _, n in rows]
            if sum(sizes) == end:
                return
            source = self._mapped(name, end)
            target = self.root / f"features.{gen}.bin"
            chunks = (source[o : o + size] for (_, o, _), size in zip(rows, sizes, strict=True))
            written = write_new_file(target, chunks)
            offsets = (np.cumsum(sizes, dtype=np.int64) - np.asarray(sizes, np.int64)).tolist()

            def update(conn: sqlite3.Connection) -> None:
                if int(self._kv("data_end")) != end:  # a writer appended meanwhile
                    raise _Changed
                conn.executemany(
                    "UPDATE features SET offset = ? WHERE id = ?",
                    zip(offsets, [r[0] for r in rows], strict=True),
                )
                self._set_kv("data_end", written)
                self._set_kv("gen", gen)

            self._map, self._map_name = None, None
            try:
                switch_data_file(
                    self._db, "data_file", target, update, lambda n: _is_data_name(n, "")
                )
            except _Changed:  # compaction only saves space: the next one will do
                logger.info("compaction of %s skipped: features were added meanwhile", self.root)
                return
            logger.info("compacted %s: %d of %d bytes kept", self.root, written, end)

    # -- reading --------------------------------------------------------------------------

    def _mapped(self, name: str, end: int) -> np.ndarray:
        """A read-only uint8 map of data file ``name`` covering its first ``end`` bytes."""
        if end == 0:
            return np.zeros(0, np.uint8)
        if self._map is None or self._map_name != name or len(self._map) < end:
            path = self.root / name
            # FileNotFoundError: replaced by a compaction, retry
            with os.fdopen(open_fd(path, os.O_RDONLY), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < end:
                    raise IndexStateError(
                        f"{path} holds {size} bytes but {DB_NAME} references {end}; the local "
                        f"features are damaged, delete {self.root} and compute them again"
                    )
                self._map = np.memmap(f, dtype=np.uint8, mode="r")
            self._map_name = name
        return self._map

    def get(self, id: int, tag: str | None = None, max_keypoints: int | None = None) -> dict | None:
        """The features of image ``id`` or None; see :meth:`get_many`."""
        return self.get_many([id], None if tag is None else [tag], max_keypoints)[0]

    def get_many(
        self,
        ids: Sequence[int],
        tags: Sequence[str | None] | None = None,
        max_keypoints: int | None = None,
    ) -> list[dict | None]:
        """The features of ``ids``, in input order; None where missing.

        Args:
            ids: image ids.
            tags: expected tag per id; a stored record with another tag counts as missing
                (None in ``tags`` accepts any).
            max_keypoints: return only the best this many keypoints (records are stored
                best first, so this reads less); None returns all.

        Returns:
            Per id None or ``{KEYPOINTS: (N, 2) float32 pixels of the original image,
            DESCRIPTORS: (N, d) float32 (uint8 for binary), SCORES: (N,) float32,
            IMAGE_SIZE: (width, height)}``, arrays owned by the caller.
        """
        wanted = [int(i) for i in ids]
        if tags is not None and len(tags) != len(wanted):
            raise ValueError(f"{len(wanted)} ids but {len(tags)} tags")
        unique = sorted(set(wanted))

        def read() -> tuple[dict[int, tuple], np.ndarray]:
            with self._snapshot():
                found: dict[int, tuple] = {}
                for begin in range(0, len(unique), 500):
                    chunk = unique[begin : begin + 500]
                    marks = ",".join("?" * len(chunk))
                    for row in self._conn.execute(
                        "SELECT id, offset, n, width, height, tag FROM features "
                        f"WHERE id IN ({marks})",
                        chunk,
                    ):
                        found[int(row[0])] = row[1:]
                name, end = data_name(self._kv("data_file"), self.root), int(self._kv("data_end"))
            return found, self._mapped(name, end)

        with self._mutex:
            found, data = read_retrying(read, f"local feature store {self.root}")
            out: list[dict | None] = []
            for pos, image_id in enumerate(wanted):
                row = found.get(image_id)
                if row is None or (tags is not None and tags[pos] not in (None, row[4])):
                    out.append(None)
                    continue
                offset, n, width, height, _ = row
                k = n if max_keypoints is None else min(n, max(0, int(max_keypoints)))
                buf = data[offset : offset + self.record_bytes(n)]
                out.append(self._codec.decode(np.asarray(buf), n, width, height, k))
            return out

    def __contains__(self, id: object) -> bool:
        if isinstance(id, bool) or not isinstance(id, int | np.integer):
            return False
        with self._mutex, self._snapshot():
            row = self._conn.execute("SELECT 1 FROM features WHERE id = ?", (int(id),)).fetchone()
        return row is not None

    def __len__(self) -> int:
        with self._mutex, self._snapshot():
            return int(self._conn.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def ids(self) -> np.ndarray:
        """Every stored image id, ascending, int64."""
        with self._mutex, self._snapshot():
            rows = self._conn.execute("SELECT id FROM features ORDER BY id").fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def tags(self) -> dict[int, str | None]:
        """Every stored image id and its tag (what :func:`lookalike.local.sync` compares)."""
        with self._mutex, self._snapshot():
            rows = self._conn.execute("SELECT id, tag FROM features").fetchall()
        return {int(i): t for i, t in rows}

    def stats(self) -> dict[str, int]:
        """``{"images", "live_bytes", "file_bytes"}``: compact when much of the file is dead."""
        with self._mutex, self._snapshot():
            rows = self._conn.execute("SELECT n FROM features").fetchall()
            end = int(self._kv("data_end"))
        if any(not isinstance(n, int) for (n,) in rows):  # a damaged record
            raise IndexStateError(
                f"{self.root / DB_NAME} is damaged (a record without its size); "
                f"{damaged(self.root)}"
            )
        live = sum(self.record_bytes(n) for (n,) in rows)
        return {"images": len(rows), "live_bytes": live, "file_bytes": end}


class _Changed(Exception):
    """The store changed between a compaction's copy and its switch."""


def _is_data_name(name: str, keep: str) -> bool:
    """A data file of this layout other than ``keep`` (left by an interrupted compaction)."""
    return name.startswith("features.") and name.endswith(".bin") and name != keep
