"""Approximate search at 1M: recall@10 against exact search, speed, build time, memory.

    .venv/bin/python benchmarks/ann.py --data ../shared/data --out bench_out/ann \
        [--n 1000000] [--queries 1000] [--skip-lookalike] [--milvus]

**The vectors.** 1M x 256-d vectors drawn to look like lookalike's own index space: the
``default`` preset's raw descriptors (1280-d R-MAC of EfficientNet-Lite0) of the 805 Holidays
and 845 Oxford photos, PCA-whitened to 256-d as an index does, are the anchors; each
synthetic vector is ``l2n((1 - t) a + t b + s g)``: an anchor ``a``, a second anchor ``b``
mixed in with ``t ~ Beta(2, 6)`` (one scene seen partly like another), and Gaussian noise
``g`` shaped by the anchors' own covariance, ``s`` set so that a synthetic vector keeps a
cosine of about 0.7 to its anchor (another photo of the same scene). Uniform noise has no
neighbourhood structure; this has the real descriptors' spectrum and their clusters (about
600 vectors per anchor, as many photos of one landmark). Queries: 500 near-duplicates of
database vectors (cosine about 0.9: an edited copy) and 500 fresh draws (a new photo of a
known scene). The printed similarity profile (top-1 and 10th-neighbour cosines) compares
them with real Holidays queries against the real Holidays database.

**Measured** per structure (faiss directly): build time (train + add, 2 threads), bytes
per vector (the serialised structure), and for each search setting (efSearch, nprobe)
recall@10 against exact search, queries/s and p50 / p99 latency single-threaded one query
at a time, and queries/s single-threaded in batches of 64. Then the same through
lookalike (an index of the 1M vectors with ``--index-preset`` ``auto``, ``ivfsq8`` and
``ivfpq``, searched through the ``Searcher`` with vector queries, in a fresh process whose
peak resident memory
is reported: the target is < 1 GB for IVF-PQ, which needs the float32 vectors on disk
only), and the exact batch target (64 queries over 100k vectors). ``--milvus``: Milvus Lite
HNSW over the same vectors, ef swept.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np

K = 10
BATCH = 64
HERE = Path(__file__).resolve()


# -- the vectors --------------------------------------------------------------------------------


def real_descriptors(data: Path, out: Path) -> dict[str, np.ndarray]:
    """The ``default`` preset's raw descriptors of Holidays and Oxford (cached)."""
    cache = out / "real.npz"
    if cache.exists():
        with np.load(cache) as f:
            return dict(f)
    from lookalike.extract import Extractor, get_preset

    extractor = Extractor(get_preset("default"))
    found = {}
    for name in ("holidays", "oxford5k"):
        files = sorted((data / name / "jpg").glob("*.jpg"))
        rows, names = [], []
        for decoded, desc in extractor.extract_files(files):
            rows.append(desc.global_)
            names += [Path(d.path).stem for d in decoded if d.error is None]
        found[name] = np.concatenate(rows)
        found[f"{name}_names"] = np.array(names)
        print(f"described {len(names)} {name} photos")
    np.savez(cache, **found)
    return found


def whiten(raw: np.ndarray) -> np.ndarray:
    from lookalike.extract import get_preset
    from lookalike.whitening import WhiteningConf, learn_whitening

    conf = getattr(get_preset("default"), "whitening", None)
    if not isinstance(conf, WhiteningConf):
        conf = WhiteningConf(dim=256)
    return learn_whitening(raw, conf).apply(raw)


def l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthesize(anchors: np.ndarray, n: int, rng: np.random.Generator, chunk: int = 100_000):
    """``n`` vectors around the anchors (module docstring); also the anchor of each."""
    d = anchors.shape[1]
    cov = np.cov(anchors, rowvar=False)
    chol = np.linalg.cholesky(cov + 1e-6 * np.eye(d))
    noise_scale = 0.7 / np.sqrt(np.trace(cov))  # |noise| ~ 0.7 |anchor|: cosine ~ 0.7 to it
    out = np.empty((n, d), dtype=np.float32)
    source = rng.integers(0, len(anchors), n)
    for begin in range(0, n, chunk):
        end = min(n, begin + chunk)
        a = anchors[source[begin:end]]
        b = anchors[rng.integers(0, len(anchors), end - begin)]
        t = rng.beta(2, 6, (end - begin, 1))
        g = rng.standard_normal((end - begin, d)) @ chol.T
        out[begin:end] = l2n((1 - t) * a + t * b + noise_scale * g)
    return out, source


