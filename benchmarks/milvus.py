"""The Milvus backend against faiss on Holidays and Oxford5k, and what Milvus Lite does
with its search parameters.

    .venv/bin/python benchmarks/milvus.py --data ../shared/data [--datasets holidays,oxford5k]
        [--synthetic 20000] [--out bench_out/milvus]

Per data set: the default preset indexed once into faiss Flat (``evaluate_dataset``: mAP),
the index copied into a ``--backend milvus`` FLAT index through the store API (same ids,
raw vectors and whitening: nothing described again; Milvus Lite inside the index
directory) and evaluated the same way; then every database vector searched in both (top
100, index space): rows of identical ids, the largest score difference. Then the
approximate structures on the same index-space vectors (scratch Milvus Lite collections,
flushed so that their rows are indexed): recall@10 against the exact top 10 and ms per
query at several ``ef`` (HNSW) and ``nprobe`` (IVF_FLAT, IVF_SQ8), once more before the
flush (rows still in Lite's memtable), and the build parameters Lite records when they are
sent the way pymilvus 3 sends them. ``--synthetic N``: the same sweep on N random 256-d
vectors with 200 held-out queries, where the parameters matter more.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from lookalike.evaluate import load_dataset
from lookalike.evaluate.run import evaluate_dataset
from lookalike.extract import Extractor, get_preset
from lookalike.index import IndexConf, IndexStore, NewImage
from lookalike.index.backends import build_backend

K = 10
SWEEPS = {  # structure -> (IndexConf field, values)
    "HNSW:M=32,efConstruction=200": ("ef_search", (10, 20, 40, 80, 160, 320)),
    "IVF_FLAT:nlist=32": ("nprobe", (1, 2, 4, 8, 16, 32)),
    "IVF_SQ8:nlist=32": ("nprobe", (1, 2, 4, 8, 16, 32)),
}


def copy_index(src: Path, dst: Path, conf: IndexConf) -> None:
    """``src`` copied to a new index ``dst`` of structure ``conf``: same ids, records, raw
    vectors, whitening and query defaults (what ``reembed_index`` does, minus describing)."""
    with IndexStore.open(src) as old:
        records = sorted(old.records("ok"), key=lambda r: r.id)
        raw = old.vectors([r.id for r in records])
        whitening, m = old.whitening, old.manifest
    shutil.rmtree(dst, ignore_errors=True)
    with IndexStore.create(
        dst, m.descriptor, m.dim, conf, query=m.query, weights_hash=m.model.weights_hash
    ) as new:
        images = [
            NewImage(r.fs_path, r.content_hash, r.size, r.mtime, r.width, r.height, r.metadata)
            for r in records
        ]
        new.add(images, raw, ids=[r.id for r in records])
        if whitening is not None:
            new.set_whitening(whitening)
        new.checkpoint()


def compare(faiss_dir: Path, milvus_dir: Path, k: int = 100) -> dict:
    """Every database vector searched in both indexes (index space, top ``k``)."""
    with IndexStore.open(faiss_dir) as f, IndexStore.open(milvus_dir) as m:
        ids = [r.id for r in f.records("ok")]
        x = f.vector_source().vectors(ids)
        f_scores, f_ids = f.vector_source().search(x, k)
        t = time.perf_counter()
        m_scores, m_ids = m.vector_source().search(x, k)
        milvus_ms = 1000 * (time.perf_counter() - t) / len(x)
        same = (f_ids == m_ids).all(axis=1)
        gaps = np.diff(-f_scores, axis=1)
        return {
            "queries": len(x),
            "k": k,
            "rows_identical": int(same.sum()),
            "max_score_diff": float(np.abs(f_scores - m_scores).max()),
            # rows that differ only where faiss's neighbouring scores tie within 1e-5
            "differing_rows_near_ties": int((~same & (gaps.min(axis=1) < 1e-5)).sum()),
            "milvus_batch_ms_per_query": round(milvus_ms, 3),
            "stats": m.stats(),
        }, x


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact, strict=True)]))


def sweep(x: np.ndarray, queries: np.ndarray, label: str) -> list[dict]:
    """Recall@10 and ms/query of each Milvus structure and search parameter on ``x``."""
    ids = np.arange(len(x), dtype=np.int64)
    exact = np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :K]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for factory, (knob, values) in SWEEPS.items():
            conf = IndexConf(factory=factory, backend="milvus", **{knob: values[0]})
            t = time.perf_counter()
            backend = build_backend(conf, x.shape[1], ids, lambda r: x[r])
            insert_s = time.perf_counter() - t
            found = backend.search(queries, K)[1]  # rows in the memtable: searched exactly?
            rows.append(
                row(label, factory, f"{knob}={values[0]}", "memtable (not flushed)", found, exact)
            )
            t = time.perf_counter()
            backend.save(Path(tmp) / "milvus-0.index")  # flush: Lite indexes in the background
            flush_s = time.perf_counter() - t
            found = backend.search(queries, K)[1]
            rows.append(row(label, factory, f"{knob}={values[0]}", "just flushed", found, exact))
            t = time.perf_counter()
            backend.build_indexes()  # release + load: every flushed segment indexed now
            index_s = time.perf_counter() - t
            print(
                f"  {factory}: insert {insert_s:.1f} s, flush {flush_s:.1f} s, "
                f"release + load (index build) {index_s:.1f} s",
                flush=True,
            )
            results = {}
            for value in values:
                backend.set_search_params(
                    IndexConf(factory=factory, backend="milvus", **{knob: value})
                )
                backend.search(queries[:5], K)  # warm-up
                t = time.perf_counter()
                found = backend.search(queries, K)[1]
                ms = 1000 * (time.perf_counter() - t) / len(queries)
                results[value] = found
                rows.append(row(label, factory, f"{knob}={value}", "indexed", found, exact, ms))
            first, last = results[values[0]], results[values[-1]]
            rows[-1]["rows_changed_vs_lowest"] = int((first != last).any(axis=1).sum())
            backend.close()
    return rows


def row(label, factory, param, state, found, exact, ms=None) -> dict:
    out = {
        "data": label,
        "structure": factory,
        "param": param,
        "rows": state,
        "recall10": round(recall(found, exact), 4),
    }
    if ms is not None:
        out["ms_per_query"] = round(ms, 3)
    print("   ", out, flush=True)
    return out


def build_params_probe() -> dict:
    """What Milvus Lite records for HNSW M=8 sent as pymilvus 3 sends it (separate keys)
    and as one JSON ``params`` key (what the backend sends to Lite)."""
    from pymilvus import DataType, MilvusClient

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        client = MilvusClient(str(Path(tmp) / "probe.db"))
        for name, params in (("separate_keys", {"M": 8}), ("params_json", {"params": {"M": 8}})):
            schema = client.create_schema(auto_id=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=4)
            client.create_collection(name, schema=schema)
            index = client.prepare_index_params()
            index.add_index("vector", index_type="HNSW", metric_type="IP", params=params)
            client.create_index(name, index, sync=False)
            out[name] = client.describe_index(name, "vector").get("params", "(none recorded)")
        client.close()
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(str(Path(tmp) / "probe.db"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--datasets", default="holidays,oxford5k")
    parser.add_argument("--synthetic", type=int, default=20000, help="0: skip")
    parser.add_argument("--out", type=Path, default=Path("bench_out/milvus"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import milvus_lite
    import pymilvus

    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.node()}",
        "versions": {"pymilvus": pymilvus.__version__, "milvus_lite": milvus_lite.__version__},
        "build_params_probe": build_params_probe(),
        "datasets": [],
        "sweeps": [],
    }
    print("Lite records HNSW M=8 as:", report["build_params_probe"], flush=True)
    conf = get_preset("default")
    extractor = Extractor(conf)
    for name in filter(None, args.datasets.split(",")):
        dataset = load_dataset(name, args.data / name)
        faiss_dir, milvus_dir = args.out / name / "faiss", args.out / name / "milvus"
        shutil.rmtree(faiss_dir, ignore_errors=True)
        f = evaluate_dataset(dataset, faiss_dir, conf, IndexConf(), extractor=extractor)
        copy_index(faiss_dir, milvus_dir, IndexConf(factory="FLAT", backend="milvus"))
        m = evaluate_dataset(dataset, milvus_dir, conf, extractor=extractor)
        same, x = compare(faiss_dir, milvus_dir)
        entry = {
            "dataset": name,
            "images": len(dataset.images),
            "mAP_faiss_flat": f["metrics"]["mAP"],
            "mAP_milvus_flat": m["metrics"]["mAP"],
            "query_ms_faiss": f["query_ms"],
            "query_ms_milvus": m["query_ms"],
            **same,
        }
        report["datasets"].append(entry)
        print(
            f"{name}: mAP faiss {entry['mAP_faiss_flat']:.2f} "
            f"milvus {entry['mAP_milvus_flat']:.2f}; "
            f"{entry['rows_identical']}/{entry['queries']} top-100 rows identical, max score "
            f"diff {entry['max_score_diff']:.2e}",
            flush=True,
        )
        report["sweeps"] += sweep(x, x, f"{name} ({len(x)} x {x.shape[1]}-d, self-queries)")
    if args.synthetic:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.synthetic + 200, 256), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        label = f"synthetic ({args.synthetic} x 256-d, 200 held-out queries)"
        report["sweeps"] += sweep(x[:-200], x[-200:], label)
    (args.out / "milvus.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out / 'milvus.json'}")


if __name__ == "__main__":
    main()
