"""Metrics for a labelled collection queried against itself, memory-safe at any size.

Every image is a query; the others are the database; an image's positives are the other
images of its class. The neighbours come from faiss in chunks of queries (``chunk x k``
ids in memory, never an ``N x N`` matrix: PML's ``AccuracyCalculator`` users report N x N
matrices failing at 120k points), with ``k`` the largest class size, which mAP@R and
R-precision need.

* ``Recall@K``: the fraction of queries with a positive among their first K results (the
  metric-learning definition, as in PML);
* ``R-precision``: the fraction of positives among the first R results, R = the query's
  positives;
* ``mAP@R`` (Musgrave et al., "A Metric Learning Reality Check", 2020): ``1/R sum_{i<=R}
  P(i) rel(i)``;
* ``NMI``: normalised mutual information between the labels and a k-means clustering of the
  embeddings into as many clusters as classes (faiss k-means, scikit-learn's NMI);
* the worst classes: lowest Recall@1, with the class their misses go to most.

Queries of a class with one image have no positives: they are left out of every mean.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.errors import ConfigError
from lookalike.evaluate.metrics import (
    _ap_at_k_from_hits,
    _precision_from_hits,
    _recall_from_hits,
)


@dataclass
class ClassResult:
    """One class: its Recall@1 and where its misses went."""

    label: Hashable
    images: int
    recall_at_1: float
    confused_with: Hashable | None  # the label its wrong first results have most often


@dataclass
class LabelledReport:
    """What :func:`labelled_metrics` measured."""

    queries: int  # queries with at least one positive
    recall_at: dict[int, float]
    r_precision: float
    map_at_r: float
    nmi: float | None
    worst: list[ClassResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "recall_at": {str(k): v for k, v in self.recall_at.items()},
            "r_precision": self.r_precision,
            "map_at_r": self.map_at_r,
            "nmi": self.nmi,
            "worst": [vars(c) for c in self.worst],
        }


def labelled_metrics(
    embeddings: np.ndarray,
    labels: Sequence[Hashable],
    ks: Sequence[int] = (1, 5, 10),
    *,
    nmi: bool = True,
    worst: int = 10,
    chunk: int = 2048,
    seed: int = 0,
) -> LabelledReport:
    """Recall@K, R-precision, mAP@R, NMI and the worst classes of ``embeddings``.

    Args:
        embeddings: ``(N, D)`` float32 descriptors (cosine similarity: L2-normalised).
        labels: ``N`` class labels.
        ks: the K of Recall@K.
        nmi: compute NMI (a k-means over the embeddings).
        worst: how many of the worst classes to report.
        chunk: queries searched at a time (memory: ``chunk x largest class`` ids).
        seed: the k-means seed.

    Raises:
        ConfigError: shapes that do not match, fewer than 2 images, or a K below 1.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(labels) or len(x) < 2:
        raise ConfigError(
            f"need (N, D) embeddings with N >= 2 and N labels, got {x.shape} and {len(labels)}"
        )
    if not ks or min(ks) < 1:
        raise ConfigError(f"Recall@K needs K >= 1, got {list(ks)}")
    names, codes = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    first = {}
    for label in labels:
        first.setdefault(str(label), label)
    sizes = np.bincount(codes)
    n = len(x)
    k = min(n - 1, max(int(sizes.max()) - 1, max(ks)))
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    hits_at = {kk: 0 for kk in ks}
    r_prec, ap_r, counted = 0.0, 0.0, 0
    per_class: dict[int, list[bool]] = {}
    missed_to: dict[int, Counter] = {}
    for begin in range(0, n, chunk):
        rows = np.arange(begin, min(n, begin + chunk))
        _, found = index.search(x[rows], k + 1)
        for row, ids in zip(rows, found, strict=True):
            ids = ids[ids != row][:k]  # the query itself, wherever ties put it
            mine = codes[row]
            positives = int(sizes[mine]) - 1
            if positives == 0:
                continue
            rel = codes[ids] == mine
            hits = np.flatnonzero(rel)  # the positives' ranks, as the metrics module takes them
            counted += 1
            for kk in ks:
                hits_at[kk] += _recall_from_hits(hits, positives, kk)
            r_prec += _precision_from_hits(hits, positives, positives)  # R-precision
            ap_r += _ap_at_k_from_hits(hits, positives, positives)  # AP at R
            per_class.setdefault(mine, []).append(bool(rel[0]))
            if not rel[0]:
                missed_to.setdefault(mine, Counter())[int(codes[ids[0]])] += 1
    if counted == 0:
        raise ConfigError("no class has two images: nothing to retrieve")
    classes = [
        ClassResult(
            first[names[c]],
            int(sizes[c]),
            float(np.mean(hits)),
            first[names[missed_to[c].most_common(1)[0][0]]] if c in missed_to else None,
        )
        for c, hits in per_class.items()
    ]
    classes.sort(key=lambda r: (r.recall_at_1, str(r.label)))
    return LabelledReport(
        queries=counted,
        recall_at={kk: hits_at[kk] / counted for kk in ks},
        r_precision=r_prec / counted,
        map_at_r=ap_r / counted,
        nmi=_nmi(x, codes, len(names), seed) if nmi else None,
        worst=classes[:worst],
    )


