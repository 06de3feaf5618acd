"""``lookalike check``: every file of an index against what the index recorded about it.

:func:`check_index` reads, and writes nothing: the directory entries (every fixed name a
plain file, never a link), the manifest, ``PRAGMA integrity_check`` of ``meta.sqlite`` (and
of the other SQLite files), every block digest of the vector file and the finiteness of its
rows, the digests of the whitening, the checkpoint and the DBA, and the record bounds of the
local features. Each problem is one line, with what :func:`~lookalike.index.repair.
repair_index` does about it (:data:`ACTIONS`).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.confined import check_entry, file_digest
from lookalike.errors import IndexStateError
from lookalike.index.backends import DigestMismatch, is_checkpoint_name, load_backend
from lookalike.index.loader import WHITENING_NAME, WhiteningDamaged, load_whitening
from lookalike.index.manifest import MANIFEST_NAME, Manifest, read_manifest
from lookalike.index.metadata import DB_NAME, MetaDB
from lookalike.index.vectors import VectorFile, checked_name, hash_block
from lookalike.storage import SIDE_FILES, Database

logger = logging.getLogger(__name__)

DBA_NAME = "dba.npz"  # lookalike.rerank.dba.DBA_NAME, spelled out: no re-ranking import here
# What repair does about a problem.
ACTIONS = {
    "redescribe": "its images are taken out of the search and described again by the next "
    "`lookalike index`",
    "rebuild": "the checkpoint is rebuilt from the vectors",
    "relearn": "the whitening is learned again from the stored vectors",
    "recompute": "the DBA is deleted and computed again on first use",
    "drop-local": "the local features are deleted and computed again by the next `lookalike index`",
    "none": "repair cannot mend it",
}
_OTHER_FIXED = re.compile(r"lock|regions\.sqlite(-wal|-shm|-journal)?|vectors(\.[0-9]+)?\.f32")


@dataclass(frozen=True)
class Problem:
    """One thing wrong, in one line."""

    file: str  # the file, relative to the index directory
    message: str
    action: str  # an ACTIONS key: what repair does

    def line(self) -> str:
        return f"{self.file}: {self.message} (repair: {ACTIONS[self.action]})"


@dataclass
class CheckReport:
    """What :func:`check_index` found."""

    path: str
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be checked, and why
    images: int = 0  # searchable images
    blocks: int = 0  # vector blocks whose digest was checked
    bad_slots: list[int] = field(default_factory=list)  # vector rows found damaged
    seconds: float = 0.0

    @property
    def sound(self) -> bool:
        return not self.problems

    def add(self, file: str, message: str, action: str) -> None:
        self.problems.append(Problem(file, message, action))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``lookalike check --json`` prints."""
        return {
            "path": self.path,
            "sound": self.sound,
            "problems": [
                {"file": p.file, "message": p.message, "repair": p.action} for p in self.problems
            ],
            "notes": list(self.notes),
            "images": self.images,
            "blocks_checked": self.blocks,
            "seconds": round(self.seconds, 3),
        }


def check_index(path: str | Path) -> CheckReport:
    """Check every file of the index at ``path`` (see the module docstring); writes nothing.

    Raises:
        IndexStateError: ``path`` is not an index directory (no manifest).
    """
    start = time.perf_counter()
    root = Path(path).expanduser()
    report = CheckReport(str(root))
    if not root.is_dir() or check_entry(root / MANIFEST_NAME) is None:
        read_manifest(root)  # raises the error saying what the path is
    _check_entries(root, report)
    try:
        manifest = read_manifest(root)
    except IndexStateError as error:
        report.add(MANIFEST_NAME, str(error), "none")
        manifest = None
    db = _open_meta(root, report)
    if db is not None:
        try:
            if manifest is not None:
                _check_vectors(root, db, manifest.dim, report)
        finally:
            db.close()
    if manifest is not None:
        _check_whitening(root, manifest, report)
        _check_checkpoint(root, manifest, report)
        _check_dba(root, manifest, report)
    _check_other_databases(root, report)
    from lookalike.index.check_local import check_local

    check_local(root, report)
    report.seconds = time.perf_counter() - start
    return report


def _check_entries(root: Path, report: CheckReport) -> None:
    """Every fixed name present is a plain file (``local`` a real directory)."""
    names = {MANIFEST_NAME, DB_NAME, WHITENING_NAME, DBA_NAME}
    names |= {DB_NAME + s for s in SIDE_FILES}
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name in names or is_checkpoint_name(name) or _OTHER_FIXED.fullmatch(name):
            try:
                check_entry(entry)
            except IndexStateError as error:
                report.add(name, str(error), "none")


def _open_meta(root: Path, report: CheckReport) -> MetaDB | None:
    try:
        db = MetaDB(root / DB_NAME)
    except IndexStateError as error:
        report.add(DB_NAME, str(error), "none")
        return None
    problems = db.integrity_problems()
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        report.add(DB_NAME, f"SQLite integrity check: {problems[0]}{more}", "none")
    return db


