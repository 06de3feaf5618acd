"""Re-ranking: second stages that refine a first-stage ranking.

Every stage is a :class:`Reranker`: it takes the first-stage ``(scores, ids)`` of one query
and returns a new ranking under the faiss contract. The descriptor-space stages live here:

* ``aqe`` / ``alpha-qe`` (:mod:`lookalike.rerank.qe`): expand the query with its top results
  and search again;
* ``dba`` / ``dba+aqe`` / ``dba+alpha-qe`` (:mod:`lookalike.rerank.dba`): search the
  augmented database stored in the index, optionally with an expanded query.

::

    stage = create_reranker("dba+alpha-qe")
    raw = extractor.extract_query(path)[:1]                  # the upright view, raw (1, D)
    scores, ids = store.search(raw, 100)                     # or the fused multi-view ranking
    scores, ids = stage(store, store.index_space(raw)[0], scores[0], ids[0], k=10)

Query expansion over the *augmented* database is what combines the two (Radenovic et al.
2018): a QE stage placed after ``dba`` would search the plain index again and lose the
augmentation, so :func:`descriptor_pipeline` folds ``["dba", "alpha-qe"]`` into the one
``dba+alpha-qe`` stage (the ``dba`` preset with the ``alpha-qe`` preset's expansion).

The maths is in :mod:`lookalike.rerank.functional` (``alpha_qe``, ``average_qe``, ``dba``,
``knn_lists``); ``lookalike.rerank.dba`` is the DBA module, not the function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from lookalike.errors import ConfigError
from lookalike.index import IndexStore
from lookalike.rerank.dba import (
    DBA_PRESETS,
    DBAConf,
    DBAIndex,
    DBARerank,
    build_dba,
    open_dba,
    sync_dba,
)
from lookalike.rerank.functional import alpha_qe, average_qe
from lookalike.rerank.qe import QE_PRESETS, QEConf, QueryExpansion, fit_ranking


@runtime_checkable
class Reranker(Protocol):
    """One re-ranking stage.

    Attributes:
        name: the stage name (a :data:`RERANKERS` key for the built-in ones).
    """

    name: str

    def __call__(
        self,
        store: IndexStore,
        query: np.ndarray,
        scores: np.ndarray,
        ids: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Re-rank one query.

        Args:
            store: the index the first stage searched.
            query: ``(d,)`` float32 query descriptor in the index space (whitened and
                L2-normalised: :meth:`IndexStore.index_space` of the raw descriptor).
            scores: ``(k0,)`` float32 first-stage scores, best first.
            ids: ``(k0,)`` int64 first-stage ids, ``-1`` padding.
            k: results wanted; ``<= 0`` ranks the whole index.

        Returns:
            ``(scores, ids)``, ``(k,)`` float32 / int64, best first, ``-1`` / ``-inf`` padding.
        """
        ...


RERANKERS: dict[str, Callable[[], Reranker]] = {
    "aqe": lambda: QueryExpansion.from_preset("aqe"),
    "alpha-qe": lambda: QueryExpansion.from_preset("alpha-qe"),
    "dba": lambda: DBARerank.from_preset("dba"),
    "dba+aqe": lambda: DBARerank.from_preset("dba+aqe"),
    "dba+alpha-qe": lambda: DBARerank.from_preset("dba+alpha-qe"),
}


def create_reranker(name: str) -> Reranker:
    """The built-in stage ``name``; ``ConfigError`` (a ``ValueError``) listing the valid names."""
    if name not in RERANKERS:
        raise ConfigError(f"unknown re-ranking stage {name!r}; choose from {', '.join(RERANKERS)}")
    return RERANKERS[name]()


def descriptor_pipeline(names: Sequence[str]) -> list[Reranker]:
    """The descriptor-space stages for a ``--rerank`` list, in order.

    ``dba`` together with ``aqe`` or ``alpha-qe`` (either order) becomes one DBA stage that
    expands the query over the augmented database, where the first of the two stood. Names
    that are not descriptor-space stages (``verify``, ...) are the caller's: pass only
    :data:`RERANKERS` keys here.
    """
    names = list(names)
    for name in names:
        if name not in RERANKERS:
            create_reranker(name)  # raises, naming the valid stages
    qe = [n for n in names if n in QE_PRESETS]
    if "dba" not in names or not qe:
        return [create_reranker(n) for n in names]
    if len(qe) > 1:
        raise ConfigError(f"choose one query expansion with dba, got {', '.join(qe)}")
    fused = DBARerank.from_preset(f"dba+{qe[0]}")
    first = min(names.index("dba"), names.index(qe[0]))
    stages = [
        fused if i == first else create_reranker(n)
        for i, n in enumerate(names)
        if i == first or n not in ("dba", qe[0])
    ]
    return stages


def run_pipeline(
    stages: Sequence[Reranker],
    store: IndexStore,
    query: np.ndarray,
    scores: np.ndarray,
    ids: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``stages`` in order, each to the previous ranking; ``(k,)`` scores and ids
    (no stages: the first-stage ranking cut or padded to ``k``)."""
    if not stages:
        return fit_ranking(scores, ids, k, store)
    for stage in stages:
        scores, ids = stage(store, query, scores, ids, k)
    return scores, ids


__all__ = [
    "DBA_PRESETS",
    "QE_PRESETS",
    "RERANKERS",
    "DBAConf",
    "DBAIndex",
    "DBARerank",
    "QEConf",
    "QueryExpansion",
    "Reranker",
    "alpha_qe",
    "average_qe",
    "build_dba",
    "create_reranker",
    "descriptor_pipeline",
    "open_dba",
    "run_pipeline",
    "sync_dba",
]
