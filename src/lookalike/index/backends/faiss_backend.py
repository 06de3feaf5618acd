"""The faiss vector backend: construction, training, removal and search parameters.

Faiss holds the (whitened, L2-normalised) descriptors under the image ids, in a
``faiss.IndexIDMap2`` around ``faiss.index_factory(d, factory, METRIC_INNER_PRODUCT)`` --
except IVF structures, which store ids in their inverted lists themselves: an ``IndexIDMap2``
around an IVF corrupts its id mapping on ``remove_ids`` (faiss issues #1643, #4535, closed
as won't fix), so those are used unwrapped.

Trained structures (IVF, PQ, SQ, ...) cannot hold vectors before training. Until the
collection has :func:`min_train_size` vectors (40 per inverted list and at least 1,000, the
least with which k-means and 8-bit product quantisers give usable centroids), the backend is an
exact ``IndexFlatIP`` *fallback*; :meth:`IndexStore.checkpoint` trains the configured
structure once there are enough vectors and rebuilds.

Structures that cannot remove vectors (HNSW, NSG, refine) keep *tombstones* instead: the
removed vector stays in the graph, its faiss position is marked dead, and searches over-fetch
``k + dead`` candidates from the inner index and drop the dead ones. Because an update keeps
the image id, tombstones are per position, not per id: only the newest position of a live
id is alive. Tombstones are not saved with a checkpoint: on loading they are re-derived from
the live ids in SQLite. :meth:`IndexStore.compact` (and a checkpoint once a quarter of the
positions are dead) rebuilds the structure without them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np

from lookalike.confined import DigestReader
from lookalike.errors import ConfigError
from lookalike.index.backends.base import CheckpointError, DigestMismatch
from lookalike.index.conf import AUTO_FACTORY, INDEX_PRESETS, IndexConf, faiss_message
from lookalike.storage import atomic_write

logger = logging.getLogger(__name__)

TRAIN_PER_LIST = 40  # least training vectors per IVF list (faiss warns below 39)
MIN_TRAIN = 1000  # least training vectors of any trained structure
TRAIN_SAMPLE_PER_LIST = 100  # training vectors per IVF list: plenty for k-means, bounded RAM
TRAIN_SAMPLE_MIN = 65536  # PQ/SQ codebooks: faiss subsamples 256 x 256 per sub-quantizer
DEAD_REBUILD_FRACTION = 0.25  # checkpoint() rebuilds a tombstoned structure past this

# "auto" (autofaiss's rule of thumb, with the structures benchmarks/ann.py found best on 1M
# descriptors: IVF beat HNSW32 there, which never reached recall@10 0.95)
AUTO_EXACT_FLOATS = 1 << 24  # exact while n * d is at most this (64k x 256-d)
AUTO_MARGIN = 0.1  # switch only when the size is this far past a threshold (no flapping)


def auto_structure(n: int, dim: int, budget: int) -> str:
    """The faiss structure ``auto`` holds ``n`` ``dim``-d vectors in, within ``budget``
    bytes: exact (``Flat``) while a query over them is fast, then inverted lists of the
    float vectors (``IVF,Flat``) while they fit, then of 8-bit codes (``IVF,SQ8``), then of
    product codes as long as the budget allows (``IVF,PQm``, at most d/2 bytes). About
    ``4 sqrt(n)`` lists, a power of two with 40 training vectors each."""
    if n * dim <= AUTO_EXACT_FLOATS and n * (4 * dim + 8) <= budget:
        return "Flat"
    nlist = 1 << max(4, min(16, round(np.log2(max(4 * np.sqrt(n), 1)))))
    while nlist > 16 and TRAIN_PER_LIST * nlist > n:
        nlist //= 2
    if n * (4 * dim + 8) <= budget:
        return f"IVF{nlist},Flat"
    if n * (dim + 8) <= budget:
        return f"IVF{nlist},SQ8"
    room = max(1, min(dim // 2, budget // max(n, 1) - 8))  # code bytes per vector
    m = next(m for m in range(room, 0, -1) if dim % m == 0)
    return f"IVF{nlist},PQ{m}"


def auto_switch(current: str, n: int, dim: int, budget: int) -> str | None:
    """The structure ``auto`` should rebuild ``current`` into at ``n`` vectors, or None.

    A switch is due only when ``current`` is not what :func:`auto_structure` picks anywhere
    within ``AUTO_MARGIN`` of ``n``: no flapping at a threshold, and a collection between two
    thresholds close together (1M 256-d vectors: exact far below, float lists to SQ8 4% above)
    still leaves a structure it has long outgrown.
    """
    band = {auto_structure(round(n * (1 + s * AUTO_MARGIN)), dim, budget) for s in (-1, 0, 1)}
    return None if current in band else auto_structure(n, dim, budget)


def structure_of(index: faiss.Index) -> str:
    """The factory string of a structure ``auto`` built (read back from a checkpoint)."""
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexIDMap2):
        top = faiss.downcast_index(top.index)
    if isinstance(top, faiss.IndexIVFPQ):
        return f"IVF{top.nlist},PQ{top.pq.M}"
    if isinstance(top, faiss.IndexIVFScalarQuantizer):
        return f"IVF{top.nlist},SQ8"
    if isinstance(top, faiss.IndexIVFFlat):
        return f"IVF{top.nlist},Flat"
    return "Flat"


def validate_factory(factory: str, dim: int) -> None:
    """Build ``factory`` once at ``dim`` to check it; ``ConfigError`` with faiss's reason if not.

    Args:
        factory: faiss ``index_factory`` string, e.g. ``"IVF1024,PQ32"``.
        dim: descriptor dimension the structure will hold (after whitening).
    """
    if dim < 1:
        raise ConfigError(f"index dimension must be >= 1, got {dim}")
    if factory.replace(" ", "").upper().startswith("IDMAP"):
        raise ConfigError(
            f"index factory {factory!r} starts with IDMap; the index maps image ids itself, "
            "drop the 'IDMap,' prefix"
        )
    try:
        faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ConfigError(
            f"invalid index factory {factory!r} for {dim}-d inner-product descriptors: "
            f"{faiss_message(error)}; see the faiss wiki 'The index factory' or use a preset "
            f"({', '.join(sorted(INDEX_PRESETS))})"
        ) from None


def make_index(conf: IndexConf, dim: int) -> faiss.Index:
    """A fresh, empty (maybe untrained) structure from ``conf.factory`` at ``dim``.

    Polysemous training of product quantisers is switched off: it only serves Hamming
    filtering, which we never enable, and it costs minutes on large collections (seconds on
    2,000 vectors) for nothing.
    """
    index = faiss.index_factory(int(dim), conf.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    for part in (index, ivf):
        part = None if part is None else faiss.downcast_index(part)
        if part is not None and hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    return index


def min_train_size(index: faiss.Index) -> int:
    """Vectors needed before ``index`` (untrained) is trained instead of a flat fallback."""
    ivf = faiss.try_extract_index_ivf(index)
    nlist = 0 if ivf is None else int(ivf.nlist)
    return max(TRAIN_PER_LIST * nlist, MIN_TRAIN)


def _train_sample_size(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    nlist = 0 if ivf is None else int(ivf.nlist)
    return max(TRAIN_SAMPLE_PER_LIST * nlist, TRAIN_SAMPLE_MIN)


def _native_ids(index: faiss.Index) -> bool:
    """Whether ``index`` keeps arbitrary ids itself (IVF, maybe behind a pre-transform)."""
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexPreTransform):
        top = faiss.downcast_index(top.index)
    return isinstance(top, faiss.IndexIVF)


def with_ids(index: faiss.Index) -> faiss.Index:
    """``index`` ready for ``add_with_ids``: IVF as is, anything else in an ``IndexIDMap2``."""
    return index if _native_ids(index) else faiss.IndexIDMap2(index)


def _all_labels(index: faiss.Index) -> np.ndarray:
    """Every id stored in ``index`` (from the id map, or from the inverted lists)."""
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    invlists = faiss.extract_index_ivf(index).invlists
    parts = [
        faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
        for i in range(invlists.nlist)
        if invlists.list_size(i)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


def _can_remove(index: faiss.Index) -> bool:
    # Removing an id that is never used (-1) changes nothing but tells whether the structure
    # implements remove_ids; faiss raises before touching anything when it does not.
    try:
        index.remove_ids(np.array([-1], dtype=np.int64))
    except RuntimeError:
        return False
    return True


BLAS_MAX_QUERIES = 16  # flat searches of up to this many queries use _search_flat_blas
# faiss 1.15 scans with SIMD code, one query per thread, below 128,000 queries at once; from
# 20 queries its BLAS path is 4x faster here (64 queries over 100k 256-d vectors: 0.97
# against 3.87 ms per query, one thread; benchmarks/ann.py), and the coarse quantizer of an
# IVF assigns batches of added vectors through the same code. faiss's own knob, process-wide.
FAISS_BLAS_THRESHOLD = 20
faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD


class FaissBackend:
    """A faiss index under image ids plus the tombstones of structures that cannot remove.

    Args:
        index: the structure made by :func:`with_ids` (an id map, or an IVF).
        conf: search settings (``nprobe``, ``ef_search``) and the configured factory.
        fallback: ``index`` is the exact flat stand-in for a not yet trained structure.
    """

    name = "faiss"

    def __init__(
        self, index: faiss.Index, conf: IndexConf, fallback: bool, structure: str | None = None
    ) -> None:
        self.conf = conf
        self.structure = structure or conf.factory  # the factory built ("auto" picks one)
        self._set_index(index, fallback)

    @property
    def auto(self) -> bool:
        return self.conf.factory == AUTO_FACTORY

    def _built(self) -> IndexConf:
        """``conf`` with the structure built: what :func:`make_index` takes."""
        return dataclasses.replace(self.conf, factory=self.structure)

    def _set_index(self, index: faiss.Index, fallback: bool) -> None:
        self.index = index
        self.fallback = fallback
        self.removable = _can_remove(index)
        wrapped = isinstance(index, faiss.IndexIDMap2)
        self._inner = faiss.downcast_index(index.index) if wrapped else None
        self._exact_ip = (
            isinstance(self._inner, faiss.IndexFlat)
            and self._inner.metric_type == faiss.METRIC_INNER_PRODUCT
        )
        self._labels = np.empty(0, dtype=np.int64)  # faiss position -> image id
        self._dead = np.zeros(0, dtype=bool)  # faiss position -> tombstoned
        self._live_pos: dict[int, int] = {}  # image id -> its live faiss position
        if not self.removable:
            self._init_tombstones()
        self.apply_search_params()

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def validate(cls, conf: IndexConf, dim: int) -> None:
        if conf.factory != AUTO_FACTORY:
            validate_factory(conf.factory, dim)

    @classmethod
    def create(cls, conf: IndexConf, dim: int, size: int = 0) -> FaissBackend:
        """No vectors: the configured structure, or the flat fallback if it needs training.
        ``auto`` builds the structure for ``size`` vectors (:func:`auto_structure`).
        ``ConfigError`` (with faiss's reason) for a factory faiss cannot build."""
        structure = conf.factory
        if conf.factory == AUTO_FACTORY:
            structure = auto_structure(int(size), int(dim), conf.memory_budget)
            logger.info("auto: %s for %d vectors of %d-d", structure, size, dim)
        validate_factory(structure, dim)
        index = make_index(dataclasses.replace(conf, factory=structure), dim)
        if index.is_trained:
            return cls(with_ids(index), conf, fallback=False, structure=structure)
        flat = faiss.IndexIDMap2(faiss.IndexFlatIP(int(dim)))
        return cls(flat, conf, fallback=True, structure=structure)

    def plan(self, size: int) -> FaissBackend:
        """The backend to build for ``size`` vectors: this one, or (``auto``, still empty)
        one of the structure :func:`auto_structure` picks for that size."""
        if not self.auto or self.ntotal or size == 0:
            return self
        return type(self).create(self.conf, self.dim, size)

    @classmethod
    def load(cls, path: Path, conf: IndexConf, sha: str | None = None) -> FaissBackend:
        """Load a checkpoint written by :meth:`save` (``CheckpointError`` if unreadable,
        ``DigestMismatch`` if it is not the one whose digest is ``sha``)."""
        with DigestReader(path) as reader:  # FileNotFoundError: removed meanwhile
            try:
                index = faiss.read_index(faiss.PyCallbackIOReader(reader.read))
            except RuntimeError as error:
                raise CheckpointError(faiss_message(error)) from None
            digest = reader.finish()
        if sha is not None and digest != sha:
            raise DigestMismatch(f"{path} is not the checkpoint the manifest records")
        if not isinstance(index, faiss.IndexIDMap2) and not _native_ids(index):
            raise CheckpointError(f"{path} holds a {type(index).__name__} without image ids")
        if conf.factory == AUTO_FACTORY:  # the structure is what was built
            return cls(index, conf, fallback=False, structure=structure_of(index))
        fallback = False
        if isinstance(index, faiss.IndexIDMap2) and not make_index(conf, index.d).is_trained:
            inner = faiss.downcast_index(index.index)
            fallback = type(inner) in (faiss.IndexFlat, faiss.IndexFlatIP)
        return cls(index, conf, fallback=fallback)

    def train(self, sample: np.ndarray) -> None:
        """Replace the exact stand-in by the configured structure trained on ``sample``."""
        if self.ntotal:
            raise ValueError("train() needs an empty backend; rebuild from the vectors")
        index = make_index(self._built(), self.dim)
        if not index.is_trained:
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
        self._set_index(with_ids(index), fallback=False)

    def save(self, path: Path) -> str:
        """Save to ``path`` atomically (tmp file, fsync, rename, directory fsync); returns
        its digest."""
        failed: list[BaseException] = []

        def write(stream: BinaryIO) -> None:
            def put(data: bytes) -> int:
                try:
                    return stream.write(data)
                except BaseException as error:  # faiss turns it into a RuntimeError
                    failed.append(error)
                    raise

            try:
                faiss.write_index(self.index, faiss.PyCallbackIOWriter(put))
            except RuntimeError:
                if failed:  # the disk's own error (e.g. ENOSPC), not faiss's wrapper
                    raise failed[0] from None
                raise

        return atomic_write(path, write)

    # -- state -----------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def trained(self) -> bool:
        return not self.fallback

    @property
    def train_size(self) -> int:
        return min_train_size(make_index(self._built(), self.dim)) if self.fallback else 0

    @property
    def train_sample(self) -> int:
        """Training vectors drawn by :func:`~lookalike.index.backends.build_backend`."""
        return _train_sample_size(make_index(self._built(), self.dim))

    def __len__(self) -> int:
        return self.n_live

    @property
    def ntotal(self) -> int:
        """Vectors stored in faiss, tombstoned ones included."""
        return int(self.index.ntotal)

    @property
    def n_live(self) -> int:
        return self.ntotal if self.removable else len(self._live_pos)

    @property
    def n_dead(self) -> int:
        return self.ntotal - self.n_live

    def wants_rebuild(self) -> bool:
        """Whether too many tombstones make a rebuild worth it, or (``auto``) the collection
        has grown or shrunk past the size where another structure is chosen."""
        if self.n_dead > 0 and self.n_dead >= DEAD_REBUILD_FRACTION * max(self.ntotal, 1):
            return True
        if not self.auto:
            return False
        return (
            auto_switch(self.structure, self.n_live, self.dim, self.conf.memory_budget) is not None
        )

    def set_search_params(self, conf: IndexConf) -> None:
        self.conf = conf
        self.apply_search_params()

    def search_params(self) -> dict[str, int]:
        """The search parameters in effect (``nprobe`` / ``ef_search`` where they apply)."""
        out: dict[str, int] = {}
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            out["nprobe"] = int(ivf.nprobe)
        if isinstance(self._inner, faiss.IndexHNSW):
            out["ef_search"] = int(self._inner.hnsw.efSearch)
        return out

    def memory_bytes(self) -> int:
        """Vectors or codes, ids and graph links held in RAM (an estimate from the sizes)."""
        n, total = self.ntotal, 8 * self.ntotal  # an id (or id map entry) per vector
        ivf = faiss.try_extract_index_ivf(self.index)
        inner = self._inner
        if ivf is not None:
            total += n * int(ivf.code_size) + int(ivf.nlist) * self.dim * 4
        elif isinstance(inner, faiss.IndexHNSW):
            storage = faiss.downcast_index(inner.storage)
            total += n * int(storage.code_size) + 4 * int(inner.hnsw.neighbors.size())
        elif inner is not None and hasattr(inner, "code_size"):
            total += n * int(inner.code_size)
        return total

    def stats(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "structure": self._describe(),
            "live": self.n_live,
            "dead": self.n_dead,
            "trained": self.trained,
            "memory_bytes": self.memory_bytes(),
            "search_params": self.search_params(),
        }

    def _describe(self) -> str:
        built = "Flat (exact, until trained)" if self.fallback else self.structure
        return f"auto: {built}" if self.auto else built

    def apply_search_params(self) -> None:
        """Set ``nprobe`` (IVF) and ``efSearch`` (HNSW) where the structure has them."""
        space = faiss.ParameterSpace()
        if faiss.try_extract_index_ivf(self.index) is not None:
            space.set_index_parameter(self.index, "nprobe", int(self.conf.nprobe))
        if "HNSW" in self.structure.upper() and not self.fallback:
            try:
                space.set_index_parameter(self.index, "efSearch", int(self.conf.ef_search))
            except RuntimeError as error:
                logger.debug(
                    "efSearch not applicable to %s: %s", self.structure, faiss_message(error)
                )

    def _init_tombstones(self) -> None:
        labels = _all_labels(self.index)
        self._labels = labels
        self._dead = np.ones(len(labels), dtype=bool)
        self._live_pos = {}
        if len(labels):
            # the newest position of each id is its live one (updates append)
            unique, first_in_reversed = np.unique(labels[::-1], return_index=True)
            last = len(labels) - 1 - first_in_reversed
            self._dead[last] = False
            self._live_pos = dict(zip(unique.tolist(), last.tolist(), strict=True))

    # -- mutation --------------------------------------------------------------------------

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Add ``(n, d)`` float32 vectors under ``(n,)`` image ids, absent ones (an update is
        :meth:`remove`, then add). A tombstoned structure also takes a present id (its old
        position dies): loading a checkpoint revives positions removed before it was saved,
        until :meth:`retain`."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if not self.removable:
            start = len(self._labels)
            for offset, image_id in enumerate(ids.tolist()):
                old = self._live_pos.get(image_id)
                if old is not None:
                    self._dead[old] = True
                self._live_pos[image_id] = start + offset
            self._labels = np.concatenate([self._labels, ids])
            self._dead = np.concatenate([self._dead, np.zeros(len(ids), dtype=bool)])
        self.index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids)

    def remove(self, ids: np.ndarray) -> None:
        """Remove (or tombstone) the vectors of ``ids``; unknown ids are ignored."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if self.removable:
            self.index.remove_ids(ids)
            return
        for image_id in ids.tolist():
            position = self._live_pos.pop(image_id, None)
            if position is not None:
                self._dead[position] = True

    def retain(self, live_ids: np.ndarray) -> None:
        """Drop every vector whose id is not in ``live_ids`` (a consistency pass after loading)."""
        live = np.asarray(live_ids, dtype=np.int64)
        if not self.removable:
            wanted = set(live.tolist())
            keep = {i: p for i, p in self._live_pos.items() if i in wanted}
            self._live_pos = keep
            self._dead = np.ones(len(self._labels), dtype=bool)
            self._dead[np.fromiter(keep.values(), dtype=np.int64, count=len(keep))] = False
            return
        extra = np.setdiff1d(_all_labels(self.index), live)
        if len(extra):
            logger.warning(
                "faiss held %d ids that meta.sqlite does not list; removing them", len(extra)
            )
            self.remove(extra)

    # -- search ----------------------------------------------------------------------------

    def _search_flat_blas(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search of a few queries with one multi-threaded BLAS product.

        faiss's flat search parallelises over queries, so a single query runs on one core;
        numpy's matrix product over the same (zero-copy) vectors uses them all and measured
        about 2x faster for one query over 100k vectors (benchmarks/retrieval.py).
        """
        inner = self._inner
        xb = faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(
            inner.ntotal, inner.d
        )
        labels = faiss.vector_to_array(self.index.id_map)
        sims = x @ xb.T  # (n, ntotal)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < inner.ntotal else None
        if top is None:
            top = np.broadcast_to(np.arange(inner.ntotal), sims.shape)
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        return np.take_along_axis(top_sims, order, axis=1), labels[top].astype(np.int64)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by inner product of ``(n, d)`` queries.

        Returns:
            ``(scores, ids)`` of shape ``(n, k)``, float32 / int64, best first; ``-1`` ids
            with ``-inf`` scores pad rows with fewer than ``k`` results.
        """
        n = len(x)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        if n == 0 or k <= 0 or self.n_live == 0:
            return scores, ids
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.removable and n <= BLAS_MAX_QUERIES and self._exact_ip:
            got = min(k, self.ntotal)
            found_scores, found_ids = self._search_flat_blas(x, got)
        elif self.removable:
            got = min(k, self.ntotal)
            found_scores, found_ids = self.index.search(x, got)
        else:
            fetch = min(k + self.n_dead, self.ntotal)
            found_scores, positions = self._inner.search(x, fetch)
            valid = positions >= 0
            valid[valid] = ~self._dead[positions[valid]]
            found_ids = np.where(valid, self._labels[np.where(positions >= 0, positions, 0)], -1)
            order = np.argsort(~valid, axis=1, kind="stable")  # live hits first, rank kept
            got = min(k, fetch)
            found_ids = np.take_along_axis(found_ids, order, axis=1)[:, :got]
            found_scores = np.take_along_axis(found_scores, order, axis=1)[:, :got]
        ids[:, :got] = found_ids
        scores[:, :got] = np.where(found_ids >= 0, found_scores, -np.inf)
        return scores, ids
