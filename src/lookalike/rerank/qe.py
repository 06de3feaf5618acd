"""Query expansion: merge the query with its top results and search again.

Average QE (Chum et al. 2007) adds the top ``n`` result descriptors to the query; alpha-QE
(Radenovic et al. 2018) weights each by ``similarity^alpha``, so weak matches count little.
The first-stage ranking (for a query searched at several rotations, the fused one) chooses
the neighbours; their stored index-space vectors are added to the upright query descriptor
and the index is searched once more.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from lookalike.errors import ConfigError
from lookalike.index.source import VectorSource
from lookalike.query import QueryContext
from lookalike.ranking import Ranking
from lookalike.rerank.functional import alpha_qe, max_fuse

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QEConf:
    """Query expansion settings; the defaults are the ``alpha-qe`` preset."""

    n: int = 3  # top first-stage results merged into the query; 0 switches expansion off
    alpha: float = 0.5  # neighbour weight = max(similarity, 0)^alpha; 0 = average QE
    keep_first_stage: bool = True  # score = max(new, first-stage score); False: new score only

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ConfigError(f"query expansion n must be an integer >= 0, got {self.n!r}")
        if not self.alpha >= 0:
            raise ConfigError(f"query expansion alpha must be >= 0, got {self.alpha!r}")


# Measured on Oxford5k (845) and Holidays with benchmarks/rerank.py --tune: settings good on
# both rather than the best of either. The literature's alpha = 3 suits fine-tuned descriptors
# whose true matches score 0.7-0.9; the default (ImageNet, R-MAC, whitened) descriptors score
# 0.3-0.6, where sim^3 all but switches the expansion off (n=3: Oxford 74.3 against 78.5 with
# alpha 0.5). keep_first_stage keeps matches that only a rotated query view found (the
# expansion starts from the upright view): Holidays +0.4 (aqe) and +2.2 (dba), for 1-2
# points of Oxford with QE alone and ~0 with dba+QE.
QE_PRESETS: dict[str, QEConf] = {
    "aqe": QEConf(n=2, alpha=0.0),  # average QE over the top 2
    "alpha-qe": QEConf(n=3, alpha=0.5),  # alpha-QE over the top 3, weights sim^0.5
}


def get_qe_conf(name: str) -> QEConf:
    """The query-expansion preset ``name``; ``ConfigError`` listing the valid names."""
    try:
        return QE_PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown query expansion preset {name!r}; choose one of {', '.join(QE_PRESETS)}"
        ) from None


def top_valid(scores: np.ndarray, ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` entries of a ranking that are real results (id >= 0, finite score)."""
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    keep = np.flatnonzero((ids >= 0) & np.isfinite(scores))[:n]
    return scores[keep], ids[keep]


class QueryExpansion:
    """Re-ranking stage: expand the query with its top results, search the index again.

    Args:
        source: the index-space vectors of the index searched.
        conf: ``n`` and ``alpha``.
        name: the stage name reported in pipelines (``"aqe"``, ``"alpha-qe"``, ...).
    """

    depth = 0  # reads the top n of what it is given

    def __init__(
        self, source: VectorSource, conf: QEConf = QEConf(), name: str = "alpha-qe"
    ) -> None:
        self.source = source
        self.conf = conf
        self.name = name

    def __repr__(self) -> str:
        return f"QueryExpansion({self.name!r}, {self.conf})"

    def expand(self, query: np.ndarray, neighbours: np.ndarray, sims: np.ndarray) -> np.ndarray:
        """``(d,)`` expanded query from ``(m, d)`` neighbours (best first) and their sims."""
        return alpha_qe(query, neighbours, sims, alpha=self.conf.alpha, n=self.conf.n)

    def __call__(self, query: QueryContext, ranking: Ranking, k: int) -> Ranking:
        """Re-rank one query (the :class:`lookalike.rerank.Stage` protocol): the ranking of
        the expanded query, fused with the given one (``keep_first_stage``)."""
        if k <= 0:  # (a search of k <= 0 would rank everything)
            return ranking.fit(0)
        scores, ids = ranking.scores, ranking.ids
        top_s, top_i = top_valid(scores, ids, self.conf.n)
        if len(top_i) == 0:  # nothing to expand with: the first stage stands
            return fit_ranking(scores, ids, k)
        try:
            neighbours = self.source.vectors(top_i)
        except ValueError:  # removed since this reader's snapshot: keep the first stage
            logger.warning("query expansion skipped: a top result is no longer in the index")
            return fit_ranking(scores, ids, k)
        expanded = self.expand(query.descriptor, neighbours, top_s)
        out_s, out_i = self.source.search(expanded[None], k)
        if self.conf.keep_first_stage:
            return Ranking(*max_fuse(out_s[0], out_i[0], scores, ids, len(out_i[0])))
        return Ranking(out_s[0], out_i[0])


def fit_ranking(scores: np.ndarray, ids: np.ndarray, k: int) -> Ranking:
    """A ``(k0,)`` ranking cut or padded to ``k`` results."""
    return Ranking.of(scores, ids).fit(k)
