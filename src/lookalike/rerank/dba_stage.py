"""The DBA re-ranking stage, the per-index state that keeps one DBA current, and its sync.

* :class:`DBAState` holds the augmented database of one index for one ``(k, alpha)``: the
  stored ``dba.npz`` brought up to date, or, when there is none, one computed once and stored
  when the index directory can be written (under the writer lock, if no other process holds
  it; in memory otherwise, and the log says which). After that it follows the index's
  changes by version (:meth:`DBAIndex.update`), never by recomputing per query.
* :class:`DBARerank` is the stage: search the augmented database, optionally with a query
  expanded over augmented vectors, fused with the ranking it is given.
* :func:`sync_dba` is what a writer calls after changing the index (``lookalike index``,
  ``remove``): a stored DBA is brought up to date and saved.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lookalike.confined import EntryRefused
from lookalike.errors import ConfigError, IndexStateError, StorageError
from lookalike.query import QueryContext
from lookalike.ranking import Ranking
from lookalike.rerank.dba import DBAIndex, build_dba, check_params, load_stored, store_dba
from lookalike.rerank.functional import alpha_qe, max_fuse
from lookalike.rerank.qe import QE_PRESETS, QEConf, top_valid

if TYPE_CHECKING:
    from lookalike.index import IndexStore

logger = logging.getLogger(__name__)

EXPAND_FROM = ("first-stage", "dba")


@dataclass(frozen=True)
class DBAConf:
    """DBA re-ranking settings; the defaults are the ``dba`` preset."""

    k: int = 5  # neighbours averaged per database vector, the image itself included; 1 is off
    alpha: float = 1.0  # neighbour weight = max(similarity, 0)^alpha; 0 = average DBA
    qe: QEConf | None = None  # expand the query with augmented vectors of its top results
    expand_from: str = "first-stage"  # QE neighbours: "first-stage" ranking, or "dba" search
    keep_first_stage: bool = True  # score = max(new, first-stage score); False: new score only

    def __post_init__(self) -> None:
        check_params(self.k, self.alpha)
        if self.expand_from not in EXPAND_FROM:
            raise ConfigError(
                f"DBA expand_from must be one of {', '.join(EXPAND_FROM)}, got {self.expand_from!r}"
            )


# Measured on Oxford5k (845) and Holidays with benchmarks/rerank.py --tune.
# One augmented database (k=5, alpha=1) serves every preset, so switching presets never
# recomputes the stored one; the QE parts are the QE presets of the same names.
DBA_PRESETS: dict[str, DBAConf] = {
    "dba": DBAConf(),  # augmented database, the upright query as it is
    "dba+aqe": DBAConf(qe=QE_PRESETS["aqe"]),  # + average QE over augmented vectors
    "dba+alpha-qe": DBAConf(qe=QE_PRESETS["alpha-qe"]),  # + alpha-QE over augmented vectors
}


def _load(store: IndexStore) -> DBAIndex | None:
    """The stored DBA of ``store``, None when there is none or it is damaged (logged)."""
    try:
        return load_stored(store)
    except EntryRefused:  # a link or a directory at dba.npz: refused, never replaced
        raise
    except IndexStateError as error:
        logger.warning("%s; computing it again", error)
        return None


class DBAState:
    """The current augmented database of one index, for one ``(k, alpha)``.

    Thread-safe; shared by every stage and searcher made from one
    :class:`~lookalike.rerank.StageResources`.

    Attributes:
        computed: full computations this state ran (0 when it loaded a stored one).
        recomputed: augmented vectors recomputed since, following the index's changes.
        stored: whether the state it computed was stored in ``dba.npz``.
    """

    def __init__(self, store: IndexStore, k: int = 5, alpha: float = 1.0) -> None:
        check_params(k, alpha)
        self.store = store
        self.k, self.alpha = int(k), float(alpha)
        self.computed = 0
        self.recomputed = 0
        self.stored = False
        self._index: DBAIndex | None = None
        self._lock = threading.Lock()

    def current(self) -> DBAIndex:
        """The DBA at the index's current version (loaded, computed or updated now)."""
        with self._lock:
            if self._index is None:
                self._index = self._open()
            elif not self._index.is_current():
                self._follow(self._index)
            return self._index

    def _follow(self, index: DBAIndex) -> None:
        """Update ``index`` to the index's version; a writer's store also saves it (a
        reader's stays in memory: the next writer's :func:`sync_dba` stores it)."""
        before = (index.seq, index.epoch)
        self.recomputed += index.update()
        if self.store.writable and (index.seq, index.epoch) != before:
            try:
                store_dba(self.store, index)
            except (OSError, IndexStateError, StorageError) as error:  # the next one saves
                logger.debug("updated DBA of %s not saved: %s", self.store.path, error)

    def _open(self) -> DBAIndex:
        stored = _load(self.store)
        if stored is not None and (stored.k, stored.alpha) == (self.k, self.alpha):
            if not stored.is_current():
                self._follow(stored)
                where = "stored" if self.store.writable else "in memory"
                logger.info("stored DBA of %s brought up to date %s", self.store.path, where)
            return stored
        if stored is not None:
            logger.info(
                "stored DBA of %s has k=%d alpha=%g, not k=%d alpha=%g: computing this one",
                self.store.path,
                stored.k,
                stored.alpha,
                self.k,
                self.alpha,
            )
        start = time.perf_counter()
        index = build_dba(self.store.vector_source(), self.k, self.alpha)
        self.computed += 1
        seconds = time.perf_counter() - start
        self.stored = self._persist(index)
        if self.stored:
            logger.info(
                "computed the DBA of %s (%d images, %.1f s): stored in dba.npz",
                self.store.path,
                len(index),
                seconds,
            )
        else:  # a user should know: every new process will pay this again
            logger.warning(
                "computed the DBA of %s (%d images, %.1f s): kept in memory (the index "
                "directory is read-only, being written, or keeps a DBA of other settings); "
                "a new process computes it again",
                self.store.path,
                len(index),
                seconds,
            )
        return index

    def _persist(self, index: DBAIndex) -> bool:
        """Store ``index`` and record it in the manifest, if the writer lock is free and the
        index keeps no DBA of other settings (one ``dba.npz`` per index: a DBA made with
        other ``k``/``alpha``, a tuning run's, never replaces the one the index keeps)."""
        with self.store.try_writer() as ok:
            if not ok:
                return False
            recorded = self.store.manifest.dba
            if recorded is not None and not recorded.same(self.k, self.alpha):
                logger.info(
                    "index %s keeps a DBA with k=%d alpha=%g: this one stays in memory",
                    self.store.path,
                    recorded.k,
                    recorded.alpha,
                )
                return False
            try:
                store_dba(self.store, index, unique=not self.store.writable)
            except (OSError, IndexStateError, StorageError) as error:
                logger.debug("DBA of %s not stored: %s", self.store.path, error)
                return False
        return True