def queries_for(db: np.ndarray, anchors: np.ndarray, n: int, rng: np.random.Generator):
    """Half near-duplicates of database vectors, half fresh draws."""
    half = n // 2
    picked = db[rng.integers(0, len(db), half)]
    dup = l2n(picked + 0.45 * rng.standard_normal(picked.shape) / np.sqrt(db.shape[1]))
    fresh, _ = synthesize(anchors, n - half, rng)
    return np.concatenate([dup, fresh]).astype(np.float32)


def profile(db: np.ndarray, queries: np.ndarray) -> dict:
    """Median cosine of the nearest and of the 10th nearest neighbour."""
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    sims, _ = index.search(queries, K + 1)
    return {
        "top1": round(float(np.median(sims[:, 0])), 3),
        "top10": round(float(np.median(sims[:, 9])), 3),
    }


# -- timing ---------------------------------------------------------------------------------


def timed_search(search, queries: np.ndarray, gt: np.ndarray, one_by_one: int) -> dict:
    """Recall@10, single-threaded latency one query at a time (the first ``one_by_one``
    queries) and batch throughput."""
    faiss.omp_set_num_threads(1)
    latencies, found = [], []
    for q in queries[:one_by_one]:
        started = time.perf_counter()
        found.append(search(q[None])[1][0])
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    batched = [search(queries[i : i + BATCH])[1] for i in range(0, len(queries), BATCH)]
    batch_s = time.perf_counter() - started
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    ids = np.concatenate(batched)
    recall = np.mean([len(set(ids[i]) & set(gt[i])) / K for i in range(len(gt))])
    ms = np.asarray(latencies) * 1000
    return {
        "recall10": round(float(recall), 4),
        "qps_1thread": round(len(latencies) / (ms.sum() / 1000), 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "qps_batch64_1thread": round(len(queries) / batch_s, 1),
    }


def faiss_structures(db, queries, gt, n_single) -> list[dict]:
    d, n = db.shape[1], len(db)
    nlist = 4096
    rows = []
    sample = db[np.random.default_rng(1).choice(n, min(n, 100 * nlist), replace=False)]
    print("training the shared IVF4096 coarse quantizer ...", flush=True)
    started = time.perf_counter()
    coarse = faiss.IndexFlatIP(d)
    kmeans = faiss.Clustering(d, nlist)
    kmeans.niter, kmeans.seed = 20, 1
    kmeans.train(sample, coarse)
    coarse_s = time.perf_counter() - started

    def ivf(kind: str):
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(faiss.rev_swig_ptr(coarse.get_xb(), nlist * d).reshape(nlist, d).copy())
        if kind == "Flat":
            return faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT), quantizer
        if kind == "SQ8":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
            return index, quantizer
        index = faiss.IndexIVFPQ(quantizer, d, nlist, 32, 8, faiss.METRIC_INNER_PRODUCT)
        index.do_polysemous_training = False
        return index, quantizer

    plans = [
        ("Flat", lambda: faiss.IndexFlatIP(d), None, [None]),
        ("HNSW32", lambda: faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT), "ef",
         [16, 32, 64, 128, 256]),
        ("HNSW32,SQ8", lambda: faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, 32,
                                                  faiss.METRIC_INNER_PRODUCT), "ef",
         [16, 32, 64, 128, 256]),
        ("IVF4096,Flat", lambda: ivf("Flat"), "nprobe", [1, 4, 16, 64]),
        ("IVF4096,SQ8", lambda: ivf("SQ8"), "nprobe", [1, 4, 16, 64]),
        ("IVF4096,PQ32", lambda: ivf("PQ"), "nprobe", [1, 4, 16, 64, 256]),
    ]  # fmt: skip
    for name, make, knob, values in plans:
        print(f"{name}: building ...", flush=True)
        started = time.perf_counter()
        made = make()
        index = made[0] if isinstance(made, tuple) else made
        if not index.is_trained:
            index.train(sample)
        index.add(db)
        build_s = time.perf_counter() - started + (coarse_s if name.startswith("IVF") else 0)
        size = len(faiss.serialize_index(index))
        for value in values:
            if knob == "ef":
                index.hnsw.efSearch = value
            elif knob == "nprobe":
                index.nprobe = value
            single = n_single if name != "Flat" else min(n_single, 100)
            row = {
                "structure": name,
                "param": f"{knob}={value}" if knob else "exact",
                "build_s": round(build_s, 1),
                "bytes_per_vector": round(size / n, 1),
                **timed_search(lambda q, index=index: index.search(q, K), queries, gt, single),
            }
            rows.append(row)
            print("  ", row, flush=True)
        del index, made
        gc.collect()
    return rows


