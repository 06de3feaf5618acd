"""The local-feature part of :func:`lookalike.index.check.check_index`: ``local/``'s
entries, ``PRAGMA integrity_check`` of ``local.sqlite`` and the bounds of every record."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lookalike.confined import check_dir, check_entry
from lookalike.errors import IndexStateError

if TYPE_CHECKING:
    from lookalike.index.check import CheckReport

LOCAL_DIR = "local"  # lookalike.local.layout.LOCAL_DIR (OpenCV is imported only when needed)


def check_local(root: Path, report: CheckReport) -> None:
    """Add the problems of ``root/local`` (if the index has local features) to ``report``."""
    where = root / LOCAL_DIR
    try:
        if not check_dir(where):
            return
        for entry in sorted(where.iterdir()):
            if (
                entry.name.startswith(("local.sqlite", "features."))
                or entry.name == "manifest.json"
            ):
                check_entry(entry)
    except IndexStateError as error:
        report.add(LOCAL_DIR, str(error), "none")
        return
    from lookalike.local.layout import DB_NAME, data_name, has_local_store, stored_extractor

    name = f"{LOCAL_DIR}/{DB_NAME}"
    try:
        if not has_local_store(root):
            return
        settings = stored_extractor(root)
    except IndexStateError as error:
        report.add(name, str(error), "drop-local")
        return
    from lookalike.local.store import LocalFeatureStore

    try:
        store = LocalFeatureStore(root, settings["name"], create=False)
    except (IndexStateError, ValueError, KeyError) as error:
        report.add(name, str(error), "drop-local")
        return
    try:
        problems = store._db.integrity_problems()
        if problems:
            report.add(name, f"SQLite integrity check: {problems[0]}", "drop-local")
            return
        with store._snapshot() as conn:
            data = data_name(store._kv("data_file"), store.root)
            end = int(store._kv("data_end"))
            rows = conn.execute("SELECT id, offset, n FROM features ORDER BY offset").fetchall()
        held = check_entry(store.root / data)
        size = 0 if held is None else held.st_size
        file = f"{LOCAL_DIR}/{data}"
        if size < end:
            report.add(file, f"holds {size} bytes, {DB_NAME} references {end}", "drop-local")
        last, wrong = 0, 0
        for _, offset, n in rows:
            length = store.record_bytes(int(n))
            if offset < last or n < 0 or n > store.max_keypoints or offset + length > end:
                wrong += 1
            last = max(last, offset + length)
        if wrong:
            report.add(name, f"{wrong} records lie outside the data or overlap", "drop-local")
    except IndexStateError as error:
        report.add(name, str(error), "drop-local")
    finally:
        store.close()
