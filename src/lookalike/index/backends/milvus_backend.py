"""The Milvus vector backend: the index-space vectors in a Milvus collection.

Without a URI the collection lives in Milvus Lite, embedded in this process, with its data
in ``<index>/milvus.db`` (a directory Lite owns); with ``IndexConf.uri`` it lives on a
Milvus server or cluster, in a collection named after the index directory. A row is the
image id (int64 primary key), its vector and two scalar fields, ``label`` and
``content_hash`` (empty strings when absent), so that a filtered search (``label == ...``)
runs inside Milvus: :meth:`MilvusBackend.search` with ``label=`` or ``expr=``.

SQLite stays the source of truth. The "checkpoint" the loader writes (``milvus-<seq>.index``)
is a small JSON naming the collection and its structure, not a copy of the vectors: the
collection holds at least every op up to ``<seq>`` and maybe more, because adds (upserts)
and removals (deletes by id) reach Milvus after their SQLite commit. Replaying the ops after
the checkpoint is idempotent (an add is an upsert, a removal a delete), so a process killed
between the SQLite commit and the Milvus write leaves nothing to repair by hand: the next
open replays what Milvus may have missed, and :meth:`MilvusBackend.retain` drops rows
SQLite no longer lists. A rebuild (a missing or damaged checkpoint, a new whitening)
replaces the collection.

Structures, given by ``IndexConf.factory``: ``FLAT`` (exact), ``HNSW:M=32,efConstruction=200``
(``ef`` at search from ``ef_search``), ``IVF_FLAT:nlist=1024`` and ``IVF_SQ8:nlist=1024``
(``nprobe`` from ``nprobe``); the faiss spellings ``Flat``, ``HNSW32``, ``IVF1024,Flat`` and
``IVF1024,SQ8`` mean the same, so the index presets work with ``--backend milvus``. The
metric is inner product on the normalised vectors: scores as faiss gives them.

Milvus Lite admits one process at a time per data directory (it holds a lock on it while
open, :data:`LITE_NAME`): an index in Lite is searched by the process that has it open, a
server serves many. The access token of a server is read at run time from the file named by
``$LOOKALIKE_MILVUS_TOKEN_FILE`` (``--milvus-token-file``), never stored.
How lookalike connects (structures, URIs, tokens, Lite's servers) is
:mod:`lookalike.index.backends.milvus_client`.
"""

from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.confined import check_dir, read_bytes
from lookalike.errors import ConfigError, IndexStateError
from lookalike.index.backends.base import BackendSite, CheckpointError, DigestMismatch
from lookalike.index.backends.milvus_client import (
    LITE_NAME,
    Location,
    Structure,
    check_uri,
    connect,
    disconnect,
    is_scratch,
    lite_dir,
    parse_factory,
    place,
)
from lookalike.index.conf import IndexConf
from lookalike.storage import atomic_write_bytes

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "lookalike-milvus"
CHECKPOINT_VERSION = 1
FIELDS = ("label", "content_hash")  # scalar fields stored beside each vector
FIELD_MAX = {"label": 65535, "content_hash": 256}  # VARCHAR max_length (65535: Milvus's most)
MAX_TOPK = 16384  # Milvus's largest search limit; a larger k is answered exactly here
MAX_DIM = 32768  # Milvus's largest FLOAT_VECTOR dimension
UPSERT_BYTES = 16 << 20  # vector bytes per upsert call (gRPC messages stay below 64 MB)
ITERATOR_BATCH = 4096  # rows per query-iterator page


