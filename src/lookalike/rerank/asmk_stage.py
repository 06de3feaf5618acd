"""The ``asmk`` stage: a local-feature first stage fused with the global ranking, and the
per-index state that keeps its inverted file current.

* :class:`AsmkState` holds the ASMK* inverted file (:class:`~lookalike.local.asmk.AsmkIndex`)
  of one index for one local-feature provider. Built on first use: a codebook trained on a
  seeded sample of the index's local descriptors (:data:`TRAIN_DESCRIPTORS` at most, the
  vocabulary size by :func:`~lookalike.local.asmk.vocabulary_size`: the largest power of two
  with 50 descriptors per word, 16 to 8192 words with this sample), then every image
  aggregated. After that it follows the index: when the index's version moves, the images'
  content hashes are compared with the ones it holds; a new image is added, a removed one
  leaves the inverted file and an updated one (same id, new content hash) is aggregated
  again, over the same codebook. Stored as ``<index>/asmk.npz`` whenever the writer lock is
  free (kept in memory otherwise, and the log says so) and loaded from there by the next
  process; a stored one of other local-feature settings, or a damaged one, is computed
  again (logged).
* :func:`sync_asmk` is what a writer calls after changing the index (``lookalike index``,
  ``remove``): a stored ``asmk.npz`` follows the change and is saved.
* :class:`AsmkStage` is the stage: the query's local features (shared through the query's
  cache with a later ``verify`` stage) searched in the inverted file, fused with the
  incoming ranking.

Fusion: the union of the ranking's candidates and the top :attr:`AsmkConf.shortlist` of
ASMK, each scored ``weight * asmk + (1 - weight) * global``. Both scores are exact for every
candidate (ASMK scores every image sharing a word with the query, 0 for the others; the
global score of a candidate only ASMK found is its upright cosine similarity), so a
candidate's place does not depend on which list found it, and images the global descriptor
missed get in. A sum rather than a max: ASMK scores of unrelated images are near 0 while
their global cosines are not, so a max would let every global distractor outrank ASMK's
matches.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lookalike.confined import EntryRefused
from lookalike.errors import ConfigError, IndexStateError, StorageError
from lookalike.local.asmk import ALPHA, TAU, AsmkIndex, train_codebook, vocabulary_size
from lookalike.local.features import DESCRIPTORS
from lookalike.query import QueryContext
from lookalike.ranking import Ranking
from lookalike.rerank.verify import query_features

if TYPE_CHECKING:
    from lookalike.index import IndexStore
    from lookalike.local.conf import VerifyConf
    from lookalike.local.provider import IndexFeatures

logger = logging.getLogger(__name__)

ASMK_NAME = "asmk.npz"
SEED = 0  # k-means and sample seed: the same collection gives the same codebook
TRAIN_DESCRIPTORS = 500_000  # descriptors the codebook is trained on at most (256 MB at 128-d)
CHUNK = 256  # images whose features are read at once
KEPT_IN_MEMORY = (
    "kept in memory (the index is read-only or being written): a new process builds it again"
)


@dataclass(frozen=True)
class AsmkConf:
    """ASMK stage settings (query time: none of them changes the stored inverted file)."""

    weight: float = 0.5  # fused score = weight * asmk + (1 - weight) * global; 1: ASMK only
    shortlist: int = 100  # top ASMK results joined to the incoming ranking
    assignment: int = 1  # nearest words per query descriptor (multiple assignment); 1 is off
    alpha: float = ALPHA  # selectivity exponent
    tau: float = TAU  # selectivity threshold on the binary similarity, in [0, 1)

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"ASMK weight must be in [0, 1], got {self.weight!r}")
        for name in ("shortlist", "assignment"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ASMK {name} must be a positive integer, got {value!r}")
        if not (self.alpha > 0 and 0.0 <= self.tau < 1.0):
            raise ConfigError(
                f"ASMK needs alpha > 0 and 0 <= tau < 1, got {self.alpha}, {self.tau}"
            )


ASMK_PRESETS: dict[str, AsmkConf] = {"asmk": AsmkConf()}  # not tuned on a benchmark yet


def _settings(features: IndexFeatures) -> dict:
    """The provider's feature settings as stored in ``asmk.npz`` (JSON round trip)."""
    return json.loads(json.dumps(features.conf.feature_settings(), sort_keys=True))


