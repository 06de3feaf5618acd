"""How lookalike reaches Milvus: the structures it builds, server URIs and access tokens,
and the clients of Milvus Lite (one embedded server per data directory in this process,
refused while another process holds it) or of a server. The backend that keeps an index's
vectors in a collection is :mod:`lookalike.index.backends.milvus_backend`.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lookalike.confined import check_dir
from lookalike.errors import ConfigError, IndexStateError
from lookalike.index.backends.base import BackendSite
from lookalike.index.conf import IndexConf

logger = logging.getLogger(__name__)

LITE_NAME = "milvus.db"  # Milvus Lite's data directory inside the index directory
TOKEN_ENV = "LOOKALIKE_MILVUS_TOKEN_FILE"  # names the file holding a server's access token
SCHEMES = ("http", "https", "tcp", "unix")
MILVUS_KNOBS = {"ef_search": "ef", "nprobe": "nprobe"}  # IndexConf name -> Milvus search param

# name -> (build parameter -> (default, least, most)); the search knob each one takes
STRUCTURES: dict[str, dict[str, tuple[int, int, int]]] = {
    "FLAT": {},
    "HNSW": {"M": (32, 2, 2048), "efConstruction": (200, 1, 1 << 20)},
    "IVF_FLAT": {"nlist": (1024, 1, 65536)},
    "IVF_SQ8": {"nlist": (1024, 1, 65536)},
}
_FAISS_SPELLINGS = (  # faiss factory strings the presets use -> the Milvus structure
    (re.compile(r"flat", re.I), lambda m: ("FLAT", {})),
    (re.compile(r"hnsw(\d+)", re.I), lambda m: ("HNSW", {"M": int(m[1])})),
    (re.compile(r"ivf(\d+),flat", re.I), lambda m: ("IVF_FLAT", {"nlist": int(m[1])})),
    (re.compile(r"ivf(\d+),sq8", re.I), lambda m: ("IVF_SQ8", {"nlist": int(m[1])})),
)


@dataclass(frozen=True)
class Structure:
    """A Milvus vector index: ``index_type`` and its build parameters, defaults filled."""

    index_type: str
    build_params: dict[str, int] = field(default_factory=dict)

    def knobs(self, conf: IndexConf) -> dict[str, int]:
        """The search-time settings of ``conf`` this structure uses, by their IndexConf names."""
        if self.index_type == "HNSW":
            return {"ef_search": int(conf.ef_search)}
        if self.index_type.startswith("IVF"):
            return {"nprobe": int(conf.nprobe)}
        return {}

    def search_params(self, conf: IndexConf) -> dict[str, int]:
        """The same as Milvus names them (``ef``, ``nprobe``)."""
        return {MILVUS_KNOBS[k]: v for k, v in self.knobs(conf).items()}

    def described(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.build_params.items())
        return f"{self.index_type}:{params}" if params else self.index_type


def parse_factory(factory: str) -> Structure:
    """``"HNSW:M=32,efConstruction=200"`` (or a faiss spelling, ``"HNSW32"``) -> Structure.

    Raises:
        ConfigError: an unknown structure or parameter, or a value out of range.
    """
    text = factory.replace(" ", "")
    for pattern, make in _FAISS_SPELLINGS:
        match = pattern.fullmatch(text)
        if match:
            name, given = make(match)
            break
    else:
        name, _, rest = text.partition(":")
        name, given = name.upper(), {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not re.fullmatch(r"\d+", value):
                raise ConfigError(
                    f"milvus structure {factory!r}: write parameters as key=integer, e.g. "
                    "HNSW:M=32,efConstruction=200"
                )
            given[key] = int(value)
    if name not in STRUCTURES:
        raise ConfigError(
            f"the milvus backend builds {', '.join(STRUCTURES)} (e.g. 'HNSW:M=32', "
            f"'IVF_FLAT:nlist=1024'), not {factory!r}"
        )
    allowed = STRUCTURES[name]
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(
            f"milvus {name} takes {', '.join(allowed) or 'no parameters'}, not {unknown[0]!r}"
        )
    params = {}
    for key, (default, low, high) in allowed.items():
        value = given.get(key, default)
        if not low <= value <= high:
            raise ConfigError(f"milvus {name} {key} must be in [{low}, {high}], got {value}")
        params[key] = value
    return Structure(name, params)


def unavailable() -> str | None:
    """Why the backend cannot run here (pymilvus or milvus-lite missing), or None."""
    import importlib.util

    missing = [m for m in ("pymilvus", "milvus_lite") if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"the milvus backend needs {' and '.join(missing)}: "
            "pip install 'lookalike[milvus]' (pymilvus, milvus-lite)"
        )
    return None


def use_token_file(path: str | Path) -> None:
    """Read the Milvus access token from ``path`` for this process (and its children):
    it is read again at each connection and never written anywhere.

    Raises:
        ConfigError: the file is missing, unreadable or empty.
    """
    path = Path(path).expanduser()
    _read_token(path)
    os.environ[TOKEN_ENV] = str(path.resolve())


def _read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the Milvus token file {path}: {error}") from None
    if not token:
        raise ConfigError(f"the Milvus token file {path} is empty")
    return token


def check_uri(uri: str) -> None:
    """``ConfigError`` unless ``uri`` names a Milvus server without credentials in it."""
    parsed = urlparse(uri)
    if parsed.scheme.lower() not in SCHEMES:
        raise ConfigError(
            f"--milvus-uri {uri!r} must start with {', '.join(s + '://' for s in SCHEMES)}; "
            "leave it out for Milvus Lite inside the index directory"
        )
    if "@" in parsed.netloc or "token" in parsed.query.lower():
        raise ConfigError(
            f"--milvus-uri {parsed.scheme}://...@{parsed.hostname} carries credentials; put "
            "the token in a file and pass --milvus-token-file instead (it is never stored)"
        )


# -- connections --------------------------------------------------------------------------

_LITE_LOCK = threading.Lock()
_LITE_USERS: dict[str, int] = {}  # Lite data directory -> open clients in this process
_SCRATCH: set[str] = set()  # Lite data directories of scratch backends, removed when unused


@dataclass(frozen=True)
class Location:
    """Where a collection lives: Lite's data directory, or a server URI (never a secret)."""

    lite: Path | None  # Milvus Lite data directory (``.../milvus.db``)
    uri: str | None  # server URI
    collection: str

    def shown(self) -> str:
        return f"Milvus Lite {self.lite}" if self.lite is not None else f"Milvus {self.uri}"


