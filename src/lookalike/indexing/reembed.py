"""Describe an index's images again with other descriptor settings (a trained model, say)
into a new index beside it: same ids, paths, labels and metadata, same vector structure and
local-feature settings; the old index is only read.

An interrupted copy continues where it stopped when run again (images already in the new
index are skipped), and ends exactly as an uninterrupted one would.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lookalike.errors import ConfigError
from lookalike.extract import ExtractConf, Extractor
from lookalike.index import IndexStore
from lookalike.indexing.folder import (
    IndexReport,
    Progress,
    _describe,
    _sync_local,
    _update_dba,
    open_for_writing,
)
from lookalike.indexing.learn import WhiteningLearner

logger = logging.getLogger(__name__)


def reembed_index(
    index_dir: str | Path,
    new_dir: str | Path,
    conf: ExtractConf,
    *,
    extractor: Extractor | None = None,
    progress: Progress | None = None,
    chunk: int = 32,
) -> IndexReport:
    """Copy the index at ``index_dir`` to ``new_dir``, every image described with ``conf``.

    Raises:
        ConfigError: ``new_dir`` is ``index_dir``, or holds an index of other settings.
    """
    src, dst = Path(index_dir).expanduser(), Path(new_dir).expanduser()
    if dst.resolve() == src.resolve():
        raise ConfigError(f"the new index must be another directory than {src}")
    with IndexStore.open(src) as old:
        records = sorted(old.records(), key=lambda r: r.id)
        index_conf, local, query = old.conf, old.manifest.local, old.manifest.query
    conf = conf.with_query(query)  # the old index's search defaults stay the new one's
    store, extractor = open_for_writing(dst, conf, index_conf, extractor, local)
    try:
        done = {r.fs_path for r in store.records()}
        todo = [r for r in records if r.fs_path not in done]
        known = {r.fs_path: r for r in todo}  # the metadata (labels) each copy keeps
        ids = {r.fs_path: r.id for r in todo}
        report = IndexReport(unchanged=len(done))
        learner = WhiteningLearner.open(store, conf)
        try:
            paths = [Path(r.fs_path) for r in todo]
            _describe(store, conf, extractor, paths, 0, learner, known, None, progress, chunk,
                      report, ids)  # fmt: skip
            if learner is not None:
                report.whitening_learned = learner.finish()
        finally:
            if learner is not None:
                learner.close()
        report.added, report.updated = report.updated, 0  # every copy is new to this index
        if not report.whitening_learned:
            store.checkpoint()
        _update_dba(store)
        report.local_described = _sync_local(store, None)
        logger.info("re-described %d images of %s into %s", report.added, src, dst)
        return report
    finally:
        store.close()


__all__ = ["reembed_index"]
