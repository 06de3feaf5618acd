"""The ``index`` stage and what changes an index: build or sync it from a folder, remove,
relabel, describe, and resolve the settings a run uses.

===========================  ================================================================
:func:`index_folder`         ``lookalike index DIR``: new and changed files, labels, local
                             features, the stored DBA (:mod:`lookalike.indexing.folder`);
                             ``engine="ray"``: described by Ray Data actors
                             (:class:`RayConf`, :mod:`lookalike.indexing.ray_engine`)
:func:`index_files`          the same for an explicit list of files
:func:`index_into`           the same into an index already open for writing (the service)
:func:`remove_images`        ``lookalike remove``: by id or path, DBA and local features follow
                             (:mod:`lookalike.indexing.edit`)
:func:`index_info`           ``lookalike info`` (:mod:`lookalike.indexing.info`)
:func:`resolve_settings`     the index's own settings unless others are asked for
                             (:mod:`lookalike.indexing.settings`)
===========================  ================================================================
"""

from __future__ import annotations

from lookalike.indexing.edit import RemoveReport, relabel_store, remove_images
from lookalike.indexing.folder import (
    IndexReport,
    index_files,
    index_folder,
    index_into,
    open_for_writing,
)
from lookalike.indexing.info import index_info
from lookalike.indexing.ray_engine import RayConf
from lookalike.indexing.settings import FROM_INDEX, Settings, resolve_settings

__all__ = [
    "FROM_INDEX",
    "IndexReport",
    "RayConf",
    "RemoveReport",
    "Settings",
    "index_files",
    "index_folder",
    "index_info",
    "index_into",
    "open_for_writing",
    "relabel_store",
    "remove_images",
    "resolve_settings",
]
