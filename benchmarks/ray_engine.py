"""Ray engine benchmark: Holidays indexed by the local engine and by the Ray engine.

    .venv/bin/python benchmarks/ray_engine.py --data ../shared/data [--chunk 32] [--batch-size 32]

The 805 Holidays images (``holidays/jpg``) are indexed from scratch with the ``default``
preset, once per engine setting:

* ``local``: the local engine as ``lookalike index`` runs it (one decoding worker, ONNX
  Runtime on every core);
* ``ray AxC``: the Ray engine with A actors of C CPUs each (each actor: one decoding worker
  per batch, as ``--workers 1``; ONNX Runtime on C threads), on a local Ray started by the
  run, as ``lookalike index --engine ray`` starts it;
* ``ray AxC w0``: the same with the actors decoding in their own process (``--workers 0``:
  no decoding process to start per batch, but a file that crashes the decoder kills the
  actor);
* ``ray AxC warm``: on a Ray this process started beforehand (a running cluster: Ray's
  start-up is not counted, the actors' model loading is).

The local engine runs first and last (``local again``): the machine may be shared; with
``--repeat R`` every setting runs R times, interleaved, and the table shows each one's best.

Printed per setting: the wall time of the whole ``index_folder`` call (model loading, Ray's
start, the commits, the whitening), the seconds of its describe-and-commit loop
(``IndexReport.seconds``), images/s of each, and against the local engine's index: whether
the records are the same, the stored vectors bitwise identical (and their least cosine), the
whitening identical.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETTINGS = {  # name -> (engine, actors, CPUs per actor, decoding workers, Ray started before)
    "local": ("local", 0, 0, 1, False),
    "ray 1x2": ("ray", 1, 2, 1, False),
    "ray 2x1": ("ray", 2, 1, 1, False),
    "ray 2x1 w0": ("ray", 2, 1, 0, False),
    "ray 2x1 warm": ("ray", 2, 1, 1, True),
    "local again": ("local", 0, 0, 1, False),
}


def contents(index: Path) -> dict:
    from lookalike.index import IndexStore

    with IndexStore.open(index) as store:
        records = [(r.path, r.status, r.content_hash, r.width, r.height) for r in store.records()]
        vectors = store.vectors([r.id for r in store.records(status="ok")])
        whitening = store.whitening
    white = None if whitening is None else whitening.mean.tobytes() + whitening.projection.tobytes()
    return {"records": records, "vectors": vectors, "whitening": white}


def run(name: str, folder: Path, index: Path, chunk: int, batch_size: int) -> dict:
    from lookalike.extract import get_preset
    from lookalike.indexing import index_folder
    from lookalike.indexing.ray_engine import RayConf

    engine, actors, cpus, workers, warm = SETTINGS[name]
    ray_conf = None
    if engine == "ray":
        ray_conf = RayConf(actors=actors, cpus_per_actor=cpus, batch_size=batch_size)
    if warm:
        import ray

        ray.init(include_dashboard=False, logging_level="WARNING")
    try:
        start = time.perf_counter()
        report = index_folder(
            folder,
            index,
            get_preset("default").replace(workers=workers),
            chunk=chunk,
            engine=engine,
            ray=ray_conf,
        )
        wall = time.perf_counter() - start
    finally:
        if warm:
            ray.shutdown()
    n = report.processed
    return {
        "setting": name,
        "images": n,
        "wall_s": round(wall, 1),
        "wall_images_per_s": round(n / wall, 1),
        "loop_s": round(report.seconds, 1),
        "loop_images_per_s": round(report.images_per_second, 1),
        "whitening_learned": report.whitening_learned,
        "load_1m": round(os.getloadavg()[0], 1),  # the machine's load at the end (shared?)
    }


def compare(got: dict, expected: dict) -> dict:
    same_shape = got["vectors"].shape == expected["vectors"].shape
    a, b = (np.asarray(c["vectors"], np.float64) for c in (got, expected))
    cosine = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    cosine = float(cosine.min()) if same_shape else 0.0
    return {
        "records_same": got["records"] == expected["records"],
        "vectors_identical": same_shape and np.array_equal(got["vectors"], expected["vectors"]),
        "min_cosine": round(cosine, 7),
        "whitening_identical": got["whitening"] == expected["whitening"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--chunk", type=int, default=32, help="files per commit")
    parser.add_argument("--batch-size", type=int, default=32, help="files per Ray batch")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    parser.add_argument("--work", type=Path, default=None, help="where the indexes go")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of all settings (a shared machine: best)"
    )
    args = parser.parse_args()
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its INFO lines per execution
    folder = (args.data / "holidays" / "jpg").resolve()
    names = [s.strip() for s in args.settings.split(",")]
    if names[0] != "local":
        names.insert(0, "local")  # the reference
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        expected = None
        for round_, name in itertools.product(range(args.repeat), names):
            index = Path(tmp) / f"{name.replace(' ', '-')}-{round_}"
            row = run(name, folder, index, args.chunk, args.batch_size)
            row["round"] = round_
            got = contents(index)
            expected = expected or got
            row.update(compare(got, expected))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    command = shlex.join([sys.executable, *sys.argv])
    print(
        f"\n{command}\n{os.cpu_count()} CPUs, Holidays ({rows[0]['images']} images), default "
        f"preset, chunks of {args.chunk}, Ray batches of {args.batch_size}\n"
    )
    if args.repeat > 1:
        print(f"best of {args.repeat} rounds (by loop time); every run is in the JSON line")
    head = f"{'setting':<14} {'wall s':>7} {'img/s':>6} {'loop s':>7} {'img/s':>6}  records  "
    print(head + "vectors    min cosine  whitening  load")
    best = {}
    for r in rows:
        if r["setting"] not in best or r["loop_s"] < best[r["setting"]]["loop_s"]:
            best[r["setting"]] = r
    for r in best.values():
        print(
            f"{r['setting']:<14} {r['wall_s']:>7.1f} {r['wall_images_per_s']:>6.1f} "
            f"{r['loop_s']:>7.1f} {r['loop_images_per_s']:>6.1f}  "
            f"{'same' if r['records_same'] else 'DIFFER':<7}  "
            f"{'identical' if r['vectors_identical'] else 'differ':<9}  {r['min_cosine']:.7f}   "
            f"{'identical' if r['whitening_identical'] else 'differs':<9}  {r['load_1m']:.1f}"
        )
    print(json.dumps({"benchmark": "ray_engine", "preset": "default", "results": rows}))


if __name__ == "__main__":
    main()
