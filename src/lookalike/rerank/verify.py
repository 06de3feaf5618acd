"""The ``verify`` re-ranking stage: local-feature matching and geometric verification.

For one query, the top ``budget`` candidates of the ranking so far are matched against the
query's local features (mutual nearest neighbours with a ratio test, one matrix product per
chunk of candidates), a homography (or fundamental matrix) is fitted to each candidate's
matches by MAGSAC++, and the candidates are re-ordered by a fusion of their similarity and
inlier count (:data:`~lookalike.local.matching.FUSIONS`); the rest keep their order below.
The ranking it returns carries the ``inliers`` field (-1 for candidates not verified).

::

    features = IndexFeatures(store, conf)          # the index's and the queries' features
    stage = GeometricVerifier(features, conf)
    ranking = stage(QueryContext(Query("q.jpg"), descriptor), ranking, k=10)

The features come from :class:`~lookalike.local.provider.IndexFeatures`: stored by
``lookalike index --local NAME``, or computed on first use and cached.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from lookalike.errors import ConfigError
from lookalike.index.manifest import Manifest
from lookalike.local.conf import VerifyConf, default_local_features, local_preset
from lookalike.local.features import DESCRIPTORS, KEYPOINTS
from lookalike.local.matching import fuse_scores, match_many, verify
from lookalike.local.provider import IndexFeatures
from lookalike.query import QueryContext
from lookalike.ranking import INLIERS, NOT_VERIFIED, Ranking

logger = logging.getLogger(__name__)

QUERY_FEATURES = "local_features"  # QueryContext.cache key of the query's features


def resolve_conf(manifest: Manifest, conf: VerifyConf | dict | None, where: str = "") -> VerifyConf:
    """The verification settings for an index: its recorded ones (or, for an index that
    keeps none, :func:`~lookalike.local.conf.default_local_features`: ALIKED when its weights
    are on disk, RootSIFT otherwise) updated by ``conf`` (a dict of changes), or ``conf``
    itself when complete.

    In a dict, ``features`` names the local features to verify with: on an index that keeps
    none, their preset (:func:`~lookalike.local.conf.local_preset`) is the base the other
    changes apply to; on an index that keeps them, its own settings are (any other name is
    refused).

    Raises:
        ConfigError: ``conf`` asks for other local features than the index stores.
    """
    recorded = manifest.local
    if isinstance(conf, VerifyConf):
        wanted = conf
    else:
        changes = dict(conf or {})
        features = changes.pop("features", None)
        if recorded is None and features is None:  # nothing downloaded unless asked for
            base = default_local_features(changes.get("weights"))
        elif recorded is None:
            base = local_preset(features)
        elif features is not None and features != recorded.features:
            base = recorded.replace(features=features)  # refused below, naming both
        else:
            base = recorded
        wanted = base.replace(**changes)
    if recorded is not None and wanted.feature_settings() != recorded.feature_settings():
        raise ConfigError(
            f"index {where} stores {recorded.features} local features "
            f"({recorded.max_keypoints} keypoints at {recorded.max_side} px); verification "
            f"must use them (asked for {wanted.features}, {wanted.max_keypoints} keypoints at "
            f"{wanted.max_side} px)"
        )
    return wanted


def query_features(query: QueryContext, features: IndexFeatures, conf: VerifyConf) -> dict | None:
    """The query's local features for ``conf``'s query detection, computed once per query
    and detection setting (the stages that match local features share them)."""
    if query.query.features is not None:  # precomputed: taken as given
        return query.query.features
    side, keypoints = conf.query_detection()
    key = (QUERY_FEATURES, side, keypoints)
    if key not in query.cache:
        query.cache[key] = features.of_query(query.query, side, keypoints)
    return query.cache[key]


class GeometricVerifier:
    """Re-rank a shortlist by geometric verification against the index's local features.

    Args:
        features: the local features of the index's images and of the queries.
        conf: matching settings (its feature half must be ``features.conf``'s).

    Attributes:
        timings: wall milliseconds of this thread's last call per step: ``features``
            (candidates computed on the fly), ``load``, ``match``, ``ransac``.
    """

    name = "verify"

    def __init__(self, features: IndexFeatures, conf: VerifyConf) -> None:
        if conf.feature_settings() != features.conf.feature_settings():
            raise ConfigError("the verifier's local features differ from the provider's")
        self.features = features
        self.conf = conf
        self.depth = conf.budget

    def __repr__(self) -> str:
        return f"GeometricVerifier({self.conf})"

    @property
    def timings(self) -> dict[str, float]:
        return self.features.timings

    def inliers(self, query: dict, ids: list[int]) -> np.ndarray:
        """``(len(ids),)`` int64 inlier counts of the query against indexed images ``ids``."""
        cands = self.features.of_ids(ids)
        t0 = time.perf_counter()
        matches = match_many(
            query[DESCRIPTORS],
            [c[DESCRIPTORS] for c in cands],
            self.conf.ratio,
            self.features.metric,
        )
        t1 = time.perf_counter()
        counts = [
            verify(
                query[KEYPOINTS],
                c[KEYPOINTS],
                m,
                self.conf.model,
                self.conf.method,
                threshold_px=self.conf.threshold_px,
            ).inliers
            for c, m in zip(cands, matches, strict=True)
        ]
        t2 = time.perf_counter()
        self.timings["match"] = 1000 * (t1 - t0)
        self.timings["ransac"] = 1000 * (t2 - t1)
        return np.asarray(counts, np.int64)

    def __call__(self, query: QueryContext, ranking: Ranking, k: int) -> Ranking:
        """Re-rank one query by verification of its top ``budget`` results (the
        :class:`lookalike.rerank.Stage` protocol).

        Returns:
            The ``(k,)`` ranking: the verified results by fused score
            (:attr:`VerifyConf.fusion`), then the others in their order with their
            similarity, and the ``inliers`` field (-1 for those). Verified results always
            rank first; with ``sim_plus_inliers`` (>= the similarity) the scores also stay
            descending across the budget boundary, with the other fusions they need not.
            A query without an image (a vector) is not verified: the ranking is kept.
        """
        local = query_features(query, self.features, self.conf)
        scores, ids = ranking.scores, ranking.ids
        if local is None:
            return ranking.with_field(INLIERS, np.full(len(ids), NOT_VERIFIED, np.int64)).fit(k)
        valid = int(np.count_nonzero(ids >= 0))
        top = min(self.conf.budget, valid)
        head = np.flatnonzero(ids >= 0)[:top]
        rest = np.setdiff1d(np.arange(len(ids)), head)
        inl = self.inliers(local, ids[head].tolist()) if top else np.zeros(0, np.int64)
        fused = fuse_scores(scores[head], inl, self.conf.fusion)
        order = np.argsort(-fused, kind="stable")
        out = Ranking(
            np.concatenate([fused[order], scores[rest]]).astype(np.float32),
            np.concatenate([ids[head][order], ids[rest]]),
            {INLIERS: np.concatenate([inl[order], np.full(len(rest), NOT_VERIFIED, np.int64)])},
        )
        return out.fit(k)
