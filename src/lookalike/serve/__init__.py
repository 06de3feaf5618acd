"""``lookalike serve``: the HTTP service over one index (FastAPI on uvicorn).

* :mod:`lookalike.serve.conf`: :class:`ServeConf` and where the API key comes from;
* :mod:`lookalike.serve.guards`: the key check, upload limits and sniffing, admission;
* :mod:`lookalike.serve.app`: the endpoints, :func:`create_app`.

::

    serve("my.idx", ServeConf(port=8000, api_key=load_api_key()))
"""

from __future__ import annotations

from pathlib import Path

from lookalike.serve.conf import API_KEY_ENV, ServeConf, load_api_key

__all__ = ["API_KEY_ENV", "ServeConf", "create_app", "load_api_key", "serve"]


def create_app(index_dir: str | Path, conf: ServeConf | None = None):
    """:func:`lookalike.serve.app.create_app` (imported on use: it loads FastAPI)."""
    from lookalike.serve.app import create_app as make

    return make(index_dir, conf)


def serve(index_dir: str | Path, conf: ServeConf) -> None:
    """Serve the index until SIGTERM or Ctrl-C (in-flight requests finish first); one
    access-log line per request."""
    import uvicorn

    app = create_app(index_dir, conf)
    uvicorn.run(app, host=conf.host, port=conf.port, log_level="info", timeout_graceful_shutdown=30)
