"""``regions.sqlite``: what the whitening will be learned from, kept until it is.

The whitening is learned from regional descriptors of the collection, a few per image, of
the first images by id up to :data:`REGION_SAMPLE` descriptors. A build may take several
runs (killed, resumed, or too few images at first), so the samples are stored as the images
are committed rather than kept in one run's memory: the run that completes the index learns
from all of them, and an index built in pieces learns exactly what one built in one go would.

One row per image file content: its sample, ``(rows, dim)`` float16. Rows are keyed by the
file's content hash (the ``content_hash`` of its record in ``meta.sqlite``) because they are
written and committed *before* the ``meta.sqlite`` transaction that records the same images
(and gives them their ids): every committed image has its sample, and a row that no
committed image carries (a killed run's, a changed file's old content) is ignored and deleted
by :meth:`RegionSamples.retain`. The file is deleted once the whitening is learned.

Which regions are kept of an image depends on the image alone (:func:`sample_regions`, seeded
from its content), never on how the build was split into runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lookalike.storage import SIDE_FILES, Database, remove_durably

logger = logging.getLogger(__name__)

REGIONS_NAME = "regions.sqlite"
REGION_SAMPLE = 60_000  # regional descriptors the whitening is learned from, at most
PER_IMAGE = max(1, REGION_SAMPLE // 1000)  # kept per image: every image of the first ~1000
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    content_hash TEXT PRIMARY KEY,
    rows INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    data BLOB NOT NULL
);
"""
_DAMAGED = (
    "delete it to learn the whitening from the stored global descriptors instead, or rebuild "
    "the index into a new --index directory"
)


def sample_regions(
    regions: np.ndarray, content_hash: str, per_image: int = PER_IMAGE
) -> np.ndarray:
    """The regions of one image kept for the whitening: ``(min(R, per_image), D)`` float16.

    Args:
        regions: ``(R, D)`` regional descriptors of the image.
        content_hash: the hex content hash of its file, which seeds the choice (the same
            image always keeps the same regions).
        per_image: how many to keep.
    """
    regions = np.asarray(regions, dtype=np.float16)
    if len(regions) <= per_image:
        return np.ascontiguousarray(regions)
    rng = np.random.default_rng(int(content_hash[:16], 16))
    take = np.sort(rng.permutation(len(regions))[:per_image])
    return np.ascontiguousarray(regions[take])


class RegionSamples:
    """``regions.sqlite`` of one index, opened by its writer.

    Args:
        index_dir: the index directory (the file is created there when missing).

    Raises:
        IndexStateError: the file exists but is not a readable database.
    """

    def __init__(self, index_dir: Path) -> None:
        self._db = Database(
            index_dir / REGIONS_NAME,
            _SCHEMA,
            create=True,
            initial={"schema_version": SCHEMA_VERSION},
            damaged=_DAMAGED,
        )
        self.total = self._count()  # descriptors stored

    def _count(self) -> int:
        row = self._db.conn.execute("SELECT COALESCE(SUM(rows), 0) FROM samples").fetchone()
        return int(row[0])

    def put(self, samples: Sequence[tuple[str, np.ndarray]]) -> None:
        """Store ``(content_hash, (n, D) regions)`` pairs in one committed transaction; a
        content already stored keeps its first sample."""
        if not samples:
            return
        with self._db.write() as conn:
            for content_hash, sample in samples:
                data = np.ascontiguousarray(sample, dtype="<f2")
                cur = conn.execute(
                    "INSERT OR IGNORE INTO samples(content_hash, rows, dim, data) "
                    "VALUES (?, ?, ?, ?)",
                    (content_hash, int(data.shape[0]), int(data.shape[1]), data.tobytes()),
                )
                self.total += int(data.shape[0]) if cur.rowcount else 0

    def get(self, content_hash: str) -> np.ndarray | None:
        """The ``(n, D)`` float16 sample stored for this content, or None."""
        row = self._db.conn.execute(
            "SELECT rows, dim, data FROM samples WHERE content_hash = ?", (content_hash,)
        ).fetchone()
        if row is None:
            return None
        rows, dim, data = row
        if len(data) != 2 * rows * dim:
            logger.warning("ignoring a damaged sample in %s", self._db.path)
            return None
        return np.frombuffer(data, dtype="<f2").reshape(rows, dim).astype(np.float16)

    def retain(self, committed: Iterable[str]) -> int:
        """Delete the rows whose content no committed image has; returns how many."""
        keep = set(committed)
        stored = [h for (h,) in self._db.conn.execute("SELECT content_hash FROM samples")]
        gone = [h for h in stored if h not in keep]
        if gone:
            with self._db.write() as conn:
                conn.executemany("DELETE FROM samples WHERE content_hash = ?", [(h,) for h in gone])
            self.total = self._count()
            logger.info("dropped %d region samples of images never committed", len(gone))
        return len(gone)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RegionSamples:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_samples(index_dir: Path) -> bool:
    """Delete ``regions.sqlite`` (and its WAL files); whether there was one."""
    paths = [index_dir / f"{REGIONS_NAME}{suffix}" for suffix in ("", *SIDE_FILES)]
    found = any(os.path.lexists(p) for p in paths)
    if found:
        remove_durably(paths)
    return found


__all__ = [
    "PER_IMAGE",
    "REGIONS_NAME",
    "REGION_SAMPLE",
    "RegionSamples",
    "remove_samples",
    "sample_regions",
]
