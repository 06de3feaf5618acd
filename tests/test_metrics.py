"""Metrics against hand-computed values and a plain transcription of the Oxford compute_ap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lookalike.evaluate.metrics import (
    average_precision,
    average_precision_at_k,
    evaluate_rankings,
    global_average_precision,
    mean_average_precision,
    mean_average_precision_at_k,
    mean_precision_at_k,
    mean_recall_at_k,
    precision_at_k,
    recall_at_k,
)

# Database ids 10..14 ranked in order; positives 10 and 12 sit at 1-based ranks 1 and 3.
RANKING = np.array([10, 11, 12, 13, 14], dtype=np.int64)
POSITIVES = (10, 12)


def oxford_compute_ap(pos: set[int], amb: set[int], ranked: list[int]) -> float:
    """The official compute_ap.cpp (Philbin et al.), transcribed line by line."""
    old_recall, old_precision, ap = 0.0, 1.0, 0.0
    intersect_size, j = 0, 0
    for i in range(len(ranked)):
        if ranked[i] in amb:
            continue
        if ranked[i] in pos:
            intersect_size += 1
        recall = intersect_size / len(pos)
        precision = intersect_size / (j + 1.0)
        ap += (recall - old_recall) * ((old_precision + precision) / 2.0)
        old_recall, old_precision = recall, precision
        j += 1
    return ap


def step_ap_loop(pos: set[int], ranked: list[int]) -> float:
    """Non-interpolated AP by brute force: precision at each positive's rank, over |pos|."""
    total, found = 0.0, 0
    for rank, item in enumerate(ranked, start=1):
        if item in pos:
            found += 1
            total += found / rank
    return total / len(pos)


def test_step_ap_by_hand() -> None:
    # positives at ranks 1 and 3 of 5 -> (1/1 + 2/3) / 2 = 0.8333
    assert average_precision(RANKING, POSITIVES, interpolation="step") == pytest.approx(5 / 6)


def test_trapezoid_ap_by_hand() -> None:
    # hit j=0 at i=0: p0 = 1, p1 = 1/1 -> 1
    # hit j=1 at i=2: p0 = 1/2, p1 = 2/3 -> (1/2 + 2/3) / 2 = 7/12
    # AP = (1 + 7/12) / 2 = 19/24 = 0.7917
    assert average_precision(RANKING, POSITIVES) == pytest.approx(19 / 24)


def test_junk_is_removed_before_ap() -> None:
    # junk 11 removed -> [10, 12, 13, 14]: hits at i=0 and i=1
    # trapezoid: 1 and (1/1 + 2/2) / 2 = 1 -> AP = 1; step: (1/1 + 2/2) / 2 = 1
    assert average_precision(RANKING, POSITIVES, junk=(11,)) == pytest.approx(1.0)
    assert average_precision(RANKING, POSITIVES, junk=(11,), interpolation="step") == 1.0
    assert average_precision(RANKING, POSITIVES) < 1.0


def test_positive_missing_from_ranking() -> None:
    # 99 is never retrieved: step = (1 + 2/3) / 3 = 0.5556; trapezoid = (1 + 7/12) / 3 = 0.5278
    pos = (10, 12, 99)
    assert average_precision(RANKING, pos, interpolation="step") == pytest.approx(5 / 9)
    assert average_precision(RANKING, pos) == pytest.approx(19 / 36)


