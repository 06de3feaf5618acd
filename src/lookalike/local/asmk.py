"""ASMK*: aggregated selective match kernels over local descriptors, with an inverted file.

A first stage for collections where global descriptors fail (Tolias, Avrithis & Jegou,
"To aggregate or not to aggregate", ICCV 2013; the kernel of HOW and FIRe):

* a visual vocabulary of ``K`` words, faiss k-means over a sample of L2-normalised local
  descriptors (:func:`train_codebook`, size by :func:`vocabulary_size`);
* each image's descriptors are assigned to their nearest word (``assignment`` nearest for
  a query, if asked); per word the residuals ``x - c`` are summed and binarised by sign,
  one bit per dimension (:func:`aggregate`): ``phi_c(X)`` is ``B = d`` bits;
* two images are compared over their common words,
  ``K(X, Y) = sum_c sigma(1 - 2 h(phi_c(X), phi_c(Y)) / B)`` with ``h`` the Hamming distance
  and the selectivity ``sigma(u) = sign(u) |u|^alpha`` for ``u > tau``, else 0
  (:func:`selectivity`), and normalised, ``K(X, Y) / sqrt(K(X, X) K(Y, Y))``
  (:func:`similarity`); ``K(X, X)`` is the number of words of ``X`` (``u = 1`` on each);
* :class:`AsmkIndex` holds the aggregated images in an inverted file (per word: image ids
  and codes) with add and remove by image id, exact scoring of every image that shares a
  word with the query, and one ``.npz`` written atomically.

Binary (ASMK*) rather than float ASMK: a word's code is ``d / 8`` bytes (16 for RootSIFT or
ALIKED) instead of ``4 d`` (512), 32 times less memory and disk, and the kernel is a
popcount; the paper reports ASMK* within a point of ASMK.

Why not the authors' package (``asmk`` 0.1.1 on PyPI): it builds cleanly (a small Cython
Hamming kernel), but its inverted file is append-only (``IVF.add`` asserts that new image
ids continue the old ones; there is no removal), so an image removed or changed in the
index could only be dropped by rebuilding everything, and its state is persisted with
``pickle`` (unsafe to load from a directory others can write, and opaque to our checks).
The maths needs no more than numpy and faiss, both dependencies already.
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np

from lookalike.confined import read_bytes
from lookalike.errors import IndexStateError
from lookalike.storage import atomic_write

FORMAT_VERSION = 1
ALPHA = 3.0  # selectivity exponent (the paper's and HOW's)
TAU = 0.0  # selectivity threshold on the binary similarity u in [-1, 1]
MIN_WORDS, MAX_WORDS = 16, 65536  # vocabulary sizes used
POINTS_PER_WORD = 50  # training descriptors per word (faiss warns below 39)
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)
_MEMBERS = ("codebook", "ids", "tags", "counts", "words", "images", "codes")


def vocabulary_size(n_descriptors: int) -> int:
    """Words for a vocabulary trained on ``n_descriptors``: the largest power of two with
    at least :data:`POINTS_PER_WORD` descriptors per word, within
    [:data:`MIN_WORDS`, :data:`MAX_WORDS`]; 0 when there are too few to train
    :data:`MIN_WORDS` (fewer than ``MIN_WORDS * 39``)."""
    if n_descriptors < MIN_WORDS * 39:
        return 0
    k = 1 << max(int(n_descriptors // POINTS_PER_WORD).bit_length() - 1, 0)
    return int(min(max(k, MIN_WORDS), MAX_WORDS))


def unit_rows(descriptors: np.ndarray) -> np.ndarray:
    """``(N, d)`` float32 descriptors with L2-normalised rows (zero rows stay zero).

    Raises:
        ValueError: not 2-d or not finite.
    """
    x = np.asarray(descriptors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be (N, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("descriptors must be finite")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def train_codebook(
    descriptors: np.ndarray, k: int, seed: int = 0, niter: int = 20, max_per_word: int = 256
) -> np.ndarray:
    """The visual vocabulary: faiss k-means over L2-normalised descriptors.

    Args:
        descriptors: ``(N, d)`` local descriptors, ``N >= k``.
        k: words.
        seed: k-means seed (initialisation and the subsample), for a reproducible codebook.
        niter: k-means iterations.
        max_per_word: descriptors per word faiss trains on at most (a seeded subsample).

    Returns:
        ``(k, d)`` float32 centroids.
    """
    x = unit_rows(descriptors)
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means needs 1 <= k <= {len(x)} descriptors, got k={k}")
    kmeans = faiss.Kmeans(
        x.shape[1], int(k), niter=niter, seed=int(seed), max_points_per_centroid=max_per_word
    )
    kmeans.train(x)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32).reshape(k, x.shape[1])


def quantizer(codebook: np.ndarray) -> faiss.IndexFlatL2:
    """An exact nearest-word index over ``(K, d)`` centroids."""
    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(np.ascontiguousarray(codebook, dtype=np.float32))
    return index


def aggregate(
    descriptors: np.ndarray,
    codebook: np.ndarray,
    assignment: int = 1,
    words_index: faiss.IndexFlatL2 | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One image's ASMK* representation.

    Args:
        descriptors: ``(N, d)`` local descriptors (L2-normalised here).
        codebook: ``(K, d)`` float32 centroids.
        assignment: nearest words each descriptor is assigned to (1 for database images).
        words_index: :func:`quantizer` of ``codebook``, to reuse one.

    Returns:
        ``(words, codes)``: ``(w,)`` int32 distinct words, ascending, and ``(w, ceil(d/8))``
        uint8 their residual sums binarised (bit set where the sum is positive), packed
        big-endian (``np.packbits``).
    """
    x = unit_rows(descriptors)
    d = codebook.shape[1]
    if x.shape[1] != d:
        raise ValueError(f"descriptors must be (N, {d}), got {x.shape}")
    if len(x) == 0:
        return np.zeros(0, np.int32), np.zeros((0, (d + 7) // 8), np.uint8)
    n = min(int(assignment), len(codebook))
    index = words_index if words_index is not None else quantizer(codebook)
    _, nearest = index.search(x, n)
    words = nearest.reshape(-1)
    order = np.argsort(words, kind="stable")
    words = words[order]
    residuals = x[order // n] - codebook[words]
    uniq, starts = np.unique(words, return_index=True)
    sums = np.add.reduceat(residuals, starts, axis=0)
    return uniq.astype(np.int32), np.packbits(sums > 0, axis=1)


def selectivity(u: np.ndarray, alpha: float = ALPHA, tau: float = TAU) -> np.ndarray:
    """``sigma(u) = sign(u) |u|^alpha`` where ``u > tau``, else 0 (float64)."""
    u = np.asarray(u, dtype=np.float64)
    return np.where(u > tau, np.sign(u) * np.abs(u) ** alpha, 0.0)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(n,)`` Hamming distances of rows of two ``(n, bytes)`` uint8 packed codes."""
    return POPCOUNT[np.bitwise_xor(a, b)].sum(axis=1, dtype=np.int64)


def self_similarity(n_words: np.ndarray | int, alpha: float = ALPHA, tau: float = TAU):
    """``K(X, X)`` of images with ``n_words`` words: each word matches itself at ``u = 1``."""
    return np.asarray(n_words, dtype=np.float64) * float(selectivity(1.0, alpha, tau))


def similarity(
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    bits: int,
    alpha: float = ALPHA,
    tau: float = TAU,
) -> float:
    """The normalised ASMK* similarity of two aggregated images (:func:`aggregate` pairs).

    Args:
        a, b: ``(words, codes)`` of each image.
        bits: ``B``, the descriptor dimension.
        alpha, tau: the selectivity.

    Returns:
        ``K(a, b) / sqrt(K(a, a) K(b, b))``, in [0, 1] for ``tau >= 0``; 0 for an image
        without words.
    """
    _, ia, ib = np.intersect1d(a[0], b[0], assume_unique=True, return_indices=True)
    u = 1.0 - 2.0 * hamming(a[1][ia], b[1][ib]) / bits
    norm = np.sqrt(self_similarity(len(a[0]), alpha, tau) * self_similarity(len(b[0]), alpha, tau))
    return float(selectivity(u, alpha, tau).sum() / norm) if norm > 0 else 0.0


def check_kernel(alpha: float, tau: float) -> None:
    if not (alpha > 0 and 0 <= tau < 1):
        raise ValueError(f"ASMK needs alpha > 0 and 0 <= tau < 1, got alpha={alpha} tau={tau}")


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(s, s + n)`` for each pair."""
    total = int(lens.sum())
    shift = starts - (np.cumsum(lens) - lens)
    return np.repeat(shift, lens) + np.arange(total)


class AsmkIndex:
    """An inverted file of ASMK* images: per word, the images holding it and their codes.

    Thread-safe: changes replace the arrays, searches read one consistent set of them.

    Args:
        codebook: ``(K, d)`` float32 centroids (:func:`train_codebook`).
        meta: JSON-able settings the caller keeps with it (saved and loaded).

    Attributes:
        codebook: ``(K, d)`` float32.
        meta: the caller's settings.
        ids: ``(N,)`` int64 image ids, ascending.
        tags: ``(N,)`` str a caller's tag per image (a content hash), ``""`` if none.
        counts: ``(N,)`` int32 words per image.
        words, images, codes: ``(M,)`` int32 word, ``(M,)`` int64 image id and
            ``(M, ceil(d/8))`` uint8 code of every (image, word) entry, sorted by word.
    """

    def __init__(self, codebook: np.ndarray, meta: Mapping[str, Any] | None = None) -> None:
        codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        if codebook.ndim != 2 or len(codebook) == 0:
            raise ValueError(f"codebook must be (K, d) with K >= 1, got {codebook.shape}")
        self.codebook = codebook
        self.meta: dict[str, Any] = dict(meta or {})
        self.ids = np.zeros(0, np.int64)
        self.tags = np.zeros(0, np.str_)
        self.counts = np.zeros(0, np.int32)
        self.words = np.zeros(0, np.int32)
        self.images = np.zeros(0, np.int64)
        self.codes = np.zeros((0, self.code_bytes), np.uint8)
        self._offsets = np.zeros(len(codebook) + 1, np.int64)
        self._quantizer = quantizer(codebook)
        self._lock = threading.RLock()

    @property
    def bits(self) -> int:
        """``B``: bits per code, the descriptor dimension."""
        return int(self.codebook.shape[1])

    @property
    def code_bytes(self) -> int:
        return (self.bits + 7) // 8

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"AsmkIndex({len(self)} images, {len(self.codebook)} words, {len(self.words)} entries)"
        )

    def tags_of(self) -> dict[int, str]:
        """``{image id: tag}`` of every image held."""
        with self._lock:
            return dict(zip(self.ids.tolist(), self.tags.tolist(), strict=True))

    # -- changes -------------------------------------------------------------------------

    def add(
        self,
        ids: Sequence[int],
        descriptors: Sequence[np.ndarray],
        tags: Sequence[str] | None = None,
    ) -> None:
        """Aggregate and add images.

        Args:
            ids: image ids, none held already (remove an image before adding it anew).
            descriptors: each image's ``(n_i, d)`` local descriptors (``n_i`` may be 0).
            tags: each image's tag (a content hash), or None.

        Raises:
            ValueError: an id twice or already held, lengths or dimensions that differ.
        """
        if len(ids) != len(descriptors):
            raise ValueError("ids and descriptors must have the same length")
        self.add_aggregated(ids, [self.aggregate(x) for x in descriptors], tags)

    def add_aggregated(
        self,
        ids: Sequence[int],
        aggregated: Sequence[tuple[np.ndarray, np.ndarray]],
        tags: Sequence[str] | None = None,
    ) -> None:
        """:meth:`add` for images already aggregated (:meth:`aggregate` pairs), so that a
        large batch is aggregated in chunks and inserted at once (one pass over the file)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        tags = [""] * len(ids) if tags is None else [t or "" for t in tags]
        if not len(ids) == len(aggregated) == len(tags):
            raise ValueError("ids, aggregated images and tags must have the same length")
        with self._lock:
            if len(np.unique(ids)) < len(ids) or np.isin(ids, self.ids).any():
                raise ValueError("add takes new image ids; remove an image before re-adding it")
            counts = np.array([len(w) for w, _ in aggregated], np.int32)
            words = np.concatenate([self.words[:0], *(w for w, _ in aggregated)])
            images = np.repeat(ids, counts)
            codes = np.concatenate([self.codes[:0], *(c for _, c in aggregated)])
            order = np.argsort(words, kind="stable")
            at = np.searchsorted(self.words, words[order], side="right")
            self._set_entries(
                np.insert(self.words, at, words[order]),
                np.insert(self.images, at, images[order]),
                np.insert(self.codes, at, codes[order], axis=0),
            )
            all_ids = np.concatenate([self.ids, ids])
            by_id = np.argsort(all_ids, kind="stable")
            self.ids = all_ids[by_id]
            self.tags = np.concatenate([self.tags, np.array(tags, np.str_)])[by_id]
            self.counts = np.concatenate([self.counts, counts])[by_id]

    def remove(self, ids: Sequence[int]) -> int:
        """Drop images (ids not held are ignored); returns how many were held."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        with self._lock:
            gone = np.isin(self.ids, ids)
            if not gone.any():
                return 0
            keep = ~np.isin(self.images, ids)
            self._set_entries(self.words[keep], self.images[keep], self.codes[keep])
            self.ids, self.tags, self.counts = self.ids[~gone], self.tags[~gone], self.counts[~gone]
            return int(gone.sum())

    def _set_entries(self, words: np.ndarray, images: np.ndarray, codes: np.ndarray) -> None:
        self.words, self.images, self.codes = words, images, codes
        self._offsets = np.searchsorted(words, np.arange(len(self.codebook) + 1)).astype(np.int64)

    # -- search --------------------------------------------------------------------------

    def aggregate(self, descriptors: np.ndarray, assignment: int = 1) -> tuple[np.ndarray, ...]:
        """:func:`aggregate` over this index's codebook."""
        return aggregate(descriptors, self.codebook, assignment, self._quantizer)

    def scores(
        self, query: tuple[np.ndarray, np.ndarray], alpha: float = ALPHA, tau: float = TAU
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, scores)``: every image held, ``(N,)`` int64 ascending, and ``(N,)``
        float64 its normalised similarity to an aggregated query (0: no word in common)."""
        check_kernel(alpha, tau)
        q_words, q_codes = query
        with self._lock:
            ids, counts, images = self.ids, self.counts, self.images
            codes, offsets = self.codes, self._offsets
        starts = offsets[q_words]
        lens = offsets[q_words + 1] - starts
        entries = _ranges(starts, lens)
        owner = np.repeat(np.arange(len(q_words)), lens)
        u = 1.0 - 2.0 * hamming(codes[entries], q_codes[owner]) / self.bits
        rows = np.searchsorted(ids, images[entries])
        total = np.bincount(rows, weights=selectivity(u, alpha, tau), minlength=len(ids))
        norm = np.sqrt(self_similarity(counts, alpha, tau) * self_similarity(len(q_words)))
        return ids, np.divide(total, norm, out=np.zeros(len(ids)), where=norm > 0)

    def search(
        self,
        descriptors: np.ndarray,
        k: int,
        assignment: int = 1,
        alpha: float = ALPHA,
        tau: float = TAU,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rank the images held by their ASMK* similarity to one query image.

        Args:
            descriptors: ``(n, d)`` the query's local descriptors.
            k: results; ``<= 0`` ranks every image.
            assignment: nearest words per query descriptor (multiple assignment).
            alpha, tau: the selectivity.

        Returns:
            ``(scores, ids)``, ``(k,)`` float32 normalised similarities in [0, 1] and int64
            ids, best first (ties: lower id first), ``-inf`` / ``-1`` padding.
        """
        ids, scores = self.scores(self.aggregate(descriptors, assignment), alpha, tau)
        k = len(ids) if k <= 0 else int(k)
        order = np.lexsort((ids, -scores))[:k]
        out_s = np.full(k, -np.inf, np.float32)
        out_i = np.full(k, -1, np.int64)
        out_s[: len(order)], out_i[: len(order)] = scores[order], ids[order]
        return out_s, out_i

    # -- persistence ---------------------------------------------------------------------

    def save(self, path: Path, unique: bool = False) -> str:
        """Write the index to ``path`` (a ``.npz``) atomically: a scratch file in the same
        directory, then ``os.replace`` (``unique``: a scratch name of this call only).
        Returns the file's digest.

        Raises:
            StorageError: the directory cannot be written.
        """
        with self._lock:
            meta = {"format_version": FORMAT_VERSION, "meta": self.meta}
            arrays = {name: getattr(self, name) for name in _MEMBERS}

        def write(f: BinaryIO) -> None:
            np.savez(f, header=np.array(json.dumps(meta)), **arrays)

        return atomic_write(Path(path), write, unique=unique)

    @classmethod
    def load(cls, path: Path) -> AsmkIndex | None:
        """The index stored at ``path``, or None if there is none.

        Raises:
            IndexStateError: the file is damaged, of a newer format, or not a plain file.
        """
        path = Path(path)
        try:
            content, _ = read_bytes(path)
        except FileNotFoundError:
            return None
        try:
            with np.load(io.BytesIO(content), allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                arrays = {name: data[name] for name in _MEMBERS}
            version = int(header["format_version"])
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as error:
            raise IndexStateError(
                f"{path} is damaged ({error}); delete it: it is computed again on the next search"
            ) from None
        if version > FORMAT_VERSION:
            raise IndexStateError(f"{path} has a newer format; upgrade lookalike or delete it")
        problem = _inconsistency(arrays)
        if problem:
            raise IndexStateError(f"{path} is damaged ({problem}); delete it")
        index = cls(arrays["codebook"], header.get("meta"))
        index.ids, index.tags = arrays["ids"].astype(np.int64), arrays["tags"].astype(np.str_)
        index.counts = arrays["counts"].astype(np.int32)
        index._set_entries(
            arrays["words"].astype(np.int32), arrays["images"].astype(np.int64), arrays["codes"]
        )
        return index


def _inconsistency(a: dict[str, np.ndarray]) -> str | None:
    """What is inconsistent in the arrays of a stored index, or None."""
    codebook, ids, words = a["codebook"], a["ids"], a["words"]
    if codebook.ndim != 2 or len(codebook) == 0 or not np.isfinite(codebook).all():
        return "bad codebook"
    n, m = len(ids), len(words)
    if ids.ndim != 1 or a["tags"].shape != (n,) or a["counts"].shape != (n,):
        return "per-image arrays differ in length"
    if a["images"].shape != (m,) or a["codes"].shape != (m, (codebook.shape[1] + 7) // 8):
        return "per-entry arrays differ in shape"
    if a["codes"].dtype != np.uint8 or (n > 1 and (np.diff(ids) <= 0).any()):
        return "bad codes or ids"
    if m and ((np.diff(words) < 0).any() or words[0] < 0 or words[-1] >= len(codebook)):
        return "words out of order or range"
    rows = np.searchsorted(ids, a["images"])
    if m and ((rows >= n).any() or not (ids[np.minimum(rows, n - 1)] == a["images"]).all()):
        return "entries of unknown images"
    if not np.array_equal(np.bincount(rows, minlength=n), a["counts"]):
        return "word counts differ"
    return None