def _quote(text: str) -> str:
    """A Milvus string literal of ``text``."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- the backend --------------------------------------------------------------------------


class MilvusBackend:
    """A Milvus collection of ``(id, vector, label, content_hash)`` rows.

    Use :meth:`create` or :meth:`load`. The connection is closed with :meth:`close`, or when
    the backend is garbage-collected (an index store dropping its view).

    Args:
        conf: the index settings (``factory`` a Milvus structure, ``uri``).
        dim: vector dimension.
        where: the collection's location.
        client: a connected ``MilvusClient``.
        site: the index it serves (its scalar fields), or None.
    """

    name = "milvus"

    def __init__(
        self,
        conf: IndexConf,
        dim: int,
        where: Location,
        client: Any,
        site: BackendSite | None,
    ) -> None:
        self.conf = conf
        self.structure = parse_factory(conf.factory)
        self.where = where
        self._dim = int(dim)
        self._client = client
        self._fields = None if site is None else site.fields
        self._close = weakref.finalize(self, disconnect, client, where.lite)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def validate(cls, conf: IndexConf, dim: int) -> None:
        parse_factory(conf.factory)
        if not 1 <= dim <= MAX_DIM:
            raise ConfigError(f"milvus holds vectors of 1 to {MAX_DIM} dimensions, not {dim}")
        if conf.uri is not None:
            check_uri(conf.uri)

    @classmethod
    def create(cls, conf: IndexConf, dim: int, site: BackendSite | None = None) -> MilvusBackend:
        """A new, empty collection (one of the same name is dropped first: a rebuild)."""
        cls.validate(conf, dim)
        where = place(conf, site)
        client = connect(where)
        backend = cls(conf, dim, where, client, site)
        backend._call("create the collection", backend._create_collection)
        return backend

    @classmethod
    def load(
        cls, path: Path, conf: IndexConf, sha: str | None = None, site: BackendSite | None = None
    ) -> MilvusBackend:
        """Reconnect to the collection a checkpoint names (``CheckpointError`` when it is
        unreadable, of another structure or location, or the collection is gone)."""
        content, digest = read_bytes(path)  # FileNotFoundError: removed meanwhile
        if sha is not None and digest != sha:
            raise DigestMismatch(f"{path} is not the checkpoint the manifest records")
        try:
            data = json.loads(content.decode("utf-8"))
            if data.get("format") != CHECKPOINT_FORMAT:
                raise ValueError("not a milvus checkpoint")
            dim, collection = int(data["dim"]), str(data["collection"])
            lite, uri = data.get("lite"), data.get("uri")
            recorded = Structure(str(data["index_type"]), dict(data["build_params"]))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{path} is not a milvus checkpoint ({error})") from None
        if recorded != parse_factory(conf.factory) or uri != conf.uri:
            raise CheckpointError(f"{path} describes another structure or place than the index")
        if uri is not None:
            where = Location(None, uri, collection)
        elif lite == LITE_NAME and site is not None and site.root is not None:
            where = Location(lite_dir(site.root), None, collection)
        elif lite is not None and Path(lite).is_absolute():  # a scratch backend's
            if not Path(lite).is_dir():
                raise CheckpointError(f"{path} names {lite}, which is gone")
            where = Location(Path(lite), None, collection)
        else:
            raise CheckpointError(f"{path} names Milvus Lite data {lite!r} outside any index")
        if where.lite is not None and not check_dir(where.lite):
            raise CheckpointError(f"{path} names {where.lite}, which is gone")
        client = connect(where)
        backend = cls(conf, dim, where, client, site)
        if not backend._call("look up the collection", client.has_collection, collection):
            backend.close()
            raise CheckpointError(
                f"{path} names collection {collection}, gone from {where.shown()}"
            )
        backend._call("load the collection", client.load_collection, collection)
        return backend

    def _create_collection(self) -> None:
        from pymilvus import DataType

        client, name = self._client, self.where.collection
        if client.has_collection(name):
            client.drop_collection(name)
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self._dim)
        for key in FIELDS:
            schema.add_field(key, DataType.VARCHAR, max_length=FIELD_MAX[key])
        build = dict(self.structure.build_params)
        index = client.prepare_index_params()
        index.add_index(
            field_name="vector",
            index_type=self.structure.index_type,
            metric_type="IP",
            # pymilvus 3 sends build parameters as separate keys, which Milvus Lite 3.2
            # ignores (it reads one JSON "params" key: M, efConstruction, nlist would fall
            # back to its defaults); a server takes the separate keys
            params={"params": build} if self.where.lite is not None else build,
        )
        client.create_collection(name, schema=schema, consistency_level="Strong")
        # sync=False: waiting for an index of no rows asks for a timestamp Lite cannot give
        client.create_index(name, index, sync=False)
        client.load_collection(name)

    def close(self) -> None:
        """Close the connection (the last one of a Lite directory stops its server)."""
        self._close()

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, a Milvus error turned into one that names the place."""
        from pymilvus.exceptions import MilvusException

        try:
            return fn(*args, **kwargs)
        except MilvusException as error:
            raise IndexStateError(
                f"{self.where.shown()} could not {what} ({self.where.collection}): {error.message}"
            ) from None

    # -- state -----------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def trained(self) -> bool:
        return True  # Milvus trains an IVF itself when it builds a segment's index

    @property
    def train_size(self) -> int:
        return 0

    @property
    def train_sample(self) -> int:
        return 0

    def __len__(self) -> int:
        rows = self._call(
            "count its rows",
            self._client.query,
            self.where.collection,
            filter="",
            output_fields=["count(*)"],
            consistency_level="Strong",
        )
        return int(rows[0]["count(*)"]) if rows else 0

    def memory_bytes(self) -> int:
        """Vectors (or 8-bit codes), ids, graph links and centroids in Milvus: an estimate."""
        n, d, params = len(self), self._dim, self.structure.build_params
        kind = self.structure.index_type
        per_row = 8 + (d if kind == "IVF_SQ8" else 4 * d)
        total = n * per_row + 4 * d * params.get("nlist", 0)
        if kind == "HNSW":
            total += n * 2 * params["M"] * 4
        return int(total)

    def wants_rebuild(self) -> bool:
        return False  # Milvus compacts deleted rows itself

    def set_search_params(self, conf: IndexConf) -> None:
        self.conf = conf

    def stats(self) -> dict[str, Any]:
        client, name = self._client, self.where.collection
        live = len(self)
        state = self._call("read its load state", client.get_load_state, name)
        index = self._call("describe its index", client.describe_index, name, "vector") or {}
        return {
            "backend": self.name,
            "structure": self.structure.described(),
            "live": live,
            "dead": 0,
            "trained": True,
            "memory_bytes": self.memory_bytes(),
            "search_params": self.structure.knobs(self.conf),
            "engine": {
                "engine": "milvus-lite" if self.where.lite is not None else "milvus",
                "where": str(self.where.lite) if self.where.lite is not None else self.where.uri,
                "collection": name,
                "load_state": getattr(state.get("state"), "name", str(state.get("state"))),
                "indexed_rows": index.get("indexed_rows"),
                "pending_index_rows": index.get("pending_index_rows"),
                "index_state": index.get("state"),
                # the build parameters as Milvus reports them (Lite: its "params")
                "index_params": index.get("params")
                or {k: index[k] for k in self.structure.build_params if k in index},
            },
        }

    # -- mutation --------------------------------------------------------------------------

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Upsert ``(n, d)`` vectors under ``(n,)`` distinct ids, with their scalar fields:
        a present id is replaced (what makes replaying the op log idempotent)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self._dim)
        if len(ids) == 0:
            return
        if len(np.unique(ids)) != len(ids):
            raise ValueError("add() takes distinct ids")
        values = self._fields(ids) if self._fields is not None else {}
        columns = {k: values.get(k) or [""] * len(ids) for k in FIELDS}
        step = max(1, UPSERT_BYTES // (4 * self._dim))
        for begin in range(0, len(ids), step):
            rows = [
                {
                    "id": int(ids[i]),
                    "vector": vectors[i],
                    **{k: (columns[k][i] or "")[: FIELD_MAX[k]] for k in FIELDS},
                }
                for i in range(begin, min(len(ids), begin + step))
            ]
            self._call("upsert", self._client.upsert, self.where.collection, rows)

    def remove(self, ids: np.ndarray) -> None:
        """Delete the rows of ``ids``; unknown ids are ignored."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids):
            self._call(
                "delete", self._client.delete, self.where.collection, ids=[int(i) for i in ids]
            )

    def retain(self, ids: np.ndarray) -> None:
        """Delete every row whose id is not in ``ids`` (after loading: rows of images that
        SQLite no longer lists, left by a write that never committed there)."""
        stored = np.fromiter((row["id"] for row in self._rows(["id"])), dtype=np.int64)
        extra = np.setdiff1d(stored, np.asarray(ids, dtype=np.int64))
        if len(extra):
            logger.warning(
                "milvus held %d ids that meta.sqlite does not list; deleting them", len(extra)
            )
            self.remove(extra)

    def train(self, sample: np.ndarray) -> None:
        """Nothing to train: Milvus builds (and trains) each segment's index itself."""

    def save(self, path: Path) -> str:
        """Flush the collection (Lite then builds the index of the flushed rows, which it
        searched exactly until now) and write the JSON checkpoint naming it; its digest."""
        self._call("flush", self._client.flush, self.where.collection)
        lite = self.where.lite
        data = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "uri": self.where.uri,
            "lite": None if lite is None else str(lite) if is_scratch(lite) else LITE_NAME,
            "collection": self.where.collection,
            "index_type": self.structure.index_type,
            "build_params": self.structure.build_params,
            "metric": "IP",
            "dim": self._dim,
        }
        return atomic_write_bytes(path, json.dumps(data, indent=1).encode("utf-8"))

    def build_indexes(self) -> None:
        """Release and load the collection, so that Milvus Lite builds the index of every
        flushed segment now. Lite builds them in a background thread after a flush and
        compares every vector of a segment until its index is there (and of rows not yet
        flushed, always): exact, ``ef`` / ``nprobe`` without effect. For measurements: a
        search of the collection from elsewhere fails while it is released."""
        name = self.where.collection
        self._call("release the collection", self._client.release_collection, name)
        self._call("load the collection", self._client.load_collection, name)

    # -- search ----------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        label: str | None = None,
        expr: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by inner product of ``(n, d)`` queries, inside Milvus.

        Args:
            queries: ``(n, d)`` float32 index-space vectors.
            k: results per query.
            label: only images of this label (``label == ...`` in Milvus).
            expr: only rows matching this Milvus boolean expression over ``id``, ``label``
                and ``content_hash``, e.g. ``'label in ["a", "b"]'`` (with ``label``: both).

        Returns:
            ``(scores, ids)`` of shape ``(n, k)``, float32 / int64, best first; ``-1`` ids
            with ``-inf`` scores pad rows with fewer than ``k`` results.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self._dim)
        k = max(int(k), 0)
        n = len(queries)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        if n == 0 or k == 0:
            return scores, ids
        parts = [f"label == {_quote(label)}"] if label is not None else []
        parts += [f"({expr})"] if expr else []
        where = " and ".join(parts)
        if k > MAX_TOPK:
            return self._search_exact(queries, k, where)
        found = self._call(
            "search",
            self._client.search,
            self.where.collection,
            data=list(queries),
            limit=k,
            filter=where,
            output_fields=[],
            search_params={"metric_type": "IP", "params": self.structure.search_params(self.conf)},
            consistency_level="Strong",
        )
        for row, hits in enumerate(found):
            got = min(k, len(hits))
            ids[row, :got] = [hit["id"] for hit in hits[:got]]
            scores[row, :got] = [hit["distance"] for hit in hits[:got]]
        order = np.argsort(-scores, axis=1, kind="stable")  # Milvus merges segments: keep sorted
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def _search_exact(
        self, queries: np.ndarray, k: int, where: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Beyond Milvus's search limit: every (matching) vector fetched, ranked here."""
        rows = list(self._rows(["vector"], where))
        n = len(queries)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        if not rows:
            return scores, ids
        stored = np.array([r["id"] for r in rows], dtype=np.int64)
        sims = queries @ np.asarray([r["vector"] for r in rows], dtype=np.float32).T
        got = min(k, len(stored))
        order = np.argsort(-sims, axis=1, kind="stable")[:, :got]
        scores[:, :got] = np.take_along_axis(sims, order, axis=1)
        ids[:, :got] = stored[order]
        return scores, ids

    def _rows(self, fields: list[str], where: str = "") -> Any:
        """Every row (matching ``where``) with ``fields``, page by page."""
        iterator = self._call(
            "list its rows",
            self._client.query_iterator,
            self.where.collection,
            batch_size=ITERATOR_BATCH,
            filter=where,
            output_fields=fields,
        )
        try:
            while page := self._call("list its rows", iterator.next):
                yield from page
        finally:
            iterator.close()
