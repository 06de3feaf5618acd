"""Search an index: by image file (optionally cropped), by indexed id, or by vector.

Returns the faiss contract ``(scores (n, k) float32, ids (n, k) int64)``, best first, ``-1``
for "no result"; :meth:`Searcher.results` joins them to paths and metadata.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.errors import ConfigError
from lookalike.extract import ExtractConf, Extractor
from lookalike.index import IndexStore
from lookalike.local.conf import VerifyConf
from lookalike.whitening import WhiteningConf

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
RERANK_DEPTH = 100  # first-stage results handed to the re-ranking stages
QUERY_SETTINGS = ("query_rotations", "rotation_penalty")  # index settings that are ExtractConf's


@dataclass(frozen=True)
class Hit:
    """One search result."""

    rank: int  # 1-based
    id: int
    path: str
    score: float  # cosine similarity in the index space (less rotation_penalty for a match
    #   found by a rotated query view); higher is more similar
    metadata: dict


def conf_from_descriptor(descriptor: dict, **overrides: object) -> ExtractConf:
    """The :class:`ExtractConf` an index was built with, plus run-time overrides."""
    d = dict(descriptor)
    if d.get("whitening") is not None:
        d["whitening"] = WhiteningConf(**d["whitening"])
    d["scales"] = tuple(d["scales"])
    return ExtractConf(**d).replace(**overrides) if overrides else ExtractConf(**d)


def fuse_max(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge the rankings of several views of one query, keeping each id's best score.

    Args:
        scores: ``(v, k')`` float32 from searching ``v`` views.
        ids: ``(v, k')`` int64, ``-1`` = no result.
        k: results to keep.

    Returns:
        ``(k,)`` scores and ids, best first, padded with ``-inf`` / ``-1``.
    """
    best: dict[int, float] = {}
    for s, i in zip(scores.ravel(), ids.ravel(), strict=True):
        if i >= 0 and s > best.get(int(i), -np.inf):
            best[int(i)] = float(s)
    order = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    out_s = np.full(k, -np.inf, np.float32)
    out_i = np.full(k, -1, np.int64)
    for j, (i, s) in enumerate(order):
        out_s[j], out_i[j] = s, i
    return out_s, out_i


