"""Pure descriptor-space re-ranking maths: query expansion and database-side augmentation.

Descriptors are rows of L2-normalised float32 vectors in the index space (whitened, what
faiss holds); similarities are inner products. Nothing here holds state: the stages in
:mod:`lookalike.rerank.qe` and :mod:`lookalike.rerank.dba` wrap these functions.

References: Chum et al., "Total recall", ICCV 2007 (average query expansion); Arandjelovic &
Zisserman, "Three things everyone should know", CVPR 2012 (DBA); Radenovic, Tolias & Chum,
"Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018 (alpha-QE and
alpha-DBA, weights ``sim^alpha``).
"""

from __future__ import annotations

import numpy as np

from lookalike.ranking import best_per_id


def _weights(sims: np.ndarray, alpha: float) -> np.ndarray:
    """``max(sim, 0)^alpha`` (``alpha = 0``: all ones, negative similarities included)."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    sims = np.asarray(sims, dtype=np.float64)
    if alpha == 0:
        return np.ones_like(sims)
    return np.maximum(sims, 0.0) ** alpha


def _check_query(query: np.ndarray, neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    query = np.asarray(query, dtype=np.float32)
    if query.ndim != 1:
        raise ValueError(f"query must be one (d,) vector, got shape {query.shape}")
    neighbours = np.asarray(neighbours, dtype=np.float32).reshape(-1, query.shape[0])
    return query, neighbours


def alpha_qe(
    query: np.ndarray,
    neighbours: np.ndarray,
    sims: np.ndarray,
    alpha: float = 3.0,
    n: int = 3,
) -> np.ndarray:
    """Alpha query expansion: ``l2n(q + sum_i max(s_i, 0)^alpha x_i)`` over the top ``n``.

    Args:
        query: ``(d,)`` query descriptor (weight 1).
        neighbours: ``(m, d)`` descriptors of the first-stage results, best first.
        sims: ``(m,)`` their similarities to the query; ``-inf`` / NaN rows (the faiss
            padding of missing results) are ignored.
        alpha: weight exponent; 0 is average query expansion.
        n: neighbours used (the first ``n`` valid ones); 0 returns the query unchanged.

    Returns:
        ``(d,)`` float32 expanded query, L2-normalised.
    """
    query, neighbours = _check_query(query, neighbours)
    sims = np.asarray(sims, dtype=np.float64).reshape(-1)
    if len(sims) != len(neighbours):
        raise ValueError(f"{len(neighbours)} neighbours but {len(sims)} similarities")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    valid = np.flatnonzero(np.isfinite(sims))[:n]
    w = _weights(sims[valid], alpha)
    total = query.astype(np.float64) + w @ neighbours[valid].astype(np.float64)
    return _l2n_or(total, query)


def average_qe(query: np.ndarray, neighbours: np.ndarray, n: int = 3) -> np.ndarray:
    """Average query expansion: ``l2n(q + sum of the top n neighbours)``, ``(d,)`` float32.

    ``neighbours`` is ``(m, d)``, best first; fewer than ``n`` rows use them all.
    """
    query, neighbours = _check_query(query, neighbours)
    return alpha_qe(query, neighbours, np.ones(len(neighbours)), alpha=0.0, n=n)


def _l2n_or(total: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """``l2n(total)`` as float32, or ``fallback`` where ``total`` is (numerically) zero."""
    norm = np.linalg.norm(total, axis=-1, keepdims=True)
    out = np.where(norm > 1e-12, total / np.maximum(norm, 1e-12), fallback)
    return out.astype(np.float32)


def dba(
    vectors: np.ndarray,
    neighbour_ids: np.ndarray,
    neighbour_sims: np.ndarray,
    alpha: float = 0.0,
) -> np.ndarray:
    """Database-side augmentation: each vector becomes the weighted mean of its neighbours.

    ``out_i = l2n(sum_j max(s_ij, 0)^alpha x_{n_ij})`` over row ``i`` of the neighbour lists,
    which the caller builds with the image itself first (similarity 1), so ``k = 1`` keeps
    every vector unchanged. A row whose weights all vanish keeps its first neighbour's vector
    (the image itself).

    Args:
        vectors: ``(N, d)`` descriptors.
        neighbour_ids: ``(M, k)`` int rows of ``vectors`` (``-1``: padding, ignored); row
            ``i`` is the neighbour list of the output row ``i``.
        neighbour_sims: ``(M, k)`` the matching similarities.
        alpha: weight exponent; 0 is average DBA.

    Returns:
        ``(M, d)`` float32, L2-normalised (``M == N`` when every vector is augmented).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    ids = np.asarray(neighbour_ids, dtype=np.int64)
    sims = np.asarray(neighbour_sims, dtype=np.float64)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be (N, d), got shape {vectors.shape}")
    if ids.ndim != 2 or ids.shape != sims.shape:
        raise ValueError(
            f"neighbour ids and sims must both be (M, k), got {ids.shape} and {sims.shape}"
        )
    if ids.size and ids.max() >= len(vectors):
        raise ValueError(f"neighbour id {int(ids.max())} is out of range for {len(vectors)}")
    valid = ids >= 0
    w = np.where(valid, _weights(np.where(valid, sims, 0.0), alpha), 0.0)
    total = np.zeros((len(ids), vectors.shape[1]), dtype=np.float64)
    for col in range(ids.shape[1]):  # k is small: k vectorised passes over M rows
        rows = np.flatnonzero(valid[:, col])
        total[rows] += w[rows, col, None] * vectors[ids[rows, col]]
    fallback = np.zeros_like(total)
    if ids.shape[1]:
        first = np.flatnonzero(valid[:, 0])
        fallback[first] = vectors[ids[first, 0]]
    return _l2n_or(total, fallback)