class AsmkState:
    """The current ASMK* inverted file of one index, for one local-feature provider.

    Thread-safe; shared by every stage made from one :class:`~lookalike.rerank.StageResources`.

    Args:
        store: the index.
        features: its local features (:class:`~lookalike.local.provider.IndexFeatures`).
        seed: codebook seed.
        train_descriptors: descriptors the codebook is trained on at most.

    Attributes:
        computed: codebooks trained by this state (0 when it loaded a stored one).
        aggregated: images aggregated by this state (at a build and following changes).
        stored: whether the last state it computed or updated was written to ``asmk.npz``.
    """

    def __init__(
        self,
        store: IndexStore,
        features: IndexFeatures,
        seed: int = SEED,
        train_descriptors: int = TRAIN_DESCRIPTORS,
    ) -> None:
        if features.conf.feature_settings().get("binary"):
            raise ConfigError(
                f"ASMK needs float local descriptors (sift, rootsift, aliked); "
                f"{features.conf.features} descriptors are binary"
            )
        self.store = store
        self.features = features
        self.settings = _settings(features)
        self.seed, self.train_descriptors = int(seed), int(train_descriptors)
        self.computed = 0
        self.aggregated = 0
        self.stored = False
        self._index: AsmkIndex | None = None
        self._seen: tuple[int, int] | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """``<index>/asmk.npz``."""
        return self.store.path / ASMK_NAME

    def current(self, build: bool = True) -> AsmkIndex | None:
        """The inverted file at the index's current version: loaded (or, with ``build``,
        built) on first use, then brought up to date; None while the index has too few local
        descriptors to train a codebook, or without ``build`` when none is stored."""
        with self._lock:
            version = self.store.vector_source().version()
            if version == self._seen:
                return self._index
            if self._index is None:
                self._index = self._load()
            if self._index is None:
                if not build:
                    return None
                self._index = self._build_stored(version)
            elif tuple(self._index.meta.get("version", ())) != version and self._follow(
                self._index, version
            ):
                self._persist(self._index)
            self._seen = version
            return self._index

    def _live(self) -> dict[int, str]:
        """``{id: content hash}`` of the index's searchable images."""
        return {r.id: r.content_hash or "" for r in self.store.records("ok")}

    def _build_stored(self, version: tuple[int, int]) -> AsmkIndex | None:
        """:meth:`_build`, then stored (logged either way)."""
        start = time.perf_counter()
        index = self._build(version)
        if index is None:
            return None
        self.stored = self._persist(index)
        where = "stored in asmk.npz" if self.stored else KEPT_IN_MEMORY
        (logger.info if self.stored else logger.warning)(
            "built the ASMK inverted file of %s (%d images, %d words, %.1f s): %s",
            self.store.path,
            len(index),
            len(index.codebook),
            time.perf_counter() - start,
            where,
        )
        return index

    def _load(self) -> AsmkIndex | None:
        """The stored inverted file if it is sound and of this provider's settings."""
        try:
            index = AsmkIndex.load(self.path)
        except EntryRefused:  # a link or a directory at asmk.npz: refused, never replaced
            raise
        except IndexStateError as error:
            logger.warning("%s; computing it again", error)
            return None
        if index is not None and index.meta.get("features") != self.settings:
            logger.info("%s was made with other local features: computing it again", self.path)
            return None
        return index

    def _build(self, version: tuple[int, int]) -> AsmkIndex | None:
        """A codebook from a seeded sample of the index's descriptors, every image added."""
        live = self._live()
        ids = np.array(sorted(live), np.int64)
        order = np.random.default_rng(self.seed).permutation(ids)
        sample: list[np.ndarray] = []
        for begin in range(0, len(order), CHUNK):
            feats = self.features.of_ids(order[begin : begin + CHUNK].tolist())
            sample.extend(f[DESCRIPTORS] for f in feats)
            if sum(len(x) for x in sample) >= self.train_descriptors:
                break
        dim = int(self.settings.get("dim", 0))
        x = np.concatenate(sample)[: self.train_descriptors] if sample else np.zeros((0, dim))
        k = vocabulary_size(len(x))
        if k == 0:
            logger.info(
                "index %s has %d local descriptors, too few for an ASMK vocabulary: the asmk "
                "stage keeps the ranking until it has more",
                self.store.path,
                len(x),
            )
            return None
        index = AsmkIndex(train_codebook(x, k, self.seed), {"features": self.settings})
        self.computed += 1
        self._add(index, ids.tolist(), live)
        index.meta.update(version=list(version), seed=self.seed)
        return index

    def _follow(self, index: AsmkIndex, version: tuple[int, int]) -> int:
        """Bring ``index`` to the index's images (read after ``version``); returns how many
        images were removed and added (an update counts twice)."""
        live = self._live()
        held = index.tags_of()
        gone = [i for i, tag in held.items() if live.get(i) != tag]  # removed or updated
        new = [i for i, tag in live.items() if held.get(i) != tag]  # added or updated
        index.remove(gone)
        self._add(index, new, live)
        index.meta["version"] = list(version)
        if gone or new:
            logger.info(
                "ASMK of %s: %d images left, %d aggregated", self.store.path, len(gone), len(new)
            )
        return len(gone) + len(new)

    def _add(self, index: AsmkIndex, ids: list[int], live: dict[int, str]) -> None:
        """Aggregate ``ids`` chunk by chunk (their features are read per chunk), then insert
        them at once."""
        aggregated = []
        for begin in range(0, len(ids), CHUNK):
            feats = self.features.of_ids(ids[begin : begin + CHUNK])
            aggregated.extend(index.aggregate(f[DESCRIPTORS]) for f in feats)
        index.add_aggregated(ids, aggregated, [live[i] for i in ids])
        self.aggregated += len(ids)

    def _persist(self, index: AsmkIndex) -> bool:
        """Store ``index`` as ``asmk.npz`` if the writer lock is free."""
        with self.store.try_writer() as ok:
            if not ok:
                self.stored = False
                return False
            try:
                index.save(self.path, unique=not self.store.writable)
            except (OSError, IndexStateError, StorageError) as error:
                logger.debug("ASMK of %s not stored: %s", self.store.path, error)
                self.stored = False
                return False
        self.stored = True
        return True


