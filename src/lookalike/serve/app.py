"""The HTTP service: a thin FastAPI app over the stage functions (no logic only here).

::

    app = create_app("my.idx", ServeConf(api_key=load_api_key()))
    uvicorn.run(app, host="127.0.0.1", port=8000)          # what `lookalike serve` runs

Endpoints (JSON; errors are ``{"error": "<one line>"}``):

* ``POST /search``: a multipart ``image`` file, or a JSON body ``{"id": N}`` or
  ``{"vector": [...]}``; query parameters ``k``, ``box=x1,y1,x2,y2``, ``rerank`` (as the
  CLI's ``--rerank``: ``auto`` by default, ``none``, or stages), ``label`` and ``where``
  (a JSON object matched against the user metadata). ``{"results": [{"rank", "id",
  "score", "label", "metadata", "inliers"}], "took_ms"}``, best first.
* ``POST /recognize``: ``image`` -> ``{"label", "confidence", "abstained", "neighbours"}``.
* ``GET /info`` (settings and counts), ``GET /healthz``, ``GET /metrics`` (Prometheus text).
* the image endpoints (``/images``, ``/images/{id}``, its thumbnail and metadata, ``/match``):
  :mod:`lookalike.serve.images`; the web page at ``/``: :mod:`lookalike.serve.page`.

A result names images by id, never by the server's file path, and no request value ever
becomes a path: queries are uploaded bytes, ids or vectors.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from lookalike.errors import ConfigError, ImageError, LookalikeError
from lookalike.labels import label_of
from lookalike.query import Query
from lookalike.search import AUTO, Hit
from lookalike.serve.conf import ServeConf
from lookalike.serve.guards import BodyLimit, ServiceError, check_key, sniff_image
from lookalike.serve.images import add_image_routes
from lookalike.serve.page import PAGES, add_page_routes
from lookalike.serve.service import Service

logger = logging.getLogger(__name__)

FILTER_DEPTH = 20  # with a metadata filter, k * this many results are filtered


def _parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None or text == "":
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in text.split(","))
    except ValueError:
        raise ServiceError(422, f"box {text!r} must be four numbers x1,y1,x2,y2") from None
    if not (x1 < x2 and y1 < y2):
        raise ServiceError(422, f"box {text!r} is empty: give x1 < x2 and y1 < y2")
    return x1, y1, x2, y2


def _parse_k(text: str | None, conf: ServeConf) -> int:
    try:
        k = 10 if text is None else int(text)
    except ValueError:
        raise ServiceError(422, f"k must be an integer, got {text!r}") from None
    if not 1 <= k <= conf.k_max:
        raise ServiceError(422, f"k must be in 1..{conf.k_max}, got {k}")
    return k


def _parse_where(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        where = json.loads(text)
    except json.JSONDecodeError:
        raise ServiceError(422, f"where must be a JSON object, got {text!r}") from None
    if not isinstance(where, dict):
        raise ServiceError(422, "where must be a JSON object of metadata keys and values")
    return where


def hit_json(hit: Hit) -> dict:
    """A result as the service returns it: by id, never by the server's path."""
    out: dict[str, Any] = {
        "rank": hit.rank,
        "id": hit.id,
        "score": round(hit.score, 6),
        "label": label_of(hit.metadata),
        "metadata": hit.metadata,
    }
    if hit.inliers is not None:
        out["inliers"] = hit.inliers
    return out


def _matches(hit: Hit, label: str | None, where: dict | None) -> bool:
    if label is not None and label_of(hit.metadata) != label:
        return False
    return where is None or all(hit.metadata.get(k) == v for k, v in where.items())


