"""Geometric verification benchmark on Oxford5k (845): cost per stage and re-ranking mAP.

    .venv/bin/python benchmarks/verify.py run --data ../shared/data --out bench_out/verify \
        --features rootsift@1024,aliked@512 --weights ../shared/data/weights/aliked-n16.pth \
        --grid 0.8:1024:1024,0.9:1024:1024,0.8:1024:512,0.9:512:512 \
        --models homography@8,homography@16

``--dataset holidays`` (with another ``--out``) runs the same on INRIA Holidays (805).
Extracting ALIKED for 845 images takes ~10 min on 2 idle cores; ``extract`` fills the
feature stores only, and a second ``extract --reverse --threads 1`` works from the other end.

Steps, each cached under ``--out`` so that a rerun only pays for what is missing:

1. the global ranking: the 845 images indexed with the ``default`` preset, every cropped
   query searched against the whole index (``global-index/``, ``global.npz``);
2. local features of the 845 images and of the 55 cropped queries, in one
   :class:`~lookalike.local.LocalFeatureStore` per extractor (``<features>/db``,
   ``<features>/queries``); ``extract`` runs only this step (resumable: it can be killed);
3. for every query, the top ``--top`` candidates are loaded from the store, matched
   (mutual NN + ratio test, one matrix product per chunk of candidates) and verified
   (USAC MAGSAC++ homography or fundamental matrix); each stage is timed per query;
4. the top ``--top`` are re-ordered by each fusion of similarity and inliers (the rest keeps
   the global order) and scored with the standard protocol (mAP, junk removed).

The table goes to stdout and ``<out>/verify.json``. ``sift`` features are stored once and
reused for ``rootsift`` (same keypoints, RootSIFT descriptors computed from them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import torch

from lookalike.evaluate import apply_exclusions, evaluate_rankings, load_dataset
from lookalike.extract import Extractor, get_preset
from lookalike.images import load_image
from lookalike.index import IndexConf
from lookalike.indexing import index_files
from lookalike.local import (
    DESCRIPTORS,
    IMAGE_SIZE,
    KEYPOINTS,
    LocalFeatureStore,
    create_local_extractor,
)
from lookalike.local.features import RootSIFTExtractor, root_sift
from lookalike.local.matching import match_many, verify
from lookalike.query import Query
from lookalike.search import Searcher

logger = logging.getLogger("verify")


# -- step 1: the global ranking ------------------------------------------------------------


def global_ranking(dataset, out: Path) -> dict:
    """Scores and index ids of every database image per query, plus id -> dataset position."""
    cache = out / "global.npz"
    if cache.exists():
        data = np.load(cache)
        return {k: data[k] for k in data.files}
    conf = get_preset("default")
    extractor = Extractor(conf)
    index_dir = out / "global-index"
    index_files(dataset.images, index_dir, conf, IndexConf(), extractor=extractor)
    scores, ids, times = [], [], []
    with Searcher.open(
        index_dir, runtime=conf.runtime, device=conf.device, extractor=extractor
    ) as searcher:
        position = {str(Path(p).resolve()): i for i, p in enumerate(dataset.images)}
        records = list(searcher.store.records(status="ok"))
        to_position = np.full(max(r.id for r in records) + 1, -1, np.int64)
        for record in records:
            to_position[record.id] = position.get(record.path, -1)
        for query in dataset.queries:
            start = time.perf_counter()
            ranking = searcher.search(
                [Query(image=query.image, box=query.box)], k=0, rotations=conf.query_rotations
            )
            times.append(time.perf_counter() - start)
            scores.append(ranking.scores[0])
            ids.append(ranking.ids[0])
    result = {
        "scores": np.stack(scores),
        "ids": np.stack(ids),
        "to_position": to_position,
        "query_seconds": np.array(times),
    }
    np.savez(cache, **result)
    return result


# -- step 2: local features ----------------------------------------------------------------


def parse_features(spec: str) -> list[tuple[str, int]]:
    """``"rootsift@1024,aliked@512"`` -> ``[("rootsift", 1024), ("aliked", 512)]``."""
    out = []
    for item in spec.split(","):
        name, _, side = item.strip().partition("@")
        out.append((name, int(side) if side else 1024))
    return out


def _stores(out: Path, name: str, side: int, settings: dict, quantize: bool):
    folder = out / f"{name}@{side}"
    (folder / "db").mkdir(parents=True, exist_ok=True)
    (folder / "queries").mkdir(parents=True, exist_ok=True)
    return (
        LocalFeatureStore(folder / "db", name, settings, quantize=quantize),
        LocalFeatureStore(folder / "queries", name, settings, quantize=quantize),
    )


def extract_local(
    dataset,
    out: Path,
    name: str,
    side: int,
    max_keypoints: int,
    weights: str | None,
    reverse: bool = False,
) -> dict:
    """Fill the stores of ``name@side`` (and of rootsift alongside sift); returns timings.

    Database features are keyed by position in ``dataset.images``, query features by
    query number.
    """
    base = "sift" if name == "rootsift" else name
    weights = weights if base == "aliked" else None
    extractor = create_local_extractor(base, max_keypoints, side, weights=weights)
    targets = {base: _stores(out, base, side, extractor.settings(), False)}
    if base == "sift":  # RootSIFT from the same detections, stored quantised to uint8
        settings = RootSIFTExtractor(max_keypoints, side).settings()
        targets["rootsift"] = _stores(out, "rootsift", side, settings, True)

    def put(which: int, key: int, feats: dict) -> None:
        targets[base][which].put(key, feats)
        if "rootsift" in targets:
            root = {**feats, DESCRIPTORS: root_sift(feats[DESCRIPTORS])}
            targets["rootsift"][which].put(key, root)

    timings = {"db_seconds": [], "query_seconds": []}
    db_store, query_store = targets[name if name in targets else base]
    todo = [(i, p) for i, p in enumerate(dataset.images) if i not in db_store]
    if reverse:  # a second process working from the other end; they meet in the middle
        todo.reverse()
    for done, (key, path) in enumerate(todo, 1):
        if key in db_store:  # done by the other process meanwhile
            continue
        start = time.perf_counter()
        feats = extractor(np.asarray(load_image(path)))
        timings["db_seconds"].append(time.perf_counter() - start)
        put(0, int(key), feats)
        if done % 50 == 0 or done == len(todo):
            logger.info("%s@%d: %d / %d database images", name, side, done, len(todo))
    for q, query in enumerate(dataset.queries):
        if q in query_store:
            continue
        start = time.perf_counter()
        feats = query_features(extractor, query.image, query.box, side)
        timings["query_seconds"].append(time.perf_counter() - start)
        put(1, q, feats)
    for db, qs in targets.values():
        db.close()
        qs.close()
    return timings


def query_features(extractor, path: Path, box, side: int) -> dict:
    """Features of a cropped query at the scale its whole image is described at.

    The database images are detected at ``side`` px; a crop of one is smaller than ``side``
    and would otherwise be detected at full resolution, a scale the learned detector never
    pairs with the database's. Keypoints are returned in pixels of the crop.
    """
    full = load_image(path)
    crop = np.asarray(full if box is None else load_image(path, box=box))
    scale = min(1.0, side / max(full.size))
    if scale == 1.0:
        return extractor(crop)
    h, w = crop.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    feats = extractor(small)
    factor = np.array([w / size[0], h / size[1]], np.float32)
    return {**feats, KEYPOINTS: (feats[KEYPOINTS] + 0.5) * factor - 0.5, IMAGE_SIZE: (w, h)}


# -- step 3 and 4: verification and re-ranking -------------------------------------------


def fusions(sim: np.ndarray, inl: np.ndarray) -> dict[str, np.ndarray]:
    """Candidate fusions of ``(k,)`` similarities and inlier counts; higher is better."""
    eps = 1e-3 * sim  # similarity breaks ties
    out = {
        "inliers": inl + eps,
        "sim*sqrt(inl)": sim * np.sqrt(inl) + eps,
        "sim*log1p(inl)": sim * np.log1p(inl) + eps,
    }
    for tau in (10, 15, 20):
        out[f"verified>={tau} first"] = np.where(inl >= tau, 10.0 + inl, 0.0) + sim
    # a bonus growing from the chance level (a homography fits 4 of any matches) and
    # saturating: past `cap` more inliers mean more overlap, not more certainty
    for chance in (0, 4, 8):
        for cap in (20, 30, 50):
            for lam in (0.5, 1.0, 2.0):
                name = f"sim+{lam:g}*clip(inl-{chance},0,{cap})/{cap}"
                out[name] = sim + lam * np.clip(inl - chance, 0, cap) / cap
    return out


def _clock() -> tuple[float, float]:
    """(wall, process CPU) seconds: CPU time is what a busy shared machine does not inflate."""
    return time.perf_counter(), time.process_time()


def run_verification(
    dataset,
    ranking: dict,
    out: Path,
    name: str,
    side: int,
    top: int,
    grid: list[tuple[float, int, int]],
    models: list[tuple[str, float]],
) -> list[dict]:
    """Time and score verification for each ``(ratio, query kpts, candidate kpts)`` in grid."""
    folder = out / f"{name}@{side}"
    db = LocalFeatureStore(folder / "db", name, create=False)
    qs = LocalFeatureStore(folder / "queries", name, create=False)
    metric = "hamming" if db.binary else "l2"
    rows = []
    for ratio, kq, kc in grid:
        queries = qs.get_many(range(len(dataset.queries)), max_keypoints=kq)
        per_model = {m: {"inliers": [], "ransac": [], "ransac_cpu": []} for m in models}
        times = {"load": [], "match": [], "load_cpu": [], "match_cpu": []}
        n_matches = []
        for q, feats_q in enumerate(queries):
            cand = ranking["to_position"][ranking["ids"][q][:top]]
            w0, c0 = _clock()
            cands = db.get_many(cand.tolist(), max_keypoints=kc)
            w1, c1 = _clock()
            matches = match_many(
                feats_q[DESCRIPTORS], [c[DESCRIPTORS] for c in cands], ratio, metric
            )
            w2, c2 = _clock()
            times["load"].append(w1 - w0)
            times["load_cpu"].append(c1 - c0)
            times["match"].append(w2 - w1)
            times["match_cpu"].append(c2 - c1)
            n_matches.append(np.mean([len(m) for m in matches]))
            for model, thr in models:
                w3, c3 = _clock()
                inl = [
                    verify(feats_q[KEYPOINTS], c[KEYPOINTS], m, model, threshold_px=thr).inliers
                    for c, m in zip(cands, matches, strict=True)
                ]
                w4, c4 = _clock()
                per_model[(model, thr)]["ransac"].append(w4 - w3)
                per_model[(model, thr)]["ransac_cpu"].append(c4 - c3)
                per_model[(model, thr)]["inliers"].append(inl)
        for (model, thr), res in per_model.items():
            inliers = np.array(res["inliers"], np.float64)
            key = f"{name}@{side}_r{ratio}_q{kq}_c{kc}_{model}{thr:g}"
            np.save(out / f"inliers_{key}.npy", inliers)
            maps = rerank_maps(dataset, ranking, inliers, top)
            total = np.array(times["load"]) + np.array(times["match"]) + np.array(res["ransac"])

            def ms(values: list[float]) -> float:
                return round(1000 * float(np.mean(values)), 1)

            row = {
                "features": f"{name}@{side}",
                "ratio": ratio,
                "query_kpts": kq,
                "cand_kpts": kc,
                "model": model,
                "threshold_px": thr,
                "load_ms": ms(times["load"]),
                "match_ms": ms(times["match"]),
                "ransac_ms": ms(res["ransac"]),
                "total_ms": ms(total),
                "total_ms_p90": round(1000 * float(np.percentile(total, 90)), 1),
                "cpu_ms": {
                    "load": ms(times["load_cpu"]),
                    "match": ms(times["match_cpu"]),
                    "ransac": ms(res["ransac_cpu"]),
                },
                "tentative_mean": round(float(np.mean(n_matches)), 1),
                "mAP": maps,
            }
            rows.append(row)
            best = max(maps.items(), key=lambda kv: kv[1])
            logger.info(
                "%s: %.0f ms/query (load %.0f match %.0f ransac %.0f; cpu match %.0f); "
                "global %.2f inliers %.2f sim*sqrt %.2f best %s %.2f",
                key, row["total_ms"], row["load_ms"], row["match_ms"], row["ransac_ms"],
                row["cpu_ms"]["match"], maps["global"], maps["inliers"], maps["sim*sqrt(inl)"],
                best[0], best[1],
            )  # fmt: skip
    db.close()
    qs.close()
    return rows


def rerank_maps(dataset, ranking: dict, inliers: np.ndarray, top: int) -> dict[str, float]:
    """mAP of the global ranking and of each fusion re-ordering its top ``top``."""
    positives = [q.positives for q in dataset.queries]
    junk = [q.junk for q in dataset.queries]
    to_pos = ranking["to_position"]

    def positions(ids: np.ndarray, q: int) -> np.ndarray:
        p = to_pos[ids[ids >= 0]]
        return apply_exclusions(p[p >= 0], dataset.queries[q])

    base = [positions(ranking["ids"][q], q) for q in range(len(dataset.queries))]
    maps = {"global": evaluate_rankings(base, positives, junk)["mAP"]}
    per_fusion: dict[str, list[np.ndarray]] = {}
    for q in range(len(dataset.queries)):
        ids = ranking["ids"][q]
        sim = ranking["scores"][q][:top].astype(np.float64)
        for fname, fused in fusions(sim, inliers[q]).items():
            order = np.argsort(-fused, kind="stable")
            reordered = np.concatenate([ids[:top][order], ids[top:]])
            per_fusion.setdefault(fname, []).append(positions(reordered, q))
    for fname, rankings in per_fusion.items():
        maps[fname] = evaluate_rankings(rankings, positives, junk)["mAP"]
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", default="run", choices=["run", "extract"])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--dataset", default="oxford5k", choices=["oxford5k", "holidays"])
    parser.add_argument("--out", type=Path, default=Path("bench_out/verify"))
    parser.add_argument("--features", default="rootsift@1024,aliked@512")
    parser.add_argument("--weights", default="../shared/data/weights/aliked-n16.pth")
    parser.add_argument("--max-keypoints", type=int, default=1024)
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument(
        "--grid",
        default="0.8:1024:1024,0.9:1024:1024,0.8:1024:512,0.8:512:512,0.8:1024:256",
        help="matching settings ratio:query_kpts:candidate_kpts, comma-separated",
    )
    parser.add_argument("--models", default="homography@8,homography@16,fundamental@4")
    parser.add_argument("--reverse", action="store_true", help="extract from the last image")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(args.dataset, args.data / args.dataset)
    features = parse_features(args.features)

    extraction = {}
    for name, side in features:
        extraction[f"{name}@{side}"] = extract_local(
            dataset, args.out, name, side, args.max_keypoints, args.weights, args.reverse
        )
    if args.command == "extract":
        return

    ranking = global_ranking(dataset, args.out)
    grid = []
    for item in args.grid.split(","):
        ratio, kq, kc = item.split(":")
        grid.append((float(ratio), int(kq), int(kc)))
    models = []
    for item in args.models.split(","):
        model, _, thr = item.partition("@")
        models.append((model, float(thr or 8)))
    rows = []
    for name, side in features:
        rows += run_verification(dataset, ranking, args.out, name, side, args.top, grid, models)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "torch_threads": torch.get_num_threads(),
        },
        "top": args.top,
        "global_query_ms": round(1000 * float(np.mean(ranking["query_seconds"])), 1),
        "extraction_s_per_image": {
            k: {
                "db": round(float(np.mean(v["db_seconds"])), 3) if v["db_seconds"] else None,
                "query": round(float(np.mean(v["query_seconds"])), 3)
                if v["query_seconds"]
                else None,
            }
            for k, v in extraction.items()
        },
        "rows": rows,
    }
    (args.out / "verify.json").write_text(json.dumps(report, indent=2))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    fusions_shown = ["global", "inliers", "sim*sqrt(inl)", "sim+1*clip(inl-4,0,30)/30"]
    print(
        "| features | ratio | kpts q/db | model | load ms | match ms | RANSAC ms | total ms "
        "| " + " | ".join(fusions_shown) + " | best fusion |"
    )
    print("|" + "---|" * (9 + len(fusions_shown)))
    for r in rows:
        best = max(
            ((k, v) for k, v in r["mAP"].items() if k not in fusions_shown), key=lambda kv: kv[1]
        )
        maps = " | ".join(f"{r['mAP'][f]:.2f}" for f in fusions_shown)
        print(
            f"| {r['features']} | {r['ratio']} | {r['query_kpts']}/{r['cand_kpts']} "
            f"| {r['model']}@{r['threshold_px']:g}"
            f" | {r['load_ms']} | {r['match_ms']} | {r['ransac_ms']} | {r['total_ms']} | {maps}"
            f" | {best[0]}: {best[1]:.2f} |"
        )


if __name__ == "__main__":
    main()
