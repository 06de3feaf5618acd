"""Catalogue benchmark: find a clean item from a photo in which it fills part of the frame.

    .venv/bin/python benchmarks/catalogue.py --data ../shared/data [--out bench_out/catalogue] \
        [--items 500] [--per-item 4] [--distractors 1000] [--configs global,crops-0.7,...] \
        [--sticks generated,grocery,oxford5k,holidays] [--local rootsift|aliked|aliked-n16rot]

Measuring sticks, each searched with every configuration of ``--configs``:

* ``generated``: the first image of each of ``--items`` Holidays scenes is a clean catalogue
  item; ``--per-item`` queries of each are rendered (:func:`lookalike.evaluate.synthetic.
  render_query`, seed ``--seed``) into Grocery Store train photos (cluttered shelves) at
  25-70 % of the frame, tilted up to 40 degrees, rotated up to 30, blurred, with glare,
  colour casts and JPEG compression. The gallery is the items plus ``--distractors``
  Oxford5k images. P@1 (the item first) and mAP (one relevant image: the reciprocal rank
  within the top 100), overall and by the area the item covers and by its tilt.
* ``grocery``: the 296 Grocery val photos recognised against the 81 clean iconic product
  images as the only gallery (P@1 = the nearest image is of the photo's class), packaged
  items (the instance-level part) apart from fruit and vegetables.

* ``oxford5k``, ``holidays``: mAP of the landmark benchmarks with each configuration (what
  the small-gallery default must not make worse), on the default preset's indexes with
  stored local features in ``--landmark-indexes``.

Configurations: ``global`` (the whole photo, the default preset: the baseline),
``crops-S1_S2`` (regional query crops of sizes S1, S2, ...; ``@P``: crop penalty P), either
followed by re-ranking stages (``+asmk``, ``+verify``, ``+verify:budget=300:query_side=1024``
with changes to the index's verification settings), and ``auto``: ``lookalike search``'s
default, end to end. The indexes store the local features ``--local`` names (``aliked``
with ``--local-weights``, ``aliked-n16rot``, ``rootsift``). The first stage of each crop set
is searched once and cached beside the index, so verification configurations verify the
same shortlists and report their own time per step (detect, load, match, RANSAC); they
also save the inliers of every verified candidate (``*-verified-*.npz``), for comparing
fusions without verifying again. Rendered queries and indexes are kept in ``--out``.
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

import numpy as np

AREA_BINS = (("<40%", 0, 0.4), ("40-55%", 0.4, 0.55), (">=55%", 0.55, 1))
TILT_BINS = (("<15deg", 0, 15), ("15-30deg", 15, 30), (">=30deg", 30, 90))
CONFIGS = "global,crops-0.7,crops-0.5,crops-0.7_0.5"


def parse_config(name: str) -> tuple[tuple[float, ...], float | None, list[str], dict | None]:
    """``crops-0.7_0.5@0.1+asmk+verify:budget=300`` -> ((0.7, 0.5), 0.1, ["asmk", "verify"],
    {"budget": 300}): crop sizes, the crop penalty (None: the index's, 0.05), the re-ranking
    stages and the changes to the index's verification settings (None: no verification;
    ``{}``: the index's own)."""
    if name == "auto":
        return (), None, "auto", None
    base, *rerank = name.split("+")
    base, _, penalty = base.partition("@")
    verify, stages = None, []
    for stage in rerank:
        stage_name, *settings = stage.split(":")
        stages.append(stage_name)
        if stage_name == "verify":
            pairs = (s.partition("=") for s in settings)
            verify = {key: _value(value) for key, _, value in pairs}
    if base == "global":
        return (), None, stages, verify
    if not base.startswith("crops-"):
        raise SystemExit(
            f"unknown configuration {name!r}: global or crops-S1_S2[@P][+STAGE...]"
            "[+verify[:KEY=VALUE...]]"
        )
    sizes = tuple(float(s) for s in base.removeprefix("crops-").split("_"))
    return sizes, float(penalty) if penalty else None, stages, verify


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if text == "none" else text


def render_queries(args, out: Path) -> tuple[list[Path], list[dict], list[Path]]:
    """Render (or reuse) the generated queries: (items, query records, distractors)."""
    from PIL import Image

    from lookalike.evaluate import load_dataset
    from lookalike.evaluate.synthetic import render_query

    holidays = load_dataset("holidays", args.data / "holidays")
    items = [q.image for q in holidays.queries][: args.items]
    oxford = load_dataset("oxford5k", args.data / "oxford5k")
    distractors = list(oxford.images)[: args.distractors]
    backgrounds = sorted((args.data / "grocery" / "train").rglob("*.jpg"))
    settings = {"items": args.items, "per_item": args.per_item, "seed": args.seed, "v": 1}
    folder = out / "queries"
    truth_path = folder / "truth.json"
    if truth_path.exists():
        saved = json.loads(truth_path.read_text())
        if saved["settings"] == settings:
            return items, saved["queries"], distractors
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    records = []
    started = time.perf_counter()
    for i, item_path in enumerate(items):
        with Image.open(item_path) as im:
            item = im.convert("RGB")
            item.thumbnail((1024, 1024))
            item = np.asarray(item)
        for j in range(args.per_item):
            bg_path = backgrounds[int(rng.integers(0, len(backgrounds)))]
            with Image.open(bg_path) as im:
                background = np.asarray(im.convert("RGB"))
            photo, rendered = render_query(item, background, rng)
            path = folder / f"{i:04d}_{j}.jpg"
            Image.fromarray(photo).save(path, quality=95)
            records.append({"path": str(path), "item": str(item_path), **rendered.to_dict()})
    logging.info("rendered %d queries in %.0f s", len(records), time.perf_counter() - started)
    tmp = truth_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "queries": records}))
    tmp.replace(truth_path)
    return items, records, distractors


