"""Retrieval benchmark: Holidays and Oxford5k (845) mAP and throughput, default preset
against the naive baseline, measured side by side in one run; plus exact-search latency
on 100k synthetic vectors.

    .venv/bin/python benchmarks/retrieval.py --data ../shared/data [--presets default,rotation]

The naive baseline is what the seeds did: eager PyTorch, one image at a time decoded in the
main process, single scale, global average pooling, brute-force cosine in numpy.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lookalike.evaluate import apply_exclusions, evaluate_rankings, load_dataset
from lookalike.evaluate.run import evaluate_dataset
from lookalike.extract import get_preset
from lookalike.functional import l2n_np
from lookalike.index import IndexConf, IndexStore
from lookalike.models import create_backbone

# The seeds' input size per data set (../shared/data/README.md reference figures).
NAIVE_SIZE = {"holidays": 400, "oxford5k": 512}


def naive_baseline(dataset, size: int) -> dict:
    """Eager PyTorch, GAP, one image at a time, brute-force numpy search."""
    backbone = create_backbone("efficientnet_lite0").eval()
    mean = torch.tensor(backbone.mean)[:, None, None]
    std = torch.tensor(backbone.std)[:, None, None]

    def describe(path, box=None) -> np.ndarray:
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        if box is not None:
            img = img.crop(tuple(round(v) for v in box))
        img.thumbnail((size, size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)
        with torch.inference_mode():
            f = backbone(((x - mean) / std)[None])
        return l2n_np(f.mean(dim=(2, 3)).numpy())[0]

    start = time.perf_counter()
    db = np.stack([describe(p) for p in dataset.images])
    index_s = time.perf_counter() - start
    start = time.perf_counter()
    q = np.stack([describe(qr.image, qr.box) for qr in dataset.queries])
    rankings = [
        apply_exclusions(np.argsort(-(db @ v)), qr)
        for v, qr in zip(q, dataset.queries, strict=True)
    ]
    query_s = time.perf_counter() - start
    metrics = evaluate_rankings(
        rankings, [qr.positives for qr in dataset.queries], [qr.junk for qr in dataset.queries]
    )
    return {
        "metrics": metrics,
        "images_per_second": len(db) / index_s,
        "query_ms": 1000 * query_s / len(q),
    }


def search_latency(n: int = 100_000, dim: int = 1280, queries: int = 200) -> dict:
    """Single-query latency of the exact index vs numpy brute force, synthetic vectors."""
    rng = np.random.default_rng(0)
    x = l2n_np(rng.standard_normal((n, dim), dtype=np.float32))
    q = l2n_np(x[rng.choice(n, queries)] + 0.1 * rng.standard_normal((queries, dim)))
    with tempfile.TemporaryDirectory() as tmp:
        store = IndexStore.create(Path(tmp) / "idx", {"synthetic": True}, dim, IndexConf())
        from lookalike.index import NewImage

        for start in range(0, n, 10_000):
            rows = range(start, min(n, start + 10_000))
            store.add(
                [NewImage(path=f"/synthetic/{i}") for i in rows], x[start : start + len(rows)]
            )
        store.checkpoint()
        store.search(q[:1], 10)  # warm-up
        t = time.perf_counter()
        for v in q:
            store.search(v[None], 10)
        ours = 1000 * (time.perf_counter() - t) / queries
        store.close()
    t = time.perf_counter()
    for v in q:
        s = x @ v
        np.argpartition(-s, 10)[:10]
    naive = 1000 * (time.perf_counter() - t) / queries
    return {"vectors": n, "dim": dim, "exact_ms": ours, "naive_numpy_ms": naive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--datasets", default="holidays,oxford5k")
    parser.add_argument("--presets", default="default")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.node()}",
        "results": [],
    }
    for name in args.datasets.split(","):
        dataset = load_dataset(name, args.data / name)
        if not args.no_baseline:
            base = naive_baseline(dataset, NAIVE_SIZE[name])
            row = {"dataset": name, "method": "naive", **base}
            report["results"].append(row)
            print(
                f"{name:9s} naive    mAP {base['metrics']['mAP']:5.1f}  "
                f"{base['images_per_second']:5.1f} img/s  {base['query_ms']:6.1f} ms/query",
                flush=True,
            )
        for preset in args.presets.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                res = evaluate_dataset(dataset, Path(tmp) / "index", get_preset(preset))
            row = {"dataset": name, "method": preset, **res}
            report["results"].append(row)
            line = (
                f"{name:9s} {preset:8s} mAP {res['metrics']['mAP']:5.1f}  "
                f"{res['images_per_second']:5.1f} img/s  {res['query_ms']:6.1f} ms/query"
            )
            if not args.no_baseline:
                line += f"  ({res['images_per_second'] / base['images_per_second']:.1f}x naive)"
            print(line, flush=True)
    # 256-d is what the default preset's index holds (its whitening reduces 1280 -> 256)
    report["search_latency"] = [search_latency(dim=dim) for dim in (256, 1280)]
    for lat in report["search_latency"]:
        print(
            f"search 100k x {lat['dim']}-d: exact index {lat['exact_ms']:.2f} ms/query, "
            f"numpy brute force {lat['naive_numpy_ms']:.2f} ms/query",
            flush=True,
        )
    (args.out / "retrieval.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out / 'retrieval.json'}")


if __name__ == "__main__":
    main()
