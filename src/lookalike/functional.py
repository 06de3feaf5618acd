"""Pure descriptor maths: pooling and normalisation on feature maps and vectors.

Feature maps are ``(B, C, H, W)`` tensors of non-negative activations; pooled descriptors
are ``(B, C)``. Nothing here holds state; :mod:`lookalike.pooling` wraps these in modules.
(After cirtorch ``layers/functional.py``.)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def l2n(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the rows of ``(B, D)``."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


def l2n_np(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """L2-normalise the rows of ``(N, D)`` into float32."""
    x = np.asarray(x, dtype=np.float32)
    return (x / (np.linalg.norm(x, axis=-1, keepdims=True) + eps)).astype(np.float32)


def gap(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling: ``(B, C, H, W) -> (B, C)``."""
    return x.mean(dim=(-2, -1))


spoc = gap  # SPoC (Babenko & Lempitsky 2015) without centre prior is sum pooling == GAP after l2n


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions: ``(B, C, H, W) -> (B, C)``."""
    return x.amax(dim=(-2, -1))


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling (Radenovic et al. 2018): ``(mean x^p)^(1/p)``, ``(B, C)``."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def rmac_regions(height: int, width: int, levels: int = 3, overlap: float = 0.4) -> list[tuple]:
    """R-MAC square regions (Tolias et al. 2016) as ``(y0, x0, side)`` in feature-map cells.

    Level ``l`` places ``l + m - 1`` squares of side ``2 * min(H, W) / (l + 1)`` along the long
    side, where ``m`` is chosen so consecutive squares overlap by about ``overlap``. The whole-map
    term of R-MAC is not among them: :func:`rmac` adds it.
    """
    short, long_ = min(height, width), max(height, width)
    steps = np.arange(1, 7)
    # number of extra regions along the long side whose overlap is closest to `overlap`
    b = (long_ - short) / np.maximum(steps, 1)
    val = np.abs((short**2 - short * b) / short**2 - overlap) if long_ > short else None
    extra = 0 if val is None else int(steps[np.argmin(val)])
    regions: list[tuple] = []
    for level in range(1, levels + 1):
        side = max(1, math.floor(2 * short / (level + 1)))
        n_short, n_long = level, level + extra
        ys = np.linspace(0, height - side, n_short if height <= width else n_long)
        xs = np.linspace(0, width - side, n_long if height <= width else n_short)
        for y0 in np.unique(np.round(ys).astype(int)):
            for x0 in np.unique(np.round(xs).astype(int)):
                regions.append((int(y0), int(x0), side))
    return regions


def rmac(x: torch.Tensor, levels: int = 3, p: float | None = None) -> torch.Tensor:
    """Regional MAC: sum of L2-normalised region descriptors, ``(B, C)``.

    Args:
        x: ``(B, C, H, W)`` feature map.
        levels: number of region scales; 1 is the whole-map square only.
        p: pool each region with GeM(p) instead of max when given.
    """
    h, w = x.shape[-2:]
    out = l2n(mac(x) if p is None else gem(x, p))
    for y0, x0, side in rmac_regions(h, w, levels):
        r = x[..., y0 : y0 + side, x0 : x0 + side]
        out = out + l2n(mac(r) if p is None else gem(r, p))
    return out


def resize_map(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear resize of an ``(B, C, H, W)`` image batch by ``scale``, at least 1 px."""
    h, w = x.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size == (h, w):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
