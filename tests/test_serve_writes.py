"""The service's writes and image endpoints: a real uvicorn server on a free localhost port
holding the index's writer lock, driven by httpx.

Uploads (201, then 200 for the same bytes), metadata, thumbnails, match overlays, deletions,
each on its success path and its error paths (no key 401, wrong key 403, not an image 415,
corrupt 422, oversized 413, unknown id 404, bad parameters 422), path-traversal attempts in
every parameter that names a thing, concurrent searches during adds and deletes with zero
errors, and a server SIGKILLed during writes that loses no acknowledged write.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from conftest import distinct_image
from PIL import Image
from serve_helpers import BEARER, KEY, NAMES, build_gallery, one_line_error, png, upload

from lookalike.errors import IndexLockedError
from lookalike.index import IndexStore
from lookalike.serve import API_KEY_ENV, ServeConf, free_port, serving
from lookalike.serve.writer import UPLOADS_DIR


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory, default_extractor) -> dict:
    return build_gallery(tmp_path_factory.mktemp("serve-writes"), default_extractor)


@pytest.fixture(scope="module")
def server(gallery: dict) -> Iterator[SimpleNamespace]:
    """Writes open with the key; uploads up to 2 MB."""
    conf = ServeConf(port=0, api_key=KEY, max_upload_mb=2.0)
    with serving(gallery["index"], conf) as url:
        yield SimpleNamespace(url=url, index=gallery["index"])


def jpeg(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def top_id(url: str, data: bytes, **params) -> int:
    response = upload(f"{url}/search", data, {"k": 3, "rerank": "none", **params})
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["id"]


# -- adding, describing, removing ---------------------------------------------------------------


def test_add_search_describe_and_remove(server: SimpleNamespace) -> None:
    url, data = server.url, jpeg(distinct_image(40, 160))
    added = upload(f"{url}/images", data, headers=BEARER, label="crops", metadata='{"shelf": 3}')
    assert added.status_code == 201, added.text
    image_id = added.json()["id"]
    assert top_id(url, data) == image_id  # searchable once acknowledged

    again = upload(f"{url}/images", data, headers=BEARER)  # the same bytes: the same image
    assert (again.status_code, again.json()) == (200, {"id": image_id})

    info = httpx.get(f"{url}/images/{image_id}").json()
    assert info["label"] == "crops" and info["metadata"] == {"label": "crops", "shelf": 3}
    assert info["uploaded"] is True and (info["width"], info["height"]) == (160, 160)
    assert "path" not in info and str(server.index) not in json.dumps(info)
    kept = list((server.index / UPLOADS_DIR).rglob("*.jpg"))
    assert [p.read_bytes() for p in kept if p.read_bytes() == data]  # content-addressed copy

    thumb = httpx.get(f"{url}/images/{image_id}/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (160, 160)  # never upscaled
    assert httpx.get(f"{url}/images/{image_id}/thumbnail").content == thumb.content  # cached

    changed = httpx.put(f"{url}/images/{image_id}/metadata", json={"shelf": 4}, headers=BEARER)
    assert changed.status_code == 200, changed.text
    assert changed.json()["metadata"] == {"label": "crops", "shelf": 4}  # the label is kept
    relabelled = httpx.put(
        f"{url}/images/{image_id}/metadata", json={"label": "bread"}, headers=BEARER
    )
    assert relabelled.json()["label"] == "bread"
    found = upload(f"{url}/search", data, {"k": 1, "rerank": "none", "label": "bread"})
    assert [r["id"] for r in found.json()["results"]] == [image_id]

    gone = httpx.delete(f"{url}/images/{image_id}", headers=BEARER)
    assert gone.status_code == 204 and gone.content == b""
    assert top_id(url, data) != image_id
    one_line_error(httpx.get(f"{url}/images/{image_id}"), 404)
    one_line_error(httpx.get(f"{url}/images/{image_id}/thumbnail"), 404)
    one_line_error(httpx.delete(f"{url}/images/{image_id}", headers=BEARER), 404)
    assert not [p for p in (server.index / UPLOADS_DIR).rglob("*.jpg") if p.read_bytes() == data]
    # added again after its deletion: a new image
    back = upload(f"{url}/images", data, headers=BEARER)
    assert back.status_code == 201 and back.json()["id"] != image_id


def test_the_service_holds_the_writer_lock(server: SimpleNamespace) -> None:
    with pytest.raises(IndexLockedError, match=f"pid {os.getpid()}"):
        IndexStore.open(server.index, writable=True)


def test_match_overlays(server: SimpleNamespace) -> None:
    url = server.url
    by_name = {}
    for name in NAMES[:2]:
        response = upload(f"{url}/search", png(name), {"k": 1, "rerank": "none"})
        by_name[name] = response.json()["results"][0]["id"]
    a, b = by_name.values()
    pair = httpx.get(f"{url}/match", params={"a": a, "b": b}, timeout=60)
    assert pair.status_code == 200 and pair.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(pair.content)).format == "PNG"
    uploaded = upload(f"{url}/match", png(NAMES[0], 256), {"b": a})
    assert uploaded.status_code == 200 and uploaded.content[:8] == b"\x89PNG\r\n\x1a\n"
    one_line_error(httpx.get(f"{url}/match", params={"a": a, "b": 10**9}), 404)
    one_line_error(httpx.get(f"{url}/match", params={"a": a}), 422)
    one_line_error(upload(f"{url}/match", b"not an image", {"b": a}), 415)


# -- errors ---------------------------------------------------------------------------------


def test_write_errors(server: SimpleNamespace) -> None:
    url, data = server.url, png("coins", 100)
    one_line_error(upload(f"{url}/images", data), 401)  # no key
    wrong = {"Authorization": "Bearer " + "x" * 24}
    one_line_error(upload(f"{url}/images", data, headers=wrong), 403)
    one_line_error(httpx.delete(f"{url}/images/1", headers={"X-API-Key": "y" * 20}), 403)
    one_line_error(httpx.put(f"{url}/images/1/metadata", json={}), 401)
    one_line_error(upload(f"{url}/images", b"%PDF-1.4 not an image", headers=BEARER), 415)
    one_line_error(upload(f"{url}/images", data[: len(data) // 2], headers=BEARER), 422)
    big = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(big).save(out, format="PNG")  # ~4 MB of noise, over the 2 MB limit
    one_line_error(upload(f"{url}/images", out.getvalue(), headers=BEARER), 413)
    one_line_error(upload(f"{url}/images", data, headers=BEARER, metadata="[1, 2]"), 422)
    one_line_error(upload(f"{url}/images", data, headers=BEARER, metadata="{bad"), 422)
    bad_body = httpx.put(f"{url}/images/1/metadata", content=b"[1]", headers=BEARER)
    one_line_error(bad_body, 422)
    one_line_error(httpx.put(f"{url}/images/999999/metadata", json={}, headers=BEARER), 404)
    one_line_error(httpx.get(f"{url}/images/abc"), 422)
    one_line_error(httpx.get(f"{url}/images/-1"), 422)
    one_line_error(httpx.get(f"{url}/images/{2**70}"), 422)
    one_line_error(httpx.delete(f"{url}/images/999999", headers=BEARER), 404)
    refused = httpx.post(f"{url}/images", json={"image": "x"}, headers=BEARER)
    one_line_error(refused, 415)


TRAVERSALS = ("..%2F..%2Fmeta.sqlite", "..%2fmanifest.json", "%2Fetc%2Fpasswd", "1%2F..%2F2", ".")


def test_no_request_value_becomes_a_path(server: SimpleNamespace) -> None:
    url = server.url
    for bad in TRAVERSALS:
        for path in (f"/images/{bad}", f"/images/{bad}/thumbnail", f"/images/{bad}/metadata"):
            response = httpx.get(url + path)
            assert response.status_code in (404, 405, 422), (path, response.status_code)
            one_line_error(response, response.status_code)
        response = httpx.get(f"{url}/match?a={bad}&b=1")
        assert response.status_code == 422
        response = httpx.delete(f"{url}/images/{bad}", headers=BEARER)
        one_line_error(response, response.status_code)
        assert response.status_code in (404, 405, 422)
    for name in ("../../evil.png", "/tmp/evil.png", "..\\evil.png"):
        files = {"image": (name, png("coffee", 90), "image/png")}
        response = httpx.post(f"{url}/images", files=files, headers=BEARER, timeout=60)
        assert response.status_code in (200, 201)
    planted = [p for p in server.index.parent.rglob("*evil*")] + list(Path("/tmp").glob("evil*"))
    assert planted == []
    assert all(p.name.split(".")[0].isalnum() for p in (server.index / UPLOADS_DIR).rglob("*.*"))


# -- concurrency and durability -------------------------------------------------------------------


def test_concurrent_searches_during_adds_and_deletes(server: SimpleNamespace) -> None:
    url, errors, searches = server.url, [], []
    stop = threading.Event()

    def search_loop(name: str) -> None:
        data = png(name)
        while not stop.is_set():
            response = upload(f"{url}/search", data, {"k": 5, "rerank": "none"})
            if response.status_code != 200:
                errors.append(response.text)
            elif response.json()["results"][0]["label"] != name:
                errors.append(f"{name}: {response.json()['results'][0]}")
            searches.append(1)

    threads = [threading.Thread(target=search_loop, args=(n,)) for n in NAMES[:3]]
    for t in threads:
        t.start()
    added, removed = {}, []
    try:
        for i in range(12):
            data = jpeg(distinct_image(60 + i, 96))
            response = upload(f"{url}/images", data, headers=BEARER)
            assert response.status_code == 201, response.text
            added[response.json()["id"]] = data
            if i % 3 == 2:
                victim = next(iter(added))
                assert httpx.delete(f"{url}/images/{victim}", headers=BEARER).status_code == 204
                removed.append(victim)
                added.pop(victim)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == [] and len(searches) > 0
    for image_id, data in added.items():
        assert top_id(url, data) == image_id
    for image_id in removed:
        assert httpx.get(f"{url}/images/{image_id}").status_code == 404


def test_sigkill_during_writes_loses_no_acknowledged_write(gallery: dict, tmp_path: Path) -> None:
    import shutil

    index = tmp_path / "index"
    shutil.copytree(gallery["index"], index)
    port = free_port()
    env = {**os.environ, API_KEY_ENV: KEY}
    command = [sys.executable, "-m", "lookalike.cli", "serve", "--index", str(index)]
    command += ["--port", str(port)]
    url = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen:
        out = subprocess.DEVNULL
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=out)
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=2)
                return proc
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)

    proc = start()
    acknowledged = {}
    lock = threading.Lock()

    def writer(first: int) -> None:
        for i in range(first, first + 40):
            data = jpeg(distinct_image(100 + i, 80))
            try:
                response = upload(f"{url}/images", data, headers=BEARER)
            except httpx.TransportError:
                return
            if response.status_code == 201:
                with lock:
                    acknowledged[response.json()["id"]] = data

    try:
        threads = [threading.Thread(target=writer, args=(n * 40,)) for n in range(3)]
        for t in threads:
            t.start()
        while len(acknowledged) < 6:
            time.sleep(0.05)
        victim = next(iter(acknowledged))
        assert httpx.delete(f"{url}/images/{victim}", headers=BEARER).status_code == 204
        acknowledged.pop(victim)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)  # writes are in flight
        proc.wait(30)
        for t in threads:
            t.join()
        with lock:
            acked = dict(acknowledged)
        proc = start()  # the index opens: nothing half-written
        for image_id, data in acked.items():
            assert top_id(url, data) == image_id
        assert httpx.get(f"{url}/images/{victim}").status_code == 404
    finally:
        proc.kill()
        proc.wait(30)
    assert len(acked) >= 5


def test_metrics_name_routes_not_ids(server: SimpleNamespace) -> None:
    for image_id in (1, 2, 999999):
        httpx.get(f"{server.url}/images/{image_id}")
    httpx.get(f"{server.url}/no/such/thing")
    text = httpx.get(f"{server.url}/metrics").text
    assert 'endpoint="/images/{image_id}",status="200"' in text
    assert 'endpoint="/images/{image_id}",status="404"' in text
    assert 'endpoint="unmatched",status="404"' in text
    assert "/images/999999" not in text and "/no/such" not in text
