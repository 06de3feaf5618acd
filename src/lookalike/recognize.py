"""Recognition: one label and a confidence per query, by soft-voting over its neighbours.

The labels are the index metadata (:mod:`lookalike.labels`). For a query's top-k neighbours
with similarities ``s_i`` and labels ``l_i``, each label gets the vote
``sum_{i: l_i = label} max(s_i, 0) ** p`` (:func:`soft_vote`); the label with the largest
vote is the prediction. Unlabelled neighbours vote for nothing: they are *distractors*,
known images of things that are not in the collection, and they lower the confidence of a
query that looks more like them than like any labelled image.

The confidence must rank right answers above wrong ones and above queries of nothing in
the collection (that is what GAP rewards and what ``min_confidence`` cuts on). The options
are in :data:`CONFIDENCE`; ``benchmarks/recognition.py`` measures them, and the default is
the best one there (see :data:`DEFAULT_CONFIDENCE`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.errors import ConfigError
from lookalike.index import IndexStore
from lookalike.labels import label_of
from lookalike.local.conf import VerifyConf
from lookalike.query import QueryLike
from lookalike.rerank import VERIFY
from lookalike.search import Hit, Searcher

logger = logging.getLogger(__name__)


def vote_mass(scores: np.ndarray, p: float) -> np.ndarray:
    """Each neighbour's voting weight ``max(s, 0) ** p``, ``(k,)`` float64 (non-finite -> 0)."""
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isfinite(s), np.maximum(s, 0.0), 0.0)
    return s**p


def soft_vote(
    labels: Sequence[str | None], scores: np.ndarray, p: float = 8.0
) -> list[tuple[str, float]]:
    """Soft-vote of the top-k neighbours.

    Args:
        labels: label of each neighbour, ``None`` for an unlabelled one (votes for nothing).
        scores: ``(k,)`` similarities, higher is more similar.
        p: exponent sharpening the vote towards the closest neighbours; > 0.

    Returns:
        ``[(label, sum of max(s, 0) ** p over its neighbours)]``, largest vote first (ties by
        label), one entry per label present; empty when no neighbour is labelled.
    """
    scores = np.asarray(scores)
    if scores.ndim != 1 or scores.shape[0] != len(labels):
        raise ValueError(
            f"soft_vote needs one score per label: got {len(labels)} labels and scores of "
            f"shape {scores.shape}"
        )
    _check_p(p)
    mass = vote_mass(scores, p)
    votes: dict[str, float] = {}
    for label, m in zip(labels, mass, strict=True):
        if label is not None:
            votes[label] = votes.get(label, 0.0) + float(m)
    return sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))


@dataclass(frozen=True)
class Evidence:
    """What a confidence function sees about one query (k neighbours, best first)."""

    labels: tuple[str | None, ...]  # (k,) neighbour labels, None = unlabelled (distractor)
    scores: np.ndarray  # (k,) float64 similarities
    votes: list[tuple[str, float]]  # soft_vote(labels, scores, p), non-empty
    p: float  # vote exponent
    inliers: np.ndarray | None  # (k,) verified inlier counts, or None without verification

    @property
    def label(self) -> str:
        """The predicted label (largest vote)."""
        return self.votes[0][0]

    def best(self, label: str | None) -> float:
        """The highest similarity among the neighbours with ``label``; 0 when there is none."""
        s = [float(x) for x, lb in zip(self.scores, self.labels, strict=True) if lb == label]
        finite = [x for x in s if math.isfinite(x)]
        return max(finite) if finite else 0.0


def conf_vote(ev: Evidence) -> float:
    """The winning label's vote in similarity units, ``(sum max(s, 0) ** p) ** (1 / p)``
    (0 .. k ** (1 / p)): ranks like the vote itself, and one neighbour at similarity s gives
    s, so a threshold reads like a similarity."""
    return ev.votes[0][1] ** (1.0 / ev.p)


def conf_share(ev: Evidence) -> float:
    """The winning label's share of the vote mass of all k neighbours, unlabelled included
    (0 .. 1): a query whose closest images are distractors gets little."""
    total = float(vote_mass(ev.scores, ev.p).sum())
    return ev.votes[0][1] / total if total > 0 else 0.0


def conf_margin(ev: Evidence) -> float:
    """(first vote - second vote) / vote mass of all k neighbours (0 .. 1)."""
    total = float(vote_mass(ev.scores, ev.p).sum())
    second = ev.votes[1][1] if len(ev.votes) > 1 else 0.0
    return (ev.votes[0][1] - second) / total if total > 0 else 0.0