# -- through lookalike -------------------------------------------------------------------------


def lookalike_index(db: np.ndarray, root: Path, preset: str) -> float:
    """An index of ``db`` (raw = index space: no whitening) with an index preset."""
    from lookalike.index import IndexStore, NewImage, get_index_conf

    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    descriptor = {"model": "synthetic", "pooling": "gem"}
    with IndexStore.create(root, descriptor, db.shape[1], get_index_conf(preset)) as store:
        step = 65536
        for begin in range(0, len(db), step):
            part = db[begin : begin + step]
            store.add(
                [NewImage(path=f"/synthetic/{i}") for i in range(begin, begin + len(part))], part
            )
        store.checkpoint()  # trains and builds the structure
        print(f"  lookalike {preset}: {store.stats()['structure']}", flush=True)
    return time.perf_counter() - started


SERVE = """
import json, sys, time

def peak_rss_mb():  # VmHWM: this process's own peak (ru_maxrss survives the fork and exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)

import numpy as np
from lookalike.query import Query
from lookalike.search import Searcher
root, queries_file, gt_file = sys.argv[1:4]
queries, gt = np.load(queries_file), np.load(gt_file)
started = time.perf_counter()
with Searcher.open(root, rerank=[]) as searcher:
    opened = time.perf_counter() - started
    import faiss
    faiss.omp_set_num_threads(1)
    latencies, found = [], []
    for q in queries:
        t = time.perf_counter()
        ranking = searcher.search([Query(vector=q)], k=10)
        latencies.append(time.perf_counter() - t)
        found.append(ranking.ids[0])
    structure = searcher.store.stats()["structure"]
ids = np.asarray(found)
recall = float(np.mean([len(set(ids[i]) & set(gt[i])) / 10 for i in range(len(gt))]))
ms = np.asarray(latencies) * 1000
print(json.dumps({"structure": structure, "open_s": round(opened, 1), "recall10": round(recall, 4),
    "qps_1thread": round(len(ms) / (ms.sum() / 1000), 1),
    "p50_ms": round(float(np.percentile(ms, 50)), 3),
    "p99_ms": round(float(np.percentile(ms, 99)), 3),
    "peak_rss_mb": peak_rss_mb()}))
"""


