"""Bringing the in-memory vector backend up to date with what SQLite says.

A *view* is a vector backend (:mod:`lookalike.index.backends`) plus the whitening it was
built with and the last op it reflects. Loading reads the manifest, the whitening, the named
checkpoint, then replays the ``ops`` logged after it, inside one SQLite read transaction so
the replay sees one consistent state. Writes thus become visible as soon as they commit; the
checkpoint only saves time.

Races with the writer are resolved by retrying: a checkpoint deleted meanwhile, ops pruned
past the checkpoint by a compaction, a vector file replaced by a compaction, or a whitening
swapped (``manifest.whitening.epoch`` differs before and after) all restart the load. After
a few attempts, or when the checkpoint is unreadable or not the one the manifest's digest
names, the view is rebuilt from the vectors of the live rows instead (with a warning), which
is always correct, only slower.

The whitening follows the manifest: a recorded one is checked against its digest as it is
read, and a damaged or missing one is refused (searching unwhitened vectors with a
whitened checkpoint, or the reverse, would silently rank wrongly); ``lookalike repair``
learns one again. While a change is under way (an odd ``whitening.epoch``) the file is read
as it is and the epoch comparison makes the reader load again.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from lookalike.confined import check_entry, read_bytes
from lookalike.errors import IndexStateError
from lookalike.index.backends import (
    BackendSite,
    CheckpointError,
    DigestMismatch,
    VectorBackend,
    build_backend,
    create_backend,
    load_backend,
)
from lookalike.index.conf import IndexConf
from lookalike.index.manifest import CheckpointRef, WhiteningState, read_manifest
from lookalike.index.metadata import MetaDB
from lookalike.index.vectors import BlockVerifier, VectorFile, checked_name, repair_hint

if TYPE_CHECKING:
    from lookalike.whitening import Whitening

logger = logging.getLogger(__name__)

WHITENING_NAME = "whitening.npz"
ATTEMPTS = 5  # full-load attempts before giving up
REBUILD_AFTER = 2  # attempts that retry a vanished checkpoint before rebuilding instead
REPLAY_CHUNK = 16384  # ops fetched per query while replaying


class _Retry(Exception):
    """The writer changed something under the loader; start again."""


@dataclass
class View:
    """The in-memory search state.

    Attributes:
        backend: the vector backend.
        whitening: applied to stored and query descriptors, or None.
        seq: the newest op reflected in ``backend``.
        epoch: ``manifest.whitening.epoch`` the view was built under.
        from_checkpoint: started from the manifest's checkpoint file (False: rebuilt or
            replayed from nothing, so a writer's next checkpoint should be written).
    """

    backend: VectorBackend
    whitening: Whitening | None
    seq: int
    epoch: int
    from_checkpoint: bool


class WhiteningDamaged(IndexStateError):
    """The whitening the manifest records is missing, unreadable or not the recorded one."""


def load_whitening(root: Path, state: WhiteningState) -> Whitening | None:
    """The whitening the manifest's ``state`` says is in force (see the module docstring).

    Raises:
        WhiteningDamaged: recorded but missing, unreadable or of another digest.
        IndexStateError: ``whitening.npz`` is a link or another non-regular file.
    """
    path = root / WHITENING_NAME
    if not state.changing and not state.learned:
        return None  # a stray file is not applied: the manifest says there is none
    try:
        content, digest = read_bytes(path)
    except FileNotFoundError:
        if state.changing:
            return None
        raise WhiteningDamaged(
            f"{path} is missing but index {root} was built with a learned whitening: its "
            f"vectors cannot be searched as they were built; {_relearn(root)}"
        ) from None
    if not state.changing and state.sha is not None and digest != state.sha:
        raise WhiteningDamaged(
            f"{path} is not the whitening index {root} was built with (its digest differs); "
            f"{_relearn(root)}"
        )
    from lookalike.whitening import Whitening  # imports torch: only when there is one

    try:
        whitening = Whitening.load(io.BytesIO(content))  # type: ignore[arg-type]
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise WhiteningDamaged(f"{path} is unreadable ({error}); {_relearn(root)}") from None
    if not state.changing and state.dim_out not in (None, whitening.dim_out):
        raise WhiteningDamaged(
            f"{path} gives {whitening.dim_out}-d vectors, the manifest records "
            f"{state.dim_out}-d; {_relearn(root)}"
        )
    return whitening


def _relearn(root: Path) -> str:
    return f"run `lookalike repair --index {root}` (it learns the whitening again)"


def save_whitening(path: Path, whitening: Whitening) -> str:
    """Write ``whitening`` as ``.npz`` (one array per field) atomically; its digest."""
    from lookalike.storage import atomic_write

    arrays = {f.name: getattr(whitening, f.name) for f in dataclasses.fields(whitening)}

    def write(stream: BinaryIO) -> None:
        np.savez(stream, **arrays)

    return atomic_write(path, write)


def prepare(raw: np.ndarray, whitening: Whitening | None) -> np.ndarray:
    """Raw ``(n, D)`` descriptors into what faiss holds: whitened ``(n, d)`` or raw."""
    if whitening is None:
        return np.ascontiguousarray(raw, dtype=np.float32)
    return np.ascontiguousarray(whitening.apply(raw), dtype=np.float32)


class Loader:
    """Loads and refreshes views of the index in ``root``.

    Args:
        root: the index directory.
        db: its ``meta.sqlite``.
        dim: raw descriptor dimension ``D``.
        conf: index settings.
    """

    def __init__(self, root: Path, db: MetaDB, dim: int, conf: IndexConf) -> None:
        self.root = root
        self.db = db
        self.dim = dim
        self.conf = conf
        self.verifier = BlockVerifier(db.block_rows, db.blocks_of)
        self.site = BackendSite(root, self.scalar_fields)  # for a backend outside the process

    def scalar_fields(self, ids: np.ndarray) -> dict[str, list[str]]:
        """``{"label", "content_hash"}`` of the images ``ids`` ("" where there is none), as
        the backend stores them beside the vectors (call inside a snapshot)."""
        from lookalike.labels import label_of  # imports the index package: not at load time

        records = self.db.get([int(i) for i in ids])
        found = [records.get(int(i)) for i in ids]
        return {
            "label": [(label_of(r.metadata) or "") if r else "" for r in found],
            "content_hash": [(r.content_hash or "") if r else "" for r in found],
        }

    def vector_file(self) -> tuple[VectorFile, int]:
        """The current vector file and its committed rows (call inside a snapshot).

        Raises:
            IndexStateError: ``kv.vectors_file`` is not a vector file name of the index.
        """
        name = checked_name(self.db.kv_get("vectors_file"), self.root)
        vectors = VectorFile(self.root / name, self.dim, self.describe_slots, self.verifier)
        return vectors, self.db.kv_int("n_rows")

    def describe_slots(self, slots: np.ndarray) -> str:
        """Names the images whose vectors are at ``slots``, for messages."""
        found = self.db.images_at_slots(sorted({int(s) for s in slots}))
        if not found:
            return f"the rows at slots {sorted({int(s) for s in slots})[:5]}"
        image_id, path = found[0]
        more = f" and {len(found) - 1} more images" if len(found) > 1 else ""
        return f"{path} (id {image_id}){more}"

    def check_sizes(self) -> None:
        """The open-time check: the vector file holds every committed row (one stat)."""
        with self.db.snapshot():
            vectors, n_rows = self.vector_file()
        vectors.check_size(n_rows)

    def load(self) -> View:
        """A full load: checkpoint + replay, with retries (see the module docstring)."""
        for attempt in range(ATTEMPTS):
            try:
                return self._load_once(allow_rebuild=attempt >= REBUILD_AFTER)
            except (_Retry, FileNotFoundError) as why:
                if isinstance(why, FileNotFoundError):
                    self.check_vector_file()
                logger.debug("index %s changed while loading (%s); retrying", self.root, why)
                time.sleep(0.05 * (attempt + 1))
        raise IndexStateError(
            f"index {self.root} kept changing while it was being loaded; retry in a moment"
        )

    def check_vector_file(self) -> None:
        """After a read found no vector file: ``IndexStateError`` if the current one is
        missing (damaged); else a compaction replaced it meanwhile (the caller retries).

        A compaction writes its new file before the commit that names it, so a committed
        name without its file is never a race.
        """
        with self.db.snapshot():
            vectors, n_rows = self.vector_file()
        if n_rows and check_entry(vectors.path) is None:
            raise IndexStateError(
                f"{vectors.path} is missing but meta.sqlite references {n_rows} rows of it; "
                f"{repair_hint(self.root)}"
            )

    def _load_once(self, allow_rebuild: bool) -> View:
        manifest = read_manifest(self.root)
        epoch = manifest.whitening.epoch
        try:
            whitening = load_whitening(self.root, manifest.whitening)
        except WhiteningDamaged:
            if read_manifest(self.root).whitening != manifest.whitening:
                raise _Retry("whitening changed") from None
            raise
        dim = self.dim if whitening is None else whitening.dim_out
        checkpoint = manifest.checkpoint
        backend, checkpoint_seq = self._read_checkpoint(checkpoint, dim, allow_rebuild)
        with self.db.snapshot():
            pruned = self.db.kv_int("ops_pruned_through")
            if backend is not None and pruned > checkpoint_seq:
                if not allow_rebuild and checkpoint.file is not None:  # none: nothing to wait for
                    raise _Retry(f"ops up to {pruned} pruned, checkpoint at {checkpoint_seq}")
                backend = None
            from_checkpoint = backend is not None and checkpoint.file is not None
            if backend is None:
                backend, seq = self._build(whitening)
            else:
                seq = self._replay(backend, whitening, checkpoint_seq)
        if read_manifest(self.root).whitening.epoch != epoch:
            raise _Retry("whitening changed")
        return View(backend, whitening, seq, epoch, from_checkpoint)

    def _read_checkpoint(
        self, checkpoint: CheckpointRef, dim: int, allow_rebuild: bool
    ) -> tuple[VectorBackend | None, int]:
        """The checkpoint's backend and seq; ``(None, 0)`` when it must be rebuilt."""
        name = checkpoint.file
        if name is None:
            return create_backend(self.conf, dim, self.site), 0
        path = self.root / name
        if check_entry(path) is None:
            if not allow_rebuild:
                raise _Retry(f"checkpoint {name} vanished")
            logger.warning("checkpoint %s is missing; rebuilding from the vectors", path)
            return None, 0
        try:
            backend = load_backend(path, self.conf, checkpoint.sha, self.site)
        except FileNotFoundError:
            if allow_rebuild:
                return None, 0
            raise _Retry(f"checkpoint {name} vanished") from None
        except CheckpointError as error:
            changed = read_manifest(self.root).checkpoint != checkpoint
            if (changed or check_entry(path) is None) and not allow_rebuild:
                raise _Retry(f"checkpoint {name} replaced or vanished") from None
            if isinstance(error, DigestMismatch):
                logger.warning(
                    "checkpoint %s does not match its recorded digest; rebuilding the %s "
                    "index in memory from the vectors (`lookalike repair` or a writer's next "
                    "checkpoint replaces it)",
                    path,
                    self.conf.backend,
                )
                return None, 0
            logger.warning(
                "checkpoint %s is unreadable (%s); rebuilding the %s index in memory from "
                "the vectors (a writer's next checkpoint() replaces it)",
                path,
                error,
                self.conf.backend,
            )
            return None, 0
        if backend.dim != dim:
            logger.warning(
                "checkpoint %s holds %d-d vectors, expected %d; rebuilding", path, backend.dim, dim
            )
            return None, 0
        return backend, checkpoint.seq

    def _build(self, whitening: Whitening | None) -> tuple[VectorBackend, int]:
        """Rebuild from the live rows (call inside a snapshot); returns the backend and seq."""
        ids, slots = self.db.live()
        vectors, n_rows = self.vector_file()
        seq = self.db.last_seq()
        dim = self.dim if whitening is None else whitening.dim_out
        backend = build_backend(
            self.conf,
            dim,
            ids,
            lambda rows: prepare(vectors.read(slots[rows], n_rows), whitening),
            site=self.site,
        )
        return backend, seq

    def rebuild(self, whitening: Whitening | None) -> tuple[VectorBackend, int]:
        """Rebuild from the current live rows, training the structure when possible."""
        with self.db.snapshot():
            return self._build(whitening)

    def _replay(self, backend: VectorBackend, whitening: Whitening | None, after: int) -> int:
        """Apply the ops with a seq above ``after`` (call inside a snapshot); returns the last.

        Afterwards the backend must hold exactly the live ids. It holds at least them (each
        was added in the checkpoint or in a replayed op), so one that holds more than SQLite
        counts (a tombstoned structure forgets its tombstones when saved) drops the others.
        """
        vectors, n_rows = self.vector_file()
        seq = after
        while ops := self.db.ops_after(seq, REPLAY_CHUNK):
            begin = 0
            while begin < len(ops):  # consecutive ops of one kind go to faiss in one call
                kind, end = ops[begin][1], begin
                while end < len(ops) and ops[end][1] == kind:
                    end += 1
                ids = np.array([op[2] for op in ops[begin:end]], dtype=np.int64)
                if kind == "add":
                    slots = np.array([op[3] for op in ops[begin:end]], dtype=np.int64)
                    backend.add(prepare(vectors.read(slots, n_rows), whitening), ids)
                else:
                    backend.remove(ids)
                begin = end
            seq = int(ops[-1][0])
        if len(backend) != self.db.count_ok():
            backend.retain(self.db.live()[0])
        return seq

    def catch_up(self, view: View, check_manifest: bool = True) -> View:
        """Bring ``view`` up to the latest commit: replay in place, or reload when needed."""
        if check_manifest:
            manifest = read_manifest(self.root)
            if manifest.whitening.epoch != view.epoch:
                return self.load()
            trained = manifest.checkpoint.file is not None and not manifest.checkpoint.fallback
            if not view.backend.trained and trained:  # pick up the newly trained structure
                return self.load()
        try:
            with self.db.snapshot():
                if self.db.kv_int("ops_pruned_through") > view.seq:
                    raise _Retry("ops pruned past the view")
                view.seq = self._replay(view.backend, view.whitening, view.seq)
        except (_Retry, FileNotFoundError):
            # a half-applied replay leaves the backend undefined: start from scratch
            return self.load()
        return view
