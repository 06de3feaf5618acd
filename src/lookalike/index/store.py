"""``IndexStore``: the on-disk index that the indexing pipeline writes and searches read.

An index is a directory::

    manifest.json       what the index is: every recorded setting (one typed Manifest) and
                        the checkpoint readers start from
    meta.sqlite         images, the ops log of vector-set changes, counters (the truth)
    vectors.f32         raw float32 descriptors, append-only, row = slot
    whitening.npz       the learned whitening (optional)
    <backend>-<seq>.index   vector backend checkpoint covering the ops up to <seq>
    dba.npz             the database-side augmentation (optional, lookalike.rerank.dba)
    local/              local features (optional, lookalike.local.store)
    lock                held by the single writer

Nothing else is read or written, and none of these is ever followed as a link (see
:mod:`lookalike.confined`); the directory itself may be a link the user made. Opening checks
what is cheap: sizes, and the digests of the files it loads anyway (the whitening, the
checkpoint); ``lookalike check`` checks everything (:mod:`lookalike.index.check`).

Durability: vectors are appended and fsynced *before* the SQLite transaction that references
them commits; every other file is replaced atomically (see :mod:`lookalike.storage`). A
SIGKILL at any moment leaves either the old or the new committed state. Readers never lock:
they read SQLite in snapshots and replay the ops since the checkpoint (see ``loader.py``).

The store composes its parts rather than being them: :class:`~lookalike.index.metadata.MetaDB`
(SQLite), :class:`~lookalike.index.vectors.VectorFile` (raw vectors), the loader's view
(the vector backend and the whitening), the manifest; the record-reading and
writing halves are :class:`~lookalike.index.records.RecordsMixin` and
:class:`~lookalike.index.writer.WriterMixin`, keeping a reader current is
:class:`~lookalike.index.freshness.FreshnessMixin`, and re-ranking reads vectors through the
narrow :class:`~lookalike.index.source.IndexVectors` (:meth:`IndexStore.vector_source`).

A re-added path is an update: the id is kept, the old vector is removed from the vector set
and the new one added, and every stored field, user metadata included, is replaced.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.errors import ConfigError, IndexStateError
from lookalike.index.backends import validate_conf
from lookalike.index.conf import IndexConf
from lookalike.index.freshness import LOCK_NAME, FreshnessMixin, writer_lock
from lookalike.index.loader import Loader, View, load_whitening, prepare
from lookalike.index.manifest import (
    MANIFEST_NAME,
    Manifest,
    QueryDefaults,
    incompatibility,
    new_manifest,
    normalise_descriptor,
    read_manifest,
    weights_mismatch,
    write_manifest,
)
from lookalike.index.metadata import DB_NAME, MetaDB
from lookalike.index.records import RecordsMixin
from lookalike.index.upgrade import finish_upgrade, read_complete
from lookalike.index.vectors import DEFAULT_NAME, check_vectors
from lookalike.index.writer import WriterMixin
from lookalike.storage import WriterLock

if TYPE_CHECKING:
    from lookalike.index.source import IndexVectors
    from lookalike.whitening import Whitening

logger = logging.getLogger(__name__)

# What an interrupted create() leaves behind; a directory holding only these is reusable.
_CREATION_LEFTOVERS = {
    LOCK_NAME,
    DB_NAME,
    f"{DB_NAME}-wal",
    f"{DB_NAME}-shm",
    f"{DB_NAME}-journal",
    DEFAULT_NAME,
    f"{MANIFEST_NAME}.tmp",
}


class IndexStore(RecordsMixin, FreshnessMixin, WriterMixin):
    """An index directory opened for reading, or for writing by this process alone.

    Use :meth:`create` or :meth:`open`, not the constructor. Thread-safe: one lock
    serialises the calls of the threads sharing a store.
    """

    def __init__(self, root: Path, manifest: Manifest, db: MetaDB, lock: WriterLock | None) -> None:
        self.path = root
        self._manifest = manifest
        self._db = db
        self._lock = lock
        self._mutex = threading.RLock()
        self._loader = Loader(root, db, manifest.dim, manifest.index)
        self._view: View | None = None
        self._stale = False  # committed ops not yet replayed into the writer's view
        self._block_state = None  # the writer's hash of the vector file's last block
        self._closed = False
        self._brief = False  # a reader holding the writer lock in try_writer()
        self._token = self._change_token()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        descriptor: dict,
        dim: int,
        conf: IndexConf = IndexConf(),
        exist_ok: bool = False,
        *,
        query: QueryDefaults = QueryDefaults(),
        weights_hash: str | None = None,
    ) -> IndexStore:
        """Create an empty index and return it open for writing.

        Args:
            path: the index directory; created if missing, must be empty otherwise.
            descriptor: descriptor config (model, pooling, ...), JSON-serialisable; stored in
                the manifest and compared whenever the index is reopened with settings.
            dim: raw descriptor dimension ``D``.
            conf: vector backend, structure and search settings.
            exist_ok: an existing index is opened for writing instead, after
                :meth:`check_compatible` with ``descriptor``, ``dim`` and ``conf``.
            query: the query-time defaults to record.
            weights_hash: content hash of the model's weights (``Backbone.weights_id``).

        Raises:
            IndexStateError: ``path`` is a file, a non-empty non-index directory, or an
                index (without ``exist_ok``, or built with other settings).
            IndexLockedError: another process is writing the index.
            ConfigError: invalid ``dim``, ``descriptor`` or structure.
        """
        root = Path(path).expanduser()
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise ConfigError(f"descriptor dimension must be a positive integer, got {dim!r}")
        descriptor = normalise_descriptor(descriptor)
        if (root / MANIFEST_NAME).exists():
            if not exist_ok:
                raise IndexStateError(
                    f"{root} already holds a lookalike index; open it, or pick a new --index "
                    "directory"
                )
            store = cls.open(root, writable=True)
            try:
                store._check(descriptor, conf, int(dim))
                store.set_search_params(conf.nprobe, conf.ef_search)
                if weights_hash is not None:
                    store.check_weights(weights_hash)
            except BaseException:
                store.close()
                raise
            return store
        if root.exists() and not root.is_dir():
            raise IndexStateError(f"{root} is a file; pick a directory for --index")
        if root.exists():
            foreign = sorted(p.name for p in root.iterdir() if p.name not in _CREATION_LEFTOVERS)
            if foreign:
                raise IndexStateError(
                    f"{root} is not empty and not a lookalike index (it holds {foreign[0]!r}"
                    f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); pick an "
                    "empty or new --index directory"
                )
        validate_conf(conf, int(dim))
        root.mkdir(parents=True, exist_ok=True)
        lock = writer_lock(root)
        lock.acquire()
        try:
            if (root / MANIFEST_NAME).exists():  # another process created it meanwhile
                lock.release()
                return cls.create(
                    root, descriptor, dim, conf, exist_ok, query=query, weights_hash=weights_hash
                )
            for name in _CREATION_LEFTOVERS - {LOCK_NAME}:  # an interrupted create()
                (root / name).unlink(missing_ok=True)
            db = MetaDB(root / DB_NAME, create=True)
            manifest = new_manifest(descriptor, int(dim), conf, query, weights_hash)
            manifest = write_manifest(root, manifest)  # last: now the directory is an index
        except BaseException:
            lock.release()
            raise
        logger.info("created index %s (%s %s, %d-d)", root, conf.backend, conf.factory, dim)
        return cls(root, manifest, db, lock)

    @classmethod
    def open(
        cls, path: str | Path, writable: bool = False, *, _repairing: bool = False
    ) -> IndexStore:
        """Open an existing index.

        Args:
            path: the index directory.
            writable: take the writer lock (``IndexLockedError`` if another process holds
                it). A reader loads the vector state now and keeps that snapshot until
                :meth:`refresh`. A writer upgrades an index of the previous format in place.

        Raises:
            IndexStateError: missing, not an index, damaged (naming what to do), or a
                newer format.
        """
        root = Path(path).expanduser()
        read_manifest(root)  # a clear error before creating a lock file in a random dir
        lock = None
        if writable:
            lock = writer_lock(root)
            lock.acquire()
        db = None
        try:
            db = MetaDB(root / DB_NAME)
            store = cls(root, read_complete(root, db), db, lock)
            if writable:
                store._manifest = finish_upgrade(root, db, store._manifest)
                store._recover(strict=not _repairing)
            if not _repairing:
                store._loader.check_sizes()
            if not writable:
                store._view = store._loader.load()
        except BaseException:
            if db is not None:
                db.close()
            if lock is not None:
                lock.release()
            raise
        return store

    def close(self) -> None:
        """Release the writer lock and the database; the store is unusable afterwards."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._view = None
            self._db.close()
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "closed" if self._closed else "writable" if self.writable else "read-only"
        return f"IndexStore({str(self.path)!r}, {self.conf.backend!r}, {mode})"

    # -- what the index is -----------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        """Every recorded setting, as this store last read or wrote it (frozen)."""
        return self._manifest

    @property
    def dim(self) -> int:
        """Raw descriptor dimension ``D``."""
        return self._manifest.dim

    @property
    def conf(self) -> IndexConf:
        return self._manifest.index

    @property
    def writable(self) -> bool:
        return self._lock is not None

    @property
    def whitening(self) -> Whitening | None:
        """The whitening applied before the backend, or None."""
        with self._mutex:
            self._check_open()
            if self._view is not None:
                return self._view.whitening
            return load_whitening(self.path, self._manifest.whitening)

    def check_compatible(self, descriptor: dict, conf: IndexConf | None = None) -> None:
        """Refuse settings other than those the index was built with.

        Raises:
            IndexStateError: naming every differing descriptor key (and the structure).
        """
        self._check(normalise_descriptor(descriptor), conf, None)

    def _check(self, descriptor: dict, conf: IndexConf | None, dim: int | None) -> None:
        built, wanted = dict(self._manifest.descriptor), dict(descriptor)
        if conf is not None:
            built["index"] = {"backend": self.conf.backend, "factory": self.conf.factory}
            wanted["index"] = {"backend": conf.backend, "factory": conf.factory}
        if dim is not None:
            built["dim"], wanted["dim"] = self.dim, dim
        message = incompatibility(self.path, built, wanted)
        if message is not None:
            raise IndexStateError(message)

    def check_weights(self, weights_hash: str) -> None:
        """Refuse a model whose weights differ from those the index was built with; a
        writer records the hash of an index that has none yet (a format 1 index).

        Raises:
            IndexStateError: the content hashes differ.
        """
        message = weights_mismatch(self.path, self._manifest, weights_hash)
        if message is not None:
            raise IndexStateError(message)
        if self._manifest.model.weights_hash is None and self.writable:
            model = self._manifest.model
            self.update_manifest(model=type(model)(model.name, model.weights, weights_hash))

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change ``nprobe`` / ``ef_search``; a writer also records them in the manifest."""
        with self._mutex:
            self._check_open()
            current = self.conf
            conf = dataclasses.replace(
                current,
                nprobe=current.nprobe if nprobe is None else int(nprobe),
                ef_search=current.ef_search if ef_search is None else int(ef_search),
            )
            if conf == current:
                return
            self._manifest = self._manifest.replace(index=conf)
            self._loader.conf = conf
            if self._view is not None:
                self._view.backend.set_search_params(conf)
            if self.writable:
                self.update_manifest()

    def stats(self) -> dict[str, Any]:
        """The vector backend's state: ``{"backend", "structure", "live", "dead", "trained",
        "memory_bytes", "search_params"}``."""
        with self._mutex:
            return self._current_view().backend.stats()

    # -- internals shared with the writer mixin and the vector source -------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise IndexStateError(f"index store {self.path} is closed; open it again")

    def _require_writable(self) -> None:
        self._check_open()
        if not self.writable:
            raise IndexStateError(
                f"index {self.path} was opened read-only; open it with writable=True to change it"
            )

    def _current_view(self) -> View:
        """The view searches use: a writer's is brought up to its own commits lazily."""
        self._check_open()
        if self._view is None:
            self._view = self._loader.load()
            self._stale = False
        elif self._stale:
            self._view = self._loader.catch_up(self._view, check_manifest=False)
            self._stale = False
        return self._view

    # -- reading ---------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest images by inner product in the (whitened) descriptor space.

        Args:
            queries: raw ``(n, D)`` float32 descriptors, L2-normalised by the caller; the
                stored whitening is applied here.
            k: results per query; ``k <= 0`` means all searchable images.

        Returns:
            ``(scores, ids)``, ``(n, k)`` float32 / int64, best first; rows with fewer than
            ``k`` results are padded with id ``-1`` and score ``-inf``.
        """
        queries = check_vectors(queries, self.dim, "queries")
        with self._mutex:
            view = self._current_view()
            if k <= 0:
                k = len(view.backend)
            return view.backend.search(prepare(queries, view.whitening), int(k))

    def vector_source(self) -> IndexVectors:
        """The narrow read-only view of the index-space vectors that re-ranking uses."""
        from lookalike.index.source import IndexVectors

        return IndexVectors(self)

    def update_manifest(self, **changes: Any) -> Manifest:
        """Record changed settings (:class:`Manifest` fields) in ``manifest.json``, atomically.

        Needs the writer lock: a writer, or a reader inside :meth:`try_writer`.
        """
        with self._mutex:
            if not self._brief:
                self._require_writable()
            upgrading = self._manifest.format_version < 2
            self._manifest = write_manifest(self.path, self._manifest.replace(**changes))
            if upgrading:  # a reader in try_writer() wrote a format 1 index as format 2
                finish_upgrade(self.path, self._db, self._manifest)
            return self._manifest
