"""The writing half of :class:`~lookalike.index.store.IndexStore`.

Every change to the image set is one SQLite transaction that also appends to the ``ops``
log; the in-memory view of the writer (its vector backend) catches up with its own commits
lazily, through the same replay readers use. Checkpoints, whitening changes and compaction
replace files atomically in an order that keeps every intermediate state loadable (see each
method). The rows a transaction appends are digested by blocks in that same transaction
(:mod:`lookalike.index.vectors`); every file the manifest names gets its digest recorded
when it is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lookalike.confined import check_entry, file_digest
from lookalike.errors import ConfigError
from lookalike.index.backends import (
    checkpoint_name,
    is_checkpoint_name,
    keeps_fields,
    validate_conf,
)
from lookalike.index.conf import IndexConf, NewImage, fs_bytes
from lookalike.index.loader import WHITENING_NAME, Loader, View, load_whitening, save_whitening
from lookalike.index.manifest import CheckpointRef, Manifest, WhiteningState, now_iso
from lookalike.index.metadata import MetaDB
from lookalike.index.upgrade import migrate_schema
from lookalike.index.vectors import (
    append_digests,
    check_vectors,
    is_vectors_name,
    vectors_name,
)
from lookalike.storage import (
    TMP_SUFFIX,
    remove_durably,
    remove_leftovers,
    switch_data_file,
)

if TYPE_CHECKING:
    from lookalike.whitening import Whitening

logger = logging.getLogger(__name__)


class WriterMixin:
    """Add, update, remove, whiten, checkpoint and compact; needs the writer lock."""

    path: Path
    dim: int
    conf: IndexConf
    _manifest: Manifest
    _db: MetaDB
    _loader: Loader
    _view: View | None
    _stale: bool
    _mutex: threading.RLock
    _block_state: tuple[str, int, object] | None  # (vector file, rows, hash of its last block)

    def _require_writable(self) -> None:  # defined by IndexStore
        raise NotImplementedError

    def _current_view(self) -> View:
        raise NotImplementedError

    def update_manifest(self, **changes: object) -> Manifest:
        raise NotImplementedError

    # -- the image set ---------------------------------------------------------------------

    def add(
        self, images: Sequence[NewImage], vectors: np.ndarray, ids: Sequence[int] | None = None
    ) -> list[int]:
        """Add or update a batch of images in one atomic transaction.

        Args:
            images: the files; a path already stored is an update (same id, new vector,
                every field replaced, user metadata included). Images with ``error`` set
                are stored with status ``'error'`` and lose any previous vector.
            vectors: ``(n_ok, D)`` float32 raw descriptors of the images whose ``error`` is
                None, in order (may be empty when there are none).
            ids: the id each image takes (a copy of another index keeps its ids); None:
                new images get the next free ids. Only for paths not stored yet, and ids
                no image has.

        Returns:
            The image ids, in input order.

        Raises:
            ValueError: wrong vector shape/dtype, duplicate paths, bad metadata.
        """
        self._require_writable()
        images = list(images)
        for image in images:
            if not isinstance(image, NewImage) or not isinstance(image.path, str) or not image.path:
                raise ValueError(f"add() takes NewImage records with a path, got {image!r}")
            fs_bytes(image.path)  # ValueError for text no file name decodes to
        n_ok = sum(image.error is None for image in images)
        if n_ok == 0 and (vectors is None or np.asarray(vectors).size == 0):
            vectors = np.empty((0, self.dim), dtype=np.float32)
        else:
            vectors = check_vectors(vectors, self.dim, "vectors", rows=n_ok)
        if not images:
            return []
        paths = [image.path for image in images]
        if len(set(paths)) != len(paths):
            dup = next(p for p in paths if paths.count(p) > 1)
            raise ValueError(f"path {dup!r} appears twice in one add() batch; pass it once")
        if ids is not None and len(ids) != len(images):
            raise ValueError(f"add() got {len(ids)} ids for {len(images)} images")
        state = None
        with self._mutex, self._db.write():
            existing = self._db.lookup_paths(paths)
            if ids is not None:
                taken = set(self._db.get([int(i) for i in ids]))
                if existing or taken:
                    raise ValueError(
                        "add(ids=...) takes only new paths and free ids; "
                        f"{len(existing)} paths are stored, ids {sorted(taken)[:5]} are taken"
                    )
            n_rows = self._db.kv_int("n_rows")
            if n_ok:  # durable before the commit that references the rows
                vector_file = self._loader.vector_file()[0]
                blocks, state = append_digests(
                    vector_file, n_rows, vectors, self._db.block_rows(), self._db.block,
                    getattr(self, "_block_state", None),
                )  # fmt: skip
                vector_file.append(vectors, n_rows)
                self._db.set_blocks(blocks)
            stamp = now_iso()
            for path in paths:  # all removes first: replay then needs two faiss calls
                image_id, slot = existing.get(path, (None, None))
                if image_id is not None and slot is not None:
                    self._db.log_op("remove", image_id, slot)
            given, out, slot = ids, [], n_rows
            for i, image in enumerate(images):
                image_id = existing.get(image.path, (None, None))[0]
                new_id = None if given is None else int(given[i])
                if image.error is None:
                    image_id = self._db.upsert_image(image_id, image, slot, 0, stamp, new_id)
                    self._db.set_row_seq(image_id, self._db.log_op("add", image_id, slot))
                    slot += 1
                else:
                    seq = self._db.last_seq()
                    image_id = self._db.upsert_image(image_id, image, None, seq, stamp, new_id)
                out.append(image_id)
            self._db.kv_set("n_rows", slot)
        if n_ok:
            self._block_state = state
        self._stale = True
        return out

    def remove(self, ids: Sequence[int]) -> int:
        """Delete images by id (unknown ids are ignored); returns how many were deleted."""
        self._require_writable()
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return 0
        with self._mutex, self._db.write():
            gone = self._db.delete_images(wanted)
            for image_id, slot in gone:
                if slot is not None:
                    self._db.log_op("remove", image_id, slot)
        self._stale = self._stale or bool(gone)
        return len(gone)

    def remove_paths(self, paths: Sequence[str]) -> int:
        """Delete images by stored path (unknown paths are ignored); returns how many."""
        self._require_writable()
        with self._mutex:
            found = self._db.lookup_paths([str(p) for p in paths], display=True)
            return self.remove([image_id for image_id, _ in found.values()])

    def mark_for_redescription(self, ids: Sequence[int], reason: str) -> int:
        """Take ``'ok'`` images out of the searchable set, kept as ``'error'`` records with
        ``reason`` and no size or mtime, so that the next indexing run describes their files
        again (their ids and metadata are kept); returns how many."""
        self._require_writable()
        wanted = sorted({int(i) for i in ids})
        with self._mutex, self._db.write():
            found = self._db.slots_of(wanted)
            live = [i for i in wanted if i in found and found[i][1] is not None]
            for image_id in live:
                self._db.log_op("remove", image_id, found[image_id][1])
            self._db.mark_for_redescription(live, reason, self._db.last_seq(), now_iso())
        self._stale = self._stale or bool(live)
        return len(live)

    def rebuild_checkpoint(self) -> None:
        """Rebuild the backend from the vectors and write a fresh checkpoint."""
        self._require_writable()
        with self._mutex:
            view = self._current_view()
            view.backend, view.seq = self._loader.rebuild(view.whitening)
            self._write_checkpoint(force=True)

    def set_metadata(self, id: int, metadata: dict) -> None:
        """Replace the user metadata of image ``id``.

        A backend that stores the labels beside the vectors (:func:`keeps_fields`) learns a
        changed label through the op log, as a removal and an add of the same vector, so
        that it follows like any other change (and a crash before it does is replayed).

        Raises:
            ValueError: unknown id, or metadata that is not a JSON-serialisable dict.
        """
        self._require_writable()
        if not isinstance(metadata, dict):
            raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
        try:
            text = json.dumps(metadata, ensure_ascii=False, sort_keys=True)
        except (TypeError, ValueError) as error:
            raise ValueError(f"metadata is not JSON-serialisable: {error}") from None
        relabel = False
        with self._mutex, self._db.write():
            if keeps_fields(self.conf):
                from lookalike.labels import label_of  # imports the index package

                before = self._db.get([int(id)]).get(int(id))
                slot = self._db.slots_of([int(id)]).get(int(id), ("", None))[1]
                relabel = (
                    before is not None
                    and slot is not None
                    and label_of(before.metadata) != label_of(metadata)
                )
            found = self._db.set_metadata(int(id), text, now_iso())
            if relabel:
                self._db.log_op("remove", int(id), slot)
                self._db.log_op("add", int(id), slot)
        if not found:
            raise ValueError(f"no image with id {id} in index {self.path}")
        self._stale = self._stale or relabel

    # -- vector backend state ----------------------------------------------------------------

    def checkpoint(self) -> None:
        """Save the vector backend so readers need not replay the ops up to now.

        Trains the configured structure first when it is still the exact stand-in and the
        collection has grown to its ``train_size``, and rebuilds one that ``wants_rebuild``
        (a quarter of a tombstoned structure dead). Writes ``<backend>-<seq>.index``
        atomically, then the manifest naming it, then deletes the older checkpoints.
        """
        self._require_writable()
        with self._mutex:
            view = self._current_view()
            backend, rebuild = view.backend, False
            if not backend.trained:
                rebuild = len(backend) >= backend.train_size
            elif backend.wants_rebuild():
                logger.info("%s: rebuilding to drop removed vectors", backend.stats())
                rebuild = True
            if rebuild:
                view.backend, view.seq = self._loader.rebuild(view.whitening)
            self._write_checkpoint(force=rebuild)

    def _write_checkpoint(self, force: bool) -> None:
        view = self._view
        if view is None:
            return
        current = self._manifest.checkpoint
        if not force and view.from_checkpoint and current.file and current.seq == view.seq:
            return
        name = checkpoint_name(self.conf, view.seq)
        sha = view.backend.save(self.path / name)
        self.update_manifest(
            checkpoint=CheckpointRef(name, view.seq, not view.backend.trained, sha)
        )
        view.from_checkpoint = True
        remove_durably(
            [p for p in self.path.iterdir() if is_checkpoint_name(p.name) and p.name != name]
        )
        logger.info("checkpoint %s: %d vectors", name, len(view.backend))

    def set_whitening(self, whitening: Whitening | None) -> None:
        """Store (or, with None, drop) the whitening and rebuild the backend in the new space.

        Order, so that a reader never combines a whitening with a checkpoint built under
        another, nor labels one whitening with the epoch of another: the manifest first
        (``whitening.epoch`` to the next odd number, no checkpoint), then ``whitening.npz``,
        then the manifest again (the next even epoch and the file's digest: a reader that
        loaded in between, with either file, reloads), then the rebuild and a fresh
        checkpoint.

        Raises:
            ConfigError: its input dimension is not ``D``, or the factory rejects its output.
        """
        self._require_writable()
        if whitening is not None:
            if whitening.dim_in != self.dim:
                raise ConfigError(
                    f"the whitening takes {whitening.dim_in}-d descriptors but index {self.path} "
                    f"holds {self.dim}-d ones; learn it from this index's vectors"
                )
            validate_conf(self.conf, whitening.dim_out)
        with self._mutex:
            old = self._manifest.whitening
            mid = old.epoch + 1 if old.epoch % 2 == 0 else old.epoch + 2
            self.update_manifest(
                whitening=WhiteningState(old.learned, old.dim_out, mid, old.sha),
                checkpoint=CheckpointRef(),
            )
            path = self.path / WHITENING_NAME
            sha = None
            if whitening is None:
                check_entry(path)
                remove_durably([path])
            else:
                sha = save_whitening(path, whitening)
            epoch = mid + 1
            dim_out = None if whitening is None else whitening.dim_out
            self.update_manifest(
                whitening=WhiteningState(whitening is not None, dim_out, epoch, sha)
            )
            remove_durably([p for p in self.path.iterdir() if is_checkpoint_name(p.name)])
            backend, seq = self._loader.rebuild(whitening)
            self._view = View(backend, whitening, seq, epoch, from_checkpoint=False)
            self._stale = False
            self._write_checkpoint(force=True)

    def compact(self) -> None:
        """Rebuild the backend without tombstones and rewrite the vector file without dead rows.

        The vector file is never rewritten in place: the live rows are copied to
        ``vectors.<seq>.f32`` (fsynced), then one transaction points every image at its new
        slot, names the new file and prunes the ops up to the fresh checkpoint; the old file
        is deleted last. Readers holding the old snapshot retry and read the new file.
        """
        self._require_writable()
        with self._mutex:
            view = self._current_view()
            backend, seq = self._loader.rebuild(view.whitening)
            self._view = View(backend, view.whitening, seq, view.epoch, from_checkpoint=False)
            self._write_checkpoint(force=True)
            with self._db.snapshot():
                ids, slots = self._db.live()
                vectors, n_rows = self._loader.vector_file()
            if n_rows == len(ids):
                return  # no dead rows
            target = self.path / vectors_name(seq)
            blocks = vectors.write_compacted(target, slots, n_rows, self._db.block_rows())

            def update(_: object) -> None:
                self._db.reassign_slots(ids, np.arange(len(ids), dtype=np.int64))
                self._db.prune_ops(seq)
                self._db.kv_set("n_rows", len(ids))
                self._db.set_blocks(blocks, replace_all=True)

            self._block_state = None
            switch_data_file(self._db, "vectors_file", target, update, is_vectors_name)
            logger.info("compacted %s: %d of %d vector rows kept", self.path, len(ids), n_rows)

    def _recover(self, strict: bool = True) -> None:
        """On opening for writing: migrate an older schema, delete crash leftovers, finish an
        interrupted whitening change and check the whitening in force.

        Args:
            strict: refuse a damaged or missing whitening (False: leave it to the caller,
                ``lookalike repair``).

        Raises:
            WhiteningDamaged: the whitening the manifest records is missing or damaged.
        """
        with self._db.snapshot():
            vectors, n_rows = self._loader.vector_file()
        migrate_schema(self._db, vectors, n_rows)
        named = self._manifest.checkpoint.file
        remove_leftovers(
            self.path,
            lambda name: (
                name.endswith(TMP_SUFFIX)
                or (is_checkpoint_name(name) and name != named)
                or (is_vectors_name(name) and name != vectors.path.name)
            ),
        )
        state = self._manifest.whitening
        path = self.path / WHITENING_NAME
        has_file = check_entry(path) is not None
        if state.changing:
            # A crash inside set_whitening() (which clears the checkpoint first): the file is
            # what readers apply, so the entry follows it.
            whitening = load_whitening(self.path, state)
            self.update_manifest(
                whitening=WhiteningState(
                    whitening is not None,
                    None if whitening is None else whitening.dim_out,
                    state.epoch + 1,
                    file_digest(path) if whitening is not None else None,
                ),
                checkpoint=CheckpointRef(),
            )
            remove_durably([p for p in self.path.iterdir() if is_checkpoint_name(p.name)])
        elif not state.learned and has_file:  # not the index's: never applied
            logger.info("removing %s, which the manifest does not record", path)
            remove_durably([path])
        elif state.learned and strict:
            load_whitening(self.path, state)  # WhiteningDamaged: refused, with the remedy
            if state.sha is None:  # an index from before digests: record it now
                self.update_manifest(whitening=dataclasses.replace(state, sha=file_digest(path)))
