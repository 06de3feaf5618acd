"""Search an index: one entry point for every kind of query, then the re-ranking stages.

A :class:`Searcher` is built once over an open index with its extractor and its stages
(:mod:`lookalike.rerank`) and answers :meth:`Searcher.search` for file paths, bytes, PIL
images, indexed ids or vectors (:class:`~lookalike.query.Query`), each with an optional
box. It is safe to share between threads, and it follows the index: changes another
process commits become searchable at the next search (one cheap check per call).

::

    with Searcher.open("my.idx", rerank=["dba", "alpha-qe", "verify"]) as s:
        ranking = s.search(["q.jpg", Query(image=jpeg_bytes, box=(0, 0, 200, 100)), 42], k=5)
        ranking.scores, ranking.ids, ranking.inliers      # (3, 5) float32 / int64 / int64
        for hit in s.results(ranking)[0]:
            print(hit.rank, hit.score, hit.path)

``rerank="auto"`` (what ``lookalike search`` does unless told otherwise) is the
small-gallery default (:func:`auto_settings`): an index of at most :data:`SMALL_GALLERY`
images is searched with regional query crops and geometric verification, the catalogue
case's remedy (a phone photo in which the item fills a third of a cluttered frame), at
about a second per query on a 2-core CPU; a larger index with its plain first stage.

Returns the faiss contract ``(scores, ids)`` of shape ``(n, k)``, best first, ``-1`` for "no
result", in a :class:`~lookalike.ranking.Ranking` (with ``inliers`` after verification);
:meth:`Searcher.results` joins them to paths and metadata. :meth:`Searcher.answer` does both
and, with ``errors="report"``, answers the good queries of a batch and gives each failed one
its error (``lookalike search`` with one unreadable image among good ones).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lookalike.errors import ConfigError, ImageError, LookalikeError
from lookalike.extract import ExtractConf, Extractor
from lookalike.index import IndexStore
from lookalike.local.conf import VerifyConf
from lookalike.query import Query, QueryContext, QueryLike
from lookalike.ranking import Ranking, fuse_max
from lookalike.rerank import Stage, StageResources, build_stages, stage_depths

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
Progress = Callable[[int, int], None]  # (queries done, queries)

AUTO = "auto"  # rerank value: the small-gallery default (auto_settings)
SMALL_GALLERY = 10_000  # images: at most this many, "auto" adds crops and verification
#   (benchmarks/catalogue.py: generated catalogue P@1 26.8 -> 98.7, ~0.7 s per query)
SMALL_GALLERY_CROPS = (0.5,)  # regional crops "auto" adds (when the index records none)
SMALL_GALLERY_RERANK = ("verify",)  # stages "auto" runs on a small gallery


def auto_settings(
    images: int, recorded_crops: Sequence[float]
) -> tuple[list[str], tuple[float, ...]]:
    """What ``rerank="auto"`` searches an index of ``images`` images with: ``(stages,
    crops)``. At most :data:`SMALL_GALLERY` images: verification of the top 100 and the
    index's recorded crops, or :data:`SMALL_GALLERY_CROPS` when it records none; a larger
    index: no stage and its recorded crops (a crop search and 100 verifications per query
    stay affordable while the local features of the whole gallery are: ~270 KB per image
    with ALIKED, 2.7 GB at 10k)."""
    if images > SMALL_GALLERY:
        return [], tuple(recorded_crops)
    return list(SMALL_GALLERY_RERANK), tuple(recorded_crops) or SMALL_GALLERY_CROPS


@dataclass(frozen=True)
class Hit:
    """One search result."""

    rank: int  # 1-based
    id: int
    path: str
    score: float  # cosine similarity in the index space (less the rotation or crop penalty for
    #   a match found by a rotated view or a crop; fused with inliers when verified); higher
    #   is better
    metadata: dict
    inliers: int | None = None  # verified inlier count; None: not verified

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: rank, id, path, score (6 decimals), metadata and inliers when
        present."""
        d = dataclasses.asdict(self)
        d["score"] = round(self.score, 6)
        if not d["metadata"]:
            d.pop("metadata")
        if d["inliers"] is None:
            d.pop("inliers")
        return d


