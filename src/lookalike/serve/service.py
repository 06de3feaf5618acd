"""The state behind the service's app: the open index, its searchers, its one writer, the
admission control and the metrics (:class:`Service`).

Searches go through a read-only store (:meth:`Service.searcher`); writes through the
:class:`~lookalike.serve.writer.Writer`, which holds the index's writer lock while the service
runs, but only when writes can be served at all (an API key is configured, or
``--no-auth``): a service that refuses every write leaves the index to other writers.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lookalike.search import AUTO, Searcher
from lookalike.serve.conf import ServeConf
from lookalike.serve.guards import Admission, ServiceError
from lookalike.serve.writer import Writer

logger = logging.getLogger(__name__)

MAX_SEARCHERS = 8  # distinct rerank lists kept open at once (each a Searcher)
MAX_PENDING_WRITES = 256  # changes queued for the writer; past them: 503


class Service:
    """One open index and its searchers (one per rerank list, siblings sharing the store,
    the query model and the stage state), its writer, admission control and the metrics.
    Thread-safe."""

    def __init__(self, index_dir: str | Path, conf: ServeConf) -> None:
        self.index_dir = Path(index_dir)
        self.conf = conf
        self.base = Searcher.open(self.index_dir)  # the first stage alone: rerank=none
        self._searchers: dict[str, Searcher] = {"none": self.base}
        self._lock = threading.Lock()
        self._match = None  # (VerifyConf, local extractor) of /match, made on first use
        self.writer: Writer | None = None
        try:
            if conf.writes_open:
                self.writer = Writer(self.index_dir, lambda: self.base.extractor)
        except BaseException:
            self.base.close()
            raise
        self.admission = Admission(conf.max_active, conf.max_queued)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lookalike_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "lookalike_request_seconds", "request latency", ["endpoint"], registry=self.registry
        )
        self.images = Gauge("lookalike_index_images", "searchable images", registry=self.registry)
        self.shed = Gauge(
            "lookalike_shed_requests", "requests refused with 503", registry=self.registry
        )

    def close(self) -> None:
        """Commit the queued writes, release the writer lock, close the index."""
        with self._lock:
            try:
                if self.writer is not None:
                    self.writer.close()
            finally:
                self._searchers.clear()
                self.base.close()  # the siblings own nothing

    def searcher(self, rerank: str) -> Searcher:
        """The searcher for a ``rerank`` parameter (``auto``, ``none`` or stage names)."""
        key = (rerank or AUTO).strip().lower() or AUTO
        with self._lock:
            if key not in self._searchers:
                if len(self._searchers) >= MAX_SEARCHERS:
                    raise ServiceError(
                        422, f"at most {MAX_SEARCHERS} distinct rerank lists are served"
                    )
                stages = AUTO if key == AUTO else [s.strip() for s in key.split(",")]
                self._searchers[key] = self.base.with_stages(stages)
            return self._searchers[key]

    def writes(self) -> Writer:
        """The writer, with room in its queue (``503`` otherwise)."""
        if self.writer is None:  # the key check refuses writes first; kept for direct calls
            raise ServiceError(403, "this service serves no writes (no API key configured)")
        if self.writer.pending >= MAX_PENDING_WRITES:
            raise self.admission.busy("too many writes are waiting: retry shortly")
        return self.writer

    def matcher(self):
        """``(VerifyConf, local extractor)`` for ``/match``: the index's local-feature
        settings (or the default preset), the model loaded once."""
        from lookalike.rerank.verify import resolve_conf

        with self._lock:
            if self._match is None:
                conf = resolve_conf(self.base.store.manifest, None, str(self.index_dir))
                self._match = (conf, conf.create_extractor(), threading.Lock())
            return self._match

    async def run(self, fn):
        """``fn()`` in the thread pool, inside an admission slot (``503`` when full)."""

        def guarded():
            with self.admission.slot():
                return fn()

        return await anyio.to_thread.run_sync(guarded)
