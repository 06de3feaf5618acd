"""The vector-backend seam: what the index needs from a vector engine, and the registry.

An index keeps its vectors (whitened, L2-normalised: the *index space*) in a
:class:`VectorBackend` under the image ids; SQLite stays the source of truth and the loader
rebuilds or replays any backend from it (:mod:`lookalike.index.loader`). The protocol is
:class:`~lookalike.index.backends.base.VectorBackend`. Three are registered:
:class:`~lookalike.index.backends.faiss_backend.FaissBackend` (exact or compressed faiss
structures, the default), :class:`~lookalike.index.backends.numpy_backend.NumpyBackend`, a
deliberately plain brute force that the equivalence tests hold every other backend to, and
:class:`~lookalike.index.backends.milvus_backend.MilvusBackend` (a Milvus collection: Milvus
Lite inside the index directory, or a server). A backend in :data:`EXTERNAL` keeps its
vectors outside the process: its ``create`` / ``load`` also take a
:class:`~lookalike.index.backends.base.BackendSite` (the index directory, the scalar fields
of the images), its checkpoint names its data rather than holding it, and it alone takes
``IndexConf.uri``.
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
from lookalike.index.backends.base import (
    BackendSite,
    CheckpointError,
    DigestMismatch,
    VectorBackend,
)
from lookalike.index.backends.faiss_backend import FaissBackend
from lookalike.index.backends.milvus_backend import MilvusBackend  # pymilvus: only when used
from lookalike.index.backends.numpy_backend import NumpyBackend
from lookalike.index.conf import IndexConf

logger = logging.getLogger(__name__)

ADD_CHUNK = 65536  # vectors added per call when building
TRAIN_SAMPLE_SEED = 0


BACKENDS: dict[str, type[VectorBackend]] = {
    FaissBackend.name: FaissBackend,
    NumpyBackend.name: NumpyBackend,
    MilvusBackend.name: MilvusBackend,
}
EXTERNAL = frozenset({MilvusBackend.name})  # vectors in an outside engine (see above)


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
    if conf.uri is not None and conf.backend not in EXTERNAL:
        raise ConfigError(
            f"the {conf.backend} backend keeps its vectors in the index directory and takes no "
            f"uri (given {conf.uri!r}); only {', '.join(sorted(EXTERNAL))} does"
        )
    backend_class(conf).validate(conf, int(dim))


def create_backend(conf: IndexConf, dim: int, site: BackendSite | None = None) -> VectorBackend:
    """An empty backend of ``conf.backend``; ``site`` reaches only an :data:`EXTERNAL` one."""
    cls = backend_class(conf)
    if cls.name in EXTERNAL:
        return cls.create(conf, int(dim), site=site)
    return cls.create(conf, int(dim))


def load_backend(
    path: Path, conf: IndexConf, sha: str | None = None, site: BackendSite | None = None
) -> VectorBackend:
    """Read a checkpoint of ``conf.backend`` (``CheckpointError`` if unreadable,
    ``DigestMismatch`` if its digest is not ``sha``); ``site`` as for :func:`create_backend`."""
    cls = backend_class(conf)
    if cls.name in EXTERNAL:
        return cls.load(path, conf, sha, site=site)
    return cls.load(path, conf, sha)


def keeps_fields(conf: IndexConf) -> bool:
    """Whether ``conf``'s backend stores the images' scalar fields (a relabel must reach it)."""
    return conf.backend in EXTERNAL


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
    site: BackendSite | None = None,
) -> VectorBackend:
    """Build from scratch, training the configured structure when there are enough vectors.

    Args:
        conf: index settings.
        dim: dimension ``d`` of the index space.
        ids: ``(n,)`` image ids.
        fetch: ``fetch(rows)`` returns the ``(len(rows), d)`` float32 vectors of
            ``ids[rows]``, ready for the backend (whitened, normalised).
        seed: for the training sample.
        site: the index, for an :data:`EXTERNAL` backend.
    """
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    backend = create_backend(conf, dim, site)
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
    "EXTERNAL",
    "BackendSite",
    "CheckpointError",
    "DigestMismatch",
    "FaissBackend",
    "MilvusBackend",
    "NumpyBackend",
    "VectorBackend",
    "backend_class",
    "build_backend",
    "checkpoint_name",
    "create_backend",
    "is_checkpoint_name",
    "keeps_fields",
    "load_backend",
    "validate_conf",
]
