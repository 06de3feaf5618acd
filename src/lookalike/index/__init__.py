"""The on-disk image index: metadata in SQLite, raw descriptors in a flat file, faiss on top.

::

    with IndexStore.create("my-index", descriptor={"model": ...}, dim=1280) as store:
        ids = store.add([NewImage(path="/photos/a.jpg", ...)], vectors)   # (1, 1280) float32
        store.checkpoint()
    with IndexStore.open("my-index") as store:
        scores, ids = store.search(queries, k=10)

See :mod:`lookalike.index.store` for the directory layout and the durability guarantees.
"""

from __future__ import annotations

from lookalike.index.conf import (
    INDEX_PRESETS,
    ImageRecord,
    IndexConf,
    NewImage,
    get_index_conf,
    validate_factory,
)
from lookalike.index.store import IndexStore

__all__ = [
    "INDEX_PRESETS",
    "ImageRecord",
    "IndexConf",
    "IndexStore",
    "NewImage",
    "get_index_conf",
    "validate_factory",
]