def _nmi(x: np.ndarray, codes: np.ndarray, clusters: int, seed: int) -> float:
    """NMI between ``codes`` and a faiss k-means of ``x`` into ``clusters`` clusters."""
    import faiss
    from sklearn.metrics import normalized_mutual_info_score

    if clusters < 2:
        return 1.0
    # a few images per class is normal here: faiss's warning below 39 per centroid is noise
    kmeans = faiss.Kmeans(
        x.shape[1], clusters, niter=25, seed=seed, spherical=True, min_points_per_centroid=1
    )
    kmeans.train(x)
    _, assigned = kmeans.index.search(x, 1)
    return float(normalized_mutual_info_score(codes, assigned[:, 0]))


@dataclass
class GalleryReport:
    """Query images searched against a labelled index (:func:`gallery_metrics`)."""

    queries: int  # queries scored (of a label the index holds)
    p_at_1: float  # the first result has the query's label
    map: float  # AP over the whole ranking, positives = the index's images of that label
    map_at_r: float
    recall_at: dict[int, float]  # a positive among the first K
    accuracy: float  # recognition: the soft vote of the first ``vote_k`` gives the label
    unknown: int  # queries whose label the index does not hold (left out)
    failed: list[dict] = field(default_factory=list)  # {"query", "error"}: unreadable images

    def to_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "p_at_1": self.p_at_1,
            "map": self.map,
            "map_at_r": self.map_at_r,
            "recall_at": {str(k): v for k, v in self.recall_at.items()},
            "accuracy": self.accuracy,
            "unknown": self.unknown,
            "failed": self.failed,
        }


def gallery_metrics(
    searcher: Any,
    queries: Sequence[Any],
    labels: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
    *,
    vote_k: int = 10,
    batch: int = 16,
    progress: Any = None,
) -> GalleryReport:
    """Retrieval and recognition of labelled query images against a labelled index.

    Each query ranks the whole index (one row of ``N`` at a time, never a matrix of all
    queries), so mAP counts every positive; a query whose image cannot be read is reported
    in ``failed`` and left out. A query that is a file of the index does not find itself:
    its own file is dropped from its results (held-out images of an indexed folder).

    Args:
        searcher: a :class:`~lookalike.search.Searcher` on an index whose images have labels.
        queries: what :meth:`Searcher.search` takes (image paths...).
        labels: the queries' true labels.
        ks: the K of Recall@K.
        vote_k: neighbours that vote for recognition (the Recognizer's default).
        batch: queries searched at a time.
        progress: called with (queries done, queries).
    """
    from lookalike.labels import label_of
    from lookalike.recognize import predict

    if len(queries) != len(labels) or not queries:
        raise ConfigError(f"need queries and as many labels, got {len(queries)}, {len(labels)}")
    p1 = ap = ap_r = 0.0
    recall = dict.fromkeys(ks, 0.0)
    correct = scored = unknown = 0
    failed = []
    for begin in range(0, len(queries), batch):
        chunk = list(queries[begin : begin + batch])
        answers = searcher.answer(chunk, k=0, errors="report")
        for query, answer, truth in zip(chunk, answers, labels[begin : begin + batch], strict=True):
            if answer.error is not None:
                failed.append({"query": answer.query, "error": str(answer.error)})
                continue
            own = str(Path(query).expanduser().resolve()) if isinstance(query, str | Path) else None
            hits_of = [h for h in answer.hits if h.path != own]
            found = [label_of(h.metadata) for h in hits_of]
            rel = np.array([f == truth for f in found], bool)
            positives = int(rel.sum())
            if positives == 0:
                unknown += 1
                continue
            hits = np.flatnonzero(rel)
            scored += 1
            p1 += float(rel[0])
            ap += _ap_at_k_from_hits(hits, positives, len(rel))
            ap_r += _ap_at_k_from_hits(hits, positives, positives)
            for kk in ks:
                recall[kk] += float(hits[0] < kk)
            correct += predict(hits_of[:vote_k]).label == truth
        if progress is not None:
            progress(min(len(queries), begin + batch), len(queries))
    n = max(1, scored)
    return GalleryReport(
        queries=scored,
        p_at_1=p1 / n,
        map=ap / n,
        map_at_r=ap_r / n,
        recall_at={kk: v / n for kk, v in recall.items()},
        accuracy=correct / n,
        unknown=unknown,
        failed=failed,
    )


__all__ = [
    "ClassResult",
    "GalleryReport",
    "LabelledReport",
    "gallery_metrics",
    "labelled_metrics",
]
