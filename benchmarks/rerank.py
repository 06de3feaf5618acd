"""Re-ranking benchmark: Oxford5k (845) and Holidays mAP and query latency of every
re-ranking stage alone and combined, against the same run without re-ranking.

    .venv/bin/python benchmarks/rerank.py --data ../shared/data --index-dir bench_out/rerank-idx \
        [--verify --local-weights ../shared/data/weights/aliked-n16.pth] [--tune]

``--verify`` adds geometric verification (the ``default`` verify preset: ALIKED): the
indexes get their local features as ``lookalike index --local aliked`` stores them (once,
~0.5 s per image on 2 cores), the queries' (cropped) local features are computed once and
cached beside the index, and the ``verify`` stage re-ranks the top 100 of each pipeline.
Its latency is reported per step (``verify_ms``: load / match / ransac) apart from the
extraction of the query's local features (``local_extract_ms``).

The default preset indexes each data set once into ``--index-dir/<name>`` and describes its
queries once (all rotations, cached beside the index), so reruns only pay for the searches.
Each data set gets one :class:`~lookalike.search.Searcher`, and every method is a sibling
of it (:meth:`~lookalike.search.Searcher.with_stages`) sharing its stage state (one DBA per
index). Queries go in as their cached raw views (``Query(vector=(R, D) views)``, upright
first) and cached local features, so the Searcher runs exactly what an image query runs:
the views searched and fused (best score per image, rotated views penalised), then the
stages, which expand the upright view's index-space descriptor. Rankings cover the whole
index (k = all), as in ``evaluate_dataset``.

Latency is the mean wall time per query of ``Searcher.search`` (first-stage search plus the
re-ranking), without the query's description (``extract_ms``, the same for every method,
reported once). The one-off DBA computation is reported apart (``dba_build_ms``: one
``build_dba`` of the index, timed once per data set; the Searcher computes the DBA at most
once and stores it in the index's ``dba.npz``, which later runs load).

``--tune`` sweeps ``n``, ``alpha`` and the DBA ``k`` on both data sets and prints the grid.
Tuning on the test queries inflates the figures; the presets take settings that are good on
both data sets rather than the best of each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import torch

from lookalike.evaluate import RetrievalDataset, apply_exclusions, evaluate_rankings, load_dataset
from lookalike.extract import ExtractConf, Extractor, get_preset
from lookalike.index import IndexStore
from lookalike.indexing import index_files
from lookalike.local import LocalFeatureStore
from lookalike.local.conf import VERIFY_PRESETS, VerifyConf
from lookalike.local.provider import IndexFeatures
from lookalike.local.sync import sync_local
from lookalike.query import Query
from lookalike.rerank import (
    DBA_PRESETS,
    QE_PRESETS,
    STAGES,
    VERIFY,
    DBAConf,
    DBARerank,
    QEConf,
    QueryExpansion,
    Stage,
    build_dba,
)
from lookalike.search import Searcher


@dataclass
class Prepared:
    """An indexed data set with the query descriptors computed once."""

    index: Path  # the index directory
    views: np.ndarray  # (Q, R, D) float32 raw query descriptors, one per rotation
    rotations: tuple[int, ...]  # (R,) the angle of each view, degrees
    extract_ms: float  # mean wall time to describe one query (all its rotations)
    local: list[dict] | None = None  # (Q,) query local features, with --verify
    local_extract_ms: float = 0.0  # mean wall time to detect one query's local features


def prepare_local(
    dataset: RetrievalDataset, index_dir: Path, prep: Prepared, conf: VerifyConf
) -> Prepared:
    """Store the index's local features (as ``index --local``) and the queries' (cached)."""
    with IndexStore.open(prep.index, writable=True) as store:
        start = time.perf_counter()
        described = sync_local(store, conf, progress=_log_progress(f"{dataset.name} local"))
        if described:
            per_image = 1000.0 * (time.perf_counter() - start) / described
            print(f"{dataset.name}: local features of {described} images, {per_image:.0f} ms each")
    folder = index_dir / f"{dataset.name}-query-local"
    folder.mkdir(exist_ok=True)
    queries = LocalFeatureStore(
        folder, conf.features, conf.feature_settings(), quantize=conf.quantize
    )
    timing = folder / "extract_ms.json"
    with IndexStore.open(prep.index) as store:
        features = IndexFeatures(store, conf)  # what a search detects for an image query
        times = []
        for q, query in enumerate(dataset.queries):
            if q not in queries:
                start = time.perf_counter()
                queries.put(q, features.of_query(Query(image=query.image, box=query.box)))
                times.append(time.perf_counter() - start)
        if times:
            timing.write_text(json.dumps(1000.0 * float(np.mean(times))))
        features.close()
    prep.local = queries.get_many(range(len(dataset.queries)))
    prep.local_extract_ms = float(json.loads(timing.read_text())) if timing.exists() else 0.0
    queries.close()
    return prep


def _log_progress(what: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        if done % 100 == 0 or done == total:
            print(f"  {what}: {done} / {total}", flush=True)

    return report


def prepare(
    dataset: RetrievalDataset, index_dir: Path, conf: ExtractConf, extractor: Extractor
) -> Prepared:
    """Index ``dataset`` into ``index_dir/<name>`` and describe its queries (both cached)."""
    index = index_dir / dataset.name
    index_files(dataset.images, index, conf, extractor=extractor)
    cache = index_dir / f"{dataset.name}-queries.npz"
    # upright first: the view the stages expand, as the Searcher takes (R, D) views
    rotations = tuple(sorted(conf.query_rotations, key=lambda r: r % 360 != 0))
    # raw query descriptors do not depend on the whitening (the index applies it)
    raw = {k: v for k, v in conf.descriptor().items() if k != "whitening"}
    key = json.dumps({"descriptor": raw, "rotations": list(rotations)})
    if cache.exists():
        with np.load(cache) as data:
            if str(data["key"]) == key and len(data["views"]) == len(dataset.queries):
                return Prepared(index, data["views"], rotations, float(data["extract_ms"]))
    start = time.perf_counter()
    views = np.stack([extractor.extract_query(q.image, q.box, rotations) for q in dataset.queries])
    extract_ms = 1000.0 * (time.perf_counter() - start) / len(dataset.queries)
    np.savez(cache, views=views, extract_ms=extract_ms, key=np.array(key))
    return Prepared(index, views, rotations, extract_ms)


class Bench:
    """One data set's Searcher and queries, ready to score any re-ranking pipeline."""

    def __init__(
        self,
        dataset: RetrievalDataset,
        prep: Prepared,
        extractor: Extractor,
        verify: VerifyConf | None = None,
    ) -> None:
        self.dataset = dataset
        self.prep = prep
        self.verify = verify
        self.dba_ms: dict[tuple[int, float], float] = {}  # see dba_build_ms
        # read-only, as `lookalike search` opens it: a DBA is computed once and stored in
        # dba.npz (the writer lock is free), or kept in memory
        self.searcher = Searcher.open(prep.index, extractor=extractor)
        store = self.searcher.store
        position = {str(Path(p).expanduser().resolve()): i for i, p in enumerate(dataset.images)}
        records = list(store.records(status="ok"))
        self.to_position = np.full(max(r.id for r in records) + 1, -1, dtype=np.int64)
        for record in records:
            self.to_position[record.id] = position.get(record.path, -1)
        local = prep.local or [None] * len(dataset.queries)
        self.queries = [
            Query(vector=views, rotations=prep.rotations, features=feats, name=q.name)
            for q, views, feats in zip(dataset.queries, prep.views, local, strict=True)
        ]

    def searcher_for(self, names: Sequence[str]) -> Searcher:
        """A sibling Searcher running the ``--rerank`` stages ``names``."""
        verify = self.verify if VERIFY in names else None
        return self.searcher.with_stages(names, verify)

    def searcher_of(self, stages: Sequence[Stage]) -> Searcher:
        """A sibling Searcher running ``stages`` (built by hand: custom settings)."""
        s = self.searcher
        return Searcher(s.store, None, stages, conf=s.conf, resources=s.resources)

    def run(self, searcher: Searcher) -> dict:
        """mAP (percent) and mean ms per query of ``searcher`` (first stage + its stages)."""
        verifier = next((s for s in searcher.stages if s.name == VERIFY), None)
        rankings, elapsed = [], 0.0
        steps: dict[str, list[float]] = {"load": [], "match": [], "ransac": [], "features": []}
        for query, q in zip(self.dataset.queries, self.queries, strict=True):
            start = time.perf_counter()
            ids = searcher.search([q], k=0).ids[0]
            elapsed += time.perf_counter() - start
            if verifier is not None:
                for step, values in steps.items():
                    values.append(verifier.timings[step])
            ranking = self.to_position[ids[ids >= 0]]
            rankings.append(apply_exclusions(ranking[ranking >= 0], query))
        metrics = evaluate_rankings(
            rankings,
            [q.positives for q in self.dataset.queries],
            [q.junk for q in self.dataset.queries],
        )
        out = {
            "mAP": round(float(metrics["mAP"]), 2),
            "query_ms": round(1000.0 * elapsed / len(self.dataset.queries), 2),
        }
        if verifier is not None:
            out["verify_ms"] = {k: round(float(np.mean(v)), 1) for k, v in steps.items()}
        return out

    def close(self) -> None:
        self.searcher.close()


