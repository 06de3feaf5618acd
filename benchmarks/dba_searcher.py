"""DBA search cost on a large index: one Searcher computes (or loads) the augmented database
once, so its later queries cost a plain search plus the augmented search, not a rebuild.

    .venv/bin/python benchmarks/dba_searcher.py [--n 50000] [--index-dir DIR] [--out bench_out]

Builds an ``--n`` x 256 index of synthetic unit vectors (``--clusters`` Gaussian clusters,
seeded) through the Python API (``IndexStore.create``, ``add`` in chunks, ``checkpoint``)
into a temporary folder, or into ``--index-dir`` (a new or empty folder), then measures in
the same run, one vector query (a noisy copy of an indexed vector, ``k`` results) at a time:

a. ``plain``: a Searcher without stages;
b. ``dba``: one ``Searcher.open(index, rerank=["dba"])``, as ``lookalike search --rerank dba``
   opens it (read-only): its first query computes the DBA once and stores it in ``dba.npz``
   (the index folder is writable and its writer lock free), the later ones reuse it;
c. ``dba+alpha-qe``: the sibling ``with_stages(["dba", "alpha-qe"])`` of (b), sharing its
   DBA (one per index), so its first query computes nothing;
d. ``dba, new process``: a Searcher opened in a subprocess on the same index: its first
   query loads ``dba.npz`` and must not recompute (``DBAState.computed`` = 0);
e. ``naive``: what the code before the Searcher redesign did on a read-only index, the DBA
   rebuilt for every query (``build_dba(source)`` behind the same DBA stage), on
   ``--naive-queries`` queries only: it is O(N^2 d).

First-query ms and steady-state ms (median and p90 over the ``--queries`` queries after the
first) are the wall time of ``Searcher.search`` per query. The table goes to stdout and the
figures, with the date, machine and load average, to ``<out>/dba_searcher.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from lookalike.extract import get_preset
from lookalike.index import IndexStore, NewImage
from lookalike.query import Query
from lookalike.rerank import DBA_PRESETS, DBARerank, build_dba
from lookalike.rerank.dba import DBA_NAME, DBAIndex
from lookalike.search import Searcher

DIM = 256  # what the default preset's index holds (its whitening reduces 1280 -> 256)
CHUNK = 5_000  # vectors per add() commit


def synthetic(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """``(n, dim)`` float32 unit vectors around ``clusters`` random centres (seeded)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.8 * rng.standard_normal((n, dim), np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def queries(x: np.ndarray, count: int, seed: int) -> list[Query]:
    """``count`` vector queries: noisy copies of random indexed vectors (raw ``(D,)``)."""
    rng = np.random.default_rng(seed + 1)
    q = x[rng.choice(len(x), count, replace=False)]
    q = q + 0.3 * rng.standard_normal(q.shape, np.float32) / np.sqrt(q.shape[1])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return [Query(vector=v) for v in q.astype(np.float32)]


def build_index(path: Path, x: np.ndarray) -> float:
    """Index ``x`` at ``path`` through the Python API; returns the seconds it took."""
    start = time.perf_counter()
    descriptor = get_preset("default").descriptor()  # a 256-d index of the default preset
    with IndexStore.create(path, descriptor, x.shape[1]) as store:
        for begin in range(0, len(x), CHUNK):
            rows = range(begin, min(len(x), begin + CHUNK))
            store.add(
                [NewImage(path=f"/synthetic/{i}.jpg") for i in rows], x[rows.start : rows.stop]
            )
        store.checkpoint()
    return time.perf_counter() - start


def timed(
    searcher: Searcher, items: list[Query], k: int, keep: bool = False
) -> list[float] | tuple[list[float], list[np.ndarray]]:
    """Wall ms of ``searcher.search`` per query, one query at a time (and the ``(k,)`` ids
    of each, with ``keep``)."""
    ms, ids = [], []
    for q in items:
        start = time.perf_counter()
        ranking = searcher.search([q], k)
        ms.append(1000.0 * (time.perf_counter() - start))
        ids.append(ranking.ids[0])
    return (ms, ids) if keep else ms


def summary(ms: list[float]) -> dict:
    """First-query ms, then median / p90 / mean over the rest (the steady state)."""
    rest = np.asarray(ms[1:]) if len(ms) > 1 else np.asarray(ms)
    return {
        "first_ms": round(ms[0], 2),
        "steady_median_ms": round(float(np.median(rest)), 2),
        "steady_p90_ms": round(float(np.percentile(rest, 90)), 2),
        "steady_mean_ms": round(float(np.mean(rest)), 2),
        "steady_queries": len(rest),
    }


def dba_states(searcher: Searcher) -> list:
    return [s.state for s in searcher.stages if isinstance(s, DBARerank)]


class RebuildPerQuery:
    """A DBA state that recomputes the augmented database at every call: the naive
    baseline (what a read-only index cost per query before the Searcher kept one)."""

    def __init__(self, searcher: Searcher, k: int, alpha: float) -> None:
        self.store = searcher.store
        self.source = searcher.resources.source
        self.k, self.alpha = k, alpha
        self.computed = 0

    def current(self) -> DBAIndex:
        self.computed += 1
        return build_dba(self.source, self.k, self.alpha)


def child(args: argparse.Namespace) -> None:
    """(d): a new process opens the index with ``--rerank dba``; JSON on stdout."""
    x = synthetic(args.n, DIM, args.clusters, args.seed)
    items = queries(x, args.child_queries, args.seed)
    dba_file = Path(args.child) / DBA_NAME
    mtime = dba_file.stat().st_mtime_ns if dba_file.exists() else None
    start = time.perf_counter()
    with Searcher.open(args.child, rerank=["dba"]) as searcher:
        open_ms = 1000.0 * (time.perf_counter() - start)
        ms = timed(searcher, items, args.k)
        (state,) = dba_states(searcher)
        result = {
            "open_ms": round(open_ms, 2),
            **summary(ms),
            "computed": state.computed,
            "dba_npz_rewritten": (dba_file.stat().st_mtime_ns if dba_file.exists() else None)
            != mtime,
        }
    print(json.dumps(result))


def measure(args: argparse.Namespace, index: Path) -> dict:
    x = synthetic(args.n, DIM, args.clusters, args.seed)
    index_s = build_index(index, x)
    print(f"indexed {args.n} x {DIM} synthetic vectors in {index_s:.1f} s", flush=True)
    items = queries(x, args.queries + 1, args.seed)
    del x
    rows: dict[str, dict] = {}

    with Searcher.open(index) as plain:
        rows["plain"] = {**summary(timed(plain, items, args.k)), "computed": 0}
    print(f"plain: {rows['plain']}", flush=True)

    with Searcher.open(index, rerank=["dba"]) as dba:
        (state,) = dba_states(dba)
        rows["dba"] = {
            **summary(timed(dba, items, args.k)),
            "computed": state.computed,
            "stored": state.stored,
        }
        # what storing dba.npz cost inside that first query: the same save, to a scratch file
        with tempfile.TemporaryDirectory(prefix="dba-save-") as scratch:
            start = time.perf_counter()
            state.current().save(Path(scratch) / DBA_NAME)
            rows["dba"]["save_ms"] = round(1000.0 * (time.perf_counter() - start), 1)
        print(f"dba: {rows['dba']}", flush=True)
        qe = dba.with_stages(["dba", "alpha-qe"])
        (qe_state,) = dba_states(qe)
        rows["dba+alpha-qe"] = {
            **summary(timed(qe, items, args.k)),
            "computed": qe_state.computed - rows["dba"]["computed"],
            "shares_dba": qe_state is state,
        }
        print(f"dba+alpha-qe: {rows['dba+alpha-qe']}", flush=True)

        naive_items = items[1 : 1 + args.naive_queries]
        conf = DBA_PRESETS["dba"]
        rebuild = RebuildPerQuery(dba, conf.k, conf.alpha)
        naive = Searcher(
            dba.store,
            None,
            [DBARerank(rebuild, conf, "dba")],
            conf=dba.conf,
            resources=dba.resources,
        )
        naive_ms, naive_ids = timed(naive, naive_items, args.k, keep=True)
        _, dba_ids = timed(dba, naive_items, args.k, keep=True)
        same = all(np.array_equal(a, b) for a, b in zip(naive_ids, dba_ids, strict=True))
        rows["naive"] = {
            "per_query_ms": [round(v, 1) for v in naive_ms],
            "mean_ms": round(float(np.mean(naive_ms)), 1),
            "queries": len(naive_ms),
            "computed": rebuild.computed,
            "same_ranking_as_dba": bool(same),
        }
        print(f"naive: {rows['naive']}", flush=True)

    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(index),
        *("--n", str(args.n), "--seed", str(args.seed), "--clusters", str(args.clusters)),
        *("--k", str(args.k), "--child-queries", str(args.child_queries)),
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    process_s = time.perf_counter() - start
    rows["dba, new process"] = {
        **json.loads(done.stdout.strip().splitlines()[-1]),
        "process_s": round(process_s, 2),
    }
    print(f"dba, new process: {rows['dba, new process']}", flush=True)
    return {
        "index_s": round(index_s, 2),
        "dba_npz_bytes": (index / DBA_NAME).stat().st_size,
        **rows,
    }


def print_table(report: dict) -> None:
    r = report["results"]
    print(
        f"\n{report['n']} x {DIM} vectors, k = {report['k']}, {report['machine']}, load average "
        + " / ".join(f"{v:.2f}" for v in report["load_average_start"])
    )
    print("| searcher | first query ms | steady median ms | steady p90 ms | DBA computed |")
    print("|---|---|---|---|---|")
    for name in ("plain", "dba", "dba+alpha-qe", "dba, new process"):
        row = r[name]
        print(
            f"| {name} | {row['first_ms']:.1f} | {row['steady_median_ms']:.2f} "
            f"| {row['steady_p90_ms']:.2f} | {row['computed']} |"
        )
    naive = r["naive"]
    print(
        f"| naive (DBA rebuilt per query) | {naive['per_query_ms'][0]:.0f} | "
        f"{naive['mean_ms']:.0f} (mean of {naive['queries']}) | | {naive['computed']} |"
    )
    print(
        f"dba first query: computing and storing the DBA ({r['dba_npz_bytes'] / 1e6:.0f} MB "
        f"dba.npz; a save alone takes {r['dba']['save_ms']:.0f} ms); new process: "
        f"Searcher.open {r['dba, new process']['open_ms']:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="indexed vectors")
    parser.add_argument("--clusters", type=int, default=500, help="clusters of the vectors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--queries", type=int, default=100, help="steady-state queries")
    parser.add_argument("--naive-queries", type=int, default=2, help="naive baseline queries")
    parser.add_argument("--child-queries", type=int, default=20, help="queries of (d)")
    parser.add_argument("--index-dir", type=Path, default=None, help="a new or empty folder")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # (d), run by this script
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.queries < 50:
        parser.error("--queries must be at least 50 (the steady state)")
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.machine().replace('_', '-')}",
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "n": args.n,
        "dim": DIM,
        "clusters": args.clusters,
        "seed": args.seed,
        "k": args.k,
        "dba": {"k": DBA_PRESETS["dba"].k, "alpha": DBA_PRESETS["dba"].alpha},
    }
    with tempfile.TemporaryDirectory(prefix="dba-searcher-") as tmp:
        index = args.index_dir or Path(tmp) / "index"
        report["results"] = measure(args, index)
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "dba_searcher.json"
    path.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