def through_lookalike(db, queries, gt, out: Path) -> list[dict]:
    np.save(out / "queries.npy", queries)
    # the store's ids start at 1 and follow the rows: ground truth ids are rows + 1
    np.save(out / "gt_ids.npy", gt + 1)
    rows, inputs = [], ("queries.npy", "gt_ids.npy")
    for preset in ("auto", "ivfsq8", "ivfpq"):
        root = out / f"lookalike-{preset}.idx"
        build = lookalike_index(db, root, preset)
        result = subprocess.run(
            [sys.executable, "-c", SERVE, str(root), *(str(out / f) for f in inputs)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        row = {
            "preset": preset,
            "build_s": round(build, 1),
            **json.loads(result.stdout.splitlines()[-1]),
        }
        rows.append(row)
        print("  ", row, flush=True)
    return rows


def exact_batch_100k(db: np.ndarray, queries: np.ndarray) -> dict:
    """64 queries over 100k vectors, exact: raw faiss and lookalike's faiss backend."""
    from lookalike.index import IndexConf
    from lookalike.index.backends.faiss_backend import FaissBackend

    part = db[:100_000]
    backend = FaissBackend.create(IndexConf(), part.shape[1])
    backend.add(part, np.arange(len(part), dtype=np.int64))
    batch = queries[:BATCH]
    out = {}
    for threads in (1, os.cpu_count() or 1):
        faiss.omp_set_num_threads(threads)
        backend.search(batch, K)
        started = time.perf_counter()
        for _ in range(5):
            backend.search(batch, K)
        out[f"ms_per_query_{threads}thread"] = round(
            (time.perf_counter() - started) * 1000 / (5 * BATCH), 3
        )
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return out


def milvus_hnsw(db, queries, gt, out: Path, n: int | None = None) -> list[dict]:
    """Milvus Lite HNSW over the first ``n`` vectors (all by default), ef swept."""
    from pymilvus import DataType, MilvusClient

    if n is not None and n < len(db):  # a prefix: its own exact top 10
        db = db[:n]
        exact = faiss.IndexFlatIP(db.shape[1])
        exact.add(db)
        gt = exact.search(queries, K)[1]

    path = out / "milvus-ann.db"
    for leftover in out.glob("milvus-ann.db*"):  # Lite's data directory and its lock
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    client = MilvusClient(str(path))
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=db.shape[1])
    params = client.prepare_index_params()
    # Milvus Lite reads its build parameters from one "params" key (pymilvus's separate keys
    # are dropped; see lookalike.index.backends.milvus_backend)
    build = {"M": 32, "efConstruction": 40}
    params.add_index("vector", index_type="HNSW", metric_type="IP", params={"params": build})
    started = time.perf_counter()
    client.create_collection("ann", schema=schema, index_params=params)
    for begin in range(0, len(db), 20_000):
        part = db[begin : begin + 20_000]
        client.insert("ann", [{"id": begin + i, "vector": v} for i, v in enumerate(part.tolist())])
    client.flush("ann")
    client.release_collection("ann")  # a load builds the index of every flushed segment now
    client.load_collection("ann")
    build = time.perf_counter() - started
    rows = []
    for ef in (16, 64, 256):
        latencies, found = [], []
        for q in queries[:300]:
            t = time.perf_counter()
            hits = client.search("ann", [q.tolist()], limit=K, search_params={"params": {"ef": ef}})
            latencies.append(time.perf_counter() - t)
            found.append([h["id"] for h in hits[0]])
        recall = np.mean([len(set(found[i]) & set(gt[i])) / K for i in range(len(found))])
        ms = np.asarray(latencies) * 1000
        row = {
            "structure": f"Milvus Lite HNSW M=32 ({len(db)} vectors)",
            "param": f"ef={ef}",
            "build_s": round(build, 1),
            "recall10": round(float(recall), 4),
            "qps_1client": round(len(ms) / (ms.sum() / 1000), 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
        }
        rows.append(row)
        print("  ", row, flush=True)
    client.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("bench_out/ann"))
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=1000, help="queries timed one at a time")
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--skip-lookalike", action="store_true")
    parser.add_argument("--milvus", action="store_true")
    parser.add_argument(
        "--milvus-n", type=int, default=None, help="Milvus Lite over the first N vectors only"
    )
    parser.add_argument("--only-milvus", action="store_true", help="skip faiss and lookalike")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_version()}, faiss {faiss.__version__}",
        "n": args.n,
    }  # fmt: skip
    real = real_descriptors(args.data, args.out)
    raw = np.concatenate([real["holidays"], real["oxford5k"]])
    anchors = whiten(raw)
    d = anchors.shape[1]
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    db, _ = synthesize(anchors, args.n, rng)
    queries = queries_for(db, anchors, args.queries, rng)
    print(
        f"{args.n} x {d}-d vectors and {len(queries)} queries drawn in "
        f"{time.perf_counter() - started:.0f} s"
    )
    # the neighbourhoods, beside the real ones: Holidays queries against the Holidays database
    holidays = anchors[: len(real["holidays"])]
    names = real["holidays_names"]
    is_query = np.array([int(s) % 100 == 0 for s in names])
    results["profile"] = {
        "real holidays (query photos vs the others)": profile(
            holidays[~is_query], holidays[is_query]
        ),
        "synthetic (all queries)": profile(db, queries),
        "synthetic near-duplicates": profile(db, queries[: len(queries) // 2]),
        "synthetic fresh draws": profile(db, queries[len(queries) // 2 :]),
    }
    print(json.dumps(results["profile"], indent=1))
    exact = faiss.IndexFlatIP(d)
    exact.add(db)
    started = time.perf_counter()
    _, gt = exact.search(queries, K)
    print(f"ground truth in {time.perf_counter() - started:.1f} s")
    del exact
    if args.only_milvus:
        args.skip_faiss, args.skip_lookalike, args.milvus = True, True, True
    else:
        results["exact_batch_100k"] = exact_batch_100k(db, queries)
        print("exact, 64 queries over 100k:", results["exact_batch_100k"], flush=True)
    out = args.out
    report = out / ("ann-milvus.json" if args.only_milvus else "ann.json")
    phases = [
        ("faiss", not args.skip_faiss, lambda: faiss_structures(db, queries, gt, args.single)),
        ("lookalike", not args.skip_lookalike, lambda: through_lookalike(db, queries, gt, out)),
        ("milvus", args.milvus, lambda: milvus_hnsw(db, queries, gt, args.out, args.milvus_n)),
    ]
    for name, wanted, run in phases:
        if wanted:
            results[name] = run()
            report.write_text(json.dumps(results, indent=1))  # kept if killed
    results["peak_rss_mb_benchmark"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    report.write_text(json.dumps(results, indent=1))
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
