"""The writing half of :class:`~lookalike.index.store.IndexStore`.

Every change to the image set is one SQLite transaction that also appends to the ``ops``
log; the in-memory view of the writer (its vector backend) catches up with its own commits
lazily, through the same replay readers use. Checkpoints, whitening changes and compaction
replace files atomically in an order that keeps every intermediate state loadable (see each
method).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lookalike.errors import ConfigError
from lookalike.index.backends import checkpoint_name, is_checkpoint_name, validate_conf
from lookalike.index.conf import IndexConf, NewImage
from lookalike.index.loader import WHITENING_NAME, Loader, View, load_whitening
from lookalike.index.manifest import CheckpointRef, Manifest, WhiteningState, now_iso
from lookalike.index.metadata import MetaDB
from lookalike.index.vectors import check_vectors, is_vectors_name, vectors_name
from lookalike.storage import (
    TMP_SUFFIX,
    atomic_write,
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

    def _require_writable(self) -> None:  # defined by IndexStore
        raise NotImplementedError

    def _current_view(self) -> View:
        raise NotImplementedError

    def update_manifest(self, **changes: object) -> Manifest:
        raise NotImplementedError

    # -- the image set ---------------------------------------------------------------------

    def add(self, images: Sequence[NewImage], vectors: np.ndarray) -> list[int]:
        """Add or update a batch of images in one atomic transaction.

        Args:
            images: the files; a path already stored is an update (same id, new vector,
                every field replaced, user metadata included). Images with ``error`` set
                are stored with status ``'error'`` and lose any previous vector.
            vectors: ``(n_ok, D)`` float32 raw descriptors of the images whose ``error`` is
                None, in order (may be empty when there are none).

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
        with self._mutex, self._db.write():
            existing = self._db.lookup_paths(paths)
            n_rows = self._db.kv_int("n_rows")
            if n_ok:  # durable before the commit that references the rows
                self._loader.vector_file()[0].append(vectors, n_rows)
            stamp = now_iso()
            for path in paths:  # all removes first: replay then needs two faiss calls
                image_id, slot = existing.get(path, (None, None))
                if image_id is not None and slot is not None:
                    self._db.log_op("remove", image_id, slot)
            ids, slot = [], n_rows
            for image in images:
                image_id = existing.get(image.path, (None, None))[0]
                if image.error is None:
                    image_id = self._db.upsert_image(image_id, image, slot, 0, stamp)
                    self._db.set_row_seq(image_id, self._db.log_op("add", image_id, slot))
                    slot += 1
                else:
                    seq = self._db.last_seq()
                    image_id = self._db.upsert_image(image_id, image, None, seq, stamp)
                ids.append(image_id)
            self._db.kv_set("n_rows", slot)
        self._stale = True
        return ids

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
            found = self._db.lookup_paths([str(p) for p in paths])
            return self.remove([image_id for image_id, _ in found.values()])

    def set_metadata(self, id: int, metadata: dict) -> None:
        """Replace the user metadata of image ``id``.

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
        with self._mutex, self._db.write():
            found = self._db.set_metadata(int(id), text, now_iso())
        if not found:
            raise ValueError(f"no image with id {id} in index {self.path}")

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
        view.backend.save(self.path / name)
        self.update_manifest(checkpoint=CheckpointRef(name, view.seq, not view.backend.trained))
        view.from_checkpoint = True
        remove_durably(
            [p for p in self.path.iterdir() if is_checkpoint_name(p.name) and p.name != name]
        )
        logger.info("checkpoint %s: %d vectors", name, len(view.backend))

    def set_whitening(self, whitening: Whitening | None) -> None:
        """Store (or, with None, drop) the whitening and rebuild the backend in the new space.

        Order, so that a reader never combines a whitening with a checkpoint built under
        another, nor labels one whitening with the epoch of another: the manifest first
        (``whitening.epoch`` + 1, no checkpoint), then ``whitening.npz``, then the manifest
        again (epoch + 1 more: a reader that loaded in between, with either file, reloads),
        then the rebuild and a fresh checkpoint.

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
            self.update_manifest(
                whitening=WhiteningState(old.learned, old.dim_out, old.epoch + 1),
                checkpoint=CheckpointRef(),
            )
            path = self.path / WHITENING_NAME
            if whitening is None:
                remove_durably([path])
            else:
                atomic_write(path, whitening.save)
            epoch = old.epoch + 2
            self.update_manifest(
                whitening=WhiteningState(
                    whitening is not None, None if whitening is None else whitening.dim_out, epoch
                )
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
            vectors.write_compacted(target, slots, n_rows)

            def update(_: object) -> None:
                self._db.reassign_slots(ids, np.arange(len(ids), dtype=np.int64))
                self._db.prune_ops(seq)
                self._db.kv_set("n_rows", len(ids))

            switch_data_file(self._db, "vectors_file", target, update)
            logger.info("compacted %s: %d of %d vector rows kept", self.path, len(ids), n_rows)

    def _recover(self) -> None:
        """On opening for writing: delete crash leftovers, reconcile the whitening entry."""
        with self._db.snapshot():
            current_vectors = self._loader.vector_file()[0].path.name
        named = self._manifest.checkpoint.file
        remove_leftovers(
            self.path,
            lambda name: (
                name.endswith(TMP_SUFFIX)
                or (is_checkpoint_name(name) and name != named)
                or (is_vectors_name(name) and name != current_vectors)
            ),
        )
        # A crash inside set_whitening() (which clears the checkpoint first) can leave the
        # manifest entry and the file disagreeing; the file is what readers apply, so the
        # entry follows it.
        state = self._manifest.whitening
        has_file = (self.path / WHITENING_NAME).exists()
        if state.learned != has_file or (has_file and self._manifest.checkpoint.file is None):
            whitening = load_whitening(self.path)
            dim_out = None if whitening is None else whitening.dim_out
        else:
            dim_out = state.dim_out
        if (state.learned, state.dim_out) != (has_file, dim_out):
            self.update_manifest(
                whitening=WhiteningState(has_file, dim_out, state.epoch + 2),
                checkpoint=CheckpointRef(),
            )
            remove_durably([p for p in self.path.iterdir() if is_checkpoint_name(p.name)])
