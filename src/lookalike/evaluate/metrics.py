"""Retrieval and recognition metrics as small pure numpy functions.

A *ranking* is a 1-D integer array of database indices, best first. Negative ids are
dropped first (the faiss ``-1`` "no result" padding of :mod:`lookalike.search`). *Junk*
ids are then removed from the ranking before any metric is computed (the Oxford / Paris
protocol), so every rank below is a rank in the junk-free ranking. Positives absent from
the ranking count as missed.

A query without positives has no defined score: every per-query metric returns
``float("nan")`` for it and every ``mean_*`` skips it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Literal

import numpy as np

Interpolation = Literal["trapezoid", "step"]
INTERPOLATIONS: tuple[str, ...] = ("trapezoid", "step")


def _as_ranking(ranking: np.ndarray | Sequence[int]) -> np.ndarray:
    """Validate a ranking and return it as int64 ``(n,)`` without negative ids."""
    arr = np.asarray(ranking)
    if arr.size == 0 and arr.ndim == 1:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(
            f"a ranking must be a 1-D array of database indices, got shape {arr.shape}; "
            "pass one query's row of the search ids"
        )
    if arr.dtype.kind not in "iu":
        raise ValueError(
            f"a ranking must hold integer database indices, got dtype {arr.dtype}; "
            "pass the ids returned by search, not the scores"
        )
    arr = arr.astype(np.int64, copy=False)
    arr = arr[arr >= 0]
    if np.unique(arr).size != arr.size:
        raise ValueError("a ranking must not repeat a database index; deduplicate it first")
    return arr


def _as_ids(ids: Iterable[int], what: str) -> np.ndarray:
    """Return a set of database ids as sorted unique int64 ``(m,)``."""
    arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be a 1-D collection of integer database indices")
    return np.unique(arr.astype(np.int64))


def hit_ranks(
    ranking: np.ndarray | Sequence[int], positives: Iterable[int], junk: Iterable[int] = ()
) -> tuple[np.ndarray, int]:
    """Find where the positives fall in the junk-free ranking.

    Returns:
        The 0-based junk-free ranks of the positives found, ascending, ``(h,)`` int64, and the
        number of distinct positives (found or not). Junk takes precedence over positives.
    """
    arr = _as_ranking(ranking)
    pos = _as_ids(positives, "positives")
    bad = _as_ids(junk, "junk")
    if bad.size:
        arr = arr[~np.isin(arr, bad)]
    return np.flatnonzero(np.isin(arr, pos)).astype(np.int64), int(pos.size)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}"
        )


def _ap_from_hits(hits: np.ndarray, n_pos: int, interpolation: str) -> float:
    if n_pos == 0:
        return math.nan
    found = np.arange(1, hits.size + 1, dtype=np.float64)  # j + 1 for the j-th positive found
    precision_1 = found / (hits + 1.0)
    if interpolation == "step":
        return float(precision_1.sum() / n_pos)
    # Precision just before the j-th hit is j / i; at rank 0 it is taken to be 1.
    precision_0 = np.where(hits > 0, (found - 1.0) / np.maximum(hits, 1), 1.0)
    return float(((precision_0 + precision_1) / 2.0).sum() / n_pos)


def _precision_from_hits(hits: np.ndarray, n_pos: int, k: int) -> float:
    return math.nan if n_pos == 0 else float(np.count_nonzero(hits < k) / k)


def _recall_from_hits(hits: np.ndarray, n_pos: int, k: int) -> float:
    return math.nan if n_pos == 0 else float(bool(np.any(hits < k)))


def _ap_at_k_from_hits(hits: np.ndarray, n_pos: int, k: int) -> float:
    if n_pos == 0:
        return math.nan
    top = hits[hits < k]
    precisions = np.arange(1, top.size + 1, dtype=np.float64) / (top + 1.0)
    return float(precisions.sum() / min(n_pos, k))


def average_precision(
    ranking: np.ndarray | Sequence[int],
    positives: Iterable[int],
    junk: Iterable[int] = (),
    interpolation: Interpolation = "trapezoid",
) -> float:
    """Average precision of one ranking, in [0, 1].

    Args:
        ranking: Database indices, best first, ``(n,)``.
        positives: Database indices that are correct answers.
        junk: Database indices removed from the ranking first (neither right nor wrong).
        interpolation: ``"trapezoid"`` is the official Oxford ``compute_ap`` (Philbin et al.
            2007): with the j-th positive (0-based) at junk-free rank i (0-based),
            ``p0 = j / i`` (1 when i = 0), ``p1 = (j + 1) / (i + 1)``, and
            ``AP = sum((p0 + p1) / 2) / n_positives``. ``"step"`` is plain non-interpolated
            AP: the precision at each positive's rank, averaged over all positives.

    Returns:
        The AP; missed positives contribute 0. ``nan`` when there are no positives
        (callers skip such queries).
    """
    _check_interpolation(interpolation)
    hits, n_pos = hit_ranks(ranking, positives, junk)
    return _ap_from_hits(hits, n_pos, interpolation)


def precision_at_k(
    ranking: np.ndarray | Sequence[int], positives: Iterable[int], k: int, junk: Iterable[int] = ()
) -> float:
    """Fraction of the top ``k`` junk-free results that are positives (divided by ``k`` even
    when the ranking is shorter); ``nan`` without positives."""
    _check_k(k)
    return _precision_from_hits(*hit_ranks(ranking, positives, junk), k)


def recall_at_k(
    ranking: np.ndarray | Sequence[int], positives: Iterable[int], k: int, junk: Iterable[int] = ()
) -> float:
    """Recall@K of metric-learning papers: 1.0 when ANY positive is in the top ``k`` junk-free
    results, else 0.0 (not the fraction of positives retrieved); ``nan`` without positives."""
    _check_k(k)
    return _recall_from_hits(*hit_ranks(ranking, positives, junk), k)


def average_precision_at_k(
    ranking: np.ndarray | Sequence[int], positives: Iterable[int], k: int, junk: Iterable[int] = ()
) -> float:
    """AP@k of Google Landmarks retrieval: ``sum_{i<=k} P(i) rel(i) / min(n_positives, k)``,
    ranks 1-based in the junk-free ranking; ``nan`` without positives."""
    _check_k(k)
    return _ap_at_k_from_hits(*hit_ranks(ranking, positives, junk), k)


def _per_query(
    rankings: Sequence[np.ndarray] | np.ndarray,
    positives_list: Sequence[Iterable[int]],
    junk_list: Sequence[Iterable[int]] | None,
) -> list[tuple[np.ndarray, int]]:
    """Hit ranks of every query; ``rankings`` may be a ``(n_queries, k)`` id array."""
    if len(rankings) != len(positives_list):
        raise ValueError(
            f"got {len(rankings)} rankings but {len(positives_list)} positive sets; "
            "pass one of each per query"
        )
    if junk_list is None:
        junk_list = [()] * len(rankings)
    elif len(junk_list) != len(rankings):
        raise ValueError(f"got {len(rankings)} rankings but {len(junk_list)} junk sets")
    return [hit_ranks(r, p, j) for r, p, j in zip(rankings, positives_list, junk_list, strict=True)]


def _nanmean(values: Iterable[float]) -> float:
    """Mean over the defined values; ``nan`` when none is defined."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def mean_average_precision(
    rankings: Sequence[np.ndarray] | np.ndarray,
    positives_list: Sequence[Iterable[int]],
    junk_list: Sequence[Iterable[int]] | None = None,
    interpolation: Interpolation = "trapezoid",
) -> float:
    """mAP in [0, 1]: :func:`average_precision` averaged over the queries with positives
    (``nan`` if there are none)."""
    _check_interpolation(interpolation)
    per_query = _per_query(rankings, positives_list, junk_list)
    return _nanmean(_ap_from_hits(h, n, interpolation) for h, n in per_query)


