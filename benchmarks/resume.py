"""Resume benchmark: Holidays builds SIGKILLed at 5 points and resumed, against a clean build.

    .venv/bin/python benchmarks/resume.py --data ../shared/data [--sizes 150,805] [--chunk 32]

For each size (the first N database images of Holidays, the queries whose image is among
them, positives restricted to them), the ``default`` preset builds one index in one go and
one per kill point: a process indexing the images is SIGKILLed at the point, then a second
one runs the same command to the end. Kill points: inside the first chunk (its region
samples committed, not its images), inside the middle chunk, inside the last chunk, after
the last commit before the whitening is learned, and inside the whitening's checkpoint.

Printed per build: mAP (the dataset's queries, through the one Searcher, with the preset's
query rotations), whether the stored vectors, the whitening and the ranking of every
indexed image as a query are bitwise identical to the clean build's, whether the dataset
queries rank identically, and how many of the killed process's children (decoder workers,
multiprocessing's resource tracker) were still running 5 s after the kill.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve()


# -- the indexing process -----------------------------------------------------------------


def install_kill(where: str, nth: int) -> None:
    """SIGKILL this process at the ``nth`` call of step ``where``, before the step runs;
    prints the pids of its children first (what must die with it)."""
    import lookalike.indexing.learn as learn
    from lookalike.index import IndexStore

    owners = {
        "add": (IndexStore, "add"),
        "learn": (learn, "learn_whitening"),
        "checkpoint": (IndexStore, "_write_checkpoint"),
    }
    owner, name = owners[where]
    real, calls = getattr(owner, name), [0]

    def step(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == nth:
            print(*(c.pid for c in psutil.Process().children()), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(owner, name, step)


def child(paths_file: str, index: str, where: str, nth: int, chunk: int) -> None:
    from lookalike.extract import get_preset
    from lookalike.indexing import index_files

    if where:
        install_kill(where, nth)
    paths = Path(paths_file).read_text().splitlines()
    index_files(paths, index, get_preset("default"), chunk=chunk)


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_indexer(paths_file: Path, index: Path, where: str, nth: int, chunk: int) -> list[int]:
    """Run one indexing process; returns the pids of its children still running 5 s after
    it was killed (nothing when it was not)."""
    cmd = [sys.executable, str(HERE), "--child", str(paths_file), str(index), where]
    # output to files, not pipes: a child's surviving worker would hold a pipe open
    out, err = index.with_suffix(".out"), index.with_suffix(".err")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        returncode = subprocess.call([*cmd, str(nth), str(chunk)], stdout=stdout, stderr=stderr)
    if not where:
        if returncode != 0:
            raise SystemExit(f"the resumed build failed:\n{err.read_text()}")
        return []
    if returncode != -signal.SIGKILL:
        raise SystemExit(f"the build was not killed at {where} #{nth}:\n{err.read_text()}")
    started = [int(pid) for pid in out.read_text().split()]
    time.sleep(5)
    left = [pid for pid in started if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


# -- measuring ----------------------------------------------------------------------------


def subset(dataset, n: int):
    """The first ``n`` database images and the queries among them, positives restricted."""
    from dataclasses import replace

    images = dataset.images[:n]
    queries = []
    for q in dataset.queries:
        (qi,) = q.exclude
        positives = tuple(p for p in q.positives if p < n)
        if qi < n and positives:
            queries.append(replace(q, positives=positives))
    return replace(dataset, images=images, queries=tuple(queries))


def state(index: Path, dataset, views: list[np.ndarray], rotations: tuple[int, ...]) -> dict:
    """Stored vectors, whitening, every image's ranking (bytes), query rankings, mAP."""
    from lookalike.evaluate import apply_exclusions, evaluate_rankings
    from lookalike.index import IndexStore
    from lookalike.query import Query
    from lookalike.search import Searcher

    with IndexStore.open(index) as store:
        ok = [r for r in store.records(status="ok")]
        vectors = store.vectors([r.id for r in ok])
        whitening = store.whitening
        scores, ids = store.search(vectors, 0)
    position = {str(Path(p).resolve()): i for i, p in enumerate(dataset.images)}
    to_position = {r.id: position[r.path] for r in ok}
    rankings, raw = [], []
    with Searcher.open(index, device="cpu") as searcher:
        for query, v in zip(dataset.queries, views, strict=True):
            ranking = searcher.search([Query(vector=v, rotations=rotations)], k=0)
            found = ranking.ids[0][ranking.ids[0] >= 0]
            raw.append(found.tobytes() + ranking.scores[0].tobytes())
            rankings.append(apply_exclusions(np.array([to_position[i] for i in found]), query))
    metrics = evaluate_rankings(
        rankings, [q.positives for q in dataset.queries], [q.junk for q in dataset.queries]
    )
    return {
        "map": metrics["mAP"],
        "vectors": vectors.tobytes(),
        "whitening": None
        if whitening is None
        else whitening.mean.tobytes() + whitening.projection.tobytes(),
        "rankings": ids.tobytes() + scores.tobytes(),
        "queries": raw,
    }


