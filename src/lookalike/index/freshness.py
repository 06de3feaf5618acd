"""Keeping a reader of :class:`~lookalike.index.store.IndexStore` current, and letting it
write briefly: the change token, ``refresh``, ``refresh_if_changed``, ``try_writer``.

A reader keeps the snapshot it loaded until it refreshes. Whether anything changed costs
one SQLite statement (``PRAGMA data_version``: another connection committed) and one
``stat`` of the manifest (it was replaced), so a server can ask before every search.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from lookalike.errors import IndexLockedError, IndexStateError, StorageError
from lookalike.index.loader import Loader, View
from lookalike.index.manifest import MANIFEST_NAME, Manifest
from lookalike.index.metadata import MetaDB
from lookalike.index.upgrade import read_complete
from lookalike.storage import WriterLock

LOCK_NAME = "lock"  # held by the single writer


def writer_lock(root: Path) -> WriterLock:
    """The (not yet acquired) writer lock of the index in ``root``."""
    return WriterLock(root / LOCK_NAME, root)


class FreshnessMixin:
    """Refreshing a reader, and the brief writer lock of :meth:`try_writer`."""

    path: Path
    _manifest: Manifest
    _db: MetaDB
    _loader: Loader
    _view: View | None
    _mutex: threading.RLock
    _token: tuple
    _brief: bool

    @property
    def writable(self) -> bool:  # defined by IndexStore
        raise NotImplementedError

    def _check_open(self) -> None:
        raise NotImplementedError

    def _current_view(self) -> View:
        raise NotImplementedError

    def _change_token(self) -> tuple:
        """Changes whenever another process commits or replaces the manifest (cheap)."""
        try:
            st = (self.path / MANIFEST_NAME).stat()
            manifest = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            manifest = None
        return self._db.data_version(), manifest

    def refresh(self) -> None:
        """Make the changes committed since opening (or the last refresh) searchable."""
        with self._mutex:
            self._check_open()
            self._token = self._change_token()
            self._db.detect()  # a writer may have migrated the schema meanwhile
            if self._view is None or self.writable:
                self._current_view()
                return
            self._view = self._loader.catch_up(self._view)
            manifest = read_complete(self.path, self._db)
            # keep search parameters changed locally with set_search_params
            self._manifest = manifest.replace(index=self._manifest.index)

    def refresh_if_changed(self) -> bool:
        """:meth:`refresh` when another process has committed since the last one (one
        SQLite statement and one ``stat`` otherwise); returns whether it refreshed."""
        with self._mutex:
            self._check_open()
            if self.writable or self._change_token() == self._token:
                return False
            self.refresh()
            return True

    @contextlib.contextmanager
    def try_writer(self) -> Iterator[bool]:
        """For a reader: hold the writer lock for a short write if no other process holds
        it (yields True; the manifest is re-read), else yield False at once. A writer yields
        True. Used to store what a search computed (a DBA, local features)."""
        if self.writable:
            yield True
            return
        lock = writer_lock(self.path)
        try:
            lock.acquire()
        except (IndexLockedError, IndexStateError, StorageError):
            yield False
            return
        unseen = True
        local = self._manifest.index  # search parameters this reader set for itself
        try:
            with self._mutex:
                # commits of others not yet refreshed must still be seen by the next search
                unseen = self._change_token() != self._token
                # what is on disk, so that a write records nothing of this reader's own
                self._manifest = read_complete(self.path, self._db)
                self._brief = True
            yield True
        finally:
            with self._mutex:
                self._brief = False
                self._manifest = self._manifest.replace(index=local)
                if not unseen:  # only this write changed the manifest
                    self._token = self._change_token()
            lock.release()
