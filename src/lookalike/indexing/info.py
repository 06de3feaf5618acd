"""What ``lookalike info`` shows about an index, as one JSON-ready dict."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lookalike.index import IndexStore
from lookalike.rerank.dba import DBA_NAME


def index_info(index_dir: str | Path) -> dict[str, Any]:
    """``lookalike info`` in one call: settings, counts, backend state, failed files.

    Returns:
        ``{"index", "format_version", "descriptor", "model", "dim", "index_conf",
        "backend", "query", "whitening", "counts", "created", "updated", "versions",
        "local", "dba", "failed"}``.
    """
    with IndexStore.open(index_dir) as store:
        m = store.manifest
        failed = [{"id": r.id, "path": r.path, "error": r.error} for r in store.records("error")]
        return {
            "index": str(store.path.resolve()),
            "format_version": m.format_version,
            "descriptor": m.descriptor,
            "model": dataclasses.asdict(m.model),
            "dim": m.dim,
            "index_conf": m.index.to_dict(),
            "backend": store.stats(),
            "query": m.query.to_dict(),
            "whitening": dataclasses.asdict(m.whitening),
            "counts": store.count(),
            "created": m.created,
            "updated": m.updated,
            "versions": m.versions,
            "local": local_info(store),
            "dba": dba_info(store),
            "failed": failed,
        }


def local_info(store: IndexStore) -> dict | None:
    """The index's local features (``index --local``, or cached by searches), or None."""
    from lookalike.local.store import LocalFeatureStore, stored_extractor

    settings = stored_extractor(store.path)
    if settings is None:
        return None
    with LocalFeatureStore(store.path, settings["name"], create=False) as local:
        stats = local.stats()
    return {
        "extractor": settings,
        "images": stats["images"],
        "bytes": stats["file_bytes"],
        "recorded": store.manifest.local is not None,  # kept current by `index` runs
    }


def dba_info(store: IndexStore) -> dict | None:
    """The stored DBA (``dba.npz``), or None."""
    path = store.path / DBA_NAME
    recorded = store.manifest.dba
    if recorded is None and not path.exists():
        return None
    return {
        "k": None if recorded is None else recorded.k,
        "alpha": None if recorded is None else recorded.alpha,
        "bytes": path.stat().st_size if path.exists() else 0,
    }