def conf_top1(ev: Evidence) -> float:
    """The similarity of the closest neighbour with the winning label (-1 .. 1)."""
    return ev.best(ev.label)


def conf_distractor(ev: Evidence) -> float:
    """Closest winning-label similarity minus closest unlabelled similarity (-2 .. 2).

    The unlabelled neighbours are the reference of "not in the collection": when one is as
    close as the best labelled match, the query is likely of something else. Without an
    unlabelled neighbour in the top k the reference is 0.
    """
    return ev.best(ev.label) - ev.best(None)


def conf_inliers(ev: Evidence) -> float:
    """The most verified inliers among the neighbours with the winning label (0 ..)."""
    if ev.inliers is None:
        raise ConfigError(
            "confidence 'inliers' needs verification inlier counts; pass inliers (or search "
            "with the verify stage) or choose another confidence"
        )
    mine = [n for n, lb in zip(ev.inliers, ev.labels, strict=True) if lb == ev.label]
    return float(max(mine, default=0))


CONFIDENCE: dict[str, Callable[[Evidence], float]] = {
    "vote": conf_vote,
    "share": conf_share,
    "margin": conf_margin,
    "top1": conf_top1,
    "distractor": conf_distractor,
    "inliers": conf_inliers,
}
# Chosen on benchmarks/recognition.py (Oxford landmarks among Holidays distractors): every
# option reaches GAP >= 0.999 there; vote at p = 8 ranks the most correct answers above every
# wrong one, also when the queries' own images are left out, and is the most stable in k.
DEFAULT_CONFIDENCE = "vote"
DEFAULT_P = 8.0  # vote exponent
DEFAULT_K = 10  # neighbours voting


def _check_p(p: float) -> None:
    if not (isinstance(p, int | float) and math.isfinite(p) and p > 0):
        raise ConfigError(f"the vote exponent p must be a positive number, got {p!r}")


def _check_method(method: str) -> Callable[[Evidence], float]:
    if method not in CONFIDENCE:
        raise ConfigError(f"unknown confidence {method!r}; valid: {', '.join(CONFIDENCE)}")
    return CONFIDENCE[method]


def confidence(
    labels: Sequence[str | None],
    scores: np.ndarray,
    method: str = DEFAULT_CONFIDENCE,
    p: float = DEFAULT_P,
    inliers: np.ndarray | None = None,
) -> tuple[str | None, float]:
    """The predicted label of one query and its confidence.

    Args:
        labels: ``(k,)`` neighbour labels, best first; ``None`` for unlabelled images.
        scores: ``(k,)`` neighbour similarities.
        method: a key of :data:`CONFIDENCE`: ``vote`` (winning vote ** (1 / p)),
            ``share`` (its share of all k neighbours' vote mass), ``margin`` (first minus
            second vote, over that mass), ``top1`` (closest winning-label similarity),
            ``distractor`` (that minus the closest unlabelled similarity), ``inliers`` (most
            verified inliers of the winning label; needs ``inliers``).
        p: vote exponent, > 0.
        inliers: ``(k,)`` inlier counts from geometric verification, or None.

    Returns:
        ``(label, confidence)``; ``(None, 0.0)`` when no neighbour is labelled.
    """
    scores = np.asarray(scores, dtype=np.float64)
    return _judge(labels, scores, soft_vote(labels, scores, p), method, p, inliers)


def _judge(
    labels: Sequence[str | None],
    scores: np.ndarray,
    votes: list[tuple[str, float]],
    method: str,
    p: float,
    inliers: np.ndarray | None,
) -> tuple[str | None, float]:
    """:func:`confidence` given the votes already counted."""
    fn = _check_method(method)
    if inliers is not None:
        inliers = np.asarray(inliers, dtype=np.float64)
        if inliers.shape != scores.shape:
            raise ValueError(
                f"inliers must have one count per neighbour, shape {scores.shape}, "
                f"got {inliers.shape}"
            )
    if not votes:
        return None, 0.0
    ev = Evidence(tuple(labels), scores, votes, float(p), inliers)
    return ev.label, float(fn(ev))


@dataclass
class Prediction:
    """The recognition of one query."""

    label: str | None  # predicted label; None = abstained (no labelled neighbour, or
    #   confidence below min_confidence)
    confidence: float  # higher = more likely right; scale depends on the confidence method
    votes: list[tuple[str, float]]  # soft vote per label, largest first
    neighbours: list[Hit]  # the k neighbours that voted, best first

    def to_dict(self, image: str) -> dict:
        """The JSON form ``recognize --json`` prints for query ``image``."""
        return {
            "image": image,
            "label": self.label,
            "confidence": self.confidence,
            "votes": [[label, vote] for label, vote in self.votes],
            "neighbours": [h.to_dict() for h in self.neighbours],
        }