def build_index(paths: list[Path], index_dir: Path, labels: dict[str, str], local=None) -> None:
    from lookalike.extract import get_preset
    from lookalike.indexing import index_files
    from lookalike.labels import LABEL_KEY

    def metadata(path: Path) -> dict:
        label = labels.get(str(Path(path).resolve()))
        return {} if label is None else {LABEL_KEY: label}

    index_files(paths, index_dir, get_preset("default"), metadata=metadata, local=local)


def first_stage(index_dir: Path, paths: list[str], crops, penalty, depth: int):
    """``(ids (n, depth), scores, seconds per query)`` of the global search with these crops,
    cached beside the index (the shortlists verification configurations start from)."""
    from lookalike.search import Searcher

    key = f"{'_'.join(map(str, crops)) or 'whole'}@{penalty}-{depth}"
    cache = index_dir.parent / f"{index_dir.stem}-first-{key}.npz"
    if cache.exists():
        saved = np.load(cache, allow_pickle=False)
        if saved["paths"].tolist() == paths:
            return saved["ids"], saved["scores"], saved["seconds"]
    ids, scores, seconds = [], [], []
    with Searcher.open(index_dir, crops=crops, crop_penalty=penalty) as searcher:
        for path in paths:
            started = time.perf_counter()
            ranking = searcher.search([path], k=depth)
            seconds.append(time.perf_counter() - started)
            ids.append(ranking.ids[0])
            scores.append(ranking.scores[0])
    ids, scores, seconds = np.stack(ids), np.stack(scores), np.asarray(seconds)
    np.savez(cache, paths=np.asarray(paths), ids=ids, scores=scores, seconds=seconds)
    return ids, scores, seconds


def run_queries(index_dir: Path, paths: list[str], config: str, depth: int = 100):
    """(top paths per query, mean milliseconds per query and stage) with one configuration:
    the global search (cached per crop set), then verification of its shortlist."""
    from lookalike.index import IndexStore
    from lookalike.query import Query, QueryContext
    from lookalike.ranking import Ranking
    from lookalike.rerank import StageResources

    if config == "auto":  # what `lookalike search` does, end to end
        return run_pipeline(index_dir, paths, None, None, "auto", None, depth)
    crops, penalty, names, verify = parse_config(config)
    if names not in ([], ["verify"]):  # other stages: the whole pipeline, timed as one
        return run_pipeline(index_dir, paths, crops, penalty, names, verify, depth)
    depth = max(depth, int((verify or {}).get("budget", 0)))  # what Searcher fetches
    ids, scores, seconds = first_stage(index_dir, paths, crops, penalty, depth)
    stages = {"search": 1000 * seconds}
    with IndexStore.open(index_dir) as store:
        if verify is not None:
            resources = StageResources(store)
            stage = resources.verifier(verify)
            steps: dict[str, list[float]] = {}
            rows = []
            for path, row_ids, row_scores in zip(paths, ids, scores, strict=True):
                started = time.perf_counter()
                context = QueryContext(Query(path), np.zeros(store.dim, np.float32))
                ranking = stage(context, Ranking(row_scores, row_ids), depth)
                total = 1000 * (time.perf_counter() - started)
                timings = {k: v for k, v in stage.timings.items() if k != "features"}
                timings["detect"] = total - sum(timings.values())
                for name, ms in timings.items():
                    steps.setdefault(name, []).append(ms)
                rows.append((ranking.ids, ranking.inliers))
            verified = np.stack([r[0] for r in rows])
            # what fusions can be compared on without verifying again
            np.savez(
                index_dir.parent / f"{index_dir.stem}-verified-{config.replace(':', '_')}.npz",
                first_ids=ids,
                first_scores=scores,
                ids=verified,
                inliers=np.stack([r[1] for r in rows]),
            )
            ids = verified
            resources.close()
            stages.update({f"verify-{k}": np.asarray(v) for k, v in steps.items()})
        found = sorted({int(i) for i in ids.ravel() if i >= 0})
        records = store.get(found)
        paths_of = {r.id: str(Path(r.path).resolve()) for r in records if r is not None}
    tops = [[paths_of[i] for i in row if i in paths_of] for row in ids]
    ms = {name: round(float(np.mean(v)), 1) for name, v in stages.items()}
    ms["total"] = round(float(np.mean(sum(stages.values()))), 1)
    return tops, ms