def warm(searcher: Searcher) -> None:
    """Bring the DBA of the stages that need one up to date before the timed queries (the
    Searcher's first query would do it: loaded from ``dba.npz``, or computed once)."""
    for stage in searcher.stages:
        if isinstance(stage, DBARerank):
            stage.state.current()


def dba_build_ms(searcher: Searcher, cache: dict[tuple[int, float], float]) -> float:
    """Wall ms of one full computation of the DBA(s) the stages search (``build_dba`` on
    the index, what the Searcher runs once when no ``dba.npz`` is stored); measured once per
    ``(k, alpha)`` into ``cache``. 0 without a DBA stage."""
    total = 0.0
    for stage in searcher.stages:
        if isinstance(stage, DBARerank):
            key = (stage.state.k, stage.state.alpha)
            if key not in cache:
                start = time.perf_counter()
                build_dba(searcher.resources.source, *key)
                cache[key] = 1000.0 * (time.perf_counter() - start)
            total += cache[key]
    return total


# --rerank lists: no re-ranking, then every descriptor-space stage alone
METHODS: dict[str, list[str]] = {
    "none": [],
    **{name: [name] for name in STAGES if name != VERIFY},
}
# with --verify: these descriptor-space pipelines again, each followed by verification
VERIFIED = ("none", "alpha-qe", "dba", "dba+alpha-qe")