@dataclass(frozen=True)
class Answer:
    """The results of one query, as ``search`` prints them."""

    query: str  # Query.label
    hits: list[Hit]
    error: LookalikeError | None = None  # why the query failed (answer(errors="report"));
    #   None: it was searched, hits are its results

    def to_dict(self) -> dict[str, Any]:
        """``{"query", "results"}``, or ``{"query", "error"}`` (one line) for a failed query."""
        if self.error is not None:
            return {"query": self.query, "error": " ".join(str(self.error).split())}
        return {"query": self.query, "results": [h.to_dict() for h in self.hits]}


ERRORS = ("raise", "report")  # what answer() does with a query that fails


class Searcher:
    """Queries on one index with the re-ranking stages it was built with. Thread-safe.

    Args:
        store: the open index (read-only is the usual; :meth:`open` opens one).
        extractor: the query extractor; None makes one with the index's settings on first
            use. It must describe like the index (same descriptor settings, same weights).
        stages: re-ranking stages (:func:`lookalike.rerank.build_stages`), in order.
        conf: the query settings; default: the index's descriptor and query defaults.
        resources: the stage state shared with sibling searchers (:meth:`with_stages`).
        close_store: close ``store`` (and the resources) in :meth:`close`.
    """

    def __init__(
        self,
        store: IndexStore,
        extractor: Extractor | None = None,
        stages: Sequence[Stage] = (),
        *,
        conf: ExtractConf | None = None,
        resources: StageResources | None = None,
        close_store: bool = False,
    ) -> None:
        self.store = store
        self.conf = conf or ExtractConf.for_index(store.manifest, workers=0)
        if isinstance(extractor, _LazyExtractor):  # a sibling's: one model for both
            self._extractor = extractor
        else:
            if extractor is not None and extractor.conf.descriptor() != self.conf.descriptor():
                raise ConfigError(
                    f"the extractor's settings differ from those index {store.path} was built "
                    "with; pass extractor=None to make one with the index's settings"
                )
            self._extractor = _LazyExtractor(store, self.conf, extractor)
        self.stages: list[Stage] = list(stages)
        self._owns_resources = resources is None
        self.resources = resources or StageResources(store)
        self._close_store = close_store

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        rerank: Sequence[str] | str = (),
        verify: VerifyConf | dict | None = None,
        *,
        runtime: str = "auto",
        device: str = "auto",
        extractor: Extractor | None = None,
        crops: Sequence[float] | None = None,
        crop_penalty: float | None = None,
    ) -> Searcher:
        """A searcher over the index at ``index_dir`` (opened read-only, closed with it).

        Args:
            index_dir: the index directory.
            rerank: re-ranking stage names, e.g. ``["dba", "alpha-qe", "verify"]``; or
                ``"auto"``: the small-gallery default (:func:`auto_settings`; ``crops``
                given explicitly are kept).
            verify: verification settings: a :class:`VerifyConf`, or a dict of changes to
                the index's recorded ones (``{"budget": 50}``).
            runtime, device: where the query model runs (the descriptor settings come from
                the index, so queries are always described like the database).
            extractor: a ready extractor with the index's settings (saves a model load).
            crops: regional query crop sizes instead of the index's defaults (``()``: the
                whole image only; :func:`lookalike.extract.query_crop_boxes`).
            crop_penalty: subtracted from crop views' scores, instead of the index's.
        """
        store = IndexStore.open(index_dir)
        try:
            conf = ExtractConf.for_index(store.manifest, runtime=runtime, device=device, workers=0)
            rerank, conf = _resolve_auto(store, conf, rerank, crops)
            if crop_penalty is not None:
                conf = conf.replace(crop_penalty=float(crop_penalty))
            resources = StageResources(store)
            stages = build_stages(rerank, resources, _device(verify, device))
            return cls(store, extractor, stages, conf=conf, resources=resources, close_store=True)
        except BaseException:
            store.close()
            raise

    def with_stages(
        self,
        rerank: Sequence[str] | str,
        verify: VerifyConf | dict | None = None,
        crops: Sequence[float] | None = None,
    ) -> Searcher:
        """A searcher over the same index, extractor and stage state with other stages
        (``rerank``, ``verify`` and ``crops`` as in :meth:`open`; the device defaults to
        the searcher's; without ``crops`` or ``"auto"``, this searcher's crops)."""
        rerank, conf = _resolve_auto(self.store, self.conf, rerank, crops)
        stages = build_stages(rerank, self.resources, _device(verify, conf.device))
        return Searcher(self.store, self._extractor, stages, conf=conf, resources=self.resources)

    def close(self) -> None:
        """Release the stage state this searcher made, and the store it opened."""
        if self._owns_resources or self._close_store:
            self.resources.close()
        if self._close_store:
            self.store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.store)

    @property
    def verified(self) -> bool:
        """Whether results carry inlier counts (a ``verify`` stage runs)."""
        return any(stage.name == "verify" for stage in self.stages)

    @property
    def extractor(self) -> Extractor:
        """The query extractor, loaded on first use (its weights checked against the
        index's recorded hash)."""
        return self._extractor.get()

    # -- searching -------------------------------------------------------------------------

    def search(
        self,
        queries: Sequence[QueryLike],
        k: int = 10,
        rotations: Sequence[int] | None = None,
        progress: Progress | None = None,
    ) -> Ranking:
        """Search, then run the stages, for every query.

        Args:
            queries: :class:`~lookalike.query.Query` objects, or what :meth:`Query.of`
                takes: file paths, bytes, PIL images, indexed ids, ``(D,)`` vectors.
            k: results per query; ``<= 0`` means the whole index.
            rotations: query angles (degrees) for image queries that do not set their own;
                default: the index's query defaults (rotated views' scores lowered by the
                rotation penalty, each image's best score kept).
            progress: called with (queries done, queries) after each query.

        Returns:
            The ``(n, k)`` batch ranking (``inliers`` field when verified).

        Raises:
            ConfigError: a bad query (unknown or failed id, wrong vector shape, ...);
            ImageError: an unreadable query image.
        """
        items = _queries(queries)
        rows, k_all = self._rows(items, k, rotations, progress, report=False)
        return Ranking.stack(rows, k_all)  # type: ignore[arg-type]  # none failed: raised

    def _rows(
        self,
        items: list[Query],
        k: int,
        rotations: Sequence[int] | None,
        progress: Progress | None,
        report: bool,
    ) -> tuple[list[Ranking | LookalikeError], int]:
        """Each query's ``(k,)`` ranking, or with ``report`` the error that describing it
        raised (an unreadable image, an unknown id, a bad vector); errors of the index or
        of a stage are always raised."""
        self.store.refresh_if_changed()
        failed: dict[int, LookalikeError] = {}
        for n, q in enumerate(items):  # refuse a bad id before any image is described
            if q.id is not None:
                try:
                    self._check_id(q.id)
                except ConfigError as error:
                    if not report:
                        raise
                    failed[n] = error
        k_all = len(self.store) if k <= 0 else int(k)
        rows: list[Ranking | LookalikeError] = []
        for n, q in enumerate(items):
            error = failed.get(n)
            if error is None:
                try:
                    views, penalty = self._views(q, rotations)
                except (ConfigError, ImageError) as raised:
                    if not report:
                        raise
                    error = raised
                else:
                    rows.append(self._rank(q, views, penalty, k_all))
            if error is not None:
                rows.append(error)
            if progress is not None:
                progress(n + 1, len(items))
        return rows, k_all

    def _rank(self, query: Query, views: np.ndarray, penalty: np.ndarray, k: int) -> Ranking:
        """One query's ``(k,)`` ranking from its ``(v, D)`` views: first stage (views
        fused), then the stages."""
        depth, outs = stage_depths(self.stages, k)
        scores, ids = self.store.search(views, depth)
        # a rotated view must beat the upright one by a margin: upright photos are the norm
        scores -= penalty
        ranking = fuse_max(scores, ids, depth) if len(views) > 1 else Ranking(scores[0], ids[0])
        if not self.stages:
            return ranking.fit(k)
        context = QueryContext(query, self.resources.source.to_index_space(views[:1])[0])
        for stage, out in zip(self.stages, outs, strict=True):
            ranking = stage(context, ranking, out)
        return ranking.fit(k)

    def _views(
        self, query: Query, rotations: Sequence[int] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``(v, D)`` descriptors of the query's views, upright first, and ``(v, 1)``
        score penalties."""
        if query.id is not None:
            try:
                return self.store.vectors([query.id]), np.zeros((1, 1), np.float32)
            except ValueError:  # removed by another process since _check_id
                self._check_id(query.id)
                raise
        if query.vector is not None:
            views = np.asarray(query.vector, dtype=np.float32)
            views = views[None] if views.ndim == 1 else views
            if views.shape[1] != self.store.dim:
                raise ConfigError(
                    f"query vectors must have {self.store.dim} values (this index's "
                    f"descriptors), got shape {tuple(np.shape(query.vector))}"
                )
            default = (0,) if len(views) == 1 else self.conf.query_rotations
            angles = query.rotations or default
            if len(angles) != len(views):
                raise ConfigError(
                    f"{len(views)} query views but the index's default rotations are {angles}; "
                    "give one angle per view: Query(vector=..., rotations=...)"
                )
            return views, self._penalty(angles)
        angles = tuple(query.rotations or rotations or self.conf.query_rotations)
        views = self.extractor.extract_query(query.image, query.box, angles, self.conf.query_crops)
        return views, self._penalty(angles, len(views) - len(angles))

    def _penalty(self, angles: Sequence[int], crops: int = 0) -> np.ndarray:
        """A rotated view, or a crop, must beat the upright whole image by a margin."""
        penalty = [0.0 if a % 360 == 0 else self.conf.rotation_penalty for a in angles]
        penalty += [self.conf.crop_penalty] * crops
        return np.asarray(penalty, np.float32)[:, None]

    def _check_id(self, image_id: int) -> None:
        (record,) = self.store.get([image_id])
        if record is None:
            raise ConfigError(f"no image with id {image_id} in index {self.store.path}")
        if record.status != "ok":
            raise ConfigError(
                f"image id {image_id} ({record.path}) failed to index, so it has no descriptor "
                f"to search with: {record.error}"
            )

    # -- results ---------------------------------------------------------------------------

    def results(self, ranking: Ranking) -> list[list[Hit]]:
        """Join an ``(n, k)`` ranking to paths and metadata (``-1`` entries dropped)."""
        flat = sorted({int(i) for i in ranking.ids.ravel() if i >= 0})
        records = {i: r for i, r in zip(flat, self.store.get(flat), strict=True) if r is not None}
        inliers = ranking.inliers
        out = []
        for row in range(ranking.ids.shape[0]):
            hits = []
            for col, (s, i) in enumerate(zip(ranking.scores[row], ranking.ids[row], strict=True)):
                rec = records.get(int(i))
                if rec is None:
                    continue
                n = None if inliers is None or inliers[row, col] < 0 else int(inliers[row, col])
                hits.append(Hit(len(hits) + 1, rec.id, rec.path, float(s), rec.metadata, n))
            out.append(hits)
        return out

    def answer(
        self,
        queries: Sequence[QueryLike],
        k: int = 10,
        rotations: Sequence[int] | None = None,
        progress: Progress | None = None,
        errors: str = "raise",
    ) -> list[Answer]:
        """:meth:`search` joined to the records: what ``lookalike search`` prints.

        Args:
            errors: ``"raise"``: a query that fails raises its error; ``"report"``: its
                :class:`Answer` carries the error (``ImageError`` for an unreadable image,
                ``ConfigError`` for an unknown id or a bad vector) and no hits, and the
                other queries are answered. Errors of the index itself always raise.
        """
        if errors not in ERRORS:
            raise ConfigError(f"errors must be one of {', '.join(ERRORS)}, got {errors!r}")
        items = _queries(queries)
        rows, k_all = self._rows(items, k, rotations, progress, report=errors == "report")
        good = [r for r in rows if isinstance(r, Ranking)]
        hits = iter(self.results(Ranking.stack(good, k_all)))
        answers = []
        for q, row in zip(items, rows, strict=True):
            failed = isinstance(row, LookalikeError)
            answers.append(
                Answer(self._label(q), [] if failed else next(hits), row if failed else None)
            )
        return answers

    def _label(self, query: Query) -> str:
        """How an answer names its query: an indexed image by its path."""
        if query.id is not None and query.name is None:
            (record,) = self.store.get([query.id])
            if record is not None:
                return record.path
        return query.label


class _LazyExtractor:
    """The query extractor of a searcher and its siblings: made on first use, its weights
    checked against the index's recorded hash once."""

    def __init__(self, store: IndexStore, conf: ExtractConf, extractor: Extractor | None) -> None:
        self._store = store
        self._conf = conf
        self._extractor = extractor
        self._checked = False
        self._lock = threading.Lock()

    def get(self) -> Extractor:
        with self._lock:
            if self._extractor is None:
                self._extractor = Extractor(self._conf)
            if not self._checked:
                backbone = getattr(self._extractor, "backbone", None)
                if backbone is not None:
                    self._store.check_weights(backbone.weights_id)
                self._checked = True
            return self._extractor


def _resolve_auto(
    store: IndexStore,
    conf: ExtractConf,
    rerank: Sequence[str] | str,
    crops: Sequence[float] | None,
) -> tuple[list[str], ExtractConf]:
    """``(stage names, query settings)`` for a ``rerank`` list or ``"auto"``
    (:func:`auto_settings` from the index's size and recorded crops; ``crops`` given
    explicitly win)."""
    if isinstance(rerank, str):
        if rerank != AUTO:
            raise ConfigError(f"rerank must be a list of stage names or 'auto', got {rerank!r}")
        rerank, auto_crops = auto_settings(len(store), store.manifest.query.crops)
        crops = auto_crops if crops is None else crops
        logger.info("small-gallery default for %s: stages %s, crops %s", store.path, rerank, crops)
    if crops is not None:
        conf = conf.replace(query_crops=tuple(float(c) for c in crops))
    return list(rerank), conf


def _queries(queries: Sequence[QueryLike]) -> list[Query]:
    """A batch of queries as :class:`Query` objects; one query given alone is refused (a
    path would be read as its characters, a vector as its numbers)."""
    single = (str, Path, bytes, bytearray, Query, Image.Image)
    if isinstance(queries, single) or (isinstance(queries, np.ndarray) and queries.ndim != 2):
        raise ConfigError(
            "search takes a list of queries (or an (n, D) array of vectors); wrap one query "
            "in a list"
        )
    return [Query.of(q) for q in queries]


def _device(verify: VerifyConf | dict | None, device: str) -> VerifyConf | dict | None:
    """Verification settings with the search's device, unless they name their own."""
    if device == "auto" or isinstance(verify, VerifyConf):
        return verify
    return {"device": device, **(verify or {})}


def search(
    index_dir: str | Path,
    queries: Sequence[QueryLike],
    k: int = 10,
    *,
    rerank: Sequence[str] | str = AUTO,
    verify: VerifyConf | dict | None = None,
    rotations: Sequence[int] | None = None,
    device: str = "auto",
    progress: Progress | None = None,
    errors: str = "raise",
) -> list[Answer]:
    """``lookalike search`` in one call: open, search, join, close (``rerank`` as in
    :meth:`Searcher.open`, by default the small-gallery default; ``errors`` as in
    :meth:`Searcher.answer`)."""
    with Searcher.open(index_dir, rerank, verify, device=device) as searcher:
        return searcher.answer(queries, k, rotations, progress, errors)