def _check_vectors(root: Path, db: MetaDB, dim: int, report: CheckReport) -> None:
    """Block digests, finiteness and sizes of the committed vector rows."""
    try:
        with db.snapshot():
            name = checked_name(db.kv_get("vectors_file"), root)
            n_rows = db.kv_int("n_rows")
            blocks = db.blocks()
            block_rows = db.block_rows()
            ids, slots = db.live()
            report.images = len(ids)
            vectors = VectorFile(root / name, dim)
            held = vectors.size_rows()
            if held is None and n_rows:
                report.add(name, f"missing; meta.sqlite references {n_rows} rows", "redescribe")
                report.bad_slots = sorted(set(slots.tolist()))
                return
            bad: set[int] = set()
            readable = min(n_rows, held or 0)
            if readable < n_rows:
                report.add(
                    name, f"holds {held} rows, meta.sqlite references {n_rows}", "redescribe"
                )
                bad |= set(range(readable, n_rows))
            outside = slots[(slots < 0) | (slots >= n_rows)]
            if len(outside):
                report.add(DB_NAME, f"{len(outside)} images point past the vector rows", "none")
            mapped = vectors.map(readable) if readable else np.empty((0, dim), np.float32)
            bad |= _check_blocks(name, mapped, readable, blocks, block_rows, report)
            live = set(slots.tolist())
            damaged = sorted(bad & live)
            if damaged:
                who = db.images_at_slots(damaged[:5])
                named = ", ".join(f"{p} (id {i})" for i, p in who)
                more = f" and {len(damaged) - len(who)} more" if len(damaged) > len(who) else ""
                report.add(name, f"damaged vectors of {named}{more}", "redescribe")
            report.bad_slots = sorted(bad)
    except IndexStateError as error:
        report.add(DB_NAME, str(error), "none")


def _check_blocks(
    name: str, mapped: np.ndarray, rows: int, blocks: dict, block_rows: int, report: CheckReport
) -> set[int]:
    """The rows of blocks whose digest differs or that hold NaN/inf values."""
    bad: set[int] = set()
    unchecked = 0
    for index in range((rows + block_rows - 1) // block_rows):
        begin = index * block_rows
        end = min(rows, begin + block_rows)
        chunk = mapped[begin:end]
        if not np.isfinite(chunk).all():
            rows_bad = np.flatnonzero(~np.isfinite(chunk).all(axis=1)) + begin
            bad |= set(rows_bad.tolist())
            report.add(
                name, f"rows {rows_bad[:5].tolist()} hold NaN or infinite values", "redescribe"
            )
        block = blocks.get(index)
        if block is not None and block.rows > end - begin:  # the file ends inside it
            bad |= set(range(begin, end))
            what = f"rows {begin}-{end - 1} cannot be checked: the file ends inside their block"
            report.add(name, what, "redescribe")
            continue
        if block is None or block.rows != end - begin:
            unchecked += end - begin
            continue
        report.blocks += 1
        if hash_block(mapped, index, block.rows, block_rows).hexdigest() != block.digest:
            bad |= set(range(begin, end))
            report.add(name, f"rows {begin}-{end - 1} do not match their digest", "redescribe")
    if unchecked:
        report.notes.append(
            f"{name}: {unchecked} rows have no recorded digest (an index from before digests; "
            "the next `lookalike index` records them)"
        )
    return bad


def _check_whitening(root: Path, manifest: Manifest, report: CheckReport) -> None:
    state = manifest.whitening
    if state.changing:
        report.notes.append(
            "a whitening change was interrupted: the next `lookalike index` settles it"
        )
        return
    if not state.learned:
        if check_entry(root / WHITENING_NAME) is not None:
            report.notes.append(f"{WHITENING_NAME} is not recorded by the manifest (not applied)")
        return
    try:
        load_whitening(root, state)
    except WhiteningDamaged as error:
        report.add(WHITENING_NAME, str(error), "relearn")
    except IndexStateError as error:
        report.add(WHITENING_NAME, str(error), "none")
    if state.sha is None:
        report.notes.append(f"{WHITENING_NAME} has no recorded digest (read, not checked)")


def _check_checkpoint(root: Path, manifest: Manifest, report: CheckReport) -> None:
    ref = manifest.checkpoint
    if ref.file is None:
        return
    path = root / ref.file
    try:
        if check_entry(path) is None:
            report.add(ref.file, "the checkpoint the manifest names is missing", "rebuild")
        elif ref.sha is not None:
            if file_digest(path) != ref.sha:
                report.add(ref.file, "does not match its recorded digest", "rebuild")
        else:  # no digest recorded: at least read it
            load_backend(path, manifest.index)
            report.notes.append(f"{ref.file} has no recorded digest (it reads as a checkpoint)")
    except DigestMismatch:  # pragma: no cover - sha None above
        report.add(ref.file, "does not match its recorded digest", "rebuild")
    except IndexStateError as error:
        report.add(ref.file, str(error), "none")
    except Exception as error:  # CheckpointError and whatever a damaged file makes faiss say
        report.add(ref.file, f"unreadable ({error})", "rebuild")


def _check_dba(root: Path, manifest: Manifest, report: CheckReport) -> None:
    path = root / DBA_NAME
    try:
        if check_entry(path) is None:
            return
        recorded = manifest.dba
        if recorded is not None and recorded.sha is not None:
            if file_digest(path) != recorded.sha:
                report.add(DBA_NAME, "does not match its recorded digest", "recompute")
            return
        import zipfile

        with zipfile.ZipFile(path) as archive:  # no digest recorded: its members' CRCs
            broken = archive.testzip()
        if broken is not None:
            report.add(DBA_NAME, f"member {broken} is damaged", "recompute")
    except IndexStateError as error:
        report.add(DBA_NAME, str(error), "none")
    except Exception as error:  # not a zip, truncated, ...
        report.add(DBA_NAME, f"unreadable ({error})", "recompute")


def _check_other_databases(root: Path, report: CheckReport) -> None:
    """The integrity of the index's other SQLite files (the regional descriptors)."""
    for name in ("regions.sqlite",):
        path = root / name
        try:
            if check_entry(path) is None:
                continue
            db = Database(path, damaged="delete it: the next `lookalike index` makes it again")
        except IndexStateError as error:
            report.add(name, str(error), "none")
            continue
        try:
            problems = db.integrity_problems()
        finally:
            db.close()
        if problems:
            report.add(name, f"SQLite integrity check: {problems[0]}", "none")
