"""Index a folder: list files, decode and describe what is new or changed, commit in batches.

This is the ``index`` stage: it composes :mod:`lookalike.images`, :mod:`lookalike.extract`
and the on-disk :class:`~lookalike.index.IndexStore`. Every chunk of files is one atomic
commit, so a run killed at any moment resumes with the files it had not committed yet:
a file whose size and mtime match its record is never processed again, and the others are
chunked (and so described) as an uninterrupted run would have. The whitening is learned by
the run that completes the index, from region samples stored as the chunks commit
(:mod:`lookalike.indexing.learn`): a build killed and resumed ends with the index a build in
one go makes. Afterwards what is derived from the images follows: the stored DBA, the local
features (``local``), and, with a label source, the labels of the images already indexed
(relabelled in place).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lookalike.errors import ConfigError, LookalikeError
from lookalike.extract import ExtractConf, Extractor
from lookalike.images import IMAGE_EXTENSIONS, Decoded, list_images
from lookalike.index import ImageRecord, IndexConf, IndexStore, NewImage
from lookalike.index.conf import display_path, display_text
from lookalike.index.manifest import MANIFEST_NAME
from lookalike.indexing.edit import relabel_store
from lookalike.indexing.learn import WhiteningLearner
from lookalike.indexing.ray_engine import RayConf, check_engine, describe_files
from lookalike.labels import LabelSource
from lookalike.local.conf import VerifyConf

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (files done, files to do)

CHECKPOINT_EVERY = 10_000  # indexed files between faiss checkpoints (bounds replay on open)


@dataclass
class IndexReport:
    """What one indexing run did."""

    added: int = 0  # new files described and indexed
    updated: int = 0  # known files whose size/mtime changed, described again
    unchanged: int = 0  # known files skipped
    removed: int = 0  # vanished files removed (remove_missing=True)
    missing: int = 0  # vanished files kept in the index (remove_missing=False)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) unreadable files
    seconds: float = 0.0  # wall time of decoding + describing + committing
    whitening_learned: bool = False
    query_defaults_changed: bool = False  # the settings given recorded new query defaults
    local_described: int = 0  # images whose local features were computed (index --local)
    relabelled: int | None = None  # already indexed images whose label changed (labels=...)
    labelled: int | None = None  # labelled images in the whole index afterwards (labels=...)
    classes: int | None = None  # distinct labels in the whole index afterwards (labels=...)

    @property
    def processed(self) -> int:
        return self.added + self.updated + len(self.failed)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """The JSON form ``lookalike index --json`` prints."""
        out = dataclasses.asdict(self)
        out["failed"] = [{"path": p, "error": e} for p, e in self.failed]
        out["seconds"] = round(self.seconds, 3)
        out["images_per_second"] = round(self.images_per_second, 2)
        return out


def open_for_writing(
    index_dir: str | Path,
    conf: ExtractConf,
    index_conf: IndexConf | None,
    extractor: Extractor | None,
    local: VerifyConf | None = None,
) -> tuple[IndexStore, Extractor | None]:
    """Open (settings checked first, cheaply) or create the index.

    The model is loaded only to create a new index (its dimension is needed); for an
    existing one the returned extractor is ``extractor`` as given, possibly None, and is
    made later only if some file needs describing. A new index records ``conf``'s
    query-time settings (rotations, crops) as its search defaults and is built with ``index_conf``
    (None: :class:`IndexConf`'s defaults); an existing one is checked against it (None: any
    structure). ``local`` is checked against (and recorded as) the index's local-feature
    settings before any image is described.
    """
    index_dir = Path(index_dir)
    if extractor is not None and extractor.conf.descriptor() != conf.descriptor():
        raise ConfigError("the extractor given was made with other descriptor settings than conf")
    if (index_dir / MANIFEST_NAME).exists():
        store = IndexStore.open(index_dir, writable=True)
        try:
            store.check_compatible(conf.descriptor(), index_conf)
            if extractor is not None:
                store.check_weights(extractor.backbone.weights_id)
            _record_local(store, local)
        except BaseException:
            store.close()
            raise
        return store, extractor
    extractor = extractor or Extractor(conf)
    store = IndexStore.create(
        index_dir,
        conf.descriptor(),
        extractor.dim,
        index_conf or IndexConf(),
        exist_ok=True,
        query=conf.query_defaults(),
        weights_hash=extractor.backbone.weights_id,
    )
    try:
        _record_local(store, local)
    except BaseException:
        store.close()
        raise
    return store, extractor


def _own_settings(index_dir: str | Path, extractor: Extractor | None) -> ExtractConf:
    """The descriptor settings of a run given none: the extractor's, the index's own, or the
    default preset (:func:`lookalike.indexing.resolve_settings`)."""
    if extractor is not None:
        return extractor.conf
    from lookalike.indexing.settings import resolve_settings

    return resolve_settings(index_dir).extract


def _record_query_defaults(store: IndexStore, conf: ExtractConf) -> bool:
    """Record ``conf``'s query-time settings (rotations, crops, their penalties) as the
    index's search defaults where they differ (the descriptor is the same: they are not
    part of it); whether they did."""
    query = conf.query_defaults()
    if query == store.manifest.query:
        return False
    logger.info("recording new query defaults %s (were %s)", query, store.manifest.query)
    store.update_manifest(query=query)
    return True


def _record_local(store: IndexStore, local: VerifyConf | None) -> None:
    if local is not None:
        from lookalike.local.sync import record_conf

        record_conf(store, local)


def index_folder(
    image_dir: str | Path,
    index_dir: str | Path,
    conf: ExtractConf | None = None,
    index_conf: IndexConf | None = None,
    *,
    remove_missing: bool = False,
    labels: LabelSource | None = None,
    metadata: Callable[[Path], dict] | None = None,
    extractor: Extractor | None = None,
    progress: Progress | None = None,
    chunk: int = 32,
    local: VerifyConf | None = None,
    local_progress: Progress | None = None,
    engine: str = "local",
    ray: RayConf | None = None,
) -> IndexReport:
    """Bring the index at ``index_dir`` in sync with the images under ``image_dir``
    (``lookalike index`` in one call).

    Args:
        image_dir: folder scanned recursively for images.
        index_dir: index directory; created on first use.
        conf: descriptor settings; an existing index built with others is refused. None:
            the index's own for an existing index (as ``lookalike index`` without options),
            the ``default`` preset for a new one. Its query-time settings (rotations, crops,
            penalties) become the index's search defaults (``query_defaults_changed``).
        index_conf: vector backend and structure of a new index (None: the default, exact
            faiss); an existing index built with another is refused (None: its own).
        remove_missing: drop indexed files under ``image_dir`` that no longer exist.
        labels: labels for recognition (:mod:`lookalike.labels`): new and changed files get
            theirs as they are described, and the images of the folder that were already
            indexed are relabelled in place (images of other folders keep theirs).
        metadata: user metadata per file (stored as JSON); default ``labels``.
        extractor: a ready extractor for ``conf`` (saves loading the model twice).
        progress: called after each committed chunk.
        chunk: files per atomic commit.
        local: also store local features for verification (``index --local``); recorded in
            the index, whose later runs keep them current without it. An index that has
            them must be given the same feature settings (or None).
        local_progress: called as local features are computed (after the global pass).
        engine: what decodes and describes the files: ``"local"`` (this process and its
            decoding workers) or ``"ray"`` (Ray Data actors, :mod:`lookalike.indexing.ray_engine`;
            the index is committed here all the same, and comes out the same).
        ray: the Ray engine's settings (None: :class:`RayConf`'s defaults); engine "ray" only.
    """
    ray = check_engine(engine, ray)
    root = Path(image_dir).expanduser().resolve()
    files = list_images(root)
    if not files:
        raise LookalikeError(
            f"no images in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    given = conf is not None
    conf = conf if conf is not None else _own_settings(index_dir, extractor)
    store, extractor = open_for_writing(index_dir, conf, index_conf, extractor, local)
    try:
        changed = given and _record_query_defaults(store, conf)
        report = _sync(
            store, conf, extractor, root, files, remove_missing, metadata or labels, progress,
            chunk, local_progress, ray=ray,
        )  # fmt: skip
        report.query_defaults_changed = changed
        if labels is not None:
            report.relabelled, report.labelled, report.classes = relabel_store(store, root, labels)
        return report
    finally:
        store.close()


def index_files(
    paths: Sequence[str | Path],
    index_dir: str | Path,
    conf: ExtractConf | None = None,
    index_conf: IndexConf | None = None,
    *,
    metadata: Callable[[Path], dict] | None = None,
    extractor: Extractor | None = None,
    progress: Progress | None = None,
    chunk: int = 32,
    local: VerifyConf | None = None,
    local_progress: Progress | None = None,
    engine: str = "local",
    ray: RayConf | None = None,
) -> IndexReport:
    """Bring the index at ``index_dir`` in sync with exactly these image files.

    Like :func:`index_folder` for an explicit list (a benchmark's database, say): new and
    changed files are described, unchanged ones skipped; files already indexed but not
    listed are left alone. Paths are resolved to absolute ones and duplicates dropped; a
    missing or unreadable file is recorded as failed. ``index_conf``, ``local``,
    ``local_progress``, ``engine`` and ``ray`` as for :func:`index_folder`.

    Raises:
        LookalikeError: ``paths`` is empty.
    """
    ray = check_engine(engine, ray)
    files = list(dict.fromkeys(Path(p).expanduser().resolve() for p in paths))
    if not files:
        raise LookalikeError("no image files given to index")
    given = conf is not None
    conf = conf if conf is not None else _own_settings(index_dir, extractor)
    store, extractor = open_for_writing(index_dir, conf, index_conf, extractor, local)
    try:
        changed = given and _record_query_defaults(store, conf)
        report = _sync(
            store, conf, extractor, None, files, False, metadata, progress, chunk, local_progress,
            ray=ray,
        )  # fmt: skip
        report.query_defaults_changed = changed
        return report
    finally:
        store.close()


def index_into(
    store: IndexStore,
    paths: Sequence[str | Path],
    extractor: Extractor,
    *,
    metadata: Callable[[Path], dict] | None = None,
    checkpoint: bool = True,
) -> IndexReport:
    """:func:`index_files` for an index already open for writing, with the extractor of its
    settings: what the service's writer runs for each batch of uploads (it holds the store,
    and the writer lock, for its whole life). ``checkpoint=False`` leaves the new ops to be
    replayed from the log instead of saving the vector backend after every batch.

    Raises:
        LookalikeError: ``paths`` is empty; IndexStateError: the extractor describes
            otherwise than the index.
    """
    files = list(dict.fromkeys(Path(p).expanduser().resolve() for p in paths))
    if not files:
        raise LookalikeError("no image files given to index")
    store.check_compatible(extractor.conf.descriptor())
    return _sync(
        store, extractor.conf, extractor, None, files, False, metadata, None, 32,
        checkpoint=checkpoint,
    )  # fmt: skip


def _sync(
    store: IndexStore,
    conf: ExtractConf,
    extractor: Extractor | None,
    root: Path | None,
    files: list[Path],
    remove_missing: bool,
    metadata: Callable[[Path], dict] | None,
    progress: Progress | None,
    chunk: int,
    local_progress: Progress | None = None,
    *,
    checkpoint: bool = True,
    ray: RayConf | None = None,
) -> IndexReport:
    """Index ``files``; with a ``root``, indexed files under it that are not listed vanished.

    Then bring what is derived from the vectors and images up to date: a stored DBA and the
    local features (``--local``). ``checkpoint``: save the vector backend at the end.
    ``ray``: describe on Ray with these settings (None: the local engine)."""
    report = IndexReport()
    known = {r.fs_path: r for r in store.records()}  # as the file system names them
    # Files that failed before are retried in chunks of their own, first: the others are
    # then chunked as an uninterrupted run would have chunked them (a resumed run restarts at
    # the first uncommitted file), so each is described in the same batch as in a clean build.
    retry: list[Path] = []
    todo: list[Path] = []
    for path in files:
        rec = known.get(str(path))
        try:
            st = path.stat()
            same = rec is not None and (rec.size, rec.mtime) == (st.st_size, st.st_mtime)
        except OSError:  # gone or unreadable: decoding records the reason as a failure
            same = False
        if same:
            report.unchanged += 1
        elif rec is not None and rec.status == "error":
            retry.append(path)
        else:
            todo.append(path)
    if root is not None:
        present = {str(p) for p in files}
        vanished = [p for p in known if _is_under(p, root) and p not in present]
        if remove_missing:
            report.removed = store.remove_paths(vanished)
        else:
            report.missing = len(vanished)
    logger.info(
        "%d files to describe, %d to retry, %d unchanged, %d vanished",
        len(todo),
        len(retry),
        report.unchanged,
        report.removed + report.missing,
    )
    learner = WhiteningLearner.open(store, conf)
    try:
        _describe(store, conf, extractor, retry + todo, len(retry), learner, known, metadata,
                  progress, chunk, report, ray=ray)  # fmt: skip
        if learner is not None:
            report.whitening_learned = learner.finish()
    finally:
        if learner is not None:
            learner.close()
    if checkpoint and not report.whitening_learned:
        store.checkpoint()
    _update_dba(store)
    report.local_described = _sync_local(store, local_progress)
    _update_asmk(store)
    return report


def _describe(
    store: IndexStore,
    conf: ExtractConf,
    extractor: Extractor | None,
    todo: list[Path],
    retried: int,
    learner: WhiteningLearner | None,
    known: dict[str, ImageRecord],
    metadata: Callable[[Path], dict] | None,
    progress: Progress | None,
    chunk: int,
    report: IndexReport,
    ids: dict[str, int] | None = None,
    *,
    ray: RayConf | None = None,
) -> None:
    """Describe and commit ``todo`` chunk by chunk (the first ``retried`` files in chunks of
    their own), each chunk's region samples committed before the chunk (``learner``);
    ``ids``: the id each new file takes (by path), as a copy of another index needs.
    ``ray``: the chunks are described by Ray actors with these settings, not ``extractor``
    (:func:`lookalike.indexing.ray_engine.describe_files`: the same chunks, in order)."""
    if todo and extractor is None and ray is None:
        extractor = Extractor(conf)
        store.check_weights(extractor.backbone.weights_id)
    want_regions = learner is not None and learner.wants_regions
    done, start = 0, time.perf_counter()
    committed = sum(store.count().values())
    if progress:
        progress(0, len(todo))
    if ray is not None:
        parts = (todo[:retried], todo[retried:])
        batches = describe_files(conf, parts, want_regions, chunk, ray, store.check_weights)
    else:
        batches = itertools.chain.from_iterable(
            extractor.extract_files(part, want_regions=want_regions, chunk=chunk)
            for part in (todo[:retried], todo[retried:])
            if part and extractor is not None
        )
    for decoded, desc in batches:
        images = []
        for d in decoded:
            images.append(
                NewImage(
                    path=d.path,
                    content_hash=d.content_hash,
                    size=d.size,
                    mtime=d.mtime,
                    width=d.width,
                    height=d.height,
                    metadata=_metadata_for(d, metadata, known.get(d.path)),
                    error=d.error,
                )
            )
            if d.error is not None:
                report.failed.append((display_path(d.path), display_text(d.error)))
            elif d.path in known:
                report.updated += 1
            else:
                report.added += 1
        if learner is not None and desc.regions is not None:
            learner.add(decoded, desc.regions)  # committed first: no image without samples
        store.add(images, desc.global_, None if ids is None else [ids[i.path] for i in images])
        done += len(decoded)
        before, committed = committed, sum(store.count().values())
        if before // CHECKPOINT_EVERY != committed // CHECKPOINT_EVERY:
            # at fixed sizes of the collection: a resumed build checkpoints (and trains its
            # structure) where an uninterrupted one does
            store.checkpoint()
        if progress:
            progress(done, len(todo))
    report.seconds = time.perf_counter() - start


def _update_dba(store: IndexStore) -> None:
    """Bring a stored database-side augmentation up to date with this run's changes."""
    from lookalike.rerank.dba_stage import sync_dba

    sync_dba(store)


def _update_asmk(store: IndexStore) -> None:
    """Bring a stored ASMK inverted file up to date (after the local features)."""
    from lookalike.rerank.asmk_stage import sync_asmk

    sync_asmk(store)


def _sync_local(store: IndexStore, progress: Progress | None) -> int:
    """Bring the local features (recorded by ``--local``) up to date with the images."""
    from lookalike.local.sync import sync_local

    return sync_local(store, progress=progress)


def _metadata_for(
    decoded: Decoded, metadata: Callable[[Path], dict] | None, known: ImageRecord | None
) -> dict:
    """The user metadata to store: from the source when given, else what the file had."""
    if metadata is not None and decoded.error is None:
        return metadata(Path(decoded.path))
    return dict(known.metadata) if known is not None else {}


def _is_under(path: str, root: Path) -> bool:
    return Path(path).is_relative_to(root)
