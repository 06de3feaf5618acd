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
    kmeans = faiss.Kmeans(x.shape[1], clusters, niter=25, seed=seed, spherical=True)
    kmeans.train(x)
    _, assigned = kmeans.index.search(x, 1)
    return float(normalized_mutual_info_score(codes, assigned[:, 0]))


__all__ = ["ClassResult", "LabelledReport", "labelled_metrics"]
