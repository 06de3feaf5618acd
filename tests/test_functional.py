"""Descriptor maths against brute-force loops written out plainly here."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lookalike import functional as F


def feature_map(b: int = 2, c: int = 5, h: int = 4, w: int = 6, seed: int = 0) -> torch.Tensor:
    """Non-negative float64 activations (post-ReLU-like), bounded away from 0."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g, dtype=torch.float64) * 0.9 + 0.1


def per_channel(x: torch.Tensor, reduce) -> torch.Tensor:
    """Apply ``reduce`` to the list of values of each (image, channel), one at a time."""
    b, c, h, w = x.shape
    out = torch.zeros(b, c, dtype=x.dtype)
    for i in range(b):
        for j in range(c):
            out[i, j] = reduce([float(x[i, j, y, xx]) for y in range(h) for xx in range(w)])
    return out


def brute_l2n(v: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(v)
    for i in range(v.shape[0]):
        norm = math.sqrt(sum(float(a) ** 2 for a in v[i]))
        out[i] = v[i] / norm
    return out


def test_gap_matches_loop() -> None:
    x = feature_map()
    torch.testing.assert_close(F.gap(x), per_channel(x, lambda vs: sum(vs) / len(vs)))


def test_mac_matches_loop() -> None:
    x = feature_map()
    torch.testing.assert_close(F.mac(x), per_channel(x, max))


def test_spoc_is_sum_pooling_up_to_scale() -> None:
    x = feature_map()
    torch.testing.assert_close(F.l2n(F.spoc(x), eps=0), brute_l2n(per_channel(x, sum)))


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 4.5])
def test_gem_matches_loop(p: float) -> None:
    x = feature_map()
    expected = per_channel(x, lambda vs: (sum(v**p for v in vs) / len(vs)) ** (1 / p))
    torch.testing.assert_close(F.gem(x, p), expected)


def test_gem_clamps_negative_and_zero_activations_to_eps() -> None:
    x = torch.tensor([[[[-1.0, 0.0], [4.0, 0.0]]]], dtype=torch.float64)
    expected = ((1e-6**3 * 3 + 4.0**3) / 4) ** (1 / 3)
    assert F.gem(x, 3.0).item() == pytest.approx(expected)


def test_gem_p1_is_gap() -> None:
    x = feature_map()
    torch.testing.assert_close(F.gem(x, 1.0), F.gap(x))


def test_gem_grows_with_p_from_gap_to_mac() -> None:
    x = feature_map(h=5, w=6)
    means = [F.gap(x)] + [F.gem(x, p) for p in (2.0, 3.0, 10.0, 200.0)] + [F.mac(x)]
    for lo, hi in itertools.pairwise(means):
        assert torch.all(lo <= hi + 1e-12)
    # power-mean bound: mac * (1/HW)^(1/p) <= gem_p <= mac
    torch.testing.assert_close(F.gem(x, 200.0), F.mac(x), rtol=1 - 30 ** (-1 / 200), atol=0)


def test_l2n_matches_loop_and_keeps_shape() -> None:
    v = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(F.l2n(v, eps=0), brute_l2n(v))
    assert torch.allclose(torch.linalg.vector_norm(F.l2n(v), dim=1), torch.ones(4, dtype=v.dtype))


def test_l2n_zero_row_stays_finite() -> None:
    out = F.l2n(torch.zeros(2, 3))
    assert torch.equal(out, torch.zeros(2, 3))


def test_l2n_np_matches_loop_and_returns_float32() -> None:
    v = np.random.default_rng(0).standard_normal((5, 3))
    out = F.l2n_np(v)
    assert out.dtype == np.float32 and out.shape == (5, 3)
    for row, src in zip(out, v, strict=True):
        norm = math.sqrt(sum(a * a for a in src))
        np.testing.assert_allclose(row, src / norm, rtol=1e-6)
    assert F.l2n_np(np.zeros((2, 3))).tolist() == [[0.0] * 3] * 2


# --- R-MAC regions --------------------------------------------------------------------------


def extra_regions(h: int, w: int, overlap: float = 0.4) -> int:
    """Regions added along the long side (Tolias et al. 2016; cirtorch ``roipool``)."""
    short, long_ = min(h, w), max(h, w)
    if short == long_:
        return 0
    best, best_err = 0, math.inf
    for n in range(1, 7):
        step = (long_ - short) / n
        err = abs((short * short - short * step) / (short * short) - overlap)
        if err < best_err:
            best, best_err = n, err
    return best


@pytest.mark.parametrize(
    ("h", "w"), [(1, 1), (2, 3), (4, 4), (12, 16), (16, 12), (10, 15), (16, 16), (5, 40)]
)
@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_rmac_regions_lie_inside_the_map(h: int, w: int, levels: int) -> None:
    regions = F.rmac_regions(h, w, levels)
    assert regions
    for y0, x0, side in regions:
        assert side >= 1
        assert y0 >= 0 and y0 + side <= h
        assert x0 >= 0 and x0 + side <= w


@pytest.mark.parametrize(("h", "w"), [(16, 16), (24, 24), (12, 16), (16, 12), (10, 15), (15, 30)])
def test_rmac_regions_per_level(h: int, w: int) -> None:
    levels = 3
    extra = extra_regions(h, w)
    regions = F.rmac_regions(h, w, levels)
    short = min(h, w)
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        at_level = [r for r in regions if r[2] == side]
        n_short, n_long = level, level + extra
        assert len(at_level) == n_short * n_long, (level, at_level)
        # the squares tile the map from corner to corner along both sides
        assert {r[0] for r in at_level} >= {0, h - side}
        assert {r[1] for r in at_level} >= {0, w - side}
    assert len(regions) == sum(lv * (lv + extra) for lv in range(1, levels + 1))


