"""Catalogue benchmark: find a clean item from a photo in which it fills part of the frame.

    .venv/bin/python benchmarks/catalogue.py --data ../shared/data [--out bench_out/catalogue] \
        [--items 500] [--per-item 4] [--distractors 1000] [--configs global,crops-0.7,...] \
        [--sticks generated,grocery]

Two measuring sticks, each searched with every configuration of ``--configs``:

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

Configurations: ``global`` (the whole photo, the default preset: the baseline),
``crops-S1_S2`` (regional query crops of sizes S1, S2, ...; ``@P``: crop penalty P), and
either with ``+verify``.
Each reports the seconds per query. Rendered queries and indexes are kept in ``--out``.
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


def parse_config(name: str) -> tuple[tuple[float, ...], float | None, tuple[str, ...]]:
    """``crops-0.7_0.5@0.1+verify`` -> ((0.7, 0.5), 0.1, ("verify",)): crop sizes, the crop
    penalty (None: the index's, 0.05) and re-ranking stages."""
    base, *rerank = name.split("+")
    base, _, penalty = base.partition("@")
    if base == "global":
        return (), None, tuple(rerank)
    if not base.startswith("crops-"):
        raise SystemExit(f"unknown configuration {name!r}: global or crops-S1_S2[@P][+verify]")
    sizes = tuple(float(s) for s in base.removeprefix("crops-").split("_"))
    return sizes, float(penalty) if penalty else None, tuple(rerank)


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


def build_index(paths: list[Path], index_dir: Path, labels: dict[str, str]) -> None:
    from lookalike.extract import get_preset
    from lookalike.indexing import index_files
    from lookalike.labels import LABEL_KEY

    def metadata(path: Path) -> dict:
        label = labels.get(str(Path(path).resolve()))
        return {} if label is None else {LABEL_KEY: label}

    index_files(paths, index_dir, get_preset("default"), metadata=metadata)


def run_queries(index_dir: Path, paths: list[str], config: str, depth: int = 100):
    """(top paths per query, seconds per query) with one configuration."""
    from lookalike.search import Searcher

    crops, penalty, rerank = parse_config(config)
    tops, seconds = [], []
    with Searcher.open(index_dir, list(rerank), crops=crops, crop_penalty=penalty) as searcher:
        for path in paths:
            started = time.perf_counter()
            (answer,) = searcher.answer([path], k=depth)
            seconds.append(time.perf_counter() - started)
            tops.append([str(Path(h.path).resolve()) for h in answer.hits])
    return tops, seconds


def _binned(values: list[float], hits: list[float], bins) -> dict[str, float]:
    out = {}
    for name, lo, hi in bins:
        rows = [h for v, h in zip(values, hits, strict=True) if lo <= v < hi]
        out[name] = round(100 * float(np.mean(rows)), 1) if rows else None
    return out


def stick_generated(args, out: Path, configs: list[str]) -> dict:
    items, queries, distractors = render_queries(args, out)
    index_dir = out / "generated.idx"
    labels = {str(Path(p).resolve()): Path(p).stem for p in items}
    build_index([*items, *distractors], index_dir, labels)
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
        tops, seconds = run_queries(index_dir, [q["path"] for q in queries], config)
        pairs = list(zip(tops, truth, strict=True))
        first = [float(bool(t) and t[0] == want) for t, want in pairs]
        rr = [1.0 / (t.index(want) + 1) if want in t else 0.0 for t, want in pairs]
        result["configs"][config] = {
            "p_at_1": round(100 * float(np.mean(first)), 1),
            "map": round(100 * float(np.mean(rr)), 1),
            "p_at_1_by_area": _binned(areas, first, AREA_BINS),
            "p_at_1_by_tilt": _binned(tilts, first, TILT_BINS),
            "seconds_per_query": round(float(np.mean(seconds)), 3),
        }
        print_config("generated", config, result["configs"][config])
    return result


def stick_grocery(args, out: Path, configs: list[str]) -> dict:
    from lookalike.evaluate.datasets import grocery_classes

    root = args.data / "grocery"
    classes = grocery_classes(root)
    gallery = [c.iconic for c in classes]
    labels = {str(c.iconic): c.name for c in classes}
    index_dir = out / "grocery-iconic.idx"
    build_index(gallery, index_dir, labels)
    queries = sorted((root / "val").rglob("*.jpg"))
    truth = [q.parent.name for q in queries]
    packaged = np.array(["/Packages/" in str(q) for q in queries])
    result = {"gallery": len(gallery), "queries": len(queries), "configs": {}}
    for config in configs:
        tops, seconds = run_queries(index_dir, [str(q) for q in queries], config, depth=1)
        first = np.array(
            [bool(t) and labels[t[0]] == want for t, want in zip(tops, truth, strict=True)]
        )
        result["configs"][config] = {
            "p_at_1": round(100 * float(first.mean()), 1),
            "p_at_1_packaged": round(100 * float(first[packaged].mean()), 1),
            "p_at_1_fresh": round(100 * float(first[~packaged].mean()), 1),
            "packaged_queries": int(packaged.sum()),
            "seconds_per_query": round(float(np.mean(seconds)), 3),
        }
        print_config("grocery", config, result["configs"][config])
    return result


def print_config(stick: str, config: str, r: dict) -> None:
    extra = ""
    if "p_at_1_by_area" in r:
        extra = f" | by area {r['p_at_1_by_area']} | by tilt {r['p_at_1_by_tilt']}"
    if "p_at_1_packaged" in r:
        extra = f" | packaged {r['p_at_1_packaged']} fresh {r['p_at_1_fresh']}"
    mean_ap = f" mAP {r['map']:5.1f}" if "map" in r else ""
    print(
        f"{stick:<10} {config:<26} P@1 {r['p_at_1']:5.1f}{mean_ap} "
        f"{1000 * r['seconds_per_query']:6.0f} ms/query{extra}",
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
        report[stick] = {"generated": stick_generated, "grocery": stick_grocery}[stick](
            args, args.out, configs
        )
    name = "report-" + "-".join(args.sticks.split(",")) + ".json"
    (args.out / name).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
