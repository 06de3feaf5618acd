"""A small index as ``lookalike index`` makes it, built without a model: real image files,
the ``default`` preset's descriptor settings, random vectors recorded with each file's size
and mtime (so a rerun of ``lookalike index`` finds every file unchanged and loads no
model), a whitening, a checkpoint, a stored DBA and SIFT local features. Used by the
confinement, check and repair tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lookalike.index import IndexStore, NewImage

DIM = 1280  # the default preset's descriptor dimension
WHITENED = 64  # the whitening's output dimension


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_whitening(seed: int = 1):
    from lookalike.whitening import Whitening

    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((DIM, WHITENED)))
    return Whitening(np.zeros(DIM, np.float32), q.astype(np.float32))


def build_index(
    base: Path,
    files: list[Path] | None = None,
    n: int = 6,
    *,
    whitening: bool = True,
    dba: bool = True,
    local: bool = True,
) -> tuple[Path, Path]:
    """``(folder, index)`` under ``base``: ``n`` images written (or ``files`` given, all in
    one folder) and indexed as described in the module docstring."""
    from conftest import write_images

    from lookalike.extract import get_preset

    if files is None:
        files = write_images(base / "photos", n, side=48)
    folder = files[0].parent
    conf = get_preset("default")
    root = base / "index"
    records = []
    for i, path in enumerate(files):
        st = path.resolve().stat()
        records.append(NewImage(str(path.resolve()), f"hash{i}", st.st_size, st.st_mtime, 48, 48))
    with IndexStore.create(root, conf.descriptor(), DIM, query=conf.query_defaults()) as store:
        ids = store.add(records, unit_rows(len(files), DIM))
        if whitening:
            store.set_whitening(random_whitening())
        store.checkpoint()
        if dba:
            from lookalike.rerank.dba import build_dba, store_dba

            store_dba(store, build_dba(store.vector_source(), 5, 1.0))  # the dba preset's
    if local:
        from test_local_store import fake_features

        from lookalike.local import LocalFeatureStore
        from lookalike.local.conf import local_preset

        settings = local_preset("sift").feature_settings()  # what `--local sift` asks for
        with LocalFeatureStore(root, "sift", settings) as features:
            items = [(i, fake_features("sift", 50, seed=i, size=(48, 48))) for i in ids]
            features.put_many(items, [r.content_hash for r in records])
    return folder, root
