"""The ``verify`` re-ranking stage: local-feature matching and geometric verification.

For one query, the top ``budget`` candidates of the ranking so far are matched against the
query's local features (mutual nearest neighbours with a ratio test, one matrix product per
chunk of candidates), a homography (or fundamental matrix) is fitted to each candidate's
matches by MAGSAC++, and the candidates are re-ordered by a fusion of their similarity and
inlier count (:data:`~lookalike.local.matching.FUSIONS`); the rest keep their order below.

::

    verifier = GeometricVerifier(store, VerifyConf(weights="aliked-n16.pth"))
    query = verifier.query_features("query.jpg", box=None)
    scores, ids, inliers = verifier(query, scores, ids, k=10)

Candidate features come from the index's local store (``lookalike index --local NAME``);
features that are missing (an index built without ``--local``, or images added since) are
computed from the image files on first use and cached in ``<index>/local`` when the index
directory is writable, in memory otherwise.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

from lookalike.errors import ConfigError, IndexStateError
from lookalike.images import crop_image, load_image
from lookalike.index import IndexStore
from lookalike.local.conf import VerifyConf
from lookalike.local.features import DESCRIPTORS, KEYPOINTS, LocalExtractor
from lookalike.local.matching import fuse_scores, match_many, verify
from lookalike.local.store import LocalFeatureStore, has_local_store
from lookalike.local.sync import describe_into, open_local_store, recorded_conf

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
NOT_VERIFIED = -1  # inlier count reported for results below the verification budget
MEMORY_CACHE = 2_000  # candidates' features kept in memory (~130 KB each for ALIKED-512)
#   when the index directory is read-only


def resolve_conf(store: IndexStore, conf: VerifyConf | dict | None) -> VerifyConf:
    """The verification settings for an index: its recorded ones (or the default preset)
    updated by ``conf`` (a dict of changes), or ``conf`` itself when complete.

    Raises:
        ConfigError: ``conf`` asks for other local features than the index stores.
    """
    recorded = recorded_conf(store)
    base = recorded or VerifyConf()
    if conf is None:
        return base
    wanted = base.replace(**conf) if isinstance(conf, dict) else conf
    if recorded is not None and wanted.feature_settings() != recorded.feature_settings():
        raise ConfigError(
            f"index {store.path} stores {recorded.features} local features "
            f"({recorded.max_keypoints} keypoints at {recorded.max_side} px); verification "
            f"must use them (asked for {wanted.features}, {wanted.max_keypoints} keypoints at "
            f"{wanted.max_side} px)"
        )
    return wanted


class GeometricVerifier:
    """Re-rank a shortlist by geometric verification against the index's local features.

    Args:
        store: the index searched.
        conf: local features and matching settings (see :func:`resolve_conf`).
        extractor: a ready local extractor for ``conf`` (else made on first use).
        cache: store features computed on the fly in ``<index>/local`` (when writable).

    Attributes:
        timings: wall milliseconds of the last call per step: ``features`` (candidates
            computed on the fly), ``load``, ``match``, ``ransac``.
    """

    name = "verify"

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
        self._local: LocalFeatureStore | None = None
        self._local_opened = False
        self._writable = True  # False once the store refused a write: cache in memory
        self._memory: OrderedDict[int, tuple[str | None, dict]] = OrderedDict()
        self.timings: dict[str, float] = {}

    @property
    def extractor(self) -> LocalExtractor:
        """The local extractor, made on first use (ALIKED loads a network)."""
        if self._extractor is None:
            self._extractor = self.conf.create_extractor()
        return self._extractor

    @property
    def metric(self) -> str:
        return "hamming" if self.conf.feature_settings()["binary"] else "l2"

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None

    def _local_store(self) -> LocalFeatureStore | None:
        """The index's local store; created on first use when missing and writable. An
        index directory that cannot be written (or read as a store) caches in memory."""
        if not self._local_opened:
            if has_local_store(self.store.path) or self.cache:
                try:
                    self._local = open_local_store(self.store.path, self.conf, create=True)
                except (OSError, sqlite3.Error) as error:
                    logger.warning("local features are cached in memory only: %s", error)
            self._local_opened = True  # not reached when the store holds other features
        return self._local

    # -- features -------------------------------------------------------------------------

    def query_features(self, path: str | Path, box: Box | None = None) -> dict:
        """Local features of a query image (cropped to ``box``), keypoints in crop pixels.

        A crop is detected at the scale its whole image would be (``max_side`` over the
        full image's long side), the scale the database images are described at; detecting
        a small crop at full resolution pairs scales the detector never matched.
        """
        full = load_image(path)
        crop = full if box is None else crop_image(full, box, str(path))
        scale = min(1.0, self.conf.max_side / max(full.size))
        if scale == 1.0:
            return self.extractor(np.asarray(crop))
        w, h = crop.size
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = cv2.resize(np.asarray(crop), size, interpolation=cv2.INTER_AREA)
        return self.extractor(small, original_size=(w, h))

    def features(self, ids: list[int]) -> list[dict]:
        """Stored features of indexed images ``ids`` (computed and cached where missing)."""
        start = time.perf_counter()
        records = self.store.get(ids)
        tags = [r.content_hash if r is not None else None for r in records]
        local = self._local_store()
        found: list[dict | None] = (
            local.get_many(ids, tags) if local is not None else [None] * len(ids)
        )
        for pos, (image_id, tag) in enumerate(zip(ids, tags, strict=True)):
            if found[pos] is None and image_id in self._memory:
                cached_tag, feats = self._memory[image_id]
                found[pos] = feats if cached_tag == tag else None
        missing = [i for i, f in zip(ids, found, strict=True) if f is None]
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
        from lookalike.local.features import empty_features

        s = self.conf.feature_settings()
        return empty_features(s["dim"], s["binary"])

    def _compute(self, ids: list[int]) -> dict[int, dict]:
        """Describe indexed images from their files; cache them; ``{id: features}``."""
        logger.info("computing the local features of %d candidates on the fly", len(ids))
        local = self._local_store() if self._writable else None
        try:
            out = describe_into(local, self.store, ids, self.extractor, workers=0)
        except (OSError, sqlite3.Error, IndexStateError) as error:  # a read-only store
            logger.warning("local features are cached in memory only: %s", error)
            self._writable, local = False, None
            out = describe_into(None, self.store, ids, self.extractor, workers=0)
        if local is None:
            records = {r.id: r for r in self.store.get(ids) if r is not None}
            for image_id, feats in out.items():
                self._memory[image_id] = (records[image_id].content_hash, feats)
                self._memory.move_to_end(image_id)
            while len(self._memory) > MEMORY_CACHE:
                self._memory.popitem(last=False)
        return out

    # -- verification ---------------------------------------------------------------------

    def inliers(self, query: dict, ids: list[int]) -> np.ndarray:
        """``(len(ids),)`` int64 inlier counts of the query against indexed images ``ids``."""
        cands = self.features(ids)
        t0 = time.perf_counter()
        matches = match_many(
            query[DESCRIPTORS], [c[DESCRIPTORS] for c in cands], self.conf.ratio, self.metric
        )
        t1 = time.perf_counter()
        counts = [
            verify(
                query[KEYPOINTS],
                c[KEYPOINTS],
                m,
                self.conf.model,
                self.conf.method,
                threshold_px=self.conf.threshold_px,
            ).inliers
            for c, m in zip(cands, matches, strict=True)
        ]
        t2 = time.perf_counter()
        self.timings["match"] = 1000 * (t1 - t0)
        self.timings["ransac"] = 1000 * (t2 - t1)
        return np.asarray(counts, np.int64)

    def __call__(
        self, query: dict, scores: np.ndarray, ids: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Re-rank one query's ranking by verification of its top ``budget`` results.

        Args:
            query: the query's local features (:meth:`query_features`).
            scores: ``(n,)`` float32 similarities, best first; ids: ``(n,)`` int64, -1 padding.
            k: results returned; ``<= 0`` returns all ``n``.

        Returns:
            ``(scores, ids, inliers)`` of shape ``(k,)``: the verified results by fused
            score (:attr:`VerifyConf.fusion`), then the others in their order with their
            similarity; ``inliers`` is -1 (:data:`NOT_VERIFIED`) for those. Verified
            results always rank first; with ``sim_plus_inliers`` (>= the similarity) the
            scores also stay descending across the budget boundary, with the other
            fusions they need not.
        """
        scores = np.asarray(scores, np.float32)
        ids = np.asarray(ids, np.int64)
        valid = int(np.count_nonzero(ids >= 0))
        top = min(self.conf.budget, valid)
        head = np.flatnonzero(ids >= 0)[:top]
        rest = np.setdiff1d(np.arange(len(ids)), head)
        inl = self.inliers(query, ids[head].tolist()) if top else np.zeros(0, np.int64)
        fused = fuse_scores(scores[head], inl, self.conf.fusion)
        order = np.argsort(-fused, kind="stable")
        out_s = np.concatenate([fused[order], scores[rest]]).astype(np.float32)
        out_i = np.concatenate([ids[head][order], ids[rest]])
        out_n = np.concatenate([inl[order], np.full(len(rest), NOT_VERIFIED, np.int64)])
        k = len(out_i) if k <= 0 else k
        pad = max(0, k - len(out_i))
        return (
            np.concatenate([out_s, np.full(pad, -np.inf, np.float32)])[:k],
            np.concatenate([out_i, np.full(pad, -1, np.int64)])[:k],
            np.concatenate([out_n, np.full(pad, NOT_VERIFIED, np.int64)])[:k],
        )


def check_stage_names(names: list[str]) -> tuple[list[str], bool]:
    """Split a ``--rerank`` list into descriptor-space stages and whether to verify."""
    verify_count = names.count(GeometricVerifier.name)
    if verify_count > 1:
        raise ConfigError("'verify' appears twice in the re-ranking stages; give it once")
    return [n for n in names if n != GeometricVerifier.name], verify_count == 1
