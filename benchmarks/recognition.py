"""Recognition benchmark: Oxford landmarks among Holidays distractors, GAP and rejection.

    .venv/bin/python benchmarks/recognition.py --data ../shared/data [--out bench_out] \
        [--verify --local-weights ../shared/data/weights/aliked-n16.pth]

Gallery: the 845 Oxford images, labelled by landmark (an image in the good or ok list of a
landmark's queries takes that landmark; junk-only images stay unlabelled), plus the 805
Holidays images, unlabelled (distractors). Queries: the 55 cropped Oxford queries (true
label: their landmark) and the 295 Holidays queries (``id % 100 == 0``; no true label, so
any prediction is wrong). The Holidays query images are in the gallery themselves, as
unlabelled images: that is the protocol.

The index (``bench_out/recognition-index``, default preset) is built once and the top-50
neighbours of every query are cached in ``bench_out/recognition-hits.json``; every
confidence option, p and k is then evaluated from the cache in a second (``--rebuild`` /
``--research`` start over). Two variants are scored: ``protocol`` (as above) and
``new_photos``, a stress test where each query's own image is dropped from its neighbours
(a new photo of a known landmark; a Holidays query meets only its scene-mates). Results go
to ``bench_out/recognition.json``.

``--verify`` also stores the gallery's local features (``index --local aliked``, the
``default`` verify preset) and searches every query again with ``--rerank verify``: the
neighbours are re-ranked by geometric verification (their scores become similarity + the
inlier bonus, so verified neighbours dominate the vote) and the ``inliers`` confidence is
scored too (``recognition-hits-verify.json``, section ``verify`` of the report).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import shutil
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from lookalike.evaluate import load_dataset
from lookalike.evaluate.metrics import global_average_precision
from lookalike.extract import get_preset
from lookalike.indexing import index_files
from lookalike.labels import label_of, labels_from_csv
from lookalike.local.conf import VERIFY_PRESETS, VerifyConf
from lookalike.query import Query
from lookalike.recognize import CONFIDENCE, DEFAULT_CONFIDENCE, DEFAULT_P, predict
from lookalike.search import Hit, Searcher

SEARCH_K = 50  # neighbours cached per query
PS = (1.0, 3.0, 8.0)
KS = (5, 10, 20, 50)
MAIN_K = 10  # the Recognizer's default k


def oxford_landmarks(gt_dir: Path) -> dict[str, str]:
    """Image name -> landmark, for every image in a good or ok list.

    An image listed for two landmarks takes the one that lists it as good (then the one
    listing it most often, then the first by name); in the data, one image
    (listed good for radcliffe_camera, ok for all_souls) is in this case.
    """
    votes: dict[str, Counter] = defaultdict(Counter)
    for path in sorted(gt_dir.glob("*_*_good.txt")) + sorted(gt_dir.glob("*_*_ok.txt")):
        m = re.fullmatch(r"(.+)_\d+_(good|ok)\.txt", path.name)
        weight = 1000 if m.group(2) == "good" else 1
        for line in path.read_text().split("\n"):
            if line.strip():
                votes[line.split()[0]][m.group(1)] += weight
    return {
        name: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for name, c in votes.items()
    }


def landmark_of_query(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


def build(
    data: Path, out: Path, rebuild: bool, local: VerifyConf | None
) -> tuple[Path, list[dict]]:
    """Write the label CSV, index the gallery (resumable; with local features when
    ``local`` is given), list the queries."""
    oxford = load_dataset("oxford5k", data / "oxford5k")
    holidays = load_dataset("holidays", data / "holidays")
    landmarks = oxford_landmarks(data / "oxford5k" / "gt_files")
    csv_path = out / "recognition-labels.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p in oxford.images:
            w.writerow([str(p.resolve()), landmarks.get(p.stem, "")])
    index_dir = out / "recognition-index"
    if rebuild and index_dir.exists():
        shutil.rmtree(index_dir)
    gallery = list(oxford.images) + list(holidays.images)
    t = time.perf_counter()
    report = index_files(
        gallery,
        index_dir,
        get_preset("default"),
        metadata=labels_from_csv(csv_path),
        local=local,
    )
    print(
        f"indexed {report.added + report.updated} images ({len(report.failed)} failed), "
        f"local features of {report.local_described}, in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    queries = [
        {
            "name": q.name,
            "kind": "oxford",
            "image": str(q.image.resolve()),
            "box": list(q.box),
            "label": landmark_of_query(q.name),
        }
        for q in oxford.queries
    ]
    queries += [
        {"name": q.name, "kind": "holidays", "image": str(q.image.resolve()), "box": None}
        | {"label": None}
        for q in holidays.queries
    ]
    return index_dir, queries


def search(index_dir: Path, queries: list[dict], rerank: tuple[str, ...] = ()) -> dict:
    """Top-SEARCH_K neighbours of every query (with their inliers when verified)."""
    queries = [dict(q) for q in queries]
    with Searcher.open(index_dir, rerank) as searcher:
        items = [
            Query(image=q["image"], box=tuple(q["box"]) if q["box"] else None) for q in queries
        ]
        t = time.perf_counter()
        ranking = searcher.search(items, k=SEARCH_K)
        seconds = time.perf_counter() - t
        results = searcher.results(ranking)
        n_labelled = sum(label_of(r.metadata) is not None for r in searcher.store.records("ok"))
        gallery = len(searcher)
    for q, hits in zip(queries, results, strict=True):
        q["hits"] = [
            [
                h.id,
                round(h.score, 6),
                h.path,
                label_of(h.metadata),
                -1 if h.inliers is None else h.inliers,
            ]
            for h in hits
        ]
    return {
        "gallery": gallery,
        "labelled": n_labelled,
        "query_ms": 1000 * seconds / len(queries),
        "rerank": list(rerank),
        "queries": queries,
    }


def to_hits(rows: list, drop_path: str | None = None) -> tuple[list[Hit], np.ndarray]:
    """Cached rows -> hits and their inlier counts (-1: not verified)."""
    kept = [row for row in rows if row[2] != drop_path]
    hits = [
        Hit(r + 1, row[0], row[2], row[1], {"label": row[3]} if row[3] else {})
        for r, row in enumerate(kept)
    ]
    inliers = np.array([row[4] if len(row) > 4 else -1 for row in kept], dtype=np.float64)
    return hits, inliers


def evaluate(
    queries: list[dict], k: int, p: float, method: str, drop_self: tuple[str, ...] = ()
) -> dict:
    """GAP, accuracy and rejection figures of one setting from the cached neighbours.

    ``drop_self``: query kinds ("oxford", "holidays") whose own image is dropped from their
    neighbours (the query then is a new photo, not one already in the gallery).
    """
    preds, confs, truths, kinds = [], [], [], []
    for q in queries:
        hits, inliers = to_hits(q["hits"], q["image"] if q["kind"] in drop_self else None)
        verified = inliers[:k] if (inliers[:k] >= 0).all() and len(hits) else None
        pred = predict(hits[:k], p=p, confidence=method, inliers=verified)
        preds.append(pred.label)
        confs.append(pred.confidence)
        truths.append(q["label"])
        kinds.append(q["kind"])
    confs_arr = np.asarray(confs, dtype=np.float64)
    made = np.array([x is not None for x in preds])
    correct = np.array([x is not None and x == t for x, t in zip(preds, truths, strict=True)])
    wrong = made & ~correct
    holidays = np.array([kd == "holidays" for kd in kinds])
    # the confidence above which 90 % of the correct landmark predictions rank
    p10 = float(np.percentile(confs_arr[correct], 10)) if correct.any() else float("nan")
    above = confs_arr > p10
    top_wrong = confs_arr[wrong].max(initial=-np.inf)
    return {
        "k": k,
        "p": p,
        "confidence": method,
        "drop_self": list(drop_self),
        "GAP": round(global_average_precision(preds, confs_arr, truths), 5),
        "accuracy": round(float(correct[~holidays].sum()) / int((~holidays).sum()), 4),
        "p10_correct": round(p10, 4),  # the 90 % line
        "holidays_above_p10": int((above & holidays & made).sum()),  # target: 0
        "confident_wrong": int((above & wrong).sum()),  # any wrong answer above the 90 % line
        "wrong": int(wrong.sum()),  # wrong predictions made (the rest abstained: no labelled
        #   neighbour in the top k)
        "clean": int((confs_arr[correct] > top_wrong).sum()),  # correct answers ranked above
        #   every wrong one (recall at zero false positives, of 55)
        "max_holidays": round(float(confs_arr[holidays & made].max(initial=-np.inf)), 4),
        "min_correct": round(float(confs_arr[correct].min(initial=np.inf)), 4),
    }


HEADER = (
    f"{'confidence':10s} {'k':>3s} {'p':>2s} {'GAP':>7s} {'acc':>6s} {'90% line':>8s} "
    f"{'hol>line':>8s} {'conf.wrong':>10s} {'wrong':>5s} {'clean':>5s} "
    f"{'max hol':>7s} {'min corr':>8s}"
)


def print_table(rows: list[dict]) -> None:
    print(HEADER)
    for r in rows:
        print(
            f"{r['confidence']:10s} {r['k']:3d} {r['p']:2.0f} {r['GAP']:7.4f} "
            f"{r['accuracy']:6.3f} {r['p10_correct']:8.4g} {r['holidays_above_p10']:8d} "
            f"{r['confident_wrong']:10d} {r['wrong']:5d} {r['clean']:5d} "
            f"{r['max_holidays']:7.4g} {r['min_correct']:8.4g}"
        )


VARIANTS = {
    "protocol": (),
    # stress test, not the protocol: every query's own image dropped from its neighbours,
    # so queries are new photos (and Holidays queries meet only their scene-mates)
    "new_photos": ("oxford", "holidays"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--rebuild", action="store_true", help="index the gallery again")
    parser.add_argument("--research", action="store_true", help="search the queries again")
    parser.add_argument("--verify", action="store_true", help="also with --rerank verify")
    parser.add_argument("--local-weights", help="ALIKED checkpoint (aliked-n16.pth)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    local = VERIFY_PRESETS["default"].replace(weights=args.local_weights) if args.verify else None
    runs = {"plain": ((), args.out / "recognition-hits.json")}
    if args.verify:
        runs["verify"] = (("verify",), args.out / "recognition-hits-verify.json")
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.node()}",
        "preset": "default",
        "default": {"confidence": DEFAULT_CONFIDENCE, "p": DEFAULT_P, "k": MAIN_K},
    }
    built = None
    for run, (rerank, cache) in runs.items():
        if args.rebuild or args.research or not cache.exists():
            if built is None:
                built = build(args.data, args.out, args.rebuild, local)
            searched = search(*built, rerank=rerank)
            cache.write_text(json.dumps(searched))
            print(
                f"{run}: searched {len(searched['queries'])} queries, "
                f"{searched['query_ms']:.0f} ms/query",
                flush=True,
            )
        searched = json.loads(cache.read_text())
        queries = searched["queries"]
        print(
            f"\n== {run}: gallery {searched['gallery']} images ({searched['labelled']} labelled), "
            f"{len(queries)} queries, search {searched['query_ms']:.0f} ms/query (cached)"
        )
        verified = "verify" in rerank
        methods = [m for m in CONFIDENCE if verified or m != "inliers"]
        section = {
            "rerank": list(rerank),
            "gallery": searched["gallery"],
            "labelled": searched["labelled"],
            "queries": {"oxford": 55, "holidays": len(queries) - 55},
            "query_ms": round(searched["query_ms"], 1),
        }
        for variant, drop in VARIANTS.items():
            rows = [evaluate(queries, MAIN_K, p, m, drop) for m in methods for p in PS]
            k_rows = [evaluate(queries, k, DEFAULT_P, DEFAULT_CONFIDENCE, drop) for k in KS]
            print(f"\n{run} / {variant}: every confidence option and p, k = {MAIN_K}")
            print_table(rows)
            print(f"{run} / {variant}: default {DEFAULT_CONFIDENCE!r}, p = {DEFAULT_P:g}, k swept")
            print_table(k_rows)
            section[variant] = {"results": rows, "k_sweep": k_rows}
        report[run] = section
    (args.out / "recognition.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'recognition.json'}")


if __name__ == "__main__":
    main()