def tune(benches: list[Bench]) -> list[dict]:
    """Sweep the settings of each stage on every data set; one row (mAP per data set) per
    setting. Runs faiss single-threaded: only mAP counts here, and one thread is faster for
    one query at a time on a small shared machine."""
    Make = Callable[[Bench], list[Stage]]
    grid: list[tuple[str, dict, Make]] = []

    def qe(conf: QEConf) -> Make:
        return lambda b: [QueryExpansion(b.searcher.resources.source, conf, "qe")]

    def dba(conf: DBAConf, name: str) -> Make:
        return lambda b: [DBARerank(b.searcher.resources.dba(conf.k, conf.alpha), conf, name)]

    keeps = (False, True)
    for n, alpha, keep in itertools.product((1, 2, 3, 5, 7, 10), (0.0, 0.5, 1.0, 3.0), keeps):
        conf = QEConf(n, alpha, keep)
        grid.append(("qe", asdict(conf), qe(conf)))
    for k, alpha, keep in itertools.product((2, 3, 5, 7, 10), (0.0, 0.5, 1.0, 3.0), keeps):
        conf = DBAConf(k, alpha, keep_first_stage=keep)
        grid.append(("dba", asdict(conf), dba(conf, "dba")))
    for k, alpha, n, qe_alpha, source in itertools.product(
        (3, 5, 7), (0.5, 1.0), (2, 3, 5), (0.0, 0.5), ("first-stage", "dba")
    ):
        conf = DBAConf(k, alpha, qe=QEConf(n, qe_alpha), expand_from=source)
        grid.append(("dba+qe", asdict(conf), dba(conf, "dba+qe")))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    rows = []
    try:
        for stage, params, make in grid:
            row = {"stage": stage, **params}
            for bench in benches:
                searcher = bench.searcher_of(make(bench))
                warm(searcher)
                row[bench.dataset.name] = bench.run(searcher)["mAP"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        faiss.omp_set_num_threads(threads)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--datasets", default="oxford5k,holidays")
    parser.add_argument("--index-dir", type=Path, default=None, help="reused between runs")
    parser.add_argument("--tune", action="store_true", help="also sweep n, alpha and k")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--verify", action="store_true", help="also geometric verification")
    parser.add_argument("--local-weights", help="ALIKED checkpoint (aliked-n16.pth)")
    args = parser.parse_args()
    verify_conf = VERIFY_PRESETS["default"].replace(weights=args.local_weights)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = None
    if args.index_dir is None:
        tmp = tempfile.TemporaryDirectory()
        args.index_dir = Path(tmp.name)
    args.index_dir.mkdir(parents=True, exist_ok=True)
    conf = get_preset("default")
    extractor = Extractor(conf)
    report: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.node()}",
        "load_average": os.getloadavg(),  # other work on the machine inflates latencies
        "preset": "default",
        "settings": {
            "qe": {name: asdict(c) for name, c in QE_PRESETS.items()},
            "dba": {name: asdict(c) for name, c in DBA_PRESETS.items()},
            "verify": asdict(verify_conf) if args.verify else None,
        },
        "results": [],
    }
    benches = []
    for name in args.datasets.split(","):
        dataset = load_dataset(name, args.data / name)
        prep = prepare(dataset, args.index_dir, conf, extractor)
        if args.verify:
            prepare_local(dataset, args.index_dir, prep, verify_conf)
        bench = Bench(dataset, prep, extractor, verify_conf if args.verify else None)
        benches.append(bench)
        base = None
        runs = [(method, names, False) for method, names in METHODS.items()]
        if args.verify:
            runs += [(m, [*METHODS[m], VERIFY], True) for m in VERIFIED]
        for method, names, verified in runs:
            searcher = bench.searcher_for(names)
            warm(searcher)
            build_ms = dba_build_ms(searcher, bench.dba_ms)
            res = bench.run(searcher)
            base = res["mAP"] if base is None else base
            label = ("" if method == "none" else method + ",") + "verify" if verified else method
            row = {"dataset": name, "method": label, **res, "gain": round(res["mAP"] - base, 2)}
            if build_ms > 0:
                row["dba_build_ms"] = round(build_ms, 1)
            row["extract_ms"] = round(bench.prep.extract_ms, 1)
            if verified:
                row["local_extract_ms"] = round(bench.prep.local_extract_ms, 1)
            report["results"].append(row)
            steps = (
                "  verify " + " ".join(f"{k} {v:.0f}" for k, v in res["verify_ms"].items())
                if verified
                else ""
            )
            print(
                f"{name:9s} {label:20s} mAP {res['mAP']:5.1f} ({row['gain']:+5.1f})  "
                f"{res['query_ms']:7.2f} ms/query (+{bench.prep.extract_ms:.0f} ms to describe)"
                f"{steps}",
                flush=True,
            )
    if args.tune:
        report["tuning"] = tune(benches)
    for bench in benches:
        bench.close()
    (args.out / "rerank.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out / 'rerank.json'}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
