"""The protocol every vector backend implements (see :mod:`lookalike.index.backends`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from lookalike.index.conf import IndexConf


class CheckpointError(Exception):
    """A checkpoint file that cannot be read as this backend's (the loader rebuilds)."""


class DigestMismatch(CheckpointError):
    """A checkpoint whose content is not what the manifest's digest says."""


Fields = Callable[[np.ndarray], dict[str, list[str]]]  # ids -> {field: one value per id}


@dataclass(frozen=True)
class BackendSite:
    """Where a backend that keeps its vectors outside the process lives, and what it may
    read of its index (the registry hands it only to the backends in ``SITED``).

    Attributes:
        root: the index directory (Milvus Lite keeps its data inside it); None: a scratch
            backend with no index (tests, benchmarks), which picks a temporary place.
        fields: the scalar fields stored beside each vector (``label``, ``content_hash``),
            read from ``meta.sqlite`` in the caller's snapshot; None: empty strings.
    """

    root: Path | None = None
    fields: Fields | None = None


@runtime_checkable
class VectorBackend(Protocol):
    """A searchable set of ``(id, vector)`` pairs in the index space.

    Attributes:
        name: registry key; checkpoints are written as ``<name>-<seq>.index``.
        conf: the index settings it was made with (structure, search parameters).
    """

    name: ClassVar[str]
    conf: IndexConf

    @classmethod
    def validate(cls, conf: IndexConf, dim: int) -> None:
        """``ConfigError`` (saying why) unless this backend can hold ``dim``-d vectors so."""
        ...

    @classmethod
    def create(cls, conf: IndexConf, dim: int) -> VectorBackend:
        """An empty backend; a structure that needs training starts as an exact stand-in
        (``trained`` False) until :meth:`train`."""
        ...

    @classmethod
    def load(cls, path: Path, conf: IndexConf, sha: str | None = None) -> VectorBackend:
        """Read a checkpoint written by :meth:`save` (never following a link at ``path``),
        hashing it as it is read; ``CheckpointError`` if unreadable, ``DigestMismatch``
        when ``sha`` is given and differs."""
        ...

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the vectors."""
        ...

    @property
    def trained(self) -> bool:
        """False while an untrained structure answers with its exact stand-in."""
        ...

    @property
    def train_size(self) -> int:
        """Vectors needed before :meth:`train` is worth it (0: never needs training)."""
        ...

    @property
    def train_sample(self) -> int:
        """Vectors to draw from the collection for :meth:`train` (0: none)."""
        ...

    def __len__(self) -> int:
        """Live vectors (the size)."""
        ...

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add ``(n, d)`` float32 vectors under ``(n,)`` distinct ids that are not present
        (an update is :meth:`remove`, then add; the reference raises ``ValueError``)."""
        ...

    def remove(self, ids: np.ndarray) -> None:
        """Remove the vectors of ``ids``; unknown ids are ignored."""
        ...

    def retain(self, ids: np.ndarray) -> None:
        """Remove every vector whose id is not in ``ids`` (consistency after loading)."""
        ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by inner product of ``(n, d)`` queries (the contract above)."""
        ...

    def train(self, sample: np.ndarray) -> None:
        """Train the configured structure on ``(m, d)`` vectors; the backend must be empty."""
        ...

    def save(self, path: Path) -> str:
        """Write a checkpoint to ``path`` atomically (:func:`lookalike.storage.atomic_write`);
        returns its digest."""
        ...

    def memory_bytes(self) -> int:
        """Approximate RAM held by the vectors and the structure, bytes."""
        ...

    def wants_rebuild(self) -> bool:
        """Whether a rebuild from the vectors would reclaim space (e.g. many tombstones)."""
        ...

    def set_search_params(self, conf: IndexConf) -> None:
        """Apply ``conf``'s search-time parameters (``nprobe``, ``ef_search``, ...)."""
        ...

    def stats(self) -> dict[str, Any]:
        """``{"backend", "structure", "live", "dead", "trained", "memory_bytes",
        "search_params"}`` (``search_params``: the search-time knobs in effect), plus
        ``"engine"`` for a backend whose vectors live in an outside engine (where, its
        state)."""
        ...
