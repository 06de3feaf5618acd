"""Database-side augmentation (DBA), stored in the index directory and kept current.

Every database vector ``x_i`` is replaced by ``l2n(sum_j max(s_ij, 0)^alpha x_j)`` over its
``k`` nearest neighbours in the index space, itself included (first, weight 1); queries are
then searched against these augmented vectors (Arandjelovic & Zisserman 2012; alpha-DBA,
Radenovic et al. 2018). The neighbour lists are exact: brute-force inner products over the
live index-space vectors, whatever faiss structure the index uses.

Stored as ``dba.npz`` in the index directory, replaced atomically: the augmented vectors,
the neighbour lists (image ids and similarities), ``k``, ``alpha`` and the
:meth:`~lookalike.index.VectorSource.version` ``(seq, epoch)`` they were computed at. Its
digest is recorded in the manifest (``dba.sha``) each time it is saved
(:func:`store_dba`) and checked when it is read (:func:`load_stored`): a damaged one is
computed again. A DBA
whose version differs from the index's is stale and is never searched: the re-ranking stage
brings it up to date first (:meth:`DBAIndex.update`). The stage, the per-index state that
keeps one DBA current and the writer-side sync are in :mod:`lookalike.rerank.dba_stage`.

Update rule. The augmented vector of image ``i`` depends only on its neighbour list and on
the vectors in it, so after adds, updates (a changed vector) and removals it is recomputed
exactly for

* every added or updated image (a new vector, so a new list);
* every image whose list held a removed or updated image (the reverse neighbours in the old
  graph);
* every image for which a new or updated vector is at least as similar as its current
  ``k``-th neighbour, or whose list is not full (the reverse neighbours in the new graph).

All other lists provably stay as they are. The cost is ``O((changed + affected) x N x d)``
against ``O(N^2 x d)`` for a rebuild, so everything is recomputed instead when more than
:data:`FULL_REBUILD_FRACTION` of the images changed, or when the whitening (epoch), ``k`` or
``alpha`` changed. Either way the result equals a from-scratch computation.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from lookalike.confined import read_bytes
from lookalike.errors import ConfigError, IndexStateError
from lookalike.index.manifest import DBASettings, read_manifest
from lookalike.index.source import LiveVectors, VectorSource
from lookalike.rerank.functional import dba, knn_lists
from lookalike.storage import atomic_write

if TYPE_CHECKING:
    from lookalike.index import IndexStore

logger = logging.getLogger(__name__)

DBA_NAME = "dba.npz"
FORMAT_VERSION = 1
FULL_REBUILD_FRACTION = 0.25  # more changed images than this fraction: recompute everything
CHUNK = 2048  # rows per block of brute-force similarities (CHUNK x N float32 in memory)


def check_params(k: int, alpha: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ConfigError(f"DBA k must be an integer >= 1 (1 = off), got {k!r}")
    if not alpha >= 0:
        raise ConfigError(f"DBA alpha must be >= 0, got {alpha!r}")


def _to_ids(pos: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows of ``ids`` to image ids, ``-1`` kept."""
    return np.where(pos >= 0, ids[np.maximum(pos, 0)], -1) if len(ids) else pos.copy()


