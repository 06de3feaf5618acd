"""PCA-whitening on synthetic correlated data: whitening, reduction, shrinkage, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import ConfigError
from lookalike.whitening import Whitening, WhiteningConf, learn_whitening


def correlated(n: int = 400, d: int = 8, seed: int = 0) -> np.ndarray:
    """``(n, d)`` L2-normalised rows with strongly correlated, unequal-variance dimensions."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d)) * np.geomspace(3.0, 0.1, d)[:, None]
    x = rng.standard_normal((n, d)) @ mixing + rng.standard_normal(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def covariance(y: np.ndarray) -> np.ndarray:
    yc = y - y.mean(axis=0)
    return yc.T @ yc / len(y)


def test_full_whitening_gives_identity_covariance() -> None:
    x = correlated()
    assert np.abs(covariance(x) - np.eye(8) * covariance(x).diagonal()).max() > 0.01
    w = learn_whitening(x, WhiteningConf(power=0.5, shrinkage=0.0))
    assert w.mean.dtype == np.float32 and w.projection.dtype == np.float32
    assert w.mean.shape == (8,) and w.projection.shape == (8, 8)
    np.testing.assert_allclose(w.mean, x.mean(axis=0), atol=1e-6)
    y = (x.astype(np.float64) - w.mean) @ w.projection.astype(np.float64)
    np.testing.assert_allclose(covariance(y), np.eye(8), atol=1e-3)


def test_apply_is_normalised_projection() -> None:
    x = correlated()
    w = learn_whitening(x, WhiteningConf())
    out = w.apply(x[:5])
    expected = (x[:5] - w.mean) @ w.projection
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("dim", [1, 3, 8])
def test_dimension_reduction_keeps_leading_components(dim: int) -> None:
    x = correlated()
    w = learn_whitening(x, WhiteningConf(dim=dim))
    assert (w.dim_in, w.dim_out) == (8, dim)
    out = w.apply(x)
    assert out.shape == (400, dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # the kept directions are the leading principal directions of the data, in order
    _, eigvec = np.linalg.eigh(covariance(x.astype(np.float64)))
    lead = eigvec[:, ::-1][:, :dim]
    cols = w.projection / np.linalg.norm(w.projection, axis=0)
    np.testing.assert_allclose(np.abs((cols * lead).sum(axis=0)), 1.0, atol=1e-3)


def test_full_shrinkage_is_a_scaled_rotation() -> None:
    x = correlated()
    w = learn_whitening(x, WhiteningConf(power=0.5, shrinkage=1.0))
    # columns orthogonal and of equal length: P^T P = c I
    gram = w.projection.T.astype(np.float64) @ w.projection
    np.testing.assert_allclose(gram, np.eye(8) * gram[0, 0], rtol=1e-4, atol=1e-4 * gram[0, 0])
    # so it preserves the geometry of the centred data: same ranking as a plain PCA rotation
    pca = learn_whitening(x, WhiteningConf(power=0.0, shrinkage=0.0))
    np.testing.assert_allclose(w.apply(x), pca.apply(x), atol=1e-4)
    xc = x - x.mean(axis=0)
    dist_in = np.linalg.norm(xc[:1] - xc, axis=1)
    dist_out = np.linalg.norm((xc[:1] - xc) @ w.projection, axis=1)
    np.testing.assert_allclose(dist_out, dist_in * np.sqrt(gram[0, 0]), rtol=1e-4)
    assert np.array_equal(np.argsort(dist_out[1:]), np.argsort(dist_in[1:]))


def test_partial_shrinkage_lies_between() -> None:
    x = correlated()
    spread = {}
    for s in (0.0, 0.5, 1.0):
        y = (x - x.mean(axis=0)) @ learn_whitening(x, WhiteningConf(shrinkage=s)).projection
        var = covariance(y.astype(np.float64)).diagonal()
        spread[s] = var.max() / var.min()
    # full whitening equalises the variances; full shrinkage keeps PCA's spread
    assert spread[0.0] == pytest.approx(1.0, abs=1e-2)
    assert 1.0 < spread[0.5] < spread[1.0]


@pytest.mark.parametrize(("shrinkage", "power"), [(0.0, 0.5), (0.3, 0.2), (0.7, 0.5)])
def test_projection_scales_follow_shrunk_eigenvalues(shrinkage: float, power: float) -> None:
    x = correlated()
    w = learn_whitening(x, WhiteningConf(dim=5, shrinkage=shrinkage, power=power))
    eigval = np.linalg.eigvalsh(covariance(x.astype(np.float64)))[::-1]
    shrunk = (1 - shrinkage) * eigval[:5] + shrinkage * eigval.mean()  # towards the mean of all
    np.testing.assert_allclose(np.linalg.norm(w.projection, axis=0), shrunk**-power, rtol=1e-3)


def test_save_load_round_trip(tmp_path: Path) -> None:
    x = correlated()
    w = learn_whitening(x, WhiteningConf(dim=5, shrinkage=0.3, power=0.2))
    path = tmp_path / "whitening.npz"
    w.save(path)
    loaded = Whitening.load(path)
    np.testing.assert_array_equal(loaded.mean, w.mean)
    np.testing.assert_array_equal(loaded.projection, w.projection)
    assert loaded.mean.dtype == np.float32 and loaded.projection.dtype == np.float32
    np.testing.assert_array_equal(loaded.apply(x), w.apply(x))


@pytest.mark.parametrize("shape", [(10,), (2, 3, 4), (0, 8), (1, 8)])
def test_learn_refuses_bad_shapes_and_too_few_samples(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="at least 2 descriptors"):
        learn_whitening(np.ones(shape, np.float32), WhiteningConf())


def test_two_samples_are_enough() -> None:
    w = learn_whitening(correlated(n=2), WhiteningConf(dim=1))
    assert w.apply(correlated(n=3, seed=1)).shape == (3, 1)


@pytest.mark.parametrize("dim", [0, 9, -1])
def test_learn_refuses_bad_dim(dim: int) -> None:
    with pytest.raises(ConfigError, match="dim"):
        learn_whitening(correlated(), WhiteningConf(dim=dim))


@pytest.mark.parametrize("shrinkage", [-0.1, 1.5])
def test_learn_refuses_bad_shrinkage(shrinkage: float) -> None:
    with pytest.raises(ConfigError, match="shrinkage"):
        learn_whitening(correlated(), WhiteningConf(shrinkage=shrinkage))


@pytest.mark.parametrize("shape", [(3, 7), (3, 9), (8,), (1, 2, 8)])
def test_apply_refuses_wrong_dim(shape: tuple[int, ...]) -> None:
    w = learn_whitening(correlated(), WhiteningConf())
    with pytest.raises(ConfigError, match=r"\(N, 8\)"):
        w.apply(np.ones(shape, np.float32))


def test_apply_empty_nocrash() -> None:
    w = learn_whitening(correlated(), WhiteningConf(dim=4))
    out = w.apply(np.zeros((0, 8), np.float32))
    assert out.shape == (0, 4) and out.dtype == np.float32


def test_conf_is_frozen() -> None:
    with pytest.raises(AttributeError):
        WhiteningConf().dim = 3  # type: ignore[misc]
