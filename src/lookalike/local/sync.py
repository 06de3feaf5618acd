"""Keep an index's local features in step with its images.

An index built with ``lookalike index --local NAME`` records its :class:`VerifyConf` in its
manifest (``local``) and stores the local features of every searchable image in
``<index>/local`` (:class:`~lookalike.local.store.LocalFeatureStore`), each tagged with the
content hash of the image it describes. :func:`sync_local` brings the store in line with
the index after any change: features of removed images are dropped, those of new or updated
images (no record, or another content hash) are computed. It is idempotent and resumable:
an indexing run killed between the index commit and the local features is completed by the
next run, and until then a search computes what it misses (:mod:`lookalike.rerank.verify`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lookalike.errors import ConfigError
from lookalike.images import decode_many
from lookalike.local.conf import VerifyConf
from lookalike.local.store import LOCAL_DIR, LocalFeatureStore, has_local_store, stored_extractor

if TYPE_CHECKING:
    from lookalike.index import IndexStore
    from lookalike.local.features import LocalExtractor

logger = logging.getLogger(__name__)

CHUNK = 32  # images per local-feature commit

Progress = Callable[[int, int], None]


def recorded_conf(store: IndexStore) -> VerifyConf | None:
    """The :class:`VerifyConf` recorded in the index, or None (built without ``--local``)."""
    return store.manifest.local


def record_conf(store: IndexStore, conf: VerifyConf) -> None:
    """Record ``conf`` as the index's local-feature settings (index open for writing).

    Called before any image is described. Weights not given (None) keep the recorded path.
    Local features cached by searches of an index built without ``--local`` are only a
    cache: when they were made with other settings they are deleted.

    Raises:
        ConfigError: the index stores local features made with other settings (delete
            ``<index>/local`` to choose new ones).
    """
    old = recorded_conf(store)
    stored = stored_extractor(store.path)
    want = conf.feature_settings()
    if stored is not None and stored != want:
        if old is None:
            logger.info("replacing the local features cached by searches (%s)", stored["name"])
            shutil.rmtree(store.path / LOCAL_DIR)
        else:
            diff = sorted(k for k in stored.keys() | want.keys() if stored.get(k) != want.get(k))
            raise ConfigError(
                f"index {store.path} stores local features with "
                + ", ".join(f"{k}={stored.get(k)!r}" for k in diff)
                + "; asked for "
                + ", ".join(f"{k}={want.get(k)!r}" for k in diff)
                + f". Use the same settings, or delete {store.path / LOCAL_DIR} to compute "
                "them again with the new ones"
            )
    if conf.weights is None and old is not None and old.weights is not None:
        conf = conf.replace(weights=old.weights)
    if old != conf:
        store.update_manifest(local=conf)


def open_local_store(
    index_dir: str | Path, conf: VerifyConf, create: bool = True
) -> LocalFeatureStore:
    """The local feature store of an index for ``conf``'s features (checked against it)."""
    return LocalFeatureStore(
        index_dir, conf.features, conf.feature_settings(), quantize=conf.quantize, create=create
    )


def stale_ids(store: IndexStore, local: LocalFeatureStore) -> tuple[list[int], list[int]]:
    """``(ids to compute, ids to drop)``: searchable images without up-to-date features, and
    stored features of images that are gone or failed."""
    tags = local.tags()
    live = {r.id: r.content_hash for r in store.records(status="ok")}
    todo = [i for i, h in live.items() if i not in tags or tags[i] != h]
    drop = [i for i in tags if i not in live]
    return sorted(todo), sorted(drop)


def sync_local(
    store: IndexStore,
    conf: VerifyConf | None = None,
    extractor: LocalExtractor | None = None,
    progress: Progress | None = None,
    workers: int = 2,
    compute: bool = True,
) -> int:
    """Make ``<index>/local`` match the index; returns the number of images described.

    Args:
        store: the index, open for writing.
        conf: local-feature settings; None uses the recorded ones (an index without them
            and without a local store is left alone). Given, they are recorded.
        extractor: a ready extractor for ``conf`` (saves loading a model).
        progress: called with (done, to do) after each committed chunk.
        workers: decoding processes (0: decode in this process).
        compute: describe new and changed images; False only drops removed ones.
    """
    if conf is not None:
        record_conf(store, conf)
    else:
        conf = recorded_conf(store)
    if conf is None:
        if has_local_store(store.path):  # made lazily by searches: only forget removed images
            _prune_lazy(store)
        return 0
    with open_local_store(store.path, conf) as local:
        todo, drop = stale_ids(store, local)
        if drop:
            local.remove(drop)
            logger.info("dropped the local features of %d removed images", len(drop))
        if not compute:
            todo = []
        if todo:
            extractor = extractor or conf.create_extractor()
            describe_into(local, store, todo, extractor, progress, workers)
        stats = local.stats()
        if (drop or todo) and stats["live_bytes"] < stats["file_bytes"] // 2:  # mostly dead
            local.compact()
    return len(todo)


def _prune_lazy(store: IndexStore) -> None:
    """Drop features of removed images from a store whose settings the index did not record."""
    settings = stored_extractor(store.path)
    with LocalFeatureStore(store.path, settings["name"], create=False) as local:
        _, drop = stale_ids(store, local)
        local.remove(drop)


def describe_into(
    local: LocalFeatureStore | None,
    store: IndexStore,
    ids: list[int],
    extractor: LocalExtractor,
    progress: Progress | None = None,
    workers: int = 2,
) -> tuple[dict[int, dict], list[tuple[int, dict, str | None]]]:
    """Compute the local features of indexed images ``ids`` from their files.

    Features of a file that still holds the indexed content are *storable*: stored in
    ``local`` (when given, in commits of :data:`CHUNK`), tagged with its content hash. A file
    that cannot be read, or changed since it was indexed, gets features that are returned
    but not storable (empty when unreadable): the next indexing run updates or fails the
    image, and its features follow.

    Returns:
        ``({id: features} of every image described, [(id, features, tag)] storable)``.
    """
    records = [r for r in store.get(ids) if r is not None]
    paths = [r.fs_path for r in records]  # as open() takes them (names not UTF-8)
    if progress:
        progress(0, len(records))
    out: dict[int, dict] = {}
    storable: list[tuple[int, dict, str | None]] = []
    pending = 0
    decoded = decode_many(paths, extractor.max_side, workers=workers if len(paths) > 8 else 0)
    for done, (record, d) in enumerate(zip(records, decoded, strict=True), 1):
        feats = out[record.id] = describe_decoded(extractor, d)
        if d.error is None and d.content_hash == record.content_hash:
            storable.append((record.id, feats, record.content_hash))
        if (
            local is not None
            and len(storable) > pending
            and (len(storable) - pending >= CHUNK or done == len(records))
        ):
            batch = storable[pending:]
            local.put_many([(i, f) for i, f, _ in batch], [t for *_, t in batch])
            pending = len(storable)
        if progress and (done % CHUNK == 0 or done == len(records)):
            progress(done, len(records))
    if local is not None and len(storable) > pending:
        batch = storable[pending:]
        local.put_many([(i, f) for i, f, _ in batch], [t for *_, t in batch])
    return out, storable


def describe_decoded(extractor: LocalExtractor, decoded) -> dict:
    """Local features of one :class:`~lookalike.images.Decoded` image, in original pixels."""
    from lookalike.local.features import empty_features

    if decoded.error is not None or decoded.image is None:
        logger.warning("no local features for %s: %s", decoded.path, decoded.error)
        return empty_features(extractor.dim, extractor.binary)
    return extractor(np.asarray(decoded.image), (decoded.width, decoded.height))