def measure(dataset, n: int, chunk: int, work: Path, extractor) -> dict:
    data = subset(dataset, n)
    paths_file = work / f"paths-{n}.txt"
    paths_file.write_text("\n".join(str(p) for p in data.images))
    rotations = tuple(extractor.conf.query_rotations)
    views = [extractor.extract_query(q.image, q.box, rotations) for q in data.queries]
    chunks = math.ceil(n / chunk)
    points = [
        ("first chunk", "add", 1),
        ("middle chunk", "add", chunks // 2 + 1),
        ("last chunk", "add", chunks),
        ("before the whitening", "learn", 1),
        ("whitening checkpoint", "checkpoint", 1),
    ]
    start = time.perf_counter()
    run_indexer(paths_file, work / f"clean-{n}", "", 0, chunk)
    clean = state(work / f"clean-{n}", data, views, rotations)
    print(f"{n} images, {len(data.queries)} queries: clean build {clean['map']:.2f} mAP "
          f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    rows = []
    for name, where, nth in points:
        index = work / f"killed-{n}-{where}-{nth}"
        left = run_indexer(paths_file, index, where, nth, chunk)
        run_indexer(paths_file, index, "", 0, chunk)
        got = state(index, data, views, rotations)
        row = {
            "point": name,
            "map": round(got["map"], 2),
            "vectors_identical": got["vectors"] == clean["vectors"],
            "whitening_identical": got["whitening"] == clean["whitening"],
            "rankings_identical": got["rankings"] == clean["rankings"],
            "query_rankings_identical": got["queries"] == clean["queries"],
            "left_running": len(left),
        }
        rows.append(row)
        print(f"  killed {name:<22} resumed {row['map']:.2f} mAP  vectors "
              f"{row['vectors_identical']}  whitening {row['whitening_identical']}  rankings "
              f"{row['rankings_identical']}  queries {row['query_rankings_identical']}  "
              f"left running {row['left_running']}", flush=True)  # fmt: skip
    return {"images": n, "queries": len(data.queries), "clean_map": round(clean["map"], 2),
            "killed": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--sizes", default="150,805", help="database sizes, comma-separated")
    parser.add_argument("--chunk", type=int, default=32, help="files per commit")
    parser.add_argument("--work", type=Path, default=None, help="where the indexes go")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        paths_file, index, where, nth, chunk = args.child
        child(paths_file, index, where, int(nth), int(chunk))
        return

    from lookalike.evaluate import load_dataset
    from lookalike.extract import Extractor, get_preset

    dataset = load_dataset("holidays", args.data / "holidays")
    extractor = Extractor(get_preset("default").replace(workers=0))
    results = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            results.append(measure(dataset, min(n, len(dataset.images)), args.chunk, Path(tmp),
                                   extractor))  # fmt: skip
    print(json.dumps({"benchmark": "resume", "preset": "default", "results": results}))


if __name__ == "__main__":
    main()
