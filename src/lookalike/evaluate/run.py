"""Run a benchmark end to end: index its database, search every query, score the rankings.

::

    dataset = load_dataset("oxford5k", "data/oxford5k")
    result = evaluate_dataset(dataset, Path("runs/ox-default"), get_preset("default"))
    result["metrics"]["mAP"]

The index directory is reused: files already indexed with the same settings are skipped,
so a second run only pays for the queries.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lookalike.evaluate.datasets import RetrievalDataset, apply_exclusions
from lookalike.evaluate.metrics import evaluate_rankings
from lookalike.extract import ExtractConf, Extractor
from lookalike.index import IndexConf
from lookalike.indexing import index_files
from lookalike.query import Query
from lookalike.search import Searcher

logger = logging.getLogger(__name__)

StageProgress = Callable[[str, int, int], None]  # (stage "index" | "search", done, total)
LABELLED = "labelled"  # evaluate()'s kind for a labelled folder (evaluate_labelled)


def evaluate_dataset(
    dataset: RetrievalDataset,
    index_dir: Path,
    conf: ExtractConf,
    index_conf: IndexConf | None = None,
    k: int = 0,
    progress: StageProgress | None = None,
    *,
    extractor: Extractor | None = None,
    chunk: int = 32,
) -> dict:
    """Index ``dataset.images`` into ``index_dir``, run its queries and score them.

    Each query is described from its image cropped to its box (Oxford/Paris) with the
    preset's query rotations; the result ids are mapped back to positions in
    ``dataset.images`` through the stored paths, ``query.exclude`` is dropped and the
    metrics remove ``query.junk``.

    Args:
        dataset: the benchmark (see :func:`lookalike.evaluate.load_dataset`).
        index_dir: index directory; created, or reused when built with the same settings
            (other settings are refused with an ``IndexStateError``).
        conf: descriptor settings.
        index_conf: vector backend and structure of a new index (None: the default); a
            reused index built with another is refused (None: its own).
        k: ranking depth searched per query; ``<= 0`` ranks the whole index.
        progress: called with ``("index", files done, files to do)`` after each committed
            chunk and ``("search", queries done, queries)`` after each query.
        extractor: a ready extractor for ``conf`` (saves loading the model again).
        chunk: files per atomic commit while indexing.

    Returns:
        ``{"dataset", "descriptor", "query_rotations", "index", "images", "failed",
        "metrics", "index_seconds", "images_per_second", "query_ms", "queries"}``:
        ``metrics`` is :func:`~lookalike.evaluate.evaluate_rankings`'s table (percent),
        ``index_seconds`` / ``images_per_second`` cover the files indexed by this call (0 when
        all were reused), ``query_ms`` is the mean wall time per query (None without
        queries).
    """
    extractor = extractor or Extractor(conf)

    def index_progress(done: int, total: int) -> None:
        if progress is not None:
            progress("index", done, total)

    report = index_files(
        dataset.images,
        index_dir,
        conf,
        index_conf,
        extractor=extractor,
        progress=index_progress,
        chunk=chunk,
    )
    if report.failed:
        logger.warning(
            "%d of %d dataset images could not be read, e.g. %s",
            len(report.failed),
            len(dataset.images),
            report.failed[0][1],
        )

    rankings: list[np.ndarray] = []
    elapsed = 0.0
    with Searcher.open(
        index_dir,
        runtime=conf.runtime,
        device=conf.device,
        extractor=extractor,
        crops=conf.query_crops,
    ) as searcher:
        # index id -> position in dataset.images; -1 for files of the index not in the dataset
        position = {str(Path(p).expanduser().resolve()): i for i, p in enumerate(dataset.images)}
        structure = searcher.store.conf.to_dict()
        records = list(searcher.store.records(status="ok"))
        to_position = np.full(max((r.id for r in records), default=0) + 1, -1, dtype=np.int64)
        for record in records:
            to_position[record.id] = position.get(record.fs_path, -1)
        if progress is not None:
            progress("search", 0, len(dataset.queries))
        for done, query in enumerate(dataset.queries, 1):
            start = time.perf_counter()
            # the preset's rotations, which may differ from the index's query defaults
            ranking = searcher.search(
                [Query(image=query.image, box=query.box)], k=k, rotations=conf.query_rotations
            )
            elapsed += time.perf_counter() - start
            row = ranking.ids[0][ranking.ids[0] >= 0]
            ranking_positions = to_position[row]
            rankings.append(apply_exclusions(ranking_positions[ranking_positions >= 0], query))
            if progress is not None:
                progress("search", done, len(dataset.queries))

    metrics = evaluate_rankings(
        rankings, [q.positives for q in dataset.queries], [q.junk for q in dataset.queries]
    )
    n_queries = len(dataset.queries)
    return {
        "dataset": dataset.name,
        "descriptor": conf.descriptor(),
        "query_rotations": list(conf.query_rotations),
        "query_crops": list(conf.query_crops),
        "index": structure,
        "images": len(dataset.images),
        "failed": len(report.failed),
        "metrics": {key: _finite_or_none(value) for key, value in metrics.items()},
        "index_seconds": round(report.seconds, 3),
        "images_per_second": round(report.images_per_second, 2),
        "query_ms": round(1000.0 * elapsed / n_queries, 2) if n_queries else None,
        "queries": n_queries,
    }


def evaluate_labelled(
    root: str | Path,
    index_dir: Path,
    conf: ExtractConf,
    index_conf: IndexConf | None = None,
    *,
    labels: str | Path | None = None,
    progress: StageProgress | None = None,
    chunk: int = 32,
    worst: int = 10,
) -> dict:
    """Index a labelled folder and measure it as a metric-learning collection: every image
    queries the others (:func:`~lookalike.evaluate.labelled.labelled_metrics`: Recall@K,
    R-precision, mAP@R, NMI, the worst classes), from the index-space vectors (top-k from
    faiss, never an N x N matrix).

    Labels as :func:`lookalike.train.data.labelled_images` reads them: the parent folder's
    name, or ``labels`` (a ``path,label`` CSV).

    Returns:
        ``{"dataset", "descriptor", "images", "classes", "failed", "metrics", "worst",
        "index_seconds", "images_per_second"}``, metrics in percent (NMI too).
    """
    from lookalike.evaluate.labelled import labelled_metrics
    from lookalike.index import IndexStore
    from lookalike.labels import LABEL_KEY
    from lookalike.train.data import labelled_images

    data = labelled_images(root, labels)
    label_of = {
        str(p.resolve()): data.classes[t] for p, t in zip(data.paths, data.targets, strict=True)
    }

    def index_progress(done: int, total: int) -> None:
        if progress is not None:
            progress("index", done, total)

    report = index_files(
        list(data.paths),
        index_dir,
        conf,
        index_conf,
        metadata=lambda p: {LABEL_KEY: label_of[str(p)]} if str(p) in label_of else {},
        progress=index_progress,
        chunk=chunk,
    )
    with IndexStore.open(index_dir) as store:
        rows = [r for r in store.records(status="ok") if r.path in label_of]
        x = store.vector_source().vectors([r.id for r in rows])
    result = labelled_metrics(x, [label_of[r.path] for r in rows], (1, 5, 10), worst=worst)
    pct = lambda v: None if v is None else round(100.0 * v, 2)  # noqa: E731
    return {
        "dataset": Path(root).resolve().name,
        "descriptor": conf.descriptor(),
        "images": len(rows),
        "classes": len(set(label_of.values())),
        "failed": len(report.failed),
        "metrics": {
            **{f"R@{k}": pct(v) for k, v in result.recall_at.items()},
            "R-precision": pct(result.r_precision),
            "mAP@R": pct(result.map_at_r),
            "NMI": pct(result.nmi),
        },
        "worst": [vars(c) for c in result.worst],
        "index_seconds": round(report.seconds, 3),
        "images_per_second": round(report.images_per_second, 2),
    }


def _finite_or_none(value: float) -> float | None:
    """``nan`` (no query with positives) as None, so the result is valid JSON."""
    return None if isinstance(value, float) and math.isnan(value) else value


def evaluate(
    kind: str,
    root: str | Path,
    index_dir: str | Path | None = None,
    preset: str | None = None,
    progress: StageProgress | None = None,
    *,
    chunk: int = 32,
    model: str | None = None,
    weights: str | Path | None = None,
    image_size: int | None = None,
    pooling: str | None = None,
    factory: str | None = None,
    index_preset: str | None = None,
    backend: str | None = None,
    memory_budget: int | None = None,
    device: str | None = None,
    workers: int | None = None,
    labels: str | Path | None = None,
) -> dict:
    """``lookalike eval`` in one call: load the benchmark, resolve the settings (the index's
    own, or ``preset`` and the options, as :func:`lookalike.indexing.resolve_settings` does),
    index into ``index_dir`` (a temporary directory when None) and score.

    ``kind`` is a key of :data:`~lookalike.evaluate.DATASETS`, or ``"labelled"``: a
    labelled folder measured by :func:`evaluate_labelled` (``labels``: its CSV, if any).

    Returns:
        :func:`evaluate_dataset`'s (or :func:`evaluate_labelled`'s) result with
        ``"preset"`` after ``"dataset"``.
    """
    import tempfile

    from lookalike.evaluate.datasets import load_dataset
    from lookalike.indexing.settings import resolve_settings

    settings = resolve_settings(
        index_dir,
        preset,
        model=model,
        weights=weights,
        image_size=image_size,
        pooling=pooling,
        factory=factory,
        index_preset=index_preset,
        backend=backend,
        memory_budget=memory_budget,
        device=device,
        workers=workers,
    )
    with tempfile.TemporaryDirectory(prefix="lookalike-eval-") as tmp:
        target = Path(index_dir) if index_dir is not None else Path(tmp) / "index"
        if kind == LABELLED:
            result = evaluate_labelled(
                root, target, settings.extract, settings.index, labels=labels,
                progress=progress, chunk=chunk,
            )  # fmt: skip
        else:
            result = evaluate_dataset(
                load_dataset(kind, root), target, settings.extract, settings.index,
                progress=progress, chunk=chunk,
            )  # fmt: skip
    return {"dataset": result.pop("dataset"), "preset": settings.preset, **result}