def place(conf: IndexConf, site: BackendSite | None) -> Location:
    """Where a new collection of ``conf`` goes for an index at ``site``."""
    root = None if site is None else site.root
    if conf.uri is not None:
        tag = uuid.uuid4().hex if root is None else str(Path(root).resolve())
        digest = hashlib.blake2b(tag.encode(), digest_size=8).hexdigest()
        return Location(None, conf.uri, f"lookalike_{digest}")
    if root is None:
        scratch = Path(tempfile.mkdtemp(prefix="lookalike-milvus-")) / LITE_NAME
        _SCRATCH.add(str(scratch))
        return Location(scratch, None, "lookalike")
    return Location(lite_dir(root), None, "lookalike")


def is_scratch(lite: Path) -> bool:
    """Whether ``lite`` is the data directory of a scratch backend (no index directory)."""
    return str(lite) in _SCRATCH


def lite_dir(root: str | Path) -> Path:
    """``<root>/milvus.db`` as an absolute path (one key per directory in this process)."""
    return Path(os.path.abspath(Path(root) / LITE_NAME))


def keep_faiss_keywords() -> None:
    """Undo what ``faiss.contrib.torch_utils`` breaks for Milvus Lite, whose indexes are faiss
    ones run in this process and searched with ``search(x, k, params=...)``.

    pytorch-metric-learning imports ``torch_utils`` (so ``lookalike train`` does), which
    replaces the methods of every faiss index class, process-wide, with ones that take torch
    tensors but drop the keywords of a numpy call (``params``: TypeError). Each replaced
    method is wrapped again: numpy (or anything but a tensor) goes to faiss's own method
    with all its arguments, a tensor to the torch one. Idempotent; nothing happens while
    ``torch_utils`` is not imported. Written here because neither library offers a way back.
    """
    if "faiss.contrib.torch_utils" not in sys.modules:
        return
    import faiss

    for symbol in dir(faiss):
        cls = getattr(faiss, symbol)
        if not (isinstance(cls, type) and issubclass(cls, faiss.Index)):
            continue
        for name, method in list(vars(cls).items()):
            numpy_method = vars(cls).get(name + "_numpy")
            if numpy_method is None or getattr(method, "_keeps_keywords", False):
                continue
            setattr(cls, name, _dispatch(numpy_method, method))


