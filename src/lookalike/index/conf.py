"""Index settings, named presets and the records exchanged with the indexing pipeline.

An index is configured by its vector backend (:data:`lookalike.index.backends.BACKENDS`:
faiss, or the plain numpy reference) and, for faiss, an ``index_factory`` string over
inner-product similarity (descriptors are L2-normalised, so inner product is cosine
similarity) plus the search-time knobs of the structures that have them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from lookalike.errors import ConfigError

# Spelled out so that reading a configuration imports no engine; a test checks them against
# lookalike.index.backends.BACKENDS.
BACKEND_NAMES = ("faiss", "numpy", "milvus")
AUTO_FACTORY = "auto"  # the faiss structure chosen from the collection's size and a budget
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes an "auto" structure may hold (vectors or codes, links)


@dataclass(frozen=True)
class IndexConf:
    """How the searchable faiss structure is built and searched."""

    factory: str = "Flat"  # faiss index_factory string (inner product); "Flat" = exact brute force
    nprobe: int = 16  # IVF: inverted lists visited per query, more = slower, better; else ignored
    ef_search: int = 128  # HNSW: candidate list size per query, more = slower, better; else ignored
    backend: str = "faiss"  # vector engine, a BACKEND_NAMES entry; "numpy" is the plain reference
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # factory "auto": bytes the structure may hold
    uri: str | None = None  # milvus: server URI (http://host:19530, no credentials); None =
    #   Milvus Lite inside the index directory; other backends: must be None

    def __post_init__(self) -> None:
        if not isinstance(self.factory, str) or not self.factory.strip():
            raise ConfigError("index factory must be a non-empty faiss index_factory string")
        if self.backend not in BACKEND_NAMES:
            raise ConfigError(
                f"unknown vector backend {self.backend!r}; choose one of {', '.join(BACKEND_NAMES)}"
            )
        for name in ("nprobe", "ef_search", "memory_budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.uri is not None and (not isinstance(self.uri, str) or not self.uri.strip()):
            raise ConfigError(f"index uri must be a non-empty string or None, got {self.uri!r}")

    def to_dict(self) -> dict:
        """The ``index`` section of the manifest (the memory budget only for ``auto``)."""
        out = {
            "backend": self.backend,
            "factory": self.factory,
            "nprobe": int(self.nprobe),
            "ef_search": int(self.ef_search),
        }
        if self.factory == AUTO_FACTORY:
            out["memory_budget"] = int(self.memory_budget)
        if self.uri is not None:
            out["uri"] = self.uri
        return out

    @classmethod
    def from_dict(cls, data: dict) -> IndexConf:
        """Inverse of :meth:`to_dict`; missing keys take their defaults (format 1 indexes
        have no ``backend``: faiss). ``ConfigError`` for values of the wrong type."""
        defaults = cls()
        return cls(
            factory=data.get("factory", defaults.factory),
            nprobe=data.get("nprobe", defaults.nprobe),
            ef_search=data.get("ef_search", defaults.ef_search),
            backend=data.get("backend", defaults.backend),
            memory_budget=data.get("memory_budget", defaults.memory_budget),
            uri=data.get("uri", defaults.uri),
        )


# Trained structures (IVF, PQ, SQ) answer with an exact flat index until the collection is
# large enough to train them; see :func:`lookalike.index.backends.faiss_backend.min_train_size`.
INDEX_PRESETS: dict[str, IndexConf] = {
    "exact": IndexConf(),  # brute force, exact; fine up to ~1M x 1280-d on one machine
    "hnsw": IndexConf(factory="HNSW32"),  # graph, no training, fast; removals are tombstoned
    "hnsw-sq8": IndexConf(factory="HNSW32,SQ8"),  # graph over 8-bit scalar codes: 4x less memory
    "ivf": IndexConf(factory="IVF1024,Flat"),  # inverted lists of full vectors, trained at 41k
    "ivfsq8": IndexConf(factory="IVF1024,SQ8"),  # inverted lists of 8-bit codes, trained at 41k
    "ivfpq": IndexConf(factory="IVF1024,PQ32"),  # 32-byte product codes: large collections
    "numpy": IndexConf(backend="numpy"),  # plain numpy brute force: the reference backend
    # exact while that is fast, then inverted lists of float vectors, 8-bit codes or product
    # codes as the memory budget allows; switches at a checkpoint as the collection grows
    # (lookalike.index.backends.faiss_backend.auto_structure)
    "auto": IndexConf(factory=AUTO_FACTORY),
}


def get_index_conf(name: str) -> IndexConf:
    """The preset called ``name``; ``ConfigError`` listing the valid names otherwise."""
    try:
        return INDEX_PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown index preset {name!r}; choose one of {', '.join(sorted(INDEX_PRESETS))}"
        ) from None


def faiss_message(error: BaseException) -> str:
    """The human part of a faiss ``RuntimeError`` (drops the C++ location prefix)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else repr(error)
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", text).removeprefix("Error: ")


def fs_bytes(path: str | bytes | os.PathLike) -> bytes:
    """The file system's bytes of a path (a ``str`` read from the file system carries the
    bytes that are not UTF-8 as surrogate escapes, as ``os.fsdecode`` makes them).

    Raises:
        ValueError: a ``str`` holding surrogates that no file name decodes to.
    """
    try:
        return os.fsencode(path)
    except UnicodeEncodeError:
        raise ValueError(
            f"path {os.fspath(path)!r} holds characters that are neither text nor file name bytes"
        ) from None


def display_path(path: str | bytes | os.PathLike) -> str:
    """How a path is shown and stored as text: itself when it is valid UTF-8, else with
    each byte that is not written as ``\\xNN`` (``caf\\xe9.jpg``); always encodable."""
    return fs_bytes(path).decode("utf-8", "backslashreplace")


def display_text(text: str) -> str:
    """``text`` (a message, say) with any surrogate escapes written as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_ESCAPE = re.compile(rb"\\x([0-9a-f]{2})")


def fs_path_from_display(text: str) -> str:
    """The file a display form (:func:`display_path`) names: ``text`` itself when a file of
    that name exists or it holds no escape, else its ``\\xNN`` escapes turned back into
    bytes (a file name that is not UTF-8, as ``open()`` takes it)."""
    if "\\x" not in text or os.path.lexists(text):
        return text
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8")))


@dataclass
class NewImage:
    """One file handed over by the indexing pipeline.

    ``path`` is the file's name as the file system gives it (the pipeline passes absolute
    resolved paths; bytes that are not UTF-8 as surrogate escapes): the index stores its
    display form (:func:`display_path`) and, when that differs, its bytes. ``error`` set
    means the file failed to decode: it is stored with status ``'error'`` and no vector.
    """

    path: str
    content_hash: str | None = None
    size: int | None = None  # bytes
    mtime: float | None = None  # seconds since the epoch
    width: int | None = None  # pixels
    height: int | None = None  # pixels
    metadata: dict = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class ImageRecord:
    """One row of ``meta.sqlite``: ``status`` is ``'ok'`` (searchable) or ``'error'``.

    ``path`` is the display form (valid UTF-8, what is shown and printed); :attr:`fs_path`
    is the name to open the file by.
    """

    id: int
    path: str
    content_hash: str | None
    size: int | None
    mtime: float | None
    width: int | None
    height: int | None
    metadata: dict
    status: str
    error: str | None
    raw_path: bytes | None = None  # the file name's bytes when they are not UTF-8, else None

    @property
    def fs_path(self) -> str:
        """The path as ``open()`` takes it (bytes that are not UTF-8 as surrogate escapes)."""
        return self.path if self.raw_path is None else os.fsdecode(self.raw_path)