def test_rmac_regions_square_map_counts() -> None:
    assert len(F.rmac_regions(16, 16, 1)) == 1
    assert len(F.rmac_regions(16, 16, 3)) == 1 + 4 + 9
    assert extra_regions(16, 16) == 0


@pytest.mark.parametrize(("h", "w"), [(7, 7), (7, 11), (11, 7), (3, 20)])
def test_rmac_level1_holds_squares_of_the_short_side(h: int, w: int) -> None:
    level1 = F.rmac_regions(h, w, levels=1)
    assert all(side == min(h, w) for _, _, side in level1)
    assert (0, 0, min(h, w)) in level1
    if h != w:  # more than one square along the long side, reaching its far end
        assert len(level1) > 1
        far = (h - min(h, w), 0) if h > w else (0, w - min(h, w))
        assert (*far, min(h, w)) in level1


# --- R-MAC pooling ---------------------------------------------------------------------------


def brute_rmac(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Sum of L2-normalised maxima: the whole map, then every region, image by image."""
    b, c, h, w = x.shape
    out = torch.zeros(b, c, dtype=x.dtype)
    for i in range(b):
        boxes = [(0, 0, h, w)] + [(y, xx, s, s) for y, xx, s in F.rmac_regions(h, w, levels)]
        for y0, x0, rh, rw in boxes:
            v = torch.tensor(
                [
                    max(
                        float(x[i, ch, y, xx])
                        for y in range(y0, y0 + rh)
                        for xx in range(x0, x0 + rw)
                    )
                    for ch in range(c)
                ],
                dtype=x.dtype,
            )
            out[i] += v / math.sqrt(sum(float(a) ** 2 for a in v))
    return out


@pytest.mark.parametrize(("h", "w", "levels"), [(5, 7, 3), (6, 6, 2), (7, 4, 1), (1, 1, 3)])
def test_rmac_matches_loop(h: int, w: int, levels: int) -> None:
    x = feature_map(b=2, c=3, h=h, w=w)
    torch.testing.assert_close(F.rmac(x, levels), brute_rmac(x, levels), rtol=1e-5, atol=1e-5)


def test_rmac_with_p_pools_regions_by_gem() -> None:
    x = feature_map(h=5, w=7)
    expected = F.l2n(F.gem(x, 3.0))
    for y0, x0, s in F.rmac_regions(5, 7, 2):
        expected = expected + F.l2n(F.gem(x[..., y0 : y0 + s, x0 : x0 + s], 3.0))
    torch.testing.assert_close(F.rmac(x, 2, p=3.0), expected)
    assert not torch.allclose(F.rmac(x, 2, p=3.0), F.rmac(x, 2))


# --- edge cases ------------------------------------------------------------------------------

POOLS = {
    "gap": F.gap,
    "spoc": F.spoc,
    "mac": F.mac,
    "gem": F.gem,
    "rmac": F.rmac,
}


@pytest.mark.parametrize("name", sorted(POOLS))
def test_one_by_one_map(name: str) -> None:
    x = feature_map(b=3, c=4, h=1, w=1)
    out = POOLS[name](x)
    assert out.shape == (3, 4)
    # every pooling of a single cell is a multiple of that cell
    torch.testing.assert_close(F.l2n(out), F.l2n(x[:, :, 0, 0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(POOLS))
def test_batch_of_one_matches_row_of_batch(name: str) -> None:
    x = feature_map(b=3, c=4, h=5, w=6)
    torch.testing.assert_close(POOLS[name](x[1:2]), POOLS[name](x)[1:2])


@pytest.mark.parametrize("name", sorted(POOLS))
def test_empty_batch_nocrash(name: str) -> None:
    out = POOLS[name](torch.rand(0, 4, 5, 6))
    assert out.shape == (0, 4)


def test_l2n_empty_nocrash() -> None:
    assert F.l2n(torch.zeros(0, 4)).shape == (0, 4)
    assert F.l2n_np(np.zeros((0, 4))).shape == (0, 4)


@pytest.mark.parametrize(
    ("scale", "size"), [(0.5, (8, 12)), (0.75, (12, 18)), (2.0, (32, 48)), (0.01, (1, 1))]
)
def test_resize_map_sizes(scale: float, size: tuple[int, int]) -> None:
    x = torch.rand(2, 3, 16, 24)
    out = F.resize_map(x, scale)
    assert out.shape == (2, 3, *size)
    assert out.dtype == x.dtype


def test_resize_map_scale_one_is_identity() -> None:
    x = torch.rand(2, 3, 16, 24)
    assert F.resize_map(x, 1.0) is x


def test_resize_map_keeps_constant_images_constant() -> None:
    x = torch.full((1, 3, 16, 24), 0.25)
    for scale in (0.5, 0.75, 1.5):
        torch.testing.assert_close(
            F.resize_map(x, scale), torch.full_like(F.resize_map(x, scale), 0.25)
        )


def test_resize_map_downscale_is_antialiased() -> None:
    # vertical stripes two pixels wide: plain bilinear at 0.5 averages pixel pairs that share
    # a colour and keeps full contrast; an antialiasing filter blurs across stripes
    stripes = ((torch.arange(16) // 2) % 2).float()
    x = stripes[None, :].repeat(16, 1)[None, None].repeat(1, 3, 1, 1)
    out = F.resize_map(x, 0.5)
    assert out.shape == (1, 3, 8, 8)
    assert float(out.max() - out.min()) < 0.8


def test_resize_map_empty_batch_and_tiny_image() -> None:
    assert F.resize_map(torch.rand(0, 3, 16, 24), 0.5).shape == (0, 3, 8, 12)
    assert F.resize_map(torch.rand(1, 3, 1, 1), 0.5).shape == (1, 3, 1, 1)
