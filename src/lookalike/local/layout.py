"""The layout of ``<index>/local``: its file names, the description it keeps of itself, and
how a store is created, upgraded from format 1 and checked against what a caller asks for.

``local.sqlite``'s ``kv.meta`` entry (JSON) describes what the records are::

    {"format": "lookalike-local-features", "format_version": 2,
     "extractor": {name, max_keypoints, max_side, dim, binary, ...},   # LocalExtractor.settings
     "storage": {descriptors, scale, keypoints, scores}, "quantize": bool, "versions": {...}}

Stores of format 1 kept it in ``local/manifest.json`` beside a ``local.sqlite`` without that
entry; :func:`upgrade_description` moves it in the first time the store is opened from a
writable directory, and until then it is read from the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import uuid
from pathlib import Path

from lookalike.confined import check_dir, check_entry, plain_name, read_bytes, unlink_entry
from lookalike.errors import IndexStateError, StorageError
from lookalike.local.encoding import library_versions, storage_encoding
from lookalike.storage import Database, fsync_dir

logger = logging.getLogger(__name__)

LOCAL_DIR = "local"
OLD_MANIFEST_NAME = "manifest.json"  # format 1 kept the description here
DB_NAME = "local.sqlite"
DATA_NAME = "features.bin"
DATA_PATTERN = re.compile(r"features(\.[0-9]+)?\.bin")  # what the store itself writes
FORMAT = "lookalike-local-features"
FORMAT_VERSION = 2
META_KEY = "meta"  # kv entry: JSON {format, format_version, extractor, storage, quantize, versions}

SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    id INTEGER PRIMARY KEY,
    offset INTEGER NOT NULL,
    n INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    tag TEXT
);
"""


def has_local_store(index_dir: str | Path) -> bool:
    """Whether the index has a local feature store (of any format).

    Raises:
        IndexStateError: ``local`` (or a file of it) is a link or not what the store makes.
    """
    root = Path(index_dir).expanduser() / LOCAL_DIR
    if not check_dir(root):
        return False
    return (
        check_entry(root / DB_NAME) is not None or check_entry(root / OLD_MANIFEST_NAME) is not None
    )


def data_name(name: str | None, root: Path) -> str:
    """``local.sqlite``'s ``data_file`` entry, refused unless it is a data file name."""
    return plain_name(name, DATA_PATTERN, f"{root / DB_NAME}'s data_file", damaged(root))


def damaged(root: Path) -> str:
    """What to tell the user about a store that cannot be read."""
    return f"the local features are damaged, delete {root} and compute them again"


def connect(root: Path, create: bool, meta: dict | None = None) -> Database:
    """The store's database in ``root``; ``meta`` is its description when creating.

    Raises:
        IndexStateError: missing (without ``create``) or not a readable database.
    """
    if not create and not (root / DB_NAME).exists() and (root / OLD_MANIFEST_NAME).exists():
        raise IndexStateError(f"{root / DB_NAME} is missing; {damaged(root)}")
    initial: dict[str, object] = {"data_file": DATA_NAME, "data_end": 0, "gen": 0}
    if meta is not None:
        initial[META_KEY] = json.dumps(meta, sort_keys=True)
    return Database(root / DB_NAME, SCHEMA, create=create, initial=initial, damaged=damaged(root))


def read_description(root: Path, conn: sqlite3.Connection | None = None) -> dict:
    """What the store at ``root`` holds (its ``kv.meta``, or a format 1 ``manifest.json``).

    Raises:
        IndexStateError: unreadable, not a local feature store, or of a newer format.
    """
    try:
        row = None
        if conn is not None:
            row = conn.execute("SELECT value FROM kv WHERE key = ?", (META_KEY,)).fetchone()
        if row is not None:
            meta = json.loads(row[0])
        elif check_entry(root / OLD_MANIFEST_NAME) is not None:
            meta = json.loads(read_bytes(root / OLD_MANIFEST_NAME)[0].decode("utf-8"))
        else:
            raise ValueError("no description")
    except (OSError, ValueError, sqlite3.Error) as error:
        raise IndexStateError(f"cannot read what {root} holds ({error}); {damaged(root)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexStateError(f"{root} is not a lookalike local feature store")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise IndexStateError(
            f"{root} has local feature format {meta['format_version']}; this lookalike reads up "
            f"to {FORMAT_VERSION}: upgrade lookalike"
        )
    extractor = meta.get("extractor")
    if not isinstance(extractor, dict) or not isinstance(extractor.get("name"), str):
        raise IndexStateError(f"{root} names no local extractor; {damaged(root)}")
    return meta


