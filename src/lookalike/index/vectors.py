"""The append-only file of raw descriptors: ``vectors.f32``.

Rows are raw float32 descriptors of dimension ``D`` (before whitening), row number = the
``slot`` recorded in ``meta.sqlite``. The number of committed rows lives in SQLite; bytes past
it come from a writer that crashed between appending and committing and are overwritten by
the next append. A committed row is never modified, so readers map the file read-only
without coordination. :meth:`IndexStore.compact` writes a fresh file under a new name
(``vectors.<seq>.f32``) instead of rewriting this one in place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lookalike.errors import IndexStateError
from lookalike.storage import write_at, write_new_file

logger = logging.getLogger(__name__)

DEFAULT_NAME = "vectors.f32"
CHUNK_ROWS = 65536  # rows read or written per step when streaming a whole file
DAMAGED = "the index is damaged, rebuild it into a new --index directory"


def check_vectors(x: np.ndarray, dim: int, what: str, rows: int | None = None) -> np.ndarray:
    """Validate ``(rows, dim)`` float32 finite descriptors; ``ValueError`` saying what is wrong.

    Args:
        x: the array to check.
        dim: required number of columns ``D``.
        what: its name in the message (``"vectors"``, ``"queries"``).
        rows: required number of rows, or None for any.
    """
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"{what} must be float32, got {x.dtype}; use x.astype(np.float32)")
    if x.ndim != 2 or x.shape[1] != dim or (rows is not None and x.shape[0] != rows):
        want = f"({'N' if rows is None else rows}, {dim})"
        raise ValueError(f"{what} must have shape {want}, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return x


def vectors_name(seq: int) -> str:
    """File name of the vector file written by a compaction at ops seq ``seq``."""
    return f"vectors.{seq}.f32"


def is_vectors_name(name: str) -> bool:
    """Whether ``name`` is a vector file of this layout (current or left by a compaction)."""
    if name == DEFAULT_NAME:
        return True
    parts = name.split(".")
    return len(parts) == 3 and parts[0] == "vectors" and parts[1].isdigit() and parts[2] == "f32"


class VectorFile:
    """Raw ``(rows, D)`` float32 descriptors in one flat file.

    Args:
        path: the file; it need not exist yet (no rows).
        dim: descriptor dimension ``D``.
    """

    def __init__(self, path: Path, dim: int) -> None:
        self.path = path
        self.dim = int(dim)
        self.row_bytes = 4 * self.dim

    def append(self, rows: np.ndarray, start: int) -> None:
        """Write ``(n, D)`` rows at slots ``start..start+n-1`` and fsync them (append, then
        the caller commits; see :func:`lookalike.storage.write_at`).

        Anything past ``start`` (uncommitted rows of a crashed writer) is overwritten or cut.
        """
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        write_at(self.path, rows.reshape(-1).view(np.uint8), start * self.row_bytes, DAMAGED)

    def _map(self, n_rows: int) -> np.ndarray:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < n_rows * self.row_bytes:
            if size == 0 and not self.path.exists():
                raise FileNotFoundError(self.path)
            raise IndexStateError(
                f"{self.path} holds {size // self.row_bytes} rows but meta.sqlite references "
                f"{n_rows}; the index is damaged, rebuild it into a new --index directory"
            )
        return np.memmap(self.path, dtype=np.float32, mode="r", shape=(n_rows, self.dim))

    def read(self, slots: np.ndarray, n_rows: int) -> np.ndarray:
        """Copy the rows at ``slots`` into a ``(len(slots), D)`` float32 array.

        Args:
            slots: row numbers, any order, each below ``n_rows``.
            n_rows: committed rows (from SQLite); later bytes are never read.

        Raises:
            FileNotFoundError: the file was replaced by a compaction meanwhile (retry).
            IndexStateError: the file is shorter than SQLite says.
        """
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if len(slots) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        if slots.min() < 0 or slots.max() >= n_rows:
            raise IndexStateError(
                f"slot {int(slots.max())} is outside the {n_rows} committed rows of {self.path}; "
                "the index is damaged, rebuild it into a new --index directory"
            )
        mapped = self._map(n_rows)
        try:
            return np.array(mapped[slots], dtype=np.float32)
        finally:
            del mapped

    def iter_rows(self, slots: np.ndarray, n_rows: int) -> Iterable[np.ndarray]:
        """:meth:`read` in chunks of :data:`CHUNK_ROWS`, in the order of ``slots``."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        for begin in range(0, len(slots), CHUNK_ROWS):
            yield self.read(slots[begin : begin + CHUNK_ROWS], n_rows)

    def write_compacted(self, target: Path, slots: np.ndarray, n_rows: int) -> None:
        """Write the rows at ``slots``, in that order, as a new file ``target`` (fsynced)."""
        chunks = (r.reshape(-1).view(np.uint8) for r in self.iter_rows(slots, n_rows))
        write_new_file(target, chunks)
