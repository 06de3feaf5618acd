"""The reference vector backend: every vector in one numpy array, exact brute-force search.

Deliberately plain (a full ``argsort`` per query, no tricks): it is what the equivalence
tests compare every other backend against, and a backend with no native dependency for
small collections. Exact only: its one structure is ``Flat``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.confined import read_bytes
from lookalike.errors import ConfigError
from lookalike.index.backends.base import CheckpointError, DigestMismatch
from lookalike.index.conf import IndexConf
from lookalike.storage import atomic_write


class NumpyBackend:
    """Ids and vectors in two arrays, row ``i`` of ``vectors`` for ``ids[i]``.

    Args:
        conf: the index settings (``factory`` must be ``"Flat"``).
        ids: ``(n,)`` int64.
        vectors: ``(n, d)`` float32.
    """

    name = "numpy"

    def __init__(self, conf: IndexConf, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.conf = conf
        self._ids = np.asarray(ids, dtype=np.int64)
        self._vectors = np.asarray(vectors, dtype=np.float32)

    @classmethod
    def validate(cls, conf: IndexConf, dim: int) -> None:
        if conf.factory.strip() != "Flat":
            raise ConfigError(
                f"the numpy backend searches exactly (factory 'Flat'), not {conf.factory!r}; "
                "use the faiss backend for other structures"
            )

    @classmethod
    def create(cls, conf: IndexConf, dim: int) -> NumpyBackend:
        cls.validate(conf, dim)
        return cls(conf, np.empty(0, np.int64), np.empty((0, int(dim)), np.float32))

    @classmethod
    def load(cls, path: Path, conf: IndexConf, sha: str | None = None) -> NumpyBackend:
        content, digest = read_bytes(path)  # FileNotFoundError: removed meanwhile
        if sha is not None and digest != sha:
            raise DigestMismatch(f"{path} is not the checkpoint the manifest records")
        try:
            with np.load(io.BytesIO(content), allow_pickle=False) as data:
                ids, vectors = data["ids"], data["vectors"]
        except Exception as error:  # not a zip, truncated zip, not .npz, missing arrays, ...
            raise CheckpointError(
                f"{path} is not a numpy checkpoint ({type(error).__name__}: {error})"
            ) from None
        if ids.dtype != np.int64 or vectors.dtype != np.float32:
            raise CheckpointError(f"{path} holds {ids.dtype} ids / {vectors.dtype} vectors")
        if ids.ndim != 1 or vectors.ndim != 2 or len(ids) != len(vectors):
            raise CheckpointError(f"{path} holds arrays of inconsistent shapes")
        return cls(conf, ids, vectors)

    @property
    def dim(self) -> int:
        return int(self._vectors.shape[1])

    @property
    def trained(self) -> bool:
        return True

    @property
    def train_size(self) -> int:
        return 0

    @property
    def train_sample(self) -> int:
        return 0

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        if len(np.unique(ids)) != len(ids) or np.isin(ids, self._ids).any():
            raise ValueError("add() takes ids that are not present yet; remove them first")
        self._ids = np.concatenate([self._ids, ids])
        self._vectors = np.concatenate([self._vectors, vectors])

    def remove(self, ids: np.ndarray) -> None:
        keep = ~np.isin(self._ids, np.asarray(ids, dtype=np.int64))
        self._ids, self._vectors = self._ids[keep], self._vectors[keep]

    def retain(self, ids: np.ndarray) -> None:
        keep = np.isin(self._ids, np.asarray(ids, dtype=np.int64))
        self._ids, self._vectors = self._ids[keep], self._vectors[keep]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = max(int(k), 0)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        got = min(k, len(self._ids))
        if got:
            sims = queries @ self._vectors.T
            order = np.argsort(-sims, axis=1, kind="stable")[:, :got]
            scores[:, :got] = np.take_along_axis(sims, order, axis=1)
            ids[:, :got] = self._ids[order]
        return scores, ids

    def train(self, sample: np.ndarray) -> None:
        """Nothing to train."""

    def save(self, path: Path) -> str:
        return atomic_write(path, lambda f: np.savez(f, ids=self._ids, vectors=self._vectors))

    def memory_bytes(self) -> int:
        return int(self._ids.nbytes + self._vectors.nbytes)

    def wants_rebuild(self) -> bool:
        return False

    def set_search_params(self, conf: IndexConf) -> None:
        self.conf = conf

    def stats(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "structure": "Flat",
            "live": len(self),
            "dead": 0,
            "trained": True,
            "memory_bytes": self.memory_bytes(),
            "search_params": {},
        }
