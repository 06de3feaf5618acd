"""Older indexes: format 1 manifests read as format 2 and upgraded in place, and schema 1
``meta.sqlite`` files migrated to schema 2 (:func:`migrate_schema`).

Format 1 (lookalike before the typed manifest) kept the query defaults and the local-feature
settings in ``meta.sqlite``'s ``kv`` table, under :data:`V1_SETTINGS_KEY`, as the JSON
``{"query_rotations": [...], "rotation_penalty": x, "local": {VerifyConf fields}}``, and
recorded no weights hash. :func:`read_complete` reads any index as a format 2
:class:`~lookalike.index.manifest.Manifest` (``format_version`` still 1 for a format 1 one)
and writes nothing; a writer upgrades on disk with :func:`finish_upgrade`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from lookalike.errors import IndexStateError
from lookalike.index.manifest import (
    REBUILD,
    Manifest,
    parse_local,
    parse_query,
    read_manifest,
    write_manifest,
)
from lookalike.index.metadata import (
    BLOCKS_TABLE,
    COLUMNS,
    IMAGES_INDEXES,
    IMAGES_TABLE,
    SCHEMA_VERSION,
    MetaDB,
)
from lookalike.index.vectors import BLOCK_ROWS, CHUNK_ROWS, BlockHasher, VectorFile
from lookalike.storage import Database

logger = logging.getLogger(__name__)

V1_SETTINGS_KEY = "settings"  # the kv entry of format 1 (ignored, then deleted, by format 2)


def upgrade_v1(manifest: Manifest, settings: dict) -> Manifest:
    """A format 1 manifest completed from where format 1 kept the rest.

    The weights hash stays unknown (recorded by the next writer that loads the model) and
    so does a stored DBA's entry (recorded by the next writer that brings ``dba.npz`` up to
    date).

    Args:
        manifest: as :func:`~lookalike.index.manifest.read_manifest` read it
            (``format_version == 1``; others are returned unchanged).
        settings: the JSON of ``meta.sqlite``'s ``kv.settings`` (query defaults,
            ``local``), ``{}`` when absent.

    Raises:
        IndexStateError: the settings cannot be understood (with how to rebuild).
    """
    if manifest.format_version != 1:
        return manifest
    try:
        query = parse_query(
            {
                "rotations": list(settings.get("query_rotations", [0])),
                "rotation_penalty": settings.get("rotation_penalty", 0.0),
            }
        )
        local = parse_local(settings.get("local"))
    except (TypeError, ValueError) as error:  # ConfigError is a ValueError
        raise IndexStateError(
            f"the settings of this format 1 index cannot be upgraded ({error}); {REBUILD}"
        ) from None
    return manifest.replace(query=query, local=local)


def read_complete(root: Path, db: Database) -> Manifest:
    """The manifest of ``root``, a format 1 one completed from ``db`` (nothing is written).

    Raises:
        IndexStateError: the manifest is damaged, or the format 1 settings are unreadable.
    """
    manifest = read_manifest(root)
    if manifest.format_version >= 2:
        return manifest
    text = db.kv_get(V1_SETTINGS_KEY) or "{}"
    try:
        settings = json.loads(text)
    except ValueError:
        settings = None
    if not isinstance(settings, dict):
        raise IndexStateError(
            f"{db.path} holds unreadable settings ({V1_SETTINGS_KEY!r} is not a JSON object); "
            f"the index is damaged, {REBUILD}"
        )
    return upgrade_v1(manifest, settings)


def finish_upgrade(root: Path, db: Database, manifest: Manifest) -> Manifest:
    """Write ``manifest`` (as format 2, atomically) if it was read as format 1, then delete
    the format 1 settings entry; returns the manifest as it now is on disk.

    Needs the writer lock. A crash in between leaves a format 2 manifest beside an entry
    format 2 ignores; the next call deletes it.
    """
    if manifest.format_version < 2:
        manifest = write_manifest(root, manifest)
        logger.info("upgraded index %s to format %d", root, manifest.format_version)
    if db.kv_get(V1_SETTINGS_KEY) is not None:
        with db.write():
            db.kv_delete(V1_SETTINGS_KEY)
    return manifest


def migrate_schema(db: MetaDB, vectors: VectorFile, n_rows: int) -> bool:
    """Bring a schema 1 ``meta.sqlite`` to schema 2 in place, in one transaction (a writer
    only; readers read schema 1 as it is); returns whether anything changed.

    The ``images`` table is rebuilt with ``raw_path`` and the unique index on the file
    system bytes (the ids and the AUTOINCREMENT counter are kept), and ``vector_blocks``
    is created and filled with the digests of the rows the vector file holds now.
    """
    if db.schema_version() >= SCHEMA_VERSION and db.has_raw and db.has_blocks:
        return False
    block_rows = BLOCK_ROWS
    held = min(n_rows, vectors.size_rows() or 0)
    blocks = []
    if held:
        hasher = BlockHasher(block_rows, vectors.row_bytes)
        mapped = vectors.map(held)
        for begin in range(0, held, CHUNK_ROWS):
            chunk = np.ascontiguousarray(mapped[begin : begin + CHUNK_ROWS])
            hasher.update(memoryview(chunk.reshape(-1).view(np.uint8)))
        del mapped
        blocks = hasher.blocks()
    with db.write() as conn:
        if not db.has_raw:
            counter = conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'images'"
            ).fetchone()
            conn.execute(IMAGES_TABLE.format(name="images_v2"))
            conn.execute(
                f"INSERT INTO images_v2({COLUMNS}, slot, seq, added, updated) "
                f"SELECT {COLUMNS}, slot, seq, added, updated FROM images"
            )
            conn.execute("DROP TABLE images")
            conn.execute("ALTER TABLE images_v2 RENAME TO images")
            for statement in IMAGES_INDEXES:
                conn.execute(statement)
            if counter is not None:
                conn.execute(
                    "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'images'",
                    (int(counter[0]),),
                )
                if conn.execute("SELECT changes()").fetchone()[0] == 0:
                    conn.execute(
                        "INSERT INTO sqlite_sequence(name, seq) VALUES ('images', ?)",
                        (int(counter[0]),),
                    )
        conn.execute(BLOCKS_TABLE)
        db.has_blocks = True
        db.set_blocks(blocks, replace_all=True)
        db.kv_set("block_rows", block_rows)
        db.kv_set("schema_version", SCHEMA_VERSION)
    db.detect()
    logger.info(
        "migrated %s to schema %d (%d blocks digested)", db.path, SCHEMA_VERSION, len(blocks)
    )
    return True
