"""The vector-backend seam: what the index needs from a vector engine, and the registry.

An index keeps its vectors (whitened, L2-normalised: the *index space*) in a
:class:`VectorBackend` under the image ids; SQLite stays the source of truth and the loader
rebuilds or replays any backend from it (:mod:`lookalike.index.loader`). The protocol is
:class:`~lookalike.index.backends.base.VectorBackend`. Two are registered:
:class:`~lookalike.index.backends.faiss_backend.FaissBackend` (exact or compressed faiss
structures, the default) and :class:`~lookalike.index.backends.numpy_backend.NumpyBackend`, a
deliberately plain brute force that the equivalence tests hold every other backend to.
Another engine plugs in by implementing the protocol and adding itself to
:data:`BACKENDS` (and its name to ``lookalike.index.conf.BACKEND_NAMES`` and the CLI's
``--backend`` choices, spelled out there so that reading a setting imports no engine; a test
holds the three together); the loader, the writer and the tests talk only to the protocol.

The contract (the faiss one): vectors are ``(n, d)`` float32 rows, ids int64; ``search``
returns ``(scores, ids)`` of shape ``(n, k)``, best first, padded with id ``-1`` and score
``-inf``; ``add`` takes ids that are not present (an update is a removal, then an add);
removing an unknown id is a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lookalike.errors import ConfigError
from lookalike.index.backends.base import CheckpointError, DigestMismatch, VectorBackend
from lookalike.index.backends.faiss_backend import FaissBackend
from lookalike.index.backends.numpy_backend import NumpyBackend
from lookalike.index.conf import IndexConf

logger = logging.getLogger(__name__)

ADD_CHUNK = 65536  # vectors added per call when building
TRAIN_SAMPLE_SEED = 0


BACKENDS: dict[str, type[VectorBackend]] = {
    FaissBackend.name: FaissBackend,
    NumpyBackend.name: NumpyBackend,
}


def backend_class(conf: IndexConf) -> type[VectorBackend]:
    """The registered class of ``conf.backend``; ``ConfigError`` listing the valid names."""
    try:
        return BACKENDS[conf.backend]
    except KeyError:
        raise ConfigError(
            f"unknown vector backend {conf.backend!r}; choose one of {', '.join(BACKENDS)}"
        ) from None


def validate_conf(conf: IndexConf, dim: int) -> None:
    """``ConfigError`` unless ``conf`` describes a backend able to hold ``dim``-d vectors."""
    if dim < 1:
        raise ConfigError(f"index dimension must be >= 1, got {dim}")
    backend_class(conf).validate(conf, int(dim))


def create_backend(conf: IndexConf, dim: int) -> VectorBackend:
    """An empty backend of ``conf.backend``."""
    return backend_class(conf).create(conf, int(dim))


def load_backend(path: Path, conf: IndexConf, sha: str | None = None) -> VectorBackend:
    """Read a checkpoint of ``conf.backend`` (``CheckpointError`` if unreadable,
    ``DigestMismatch`` if its digest is not ``sha``)."""
    return backend_class(conf).load(path, conf, sha)


def checkpoint_name(conf: IndexConf, seq: int) -> str:
    """File name of the checkpoint covering the change log up to ``seq``."""
    return f"{conf.backend}-{int(seq)}.index"


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is a checkpoint of any registered backend."""
    prefix, _, rest = name.partition("-")
    return prefix in BACKENDS and rest.endswith(".index") and rest[: -len(".index")].isdigit()


def build_backend(
    conf: IndexConf,
    dim: int,
    ids: np.ndarray,
    fetch: Callable[[np.ndarray], np.ndarray],
    seed: int = TRAIN_SAMPLE_SEED,
) -> VectorBackend:
    """Build from scratch, training the configured structure when there are enough vectors.

    Args:
        conf: index settings.
        dim: dimension ``d`` of the index space.
        ids: ``(n,)`` image ids.
        fetch: ``fetch(rows)`` returns the ``(len(rows), d)`` float32 vectors of
            ``ids[rows]``, ready for the backend (whitened, normalised).
        seed: for the training sample.
    """
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    backend = create_backend(conf, dim)
    plan = getattr(backend, "plan", None)  # faiss "auto" picks its structure for n vectors
    if plan is not None:
        backend = plan(n)
    if not backend.trained:
        need = backend.train_size
        if n < need:
            logger.info("%d vectors < %d needed to train %s: exact stand-in", n, need, conf.factory)
        else:
            size = min(n, sample_size(backend))
            rows = np.arange(n)
            if size < n:
                rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
            logger.info("training %s on %d of %d vectors", conf.factory, size, n)
            backend.train(np.ascontiguousarray(fetch(rows), dtype=np.float32))
    for begin in range(0, n, ADD_CHUNK):
        rows = np.arange(begin, min(n, begin + ADD_CHUNK))
        backend.add(fetch(rows), ids[rows])
    return backend


def sample_size(backend: VectorBackend) -> int:
    """Training vectors to draw for ``backend``."""
    return int(backend.train_sample)


__all__ = [
    "BACKENDS",
    "CheckpointError",
    "DigestMismatch",
    "FaissBackend",
    "NumpyBackend",
    "VectorBackend",
    "backend_class",
    "build_backend",
    "checkpoint_name",
    "create_backend",
    "is_checkpoint_name",
    "load_backend",
    "validate_conf",
]