def run_pipeline(index_dir: Path, paths, crops, penalty, names, verify, depth: int):
    """``run_queries`` through :class:`~lookalike.search.Searcher` with every stage."""
    from lookalike.search import Searcher

    tops, seconds = [], []
    with Searcher.open(index_dir, names, verify, crops=crops, crop_penalty=penalty) as searcher:
        for path in paths:
            started = time.perf_counter()
            (answer,) = searcher.answer([path], k=depth)
            seconds.append(time.perf_counter() - started)
            tops.append([str(Path(h.path).resolve()) for h in answer.hits])
    return tops, {"total": round(1000 * float(np.mean(seconds)), 1)}


def _binned(values: list[float], hits: list[float], bins) -> dict[str, float]:
    out = {}
    for name, lo, hi in bins:
        rows = [h for v, h in zip(values, hits, strict=True) if lo <= v < hi]
        out[name] = round(100 * float(np.mean(rows)), 1) if rows else None
    return out


def stick_generated(args, out: Path, configs: list[str]) -> dict:
    items, queries, distractors = render_queries(args, out)
    index_dir = out / f"generated-{args.local}.idx"
    labels = {str(Path(p).resolve()): Path(p).stem for p in items}
    build_index([*items, *distractors], index_dir, labels, local_features(args))
    truth = [str(Path(q["item"]).resolve()) for q in queries]
    areas = [q["area"] for q in queries]
    tilts = [q["tilt"] for q in queries]
    result = {
        "items": len(items),
        "distractors": len(distractors),
        "queries": len(queries),
        "configs": {},
    }
    for config in configs:
        tops, ms = run_queries(index_dir, [q["path"] for q in queries], config)
        pairs = list(zip(tops, truth, strict=True))
        first = [float(bool(t) and t[0] == want) for t, want in pairs]
        rr = [1.0 / (t.index(want) + 1) if want in t else 0.0 for t, want in pairs]
        result["configs"][config] = {
            "p_at_1": round(100 * float(np.mean(first)), 1),
            "map": round(100 * float(np.mean(rr)), 1),
            "p_at_1_by_area": _binned(areas, first, AREA_BINS),
            "p_at_1_by_tilt": _binned(tilts, first, TILT_BINS),
            "ms_per_query": ms,
        }
        print_config("generated", config, result["configs"][config])
    return result


def stick_grocery(args, out: Path, configs: list[str]) -> dict:
    from lookalike.evaluate.datasets import grocery_classes

    root = args.data / "grocery"
    classes = grocery_classes(root)
    gallery = [c.iconic for c in classes]
    labels = {str(c.iconic): c.name for c in classes}
    index_dir = out / f"grocery-iconic-{args.local}.idx"
    build_index(gallery, index_dir, labels, local_features(args))
    queries = sorted((root / "val").rglob("*.jpg"))
    truth = [q.parent.name for q in queries]
    packaged = np.array(["/Packages/" in str(q) for q in queries])
    result = {"gallery": len(gallery), "queries": len(queries), "configs": {}}
    for config in configs:
        tops, ms = run_queries(index_dir, [str(q) for q in queries], config)
        first = np.array(
            [bool(t) and labels[t[0]] == want for t, want in zip(tops, truth, strict=True)]
        )
        result["configs"][config] = {
            "p_at_1": round(100 * float(first.mean()), 1),
            "p_at_1_packaged": round(100 * float(first[packaged].mean()), 1),
            "p_at_1_fresh": round(100 * float(first[~packaged].mean()), 1),
            "packaged_queries": int(packaged.sum()),
            "ms_per_query": ms,
        }
        print_config("grocery", config, result["configs"][config])
    return result


