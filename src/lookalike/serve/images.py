"""The service's image endpoints: add, remove, describe, thumbnail, match overlay.

* ``POST /images``: multipart ``image`` plus optional ``metadata`` (a JSON object) and
  ``label`` -> ``201 {"id": N}`` once committed; the same bytes again -> ``200`` with the
  existing id (:mod:`lookalike.serve.writer`).
* ``DELETE /images/{id}`` -> ``204``; ``PUT /images/{id}/metadata`` (a JSON object: the user
  metadata, replaced; the label is kept unless the object names one) -> ``200``.
* ``GET /images/{id}``: ``{"id", "label", "metadata", "width", "height", "uploaded"}``.
* ``GET /images/{id}/thumbnail``: a JPEG of at most :data:`THUMB_SIDE` px, made once and
  kept in ``<index>/thumbnails/<id>-<content hash>.jpg``.
* ``GET /match?a=ID&b=ID``, or ``POST /match?b=ID`` with a multipart ``image``: the match
  overlay PNG (the two images side by side, a line per verified inlier).

Images are named by id only: the file behind an id is the one the index recorded, and no
request value is ever part of a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response

from lookalike.errors import ConfigError, ImageError, LookalikeError
from lookalike.index.conf import ImageRecord
from lookalike.labels import LABEL_KEY, label_of
from lookalike.serve.guards import ServiceError, sniff_image
from lookalike.serve.service import Service
from lookalike.serve.writer import UPLOADS_DIR

THUMBS_DIR = "thumbnails"  # inside the index directory: a cache, rebuilt on demand
THUMB_SIDE = 256  # px, the long side of a thumbnail
MAX_METADATA_BYTES = 64 * 1024  # a metadata object larger than this is refused

ImageId = Annotated[int, PathParam(ge=0, lt=2**63, description="an image id of the index")]


def record_json(record: ImageRecord, root: Path) -> dict:
    """An image as ``GET /images/{id}`` shows it: no path of the server."""
    return {
        "id": record.id,
        "label": label_of(record.metadata),
        "metadata": record.metadata,
        "width": record.width,
        "height": record.height,
        "uploaded": Path(record.fs_path).is_relative_to(root / UPLOADS_DIR),
    }


def _metadata(text: object, label: object) -> dict:
    """The metadata of an upload from its form fields."""
    metadata: dict = {}
    if text not in (None, ""):
        if not isinstance(text, str) or len(text) > MAX_METADATA_BYTES:
            raise ServiceError(422, f"metadata must be a JSON object under {MAX_METADATA_BYTES} B")
        try:
            metadata = json.loads(text)
        except json.JSONDecodeError:
            raise ServiceError(422, "metadata is not valid JSON") from None
        if not isinstance(metadata, dict):
            raise ServiceError(422, "metadata must be a JSON object")
    if label not in (None, ""):
        if not isinstance(label, str) or len(label) > 1000:
            raise ServiceError(422, "label must be text of at most 1000 characters")
        metadata[LABEL_KEY] = label
    return metadata


async def upload_of(request: Request, field: str = "image") -> tuple[bytes, str, dict]:
    """``(bytes, extension, form)`` of a multipart upload, sniffed from its bytes."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ServiceError(415, f"send multipart/form-data with an {field!r} file")
    form = await request.form()
    upload = form.get(field)
    if upload is None or isinstance(upload, str):
        raise ServiceError(422, f"send the image as the multipart field {field!r}")
    data = await upload.read()
    return data, sniff_image(data, "the uploaded image"), dict(form)


