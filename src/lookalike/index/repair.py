"""``lookalike repair``: mend what :func:`~lookalike.index.check.check_index` finds, from what
is still sound.

* vector rows that are damaged (a block whose digest differs, NaN/inf, rows missing from a
  truncated file): their images leave the searchable set, kept as records that the next
  ``lookalike index`` describes again (size and mtime cleared, listed in the report); the
  vector file is then compacted, so its dead rows, damage included, go;
* a damaged or missing checkpoint: rebuilt from the vectors;
* a damaged or missing whitening (the manifest says one was learned): learned again from the
  stored global vectors, with a warning that it differs from the original one (learned from
  regional descriptors), or refused when too few images are left;
* a damaged DBA: deleted (computed again on first use, the manifest keeps its settings);
* damaged local features: the store is deleted (the manifest's ``local`` makes the next
  ``lookalike index`` compute them again).

A damaged manifest or ``meta.sqlite``, or a link at a fixed name, is not guessed at: repair
refuses, saying what to do.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lookalike.confined import check_dir
from lookalike.errors import IndexStateError
from lookalike.index.check import DBA_NAME, CheckReport, check_index
from lookalike.index.manifest import REBUILD
from lookalike.index.store import IndexStore
from lookalike.storage import remove_durably

logger = logging.getLogger(__name__)

REDESCRIBE_REASON = "its stored vector was damaged; the next `lookalike index` describes it again"


@dataclass
class RepairReport:
    """What :func:`repair_index` did, and what the check finds afterwards."""

    path: str
    found: list[str] = field(default_factory=list)  # the problems before, one line each
    redescribe: list[str] = field(default_factory=list)  # images to describe again (paths)
    checkpoint_rebuilt: bool = False
    whitening_relearned: bool = False
    dba_removed: bool = False
    local_removed: bool = False
    warnings: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # problems still there afterwards

    @property
    def sound(self) -> bool:
        return not self.left

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``lookalike repair --json`` prints."""
        return {**dataclasses.asdict(self), "sound": self.sound}


def repair_index(path: str | Path) -> RepairReport:
    """Repair the index at ``path`` (see the module docstring), holding its writer lock.

    Raises:
        IndexStateError: the damage is beyond repair (a damaged manifest or database, a
            link at a fixed name), or too few vectors are left to learn a whitening from.
        IndexLockedError: another process is writing the index.
    """
    root = Path(path).expanduser()
    before = check_index(root)
    report = RepairReport(str(root), found=[p.line() for p in before.problems])
    if before.sound:
        return report
    beyond = [p for p in before.problems if p.action == "none"]
    if beyond:
        raise IndexStateError(
            f"cannot repair {root}: {beyond[0].file}: {beyond[0].message}; mend that first "
            f"(or {REBUILD})"
        )
    actions = {p.action for p in before.problems}
    with IndexStore.open(root, writable=True, _repairing=True) as store:
        if "redescribe" in actions:
            _redescribe(store, before, report)
        if "relearn" in actions:
            _relearn_whitening(store, report)
        if "rebuild" in actions and not (report.redescribe or report.whitening_relearned):
            store.rebuild_checkpoint()
        report.checkpoint_rebuilt = "rebuild" in actions or bool(report.redescribe)
        if "recompute" in actions:
            remove_durably([root / DBA_NAME])
            if store.manifest.dba is not None:
                store.update_manifest(dba=dataclasses.replace(store.manifest.dba, sha=None))
            report.dba_removed = True
        if "drop-local" in actions:
            local = root / "local"
            if check_dir(local):
                shutil.rmtree(local)
            report.local_removed = True
    after = check_index(root)
    report.left = [p.line() for p in after.problems]
    for line in report.warnings:
        logger.warning("%s", line)
    return report


def _redescribe(store: IndexStore, found: CheckReport, report: RepairReport) -> None:
    """Images with damaged vector rows leave the search; then the vector file is compacted."""
    db = store._db
    with db.snapshot():
        hit = db.images_at_slots(found.bad_slots)
    store.mark_for_redescription([i for i, _ in hit], REDESCRIBE_REASON)
    report.redescribe = [p for _, p in hit]
    if report.redescribe:
        logger.warning(
            "%d images of %s had damaged vectors: the next `lookalike index` describes them again",
            len(hit),
            store.path,
        )
    with db.write():  # the damaged rows are dead now: forget their digests, then compact
        db.set_blocks([], replace_all=True)
    store._block_state = None
    if store.manifest.whitening.learned and _whitening_damaged(store):
        return  # compacted after the whitening is learned again
    store.compact()
    if db.kv_int("n_rows") and not store.manifest.checkpoint.file:
        store.rebuild_checkpoint()


def _whitening_damaged(store: IndexStore) -> bool:
    from lookalike.index.loader import WhiteningDamaged, load_whitening

    try:
        load_whitening(store.path, store.manifest.whitening)
    except WhiteningDamaged:
        return True
    return False


def _relearn_whitening(store: IndexStore, report: RepairReport) -> None:
    """Learn the whitening again from the stored global vectors."""
    from lookalike.whitening import WhiteningConf, learn_whitening

    state = store.manifest.whitening
    recorded = store.manifest.descriptor.get("whitening")
    try:
        conf = WhiteningConf(**recorded) if isinstance(recorded, dict) else None
    except TypeError:
        conf = None
    if conf is None:
        conf = WhiteningConf(dim=state.dim_out)
    ids = [r.id for r in store.records(status="ok")]
    if len(ids) < max(2, conf.min_images):
        raise IndexStateError(
            f"cannot learn the whitening of {store.path} again: {len(ids)} searchable images "
            f"left, it needs {max(2, conf.min_images)}; {REBUILD}"
        )
    data = store.vectors(ids)
    store.set_whitening(learn_whitening(data, conf))
    report.whitening_relearned = True
    report.warnings.append(
        f"the whitening of {store.path} was learned again from {len(ids)} stored global "
        "descriptors: it differs from the original one (learned from regional descriptors), "
        "so rankings may differ slightly from before"
    )
    if report.redescribe:
        store.compact()
