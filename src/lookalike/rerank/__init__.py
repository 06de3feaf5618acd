"""Re-ranking: second stages that refine a first-stage ranking, all through one protocol.

Every stage is a :class:`Stage`: it takes one query's :class:`~lookalike.ranking.Ranking`
(scores, ids and optional per-candidate fields) and returns one. The built-in stages:

* ``aqe`` / ``alpha-qe`` (:mod:`lookalike.rerank.qe`): expand the query with its top results
  and search again;
* ``dba`` / ``dba+aqe`` / ``dba+alpha-qe`` (:mod:`lookalike.rerank.dba`): search the
  augmented database (kept current as the index changes), optionally with an expanded query;
* ``verify`` (:mod:`lookalike.rerank.verify`): local-feature matching and geometric
  verification of the top ``budget``; it adds the ``inliers`` field and always runs last.

A :class:`~lookalike.search.Searcher` is built once with its stages (:func:`build_stages`)
and runs them for every query; the state a stage needs (the DBA matrix, local features, a
verifier's model) lives in :class:`StageResources`, loaded once per index and shared by every
searcher made from it, kept current by checking the index's version, never per query.

Query expansion over the *augmented* database is what combines DBA and QE (Radenovic et al.
2018): a QE stage placed after ``dba`` would search the plain index again and lose the
augmentation, so :func:`resolve_names` folds ``["dba", "alpha-qe"]`` into the one
``dba+alpha-qe`` stage. The maths is in :mod:`lookalike.rerank.functional`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from lookalike.errors import ConfigError
from lookalike.query import QueryContext
from lookalike.ranking import Ranking
from lookalike.rerank.dba import DBAIndex, build_dba
from lookalike.rerank.dba_stage import DBA_PRESETS, DBAConf, DBARerank, DBAState, sync_dba
from lookalike.rerank.functional import alpha_qe, average_qe
from lookalike.rerank.qe import QE_PRESETS, QEConf, QueryExpansion
from lookalike.rerank.resources import StageResources

if TYPE_CHECKING:
    from lookalike.local.conf import VerifyConf

VERIFY = "verify"
ASMK = "asmk"  # lookalike.rerank.asmk_stage, imported when built (it loads faiss and cv2)
RERANK_DEPTH = 100  # first-stage results handed to the re-ranking stages


@runtime_checkable
class Stage(Protocol):
    """One re-ranking stage.

    Attributes:
        name: the stage name (a :data:`STAGES` key for the built-in ones).
        depth: candidates it reads from the ranking it is given (0: it reads what it gets);
            earlier stages and the first-stage search return at least this many.
    """

    name: str
    depth: int

    def __call__(self, query: QueryContext, ranking: Ranking, k: int) -> Ranking:
        """Re-rank one query.

        Args:
            query: the query (its upright index-space descriptor, the query itself).
            ranking: ``(k0,)`` ranking so far, best first, ``-1`` padding.
            k: results wanted, >= 0.

        Returns:
            The ``(k,)`` ranking, best first, ``-1`` / ``-inf`` padding; fields of the input
            that the stage keeps, plus its own.
        """
        ...


# Every name --rerank accepts, and what it is.
STAGES: dict[str, str] = {
    **{name: f"query expansion: {conf}" for name, conf in QE_PRESETS.items()},
    **{name: f"database-side augmentation: {conf}" for name, conf in DBA_PRESETS.items()},
    ASMK: "local-feature first stage: ASMK* over the local features, fused with the ranking",
    VERIFY: "local features + RANSAC on the top `budget`, always last",
}


def resolve_names(names: Sequence[str]) -> list[str]:
    """A ``--rerank`` list as the stages that run: validated, ``dba`` and one query
    expansion folded into ``dba+<qe>`` (where the first of the two stood), ``verify`` last.

    Raises:
        ConfigError: an unknown name (listing the valid ones), ``verify`` twice, two query
            expansions with ``dba``, or one beside ``dba+<qe>``.
    """
    names = [str(n) for n in names]
    for name in names:
        if name not in STAGES:
            raise ConfigError(f"unknown re-ranking stage {name!r}; choose from {', '.join(STAGES)}")
    if names.count(VERIFY) > 1:
        raise ConfigError("'verify' appears twice in the re-ranking stages; give it once")
    verify = VERIFY in names
    names = [n for n in names if n != VERIFY]
    qe = [n for n in names if n in QE_PRESETS]
    expanded = [n for n in names if n in DBA_PRESETS and DBA_PRESETS[n].qe is not None]
    if expanded and qe:  # a QE after it would search the plain index again
        raise ConfigError(
            f"{expanded[0]} already expands the query; drop {qe[0]}, or use dba with {qe[0]}"
        )
    if "dba" in names and qe:
        if len(qe) > 1:
            raise ConfigError(f"choose one query expansion with dba, got {', '.join(qe)}")
        first = min(names.index("dba"), names.index(qe[0]))
        names = [
            f"dba+{qe[0]}" if i == first else n
            for i, n in enumerate(names)
            if i == first or n not in ("dba", qe[0])
        ]
    return [*names, VERIFY] if verify else names


def build_stages(
    names: Sequence[str],
    resources: StageResources,
    verify: VerifyConf | dict | None = None,
) -> list[Stage]:
    """The stages for a ``--rerank`` list (see :func:`resolve_names`), their state taken
    from ``resources``; ``verify`` sets the verification (a :class:`VerifyConf`, or a dict
    of changes to the index's recorded settings)."""
    stages: list[Stage] = []
    for name in resolve_names(names):
        if name in QE_PRESETS:
            stages.append(QueryExpansion(resources.source, QE_PRESETS[name], name))
        elif name in DBA_PRESETS:
            conf = DBA_PRESETS[name]
            stages.append(DBARerank(resources.dba(conf.k, conf.alpha), conf, name))
        elif name == ASMK:
            stages.append(resources.asmk(verify))
        else:
            stages.append(resources.verifier(verify))
    return stages


def stage_depths(stages: Sequence[Stage], k: int) -> tuple[int, list[int]]:
    """``(first-stage depth, results each stage returns)`` for ``k`` final results: a stage
    returns at least what any later stage reads; the first stage fetches
    :data:`RERANK_DEPTH` when there is any stage."""
    if not stages:
        return k, []
    outs = [max([k, *(s.depth for s in stages[i + 1 :])]) for i in range(len(stages))]
    return max(k, RERANK_DEPTH, *(s.depth for s in stages)), outs


__all__ = [
    "ASMK",
    "DBA_PRESETS",
    "QE_PRESETS",
    "RERANK_DEPTH",
    "STAGES",
    "VERIFY",
    "DBAConf",
    "DBAIndex",
    "DBARerank",
    "DBAState",
    "QEConf",
    "QueryExpansion",
    "Stage",
    "StageResources",
    "alpha_qe",
    "average_qe",
    "build_dba",
    "build_stages",
    "resolve_names",
    "stage_depths",
    "sync_dba",
]