class AsmkStage:
    """Re-ranking stage: ASMK* over the query's local features, fused with the ranking.

    Args:
        state: the index's ASMK state (:class:`AsmkState`).
        verify: the local-feature settings, for how the query's features are detected (the
            same as a ``verify`` stage's, so the two share them).
        conf: fusion and kernel settings.
        name: the stage name reported in pipelines.
    """

    depth = 0  # fuses with whatever it is given

    def __init__(
        self, state: AsmkState, verify: VerifyConf, conf: AsmkConf = AsmkConf(), name: str = "asmk"
    ) -> None:
        if verify.feature_settings() != state.features.conf.feature_settings():
            raise ConfigError("the ASMK stage's local features differ from its state's")
        self.state = state
        self.verify = verify
        self.conf = conf
        self.name = name

    def __repr__(self) -> str:
        return f"AsmkStage({self.name!r}, {self.conf})"

    def __call__(self, query: QueryContext, ranking: Ranking, k: int) -> Ranking:
        """Re-rank one query (the :class:`lookalike.rerank.Stage` protocol): the union of
        the ranking and ASMK's shortlist by fused score (see the module docstring). A query
        without an image (a vector), or an index without a vocabulary yet, keeps the
        ranking."""
        if k <= 0:
            return ranking.fit(0)
        local = query_features(query, self.state.features, self.verify)
        index = self.state.current() if local is not None else None
        if index is None or len(index) == 0:
            return ranking.fit(k)
        c = self.conf
        words = index.aggregate(local[DESCRIPTORS], c.assignment)
        all_ids, all_scores = index.scores(words, c.alpha, c.tau)
        keep = ranking.ids >= 0
        g_ids, g_scores = ranking.ids[keep], ranking.scores[keep].astype(np.float64)
        top = np.lexsort((all_ids, -all_scores))[: c.shortlist]
        top = top[all_scores[top] > 0]
        extra = np.setdiff1d(all_ids[top], g_ids)
        extra, extra_global = self._global_scores(query, extra)
        ids = np.concatenate([g_ids, extra])
        at = np.minimum(np.searchsorted(all_ids, ids), len(all_ids) - 1)
        asmk = np.where(all_ids[at] == ids, all_scores[at], 0.0)
        fused = c.weight * asmk + (1.0 - c.weight) * np.concatenate([g_scores, extra_global])
        order = np.lexsort((ids, -fused))
        pad = np.full(len(extra), -1, np.int64)
        fields = {
            n: np.concatenate([v[keep], pad.astype(v.dtype)])[order]
            for n, v in ranking.fields.items()
        }
        return Ranking(fused[order].astype(np.float32), ids[order], fields).fit(k)

    def _global_scores(self, query: QueryContext, ids: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(ids, scores)``: the upright global similarity of candidates only ASMK found
        (one removed from the index since the inverted file was read is dropped)."""
        records = self.state.store.get(ids.tolist())
        ids = ids[[r is not None and r.status == "ok" for r in records]]
        if len(ids) == 0:
            return ids, np.zeros(0)
        try:
            vectors = self.state.store.vector_source().vectors(ids.tolist())
        except ValueError:  # removed in between: the next search sees the new state
            return ids[:0], np.zeros(0)
        return ids, (vectors @ np.asarray(query.descriptor, np.float32)).astype(np.float64)


def sync_asmk(store: IndexStore) -> AsmkIndex | None:
    """Bring a stored ``asmk.npz`` up to date after a writer changed the index (what
    ``lookalike index`` and ``remove`` call, after the local features): added, updated and
    removed images follow over the same codebook, and the file is saved.

    Returns None, touching nothing, when the index keeps no ``asmk.npz``, keeps no local
    features (``--local``) to follow with, or keeps one made from other local features
    (its next search rebuilds it).
    """
    from lookalike.local.provider import IndexFeatures

    local = store.manifest.local
    if local is None or not (store.path / ASMK_NAME).exists():
        return None
    features = IndexFeatures(store, local)
    try:  # damaged or of other settings: left to the next search to rebuild
        return AsmkState(store, features).current(build=False)
    finally:
        features.close()