def mean_precision_at_k(
    rankings: Sequence[np.ndarray] | np.ndarray,
    positives_list: Sequence[Iterable[int]],
    k: int,
    junk_list: Sequence[Iterable[int]] | None = None,
) -> float:
    """mP@k: :func:`precision_at_k` averaged over the queries with positives."""
    _check_k(k)
    per_query = _per_query(rankings, positives_list, junk_list)
    return _nanmean(_precision_from_hits(h, n, k) for h, n in per_query)


def mean_recall_at_k(
    rankings: Sequence[np.ndarray] | np.ndarray,
    positives_list: Sequence[Iterable[int]],
    k: int,
    junk_list: Sequence[Iterable[int]] | None = None,
) -> float:
    """R@k: :func:`recall_at_k` (any positive in the top k) averaged over the queries with
    positives."""
    _check_k(k)
    per_query = _per_query(rankings, positives_list, junk_list)
    return _nanmean(_recall_from_hits(h, n, k) for h, n in per_query)


def mean_average_precision_at_k(
    rankings: Sequence[np.ndarray] | np.ndarray,
    positives_list: Sequence[Iterable[int]],
    k: int,
    junk_list: Sequence[Iterable[int]] | None = None,
) -> float:
    """mAP@k: :func:`average_precision_at_k` averaged over the queries with positives."""
    _check_k(k)
    per_query = _per_query(rankings, positives_list, junk_list)
    return _nanmean(_ap_at_k_from_hits(h, n, k) for h, n in per_query)