class DBAIndex:
    """The augmented database of one index, at one :meth:`VectorSource.version`.

    Use :func:`build_dba` or :meth:`load`, not the constructor.

    Attributes:
        k: neighbours per augmented vector, the image itself included.
        alpha: weight exponent; 0 is average DBA.
        seq, epoch: the index version the state corresponds to.
        ids: ``(N,)`` int64 image ids, ascending.
        neighbours: ``(N, k)`` int64 image ids of each list (itself first, ``-1`` padding).
        sims: ``(N, k)`` float32 their similarities (``-inf`` padding).
        vectors: ``(N, d)`` float32 augmented vectors, L2-normalised.
    """

    def __init__(
        self,
        source: VectorSource,
        k: int,
        alpha: float,
        version: tuple[int, int],
        ids: np.ndarray,
        neighbours: np.ndarray,
        sims: np.ndarray,
        vectors: np.ndarray,
    ) -> None:
        self.source = source
        self.k = int(k)
        self.alpha = float(alpha)
        self.seq, self.epoch = int(version[0]), int(version[1])
        self.ids = ids
        self.neighbours = neighbours
        self.sims = sims
        self.vectors = vectors
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"DBAIndex({len(self)} vectors, k={self.k}, alpha={self.alpha}, seq={self.seq}, "
            f"epoch={self.epoch})"
        )

    # -- computing ---------------------------------------------------------------------------

    @classmethod
    def compute(cls, source: VectorSource, k: int, alpha: float, live: LiveVectors) -> DBAIndex:
        """From scratch, from one :meth:`VectorSource.live` state."""
        check_params(k, alpha)
        pos, sims = knn_lists(live.vectors, np.arange(len(live.ids)), k)
        vectors = dba(live.vectors, pos, sims, alpha)
        neighbours = _to_ids(pos, live.ids)
        return cls(source, k, alpha, (live.seq, live.epoch), live.ids, neighbours, sims, vectors)

    def is_current(self) -> bool:
        """Whether the index still holds exactly the vectors this state was computed from."""
        with self._lock:
            mine = (self.seq, self.epoch)
        return self.source.version() == mine

    def update(self) -> int:
        """Bring the state up to the index's current version (see the module docstring),
        in memory (:meth:`save` stores it).

        Returns:
            How many augmented vectors were recomputed (0: already current).
        """
        with self._lock:
            if self.is_current():
                return 0
            live = self.source.live()
            fresh, recomputed = self._updated(live)
            self.seq, self.epoch = fresh.seq, fresh.epoch
            self.ids, self.neighbours = fresh.ids, fresh.neighbours
            self.sims, self.vectors = fresh.sims, fresh.vectors
            logger.info("DBA at seq %d: %d of %d recomputed", self.seq, recomputed, len(self))
            return recomputed

    def _updated(self, live: LiveVectors) -> tuple[DBAIndex, int]:
        """The state at ``live``'s version and how many augmented vectors were recomputed."""
        n = len(live.ids)
        if live.epoch != self.epoch or len(self.ids) == 0:
            return DBAIndex.compute(self.source, self.k, self.alpha, live), n
        changed = live.seqs > self.seq  # added or updated since this state
        kept = np.isin(live.ids, self.ids) & ~changed
        gone = np.setdiff1d(self.ids, live.ids[kept])  # removed or updated ids
        n_changes = int(changed.sum()) + int(np.isin(gone, live.ids, invert=True).sum())
        if n_changes > FULL_REBUILD_FRACTION * n:
            return DBAIndex.compute(self.source, self.k, self.alpha, live), n
        base = live.vectors
        kept_rows = np.flatnonzero(kept)
        old = np.searchsorted(self.ids, live.ids[kept_rows])
        old_nb, old_sims = self.neighbours[old], self.sims[old]
        # reverse neighbours in the old graph: a list entry vanished or changed vector
        hit = np.isin(old_nb[:, 1:], gone).any(axis=1)
        # reverse neighbours in the new graph: a new vector beats the k-th neighbour
        new_rows = np.flatnonzero(changed)
        if len(new_rows) and len(kept_rows):
            full = old_nb[:, -1] >= 0
            thr = np.where(full, old_sims[:, -1], -np.inf)[:, None]
            for begin in range(0, len(kept_rows), CHUNK):
                block = slice(begin, begin + CHUNK)
                s = base[kept_rows[block]] @ base[new_rows].T
                hit[block] |= (s >= thr[block]).any(axis=1)
        affected = changed.copy()
        affected[kept_rows[hit]] = True
        pos = np.empty((n, self.k), dtype=np.int64)
        sims = np.empty((n, self.k), dtype=np.float32)
        vectors = np.empty((n, base.shape[1]), dtype=np.float32)
        stay = kept_rows[~hit]
        stay_old = old[~hit]
        nb = self.neighbours[stay_old]
        pos[stay] = np.where(nb >= 0, np.searchsorted(live.ids, np.maximum(nb, 0)), -1)
        sims[stay] = self.sims[stay_old]
        vectors[stay] = self.vectors[stay_old]
        rows = np.flatnonzero(affected)
        pos[rows], sims[rows] = knn_lists(base, rows, self.k)
        vectors[rows] = dba(base, pos[rows], sims[rows], self.alpha)
        version = (live.seq, live.epoch)
        fresh = DBAIndex(
            self.source,
            self.k,
            self.alpha,
            version,
            live.ids,
            _to_ids(pos, live.ids),
            sims,
            vectors,
        )
        return fresh, len(rows)

    # -- searching ---------------------------------------------------------------------------

    def _require_current(self) -> None:
        if not self.is_current():
            raise IndexStateError(
                f"the DBA of index {self.source.path} is at seq {self.seq} but the index has "
                "changed since; call update() before searching it"
            )

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """``(n,)`` bool: which ``ids`` have an augmented vector."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        with self._lock:
            known = self.ids
        at = np.minimum(np.searchsorted(known, ids), max(len(known) - 1, 0))
        return (known[at] == ids) if len(known) else np.zeros(len(ids), dtype=bool)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(known, vectors)``: ``(n,)`` bool, which ``ids`` have an augmented vector, and
        ``(known.sum(), d)`` float32 those vectors, in input order, from one state (an
        update in another thread cannot come between the two)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        with self._lock:
            known = self.contains(ids)
            return known, self.vectors[np.searchsorted(self.ids, ids[known])]

    def augmented(self, ids: np.ndarray) -> np.ndarray:
        """The augmented vectors of ``ids``, ``(n, d)`` float32.

        Raises:
            ValueError: an id has no augmented vector (unknown, removed, never indexed).
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        with self._lock:
            known = self.contains(ids)
            if not known.all():
                raise ValueError(f"no DBA vector for image id(s) {ids[~known][:5].tolist()}")
            return self.vectors[np.searchsorted(self.ids, ids)]

    def search(
        self, queries: np.ndarray, k: int, check: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner-product search of the augmented vectors.

        Args:
            queries: ``(n, d)`` (or one ``(d,)``) index-space queries.
            k: results per query; ``<= 0`` ranks every image.
            check: refuse a stale state; False searches the state as it is (for a caller
                that brought it up to date a moment ago: a commit since then is seen by the
                next search, as it is by the first-stage search).

        Returns:
            ``(scores, ids)``, ``(n, k)`` float32 / int64, best first, ``-1`` / ``-inf``
            padding (one query: ``(k,)`` each).

        Raises:
            IndexStateError: the index changed since this state (call :meth:`update`).
        """
        q = np.asarray(queries, dtype=np.float32)
        single = q.ndim == 1
        q = q[None] if single else q
        with self._lock:  # one state; update() replaces the arrays, never writes into them
            if check:
                self._require_current()
            db_ids, db = self.ids, self.vectors
        if q.ndim != 2 or (len(db_ids) and q.shape[1] != db.shape[1]):
            raise ValueError(f"queries must be (n, {db.shape[1]}), got {q.shape}")
        n_db = len(db_ids)
        k = n_db if k <= 0 else int(k)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        got = min(k, n_db)
        if got and len(q):
            s = q @ db.T
            top = np.argpartition(-s, got - 1, axis=1)[:, :got] if got < n_db else None
            if top is None:
                top = np.broadcast_to(np.arange(n_db), s.shape)
            top_s = np.take_along_axis(s, top, axis=1)
            order = np.lexsort((top, -top_s), axis=1)
            scores[:, :got] = np.take_along_axis(top_s, order, axis=1)
            ids[:, :got] = db_ids[np.take_along_axis(top, order, axis=1)]
        return (scores[0], ids[0]) if single else (scores, ids)

    # -- persistence -------------------------------------------------------------------------

    def save(self, path: Path, unique: bool = False) -> str:
        """Write the state to ``path`` (``<index>/dba.npz``) atomically; the caller holds
        the index's writer lock and records the returned digest (:func:`store_dba` does
        both). ``unique``: a scratch name of this call only.

        Raises:
            IndexStateError: the state is stale.
            StorageError: the directory cannot be written.
        """
        with self._lock:
            self._require_current()
            meta = {
                "format_version": FORMAT_VERSION,
                "k": self.k,
                "alpha": self.alpha,
                "seq": self.seq,
                "epoch": self.epoch,
            }

            def write(f: BinaryIO) -> None:
                np.savez(
                    f,
                    meta=np.array(json.dumps(meta)),
                    ids=self.ids,
                    neighbours=self.neighbours,
                    sims=self.sims,
                    vectors=self.vectors,
                )

            return atomic_write(path, write, unique=unique)

    @classmethod
    def load(cls, path: Path, source: VectorSource, sha: str | None = None) -> DBAIndex | None:
        """The DBA stored at ``path`` (maybe stale), or None if there is none.

        Args:
            path: ``<index>/dba.npz``.
            source: the index's vectors.
            sha: the digest the file must have (None: unchecked).

        Raises:
            IndexStateError: the file is damaged (or not the one of digest ``sha``), a link,
                or of a newer format.
        """
        try:
            content, digest = read_bytes(path)
        except FileNotFoundError:
            return None
        if sha is not None and digest != sha:
            raise DigestDiffers(f"{path} is not the DBA the manifest records (its digest differs)")
        try:
            with np.load(io.BytesIO(content), allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {key: data[key] for key in ("ids", "neighbours", "sims", "vectors")}
            k, alpha = int(meta["k"]), float(meta["alpha"])
            version = (int(meta["seq"]), int(meta["epoch"]))
        except (OSError, ValueError, KeyError, TypeError, EOFError) as error:
            raise IndexStateError(
                f"{path} is damaged ({error}); delete it, it is rebuilt on the next search"
            ) from None
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise IndexStateError(f"{path} has a newer format; upgrade lookalike or delete it")
        n = len(arrays["ids"])
        if arrays["neighbours"].shape != (n, k) or len(arrays["vectors"]) != n:
            raise IndexStateError(f"{path} is damaged (inconsistent shapes); delete it")
        return cls(
            source,
            k,
            alpha,
            version,
            arrays["ids"].astype(np.int64),
            arrays["neighbours"],
            arrays["sims"],
            arrays["vectors"],
        )


class DigestDiffers(IndexStateError):
    """``dba.npz`` is not the file whose digest the manifest records."""


def load_stored(store: IndexStore, attempts: int = 3) -> DBAIndex | None:
    """The DBA stored in ``store``'s directory (maybe stale), checked against the digest
    the manifest records; None when there is none.

    A writer replaces the file, then the manifest: a digest that differs is compared with
    the manifest on disk again, a few times, before the file is called damaged.

    Raises:
        IndexStateError: the file is damaged (the caller computes the DBA again).
    """
    path = store.path / DBA_NAME
    recorded = store.manifest.dba
    for attempt in range(attempts):
        try:
            return DBAIndex.load(path, store.vector_source(), recorded and recorded.sha)
        except DigestDiffers:
            if attempt == attempts - 1:
                raise
            time.sleep(0.02 * (attempt + 1))
            recorded = read_manifest(store.path).dba
    return None  # pragma: no cover - the loop returns or raises


def store_dba(store: IndexStore, index: DBAIndex, unique: bool = False) -> None:
    """Save ``index`` as the index's ``dba.npz`` and record it (settings and digest) in the
    manifest; the caller holds the writer lock (a writer, or a reader in ``try_writer``)."""
    sha = index.save(store.path / DBA_NAME, unique=unique)
    store.update_manifest(dba=DBASettings(index.k, index.alpha, sha))


def build_dba(source: VectorSource, k: int = 5, alpha: float = 1.0) -> DBAIndex:
    """Compute the DBA of an index from scratch (in memory; :meth:`DBAIndex.save` stores it).

    Args:
        source: the index's vectors (:meth:`IndexStore.vector_source`).
        k: neighbours per augmented vector, the image itself included; 1 is no augmentation.
        alpha: weight exponent ``max(sim, 0)^alpha``; 0 is average DBA.
    """
    check_params(k, alpha)
    return DBAIndex.compute(source, k, alpha, source.live())
