"""The narrow, read-only view of an index that re-ranking stages read vectors through.

Query expansion and database-side augmentation work in the *index space*: the whitened,
L2-normalised vectors the backend holds. They need to map a raw query there, read the
index-space vectors of some images or of all of them, search with an index-space query,
and know which version of the vector set they are looking at, and nothing else of the
store (no writes, no metadata, no files).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from lookalike.index.loader import prepare
from lookalike.index.vectors import check_vectors
from lookalike.storage import read_retrying

if TYPE_CHECKING:
    from lookalike.index.store import IndexStore


@dataclass(frozen=True)
class LiveVectors:
    """Every searchable vector of one committed state, in the index space.

    Attributes:
        seq: the newest op seq committed in this state (see :meth:`VectorSource.version`).
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


@runtime_checkable
class VectorSource(Protocol):
    """What a re-ranking stage may read of an index."""

    path: Path  # the index directory, for messages

    def __len__(self) -> int:
        """Searchable images."""
        ...

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the index space."""
        ...

    def version(self) -> tuple[int, int]:
        """``(seq, epoch)``: the newest op committed (any add, update or removal of a vector
        raises it) and the whitening epoch of the searches. Derived state computed from the
        vectors (a DBA) is current exactly when it was computed at the same version."""
        ...

    def to_index_space(self, raw: np.ndarray) -> np.ndarray:
        """Raw ``(n, D)`` descriptors whitened and L2-normalised like the stored ones."""
        ...

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """``(n, d)`` index-space vectors of ``'ok'`` images (``ValueError`` for others)."""
        ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search ``(n, d)`` index-space queries; the faiss contract, ``k <= 0`` all."""
        ...

    def live(self) -> LiveVectors:
        """Every searchable vector of one committed state."""
        ...


class IndexVectors:
    """:class:`VectorSource` over an :class:`~lookalike.index.IndexStore` (read-only)."""

    def __init__(self, store: IndexStore) -> None:
        self._store = store
        self.path = store.path

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"IndexVectors({str(self.path)!r})"

    @property
    def dim(self) -> int:
        store = self._store
        with store._mutex:
            return store._current_view().backend.dim

    def version(self) -> tuple[int, int]:
        store = self._store
        with store._mutex:
            view = store._current_view()
            return store._db.last_seq(), view.epoch

    def to_index_space(self, raw: np.ndarray) -> np.ndarray:
        store = self._store
        raw = check_vectors(raw, store.dim, "queries")
        with store._mutex:
            return prepare(raw, store._current_view().whitening)

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        store = self._store
        with store._mutex:
            return prepare(store.vectors(ids), store._current_view().whitening)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        store = self._store
        with store._mutex:
            view = store._current_view()
            queries = check_vectors(queries, view.backend.dim, "index-space queries")
            if k <= 0:
                k = len(view.backend)
            return view.backend.search(queries, int(k))

    def live(self) -> LiveVectors:
        """Ids, seqs and vectors come from one SQLite snapshot (a compaction replacing the
        vector file meanwhile is retried), so they agree with each other and with ``seq``."""
        store = self._store

        def read() -> tuple:
            with store._db.snapshot():
                seq = store._db.last_seq()
                ids, slots, seqs = store._db.live_with_seq()
                vectors, n_rows = store._loader.vector_file()
                return seq, ids, seqs, vectors.read(slots, n_rows)

        with store._mutex:
            view = store._current_view()
            what = f"index {store.path}"
            seq, ids, seqs, raw = read_retrying(read, what, store._loader.check_vector_file)
            return LiveVectors(seq, view.epoch, ids, seqs, prepare(raw, view.whitening))
