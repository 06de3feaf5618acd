"""Index settings, named presets and the records exchanged with the indexing pipeline.

An index is configured by a faiss ``index_factory`` string over inner-product similarity
(descriptors are L2-normalised, so inner product is cosine similarity) plus the search-time
knobs of the structures that have them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lookalike.errors import ConfigError


@dataclass(frozen=True)
class IndexConf:
    """How the searchable faiss structure is built and searched."""

    factory: str = "Flat"  # faiss index_factory string (inner product); "Flat" = exact brute force
    nprobe: int = 16  # IVF: inverted lists visited per query, more = slower, better; else ignored
    ef_search: int = 128  # HNSW: candidate list size per query, more = slower, better; else ignored

    def __post_init__(self) -> None:
        if not isinstance(self.factory, str) or not self.factory.strip():
            raise ConfigError("index factory must be a non-empty faiss index_factory string")
        for name in ("nprobe", "ef_search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")

    def to_dict(self) -> dict:
        """The ``index`` section of the manifest."""
        return {
            "factory": self.factory,
            "nprobe": int(self.nprobe),
            "ef_search": int(self.ef_search),
        }

    @classmethod
    def from_dict(cls, data: dict) -> IndexConf:
        """Inverse of :meth:`to_dict`; missing search knobs take their defaults."""
        defaults = cls()
        return cls(
            factory=str(data.get("factory", defaults.factory)),
            nprobe=int(data.get("nprobe", defaults.nprobe)),
            ef_search=int(data.get("ef_search", defaults.ef_search)),
        )


# Trained structures (IVF, PQ, SQ) answer with an exact flat index until the collection is
# large enough to train them; see :func:`lookalike.index.backend.min_train_size`.
INDEX_PRESETS: dict[str, IndexConf] = {
    "exact": IndexConf(),  # brute force, exact; fine up to ~1M x 1280-d on one machine
    "hnsw": IndexConf(factory="HNSW32"),  # graph, no training, fast; removals are tombstoned
    "hnsw-sq8": IndexConf(factory="HNSW32,SQ8"),  # graph over 8-bit scalar codes: 4x less memory
    "ivf": IndexConf(factory="IVF1024,Flat"),  # inverted lists of full vectors, trained at 41k
    "ivfsq8": IndexConf(factory="IVF1024,SQ8"),  # inverted lists of 8-bit codes, trained at 41k
    "ivfpq": IndexConf(factory="IVF1024,PQ32"),  # 32-byte product codes: large collections
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


def validate_factory(factory: str, dim: int) -> None:
    """Build ``factory`` once at ``dim`` to check it; ``ConfigError`` with faiss's reason if not.

    Args:
        factory: faiss ``index_factory`` string, e.g. ``"IVF1024,PQ32"``.
        dim: descriptor dimension the structure will hold (after whitening).
    """
    import faiss

    if dim < 1:
        raise ConfigError(f"index dimension must be >= 1, got {dim}")
    if factory.replace(" ", "").upper().startswith("IDMAP"):
        raise ConfigError(
            f"index factory {factory!r} starts with IDMap; the index maps image ids itself, "
            "drop the 'IDMap,' prefix"
        )
    try:
        faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ConfigError(
            f"invalid index factory {factory!r} for {dim}-d inner-product descriptors: "
            f"{faiss_message(error)}; see the faiss wiki 'The index factory' or use a preset "
            f"({', '.join(sorted(INDEX_PRESETS))})"
        ) from None


@dataclass
class NewImage:
    """One file handed over by the indexing pipeline.

    ``path`` is stored as given (the pipeline passes absolute resolved paths). ``error`` set
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
    """One row of ``meta.sqlite``: ``status`` is ``'ok'`` (searchable) or ``'error'``."""

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