class Searcher:
    """Read-only access to an index for queries.

    Args:
        index_dir: the index directory.
        runtime, device: where the query model runs (the descriptor settings come from the
            index manifest, so queries are always described like the database).
        extractor: a ready extractor with the index's settings (saves a model load).
    """

    def __init__(
        self,
        index_dir: str | Path,
        runtime: str = "auto",
        device: str = "auto",
        extractor: Extractor | None = None,
        verify: VerifyConf | dict | None = None,
    ) -> None:
        self.store = IndexStore.open(index_dir, writable=False)
        settings = self.store.settings  # query defaults recorded when the index was made
        query = {k: settings[k] for k in QUERY_SETTINGS if k in settings}
        if "query_rotations" in query:
            query["query_rotations"] = tuple(query["query_rotations"])
        self.conf = conf_from_descriptor(
            self.store.manifest["descriptor"],
            runtime=runtime,
            device=device,
            workers=0,
            **query,
        )
        if extractor is not None and extractor.conf.descriptor() != self.conf.descriptor():
            raise ConfigError(
                f"the extractor's settings differ from those index {index_dir} was built with"
            )
        self._extractor = extractor
        self._verify_conf = verify
        self._verifier = None

    def close(self) -> None:
        if self._verifier is not None:
            self._verifier.close()
        self.store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def verifier(self):  # -> lookalike.rerank.verify.GeometricVerifier
        """The ``verify`` stage: the index's local features (``index --local``) and the
        settings it recorded, updated by the ``verify`` argument; made on first use."""
        if self._verifier is None:
            from lookalike.rerank.verify import GeometricVerifier, resolve_conf

            conf = resolve_conf(self.store, self._verify_conf)
            self._verifier = GeometricVerifier(self.store, conf)
        return self._verifier

    @property
    def extractor(self) -> Extractor:
        """The query extractor, loaded on first use."""
        if self._extractor is None:
            self._extractor = Extractor(self.conf)
        return self._extractor

    def __len__(self) -> int:
        return len(self.store)

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Search raw (unwhitened) ``(n, D)`` descriptors; ``k <= 0`` means the whole index."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.store.dim:
            raise ConfigError(
                f"query vectors must have shape (n, {self.store.dim}), got {vectors.shape}"
            )
        return self.store.search(vectors, k)

    def search_ids(
        self, ids: Sequence[int], k: int = 10, rerank: Sequence[str] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        """Use indexed images as queries (each finds itself first)."""
        return self.search_ids_verified(ids, k, rerank)[:2]

    def search_ids_verified(
        self, ids: Sequence[int], k: int = 10, rerank: Sequence[str] = ()
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`search_ids` plus ``(n, k)`` inlier counts (see :meth:`search_files_verified`)."""
        ids = list(ids)
        vectors = self.store.vectors(ids)
        stages, verify = self._stages(rerank)
        k_all = len(self.store) if k <= 0 else k
        out = []
        for image_id, v in zip(ids, vectors, strict=True):
            query = (lambda i=image_id: self.verifier.features([int(i)])[0]) if verify else None
            out.append(self._rank(v[None], k_all, np.zeros((1, 1), np.float32), stages, query))
        return _stack(out, k_all)

    def search_files(
        self,
        paths: Sequence[str | Path],
        k: int = 10,
        boxes: Sequence[Box | None] | None = None,
        rotations: Sequence[int] | None = None,
        rerank: Sequence[str] = (),
    ) -> tuple[np.ndarray, np.ndarray]:
        """Describe query images (cropped to ``boxes``) and search.

        Several ``rotations`` (degrees; default: the preset's ``query_rotations``, upright
        first) search each view and keep every result's best score, the rotated views'
        scores lowered by ``rotation_penalty``. ``rerank`` names re-ranking stages applied
        to the top ``RERANK_DEPTH`` first-stage results: the descriptor-space ones
        (:data:`lookalike.rerank.RERANKERS`) in order, then ``verify`` (geometric
        verification, :attr:`verifier`) wherever it is listed.
        """
        return self.search_files_verified(paths, k, boxes, rotations, rerank)[:2]

    def search_files_verified(
        self,
        paths: Sequence[str | Path],
        k: int = 10,
        boxes: Sequence[Box | None] | None = None,
        rotations: Sequence[int] | None = None,
        rerank: Sequence[str] = (),
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`search_files` plus ``(n, k)`` int64 inlier counts of the results: -1 for
        results that were not verified (all of them when ``rerank`` has no ``verify``)."""
        boxes = list(boxes) if boxes is not None else [None] * len(paths)
        if len(boxes) != len(paths):
            raise ConfigError(f"{len(paths)} query images but {len(boxes)} boxes")
        stages, verify = self._stages(rerank)
        k_all = len(self.store) if k <= 0 else k
        rots = tuple(self.conf.query_rotations if rotations is None else rotations)
        penalty = np.array([0.0 if r % 360 == 0 else self.conf.rotation_penalty for r in rots])
        penalty = penalty.astype(np.float32)[:, None]
        out = []
        for path, box in zip(paths, boxes, strict=True):
            views = self.extractor.extract_query(path, box, rots)
            query = (lambda p=path, b=box: self.verifier.query_features(p, b)) if verify else None
            out.append(self._rank(views, k_all, penalty, stages, query))
        return _stack(out, k_all)

    def _rank(
        self,
        views: np.ndarray,
        k: int,
        penalty: np.ndarray,
        stages: list,
        local_query: Callable[[], dict] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One query's ``(k,)`` ranking and inliers from its raw ``(v, D)`` views (upright
        first); ``local_query`` gives its local features when the ranking is verified."""
        budget = self.verifier.conf.budget if local_query is not None else 0
        reranked = bool(stages) or local_query is not None
        depth = max(k, RERANK_DEPTH, budget) if reranked else k
        scores, ids = self.store.search(views, depth)
        # a rotated view must beat the upright one by a margin: upright photos are the norm
        scores -= penalty
        if len(views) > 1:
            scores, ids = fuse_max(scores, ids, depth)
        else:
            scores, ids = scores[0], ids[0]
        if stages:
            from lookalike.rerank import run_pipeline

            query = self.store.index_space(views[:1])[0]
            scores, ids = run_pipeline(stages, self.store, query, scores, ids, max(k, budget))
        inliers = np.full(len(ids), -1, np.int64)
        if local_query is not None:
            scores, ids, inliers = self.verifier(local_query(), scores, ids, k)
        return scores[:k], ids[:k], inliers[:k]

    def _stages(self, names: Sequence[str]) -> tuple[list, bool]:
        """The descriptor-space stages for ``names`` and whether ``verify`` is among them."""
        if not names:
            return [], False
        from lookalike.rerank import descriptor_pipeline
        from lookalike.rerank.verify import check_stage_names

        descriptor, verify = check_stage_names(list(names))
        return descriptor_pipeline(descriptor), verify

    def results(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """Join ``(n, k)`` search output to paths and metadata (``-1`` entries dropped)."""
        flat = sorted({int(i) for i in ids.ravel() if i >= 0})
        records = {i: r for i, r in zip(flat, self.store.get(flat), strict=True) if r is not None}
        out = []
        for s_row, i_row in zip(scores, ids, strict=True):
            hits = []
            for s, i in zip(s_row, i_row, strict=True):
                rec = records.get(int(i))
                if rec is not None:
                    hits.append(Hit(len(hits) + 1, rec.id, rec.path, float(s), rec.metadata))
            out.append(hits)
        return out


def _stack(rows: list[tuple[np.ndarray, ...]], k: int) -> tuple[np.ndarray, ...]:
    """Per-query ``(scores, ids, inliers)`` rows as ``(n, k)`` arrays (n may be 0)."""
    if not rows:
        return (
            np.zeros((0, max(k, 0)), np.float32),
            np.zeros((0, max(k, 0)), np.int64),
            np.zeros((0, max(k, 0)), np.int64),
        )
    return tuple(np.stack([r[j] for r in rows]) for j in range(3))


def hit_to_dict(hit: Hit) -> dict:
    """The JSON form of a hit: rank, id, path, score (+ metadata when present)."""
    d = dataclasses.asdict(hit)
    if not d["metadata"]:
        d.pop("metadata")
    return d
