"""``lookalike serve``: a real uvicorn server on a free localhost port, driven by httpx.

Every read endpoint on its success path and its error paths (missing / wrong key with
``--auth all``, oversized 413, not an image 415, corrupt 422, unknown id 404, bad
parameters 422), results that never carry a server path, admission control (503 with
Retry-After), concurrent searches with zero errors, and the CLI process shutting down
cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from serve_helpers import KEY, NAMES, build_gallery, one_line_error, png, upload

from lookalike.errors import ConfigError
from lookalike.serve import API_KEY_ENV, ServeConf, free_port, load_api_key, serving
from lookalike.serve.guards import Admission, ServiceError


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory, default_extractor) -> dict:
    return build_gallery(tmp_path_factory.mktemp("serve"), default_extractor)


@pytest.fixture(scope="module")
def server(gallery: dict) -> Iterator[SimpleNamespace]:
    """Reads open, writes closed (no key configured); uploads up to 2 MB."""
    conf = ServeConf(port=0, max_upload_mb=2.0, max_active=2)
    with serving(gallery["index"], conf) as url:
        yield SimpleNamespace(url=url)


@pytest.fixture(scope="module")
def locked(gallery: dict) -> Iterator[SimpleNamespace]:
    """``--auth all`` with a key: every request needs it."""
    with serving(gallery["index"], ServeConf(port=0, auth="all", api_key=KEY)) as url:
        yield SimpleNamespace(url=url)


# -- reads -----------------------------------------------------------------------------


def test_search_by_upload_id_and_vector(server: SimpleNamespace) -> None:
    got = upload(f"{server.url}/search", png("coffee"), {"k": 3})
    assert got.status_code == 200, got.text
    body = got.json()
    assert set(body) == {"results", "took_ms"} and body["took_ms"] >= 0
    results = body["results"]
    assert [r["rank"] for r in results] == [1, 2, 3]
    top = results[0]
    assert top["label"] == "coffee" and top["metadata"] == {"label": "coffee"}
    assert "inliers" in top  # a small gallery is verified by default
    assert all("path" not in r for r in results)  # never a server path
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    by_id = httpx.post(f"{server.url}/search", json={"id": top["id"]}, params={"k": 2})
    assert by_id.status_code == 200 and by_id.json()["results"][0]["id"] == top["id"]
    info = httpx.get(f"{server.url}/info").json()
    vector = [0.0] * info["dim"]
    vector[0] = 1.0
    by_vector = httpx.post(f"{server.url}/search", json={"vector": vector}, params={"k": 2})
    assert by_vector.status_code == 200 and len(by_vector.json()["results"]) == 2
    plain = upload(f"{server.url}/search", png("coffee"), {"k": 3, "rerank": "none"})
    assert all("inliers" not in r for r in plain.json()["results"])
    assert plain.json()["results"][0]["id"] == top["id"]


def test_search_filters_and_box(server: SimpleNamespace) -> None:
    only = upload(f"{server.url}/search", png("coffee"), {"k": 5, "label": "rocket"})
    assert [r["label"] for r in only.json()["results"]] == ["rocket"]
    where = upload(
        f"{server.url}/search", png("coffee"), {"k": 5, "where": json.dumps({"label": "camera"})}
    )
    assert [r["label"] for r in where.json()["results"]] == ["camera"]
    boxed = upload(f"{server.url}/search", png("coffee"), {"k": 1, "box": "0,0,120,120"})
    assert boxed.status_code == 200 and len(boxed.json()["results"]) == 1


def test_recognize(server: SimpleNamespace) -> None:
    got = upload(f"{server.url}/recognize", png("rocket"))
    assert got.status_code == 200, got.text
    body = got.json()
    assert set(body) == {"label", "confidence", "abstained", "neighbours"}
    assert body["label"] == "rocket" and body["abstained"] is False
    assert body["neighbours"][0]["label"] == "rocket"


def test_info_healthz_metrics(server: SimpleNamespace) -> None:
    health = httpx.get(f"{server.url}/healthz")
    assert health.json() == {"status": "ok", "images": len(NAMES)}
    info = httpx.get(f"{server.url}/info").json()
    assert info["counts"]["ok"] == len(NAMES) and info["failed"] == 0
    assert "index" not in info  # no server paths
    text = httpx.get(f"{server.url}/metrics").text
    assert 'lookalike_requests_total{endpoint="/healthz",status="200"}' in text
    assert "lookalike_request_seconds_bucket" in text
    assert f"lookalike_index_images {float(len(NAMES))}" in text
    assert httpx.get(f"{server.url}/docs").status_code == 200  # OpenAPI docs


def test_bad_requests_get_one_line_errors(server: SimpleNamespace) -> None:
    url = f"{server.url}/search"
    assert "not an image" in one_line_error(upload(url, b"%PDF-1.4 not an image" * 10), 415)
    assert one_line_error(upload(url, png("coffee")[:300]), 422)  # truncated PNG
    assert one_line_error(upload(url, b""), 422)
    big = os.urandom(3 * 1024 * 1024)  # over the 2 MB limit
    assert "larger than 2 MB" in one_line_error(upload(url, big), 413)
    assert "no image with id 999" in one_line_error(httpx.post(url, json={"id": 999}), 404)
    for params in ({"k": "0"}, {"k": "x"}, {"k": "5000"}, {"box": "1,2,3"}, {"box": "5,5,1,1"},
                   {"where": "[1]"}, {"where": "{bad"}, {"rerank": "nope"}):  # fmt: skip
        one_line_error(upload(url, png("coffee"), params), 422)
    one_line_error(httpx.post(url, json={"id": "1"}), 422)
    one_line_error(httpx.post(url, json={"vector": [1.0, 2.0]}), 422)  # wrong dimension
    one_line_error(httpx.post(url, json={"vector": ["a"]}), 422)
    one_line_error(httpx.post(url, json={"both": 1}), 422)
    one_line_error(httpx.post(url, content=b"x", headers={"content-type": "text/plain"}), 415)
    one_line_error(httpx.post(url, files={"other": ("a", b"x")}), 422)


def test_an_upload_without_a_length_is_cut_off_while_it_streams(server: SimpleNamespace) -> None:
    """A chunked upload (no Content-Length) is counted as it arrives and refused at the
    limit, not read whole."""

    def body(chunks: int):
        yield (
            b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="q"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n"
        )
        for _ in range(chunks):
            yield b"a" * 65536
        yield b"\r\n--xyz--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    big = httpx.post(f"{server.url}/search", content=body(48), headers=headers, timeout=60)
    assert big.request.headers.get("transfer-encoding") == "chunked"
    assert "larger than 2 MB" in one_line_error(big, 413)
    small = httpx.post(f"{server.url}/search", content=body(2), headers=headers, timeout=60)
    assert "not an image" in one_line_error(small, 415)  # read whole, then sniffed


def test_requests_never_name_a_path(server: SimpleNamespace, gallery: dict) -> None:
    """Path-like values in every parameter that names a thing are data, not paths."""
    secret = str(gallery["index"] / "manifest.json")
    url = f"{server.url}/search"
    for params in ({"label": "../../etc/passwd"}, {"rerank": "../manifest.json"},
                   {"where": json.dumps({"path": secret})}):  # fmt: skip
        r = upload(url, png("coffee"), params)
        assert r.status_code in (200, 422)
        assert "manifest" not in r.text or r.status_code == 422
    r = httpx.post(url, json={"id": secret})
    one_line_error(r, 422)
    assert httpx.get(f"{server.url}/../manifest.json").status_code == 404


def test_concurrent_searches_have_no_errors(server: SimpleNamespace) -> None:
    data = [png(n) for n in NAMES]

    def one(i: int) -> int:
        return upload(f"{server.url}/search", data[i % len(data)], {"k": 2}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(24)))
    assert all(c in (200, 503) for c in codes) and codes.count(200) >= 2


# -- security ----------------------------------------------------------------------------


def test_auth_all_needs_the_key(locked: SimpleNamespace) -> None:
    url = f"{locked.url}/healthz"
    missing = httpx.get(url)
    assert "API key is required" in one_line_error(missing, 401)
    assert missing.headers["www-authenticate"] == "Bearer"
    one_line_error(httpx.get(url, headers={"X-API-Key": KEY + "x"}), 403)
    one_line_error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 403)
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(url, headers={"X-API-Key": KEY}).status_code == 200
    search = upload(f"{locked.url}/search", png("coffee"), headers={"X-API-Key": KEY})
    assert search.status_code == 200
    one_line_error(httpx.get(f"{locked.url}/images/1/thumbnail"), 401)
    # the page itself holds no data: it loads, and asks for the key
    assert httpx.get(f"{locked.url}/").status_code == 200
    assert httpx.get(f"{locked.url}/app.js").status_code == 200


def test_writes_are_refused_without_a_configured_key(server: SimpleNamespace) -> None:
    r = httpx.delete(f"{server.url}/images/1")
    assert "no API key is configured" in one_line_error(r, 403)


def test_conf_and_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert load_api_key() is None
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert load_api_key() == KEY
    key_file = tmp_path / "key"
    key_file.write_text("file-key-0123456789abcdef\nignored\n")
    assert load_api_key(key_file) == "file-key-0123456789abcdef"
    key_file.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_api_key(key_file)
    with pytest.raises(ConfigError, match="cannot read"):
        load_api_key(tmp_path / "missing")
    assert ServeConf().host == "127.0.0.1" and not ServeConf().writes_open
    for bad in ({"api_key": "short"}, {"auth": "all"}, {"auth": "some"}, {"port": 70000},
                {"max_upload_mb": 0}, {"max_active": 0}):  # fmt: skip
        with pytest.raises(ConfigError):
            ServeConf(**bad)


def test_admission_sheds_load_with_retry_after() -> None:
    gate = Admission(max_active=1, max_queued=1)
    release, entered = threading.Event(), threading.Event()

    def hold() -> None:
        with gate.slot():
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait(10)
    waiter = threading.Thread(target=lambda: gate.slot().__enter__())  # queued: waits
    waiter.start()
    time.sleep(0.1)
    with pytest.raises(ServiceError) as refused, gate.slot():
        pass
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    assert gate.refused == 1
    release.set()
    holder.join(10)
    waiter.join(10)


# -- the command ---------------------------------------------------------------------------


def test_cli_serve_starts_binds_loopback_and_stops_on_sigterm(
    gallery: dict, tmp_path: Path
) -> None:
    index = tmp_path / "index"
    shutil.copytree(gallery["index"], index)  # the other fixtures' servers hold the lock
    port = free_port()
    env = {**os.environ, API_KEY_ENV: KEY}
    command = [sys.executable, "-m", "lookalike.cli", "serve"]
    command += ["--index", str(index), "--port", str(port)]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
        assert health.json()["images"] == len(NAMES)
        # the service (writes open: a key is configured) is the index's one writer
        photos = str(gallery["base"] / "photos")
        indexing = subprocess.run(
            [sys.executable, "-m", "lookalike.cli", "index", photos, "--index", str(index)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert indexing.returncode != 0
        assert f"pid {proc.pid}" in indexing.stderr, indexing.stderr
        proc.send_signal(signal.SIGTERM)
        # uvicorn finishes the in-flight requests, then exits by the signal it got
        assert proc.wait(60) in (0, -signal.SIGTERM)
        log = proc.stdout.read()
        assert "GET /healthz" in log  # one access-log line per request
        assert "Finished server process" in log and "Traceback" not in log
        assert KEY not in log
    finally:
        if proc.poll() is None:
            proc.kill()
