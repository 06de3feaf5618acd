"""Compact on-disk local features of an index directory: ``<index>/local/``.

::

    local/manifest.json   extractor settings and storage encoding; another extractor is refused
    local/local.sqlite    image id -> (offset, n, width, height, tag); kv: data file, data end
    local/features.bin    records back to back, append-only (features.<gen>.bin after compact)

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

Durability as for the global vectors: a record is written past the committed end
(``kv.data_end``) and fsynced *before* the SQLite transaction that references it commits, so
bytes past the committed end (a crashed writer) are never read and are overwritten by the
next write. Writers from several processes are serialised by SQLite's write lock; readers
never wait. Replacing or removing an image leaves dead bytes until :meth:`compact`, which
writes a fresh file under a new name and switches to it in one transaction.

SQLite ids are the index's image ids. The optional per-image ``tag`` (e.g. the content hash
from ``meta.sqlite``) lets a reader treat features of an image that was updated since as
missing (see :meth:`LocalFeatureStore.get_many`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lookalike.errors import ConfigError, IndexStateError
from lookalike.index.files import TMP_SUFFIX, atomic_write_bytes, fsync_dir, remove_durably
from lookalike.local.encoding import RecordCodec, library_versions, storage_encoding
from lookalike.local.features import default_local_settings, local_feature_class

logger = logging.getLogger(__name__)

LOCAL_DIR = "local"
MANIFEST_NAME = "manifest.json"
DB_NAME = "local.sqlite"
DATA_NAME = "features.bin"
FORMAT = "lookalike-local-features"
FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    id INTEGER PRIMARY KEY,
    offset INTEGER NOT NULL,
    n INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    tag TEXT
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT);
"""


