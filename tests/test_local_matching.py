"""Matching, verification, fusion and drawing: pure functions on synthetic arrays."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from lookalike.errors import ConfigError
from lookalike.local import (
    DESCRIPTORS,
    KEYPOINTS,
    draw_matches,
    fuse_scores,
    match_many,
    match_mutual_nn,
    verify,
    verify_pair,
)
from lookalike.local.matching import matches_to_matches0

H_TRUE = np.array([[0.92, 0.12, 25.0], [-0.07, 0.97, 14.0], [2e-4, 1e-4, 1.0]])


def homography_corner_error(h_est: np.ndarray, h_true: np.ndarray, size: tuple[int, int]) -> float:
    """Largest distance, pixels, between the image corners mapped by two homographies."""
    w, h = size
    corners = np.array([[[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]], np.float64)
    a = cv2.perspectiveTransform(corners, np.asarray(h_est, np.float64))[0]
    b = cv2.perspectiveTransform(corners, np.asarray(h_true, np.float64))[0]
    err = float(np.linalg.norm(a - b, axis=1).max())
    return err if math.isfinite(err) else math.inf


def brute_force_matches(d0: np.ndarray, d1: np.ndarray, ratio: float, metric: str) -> set:
    """Mutual NN + Lowe ratio test, one pair at a time, as written in textbooks."""

    def dist(x: np.ndarray, y: np.ndarray) -> float:
        if metric == "hamming":
            return float(sum(bin(int(u) ^ int(v)).count("1") for u, v in zip(x, y, strict=True)))
        return float(np.sqrt(((x.astype(np.float64) - y.astype(np.float64)) ** 2).sum()))

    table = [[dist(x, y) for y in d1] for x in d0]
    found = set()
    for i, row in enumerate(table):
        order = sorted(range(len(row)), key=lambda j: (row[j], j))
        j = order[0]
        column = [table[k][j] for k in range(len(d0))]
        back = min(range(len(d0)), key=lambda k: (column[k], k))
        passes = len(order) < 2 or ratio >= 1 or row[j] < ratio * row[order[1]]
        if back == i and passes:
            found.add((i, j))
    return found


@pytest.mark.parametrize("ratio", [0.8, 0.95, 1.0])
def test_mutual_nn_l2_matches_brute_force(ratio: float) -> None:
    rng = np.random.default_rng(1)
    d1 = rng.standard_normal((40, 16)).astype(np.float32)
    # half of image 0 are noisy copies of image 1's descriptors, half unrelated
    d0 = np.vstack([d1[:20] + 0.3 * rng.standard_normal((20, 16)), rng.standard_normal((15, 16))])
    d0 = d0.astype(np.float32)
    got = match_mutual_nn(d0, d1, ratio=ratio, metric="l2")
    assert got.dtype == np.int64 and got.shape[1] == 2
    assert {tuple(m) for m in got.tolist()} == brute_force_matches(d0, d1, ratio, "l2")
    assert len(got) >= 15  # the noisy copies are found


@pytest.mark.parametrize("ratio", [0.8, 1.0])
def test_mutual_nn_hamming_matches_brute_force(ratio: float) -> None:
    rng = np.random.default_rng(2)
    d1 = rng.integers(0, 256, (30, 8), dtype=np.uint8)
    flips = np.packbits(rng.random((30, 64)) < 0.08, axis=1)  # ~5 of 64 bits flipped
    d0 = np.vstack([d1 ^ flips, rng.integers(0, 256, (10, 8), dtype=np.uint8)])
    got = match_mutual_nn(d0, d1, ratio=ratio, metric="hamming")
    assert {tuple(m) for m in got.tolist()} == brute_force_matches(d0, d1, ratio, "hamming")
    assert len(got) >= 20


def test_match_many_equals_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import lookalike.local.matching as matching

    monkeypatch.setattr(matching, "CHUNK_COLUMNS", 50)  # several chunks of candidates
    rng = np.random.default_rng(3)
    q = rng.standard_normal((25, 8)).astype(np.float32)
    cands = [
        np.vstack([q[:10] + 0.2 * rng.standard_normal((10, 8)), rng.standard_normal((n, 8))])
        for n in (5, 30, 60)
    ] + [np.zeros((0, 8), np.float32), rng.standard_normal((1, 8))]
    cands = [c.astype(np.float32) for c in cands]
    batched = match_many(q, cands, ratio=0.9)
    assert len(batched) == len(cands)
    for c, got in zip(cands, batched, strict=True):
        np.testing.assert_array_equal(got, match_mutual_nn(q, c, ratio=0.9))
    assert batched[3].shape == (0, 2)


def test_matching_edge_cases() -> None:
    rng = np.random.default_rng(4)
    d = rng.standard_normal((5, 4)).astype(np.float32)
    empty = np.zeros((0, 4), np.float32)
    assert match_mutual_nn(empty, d).shape == (0, 2)
    assert match_mutual_nn(d, empty).shape == (0, 2)
    # one descriptor on each side: no second neighbour, so the ratio test passes
    np.testing.assert_array_equal(match_mutual_nn(d[:1], d[:1]), [[0, 0]])
    # identical sets match one to one
    np.testing.assert_array_equal(match_mutual_nn(d, d), np.stack([np.arange(5)] * 2, 1))
    with pytest.raises(ConfigError, match="metric"):
        match_mutual_nn(d, d, metric="cosine")
    with pytest.raises(ConfigError, match="ratio"):
        match_mutual_nn(d, d, ratio=1.5)
    with pytest.raises(ValueError, match="uint8"):
        match_mutual_nn(d, d, metric="hamming")
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        match_mutual_nn(d[0], d)
    with pytest.raises(ValueError, match="differ"):
        match_mutual_nn(d, d[:, :3])


def _synthetic_correspondences(n_in: int, n_out: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    k0 = rng.uniform(0, 400, (n_in + n_out, 2)).astype(np.float32)
    k1 = cv2.perspectiveTransform(k0[None].astype(np.float64), H_TRUE)[0].astype(np.float32)
    k1[:n_in] += rng.normal(0, 0.5, (n_in, 2)).astype(np.float32)
    k1[n_in:] = rng.uniform(0, 400, (n_out, 2))  # outliers
    matches = np.stack([np.arange(n_in + n_out)] * 2, axis=1)
    return k0, k1, matches


def test_verify_recovers_homography_among_outliers() -> None:
    k0, k1, matches = _synthetic_correspondences(60, 60)
    v = verify(k0, k1, matches, threshold_px=3.0)
    assert v.tentative == 120
    assert 55 <= v.inliers <= 66  # the 60 true ones, give or take a lucky outlier
    assert np.isin(np.arange(60), v.inlier_matches[:, 0]).mean() > 0.9
    assert homography_corner_error(v.model, H_TRUE, (400, 400)) < 3.0
    assert v.inlier_matches.dtype == np.int64 and v.inlier_matches.shape == (v.inliers, 2)


def test_verify_fundamental_and_methods() -> None:
    k0, k1, matches = _synthetic_correspondences(80, 20, seed=1)
    f = verify(k0, k1, matches, model="fundamental", threshold_px=2.0)
    assert f.inliers >= 75 and f.model is not None and f.model.shape == (3, 3)
    for method in ("usac", "accurate"):
        assert verify(k0, k1, matches, method=method, threshold_px=3.0).inliers >= 75


def test_verify_too_few_and_empty_and_degenerate() -> None:
    k0, k1, matches = _synthetic_correspondences(10, 0)
    assert verify(k0, k1, matches[:3]).inliers == 0  # below the 4 a homography needs
    few = verify(k0, k1, matches[:7], model="fundamental")
    assert few.inliers == 0 and few.model is None and few.tentative == 7
    empty = verify(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2), np.int64))
    assert empty.inliers == 0 and empty.inlier_matches.shape == (0, 2) and empty.model is None
    # every point the same: no homography can be fitted, and nothing crashes
    same = np.zeros((10, 2), np.float32)
    assert verify(same, same, matches).inliers in (0, 10)
    with pytest.raises(ConfigError, match="model"):
        verify(k0, k1, matches, model="affine")
    with pytest.raises(ConfigError, match="method"):
        verify(k0, k1, matches, method="lmeds")
    with pytest.raises(ValueError, match="outside"):
        verify(k0[:3], k1, matches)


def test_verify_is_deterministic() -> None:
    k0, k1, matches = _synthetic_correspondences(30, 70, seed=5)
    runs = {verify(k0, k1, matches).inliers for _ in range(3)}
    assert len(runs) == 1


def test_verify_pair_with_no_features() -> None:
    empty = {KEYPOINTS: np.zeros((0, 2), np.float32), DESCRIPTORS: np.zeros((0, 128), np.float32)}
    rng = np.random.default_rng(0)
    some = {
        KEYPOINTS: rng.uniform(0, 100, (50, 2)).astype(np.float32),
        DESCRIPTORS: rng.standard_normal((50, 128)).astype(np.float32),
    }
    assert verify_pair(empty, some).inliers == 0
    assert verify_pair(some, empty).inliers == 0
    binary = {KEYPOINTS: some[KEYPOINTS], DESCRIPTORS: np.zeros((50, 32), np.uint8)}
    assert verify_pair(binary, binary).tentative <= 1  # all equal: one mutual pair at most


def test_matches_to_matches0() -> None:
    m0 = matches_to_matches0(np.array([[0, 3], [2, 1]]), 4)
    np.testing.assert_array_equal(m0, [3, -1, 1, -1])
    assert matches_to_matches0(np.zeros((0, 2)), 2).tolist() == [-1, -1]


def test_fusions() -> None:
    sim = np.array([0.9, 0.8, 0.7, 0.6])
    inl = np.array([4, 100, 0, 25])
    np.testing.assert_allclose(
        fuse_scores(sim, inl, "sim_sqrt_inliers"), sim * np.sqrt(inl), rtol=1e-6
    )
    # chance-level inliers (<= 4) add nothing; the bonus saturates at 34
    np.testing.assert_allclose(
        fuse_scores(sim, inl, "sim_plus_inliers"), [0.9, 1.8, 0.7, 0.6 + 21 / 30], rtol=1e-6
    )
    fused = fuse_scores(sim, inl, "inliers")
    assert fused.dtype == np.float32
    assert np.argsort(-fused, kind="stable").tolist() == [1, 3, 0, 2]  # by inliers
    # equal inliers: the global similarity decides
    tied = fuse_scores(sim, np.zeros(4), "inliers")
    assert np.argsort(-tied, kind="stable").tolist() == [0, 1, 2, 3]
    assert (np.diff(tied) < 0).all()
    with pytest.raises(ConfigError, match="sim_sqrt_inliers"):
        fuse_scores(sim, inl, "magic")
    with pytest.raises(ValueError, match="shape"):
        fuse_scores(sim, inl[:2], "inliers")


def test_draw_matches_writes_png(tmp_path) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    k0 = np.array([[10, 10], [100, 50]], np.float32)
    k1 = np.array([[5, 5], [80, 40]], np.float32)
    out = draw_matches(a, Image.fromarray(b), k0, k1, np.array([[0, 0], [1, 1]]),
                       tmp_path / "sub" / "m.png", title="2 inliers")  # fmt: skip
    img = Image.open(out)
    # b is scaled to a's height (120): 90 * 2 = 180 wide, plus the gap and the title band
    assert img.size == (160 + 8 + 180, 120 + 28)
    # no matches, no title: still a picture
    out2 = draw_matches(a, b, k0, k1, np.zeros((0, 2), np.int64), tmp_path / "n.png")
    assert Image.open(out2).size == (160 + 8 + 180, 120)
