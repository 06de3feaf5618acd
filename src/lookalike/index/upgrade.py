"""Format 1 indexes: reading them as format 2, and upgrading them in place.

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

from lookalike.errors import IndexStateError
from lookalike.index.manifest import (
    REBUILD,
    Manifest,
    parse_local,
    parse_query,
    read_manifest,
    write_manifest,
)
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