def _dispatch(numpy_method: Callable, torch_method: Callable) -> Callable:
    def method(self, x, *args, **kwargs):
        if type(x).__module__.split(".")[0] == "torch":
            return torch_method(self, x, *args, **kwargs)
        return numpy_method(self, x, *args, **kwargs)

    method.__name__ = torch_method.__name__  # torch_utils' own "already replaced" check
    method._keeps_keywords = True  # type: ignore[attr-defined]
    return method


def connect(where: Location) -> Any:
    """A ``MilvusClient`` for ``where`` (a Lite server started in this process if needed)."""
    reason = unavailable()
    if reason is not None:
        raise ConfigError(reason)
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    if where.lite is None:
        token_file = os.environ.get(TOKEN_ENV)
        token = _read_token(Path(token_file)) if token_file else ""
        try:
            return MilvusClient(uri=where.uri, token=token)
        except MilvusException as error:
            raise IndexStateError(f"cannot reach Milvus at {where.uri}: {error.message}") from None
    key = str(where.lite)
    _quiet_lite_warnings()
    keep_faiss_keywords()
    with _LITE_LOCK:
        if _LITE_USERS.get(key, 0) == 0:
            check_dir(where.lite)  # a link or a file at milvus.db is refused, named
            from milvus_lite.server_manager import server_manager_instance

            if key not in getattr(server_manager_instance, "_servers", {}):  # not ours yet
                _refuse_if_locked(where.lite)
        try:
            client = MilvusClient(uri=key)
        except MilvusException as error:
            raise IndexStateError(f"cannot open Milvus Lite at {key}: {error.message}") from None
        _LITE_USERS[key] = _LITE_USERS.get(key, 0) + 1
    return client


class _NoSessionTimestamp(logging.Filter):
    """Drops pymilvus's warning that Lite gives query iterators no session timestamp (it
    falls back to the client's clock, which is right for an embedded engine)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to get mvccTs" not in record.getMessage()


def _quiet_lite_warnings() -> None:
    iterator_log = logging.getLogger("pymilvus.client.iterator.query_iterator")
    if not any(isinstance(f, _NoSessionTimestamp) for f in iterator_log.filters):
        iterator_log.addFilter(_NoSessionTimestamp())


def _refuse_if_locked(data_dir: Path) -> None:
    """``IndexStateError`` when another process has Milvus Lite open on ``data_dir``."""
    lock = data_dir / "LOCK"
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # no lock file yet: nobody has it open
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise IndexStateError(
            f"{data_dir} is open in another process, and Milvus Lite admits one at a time: "
            "close it (a running `lookalike index`, `serve` or search) or keep the index on "
            "a Milvus server (--milvus-uri)"
        ) from None
    finally:
        os.close(fd)


def disconnect(client: Any, lite: Path | None) -> None:
    """Close ``client``; the last one of a Lite directory stops its server (and lock)."""
    try:
        client.close()
    except Exception as error:  # a server gone meanwhile: nothing left to close
        logger.debug("closing a Milvus client: %s", error)
    if lite is None:
        return
    key = str(lite)
    with _LITE_LOCK:
        _LITE_USERS[key] = _LITE_USERS.get(key, 1) - 1
        if _LITE_USERS[key] > 0:
            return
        del _LITE_USERS[key]
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(key)
        if key in _SCRATCH:
            _SCRATCH.discard(key)
            shutil.rmtree(lite.parent, ignore_errors=True)
