"""The service's web page: ``GET /`` (``index.html``), ``GET /app.js`` and ``GET /style.css``.

Three fixed names, read once from the package (``lookalike/serve/static``, shipped in the
wheel as package data) into memory when the routes are added, and served from there. There
is deliberately no static-files mount: no request value can become a file path, and nothing
else in the package directory can be fetched.

The page is plain HTML, CSS and JavaScript (no build step, nothing fetched from other
hosts) and talks only to this service's own endpoints; its Content-Security-Policy allows
scripts, styles and requests from this origin alone (images also from ``blob:`` and
``data:`` URLs: the query preview and the match drawing), so no inline script or handler
would run even if one were injected.

::

    app = create_app("my.idx", conf)
    add_page_routes(app)
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'"
)
COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
# route -> (file in lookalike/serve/static, media type)
PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


def read_static(name: str) -> bytes:
    """The bytes of one of the page's files (a name from :data:`PAGES`)."""
    return resources.files("lookalike.serve").joinpath("static", name).read_bytes()


def add_page_routes(app: FastAPI) -> None:
    """Register ``GET /``, ``GET /app.js`` and ``GET /style.css`` on ``app`` (the files are
    read now, once)."""
    for route, (name, media_type) in PAGES.items():
        headers = dict(COMMON_HEADERS)
        if name.endswith(".html"):
            headers["Content-Security-Policy"] = CSP
        app.add_api_route(
            route,
            _responder(read_static(name), media_type, headers),
            methods=["GET"],
            name=name,
            include_in_schema=False,
        )


def _responder(body: bytes, media_type: str, headers: dict[str, str]):
    async def page() -> Response:
        return Response(body, media_type=media_type, headers=headers)

    return page
