"""``Ranking`` (the faiss contract plus per-candidate fields) and ``fuse_max`` (rotation
views of one query merged), against plain-Python references."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.ranking import INLIERS, NOT_VERIFIED, Ranking, fuse_max


def one(scores: list[float], ids: list[int], **fields: list[int]) -> Ranking:
    return Ranking.of(scores, ids, **{n: np.array(v, np.int64) for n, v in fields.items()})


# -- Ranking --------------------------------------------------------------------------------


def test_of_copies_into_the_contract_dtypes() -> None:
    raw_s, raw_i = [0.9, 0.5], [3, 1]
    r = Ranking.of(raw_s, raw_i)
    assert r.scores.dtype == np.float32 and r.ids.dtype == np.int64
    assert r.scores.tolist() == pytest.approx(raw_s) and r.ids.tolist() == raw_i
    assert len(r) == 2 and r.inliers is None and r.valid().tolist() == [True, True]
    src = np.array([0.1, 0.2], np.float32)
    copy = Ranking.of(src, [1, 2])
    src[0] = 5.0
    assert copy.scores[0] == pytest.approx(0.1)  # a copy, not a view


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="differ"):
        Ranking(np.zeros(3, np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="inliers"):
        Ranking(np.zeros(3, np.float32), np.zeros(3, np.int64), {INLIERS: np.zeros(2)})
    with pytest.raises(ValueError, match="inliers"):
        one([0.5, 0.4], [1, 2]).with_field(INLIERS, np.zeros(3, np.int64))


def test_empty_single_and_batch() -> None:
    r = Ranking.empty(3)
    assert r.ids.tolist() == [-1, -1, -1] and np.isneginf(r.scores).all()
    assert r.valid().tolist() == [False] * 3
    b = Ranking.empty(2, batch=4)
    assert b.ids.shape == b.scores.shape == (4, 2) and len(b) == 2
    assert Ranking.empty(0).ids.shape == (0,)


def test_fit_cuts_and_pads_fields_too() -> None:
    r = one([0.9, 0.8, 0.7], [5, 2, 9], inliers=[12, -1, 3])
    cut = r.fit(2)
    assert cut.ids.tolist() == [5, 2] and cut.inliers.tolist() == [12, -1]
    padded = r.fit(5)
    assert padded.ids.tolist() == [5, 2, 9, -1, -1]
    assert padded.scores[:3].tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert np.isneginf(padded.scores[3:]).all()
    assert padded.inliers.tolist() == [12, -1, 3, -1, -1]
    assert padded.scores.dtype == np.float32 and padded.inliers.dtype == np.int64
    assert r.fit(0).ids.shape == (0,) and r.fit(-3).ids.shape == (0,)
    # a batch is fitted per query
    batch = Ranking.stack([r, r], 3).fit(4)
    assert batch.ids.shape == (2, 4) and batch.ids[1].tolist() == [5, 2, 9, -1]
    assert batch.inliers[0].tolist() == [12, -1, 3, -1]


def test_take_reorders_with_fields() -> None:
    r = one([0.9, 0.8, 0.7], [5, 2, 9], inliers=[1, 2, 3])
    t = r.take(np.array([2, 0]))
    assert t.ids.tolist() == [9, 5] and t.inliers.tolist() == [3, 1]
    assert t.scores.tolist() == pytest.approx([0.7, 0.9])
    with pytest.raises(TypeError, match="one-query"):
        Ranking.stack([r], 3).take(np.array([0]))


def test_with_field_keeps_the_others() -> None:
    r = one([0.9, 0.8], [5, 2], other=[7, 7]).with_field(INLIERS, np.array([4, NOT_VERIFIED]))
    assert set(r.fields) == {"other", INLIERS} and r.inliers.tolist() == [4, -1]


def test_stack_fills_missing_fields_and_fits_rows() -> None:
    a = one([0.9, 0.8], [5, 2], inliers=[10, -1])
    b = one([0.7], [4])  # shorter, no inliers
    batch = Ranking.stack([a, b], 2)
    assert batch.ids.tolist() == [[5, 2], [4, -1]]
    assert batch.inliers.tolist() == [[10, -1], [-1, -1]]
    assert batch[1].ids.tolist() == [4, -1] and batch[0].inliers.tolist() == [10, -1]
    empty = Ranking.stack([], 3)
    assert empty.ids.shape == empty.scores.shape == (0, 3)
    with pytest.raises(TypeError, match="one-query"):
        Ranking.stack([batch], 2)
    with pytest.raises(TypeError, match="batch"):
        a[0]


def test_rankings_are_not_compared_elementwise() -> None:
    a = one([0.9], [1])
    assert a == a and a != one([0.9], [1])  # identity: comparing arrays has no one answer


# -- fuse_max (was in lookalike.search) -------------------------------------------------------


def brute_fuse(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[list[float], list[int]]:
    best: dict[int, float] = {}
    for v in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            i, s = int(ids[v, j]), float(scores[v, j])
            if i != -1 and (i not in best or s > best[i]):
                best[i] = s
    ranked = sorted(best, key=lambda i: (-best[i], i))[:k]
    out_s = [best[i] for i in ranked] + [-np.inf] * (k - len(ranked))
    return out_s, ranked + [-1] * (k - len(ranked))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 4, 12])
def test_fuse_max_matches_brute_force(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    views, width = 3, 6
    ids = rng.integers(0, 8, (views, width)).astype(np.int64)  # ids repeat across views
    scores = np.round(rng.random((views, width)), 1).astype(np.float32)  # ties on purpose
    ids[rng.random((views, width)) < 0.2] = -1  # "no result" padding
    out = fuse_max(scores, ids, k)
    exp_s, exp_i = brute_fuse(scores, ids, k)
    assert out.scores.shape == (k,) and out.ids.shape == (k,)
    assert out.scores.dtype == np.float32 and out.ids.dtype == np.int64
    assert out.ids.tolist() == exp_i
    np.testing.assert_array_equal(out.scores, np.asarray(exp_s, np.float32))


def test_fuse_max_keeps_best_score_per_id() -> None:
    scores = np.array([[0.9, 0.5, 0.1], [0.8, 0.7, 0.0]], np.float32)
    ids = np.array([[3, 5, -1], [5, 3, -1]], np.int64)
    out = fuse_max(scores, ids, 3)
    assert out.ids.tolist() == [3, 5, -1]
    np.testing.assert_allclose(out.scores, [0.9, 0.8, -np.inf])


def test_fuse_max_all_padding_and_empty() -> None:
    out = fuse_max(np.zeros((2, 3), np.float32), np.full((2, 3), -1, np.int64), 2)
    assert out.ids.tolist() == [-1, -1] and np.isneginf(out.scores).all()
    out = fuse_max(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), 2)
    assert out.ids.tolist() == [-1, -1]
    assert fuse_max(np.ones((1, 2), np.float32), np.array([[4, 1]]), 0).ids.shape == (0,)