def stored_extractor(index_dir: str | Path) -> dict | None:
    """The extractor settings of the local features of an index, None when it has none.
    Reads only (a format 1 store is not upgraded).

    Raises:
        IndexStateError: ``<index>/local`` exists but cannot be read.
    """
    if not has_local_store(index_dir):
        return None
    root = Path(index_dir).expanduser() / LOCAL_DIR
    has_db = check_entry(root / DB_NAME) is not None
    db = Database(root / DB_NAME, damaged=damaged(root)) if has_db else None
    try:
        return read_description(root, None if db is None else db.conn)["extractor"]
    finally:
        if db is not None:
            db.close()


def create_store(root: Path, settings: dict, quantize: bool) -> None:
    """Build a store for ``settings`` in a scratch folder, then rename it to ``root`` (atomic).

    Two processes creating it at once (e.g. searchers caching on first use) leave one
    complete store: the loser's rename fails and it opens the winner's.

    Raises:
        IndexStateError: ``root`` exists and is not a local feature store.
        ConfigError: ``quantize`` for descriptors other than RootSIFT.
    """
    settings = json.loads(json.dumps(settings))
    storage = storage_encoding(settings, quantize)
    scratch = root.parent / f".{root.name}-{uuid.uuid4().hex}.partial"
    scratch.mkdir()
    try:
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "extractor": settings,
            "storage": {**storage, "keypoints": "uint16", "scores": "float16"},
            "quantize": bool(quantize),
            "versions": library_versions(),
        }
        connect(scratch, create=True, meta=meta).close()
        try:
            os.rename(scratch, root)  # replaces only a missing or empty folder
        except OSError:
            if not has_local_store(root.parent):
                raise IndexStateError(
                    f"{root} exists but is not a local feature store; move it away"
                ) from None
            shutil.rmtree(scratch, ignore_errors=True)  # another process was first
            return
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    fsync_dir(root.parent)
    logger.info("created local feature store %s (%s)", root, settings["name"])


def upgrade_description(db: Database, root: Path, meta: dict) -> dict:
    """Move a format 1 ``manifest.json`` into ``kv.meta``; returns the description now in
    force. Where the directory or the database cannot be written (a read-only directory)
    nothing changes and the old file is read as before."""
    old = root / OLD_MANIFEST_NAME
    if check_entry(old) is None:
        return meta
    upgraded = {**meta, "format_version": FORMAT_VERSION}
    try:
        with db.write():
            if db.kv_get(META_KEY) is None:
                db.kv_set(META_KEY, json.dumps(upgraded, sort_keys=True))
        unlink_entry(old)
        fsync_dir(root)
    except (OSError, sqlite3.Error, StorageError) as error:
        logger.debug("local feature store %s not upgraded: %s", root, error)
        return meta
    logger.info("moved %s into %s", old, DB_NAME)
    return upgraded


def check_description(
    meta: dict, root: Path, name: str, settings: dict | None, quantize: bool | None
) -> None:
    """Refuse a store that holds other features than a caller asks for.

    Raises:
        IndexStateError: another extractor, other settings (each difference named) or
            another ``quantize``.
    """
    built = meta["extractor"]
    hint = f"delete {root} to compute them again with the new settings"
    if built.get("name") != name:
        raise IndexStateError(
            f"index {root.parent} holds {built.get('name')!r} local features, not "
            f"{name!r}; use --local {built.get('name')}, or {hint}"
        )
    if settings is not None:
        wanted = json.loads(json.dumps(settings))
        diff = sorted(k for k in built.keys() | wanted.keys() if built.get(k) != wanted.get(k))
        if diff:
            have = ", ".join(f"{k}={built.get(k)!r}" for k in diff)
            want = ", ".join(f"{k}={wanted.get(k)!r}" for k in diff)
            raise IndexStateError(
                f"the {name} local features of {root.parent} were computed with {have}; the "
                f"requested extractor has {want}. Use the same settings, or {hint}"
            )
    if quantize is not None and bool(meta.get("quantize")) != quantize:
        raise IndexStateError(
            f"the local features of {root.parent} were stored with quantize="
            f"{meta.get('quantize')}, requested quantize={quantize}; {hint}"
        )
