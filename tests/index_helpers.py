"""Shared helpers of the index tests: unit vectors, records, a brute-force search, every
registered backend as an index configuration, a filled index, a subprocess runner (the
``root`` / ``filled`` fixtures are in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lookalike
from lookalike.index import BACKENDS, IndexConf, IndexStore, NewImage

D = 32
DESCRIPTOR = {"model": "efficientnet_lite0", "pooling": "gem", "scales": (1.0, 0.707)}
SRC = str(Path(lookalike.__file__).resolve().parents[1])


def _engine_marks(name: str) -> list:
    """Skipped where the backend's outside engine (Milvus) is not installed."""
    from lookalike.index.backends import EXTERNAL
    from lookalike.index.backends.milvus_client import unavailable

    reason = unavailable() if name in EXTERNAL else None
    return [pytest.mark.skip(reason=reason)] if reason else []


# One exact configuration per registered backend: index-level tests run on each.
BACKEND_CONFS = [
    pytest.param(IndexConf(backend=name), id=name, marks=_engine_marks(name)) for name in BACKENDS
]


def unit(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def images(n: int, prefix: str = "/img", **kw: object) -> list[NewImage]:
    return [NewImage(path=f"{prefix}/{i}.jpg", **kw) for i in range(n)]


def fill(root: Path, conf: IndexConf = IndexConf(), n: int = 200) -> tuple[np.ndarray, list[int]]:
    """Create an index of ``n`` images under ``conf``, checkpoint it, close it; the vectors
    and the ids."""
    x = unit(n)
    with IndexStore.create(root, DESCRIPTOR, D, conf) as store:
        ids = store.add(images(n), x)
        store.checkpoint()
    return x, ids


def brute_force(db: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int):
    """Top-``k`` ``(scores, ids)`` by inner product, computed plainly."""
    sims = q @ db.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), ids[order]


def run_python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw,
    )  # fmt: skip