@pytest.mark.parametrize("seed", range(20))
def test_trapezoid_matches_official_compute_ap(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    ranking = rng.permutation(n + 10)[:n]  # some positives / junk may be missing
    labels = rng.integers(0, 3, size=n + 10)  # 0 negative, 1 positive, 2 junk
    pos = set(np.flatnonzero(labels == 1).tolist()) or {int(ranking[-1])}
    amb = set(np.flatnonzero(labels == 2).tolist()) - pos
    got = average_precision(ranking, pos, junk=amb)
    assert got == pytest.approx(oxford_compute_ap(pos, amb, ranking.tolist()), abs=1e-12)
    kept = [int(i) for i in ranking if i not in amb]
    step = average_precision(ranking, pos, junk=amb, interpolation="step")
    assert step == pytest.approx(step_ap_loop(pos, kept), abs=1e-12)


def test_ap_edge_cases() -> None:
    assert average_precision(np.array([], dtype=np.int64), (1,)) == 0.0
    assert average_precision([], (1,)) == 0.0
    assert math.isnan(average_precision(RANKING, ()))
    assert average_precision(np.array([3]), (3,)) == 1.0
    assert average_precision(np.array([4]), (3,)) == 0.0
    # faiss pads missing results with -1: dropped, not an error
    assert average_precision(np.array([10, 11, 12, -1, -1]), POSITIVES) == pytest.approx(19 / 24)


@pytest.mark.parametrize(
    "bad",
    [
        np.array([1.0, 2.0]),  # scores, not ids
        np.array([True, False]),
        np.array([[1, 2], [3, 4]]),
        np.array(3),
        np.array([1, 2, 1]),  # repeated id
    ],
)
def test_bad_ranking_raises(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="ranking"):
        average_precision(bad, (1,))
    with pytest.raises(ValueError, match="ranking"):
        precision_at_k(bad, (1,), 1)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        average_precision(RANKING, POSITIVES, interpolation="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positives"):
        average_precision(RANKING, (1.5,))  # type: ignore[arg-type]
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must"):
            precision_at_k(RANKING, POSITIVES, k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rankings"):
        mean_average_precision([RANKING], [POSITIVES, POSITIVES])
    with pytest.raises(ValueError, match="junk"):
        mean_average_precision([RANKING], [POSITIVES], junk_list=[(), ()])


def test_precision_at_k_by_hand() -> None:
    # top 1 = [10] -> 1/1; top 3 = [10, 11, 12] -> 2/3; top 5 -> 2/5; k=10 > n -> 2/10
    assert precision_at_k(RANKING, POSITIVES, 1) == 1.0
    assert precision_at_k(RANKING, POSITIVES, 3) == pytest.approx(2 / 3)
    assert precision_at_k(RANKING, POSITIVES, 5) == pytest.approx(2 / 5)
    assert precision_at_k(RANKING, POSITIVES, 10) == pytest.approx(2 / 10)
    # junk 11 removed -> top 2 = [10, 12] -> 2/2
    assert precision_at_k(RANKING, POSITIVES, 2, junk=(11,)) == 1.0
    assert math.isnan(precision_at_k(RANKING, (), 2))


def test_recall_at_k_is_any_hit() -> None:
    # only positive 12 at rank 3: R@1 = 0, R@2 = 0, R@3 = 1 (any hit, not a fraction)
    assert recall_at_k(RANKING, (12,), 1) == 0.0
    assert recall_at_k(RANKING, (12,), 2) == 0.0
    assert recall_at_k(RANKING, (12,), 3) == 1.0
    assert recall_at_k(RANKING, (12, 99), 3) == 1.0  # half the positives, still 1
    assert recall_at_k(RANKING, (12,), 2, junk=(10,)) == 1.0  # [11, 12, ...]
    assert math.isnan(recall_at_k(RANKING, (), 2))


def test_average_precision_at_k_by_hand() -> None:
    # positives {10, 12, 99}; k=2: P(1)*1 + P(2)*0 = 1, / min(3, 2) = 0.5
    pos = (10, 12, 99)
    assert average_precision_at_k(RANKING, pos, 2) == pytest.approx(0.5)
    # k=5: (1/1 + 2/3) / min(3, 5) = 5/9
    assert average_precision_at_k(RANKING, pos, 5) == pytest.approx(5 / 9)
    # k=1, one positive 12 at rank 3: nothing in the top 1 -> 0
    assert average_precision_at_k(RANKING, (12,), 1) == 0.0
    # k=3, positives {10, 12}: (1/1 + 2/3) / min(2, 3) = 5/6
    assert average_precision_at_k(RANKING, POSITIVES, 3) == pytest.approx(5 / 6)
    assert math.isnan(average_precision_at_k(RANKING, (), 3))


def test_means_skip_queries_without_positives() -> None:
    rankings = [RANKING, RANKING, np.array([12, 10], dtype=np.int64)]
    positives = [POSITIVES, (), (10,)]
    # query 0: trapezoid 19/24; query 1 skipped; query 2: 10 at i=1: (0/1 + 1/2) / 2 = 1/4
    assert mean_average_precision(rankings, positives) == pytest.approx((19 / 24 + 1 / 4) / 2)
    # step: query 0: 5/6, query 2: 1/2
    got = mean_average_precision(rankings, positives, interpolation="step")
    assert got == pytest.approx((5 / 6 + 1 / 2) / 2)
    # P@1: 1 and 0; R@1: 1 and 0; AP@2: query 0 1/2 (P(1) / min(2, 2)), query 2 (1/2) / 1
    assert mean_precision_at_k(rankings, positives, 1) == pytest.approx(0.5)
    assert mean_recall_at_k(rankings, positives, 1) == pytest.approx(0.5)
    assert mean_average_precision_at_k(rankings, positives, 2) == pytest.approx((0.5 + 0.5) / 2)
    assert math.isnan(mean_average_precision([RANKING], [()]))
    assert math.isnan(mean_average_precision([], []))


def test_means_accept_a_search_id_matrix() -> None:
    ids = np.array([[10, 11, 12], [12, 10, -1]], dtype=np.int64)
    assert mean_precision_at_k(ids, [POSITIVES, (10,)], 2) == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_evaluate_rankings_table() -> None:
    rankings = [RANKING, np.array([12, 10], dtype=np.int64), RANKING]
    table = evaluate_rankings(rankings, [POSITIVES, (10,), ()], [(11,), (), ()], ks=(1, 2))
    # query 0 with junk 11 is perfect (AP 1); query 1: trapezoid 1/4, step 1/2
    assert table == {
        "mAP": 62.5,  # (1 + 1/4) / 2
        "mAP_step": 75.0,  # (1 + 1/2) / 2
        "mP@1": 50.0,
        "R@1": 50.0,
        "mAP@1": 50.0,
        "mP@2": 75.0,  # (2/2 + 1/2) / 2
        "R@2": 100.0,
        "mAP@2": 75.0,  # (1 + (1/2) / min(1, 2)) / 2
        "queries": 2,
    }
    # hits at ranks 1, 3, 5: (1/1 + 2/3 + 3/5) / 3 = 34/45 = 75.5556% -> 75.56
    assert evaluate_rankings([RANKING], [(10, 12, 14)], ks=())["mAP_step"] == 75.56


def test_gap_by_hand() -> None:
    predictions = ["a", "b", None, "d", "f"]
    confidences = [0.75, 0.8, float("nan"), 0.7, 0.95]
    true_labels = ["a", None, "c", "e", "f"]  # query 1 is a non-landmark
    # sorted by confidence: f (right), b (wrong: non-landmark), a (right), d (wrong)
    # P(1) = 1/1, P(3) = 2/3; M = 4 queries with a true label -> GAP = (1 + 2/3) / 4 = 5/12
    got = global_average_precision(predictions, confidences, true_labels)
    assert got == pytest.approx(5 / 12)


def test_gap_edge_cases() -> None:
    assert global_average_precision(["a"], [0.3], ["a"]) == 1.0
    assert global_average_precision([None], [0.3], ["a"]) == 0.0
    assert math.isnan(global_average_precision([], [], []))
    assert math.isnan(global_average_precision(["a"], [0.9], [None]))
    with pytest.raises(ValueError, match="one of each"):
        global_average_precision(["a", "b"], [0.1], ["a", "b"])
    with pytest.raises(ValueError, match="finite"):
        global_average_precision(["a"], [float("nan")], ["a"])