class DBARerank:
    """Re-ranking stage: search the augmented database (optionally with an expanded query).

    Args:
        state: the current DBA of the index searched (:class:`DBAState`).
        conf: DBA settings, query expansion included; ``k`` and ``alpha`` must be the
            state's.
        name: the stage name reported in pipelines.
    """

    depth = 0  # reads the top n (query expansion) and fuses with what it is given

    def __init__(self, state: DBAState, conf: DBAConf = DBAConf(), name: str = "dba") -> None:
        if (state.k, state.alpha) != (conf.k, float(conf.alpha)):
            raise ConfigError(f"DBA stage {name} needs k={conf.k} alpha={conf.alpha}")
        self.state = state
        self.conf = conf
        self.name = name

    def __repr__(self) -> str:
        return f"DBARerank({self.name!r}, {self.conf})"

    def __call__(self, query: QueryContext, ranking: Ranking, k: int) -> Ranking:
        """Re-rank one query (the :class:`lookalike.rerank.Stage` protocol): the ranking of
        the augmented database, fused with the given one (``keep_first_stage``)."""
        if k <= 0:  # (a search of k <= 0 would rank everything)
            return ranking.fit(0)
        scores, ids = ranking.scores, ranking.ids
        # Current as of now, like the first stage's view as of this search's start; a commit
        # in between is followed by the next search (searching never waits for writers).
        index = self.state.current()
        q = self._query(index, query.descriptor, scores, ids)
        out_s, out_i = index.search(q, k, check=False)
        if self.conf.keep_first_stage:
            return Ranking(*max_fuse(out_s, out_i, scores, ids, len(out_i)))
        return Ranking(out_s, out_i)

    def _query(
        self, index: DBAIndex, query: np.ndarray, scores: np.ndarray, ids: np.ndarray
    ) -> np.ndarray:
        qe = self.conf.qe
        if qe is None:
            return query
        n = qe.n
        if self.conf.expand_from == "dba":
            scores, ids = index.search(query, n, check=False)
        top_s, top_i = top_valid(scores, ids, len(ids))
        known, vectors = index.lookup(top_i)  # results removed since are skipped
        top_s = top_s[known][:n]
        if len(top_s) == 0:
            return query
        return alpha_qe(query, vectors[:n], top_s, alpha=qe.alpha, n=n)


def sync_dba(store: IndexStore) -> DBAIndex | None:
    """Bring the DBA kept by a writable index up to date after changing the index.

    A stored ``dba.npz`` is updated and saved, and recorded in the manifest if it was not
    (an index of format 1, or one a searcher stored); a DBA the manifest records whose file
    is gone is computed again. Returns None when the index keeps no DBA.
    """
    current = _load(store)
    recorded = store.manifest.dba
    changed = current is None
    if current is None:
        if recorded is None:
            return None
        current = build_dba(store.vector_source(), recorded.k, recorded.alpha)
    before = (current.seq, current.epoch)
    current.update()
    unrecorded = recorded is None or recorded.sha is None
    if (
        changed
        or unrecorded
        or (current.seq, current.epoch) != before
        or not recorded.same(current.k, current.alpha)
    ):
        store_dba(store, current)
    return current