def predict(
    hits: Sequence[Hit],
    p: float = DEFAULT_P,
    confidence: str = DEFAULT_CONFIDENCE,
    min_confidence: float = -math.inf,
    inliers: np.ndarray | None = None,
) -> Prediction:
    """Recognise one query from its neighbours (labels read from their metadata).

    Args:
        hits: the query's neighbours, best first (all of them vote).
        p: vote exponent.
        confidence: a key of :data:`CONFIDENCE`.
        min_confidence: abstain (label None) below this confidence.
        inliers: ``(len(hits),)`` verified inlier counts, or None.
    """
    labels = [label_of(h.metadata) for h in hits]
    scores = np.array([h.score for h in hits], dtype=np.float64)
    votes = soft_vote(labels, scores, p)
    label, conf = _judge(labels, scores, votes, confidence, p, inliers)
    if label is not None and conf < min_confidence:
        label = None
    return Prediction(label, conf, votes, list(hits))


class Recognizer:
    """Predict labels for queries with a :class:`~lookalike.search.Searcher`.

    With a searcher whose stages include ``verify``, the neighbours are re-ranked by
    verification, vote with their fused scores (similarity + inlier bonus: a verified
    neighbour outvotes unverified ones) and their inlier counts reach the confidence
    (``"inliers"`` needs them).

    Args:
        searcher: a searcher on a labelled index, with the re-ranking stages to use.
        k: neighbours that vote.
        p: vote exponent.
        confidence: a key of :data:`CONFIDENCE`.
        min_confidence: abstain below this confidence; 0 never abstains when a labelled
            neighbour exists, except with ``distractor`` (negative when an unlabelled image
            is closer than the best match).
    """

    def __init__(
        self,
        searcher: Searcher,
        k: int = DEFAULT_K,
        p: float = DEFAULT_P,
        confidence: str = DEFAULT_CONFIDENCE,
        min_confidence: float = 0.0,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k (neighbours that vote) must be a positive integer, got {k!r}")
        _check_p(p)
        _check_method(confidence)
        if not math.isfinite(min_confidence):
            raise ConfigError(f"min_confidence must be a finite number, got {min_confidence!r}")
        self.searcher = searcher
        self.k, self.p, self.confidence = k, float(p), confidence
        self.min_confidence = float(min_confidence)
        self.verified = any(stage.name == VERIFY for stage in searcher.stages)
        if confidence == "inliers" and not self.verified:
            raise ConfigError(
                "confidence 'inliers' needs geometric verification: add verify to the "
                "re-ranking stages (--rerank verify) or choose another confidence"
            )

    def predict_hits(
        self, hits: Sequence[Sequence[Hit]], inliers: Sequence[np.ndarray] | None = None
    ) -> list[Prediction]:
        """Recognise queries from their neighbours (the first ``k`` of each list vote)."""
        out = []
        for i, row in enumerate(hits):
            row = list(row)[: self.k]
            n = None if inliers is None else np.asarray(inliers[i])[: len(row)]
            out.append(predict(row, self.p, self.confidence, self.min_confidence, n))
        return out

    def predict(
        self, queries: Sequence[QueryLike], progress: Callable[[int, int], None] | None = None
    ) -> list[Prediction]:
        """Search and recognise queries (anything :meth:`Searcher.search` takes)."""
        if len(queries) == 0:  # (not `not queries`: an (n, D) array has no truth value)
            return []
        ranking = self.searcher.search(queries, k=self.k, progress=progress)
        results = self.searcher.results(ranking)
        inliers = None
        if self.verified:  # unverified neighbours count 0 inliers
            inliers = [
                np.array([max(h.inliers or 0, 0) for h in hits], np.float64) for hits in results
            ]
        return self.predict_hits(results, inliers)


def recognize(
    index_dir: str | Path,
    queries: Sequence[QueryLike],
    *,
    k: int = DEFAULT_K,
    p: float = DEFAULT_P,
    confidence: str = DEFAULT_CONFIDENCE,
    min_confidence: float = 0.0,
    rerank: Sequence[str] = (),
    verify: VerifyConf | dict | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> list[Prediction]:
    """``lookalike recognize`` in one call: open, search, vote, close."""
    with Searcher.open(index_dir, rerank, verify, device=device) as searcher:
        recognizer = Recognizer(searcher, k, p, confidence, min_confidence)
        return recognizer.predict(queries, progress)


def has_labels(store: IndexStore) -> bool:
    """Whether some image of the index carries a label (stops at the first one)."""
    return any(label_of(r.metadata) is not None for r in store.records("ok"))
