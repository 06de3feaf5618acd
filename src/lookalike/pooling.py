"""Pooling layers: feature map ``(B, C, H, W)`` -> global descriptor ``(B, C)``.

Thin modules over :mod:`lookalike.functional`; ``POOLING`` is the registry and
:func:`create_pooling` its factory. Every layer can also give the per-region descriptors
``(B, R, C)`` that whitening is learned from (one region, the whole map, except R-MAC).
"""

from __future__ import annotations

import torch
from torch import nn

from lookalike import functional as F
from lookalike.errors import ConfigError


class GAP(nn.Module):
    """Global average pooling (what ImageNet classifiers use)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gap(x)

    def regions(self, x: torch.Tensor) -> torch.Tensor:
        return F.l2n(self(x))[:, None]


class SPoC(GAP):
    """Sum pooling of convolutions (Babenko & Lempitsky 2015); GAP up to scale."""


class MAC(GAP):
    """Maximum activation of convolutions (Tolias et al. 2016)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mac(x)


class GeM(GAP):
    """Generalised mean pooling with a fixed ``p`` (Radenovic et al. 2018)."""

    def __init__(self, p: float = 3.0) -> None:
        super().__init__()
        if p <= 0:
            raise ConfigError(f"GeM p must be > 0, got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gem(x, self.p)


class RMAC(GAP):
    """Regional MAC (Tolias et al. 2016): sum of L2-normalised region maxima."""

    def __init__(self, levels: int = 3) -> None:
        super().__init__()
        if levels < 1:
            raise ConfigError(f"R-MAC levels must be >= 1, got {levels}")
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rmac(x, self.levels)

    def regions(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        parts = [F.l2n(F.mac(x))]
        for y0, x0, side in F.rmac_regions(h, w, self.levels):
            parts.append(F.l2n(F.mac(x[..., y0 : y0 + side, x0 : x0 + side])))
        return torch.stack(parts, dim=1)


POOLING: dict[str, type[GAP]] = {"gap": GAP, "spoc": SPoC, "mac": MAC, "gem": GeM, "rmac": RMAC}


def create_pooling(name: str, gem_p: float = 3.0, rmac_levels: int = 3) -> GAP:
    """Build a registered pooling layer; unknown names raise ``ConfigError``."""
    if name not in POOLING:
        raise ConfigError(f"unknown pooling {name!r}; valid: {', '.join(sorted(POOLING))}")
    if name == "gem":
        return GeM(gem_p)
    if name == "rmac":
        return RMAC(rmac_levels)
    return POOLING[name]()