def stored_extractor(index_dir: str | Path) -> dict | None:
    """The extractor settings of the local features of an index, None when it has none.

    Raises:
        IndexStateError: ``<index>/local/manifest.json`` exists but cannot be read.
    """
    path = Path(index_dir) / LOCAL_DIR / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))["extractor"]
        if not isinstance(settings.get("name"), str):
            raise ValueError("no extractor name")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise IndexStateError(
            f"cannot read {path} ({error}); delete {path.parent} and compute the local "
            "features again"
        ) from None
    return settings


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
        manifest_path = self.root / MANIFEST_NAME
        if not manifest_path.exists():
            if not create:
                raise IndexStateError(
                    f"index {index_dir} has no local features; build it with --local {name}"
                )
            self._create(settings or default_local_settings(name), bool(quantize))
        self.manifest = self._read_manifest()
        self._check(settings, quantize)
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
        self._conn = self._connect(create=False)

    # -- opening ---------------------------------------------------------------------------

    def _connect(self, create: bool, root: Path | None = None) -> sqlite3.Connection:
        path = (root or self.root) / DB_NAME
        if not create and not path.exists():
            raise IndexStateError(
                f"{path} is missing; the local features are damaged, delete {self.root} and "
                "compute them again"
            )
        uri = f"{path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
        try:
            conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            conn.execute("PRAGMA synchronous=FULL")
            if create:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                for key, value in (("data_file", DATA_NAME), ("data_end", "0"), ("gen", "0")):
                    conn.execute("INSERT OR IGNORE INTO kv(key, value) VALUES (?, ?)", (key, value))
        except sqlite3.DatabaseError as error:
            raise IndexStateError(
                f"cannot open {path} ({error}); delete {self.root} and compute the local "
                "features again"
            ) from None
        return conn

    def _create(self, settings: dict, quantize: bool) -> None:
        """Build the store in a scratch folder, then rename it into place (atomic).

        Two processes creating it at once (e.g. searchers caching on first use) leave one
        complete store: the loser's rename fails and it opens the winner's.
        """
        settings = json.loads(json.dumps(settings))
        storage = storage_encoding(settings, quantize)
        scratch = self.root.parent / f".{LOCAL_DIR}-{uuid.uuid4().hex}.partial"
        scratch.mkdir()
        try:
            self._connect(create=True, root=scratch).close()
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "extractor": settings,
                "storage": {**storage, "keypoints": "uint16", "scores": "float16"},
                "quantize": bool(quantize),
                "versions": library_versions(),
            }
            data = json.dumps(manifest, indent=2).encode("utf-8") + b"\n"
            atomic_write_bytes(scratch / MANIFEST_NAME, data)
            try:
                os.rename(scratch, self.root)  # replaces only a missing or empty folder
            except OSError:
                if not (self.root / MANIFEST_NAME).exists():
                    raise IndexStateError(
                        f"{self.root} exists but is not a local feature store; move it away"
                    ) from None
                shutil.rmtree(scratch, ignore_errors=True)  # another process was first
                return
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        fsync_dir(self.root.parent)
        logger.info("created local feature store %s (%s)", self.root, settings["name"])

    def _read_manifest(self) -> dict:
        path = self.root / MANIFEST_NAME
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise IndexStateError(
                f"cannot read {path} ({error}); delete {self.root} and compute the local "
                "features again"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise IndexStateError(f"{path} is not a lookalike local feature manifest")
        if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise IndexStateError(
                f"{self.root} has local feature format {manifest['format_version']}; this "
                f"lookalike reads up to {FORMAT_VERSION}: upgrade lookalike"
            )
        return manifest

    def _check(self, settings: dict | None, quantize: bool | None) -> None:
        built = self.manifest["extractor"]
        hint = f"delete {self.root} to compute them again with the new settings"
        if built.get("name") != self.name:
            raise IndexStateError(
                f"index {self.root.parent} holds {built.get('name')!r} local features, not "
                f"{self.name!r}; use --local {built.get('name')}, or {hint}"
            )
        if settings is not None:
            wanted = json.loads(json.dumps(settings))
            diff = sorted(k for k in built.keys() | wanted.keys() if built.get(k) != wanted.get(k))
            if diff:
                have = ", ".join(f"{k}={built.get(k)!r}" for k in diff)
                want = ", ".join(f"{k}={wanted.get(k)!r}" for k in diff)
                raise IndexStateError(
                    f"the {self.name} local features of {self.root.parent} were computed with "
                    f"{have}; the requested extractor has {want}. Use the same settings, or {hint}"
                )
        if quantize is not None and bool(self.manifest.get("quantize")) != quantize:
            raise IndexStateError(
                f"the local features of {self.root.parent} were stored with quantize="
                f"{self.manifest.get('quantize')}, requested quantize={quantize}; {hint}"
            )

    def close(self) -> None:
        """Close the database and drop the memory map; the store is unusable afterwards."""
        with self._mutex:
            if not self._closed:
                self._closed = True
                self._map = None
                self._conn.close()

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
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        self._check_open()
        self._conn.execute("BEGIN")
        try:
            yield self._conn
        finally:
            self._conn.execute("COMMIT")

    def _kv(self, key: str) -> str:
        return self._conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()[0]

    def _set_kv(self, key: str, value: object) -> None:
        self._conn.execute("UPDATE kv SET value = ? WHERE key = ?", (str(value), key))

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
            name, end = self._kv("data_file"), int(self._kv("data_end"))
            rows, offset = [], end
            for (image_id, _), (record, n, w, h), tag in zip(items, encoded, tags, strict=True):
                rows.append((image_id, offset, n, w, h, tag))
                offset += len(record)
            # durable before the commit that references it
            _write_at(self.root / name, b"".join(r for r, *_ in encoded), end)
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

        The new file is complete and fsynced before the transaction that points every id at
        its new offset commits; a crash before that leaves the old state, and the orphan file
        is deleted by the next compaction. Readers retry when their file disappears.
        """
        with self._mutex:
            with self._write():
                name, end = self._kv("data_file"), int(self._kv("data_end"))
                gen = int(self._kv("gen")) + 1
                self._remove_orphans(keep=name)
                rows = self._conn.execute(
                    "SELECT id, offset, n FROM features ORDER BY id"
                ).fetchall()
                live = sum(self.record_bytes(n) for _, _, n in rows)
                if live == end:
                    return
                target = self.root / f"features.{gen}.bin"
                source = self._mapped(name, end)
                new_rows, offset = [], 0
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    for image_id, old, n in rows:
                        size = self.record_bytes(n)
                        _write_all(fd, memoryview(source[old : old + size]))
                        new_rows.append((offset, image_id))
                        offset += size
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fsync_dir(self.root)
                self._conn.executemany("UPDATE features SET offset = ? WHERE id = ?", new_rows)
                self._set_kv("data_file", target.name)
                self._set_kv("data_end", offset)
                self._set_kv("gen", gen)
            self._map, self._map_name = None, None
            remove_durably([self.root / name])
            logger.info("compacted %s: %d of %d bytes kept", self.root, offset, end)

    def _remove_orphans(self, keep: str) -> None:
        """Data files of interrupted compactions (call inside a write transaction)."""
        junk = [
            p
            for p in self.root.iterdir()
            if (p.name.startswith("features.") and p.name.endswith(".bin") and p.name != keep)
            or p.name.endswith(TMP_SUFFIX)
        ]
        if junk:
            logger.info("removing leftovers of an interrupted writer: %s", [p.name for p in junk])
            remove_durably(junk)

    # -- reading --------------------------------------------------------------------------

    def _mapped(self, name: str, end: int) -> np.ndarray:
        """A read-only uint8 map of data file ``name`` covering its first ``end`` bytes."""
        if end == 0:
            return np.zeros(0, np.uint8)
        if self._map is None or self._map_name != name or len(self._map) < end:
            path = self.root / name
            size = path.stat().st_size  # FileNotFoundError: replaced by a compaction, retry
            if size < end:
                raise IndexStateError(
                    f"{path} holds {size} bytes but {DB_NAME} references {end}; the local "
                    f"features are damaged, delete {self.root} and compute them again"
                )
            self._map = np.memmap(path, dtype=np.uint8, mode="r")
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
        for attempt in range(5):
            with self._mutex:
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
                    name, end = self._kv("data_file"), int(self._kv("data_end"))
                try:
                    data = self._mapped(name, end)
                except FileNotFoundError:
                    if attempt == 4:
                        raise
                    continue  # a compaction switched files between the snapshot and the map
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
        raise AssertionError("unreachable")

    def __contains__(self, id: object) -> bool:
        if isinstance(id, bool) or not isinstance(id, int | np.integer):
            return False
        with self._mutex:
            self._check_open()
            row = self._conn.execute("SELECT 1 FROM features WHERE id = ?", (int(id),)).fetchone()
        return row is not None

    def __len__(self) -> int:
        with self._mutex:
            self._check_open()
            return int(self._conn.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def ids(self) -> np.ndarray:
        """Every stored image id, ascending, int64."""
        with self._mutex:
            self._check_open()
            rows = self._conn.execute("SELECT id FROM features ORDER BY id").fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def tags(self) -> dict[int, str | None]:
        """Every stored image id and its tag (what :func:`lookalike.local.sync` compares)."""
        with self._mutex:
            self._check_open()
            rows = self._conn.execute("SELECT id, tag FROM features").fetchall()
        return {int(i): t for i, t in rows}

    def stats(self) -> dict[str, int]:
        """``{"images", "live_bytes", "file_bytes"}``: compact when much of the file is dead."""
        with self._mutex, self._snapshot():
            rows = self._conn.execute("SELECT n FROM features").fetchall()
            end = int(self._kv("data_end"))
        live = sum(self.record_bytes(int(n)) for (n,) in rows)
        return {"images": len(rows), "live_bytes": live, "file_bytes": end}


def _write_all(fd: int, view: memoryview) -> None:
    written = 0
    while written < len(view):
        written += os.write(fd, view[written:])


def _write_at(path: Path, data: bytes, offset: int) -> None:
    """Write ``data`` at ``offset``, cut anything after it (a crashed writer's bytes), fsync."""
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size < offset:
            raise IndexStateError(
                f"{path} holds {size} bytes but the local feature database references {offset}; "
                f"delete {path.parent} and compute the local features again"
            )
        view, written = memoryview(data), 0
        while written < len(view):
            written += os.pwrite(fd, view[written:], offset + written)
        if size > offset + len(data):
            os.ftruncate(fd, offset + len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)
