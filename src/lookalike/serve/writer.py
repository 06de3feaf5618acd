"""The service's one writer: uploads, deletions and metadata changes, batched, durable.

While the service runs it is the index's only writer: :class:`Writer` takes the index's
writer lock when the service starts and keeps it until it stops, so a ``lookalike index``
on the same index is refused with the lock message naming the server's pid. Requests hand
their change to :meth:`Writer.add`, :meth:`Writer.remove` or :meth:`Writer.set_metadata` and
wait for its future; one thread takes the changes queued meanwhile (at most
:data:`BATCH_MAX`) and commits them together: the uploads of a batch are described in one
model batch and added in one transaction (:func:`lookalike.indexing.index_into`), then the
stored DBA, the local features and ASMK follow, as after ``lookalike index``. A future is
resolved only after its commit, so an acknowledged write survives a SIGKILL: the uploaded
file is fsynced before the commit that records it, and every commit is durable
(``synchronous=FULL``; the vectors are fsynced before the commit that references them).

Searches never wait for the writer: they go through the service's read-only store, which
reads committed snapshots and takes up each commit at its next search
(:mod:`lookalike.index.freshness`), as it would another process's.

Uploaded files are kept inside the index directory, content-addressed
(``uploads/<2 hex>/<content hash>.<format>``), so the same bytes are one file and one image:
a second upload of them answers the existing id. A name there is made from the hash and the
sniffed format only, never from anything the request says.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from lookalike.errors import ImageError, IndexStateError, LookalikeError
from lookalike.images import file_hash
from lookalike.index import IndexStore
from lookalike.labels import LABEL_KEY
from lookalike.storage import atomic_write_bytes, fsync_dir

logger = logging.getLogger(__name__)

UPLOADS_DIR = "uploads"  # inside the index directory
BATCH_MAX = 32  # changes committed together at most
CHECKPOINT_OPS = 2_000  # changes between faiss checkpoints (bounds the replay on restart)


@dataclasses.dataclass(frozen=True)
class Added:
    """What :meth:`Writer.add` answers."""

    id: int
    created: bool  # False: the same content was already in the index (its id)


@dataclasses.dataclass
class _Change:
    kind: str  # "add", "remove", "metadata"
    future: concurrent.futures.Future
    data: bytes = b""
    fmt: str = ""  # sniffed format of an upload ("jpeg", "png", ...)
    metadata: dict | None = None
    image_id: int = -1


class Writer:
    """The index open for writing, and the thread that commits every change to it.

    Args:
        index_dir: the index (its writer lock is taken now: ``IndexLockedError`` if another
            process writes it).
        extractor: a callable returning the descriptor extractor of the index's settings
            (the service shares its query model).
    """

    def __init__(self, index_dir: str | Path, extractor: Callable[[], object]) -> None:
        self.store = IndexStore.open(index_dir, writable=True)
        self.root = self.store.path.resolve()
        self._extractor = extractor
        self._queue: queue.Queue[_Change | None] = queue.Queue()
        self._since_checkpoint = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lookalike-writer", daemon=True)
        self._thread.start()

    # -- what requests call ------------------------------------------------------------------

    def add(self, data: bytes, fmt: str, metadata: dict | None = None) -> concurrent.futures.Future:
        """Queue an upload (bytes already sniffed as an image of format ``fmt``); the future
        gives :class:`Added` once committed, or raises ``ImageError`` (it could not be
        described) or the ``LookalikeError`` that stopped the commit (a full disk)."""
        return self._put(_Change("add", self._future(), data=data, fmt=fmt, metadata=metadata))

    def remove(self, image_id: int) -> concurrent.futures.Future:
        """Queue a deletion; the future gives whether the image existed."""
        return self._put(_Change("remove", self._future(), image_id=int(image_id)))

    def set_metadata(self, image_id: int, metadata: dict) -> concurrent.futures.Future:
        """Queue a metadata replacement; the future gives whether the image existed."""
        change = _Change("metadata", self._future(), metadata=metadata, image_id=int(image_id))
        return self._put(change)

    @property
    def pending(self) -> int:
        """Changes queued and not yet taken by the writer thread."""
        return self._queue.qsize()

    def close(self) -> None:
        """Commit what is queued, checkpoint, release the writer lock."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        try:
            if self._since_checkpoint:
                self.store.checkpoint()
        finally:
            self.store.close()

    def upload_path(self, content_hash: str, fmt: str) -> Path:
        """Where the upload with this content hash is kept."""
        return self.root / UPLOADS_DIR / content_hash[:2] / f"{content_hash}.{fmt}"

    # -- the writer thread -------------------------------------------------------------------

    @staticmethod
    def _future() -> concurrent.futures.Future:
        return concurrent.futures.Future()

    def _put(self, change: _Change) -> concurrent.futures.Future:
        if self._closed:
            raise LookalikeError("the service is shutting down; retry on the next start")
        self._queue.put(change)
        return change.future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            while len(batch) < BATCH_MAX:
                try:
                    change = self._queue.get_nowait()
                except queue.Empty:
                    break
                if change is None:
                    stop = True
                    break
                batch.append(change)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Change]) -> None:
        """Commit a batch, runs of one kind at a time in arrival order; every future ends
        resolved (an unexpected error fails the changes of its run, not the thread)."""
        start = 0
        while start < len(batch):
            end = start
            while end < len(batch) and batch[end].kind == batch[start].kind:
                end += 1
            run = batch[start:end]
            try:
                {"add": self._add, "remove": self._remove, "metadata": self._metadata}[run[0].kind](
                    run
                )
            except Exception as error:  # the requests get it; the writer goes on
                logger.exception("committing %d %s changes failed", len(run), run[0].kind)
                for change in run:
                    if not change.future.done():
                        change.future.set_exception(error)
            start = end
        self._since_checkpoint += len(batch)
        if self._since_checkpoint >= CHECKPOINT_OPS:
            with contextlib.suppress(LookalikeError):
                self.store.checkpoint()
                self._since_checkpoint = 0

    def _add(self, run: list[_Change]) -> None:
        from lookalike.indexing import index_into

        paths: dict[Path, list[_Change]] = {}
        for change in run:
            path = self.upload_path(file_hash(change.data), change.fmt)
            record = self.store.find_path(str(path))
            if record is not None and record.status == "ok":
                change.future.set_result(Added(record.id, created=False))
            else:
                paths.setdefault(path, []).append(change)
        if not paths:
            return
        for path, changes in paths.items():
            self._keep(path, changes[0].data)
        metadata = {str(p): dict(changes[0].metadata or {}) for p, changes in paths.items()}
        report = index_into(
            self.store,
            list(paths),
            self._extractor(),
            metadata=lambda path: metadata[str(path)],
            checkpoint=False,
        )
        failed = []
        for path, changes in paths.items():
            record = self.store.find_path(str(path))
            if record is None or record.status != "ok":
                error = ImageError(
                    "the image could not be described: "
                    + (record.error if record is not None and record.error else "unknown error")
                )
                for change in changes:
                    change.future.set_exception(error)
                if record is not None:
                    failed.append(record.id)
                continue
            for n, change in enumerate(changes):  # the same bytes twice in one batch
                change.future.set_result(Added(record.id, created=n == 0))
        if failed:  # a failed upload leaves nothing behind
            self.store.remove(failed)
        logger.info("committed %d uploads (%d failed)", report.added, len(failed))

    def _keep(self, path: Path, data: bytes) -> None:
        """Store an upload durably at its content address (kept if already there)."""
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                if file_hash(path.read_bytes()) == path.stem:
                    return
        for folder in (path.parent.parent, path.parent):  # uploads/, uploads/ab/
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise IndexStateError(f"{folder} is not a directory of this index; remove it")
            if not folder.exists():
                folder.mkdir()
                fsync_dir(folder.parent)
        atomic_write_bytes(path, data)

    def _remove(self, run: list[_Change]) -> None:
        from lookalike.indexing.edit import sync_derived

        ids = [change.image_id for change in run]
        records = {r.id: r for r in self.store.get(ids) if r is not None}
        if records:
            self.store.remove(list(records))
            sync_derived(self.store)
        for change in run:
            change.future.set_result(change.image_id in records)
        uploads = self.root / UPLOADS_DIR
        for record in records.values():  # after the commit: a kill leaves a file, no image
            path = Path(record.fs_path)
            if path.is_relative_to(uploads) and self.store.find_path(record.fs_path) is None:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _metadata(self, run: list[_Change]) -> None:
        for change in run:
            (record,) = self.store.get([change.image_id])
            if record is None:
                change.future.set_result(False)
                continue
            metadata = dict(change.metadata or {})
            if LABEL_KEY not in metadata and LABEL_KEY in record.metadata:
                metadata[LABEL_KEY] = record.metadata[LABEL_KEY]
            self.store.set_metadata(change.image_id, metadata)
            change.future.set_result(True)
