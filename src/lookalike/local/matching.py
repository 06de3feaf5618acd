"""Matching and geometric verification of local features: pure functions on arrays.

* :func:`match_mutual_nn`: mutual nearest neighbours that also pass Lowe's ratio test, by
  L2 distance (float descriptors) or Hamming distance (binary uint8 descriptors);
  :func:`match_many` does the same for one query against many images with one matrix
  product per chunk of images (what verifying a shortlist costs).
* :func:`verify`: a homography or fundamental matrix fitted by OpenCV's USAC (MAGSAC++ by
  default); the inlier count is the evidence that two images show the same object.
* :func:`fuse_scores`: combine global similarity and inliers into the score a shortlist is
  re-ranked by (:data:`FUSIONS`; the ``verify`` stage, :mod:`lookalike.rerank.verify`, sorts
  by it).

Matches are ``(M, 2)`` int64 arrays of ``(index in image 0, index in image 1)`` pairs;
:data:`MATCHES0` is LightGlue's per-keypoint form (:func:`matches_to_matches0`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from lookalike.errors import ConfigError
from lookalike.local.features import DESCRIPTORS, KEYPOINTS

MATCHES = "matches"  # (M, 2) int64 pairs (i0, i1)
MATCHES0 = "matches0"  # (N0,) int64 index into keypoints1, -1 where unmatched
INLIERS = "inliers"  # (I, 2) int64 matches consistent with the fitted model

METRICS = ("l2", "hamming")
METHODS: dict[str, int] = {
    "magsac": cv2.USAC_MAGSAC,  # MAGSAC++ (Barath et al. 2020): no hard threshold tuning
    "usac": cv2.USAC_DEFAULT,  # LO-RANSAC with SPRT
    "accurate": cv2.USAC_ACCURATE,  # GC-RANSAC
    "ransac": cv2.RANSAC,  # classic RANSAC (slow on pairs with few inliers)
}
MIN_MATCHES = {"homography": 4, "fundamental": 8}  # fewer matches: nothing to verify
CHUNK_COLUMNS = 16384  # candidate keypoints per matrix product in match_many (64 MB at 1024)


@dataclass(frozen=True)
class Verification:
    """Outcome of :func:`verify` for one pair.

    Attributes:
        inliers: number of matches consistent with ``model``; 0 when nothing was fitted.
        inlier_matches: ``(inliers, 2)`` int64 pairs (i0, i1).
        model: ``(3, 3)`` float64 homography (image 0 -> image 1 pixels) or fundamental
            matrix; None when fewer than the minimal matches or the fit failed.
        tentative: number of matches before verification.
    """

    inliers: int
    inlier_matches: np.ndarray
    model: np.ndarray | None
    tentative: int = 0


def _no_matches() -> np.ndarray:
    return np.zeros((0, 2), np.int64)


def _check_metric(metric: str, ratio: float) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if not (isinstance(ratio, int | float) and 0.0 < ratio <= 1.0):
        raise ConfigError(f"ratio must be in (0, 1] (1 switches the ratio test off), got {ratio}")


def _as_vectors(desc: np.ndarray, metric: str, what: str) -> np.ndarray:
    """``(N, D)`` float32 rows whose squared L2 distances are the metric's distances.

    Binary descriptors are unpacked to 0/1 bits: the squared L2 distance of two bit vectors
    is their Hamming distance, exactly (integers in float32).
    """
    desc = np.asarray(desc)
    if desc.ndim != 2:
        raise ValueError(f"{what} must be (N, D), got shape {desc.shape}")
    if metric == "hamming":
        if desc.dtype != np.uint8:
            raise ValueError(f"{what} must be uint8 bit strings for the Hamming metric")
        return np.unpackbits(desc, axis=1).astype(np.float32)
    if not np.issubdtype(desc.dtype, np.number) or desc.dtype == np.bool_:
        raise ValueError(f"{what} must be numeric, got {desc.dtype}")
    return np.ascontiguousarray(desc, dtype=np.float32)


def match_mutual_nn(
    desc0: np.ndarray, desc1: np.ndarray, ratio: float = 0.8, metric: str = "l2"
) -> np.ndarray:
    """Mutual nearest neighbours passing Lowe's ratio test.

    A pair ``(i, j)`` is kept when ``j`` is the nearest descriptor of image 1 to ``i``, ``i``
    the nearest of image 0 to ``j``, and ``d(i, j) < ratio * d(i, j')`` for the second
    nearest ``j'`` (no second neighbour: the test passes). Ties go to the lower index.

    Args:
        desc0: ``(N0, D)`` descriptors of image 0; float for ``"l2"``, uint8 for ``"hamming"``.
        desc1: ``(N1, D)`` descriptors of image 1, same kind.
        ratio: Lowe's ratio on distances; 1 switches the test off.
        metric: ``"l2"`` (Euclidean) or ``"hamming"`` (binary descriptors).

    Returns:
        ``(M, 2)`` int64 ``(i0, i1)`` pairs, ordered by ``i0``.
    """
    return match_many(desc0, [desc1], ratio, metric)[0]


def match_many(
    desc0: np.ndarray, descs1: Sequence[np.ndarray], ratio: float = 0.8, metric: str = "l2"
) -> list[np.ndarray]:
    """:func:`match_mutual_nn` of one image against each of ``descs1``, batched.

    The distance matrices of several images come from one matrix product: with augmented
    vectors ``[a, 1] . [-2 b, |b|^2] = |a - b|^2 - |a|^2`` no further pass over the matrix is
    needed before the row minima. Columns are checked (mutual test) only for the rows that
    passed the ratio test, from the same matrix.

    Returns:
        One ``(M, 2)`` int64 array per entry of ``descs1``.
    """
    _check_metric(metric, ratio)
    a = _as_vectors(desc0, metric, "desc0")
    out: list[np.ndarray] = [_no_matches() for _ in descs1]
    prepared = [_as_vectors(d, metric, "descs1 entries") for d in descs1]
    for d in prepared:
        if len(d) and len(a) and d.shape[1] != a.shape[1]:
            raise ValueError(f"descriptor sizes differ: {a.shape[1]} and {d.shape[1]}")
    if len(a) == 0:
        return out
    a_sq = np.einsum("ij,ij->i", a, a)
    a_aug = np.hstack([a, np.ones((len(a), 1), np.float32)])
    # squared-distance ratio: d1^2 < r^2 d2^2 (L2); Hamming distances are the squared ones
    r2 = ratio if metric == "hamming" else ratio * ratio
    rows = np.arange(len(a))
    todo = [i for i, d in enumerate(prepared) if len(d)]
    begin = 0
    while begin < len(todo):
        group, width = [], 0
        while begin < len(todo) and (
            not group or width + len(prepared[todo[begin]]) <= CHUNK_COLUMNS
        ):
            group.append(todo[begin])
            width += len(prepared[todo[begin]])
            begin += 1
        b_aug = np.empty((width, a.shape[1] + 1), np.float32)
        pos = 0
        for i in group:
            d = prepared[i]
            np.multiply(d, -2.0, out=b_aug[pos : pos + len(d), :-1])
            b_aug[pos : pos + len(d), -1] = np.einsum("ij,ij->i", d, d)
            pos += len(d)
        partial = a_aug @ b_aug.T  # (N0, width): |a - b|^2 - |a|^2
        start = 0
        for i in group:
            n1 = len(prepared[i])
            block = partial[:, start : start + n1]
            out[i] = _mutual_ratio(block, a_sq, rows, r2, ratio >= 1.0)
            start += n1
    return out


def _mutual_ratio(
    block: np.ndarray, a_sq: np.ndarray, rows: np.ndarray, r2: float, no_ratio: bool
) -> np.ndarray:
    """Matches from one ``(N0, N1)`` block of ``|a - b|^2 - |a|^2``."""
    nn = block.argmin(axis=1)
    best = block[rows, nn]
    if no_ratio or block.shape[1] < 2:
        keep = np.ones(len(rows), bool)
    else:
        saved = best.copy()
        block[rows, nn] = np.inf
        second = block.min(axis=1)
        block[rows, nn] = saved
        d1 = np.maximum(best + a_sq, 0.0)
        d2 = np.maximum(second + a_sq, 0.0)
        keep = d1 < r2 * d2
    cand = np.flatnonzero(keep)
    if len(cand) == 0:
        return _no_matches()
    cols = nn[cand]
    # mutual check on the candidate columns only: (M, N0) distances, nearest row of each
    col_d = block[:, cols].T + a_sq[None, :]
    mutual = col_d.argmin(axis=1) == cand
    return np.stack([cand[mutual], cols[mutual]], axis=1).astype(np.int64)


def matches_to_matches0(matches: np.ndarray, n0: int) -> np.ndarray:
    """``(M, 2)`` pairs -> ``(n0,)`` int64 index into image 1 per keypoint of image 0, or -1."""
    out = np.full(n0, -1, np.int64)
    matches = np.asarray(matches, np.int64).reshape(-1, 2)
    out[matches[:, 0]] = matches[:, 1]
    return out


def verify(
    kpts0: np.ndarray,
    kpts1: np.ndarray,
    matches: np.ndarray,
    model: str = "homography",
    method: str = "magsac",
    threshold_px: float = 8.0,
    confidence: float = 0.999,
    max_iters: int = 2000,
) -> Verification:
    """Fit a geometric model to matched keypoints and count its inliers.

    Args:
        kpts0: ``(N0, 2)`` x, y pixels of image 0.
        kpts1: ``(N1, 2)`` x, y pixels of image 1.
        matches: ``(M, 2)`` int pairs ``(i0, i1)`` into them.
        model: ``"homography"`` (planar scenes, rotations; 4 points) or ``"fundamental"``
            (any rigid 3-D scene; 8 points, more chance inliers).
        method: robust estimator, a key of :data:`METHODS`.
        threshold_px: inlier threshold in pixels of image 1 (reprojection error for a
            homography, distance to the epipolar line for a fundamental matrix).
        confidence: RANSAC stopping confidence.
        max_iters: RANSAC iteration cap.

    Returns:
        A :class:`Verification`; fewer matches than the model needs (4 or 8), empty input
        or a degenerate configuration give 0 inliers and no model.
    """
    if model not in MIN_MATCHES:
        raise ConfigError(f"unknown model {model!r}; valid: {', '.join(MIN_MATCHES)}")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if not threshold_px > 0:
        raise ConfigError(f"threshold_px must be positive, got {threshold_px}")
    kpts0 = np.asarray(kpts0, np.float32).reshape(-1, 2)
    kpts1 = np.asarray(kpts1, np.float32).reshape(-1, 2)
    matches = np.asarray(matches, np.int64).reshape(-1, 2)
    tentative = len(matches)
    failed = Verification(0, _no_matches(), None, tentative)
    if tentative < MIN_MATCHES[model]:
        return failed
    if matches.min() < 0 or matches[:, 0].max() >= len(kpts0) or matches[:, 1].max() >= len(kpts1):
        raise ValueError(f"matches index keypoints outside the {len(kpts0)} / {len(kpts1)} given")
    p0, p1 = kpts0[matches[:, 0]], kpts1[matches[:, 1]]
    try:
        if model == "homography":
            fitted, mask = cv2.findHomography(
                p0, p1, METHODS[method], float(threshold_px), None, int(max_iters), confidence
            )
        else:
            fitted, mask = cv2.findFundamentalMat(
                p0, p1, METHODS[method], float(threshold_px), confidence, int(max_iters)
            )
    except cv2.error:  # degenerate samples (all points collinear, coincident, ...)
        return failed
    if fitted is None or mask is None or fitted.shape != (3, 3):
        return failed  # no model, or several fundamental matrices stacked (7-point case)
    inlier = mask.ravel().astype(bool)
    return Verification(int(inlier.sum()), matches[inlier], fitted.astype(np.float64), tentative)


def verify_pair(
    feats0: dict,
    feats1: dict,
    ratio: float = 0.8,
    metric: str | None = None,
    model: str = "homography",
    method: str = "magsac",
    threshold_px: float = 8.0,
) -> Verification:
    """:func:`match_mutual_nn` then :func:`verify` on two feature dicts.

    Args:
        feats0, feats1: dicts with ``KEYPOINTS`` and ``DESCRIPTORS`` (as extractors and
            :class:`~lookalike.local.store.LocalFeatureStore` return them).
        metric: None picks Hamming for uint8 descriptors, L2 otherwise.
    """
    desc0, desc1 = feats0[DESCRIPTORS], feats1[DESCRIPTORS]
    if metric is None:
        metric = "hamming" if np.asarray(desc0).dtype == np.uint8 else "l2"
    matches = match_mutual_nn(desc0, desc1, ratio, metric)
    return verify(
        feats0[KEYPOINTS], feats1[KEYPOINTS], matches, model, method, threshold_px=threshold_px
    )


# -- fusing global similarity and inliers ------------------------------------------------


def _inliers_only(sim: np.ndarray, inl: np.ndarray) -> np.ndarray:
    return inl + 1e-3 * sim  # similarity only breaks ties


def _sim_sqrt_inliers(sim: np.ndarray, inl: np.ndarray) -> np.ndarray:
    return sim * np.sqrt(inl)


CHANCE_INLIERS = 4  # a homography fits its 4-point sample to any matches
SATURATION_INLIERS = 30  # past chance + this, more inliers add nothing (overlap, not identity)


def _sim_plus_inliers(sim: np.ndarray, inl: np.ndarray) -> np.ndarray:
    bonus = np.clip(inl - CHANCE_INLIERS, 0, SATURATION_INLIERS) / SATURATION_INLIERS
    return sim + bonus


FUSIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "inliers": _inliers_only,  # verified inlier count; similarity breaks ties
    "sim_sqrt_inliers": _sim_sqrt_inliers,  # similarity * sqrt(inliers)
    # similarity + a bonus from 0 (chance inliers) to 1 (34+ inliers): chosen on Oxford5k
    # and confirmed on Holidays (benchmarks/verify.py): above sim_sqrt_inliers, by up to 4
    # mAP points, in 27 of 34 settings (all but ALIKED with ratio 0.8: at most 0.7 below);
    # a verified image outranks an unverified one unless its similarity is lower by more
    # than the bonus
    "sim_plus_inliers": _sim_plus_inliers,
}


def fuse_scores(similarity: np.ndarray, inliers: np.ndarray, fusion: str) -> np.ndarray:
    """Verified scores from global similarities and inlier counts (higher = more similar).

    Args:
        similarity: ``(k,)`` global similarities of the shortlist.
        inliers: ``(k,)`` inlier counts from :func:`verify`.
        fusion: a key of :data:`FUSIONS`.

    Returns:
        ``(k,)`` float32 fused scores.
    """
    try:
        fuse = FUSIONS[fusion]
    except KeyError:
        raise ConfigError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}") from None
    sim = np.asarray(similarity, np.float64)
    inl = np.asarray(inliers, np.float64)
    if sim.shape != inl.shape:
        raise ValueError(f"similarity {sim.shape} and inliers {inl.shape} differ in shape")
    return fuse(sim, inl).astype(np.float32)
