"""What the index's integrity checks cost: ``lookalike check`` on a real index, and the checks
made when an index is opened, against the same open without them (the naive baseline).

An index of the Holidays images (805, default preset: whitened, checkpointed) is built once
(or reused with ``--index``); then

* ``check_index`` (every vector block digest, finiteness, ``PRAGMA integrity_check``, the
  whitening, checkpoint and DBA digests) is timed;
* an open of the store plus one search is timed with the open-time checks (sizes, the
  digests of the whitening and checkpoint it reads anyway) and, on a copy whose manifest
  records no digests and with the size check disabled, without them; and, for scale, a
  whole ``Searcher`` open (the model included) plus one search of an image file;
* reading every stored vector once (what a rebuild or a DBA computation reads; a query by
  id reads one block) with the block digests checked, and without.

    .venv/bin/python benchmarks/integrity.py --data ../shared/data [--index /tmp/h805]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def build(data: Path, index: Path) -> None:
    from lookalike.evaluate import load_holidays
    from lookalike.extract import get_preset
    from lookalike.indexing import index_files

    dataset = load_holidays(data / "holidays")
    start = time.perf_counter()
    report = index_files([str(p) for p in dataset.images], index, get_preset("default"))
    print(f"built {index}: {report.added} images in {time.perf_counter() - start:.0f} s")


def open_search(index: Path, query: np.ndarray) -> float:
    from lookalike.index import IndexStore

    start = time.perf_counter()
    with IndexStore.open(index) as store:
        store.search(query, 10)
    return time.perf_counter() - start


def median_time(fn, repeat: int) -> float:
    for _ in range(3):  # warm the page cache and the imports
        fn()
    return statistics.median(fn() for _ in range(repeat))


def without_checks(index: Path, copy: Path) -> None:
    """A copy of ``index`` whose manifest records no digests (nothing to compare at open)."""
    shutil.copytree(index, copy)
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    for key in ("whitening", "checkpoint", "dba"):
        if isinstance(manifest.get(key), dict):
            manifest[key].pop("sha", None)
    path.write_text(json.dumps(manifest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--index", type=Path, help="index of the Holidays images (built if absent)")
    parser.add_argument("--repeat", type=int, default=40)
    args = parser.parse_args()

    from lookalike.index import IndexStore
    from lookalike.index.check import check_index
    from lookalike.index.vectors import VectorFile
    from lookalike.search import Searcher

    with tempfile.TemporaryDirectory() as tmp:
        index = args.index or Path(tmp) / "holidays"
        if not (index / "manifest.json").is_file():
            build(args.data, index)
        with IndexStore.open(index) as store:
            record = next(iter(store.records(status="ok")))
            query = store.vectors([record.id])
            n, dim = len(store), store.dim
        checks = [check_index(index) for _ in range(5)]
        assert all(c.sound for c in checks), checks[0].problems
        seconds = [c.seconds for c in checks]
        print(f"check_index, {n} images x {dim}-d: median {statistics.median(seconds):.3f} s, "
              f"max {max(seconds):.3f} s (target: under 2 s)")  # fmt: skip

        checked = median_time(lambda: open_search(index, query), args.repeat)
        bare = Path(tmp) / "unchecked"
        without_checks(index, bare)
        size_check = VectorFile.check_size
        VectorFile.check_size = lambda self, n: None  # the naive baseline: no size check
        try:
            unchecked = median_time(lambda: open_search(bare, query), args.repeat)
        finally:
            VectorFile.check_size = size_check

        def read_all(verify: bool) -> float:
            """A fresh open reading every stored vector (what a rebuild or a DBA reads)."""
            with IndexStore.open(index) as store:
                if not verify:
                    store._loader.verifier = None
                ids = [r.id for r in store.records(status="ok")]
                start = time.perf_counter()
                store.vectors(ids)
                return time.perf_counter() - start

        read_checked = median_time(lambda: read_all(True), args.repeat)
        read_bare = median_time(lambda: read_all(False), args.repeat)
        print(f"reading all {n} stored vectors once: {1000 * read_checked:.2f} ms with the "
              f"block digests checked, {1000 * read_bare:.2f} ms without (naive)")  # fmt: skip

        def searcher_open_search() -> float:
            start = time.perf_counter()
            with Searcher.open(index, device="cpu") as searcher:
                searcher.search([record.path], k=10)  # an image file
            return time.perf_counter() - start

        whole = median_time(searcher_open_search, max(5, args.repeat // 4))
        extra = checked - unchecked
        print(f"store open + 1 search: {1000 * checked:.2f} ms with the open-time checks, "
              f"{1000 * unchecked:.2f} ms without (naive): {1000 * extra:+.2f} ms, "
              f"{100 * extra / unchecked:+.1f}% of the store part")  # fmt: skip
        print(f"Searcher open (model included) + 1 search of an image file: "
              f"{1000 * whole:.0f} ms; the checks "
              f"add {100 * extra / whole:+.2f}% of it (target: under 5%)")  # fmt: skip


if __name__ == "__main__":
    main()
