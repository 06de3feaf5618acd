"""PCA-whitening learned from a collection of global descriptors.

Unsupervised whitening (Jegou & Chum, ECCV 2012) decorrelates descriptor dimensions and
down-weights the frequent, bursty directions. Learned on a small collection it over-fits
(a 1280-d covariance from ~800 images), so the eigenvalues are shrunk towards their mean
and the whitening power can be softened: ``power = 0.5`` is full whitening, ``0`` is a
plain PCA rotation. Written with numpy because no library offers shrinkage + power + the
``(mean, projection)`` pair we persist; scikit-learn's ``PCA(whiten=True)`` has neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.errors import ConfigError
from lookalike.functional import l2n_np


@dataclass(frozen=True)
class WhiteningConf:
    """How to learn the whitening. ``dim=None`` keeps every dimension."""

    dim: int | None = None  # output dimension after PCA; None keeps the input dimension
    shrinkage: float = 0.0  # 0..1, blend eigenvalues towards their mean; 0 switches it off
    power: float = 0.5  # eigenvalue exponent of the scaling: 0.5 full whitening, 0 rotation only
    min_images: int = 32  # fewer indexed images than this: no whitening is learned


@dataclass
class Whitening:
    """A learned projection ``y = l2n((x - mean) @ projection)``.

    Attributes:
        mean: ``(D,)`` float32 collection mean.
        projection: ``(D, d)`` float32, columns are scaled principal directions.
    """

    mean: np.ndarray
    projection: np.ndarray

    @property
    def dim_in(self) -> int:
        return int(self.projection.shape[0])

    @property
    def dim_out(self) -> int:
        return int(self.projection.shape[1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Whiten and re-normalise ``(N, D)`` descriptors into ``(N, d)`` float32."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise ConfigError(
                f"whitening expects (N, {self.dim_in}) descriptors, got shape {x.shape}"
            )
        return l2n_np((x - self.mean) @ self.projection)

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, mean=self.mean, projection=self.projection)

    @classmethod
    def load(cls, path: str | Path) -> Whitening:
        with np.load(path) as data:
            return cls(
                mean=data["mean"].astype(np.float32),
                projection=data["projection"].astype(np.float32),
            )


def learn_whitening(x: np.ndarray, conf: WhiteningConf) -> Whitening:
    """Learn a (shrunk) PCA-whitening from ``(N, D)`` L2-normalised descriptors."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ConfigError(f"whitening needs at least 2 descriptors of shape (N, D), got {x.shape}")
    dim = x.shape[1] if conf.dim is None else conf.dim
    if not 1 <= dim <= x.shape[1]:
        raise ConfigError(f"whitening dim must be in 1..{x.shape[1]}, got {dim}")
    if not 0.0 <= conf.shrinkage <= 1.0:
        raise ConfigError(f"whitening shrinkage must be in [0, 1], got {conf.shrinkage}")
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / x.shape[0]
    eigval, eigvec = np.linalg.eigh(cov)
    # Shrink towards the mean of the eigenvalues (Ledoit-Wolf style): tames the tiny,
    # noisy trailing eigenvalues that full whitening would blow up.
    total = np.clip(eigval, 0.0, None).mean()
    order = np.argsort(eigval)[::-1][:dim]
    eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
    eigval = (1.0 - conf.shrinkage) * eigval + conf.shrinkage * total
    scale = (eigval + 1e-9 * max(total, 1e-12)) ** -conf.power
    projection = eigvec * scale[None, :]
    return Whitening(mean=mean.astype(np.float32), projection=projection.astype(np.float32))
