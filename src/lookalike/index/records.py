"""The record-reading half of :class:`~lookalike.index.store.IndexStore`: images, their
metadata and raw vectors, read from ``meta.sqlite`` and the vector file (the committed
state, whatever the searches' view)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from lookalike.index.conf import ImageRecord
from lookalike.index.loader import Loader
from lookalike.index.metadata import PAGE, MetaDB
from lookalike.storage import read_retrying


class RecordsMixin:
    """``len``, counts, records, paths and raw vectors of the committed images."""

    path: Path
    _db: MetaDB
    _loader: Loader
    _mutex: threading.RLock

    def _check_open(self) -> None:  # defined by IndexStore
        raise NotImplementedError

    def __len__(self) -> int:
        """Number of searchable (``'ok'``) images committed."""
        with self._mutex:
            self._check_open()
            return self._db.count_ok()

    def count(self) -> dict[str, int]:
        """``{"ok": n, "error": m}`` images committed."""
        with self._mutex:
            self._check_open()
            return self._db.counts()

    def get(self, ids: Sequence[int]) -> list[ImageRecord | None]:
        """The records of ``ids``, None for unknown ids, in input order."""
        wanted = [int(i) for i in ids]
        with self._mutex:
            self._check_open()
            with self._db.snapshot():
                found = self._db.get(sorted(set(wanted)))
        return [found.get(i) for i in wanted]

    def find_path(self, path: str) -> ImageRecord | None:
        """The record stored under exactly ``path``, or None."""
        with self._mutex:
            self._check_open()
            return self._db.find_path(str(path))

    def records(self, status: str | None = None) -> Iterator[ImageRecord]:
        """Every record (or those with ``status`` ``'ok'`` / ``'error'``), ordered by id."""
        if status not in (None, "ok", "error"):
            raise ValueError(f"status must be None, 'ok' or 'error', got {status!r}")
        after = 0
        while True:
            with self._mutex:
                self._check_open()
                page = self._db.page(after, status)
            yield from page
            if len(page) < PAGE:
                return
            after = page[-1].id

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Raw ``(n, D)`` float32 descriptors of ``'ok'`` images, in input order.

        Raises:
            ValueError: an id is unknown or belongs to an ``'error'`` image.
        """
        wanted = [int(i) for i in ids]
        with self._mutex:
            self._check_open()
            return read_retrying(
                lambda: self._read_vectors(wanted),
                f"index {self.path}",
                self._loader.check_vector_file,
            )

    def _read_vectors(self, wanted: list[int]) -> np.ndarray:
        with self._db.snapshot():
            found = self._db.slots_of(sorted(set(wanted)))
            bad = [i for i in wanted if i not in found or found[i][1] is None]
            if bad:
                raise ValueError(
                    f"no vector for image id(s) {bad[:5]}{' ...' if len(bad) > 5 else ''} in "
                    f"{self.path}: unknown ids or images that failed to decode"
                )
            vectors, n_rows = self._loader.vector_file()
            slots = np.array([found[i][1] for i in wanted], dtype=np.int64)
            return vectors.read(slots, n_rows)
