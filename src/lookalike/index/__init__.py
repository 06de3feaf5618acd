"""The on-disk image index: metadata in SQLite, raw descriptors in a flat file, a vector
backend (faiss, or the numpy reference) on top, every setting in one typed manifest.

::

    with IndexStore.create("my-index", descriptor={"model": ...}, dim=1280) as store:
        ids = store.add([NewImage(path="/photos/a.jpg", ...)], vectors)   # (1, 1280) float32
        store.checkpoint()
    with IndexStore.open("my-index") as store:
        scores, ids = store.search(queries, k=10)

See :mod:`lookalike.index.store` for the directory layout and the durability guarantees,
:mod:`lookalike.index.backends` for the vector-backend seam and
:mod:`lookalike.index.manifest` for what an index records.
"""

from __future__ import annotations

from lookalike.index.backends import BACKENDS, VectorBackend
from lookalike.index.backends.faiss_backend import validate_factory
from lookalike.index.conf import (
    INDEX_PRESETS,
    ImageRecord,
    IndexConf,
    NewImage,
    get_index_conf,
)
from lookalike.index.manifest import Manifest
from lookalike.index.source import LiveVectors, VectorSource
from lookalike.index.store import IndexStore

__all__ = [
    "BACKENDS",
    "INDEX_PRESETS",
    "ImageRecord",
    "IndexConf",
    "IndexStore",
    "LiveVectors",
    "Manifest",
    "NewImage",
    "VectorBackend",
    "VectorSource",
    "get_index_conf",
    "validate_factory",
]
