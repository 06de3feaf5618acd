"""What keeps the service closed and bounded: the API key check, upload limits and
sniffing, and admission control.

* :func:`check_key`: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``, compared in constant
  time (:func:`hmac.compare_digest`); a missing key is ``401``, a wrong one ``403``, and
  writes with no key configured ``403``.
* :class:`BodyLimit`: an ASGI middleware that refuses a body larger than the limit from its
  ``Content-Length`` before reading it, and counts the bytes of one that streams without
  it, stopping at the limit (``413``): an upload is never held whole past the limit.
* :func:`sniff_image`: the upload's bytes, not its name or content type, say what it is:
  PIL must recognise an image format (``415`` otherwise), its header size must be sane
  (``422`` for decompression bombs) and it must decode (``422`` for a corrupt file).
* :class:`Admission`: at most ``max_active`` requests work at once and ``max_queued`` wait;
  past that a request gets ``503`` with ``Retry-After`` at once, never an unbounded backlog.
"""

from __future__ import annotations

import hmac
import io
import threading
import warnings
from contextlib import contextmanager
from typing import Any

from PIL import Image

from lookalike.errors import ImageError
from lookalike.images import decode_image

MAX_UPLOAD_PIXELS = 50_000_000  # an upload's header may claim at most this many pixels
RETRY_AFTER_S = 1  # what a 503 tells the client to wait


class ServiceError(Exception):
    """An error the service answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())
        self.headers = headers or {}


def presented_key(headers: Any) -> str | None:
    """The key a request presents: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


def check_key(headers: Any, api_key: str | None, no_auth: bool, write: bool) -> None:
    """Refuse a request that needs the key and does not present it (or the right one).

    Raises:
        ServiceError: 403 for a write when no key is configured (and not ``no_auth``);
            401 when no key is presented; 403 when the key is wrong.
    """
    if no_auth:
        return
    if api_key is None:
        if write:
            raise ServiceError(
                403,
                "writes are off: no API key is configured (set LOOKALIKE_API_KEY or "
                "--api-key-file, or start with --no-auth)",
            )
        return
    given = presented_key(headers)
    if given is None:
        raise ServiceError(
            401,
            "an API key is required: send Authorization: Bearer KEY or X-API-Key: KEY",
            {"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.encode("utf-8"), api_key.encode("utf-8")):
        raise ServiceError(403, "wrong API key")


class UploadTooLarge(ServiceError):
    """A request body past the limit (raised while it streams: the app's error handler
    answers it like any :class:`ServiceError`, :class:`BodyLimit` where no handler did)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the upload is larger than {limit // (1024 * 1024)} MB")


class BodyLimit:
    """ASGI middleware: request bodies of at most ``limit`` bytes, checked as they stream.

    Args:
        app: the ASGI app.
        limit: bytes.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = int(limit)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(send, self.limit)
            return
        seen = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise UploadTooLarge(self.limit)
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except* UploadTooLarge:  # (grouped by a task group of a middleware, or bare)
            if not started:
                await _too_large(send, self.limit)


async def _too_large(send: Any, limit: int) -> None:
    import json

    body = json.dumps({"error": UploadTooLarge(limit).message})
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


# what an image format is kept as (an extension lookalike indexes); by PIL's format name
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp",
              "TIFF": "tif", "GIF": "gif"}  # fmt: skip


def sniff_image(data: bytes, name: str = "upload", decode: bool = True) -> str:
    """Check that ``data`` is a decodable image of sane size; returns its file extension
    (:data:`EXTENSIONS`, from the bytes). ``decode=False`` checks the header only: for a
    query, whose decoding (and its ``ImageError``, answered ``422``) comes next anyway.

    Raises:
        ServiceError: 415 not an image (by its bytes), 422 too many pixels or corrupt.
    """
    if not data:
        raise ServiceError(422, f"{name} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                fmt = img.format or ""
    except Image.DecompressionBombError:
        raise ServiceError(422, f"{name} claims an absurd size (a decompression bomb?)") from None
    except Exception:
        raise ServiceError(415, f"{name} is not an image (by its content)") from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise ServiceError(
            422, f"{name} is {width}x{height} pixels, over the {MAX_UPLOAD_PIXELS:,} limit"
        )
    if fmt not in EXTENSIONS:
        raise ServiceError(415, f"{name} is a {fmt or 'unknown'} image; send JPEG, PNG or WebP")
    if decode:
        try:
            decode_image(data, max_side=64, max_pixels=MAX_UPLOAD_PIXELS, name=name)
        except ImageError as error:
            raise ServiceError(422, str(error)) from None
    return EXTENSIONS[fmt]


class Admission:
    """At most ``max_active`` holders at once, ``max_queued`` waiting; others refused.

    Thread-safe (the endpoints run in a thread pool).
    """

    def __init__(self, max_active: int, max_queued: int) -> None:
        self.max_active = int(max_active)
        self.max_queued = int(max_queued)
        self._slots = threading.Semaphore(self.max_active)
        self._lock = threading.Lock()
        self.inside = 0  # active + waiting
        self.refused = 0  # requests shed with 503

    def busy(self, message: str) -> ServiceError:
        """A ``503`` with ``Retry-After`` to raise (counted as shed load)."""
        with self._lock:
            return self._busy(message)

    def _busy(self, message: str) -> ServiceError:
        self.refused += 1
        return ServiceError(503, message, {"Retry-After": str(RETRY_AFTER_S)})

    @contextmanager
    def slot(self):
        """Hold a slot for the duration of the block.

        Raises:
            ServiceError: 503 with ``Retry-After`` when every slot and queue place is taken.
        """
        with self._lock:
            if self.inside >= self.max_active + self.max_queued:
                raise self._busy("the service is busy: retry shortly")
            self.inside += 1
        try:
            with self._slots:
                yield
        finally:
            with self._lock:
                self.inside -= 1