def knn_lists(
    base: np.ndarray, rows: np.ndarray, k: int, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Exact neighbour lists of ``base[rows]``: the row itself, then its ``k - 1`` nearest.

    Args:
        base: ``(N, d)`` index-space vectors.
        rows: ``(m,)`` rows of ``base``.
        k: list length, the row itself included.
        chunk: rows per block of similarities (``chunk x N`` float32 in memory).

    Returns:
        ``(positions, sims)``, ``(m, k)`` int64 rows of ``base`` (``-1`` padding when
        ``N < k``) and float32 similarities (``-inf`` padding; 1 for the row itself). Ties
        go to the lower row.
    """
    rows = np.asarray(rows, dtype=np.int64)
    n, m = len(base), len(rows)
    pos = np.full((m, k), -1, dtype=np.int64)
    sims = np.full((m, k), -np.inf, dtype=np.float32)
    pos[:, 0], sims[:, 0] = rows, 1.0
    others = min(k - 1, n - 1)
    if others <= 0 or m == 0:
        return pos, sims
    for begin in range(0, m, chunk):
        block = rows[begin : begin + chunk]
        s = base[block] @ base.T  # (c, N)
        s[np.arange(len(block)), block] = -np.inf  # the row itself is already first
        top = np.argpartition(-s, others - 1, axis=1)[:, :others] if others < n - 1 else None
        if top is None:
            top = np.broadcast_to(np.arange(n), (len(block), n))
        top_s = np.take_along_axis(s, top, axis=1)
        order = np.lexsort((top, -top_s), axis=1)[:, :others]  # by sim desc, then row asc
        pos[begin : begin + len(block), 1 : 1 + others] = np.take_along_axis(top, order, axis=1)
        sims[begin : begin + len(block), 1 : 1 + others] = np.take_along_axis(top_s, order, 1)
    return pos, sims


def max_fuse(
    scores: np.ndarray, ids: np.ndarray, first_scores: np.ndarray, first_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge a re-ranked list with the first-stage one, keeping each id's higher score.

    Args:
        scores, ids: ``(m,)`` re-ranked results (``-1`` padding).
        first_scores, first_ids: ``(m0,)`` first-stage results (``-1`` padding).
        k: results kept.

    Returns:
        ``(k,)`` float32 scores and int64 ids, best first (ties: lower id first), padded
        with ``-inf`` / ``-1``.
    """
    s = np.concatenate([np.asarray(scores, np.float32), np.asarray(first_scores, np.float32)])
    i = np.concatenate([np.asarray(ids, np.int64), np.asarray(first_ids, np.int64)])
    return best_per_id(s, i, k)
