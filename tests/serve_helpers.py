"""What the service's tests share: the labelled gallery they serve, uploads, error checks."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
from conftest import photo

NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins")
KEY = "k" * 8 + "-test-key-0123456789"
BEARER = {"Authorization": f"Bearer {KEY}"}


def build_gallery(base: Path, extractor) -> dict:
    """6 labelled photos (label = their folder) in ``base/photos``, indexed with the default
    preset into ``base/index``; ``{"base", "index"}``."""
    from lookalike.indexing import index_folder
    from lookalike.labels import label_source

    for name in NAMES:
        (base / "photos" / name).mkdir(parents=True)
        photo(name, 192).save(base / "photos" / name / "0.png")
    labels = label_source("folder", base / "photos")
    index_folder(
        base / "photos", base / "index", extractor.conf, extractor=extractor, labels=labels
    )
    return {"base": base, "index": base / "index"}


def png(name: str, side: int = 192) -> bytes:
    out = io.BytesIO()
    photo(name, side).save(out, format="PNG")
    return out.getvalue()


def upload(
    url: str, data: bytes, params: dict | None = None, headers=None, **fields
) -> httpx.Response:
    files = {"image": ("q.png", data, "image/png")}
    return httpx.post(
        url, files=files, data=fields or None, params=params, headers=headers, timeout=60
    )


def one_line_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and body["error"]
    return body["error"]
