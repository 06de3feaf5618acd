"""Pooling layers: every registered layer, the factory and its validation."""

from __future__ import annotations

import pytest
import torch

from lookalike import functional as F
from lookalike.errors import ConfigError
from lookalike.pooling import GAP, MAC, POOLING, RMAC, GeM, SPoC, create_pooling


def feature_map(b: int = 3, c: int = 8, h: int = 5, w: int = 7) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(0)) + 0.01


def test_registry_holds_the_documented_layers() -> None:
    assert {"gap": GAP, "spoc": SPoC, "mac": MAC, "gem": GeM, "rmac": RMAC} == POOLING


@pytest.mark.parametrize("name", sorted(POOLING))
def test_output_shape_and_finite(name: str) -> None:
    pool = create_pooling(name)
    assert isinstance(pool, POOLING[name])
    out = pool(feature_map())
    assert out.shape == (3, 8)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(POOLING))
def test_regions_shape_and_unit_norm(name: str) -> None:
    pool = create_pooling(name)
    regions = pool.regions(feature_map())
    n_regions = 1 + len(F.rmac_regions(5, 7, 3)) if name == "rmac" else 1
    assert regions.shape == (3, n_regions, 8)
    norms = torch.linalg.vector_norm(regions, dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(POOLING))
def test_single_image_and_one_by_one_map(name: str) -> None:
    pool = create_pooling(name)
    x = feature_map(b=1, h=1, w=1)
    assert pool(x).shape == (1, 8)
    assert pool.regions(x).shape[0] == 1


@pytest.mark.parametrize("name", sorted(POOLING))
def test_empty_batch_nocrash(name: str) -> None:
    pool = create_pooling(name)
    x = torch.rand(0, 8, 5, 7)
    assert pool(x).shape == (0, 8)
    assert pool.regions(x).shape[0] == 0


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("gap", F.gap),
        ("spoc", F.spoc),
        ("mac", F.mac),
        ("gem", lambda x: F.gem(x, 3.0)),
        ("rmac", lambda x: F.rmac(x, 3)),
    ],
)
def test_layer_wraps_its_function(name: str, reference) -> None:
    x = feature_map()
    torch.testing.assert_close(create_pooling(name)(x), reference(x))


def test_factory_passes_gem_p_and_rmac_levels() -> None:
    x = feature_map()
    torch.testing.assert_close(create_pooling("gem", gem_p=5.0)(x), F.gem(x, 5.0))
    torch.testing.assert_close(create_pooling("rmac", rmac_levels=2)(x), F.rmac(x, 2))
    assert create_pooling("rmac", rmac_levels=2).regions(x).shape[1] == 1 + len(
        F.rmac_regions(5, 7, 2)
    )


def test_rmac_is_the_sum_of_its_regions() -> None:
    pool = create_pooling("rmac")
    x = feature_map()
    torch.testing.assert_close(pool(x), pool.regions(x).sum(dim=1))


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="unknown pooling 'avg'") as err:
        create_pooling("avg")
    for name in POOLING:
        assert name in str(err.value)


@pytest.mark.parametrize("p", [0.0, -1.0])
def test_gem_p_must_be_positive(p: float) -> None:
    with pytest.raises(ConfigError, match="GeM p"):
        create_pooling("gem", gem_p=p)
    with pytest.raises(ConfigError):
        GeM(p)


@pytest.mark.parametrize("levels", [0, -2])
def test_rmac_levels_at_least_one(levels: int) -> None:
    with pytest.raises(ConfigError, match="R-MAC levels"):
        create_pooling("rmac", rmac_levels=levels)
    with pytest.raises(ConfigError):
        RMAC(levels)
