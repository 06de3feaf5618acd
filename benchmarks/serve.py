"""Service benchmark: upload-and-search load, server overhead, mixed writes, SIGKILL.

    .venv/bin/python benchmarks/serve.py --data ../shared/data --out bench_out/serve \
        [--seconds 20] [--clients 1,4,16,64] [--rerank none] [--indexed 605]

On loopback only. The first ``--indexed`` Holidays database images are indexed with the
``default`` preset (the rest are kept for uploads); the 295 Holidays query photos are the
queries, uploaded as they are stored (JPEG, long side 400-533 px). Phases, each bounded in
time:

1. **In-process baseline** (the naive way, no HTTP): the same uploads through
   ``Searcher.answer`` with 2 and with 16 threads for ``--seconds`` each; the better
   throughput is the baseline.
2. **Load**: ``lookalike serve`` in its own process (its defaults: 2 requests at work, 16
   queued), and for each ``--clients`` level that many concurrent clients upload-and-search
   for ``--seconds``: queries/s, p50 / p95 / p99 latency, errors (anything but 200 and 503),
   and 503s (load shedding: the client waits the ``Retry-After`` and goes on) apart.
3. **Mixed**: 16 clients for ``--seconds``: 10% uploads of new images (``POST /images``),
   2% deletions of images this run added, the rest searches; then every acknowledged write
   is checked (an add answered 201 is found by its own bytes as the top result and by
   ``GET /images/{id}``; a delete answered 204 is 404).
4. **SIGKILL**: 8 clients write (uploads, and deletions of this run's uploads) while the
   server is SIGKILLed after a few seconds; it is restarted on the same index and every
   write acknowledged before the kill is checked as in 3.

Target (issue 11): zero errors at every level; throughput at 16 clients >= 90% of the
in-process baseline; zero lost acknowledged writes.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

KEY = "benchmark-key-" + "0" * 16
HEADERS = {"Authorization": f"Bearer {KEY}"}
BOUNDARY = "lookalike-benchmark-boundary"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    ms = np.asarray(latencies) * 1000
    return {f"p{p}_ms": round(float(np.percentile(ms, p)), 1) for p in (50, 95, 99)}


# -- the data -------------------------------------------------------------------------------


def holidays(data: Path) -> tuple[list[Path], list[bytes]]:
    """``(database image files, query JPEG bytes)``."""
    root = data / "holidays"
    gt = json.loads((root / "gt.json").read_text())
    files = [root / "jpg" / f"{i}.jpg" for i in gt["images"]]
    queries = [(root / "jpg" / f"{q['query']}.jpg").read_bytes() for q in gt["queries"]]
    return files, queries


def build_index(files: list[Path], out: Path) -> Path:
    """The base index of ``files`` (made once per image list, copied for each run)."""
    from lookalike.extract import get_preset
    from lookalike.indexing import index_files

    base = out / f"base-{len(files)}"
    done = base / "done"
    if not done.exists():
        shutil.rmtree(base, ignore_errors=True)
        started = time.perf_counter()
        index_files(files, base / "index", get_preset("default"))
        print(f"indexed {len(files)} images in {time.perf_counter() - started:.0f} s")
        done.write_text("ok")
    work = out / "index"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base / "index", work)
    return work


def variants(path: Path) -> list[bytes]:
    """Three uploads of one photo with other bytes: as stored, mirrored, 90% of its size."""
    from PIL import Image, ImageOps

    img = Image.open(path).convert("RGB")
    out = [path.read_bytes()]
    for changed in (ImageOps.mirror(img), img.resize((img.width * 9 // 10, img.height * 9 // 10))):
        buffer = io.BytesIO()
        changed.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


# -- 1. in process ----------------------------------------------------------------------------


def in_process(index: Path, queries: list[bytes], threads: int, seconds: float, rerank: str):
    from lookalike.query import Query
    from lookalike.search import Searcher

    rerank_arg = "auto" if rerank == "auto" else ([] if rerank == "none" else rerank.split(","))
    with Searcher.open(index, rerank_arg) as searcher:
        searcher.answer([Query(image=queries[0])], k=10)  # load the model first
        latencies: list[float] = []
        lock = threading.Lock()
        deadline = time.perf_counter() + seconds

        def loop(n: int) -> None:
            i = n
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                searcher.answer([Query(image=queries[i % len(queries)])], k=10)
                with lock:
                    latencies.append(time.perf_counter() - started)
                i += threads

        started = time.perf_counter()
        workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - started
    return {"threads": threads, "qps": round(len(latencies) / wall, 2), **percentiles(latencies)}


# -- the server ---------------------------------------------------------------------------------


class Server:
    def __init__(self, index: Path, log: Path, options: list[str]) -> None:
        self.options = options
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.index, self.log = index, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        env = {**os.environ, "LOOKALIKE_API_KEY": KEY}
        command = [sys.executable, "-m", "lookalike.cli", "serve", "--index", str(self.index)]
        command += ["--port", str(self.port), *self.options]
        started = time.perf_counter()
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                httpx.get(f"{self.url}/healthz", timeout=2)
                return time.perf_counter() - started
            except httpx.TransportError:
                if self.proc.poll() is not None or time.perf_counter() - started > 180:
                    raise RuntimeError(f"the server did not start; see {self.log}") from None
                time.sleep(0.2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(120)


class Tally:
    """What the clients of one phase saw."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.shed = 0
        self.added: dict[int, bytes] = {}  # acknowledged adds (201)
        self.deleted: set[int] = set()  # acknowledged deletes (204)
        self.writes = 0


