"""``StageResources``: the state re-ranking stages need, loaded once per index and shared.

A searcher is built once and holds its stages; searchers with other stage lists over the
same index (the service answers ``rerank=...`` per request) share one ``StageResources``, so
one DBA per ``(k, alpha)`` and one set of local features (extractor, store, cache) per
feature settings exist, however many stages use them.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lookalike.index import IndexStore
    from lookalike.index.source import VectorSource
    from lookalike.local.conf import VerifyConf
    from lookalike.local.provider import IndexFeatures
    from lookalike.rerank.asmk_stage import AsmkConf, AsmkStage, AsmkState
    from lookalike.rerank.dba_stage import DBAState
    from lookalike.rerank.verify import GeometricVerifier


class StageResources:
    """What the stages of searchers over one index share (thread-safe).

    Args:
        store: the index.
    """

    def __init__(self, store: IndexStore) -> None:
        self.store = store
        self.source: VectorSource = store.vector_source()
        self._dba: dict[tuple[int, float], DBAState] = {}
        self._features: dict[str, IndexFeatures] = {}
        self._asmk: dict[IndexFeatures, AsmkState] = {}  # one per local-feature provider
        self._lock = threading.Lock()

    def dba(self, k: int, alpha: float) -> DBAState:
        """The one DBA state of this index for ``(k, alpha)`` (loaded on first search)."""
        from lookalike.rerank.dba_stage import DBAState

        key = (int(k), float(alpha))
        with self._lock:
            if key not in self._dba:
                self._dba[key] = DBAState(self.store, *key)
            return self._dba[key]

    def features(self, conf: VerifyConf) -> IndexFeatures:
        """The one local-feature provider of this index for ``conf``'s feature settings."""
        import json

        from lookalike.local.provider import IndexFeatures

        key = json.dumps([conf.feature_settings(), conf.weights, conf.device], sort_keys=True)
        with self._lock:
            if key not in self._features:
                self._features[key] = IndexFeatures(self.store, conf)
            return self._features[key]

    def verifier(self, conf: VerifyConf | dict | None = None) -> GeometricVerifier:
        """A ``verify`` stage: the index's recorded settings (or the default preset) updated
        by ``conf`` (see :func:`lookalike.rerank.verify.resolve_conf`)."""
        from lookalike.rerank.verify import GeometricVerifier, resolve_conf

        resolved = resolve_conf(self.store.manifest, conf, str(self.store.path))
        return GeometricVerifier(self.features(resolved), resolved)

    def asmk(
        self, conf: VerifyConf | dict | None = None, settings: AsmkConf | None = None
    ) -> AsmkStage:
        """An ``asmk`` stage over the one ASMK state of this index for the local features
        ``conf`` resolves to (as :meth:`verifier`'s), with ``settings`` (the preset)."""
        from lookalike.rerank.asmk_stage import AsmkConf, AsmkStage, AsmkState
        from lookalike.rerank.verify import resolve_conf

        resolved = resolve_conf(self.store.manifest, conf, str(self.store.path))
        features = self.features(resolved)
        with self._lock:
            if features not in self._asmk:
                self._asmk[features] = AsmkState(self.store, features)
            state = self._asmk[features]
        return AsmkStage(state, resolved, settings or AsmkConf())

    def close(self) -> None:
        with self._lock:
            for features in self._features.values():
                features.close()
            self._features.clear()
