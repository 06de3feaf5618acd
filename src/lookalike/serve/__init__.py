"""``lookalike serve``: the HTTP service over one index (FastAPI on uvicorn).

* :mod:`lookalike.serve.conf`: :class:`ServeConf` and where the API key comes from;
* :mod:`lookalike.serve.guards`: the key check, upload limits and sniffing, admission;
* :mod:`lookalike.serve.app`: the endpoints, :func:`create_app`.

::

    serve("my.idx", ServeConf(port=8000, api_key=load_api_key()))
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lookalike.serve.conf import API_KEY_ENV, ServeConf, load_api_key

__all__ = ["API_KEY_ENV", "ServeConf", "create_app", "load_api_key", "serve", "serving"]


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


def free_port() -> int:
    """A TCP port free on the loopback address now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(index_dir: str | Path, conf: ServeConf | None = None) -> Iterator[str]:
    """Serve the index from a thread of this process for the duration of the block, on
    ``conf``'s port or a free one (port 0); yields its URL (``http://127.0.0.1:PORT``).
    What ``make demo`` and the tests run.

    Raises:
        RuntimeError: the server did not start within 30 s.
    """
    import dataclasses

    import uvicorn

    conf = conf or ServeConf(port=0)
    if conf.port == 0:
        conf = dataclasses.replace(conf, port=free_port())
    config = uvicorn.Config(
        create_app(index_dir, conf), host=conf.host, port=conf.port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the service on port {conf.port} did not start")
            time.sleep(0.05)
        yield f"http://{conf.host}:{conf.port}"
    finally:
        server.should_exit = True
        thread.join(30)
