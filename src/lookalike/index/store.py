"""``IndexStore``: the on-disk index that the indexing pipeline writes and searches read.

An index is a directory::

    manifest.json       what the index is (descriptor config, faiss factory, versions) and
                        which faiss checkpoint readers start from
    meta.sqlite         images, the ops log of vector-set changes, counters (the truth)
    vectors.f32         raw float32 descriptors, append-only, row = slot
    whitening.npz       the learned whitening (optional)
    faiss-<seq>.index   faiss checkpoint covering the ops up to <seq>
    lock                held by the single writer

Durability: vectors are appended and fsynced *before* the SQLite transaction that references
them commits; every other file is replaced atomically (see ``files.py``). A SIGKILL at any
moment leaves either the old or the new committed state. Readers never lock: they read
SQLite in snapshots and replay the ops since the checkpoint (see ``loader.py``).

A re-added path is an update: the id is kept, the old vector is removed from the vector set
and the new one added, and every stored field, user metadata included, is replaced.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lookalike.errors import ConfigError, IndexStateError
from lookalike.index.conf import ImageRecord, IndexConf, validate_factory
from lookalike.index.loader import Loader, View, load_whitening, prepare
from lookalike.index.manifest import (
    MANIFEST_NAME,
    incompatibility,
    new_manifest,
    normalise_descriptor,
    read_manifest,
    write_manifest,
)
from lookalike.index.metadata import DB_NAME, PAGE, MetaDB
from lookalike.index.vectors import DEFAULT_NAME, check_vectors
from lookalike.index.writer import WriterMixin
from lookalike.storage import WriterLock

if TYPE_CHECKING:
    from lookalike.whitening import Whitening

logger = logging.getLogger(__name__)

LOCK_NAME = "lock"
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


@dataclass(frozen=True)
class LiveVectors:
    """Every searchable vector of one committed state, in the index space (see
    :meth:`IndexStore.live_vectors`).

    Attributes:
        seq: the newest op seq committed in this state (see :meth:`IndexStore.vector_version`).
        epoch: the whitening epoch the vectors were transformed under.
        ids: ``(n,)`` int64 image ids, ascending.
        seqs: ``(n,)`` int64 ops seq of each image's last vector change (add or update).
        vectors: ``(n, d)`` float32 index-space vectors, row ``i`` for ``ids[i]``.
    """

    seq: int
    epoch: int
    ids: np.ndarray
    seqs: np.ndarray
    vectors: np.ndarray


class IndexStore(WriterMixin):
    """An index directory opened for reading, or for writing by this process alone.

    Use :meth:`create` or :meth:`open`, not the constructor. Thread-safe: one lock
    serialises the calls of the threads sharing a store.
    """

    def __init__(self, root: Path, manifest: dict, db: MetaDB, lock: WriterLock | None) -> None:
        self.path = root
        self._manifest = manifest
        self._db = db
        self._lock = lock
        self._mutex = threading.RLock()
        self._loader = Loader(root, db, int(manifest["dim"]), self.conf)
        self._view: View | None = None
        self._stale = False  # committed ops not yet replayed into the writer's view
        self._closed = False

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        descriptor: dict,
        dim: int,
        conf: IndexConf = IndexConf(),
        exist_ok: bool = False,
    ) -> IndexStore:
        """Create an empty index and return it open for writing.

        Args:
            path: the index directory; created if missing, must be empty otherwise.
            descriptor: descriptor config (model, pooling, ...), JSON-serialisable; stored in
                the manifest and compared whenever the index is reopened with settings.
            dim: raw descriptor dimension ``D``.
            conf: faiss structure and search settings.
            exist_ok: an existing index is opened for writing instead, after
                :meth:`check_compatible` with ``descriptor``, ``dim`` and ``conf``.

        Raises:
            IndexStateError: ``path`` is a file, a non-empty non-index directory, or an
                index (without ``exist_ok``, or built with other settings).
            IndexLockedError: another process is writing the index.
            ConfigError: invalid ``dim``, ``descriptor`` or factory.
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
        validate_factory(conf.factory, int(dim))
        root.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(root / LOCK_NAME, root)
        lock.acquire()
        try:
            if (root / MANIFEST_NAME).exists():  # another process created it meanwhile
                lock.release()
                return cls.create(root, descriptor, dim, conf, exist_ok)
            for name in _CREATION_LEFTOVERS - {LOCK_NAME}:  # an interrupted create()
                (root / name).unlink(missing_ok=True)
            db = MetaDB(root / DB_NAME, create=True)
            manifest = new_manifest(descriptor, int(dim), conf)
            write_manifest(root, manifest)  # last: from now on the directory is an index
        except BaseException:
            lock.release()
            raise
        logger.info("created index %s (%s, %d-d)", root, conf.factory, dim)
        return cls(root, manifest, db, lock)

    @classmethod
    def open(cls, path: str | Path, writable: bool = False) -> IndexStore:
        """Open an existing index.

        Args:
            path: the index directory.
            writable: take the writer lock (``IndexLockedError`` if another process holds
                it). A reader loads the faiss state now and keeps that snapshot until
                :meth:`refresh`.

        Raises:
            IndexStateError: missing, not an index, damaged, or a newer format.
        """
        root = Path(path).expanduser()
        read_manifest(root)  # a clear error before creating a lock file in a random dir
        lock = None
        if writable:
            lock = WriterLock(root / LOCK_NAME, root)
            lock.acquire()
        db = None
        try:
            manifest = read_manifest(root)
            db = MetaDB(root / DB_NAME)
            store = cls(root, manifest, db, lock)
            if writable:
                store._recover()
            else:
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
        return f"IndexStore({str(self.path)!r}, {self.conf.factory!r}, {mode})"

    # -- properties ------------------------------------------------------------------------

    @property
    def manifest(self) -> dict:
        """A copy of the manifest as this store last read or wrote it."""
        return copy.deepcopy(self._manifest)

    @property
    def dim(self) -> int:
        """Raw descriptor dimension ``D``."""
        return int(self._manifest["dim"])

    @property
    def conf(self) -> IndexConf:
        return IndexConf.from_dict(self._manifest["index"])

    @property
    def writable(self) -> bool:
        return self._lock is not None

    @property
    def whitening(self) -> Whitening | None:
        """The whitening applied before faiss, or None."""
        with self._mutex:
            self._check_open()
            if self._view is not None:
                return self._view.whitening
            return load_whitening(self.path)

    def check_compatible(self, descriptor: dict, conf: IndexConf | None = None) -> None:
        """Refuse settings other than those the index was built with.

        Raises:
            IndexStateError: naming every differing descriptor key (and the factory).
        """
        self._check(normalise_descriptor(descriptor), conf, None)

    def _check(self, descriptor: dict, conf: IndexConf | None, dim: int | None) -> None:
        built, wanted = dict(self._manifest["descriptor"]), dict(descriptor)
        if conf is not None:
            built["index"] = {"factory": self._manifest["index"]["factory"]}
            wanted["index"] = {"factory": conf.factory}
        if dim is not None:
            built["dim"], wanted["dim"] = self.dim, dim
        message = incompatibility(self.path, built, wanted)
        if message is not None:
            raise IndexStateError(message)

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change ``nprobe`` / ``ef_search``; a writer also records them in the manifest."""
        with self._mutex:
            self._check_open()
            current = self.conf
            conf = IndexConf(
                factory=current.factory,
                nprobe=current.nprobe if nprobe is None else int(nprobe),
                ef_search=current.ef_search if ef_search is None else int(ef_search),
            )
            if conf == current:
                return
            self._manifest["index"] = conf.to_dict()
            self._loader.conf = conf
            if self._view is not None:
                self._view.backend.conf = conf
                self._view.backend.apply_search_params()
            if self.writable:
                write_manifest(self.path, self._manifest)

    # -- internals shared with the writer mixin ---------------------------------------

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

    def __len__(self) -> int:
        """Number of searchable (``'ok'``) images committed."""
        with self._mutex:
            self._check_open()
            return self._db.count_ok()

    def count(self) -> dict[str, int]:
        """``{"ok": n, "error": m}`` images committed."""
        with self._mutex:
            self._check_open()
            return self._db.counts()

    def get(self, ids: Sequence[int]) -> list[ImageRecord | None]:
        """The records of ``ids``, None for unknown ids, in input order."""
        wanted = [int(i) for i in ids]
        with self._mutex:
            self._check_open()
            with self._db.snapshot():
                found = self._db.get(sorted(set(wanted)))
        return [found.get(i) for i in wanted]

    def find_path(self, path: str) -> ImageRecord | None:
        """The record stored under exactly ``path``, or None."""
        with self._mutex:
            self._check_open()
            return self._db.find_path(str(path))

    def records(self, status: str | None = None) -> Iterator[ImageRecord]:
        """Every record (or those with ``status`` ``'ok'`` / ``'error'``), ordered by id."""
        if status not in (None, "ok", "error"):
            raise ValueError(f"status must be None, 'ok' or 'error', got {status!r}")
        after = 0
        while True:
            with self._mutex:
                self._check_open()
                page = self._db.page(after, status)
            yield from page
            if len(page) < PAGE:
                return
            after = page[-1].id

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Raw ``(n, D)`` float32 descriptors of ``'ok'`` images, in input order.

        Raises:
            ValueError: an id is unknown or belongs to an ``'error'`` image.
        """
        wanted = [int(i) for i in ids]
        with self._mutex:
            self._check_open()
            with self._db.snapshot():
                found = self._db.slots_of(sorted(set(wanted)))
                bad = [i for i in wanted if i not in found or found[i][1] is None]
                if bad:
                    raise ValueError(
                        f"no vector for image id(s) {bad[:5]}{' ...' if len(bad) > 5 else ''} in "
                        f"{self.path}: unknown ids or images that failed to decode"
                    )
                vectors, n_rows = self._loader.vector_file()
                slots = np.array([found[i][1] for i in wanted], dtype=np.int64)
                return vectors.read(slots, n_rows)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest images by inner product in the (whitened) descriptor space.

        Args:
            queries: raw ``(n, D)`` float32 descriptors, L2-normalised by the caller; the
                stored whitening is applied here.
            k: results per query; ``k <= 0`` means all searchable images.

        Returns:
            ``(scores, ids)``, ``(n, k)`` float32 / int64, best first; rows with fewer than
            ``k`` results are padded with id ``-1`` and score ``-inf``. Tombstoned structures
            (HNSW) fetch ``k`` + tombstones candidates and drop the dead ones.
        """
        queries = check_vectors(queries, self.dim, "queries")
        with self._mutex:
            view = self._current_view()
            if k <= 0:
                k = view.backend.n_live
            return view.backend.search(prepare(queries, view.whitening), int(k))

    # -- the index space (what faiss holds), for re-ranking -----------------------------------

    @property
    def index_dim(self) -> int:
        """Dimension ``d`` of the index space: the whitening's output, or ``D``."""
        with self._mutex:
            return self._current_view().backend.dim

    def index_space(self, raw: np.ndarray) -> np.ndarray:
        """Raw ``(n, D)`` descriptors into the index space exactly as :meth:`search` does:
        whitened and L2-normalised ``(n, d)`` float32 (unchanged without a whitening)."""
        raw = check_vectors(raw, self.dim, "queries")
        with self._mutex:
            return prepare(raw, self._current_view().whitening)

    def index_vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of ``'ok'`` images in the index space, ``(n, d)`` float32.

        Raises:
            ValueError: an id is unknown or belongs to an ``'error'`` image.
        """
        with self._mutex:
            return prepare(self.vectors(ids), self._current_view().whitening)

    def search_index_space(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` with queries already in the index space, ``(n, d)`` float32
        (e.g. from :meth:`index_space`, then expanded); same output contract."""
        with self._mutex:
            view = self._current_view()
            queries = check_vectors(queries, view.backend.dim, "index-space queries")
            if k <= 0:
                k = view.backend.n_live
            return view.backend.search(queries, int(k))

    def vector_version(self) -> tuple[int, int]:
        """``(seq, epoch)``: the newest op committed (any add, update or removal of a vector
        raises it) and the whitening epoch of the searches. Derived state computed from the
        vectors (DBA) is current exactly when it was computed at the same version."""
        with self._mutex:
            view = self._current_view()
            return self._db.last_seq(), view.epoch

    def live_vectors(self) -> LiveVectors:
        """Every searchable vector in the index space, read from one committed state.

        Ids, seqs and vectors come from one SQLite snapshot (a compaction replacing the
        vector file meanwhile is retried), so they agree with each other and with ``seq``.
        """
        with self._mutex:
            view = self._current_view()
            for attempt in range(5):
                try:
                    with self._db.snapshot():
                        seq = self._db.last_seq()
                        ids, slots, seqs = self._db.live_with_seq()
                        vectors, n_rows = self._loader.vector_file()
                        raw = vectors.read(slots, n_rows)
                    break
                except FileNotFoundError:  # compacted under us: the new file is named now
                    time.sleep(0.05 * (attempt + 1))
            else:
                raise IndexStateError(
                    f"index {self.path} kept changing while it was being read; retry in a moment"
                )
            return LiveVectors(seq, view.epoch, ids, seqs, prepare(raw, view.whitening))

    @property
    def settings(self) -> dict:
        """Index-level defaults that are not part of the descriptor (query rotations, ...)."""
        with self._mutex:
            return json.loads(self._db.kv_get("settings", "{}"))

    def set_settings(self, settings: dict) -> None:
        """Replace :attr:`settings` (JSON-serialisable); one committed transaction."""
        self._require_writable()
        text = json.dumps(settings, sort_keys=True)
        with self._mutex, self._db.write():
            self._db.kv_set("settings", text)

    def refresh(self) -> None:
        """Make the changes committed since opening (or the last refresh) searchable."""
        with self._mutex:
            self._check_open()
            if self._view is None or self.writable:
                self._current_view()
                return
            self._view = self._loader.catch_up(self._view)
            manifest = read_manifest(self.path)
            manifest["index"] = self._manifest["index"]  # keep local set_search_params
            self._manifest = manifest