def stick_landmarks(args, out: Path, configs: list[str], name: str) -> dict:
    """Oxford5k (845) or Holidays mAP with each configuration (what the small-gallery
    default must not make worse): the default preset's index with stored local features
    (``--landmark-indexes/<name>``, shared with benchmarks/rerank.py), the queries as image
    files (Oxford's cropped to their boxes), the whole index ranked."""
    from lookalike.evaluate import apply_exclusions, evaluate_rankings, load_dataset
    from lookalike.query import Query
    from lookalike.search import Searcher

    dataset = load_dataset(name, args.data / name)
    index_dir = args.landmark_indexes / name
    build_index(list(dataset.images), index_dir, {}, local_features(args))
    position = {str(Path(p).resolve()): i for i, p in enumerate(dataset.images)}
    result = {"images": len(dataset.images), "queries": len(dataset.queries), "configs": {}}
    for config in configs:
        crops, penalty, names, verify = parse_config(config)
        rankings, seconds = [], []
        with Searcher.open(index_dir, names, verify, crops=crops, crop_penalty=penalty) as s:
            records = {r.id: r.fs_path for r in s.store.records(status="ok")}
            for query in dataset.queries:
                started = time.perf_counter()
                ranking = s.search([Query(image=query.image, box=query.box)], k=0)
                seconds.append(time.perf_counter() - started)
                row = [position.get(records.get(int(i)), -1) for i in ranking.ids[0] if i >= 0]
                row = np.asarray([i for i in row if i >= 0], np.int64)
                rankings.append(apply_exclusions(row, query))
        metrics = evaluate_rankings(
            rankings, [q.positives for q in dataset.queries], [q.junk for q in dataset.queries]
        )
        result["configs"][config] = {
            "map": round(float(metrics["mAP"]), 1),
            "ms_per_query": {"total": round(1000 * float(np.mean(seconds)), 1)},
        }
        print(
            f"{name:<10} {config:<26} mAP {metrics['mAP']:5.1f} "
            f"{1000 * np.mean(seconds):6.0f} ms/query",
            flush=True,
        )
    return result


def local_features(args):
    """The local features the indexes store (what ``+verify`` configurations match)."""
    from lookalike.local.conf import local_conf

    weights = args.local_weights if args.local.startswith("aliked") else None
    return local_conf(args.local, weights=weights)


def print_config(stick: str, config: str, r: dict) -> None:
    extra = ""
    if "p_at_1_by_area" in r:
        extra = f" | by area {r['p_at_1_by_area']} | by tilt {r['p_at_1_by_tilt']}"
    if "p_at_1_packaged" in r:
        extra = f" | packaged {r['p_at_1_packaged']} fresh {r['p_at_1_fresh']}"
    mean_ap = f" mAP {r['map']:5.1f}" if "map" in r else ""
    print(
        f"{stick:<10} {config:<26} P@1 {r['p_at_1']:5.1f}{mean_ap} "
        f"{r['ms_per_query']['total']:6.0f} ms/query{extra} | ms {r['ms_per_query']}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("bench_out/catalogue"))
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--per-item", type=int, default=4)
    parser.add_argument("--distractors", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default=CONFIGS)
    parser.add_argument("--sticks", default="generated,grocery")
    parser.add_argument("--local", default="aliked", help="local features the indexes store")
    parser.add_argument(
        "--landmark-indexes",
        type=Path,
        default=Path("bench_out/rerank-idx"),
        help="where the oxford5k and holidays sticks keep their indexes",
    )
    parser.add_argument("--local-weights", default="../shared/data/weights/aliked-n16.pth")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("lookalike.images", "lookalike.indexing", "lookalike.index", "lookalike.models"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    configs = args.configs.split(",")
    report = {
        "measured": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        }
    }
    for stick in args.sticks.split(","):
        if stick in ("oxford5k", "holidays"):
            report[stick] = stick_landmarks(args, args.out, configs, stick)
        else:
            sticks = {"generated": stick_generated, "grocery": stick_grocery}
            report[stick] = sticks[stick](args, args.out, configs)
    name = "report-" + "-".join(args.sticks.split(",")) + ".json"
    (args.out / name).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
