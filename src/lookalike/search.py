"""Search an index: by image file (optionally cropped), by indexed id, or by vector.

Returns the faiss contract ``(scores (n, k) float32, ids (n, k) int64)``, best first, ``-1``
for "no result"; :meth:`Searcher.results` joins them to paths and metadata.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.errors import ConfigError
from lookalike.extract import ExtractConf, Extractor
from lookalike.index import IndexStore
from lookalike.whitening import WhiteningConf

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
RERANK_DEPTH = 100  # first-stage results handed to the re-ranking stages


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
    ) -> None:
        self.store = IndexStore.open(index_dir, writable=False)
        settings = self.store.settings  # query defaults recorded when the index was made
        if "query_rotations" in settings:
            settings["query_rotations"] = tuple(settings["query_rotations"])
        self.conf = conf_from_descriptor(
            self.store.manifest["descriptor"],
            runtime=runtime,
            device=device,
            workers=0,
            **settings,
        )
        if extractor is not None and extractor.conf.descriptor() != self.conf.descriptor():
            raise ConfigError(
                f"the extractor's settings differ from those index {index_dir} was built with"
            )
        self._extractor = extractor

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        vectors = self.store.vectors(list(ids))
        stages = self._stages(rerank)
        k_all = len(self.store) if k <= 0 else k
        out = [self._rank(v[None], k_all, np.zeros((1, 1), np.float32), stages) for v in vectors]
        if not out:
            return np.zeros((0, k_all), np.float32), np.zeros((0, k_all), np.int64)
        return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])

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
        scores lowered by ``rotation_penalty``. ``rerank`` names re-ranking stages
        (:data:`lookalike.rerank.RERANKERS`, in order) applied to the top
        ``RERANK_DEPTH`` first-stage results.
        """
        boxes = list(boxes) if boxes is not None else [None] * len(paths)
        if len(boxes) != len(paths):
            raise ConfigError(f"{len(paths)} query images but {len(boxes)} boxes")
        stages = self._stages(rerank)
        k_all = len(self.store) if k <= 0 else k
        out_s = np.full((len(paths), max(k_all, 0)), -np.inf, np.float32)
        out_i = np.full((len(paths), max(k_all, 0)), -1, np.int64)
        rots = tuple(self.conf.query_rotations if rotations is None else rotations)
        penalty = np.array([0.0 if r % 360 == 0 else self.conf.rotation_penalty for r in rots])
        penalty = penalty.astype(np.float32)[:, None]
        for row, (path, box) in enumerate(zip(paths, boxes, strict=True)):
            views = self.extractor.extract_query(path, box, rots)
            out_s[row], out_i[row] = self._rank(views, k_all, penalty, stages)
        return out_s, out_i

    def _rank(
        self, views: np.ndarray, k: int, penalty: np.ndarray, stages: list
    ) -> tuple[np.ndarray, np.ndarray]:
        """One query's ``(k,)`` ranking from its raw ``(v, D)`` views (upright first)."""
        depth = max(k, RERANK_DEPTH) if stages else k
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
            scores, ids = run_pipeline(stages, self.store, query, scores, ids, k)
        return scores[:k], ids[:k]

    def _stages(self, names: Sequence[str]) -> list:
        """The descriptor-space re-ranking stages for ``names`` (none: no re-ranking)."""
        if not names:
            return []
        from lookalike.rerank import descriptor_pipeline

        return descriptor_pipeline(list(names))

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


def hit_to_dict(hit: Hit) -> dict:
    """The JSON form of a hit: rank, id, path, score (+ metadata when present)."""
    d = dataclasses.asdict(hit)
    if not d["metadata"]:
        d.pop("metadata")
    return d
