"""Local features for verification: of an index's images, and of the queries.

Candidate features come from the index's local store (``lookalike index --local NAME``);
features that are missing (an index built without ``--local``, or images added since) are
computed from the image files on first use and cached in ``<index>/local`` when the index's
writer lock is free and its directory writable, in memory otherwise.

A query's features are detected from its image (a path, bytes or a PIL image, cropped to
its box) at the scale its whole image would be described at, or at another long side with
another keypoint budget (``VerifyConf.query_side`` / ``query_keypoints``: a phone photo in
which the item fills a third of the frame is detected larger, with more keypoints); an
indexed image used as the query brings its stored features; precomputed ones
(``Query.features``) are taken as given.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import cv2
import numpy as np

from lookalike.confined import EntryRefused
from lookalike.errors import IndexStateError, StorageError
from lookalike.images import crop_image, read_image
from lookalike.local.conf import VerifyConf
from lookalike.local.features import LocalExtractor, empty_features
from lookalike.local.store import LocalFeatureStore, has_local_store
from lookalike.local.sync import describe_into, open_local_store
from lookalike.query import Query

if TYPE_CHECKING:
    from lookalike.index import IndexStore

logger = logging.getLogger(__name__)

MEMORY_CACHE = 2_000  # candidates' features kept in memory (~130 KB each for ALIKED-512)
#   when they cannot be stored in the index directory


class IndexFeatures:
    """The local features of one index's images and of its queries, for one extractor.

    Thread-safe: searches of many threads share one.

    Args:
        store: the index.
        conf: its local-feature settings (the feature half of a :class:`VerifyConf`).
        extractor: a ready local extractor for ``conf`` (else made on first use).
        cache: store features computed on the fly in ``<index>/local`` (when possible).
    """

    def __init__(
        self,
        store: IndexStore,
        conf: VerifyConf,
        extractor: LocalExtractor | None = None,
        cache: bool = True,
    ) -> None:
        self.store = store
        self.conf = conf
        self.cache = cache
        self._extractor = extractor
        self._query_extractors: dict[tuple[int, int], LocalExtractor] = {}
        self._local: LocalFeatureStore | None = None
        self._memory: OrderedDict[int, tuple[str | None, dict]] = OrderedDict()
        self._lock = threading.RLock()
        self._timings = threading.local()

    @property
    def extractor(self) -> LocalExtractor:
        """The local extractor, made on first use (ALIKED loads a network)."""
        with self._lock:
            if self._extractor is None:
                self._extractor = self.conf.create_extractor()
            return self._extractor

    @property
    def metric(self) -> str:
        return "hamming" if self.conf.feature_settings()["binary"] else "l2"

    @property
    def timings(self) -> dict[str, float]:
        """Wall milliseconds of this thread's last :meth:`of_ids`: ``features`` (computed on
        the fly) and ``load``."""
        if not hasattr(self._timings, "values"):
            self._timings.values = {}
        return self._timings.values

    def close(self) -> None:
        with self._lock:
            if self._local is not None:
                self._local.close()
                self._local = None

    def _local_store(self, create: bool = False) -> LocalFeatureStore | None:
        """The index's local store (made when ``create`` and missing); None if unusable."""
        if self._local is None and (create or has_local_store(self.store.path)):
            try:
                self._local = open_local_store(self.store.path, self.conf, create=create)
            except (OSError, sqlite3.Error, StorageError) as error:
                logger.warning("local features of %s unavailable: %s", self.store.path, error)
        return self._local

    # -- queries ------------------------------------------------------------------------

    def of_query(
        self, query: Query, side: int | None = None, keypoints: int | None = None
    ) -> dict | None:
        """The local features of a query, keypoints in pixels of its (cropped) image; None
        for a vector query (nothing to detect).

        Args:
            query: the query.
            side: the long side, pixels, its whole image is resized to (up or down) before
                detection; None: the scale the database images are described at
                (``max_side`` over the image's long side, never enlarged), for which
                detecting a small crop at full resolution would pair scales the detector
                never matched.
            keypoints: keypoints kept; None: the database images' ``max_keypoints``.
        """
        if query.features is not None:
            return query.features
        if query.id is not None:
            return self.of_ids([query.id])[0]
        if query.image is None:
            return None
        full = read_image(query.image, name=query.label)
        crop = full if query.box is None else crop_image(full, query.box, query.label)
        scale = (side or self.conf.max_side) / max(full.size)
        if side is None:
            scale = min(1.0, scale)
        extractor = self._query_extractor(keypoints, max(crop.size) * scale)
        if scale == 1.0:
            return extractor(np.asarray(crop))
        w, h = crop.size
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        resized = cv2.resize(np.asarray(crop), size, interpolation=interpolation)
        return extractor(resized, original_size=(w, h))

    def _query_extractor(self, keypoints: int | None, side: float) -> LocalExtractor:
        """The database images' extractor, or one with ``keypoints`` that sees ``side``."""
        need = (keypoints or self.conf.max_keypoints, max(self.conf.max_side, round(side)))
        if need == (self.conf.max_keypoints, self.conf.max_side):
            return self.extractor
        with self._lock:
            if need not in self._query_extractors:
                self._query_extractors[need] = self.conf.create_extractor(*need)
            return self._query_extractors[need]

    # -- indexed images -----------------------------------------------------------------

    def of_ids(self, ids: list[int]) -> list[dict]:
        """Features of indexed images ``ids`` (computed and cached where missing; empty for
        unknown ids and unreadable files)."""
        start = time.perf_counter()
        records = self.store.get(ids)
        tags = [r.content_hash if r is not None else None for r in records]
        with self._lock:
            local = self._local_store()
            found: list[dict | None] = (
                local.get_many(ids, tags) if local is not None else [None] * len(ids)
            )
            for pos, (image_id, tag) in enumerate(zip(ids, tags, strict=True)):
                if found[pos] is None and image_id in self._memory:
                    cached_tag, feats = self._memory[image_id]
                    found[pos] = feats if cached_tag == tag else None
        missing = [i for i, f, r in zip(ids, found, records, strict=True) if f is None and r]
        computed_ms = 0.0
        if missing:
            t0 = time.perf_counter()
            computed = self._compute(missing)
            computed_ms = 1000 * (time.perf_counter() - t0)
            found = [computed.get(i) if f is None else f for i, f in zip(ids, found, strict=True)]
        self.timings["features"] = computed_ms
        self.timings["load"] = 1000 * (time.perf_counter() - start) - computed_ms
        return [f if f is not None else self._empty() for f in found]

    def _empty(self) -> dict:
        s = self.conf.feature_settings()
        return empty_features(s["dim"], s["binary"])

    def _compute(self, ids: list[int]) -> dict[int, dict]:
        """Describe indexed images from their files; cache them; ``{id: features}``."""
        logger.info("computing the local features of %d candidates on the fly", len(ids))
        out, storable = describe_into(None, self.store, ids, self.extractor, workers=0)
        if self.cache and storable and self._store(storable):
            return out
        records = {r.id: r for r in self.store.get(ids) if r is not None}
        with self._lock:
            for image_id, feats in out.items():
                if image_id not in records:  # removed by another process meanwhile
                    continue
                self._memory[image_id] = (records[image_id].content_hash, feats)
                self._memory.move_to_end(image_id)
            while len(self._memory) > MEMORY_CACHE:
                self._memory.popitem(last=False)
        return out

    def _store(self, items: list[tuple[int, dict, str | None]]) -> bool:
        """Put computed features in the index's local store, under the writer lock."""
        with self.store.try_writer() as ok:
            if not ok:
                logger.info("local features kept in memory: the index is read-only or busy")
                return False
            with self._lock:
                try:
                    local = self._local_store(create=True)
                    if local is None:
                        return False
                    local.put_many([(i, f) for i, f, _ in items], [t for *_, t in items])
                except EntryRefused:  # a link planted in local/: refused, never written
                    raise
                except (OSError, sqlite3.Error, IndexStateError, StorageError) as error:
                    logger.warning("local features are cached in memory only: %s", error)
                    return False
        return True
