"""The append-only file of raw descriptors: ``vectors.f32``, and its block digests.

Rows are raw float32 descriptors of dimension ``D`` (before whitening), row number = the
``slot`` recorded in ``meta.sqlite``. The number of committed rows lives in SQLite; bytes past
it come from a writer that crashed between appending and committing and are overwritten by
the next append. A committed row is never modified, so readers map the file read-only
without coordination. :meth:`IndexStore.compact` writes a fresh file under a new name
(``vectors.<seq>.f32``) instead of rewriting this one in place.

The committed rows are checked by blocks of ``block_rows`` rows (``meta.sqlite``'s
``vector_blocks``: a blake2b digest per block, written in the transaction that commits the
rows; the last, partial block's digest is recomputed as it grows). A read checks the blocks
it touches against their digests, once per block and process (:class:`BlockVerifier`:
committed rows never change), so a damaged row is refused, never searched with;
:mod:`lookalike.index.check` checks every block.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.confined import check_entry, new_digest, open_fd, plain_name
from lookalike.errors import IndexStateError
from lookalike.storage import write_at, write_new_file

logger = logging.getLogger(__name__)

DEFAULT_NAME = "vectors.f32"
NAME_PATTERN = re.compile(r"vectors(\.[0-9]+)?\.f32")  # what the index itself writes
CHUNK_ROWS = 65536  # rows read or written per step when streaming a whole file
BLOCK_ROWS = 64  # rows per checked block of a new index (kv block_rows records it)


def repair_hint(root: Path) -> str:
    """What to tell the user about damage ``lookalike repair`` mends."""
    return f"the index is damaged: run `lookalike repair --index {root}`"


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
    return NAME_PATTERN.fullmatch(name) is not None


def checked_name(name: str | None, root: Path) -> str:
    """``meta.sqlite``'s ``vectors_file`` entry, refused unless it is a vector file name."""
    if name is None:
        return DEFAULT_NAME
    return plain_name(name, NAME_PATTERN, "meta.sqlite's vectors_file", repair_hint(root))


@dataclass(frozen=True)
class Block:
    """The digest of rows ``[index * block_rows, index * block_rows + rows)``."""

    index: int
    rows: int
    digest: str