def global_average_precision(
    predictions: Sequence[Hashable | None],
    confidences: Sequence[float] | np.ndarray,
    true_labels: Sequence[Hashable | None],
) -> float:
    """GAP (micro AP) of Google Landmarks recognition, in [0, 1].

    The predictions made (not ``None``) are sorted by confidence, descending (ties keep
    input order); ``GAP = sum_i P(i) rel(i) / M`` where ``P(i)`` is the precision of the
    first i predictions, ``rel(i)`` is 1 for a correct prediction and ``M`` is the number of
    queries with a true label. A prediction for a non-landmark query (true label ``None``)
    is always wrong; a query without prediction only counts in ``M``.

    Args:
        predictions: One predicted label per query, ``None`` for no prediction.
        confidences: One score per query, ``(n_queries,)``; ignored where no prediction.
        true_labels: One true label per query, ``None`` for a non-landmark query.

    Returns:
        The GAP; ``nan`` when no query has a true label.
    """
    conf = np.asarray(confidences, dtype=np.float64)
    if conf.ndim != 1 or not len(predictions) == conf.size == len(true_labels):
        raise ValueError(
            f"got {len(predictions)} predictions, {conf.size} confidences and "
            f"{len(true_labels)} true labels; pass one of each per query"
        )
    n_landmark = sum(label is not None for label in true_labels)
    if n_landmark == 0:
        return math.nan
    made = np.array([p is not None for p in predictions], dtype=bool)
    if not np.all(np.isfinite(conf[made])):
        raise ValueError("confidences of the predictions made must be finite numbers")
    idx = np.flatnonzero(made)
    order = idx[np.argsort(-conf[idx], kind="stable")]
    correct = np.array(
        [predictions[i] == true_labels[i] for i in order],
        dtype=np.float64,
    )
    precision = np.cumsum(correct) / np.arange(1, correct.size + 1)
    return float((precision * correct).sum() / n_landmark)


def evaluate_rankings(
    rankings: Sequence[np.ndarray] | np.ndarray,
    positives_list: Sequence[Iterable[int]],
    junk_list: Sequence[Iterable[int]] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """The summary table of a retrieval run.

    Returns:
        ``"mAP"`` (trapezoid), ``"mAP_step"``, and for every k ``"mP@k"``, ``"R@k"``,
        ``"mAP@k"``, all in percent rounded to 2 decimals (``nan`` if no query has
        positives), plus ``"queries"``: the number of queries with positives, which are the
        ones averaged over.
    """
    for k in ks:
        _check_k(k)
    per_query = _per_query(rankings, positives_list, junk_list)

    def pct(value: float) -> float:
        return value if math.isnan(value) else round(100.0 * value, 2)

    table: dict[str, float] = {
        "mAP": pct(_nanmean(_ap_from_hits(h, n, "trapezoid") for h, n in per_query)),
        "mAP_step": pct(_nanmean(_ap_from_hits(h, n, "step") for h, n in per_query)),
    }
    for k in ks:
        table[f"mP@{k}"] = pct(_nanmean(_precision_from_hits(h, n, k) for h, n in per_query))
        table[f"R@{k}"] = pct(_nanmean(_recall_from_hits(h, n, k) for h, n in per_query))
        table[f"mAP@{k}"] = pct(_nanmean(_ap_at_k_from_hits(h, n, k) for h, n in per_query))
    table["queries"] = sum(n > 0 for _, n in per_query)
    return table