async def client_loop(client, url, queries, tally, deadline, rng, mix, uploads, rerank) -> None:
    params = {"k": 10, "rerank": rerank}
    while time.perf_counter() < deadline:
        roll = rng.random()
        started = time.perf_counter()
        try:
            if roll < mix[0] and uploads:
                data = uploads.pop()
                files = {"image": ("new.jpg", data, "image/jpeg")}
                response = await client.post(f"{url}/images", files=files, headers=HEADERS)
                tally.writes += 1
                if response.status_code == 201:
                    tally.added[response.json()["id"]] = data
            elif roll < mix[0] + mix[1] and len(tally.added) > len(tally.deleted) + 1:
                victim = rng.choice([i for i in tally.added if i not in tally.deleted])
                response = await client.delete(f"{url}/images/{victim}", headers=HEADERS)
                tally.writes += 1
                if response.status_code == 204:
                    tally.deleted.add(victim)
            else:  # a multipart body made once per query photo: the client costs little
                body = queries[rng.randrange(len(queries))]
                response = await client.post(
                    f"{url}/search", content=body, headers=MULTIPART, params=params
                )
        except httpx.TransportError as error:
            if time.perf_counter() < deadline:
                tally.errors.append(f"transport: {type(error).__name__}")
            return
        if response.status_code == 503:
            tally.shed += 1
            await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
            continue
        if response.status_code not in (200, 201, 204):
            tally.errors.append(f"{response.status_code}: {response.text[:200]}")
            continue
        tally.latencies.append(time.perf_counter() - started)