class VectorFile:
    """Raw ``(rows, D)`` float32 descriptors in one flat file.

    Args:
        path: the file; it need not exist yet (no rows).
        dim: descriptor dimension ``D``.
        describe: names the images of some slots, for messages (None: the slots).
    """

    def __init__(
        self,
        path: Path,
        dim: int,
        describe: Callable[[np.ndarray], str] | None = None,
        verifier: BlockVerifier | None = None,
    ) -> None:
        self.path = path
        self.dim = int(dim)
        self.row_bytes = 4 * self.dim
        self.describe = describe
        self.verifier = verifier

    def append(self, rows: np.ndarray, start: int) -> None:
        """Write ``(n, D)`` rows at slots ``start..start+n-1`` and fsync them (append, then
        the caller commits; see :func:`lookalike.storage.write_at`).

        Anything past ``start`` (uncommitted rows of a crashed writer) is overwritten or cut.
        """
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        hint = repair_hint(self.path.parent)
        write_at(self.path, rows.reshape(-1).view(np.uint8), start * self.row_bytes, hint)

    def size_rows(self) -> int | None:
        """Whole rows the file holds (None: no file)."""
        st = check_entry(self.path)
        return None if st is None else st.st_size // self.row_bytes

    def check_size(self, n_rows: int) -> None:
        """``IndexStateError`` when the file holds fewer than ``n_rows`` rows (a stat)."""
        held = self.size_rows()
        if n_rows and (held or 0) < n_rows:
            what = "is missing" if held is None else f"holds {held} rows"
            raise IndexStateError(
                f"{self.path} {what} but meta.sqlite references {n_rows}; "
                f"{repair_hint(self.path.parent)}"
            )

    def map(self, n_rows: int) -> np.ndarray:
        """A read-only ``(n_rows, D)`` map of the committed rows.

        Raises:
            FileNotFoundError: there is no file (replaced by a compaction: retry).
            IndexStateError: the file is shorter than ``n_rows`` rows, or not a plain file.
        """
        if n_rows == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        fd = open_fd(self.path, os.O_RDONLY)  # FileNotFoundError: replaced meanwhile
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(fd).st_size
            if size < n_rows * self.row_bytes:
                raise IndexStateError(
                    f"{self.path} holds {size // self.row_bytes} rows but meta.sqlite references "
                    f"{n_rows}; {repair_hint(self.path.parent)}"
                )
            return np.memmap(f, dtype=np.float32, mode="r", shape=(n_rows, self.dim))

    def read(self, slots: np.ndarray, n_rows: int) -> np.ndarray:
        """Copy the rows at ``slots`` into a ``(len(slots), D)`` float32 array.

        Args:
            slots: row numbers, any order, each below ``n_rows``.
            n_rows: committed rows (from SQLite); later bytes are never read.

        Raises:
            FileNotFoundError: the file was replaced by a compaction meanwhile (retry).
            IndexStateError: the file is shorter than SQLite says, or a row holds NaN or
                infinite values (named).
        """
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if len(slots) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        if slots.min() < 0 or slots.max() >= n_rows:
            raise IndexStateError(
                f"slot {int(slots.max())} is outside the {n_rows} committed rows of {self.path}; "
                f"{repair_hint(self.path.parent)}"
            )
        mapped = self.map(int(slots.max()) + 1)  # only what is read must be there
        try:
            rows = np.array(mapped[slots], dtype=np.float32)
        finally:
            del mapped
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            bad = slots[~finite]
            who = self.describe(bad) if self.describe else f"the rows at slots {bad[:5].tolist()}"
            raise IndexStateError(
                f"the stored vector of {who} holds NaN or infinite values; "
                f"{repair_hint(self.path.parent)} (the next `lookalike index` then describes "
                "it again)"
            )
        if self.verifier is not None:  # after the NaN check, which names the very image
            self.verifier.verify(self, slots, n_rows)
        return rows

    def iter_rows(self, slots: np.ndarray, n_rows: int) -> Iterable[np.ndarray]:
        """:meth:`read` in chunks of :data:`CHUNK_ROWS`, in the order of ``slots``."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        for begin in range(0, len(slots), CHUNK_ROWS):
            yield self.read(slots[begin : begin + CHUNK_ROWS], n_rows)

    def write_compacted(
        self, target: Path, slots: np.ndarray, n_rows: int, block_rows: int
    ) -> list[Block]:
        """Write the rows at ``slots``, in that order, as a new file ``target`` (fsynced);
        returns the block digests of the new file."""
        hasher = BlockHasher(block_rows, self.row_bytes)

        def chunks() -> Iterator[memoryview]:
            for rows in self.iter_rows(slots, n_rows):
                data = memoryview(rows.reshape(-1).view(np.uint8))
                hasher.update(data)
                yield data

        write_new_file(target, chunks())
        return hasher.blocks()


class BlockVerifier:
    """Checks the blocks of committed rows a read touches against their recorded digests,
    each block once per process (and again when its recorded digest changes: a partial
    block that grew, a new file after a compaction).

    A whole block, once verified, is not looked up again (its rows never change under its
    file name), so reads of verified rows cost no query.

    Args:
        block_rows: ``block_rows() -> int``, rows per block (``meta.sqlite``'s; read once).
        lookup: ``lookup(block indices) -> {index: Block}``, the recorded digests (read in
            the caller's snapshot); a block without a record is not checked (an index of
            schema 1, or rows whose digests a repair dropped).
    """

    def __init__(
        self, block_rows: Callable[[], int], lookup: Callable[[list[int]], dict[int, Block]]
    ) -> None:
        self.block_rows = block_rows
        self.lookup = lookup
        self._rows: int | None = None  # block_rows(), once
        self._whole: set[tuple[str, int]] = set()  # (file, block) of whole verified blocks
        self._verified: set[tuple[str, int, int, str]] = set()  # partial ones, by digest

    def verify(self, vectors: VectorFile, slots: np.ndarray, n_rows: int) -> None:
        """``IndexStateError`` naming the images of a block at ``slots`` whose rows do not
        match its digest."""
        if self._rows is None:
            self._rows = self.block_rows()
        block_rows, name = self._rows, vectors.path.name
        touched = [
            b for b in np.unique(slots // block_rows).tolist() if (name, b) not in self._whole
        ]
        if not touched:
            return
        recorded = self.lookup(touched)
        todo = [
            b
            for b in (recorded.get(i) for i in touched)
            if b is not None and (name, b.index, b.rows, b.digest) not in self._verified
        ]
        if not todo:
            return
        last = max(b.index * block_rows + b.rows for b in todo)
        mapped = vectors.map(min(last, n_rows))
        try:
            for block in todo:
                begin = block.index * block_rows
                if begin + block.rows > len(mapped):
                    continue  # rows not committed yet in this snapshot: the size check's
                digest = hash_block(mapped, block.index, block.rows, block_rows)
                if digest.hexdigest() != block.digest:
                    span = np.arange(begin, begin + block.rows)
                    who = vectors.describe(span) if vectors.describe else f"rows {begin}-"
                    raise IndexStateError(
                        f"the stored vectors of {who} do not match their recorded digest "
                        f"({vectors.path.name}, rows {begin}-{begin + block.rows - 1}); "
                        f"{repair_hint(vectors.path.parent)} (the next `lookalike index` "
                        "then describes them again)"
                    )
                if block.rows == block_rows:
                    self._whole.add((name, block.index))
                else:
                    self._verified.add((name, block.index, block.rows, block.digest))
        finally:
            del mapped


class BlockHasher:
    """Digests of consecutive blocks of ``block_rows`` rows, fed bytes in order from row
    ``first_row`` on (a whole number of rows per call)."""

    def __init__(self, block_rows: int, row_bytes: int, first_row: int = 0, state=None) -> None:
        self.block_rows = int(block_rows)
        self.row_bytes = int(row_bytes)
        self.row = int(first_row)
        self._hash = state.copy() if state is not None else new_digest()
        self._done: list[Block] = []

    def update(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        offset = 0
        while offset < len(view):
            room = self.block_rows - self.row % self.block_rows
            take = min(room * self.row_bytes, len(view) - offset)
            self._hash.update(view[offset : offset + take])
            offset += take
            self.row += take // self.row_bytes
            if self.row % self.block_rows == 0:
                block = self.row // self.block_rows - 1
                self._done.append(Block(block, self.block_rows, self._hash.hexdigest()))
                self._hash = new_digest()

    def blocks(self) -> list[Block]:
        """Every block fed so far, the last, partial one included."""
        out = list(self._done)
        partial = self.row % self.block_rows
        if partial:
            out.append(Block(self.row // self.block_rows, partial, self._hash.hexdigest()))
        return out

    def partial_state(self) -> tuple[int, object] | None:
        """``(rows hashed, hash state)`` of the unfinished block (None: none)."""
        if self.row % self.block_rows == 0:
            return None
        return self.row, self._hash.copy()


def hash_block(mapped: np.ndarray, block: int, rows: int, block_rows: int):
    """The digest state of ``rows`` rows of ``block`` from a map of the file."""
    begin = block * block_rows
    h = new_digest()
    h.update(np.ascontiguousarray(mapped[begin : begin + rows]).view(np.uint8).reshape(-1))
    return h


def append_digests(
    vectors: VectorFile,
    n_rows: int,
    rows: np.ndarray,
    block_rows: int,
    recorded: Callable[[int], Block | None],
    kept: tuple[str, int, object] | None,
) -> tuple[list[Block], tuple[str, int, object] | None]:
    """The block digests to record when ``rows`` are appended at row ``n_rows``, and the
    hash state of the last block to keep for the next append.

    The rows already in the last, partial block are hashed again from the file and checked
    against their recorded digest (``recorded(block)``), so that damage is never blessed,
    unless ``kept`` (``(file name, rows, state)`` of the previous append) covers them.

    Raises:
        IndexStateError: those rows do not match their recorded digest.
    """
    if (vectors.size_rows() or 0) < n_rows:
        return [], None  # damaged: the append refuses it, saying so
    state, partial = None, n_rows % block_rows
    name = vectors.path.name
    if partial:
        if kept is not None and kept[:2] == (name, n_rows):
            state = kept[2]
        else:
            index = n_rows // block_rows
            state = hash_block(vectors.map(n_rows), index, partial, block_rows)
            known = recorded(index)
            if known is not None and (known.rows, known.digest) != (partial, state.hexdigest()):
                raise IndexStateError(
                    f"rows {index * block_rows}-{n_rows - 1} of {vectors.path} do not match "
                    f"their recorded digest; {repair_hint(vectors.path.parent)}"
                )
    hasher = BlockHasher(block_rows, vectors.row_bytes, n_rows, state)
    hasher.update(np.ascontiguousarray(rows, dtype=np.float32).reshape(-1).view(np.uint8))
    left = hasher.partial_state()
    return hasher.blocks(), None if left is None else (name, *left)
