"""``Ranking``: the result of a search and what every re-ranking stage takes and returns.

A ranking is the faiss contract plus optional per-candidate fields: ``scores`` float32 and
``ids`` int64, best first, padded with score ``-inf`` and id ``-1``, of shape ``(k,)`` for one
query or ``(n, k)`` for a batch (:meth:`Ranking.stack`), and ``fields`` of the same shape,
such as ``inliers`` (verified inlier counts, -1 for candidates that were not verified).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

INLIERS = "inliers"  # field: (k,) int64 verified inlier counts, -1 = not verified
NOT_VERIFIED = -1


@dataclass(frozen=True, eq=False)
class Ranking:
    """Ranked candidates of one query (1-d arrays) or of a batch (2-d arrays).

    Attributes:
        scores: ``(k,)`` or ``(n, k)`` float32, higher is more similar, ``-inf`` padding.
        ids: the same shape, int64 image ids, ``-1`` padding.
        fields: per-candidate arrays of the same shape, e.g. :data:`INLIERS`.
    """

    scores: np.ndarray
    ids: np.ndarray
    fields: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.shape != self.ids.shape:
            raise ValueError(f"scores {self.scores.shape} and ids {self.ids.shape} differ")
        for name, values in self.fields.items():
            if values.shape != self.ids.shape:
                raise ValueError(f"field {name!r} has shape {values.shape}, not {self.ids.shape}")

    @classmethod
    def of(cls, scores: np.ndarray, ids: np.ndarray, **fields: np.ndarray) -> Ranking:
        """A ranking from array-likes (copied into float32 / int64)."""
        return cls(
            np.array(scores, dtype=np.float32),
            np.array(ids, dtype=np.int64),
            {name: np.asarray(v) for name, v in fields.items()},
        )

    @classmethod
    def empty(cls, k: int, batch: int | None = None) -> Ranking:
        """``k`` padding entries (or ``(batch, k)``)."""
        shape = (k,) if batch is None else (batch, k)
        return cls(np.full(shape, -np.inf, np.float32), np.full(shape, -1, np.int64))

    @classmethod
    def stack(cls, rows: Sequence[Ranking], k: int) -> Ranking:
        """One-query rankings as an ``(n, k)`` batch (each cut or padded to ``k``); a field
        missing from some rows is filled with its padding (-1)."""
        if not rows:
            return cls.empty(max(k, 0), batch=0)
        if any(r.ids.ndim != 1 for r in rows):
            raise TypeError("Ranking.stack takes one-query (1-d) rankings")
        rows = [r if len(r) == k else r.fit(k) for r in rows]
        names = sorted({name for r in rows for name in r.fields})
        fields = {
            name: np.stack([r.fields.get(name, np.full(len(r), -1, np.int64)) for r in rows])
            for name in names
        }
        return cls(np.stack([r.scores for r in rows]), np.stack([r.ids for r in rows]), fields)

    def __len__(self) -> int:
        return int(self.ids.shape[-1])

    def __getitem__(self, row: int) -> Ranking:
        """Query ``row`` of a batch."""
        if self.ids.ndim != 2:
            raise TypeError("only a batch (2-d) ranking is indexed by query")
        return Ranking(self.scores[row], self.ids[row], {n: v[row] for n, v in self.fields.items()})

    @property
    def inliers(self) -> np.ndarray | None:
        """The :data:`INLIERS` field, or None when nothing was verified."""
        return self.fields.get(INLIERS)

    def valid(self) -> np.ndarray:
        """Boolean mask of the real results (id >= 0)."""
        return self.ids >= 0

    def fit(self, k: int) -> Ranking:
        """The ranking cut or padded to exactly ``k`` entries per query (fields padded -1)."""
        k = max(int(k), 0)
        n = min(k, len(self))

        def cut(a: np.ndarray, fill: float) -> np.ndarray:
            pad = np.full((*a.shape[:-1], k - n), fill, a.dtype)
            return np.concatenate([a[..., :n], pad], axis=-1)

        return Ranking(
            cut(self.scores, -np.inf),
            cut(self.ids, -1),
            {name: cut(v, -1) for name, v in self.fields.items()},
        )

    def take(self, order: np.ndarray) -> Ranking:
        """The entries of a one-query ranking at positions ``order`` (fields follow)."""
        if self.ids.ndim != 1:
            raise TypeError("take re-orders a one-query (1-d) ranking; index the batch first")
        return Ranking(
            self.scores[order], self.ids[order], {n: v[order] for n, v in self.fields.items()}
        )

    def with_field(self, name: str, values: np.ndarray) -> Ranking:
        """The ranking with field ``name`` set (same shape as ``ids``)."""
        return Ranking(self.scores, self.ids, {**self.fields, name: np.asarray(values)})


def fuse_max(scores: np.ndarray, ids: np.ndarray, k: int) -> Ranking:
    """Merge the rankings of several views of one query, keeping each id's best score.

    Args:
        scores: ``(v, k')`` float32 from searching ``v`` views.
        ids: ``(v, k')`` int64, ``-1`` = no result.
        k: results to keep.

    Returns:
        The ``(k,)`` ranking, best first (ties by id), padded with ``-inf`` / ``-1``.
    """
    return Ranking(*best_per_id(np.ravel(scores), np.ravel(ids), k))


def best_per_id(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best ids of a flat list of candidates, each with its highest score.

    Args:
        scores: ``(m,)`` scores; ids: ``(m,)`` int64, ``-1`` entries ignored (an id may
            appear several times: views of one query, or two rankings merged).
        k: results kept.

    Returns:
        ``(k,)`` float32 scores and int64 ids, best first (ties: lower id first), padded
        with ``-inf`` / ``-1``.
    """
    s = np.asarray(scores, np.float32).reshape(-1)
    i = np.asarray(ids, np.int64).reshape(-1)
    keep = i >= 0
    s, i = s[keep], i[keep]
    order = np.lexsort((i, -s))  # best score first, so each id's first occurrence is its best
    s, i = s[order], i[order]
    _, first = np.unique(i, return_index=True)
    first = np.sort(first)[:k]
    out_s = np.full(k, -np.inf, dtype=np.float32)
    out_i = np.full(k, -1, dtype=np.int64)
    out_s[: len(first)], out_i[: len(first)] = s[first], i[first]
    return out_s, out_i