def add_image_routes(app: FastAPI, service: Service) -> None:
    """Register the image endpoints on ``app``."""
    root = service.index_dir.resolve()

    def record_of(image_id: int) -> ImageRecord:
        (record,) = service.base.store.get([image_id])
        if record is None or record.status != "ok":
            raise ServiceError(404, f"no image with id {image_id}")
        return record

    async def committed(future) -> object:
        """What the writer answers once the change is committed; an image it could not
        describe is ``422``, any other error (a full disk) the app's ``500``."""
        try:
            return await asyncio.wrap_future(future)
        except (ImageError, ConfigError) as error:
            raise ServiceError(422, str(error)) from None

    @app.post("/images", status_code=201)
    async def add(request: Request):
        data, ext, form = await upload_of(request)
        metadata = _metadata(form.get("metadata"), form.get("label"))
        added = await committed(service.writes().add(data, ext, metadata))
        return JSONResponse({"id": added.id}, 201 if added.created else 200)

    @app.delete("/images/{image_id}", status_code=204)
    async def remove(image_id: ImageId):
        if not await committed(service.writes().remove(image_id)):
            raise ServiceError(404, f"no image with id {image_id}")
        for thumb in (root / THUMBS_DIR).glob(f"{image_id}-*.jpg"):
            with contextlib.suppress(OSError):
                thumb.unlink()
        return Response(status_code=204)

    @app.put("/images/{image_id}/metadata")
    async def set_metadata(image_id: ImageId, request: Request):
        body = await request.body()
        if len(body) > MAX_METADATA_BYTES:
            raise ServiceError(413, f"metadata must be under {MAX_METADATA_BYTES} bytes")
        try:
            metadata = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ServiceError(422, "the body is not valid JSON") from None
        if not isinstance(metadata, dict):
            raise ServiceError(422, "the body must be a JSON object of metadata")
        if not await committed(service.writes().set_metadata(image_id, metadata)):
            raise ServiceError(404, f"no image with id {image_id}")
        return record_json(record_of(image_id), root)

    @app.get("/images/{image_id}")
    async def describe(image_id: ImageId):
        return record_json(record_of(image_id), root)

    @app.get("/images/{image_id}/thumbnail")
    async def thumbnail(image_id: ImageId):
        record = record_of(image_id)
        data = await service.run(lambda: thumbnail_bytes(record, root / THUMBS_DIR))
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/match")
    async def match_ids(
        a: Annotated[int, Query(ge=0, lt=2**63)], b: Annotated[int, Query(ge=0, lt=2**63)]
    ):
        first, second = record_of(a), record_of(b)
        png = await service.run(lambda: overlay(service, first, second))
        return Response(png, media_type="image/png")

    @app.post("/match")
    async def match_upload(request: Request, b: Annotated[int, Query(ge=0, lt=2**63)]):
        second = record_of(b)
        data, _, _ = await upload_of(request)
        png = await service.run(lambda: overlay(service, data, second))
        return Response(png, media_type="image/png")


def thumbnail_bytes(record: ImageRecord, thumbs: Path) -> bytes:
    """The JPEG thumbnail of an indexed image: the cached one, or made now and cached
    (atomically; a directory that cannot be written only costs the cache)."""
    from lookalike.confined import read_bytes
    from lookalike.storage import atomic_write

    path = thumbs / f"{record.id}-{record.content_hash}.jpg"
    with contextlib.suppress(OSError, LookalikeError):
        if path.is_file() and not path.is_symlink():
            return read_bytes(path)[0]
    image = _indexed(record, THUMB_SIDE)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    data = out.getvalue()
    with contextlib.suppress(OSError, LookalikeError):
        thumbs.mkdir(exist_ok=True)
        atomic_write(path, lambda stream: stream.write(data), unique=True)
    return data


def _indexed(record: ImageRecord, max_side: int | None = None):
    """The decoded file of an indexed image; ``404`` without the server's path when it
    cannot be read now (moved, deleted, changed)."""
    from lookalike.images import load_image

    try:
        return load_image(record.fs_path, max_side=max_side)
    except LookalikeError:
        raise ServiceError(404, f"the file of image {record.id} cannot be read now") from None


def overlay(service: Service, query: ImageRecord | bytes, record: ImageRecord) -> bytes:
    """The match overlay PNG of ``query`` (an indexed image or uploaded bytes) and an
    indexed image, with the index's local-feature settings."""
    from lookalike.images import decode_image
    from lookalike.local.pair import match_images

    conf, extractor, lock = service.matcher()
    if isinstance(query, bytes):
        try:
            first = decode_image(query, name="the uploaded image")
        except LookalikeError as error:
            raise ServiceError(422, " ".join(str(error).split())) from None
    else:
        first = _indexed(query)
    second = _indexed(record)
    out = io.BytesIO()
    with lock:
        match_images(first, second, conf, out, extractor)
    return out.getvalue()