def multipart(data: bytes) -> bytes:
    """``data`` as the body of a multipart upload in the field ``image``."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    )
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


async def load(url, queries, clients, seconds, rerank, mix=(0.0, 0.0), uploads=None, seed=0):
    queries = [multipart(q) for q in queries]
    tally = Tally()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()
        pool = uploads if uploads is not None else []
        loops = [
            client_loop(client, url, queries, tally, deadline, random.Random(seed * 1000 + n),
                        mix, pool, rerank)
            for n in range(clients)
        ]  # fmt: skip
        await asyncio.gather(*loops)
        wall = time.perf_counter() - started
    return tally, wall


def check_writes(url: str, added: dict[int, bytes], deleted: set[int]) -> dict:
    """Every acknowledged add found (by ``GET /images/{id}``, and among the top 5 results of
    its own bytes: the kill phase uploads variants of one photo), every acknowledged delete
    gone."""
    lost_adds, kept_deletes = [], []
    with httpx.Client(timeout=120) as client:
        for image_id, data in added.items():
            if image_id in deleted:
                continue
            files = {"image": ("a.jpg", data, "image/jpeg")}
            found = client.post(f"{url}/search", files=files, params={"k": 5, "rerank": "none"})
            top = [r["id"] for r in found.json()["results"]] if found.status_code == 200 else []
            if client.get(f"{url}/images/{image_id}").status_code != 200 or image_id not in top:
                lost_adds.append(image_id)
        for image_id in deleted:
            if client.get(f"{url}/images/{image_id}").status_code != 404:
                kept_deletes.append(image_id)
    checked = len([i for i in added if i not in deleted]) + len(deleted)
    return {"checked": checked, "lost_adds": lost_adds, "deletes_back": kept_deletes}


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("bench_out/serve"))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--rerank", default="none", help="the searches' rerank parameter")
    parser.add_argument("--server-options", default="", help="more lookalike serve options")
    parser.add_argument("--indexed", type=int, default=605, help="database images indexed")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files, queries = holidays(args.data)
    indexed, spare = files[: args.indexed], files[args.indexed :]
    index = build_index(indexed, args.out)
    results: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "indexed": len(indexed),
        "queries": len(queries),
        "rerank": args.rerank,
        "seconds": args.seconds,
    }

    print(f"in-process baseline ({args.seconds:.0f} s per setting) ...")
    baseline = [in_process(index, queries, t, args.seconds, args.rerank) for t in (2, 16)]
    for b in baseline:
        print(f"  {b['threads']:>2} threads  {b['qps']:6.2f} q/s  p50 {b['p50_ms']} ms")
    best = max(b["qps"] for b in baseline)
    results["in_process"] = baseline

    server = Server(index, args.out / "server.log", args.server_options.split())
    results["start_s"] = round(server.start(), 1)
    asyncio.run(load(server.url, queries, 2, 3.0, args.rerank))  # the model loaded, warm
    levels = []
    try:
        print(f"load: upload-and-search, rerank={args.rerank}")
        print("  clients     q/s    p50    p95    p99  errors  503s")
        for clients in (int(c) for c in args.clients.split(",")):
            tally, wall = asyncio.run(load(server.url, queries, clients, args.seconds, args.rerank))
            row = {
                "clients": clients,
                "qps": round(len(tally.latencies) / wall, 2),
                **percentiles(tally.latencies),
                "errors": len(tally.errors),
                "shed_503": tally.shed,
                "first_errors": tally.errors[:3],
            }
            levels.append(row)
            print(
                f"  {clients:>7} {row['qps']:7.2f} {row['p50_ms']:6} {row['p95_ms']:6} "
                f"{row['p99_ms']:6} {row['errors']:7} {row['shed_503']:5}"
            )
        results["load"] = levels
        at16 = next((r["qps"] for r in levels if r["clients"] == 16), None)
        if at16 is not None:
            results["overhead_ratio_16"] = round(at16 / best, 3)
            ratio = at16 / best
            print(f"  16 clients over HTTP / in process: {at16:.2f} / {best:.2f} = {ratio:.1%}")

        random.Random(1).shuffle(spare)
        uploads = [f.read_bytes() for f in spare[: len(spare) // 2]]
        kill_uploads = [v for f in spare[len(spare) // 2 :] for v in variants(f)]
        print("mixed: 16 clients, 10% uploads, 2% deletes ...")
        tally, wall = asyncio.run(
            load(server.url, queries, 16, args.seconds, args.rerank, (0.10, 0.02), uploads, 1)
        )
        mixed = {
            "ops_per_s": round(len(tally.latencies) / wall, 2),
            **percentiles(tally.latencies),
            "writes": tally.writes,
            "adds_201": len(tally.added),
            "deletes_204": len(tally.deleted),
            "errors": len(tally.errors),
            "shed_503": tally.shed,
            "first_errors": tally.errors[:3],
            **check_writes(server.url, tally.added, tally.deleted),
        }
        results["mixed"] = mixed
        print(
            f"  {mixed['ops_per_s']} ops/s, {mixed['adds_201']} adds, {mixed['deletes_204']} "
            f"deletes, {mixed['errors']} errors; lost adds {len(mixed['lost_adds'])}, deletes "
            f"back {len(mixed['deletes_back'])}"
        )

        print("SIGKILL during writes ...")
        kill_after = 4.0
        holder: dict = {}

        def writes() -> None:
            phase = load(
                server.url, queries, 8, kill_after + 5, args.rerank, (0.9, 0.1), kill_uploads, 2
            )
            holder["tally"], _ = asyncio.run(phase)

        thread = threading.Thread(target=writes)
        thread.start()
        time.sleep(kill_after)
        server.kill()
        thread.join()
        tally = holder["tally"]
        restart = server.start()
        killed = {
            "adds_201": len(tally.added),
            "deletes_204": len(tally.deleted),
            "restart_s": round(restart, 1),
            **check_writes(server.url, tally.added, tally.deleted),
        }
        results["sigkill"] = killed
        print(
            f"  {killed['adds_201']} adds and {killed['deletes_204']} deletes acknowledged "
            f"before the kill; after a restart ({killed['restart_s']} s): lost adds "
            f"{len(killed['lost_adds'])}, deletes back {len(killed['deletes_back'])}"
        )
    finally:
        server.stop()
    (args.out / "serve.json").write_text(json.dumps(results, indent=2))
    ok = (
        all(r["errors"] == 0 for r in levels)
        and results.get("overhead_ratio_16", 0) >= 0.9
        and not results["mixed"]["lost_adds"]
        and not results["mixed"]["deletes_back"]
        and results["mixed"]["errors"] == 0
        and not results["sigkill"]["lost_adds"]
        and not results["sigkill"]["deletes_back"]
    )
    print("targets met" if ok else "targets MISSED", f"(wrote {args.out / 'serve.json'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