async def _query(request: Request, service: Service, box) -> Query:
    """The query of a ``/search`` or ``/recognize`` request: an uploaded image, or a JSON
    ``{"id": N}`` / ``{"vector": [...]}``."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ServiceError(422, "send the query image as the multipart field 'image'")
        data = await upload.read()
        sniff_image(data, "the uploaded image", decode=False)  # the search decodes it next
        return Query(image=data, box=box, name="upload")
    if kind.startswith("application/json"):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ServiceError(422, "the body is not valid JSON") from None
        if not isinstance(body, dict) or len(set(body) & {"id", "vector"}) != 1:
            raise ServiceError(422, 'the JSON body must be {"id": N} or {"vector": [...]}')
        if "id" in body:
            image_id = body["id"]
            if isinstance(image_id, bool) or not isinstance(image_id, int):
                raise ServiceError(422, f"id must be an integer, got {image_id!r}")
            (record,) = service.base.store.get([image_id])
            if record is None:
                raise ServiceError(404, f"no image with id {image_id}")
            return Query(id=image_id)
        vector = body["vector"]
        if not (isinstance(vector, list) and vector and len(vector) <= 65536):
            raise ServiceError(422, "vector must be a non-empty list of numbers")
        try:
            array = np.asarray(vector, dtype=np.float32)
        except (TypeError, ValueError):
            raise ServiceError(422, "vector must be a list of numbers") from None
        if array.ndim != 1 or not np.isfinite(array).all():
            raise ServiceError(422, "vector must be a flat list of finite numbers")
        return Query(vector=array)
    raise ServiceError(
        415, "send multipart/form-data with an 'image' file, or application/json with an id"
    )


def create_app(index_dir: str | Path, conf: ServeConf | None = None) -> FastAPI:
    """The service's app over the index at ``index_dir`` (opened now, read-only).

    Raises:
        IndexStateError: not an index.
    """
    conf = conf or ServeConf()
    service = Service(index_dir, conf)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()  # after the in-flight requests

    app = FastAPI(title="lookalike", version="0.1.0", docs_url="/docs", lifespan=lifespan)
    app.state.service = service

    if conf.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(conf.cors),
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )

    app.add_exception_handler(ServiceError, lambda request, error: _error(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):  # 404, 405 routing
        return _error(ServiceError(error.status_code, str(error.detail), error.headers))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return _error(ServiceError(422, f"bad request: {error.errors()[0].get('msg', error)}"))

    @app.exception_handler(LookalikeError)
    async def refused(request: Request, error: LookalikeError):
        status = 422 if isinstance(error, ConfigError | ImageError) else 500
        message = str(error)
        for root in {str(service.index_dir.resolve()), str(service.index_dir)}:
            message = message.replace(root, "<index>")  # no server path in an answer
        return _error(ServiceError(status, message))

    run = service.run

    @app.post("/search")
    async def search(request: Request):
        p = request.query_params
        k = _parse_k(p.get("k"), conf)
        box = _parse_box(p.get("box"))
        label, where = p.get("label"), _parse_where(p.get("where"))
        query = await _query(request, service, box)
        searcher = service.searcher(p.get("rerank", AUTO))
        depth = k * FILTER_DEPTH if (label is not None or where) else k
        started = time.perf_counter()
        (answer,) = await run(lambda: searcher.answer([query], k=depth))
        hits = [h for h in answer.hits if _matches(h, label, where)][:k]
        took = 1000 * (time.perf_counter() - started)
        results = [{**hit_json(h), "rank": n} for n, h in enumerate(hits, 1)]
        return {"results": results, "took_ms": round(took, 1)}

    @app.post("/recognize")
    async def recognize(request: Request):
        from lookalike.recognize import Recognizer

        p = request.query_params
        query = await _query(request, service, _parse_box(p.get("box")))
        searcher = service.searcher(p.get("rerank", "none"))
        recognizer = Recognizer(searcher, k=_parse_k(p.get("k"), conf))
        (prediction,) = await run(lambda: recognizer.predict([query]))
        return {
            "label": prediction.label,
            "confidence": prediction.confidence,
            "abstained": prediction.label is None,
            "neighbours": [hit_json(h) for h in prediction.neighbours],
        }

    @app.get("/info")
    async def info():
        from lookalike.indexing import index_info

        data = await run(lambda: index_info(service.index_dir))
        data["failed"] = len(data.get("failed") or [])  # counts only: no server paths
        data.pop("index", None)
        data["writable"] = service.writer is not None
        return data

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "images": len(service.base)}

    @app.get("/metrics")
    async def metrics():
        service.images.set(len(service.base))
        service.shed.set(service.admission.refused)
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    add_image_routes(app, service)
    add_page_routes(app)
    app.add_middleware(Gatekeeper, service=service)
    app.add_middleware(BodyLimit, limit=conf.max_upload_bytes)  # outermost: before parsing
    return app


READS = ("/search", "/recognize", "/match")  # POST endpoints that change nothing


class Gatekeeper:
    """ASGI middleware: the key check before anything runs (writes always, every request
    but the page with ``--auth all``), then the request count and latency by route
    template (``/images/{image_id}``, so the metrics stay bounded). Pure ASGI rather than
    ``@app.middleware``: it adds no task and no response copy to a request."""

    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conf, path, started = self.service.conf, scope["path"], time.perf_counter()
        status = 500

        async def observed(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            write = scope["method"] in ("POST", "PUT", "DELETE", "PATCH") and path not in READS
            if write or (conf.auth == "all" and path not in PAGES):  # the page holds no data
                check_key(Headers(scope=scope), conf.api_key, conf.no_auth, write)
        except ServiceError as error:
            await _error(error)(scope, receive, observed)
        else:
            await self.app(scope, receive, observed)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.service.requests.labels(endpoint, str(status)).inc()
            self.service.latency.labels(endpoint).observe(time.perf_counter() - started)


def _error(error: ServiceError) -> JSONResponse:
    return JSONResponse({"error": error.message}, error.status, headers=error.headers)
