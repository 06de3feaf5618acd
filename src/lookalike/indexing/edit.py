"""Change an index without describing anything: remove images, relabel them.

Both keep what is derived from the images in step in the same call: a removal also brings
the stored DBA up to date and forgets the removed images' local features.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lookalike.errors import ConfigError
from lookalike.index import IndexStore
from lookalike.labels import LABEL_KEY, LabelSource, apply_labels, label_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoveReport:
    """What :func:`remove_images` did."""

    asked: int  # distinct ids or paths given
    removed: int  # images removed (the others were not in the index)

    def to_dict(self) -> dict:
        return {"asked": self.asked, "removed": self.removed}


def path_forms(path: str | Path) -> list[str]:
    """The ways an indexed file may be stored: absolute as given, and fully resolved."""
    absolute = os.path.abspath(Path(path).expanduser())
    return list(dict.fromkeys([absolute, str(Path(absolute).resolve())]))


def remove_images(
    index_dir: str | Path, ids: Sequence[int] = (), paths: Sequence[str | Path] = ()
) -> RemoveReport:
    """``lookalike remove`` in one call: delete images by id or by path, then bring the
    stored DBA and the local features in step.

    Raises:
        ConfigError: neither or both of ``ids`` and ``paths`` given.
    """
    if (len(ids) > 0) == (len(paths) > 0):  # len: ids may be a numpy array
        raise ConfigError("give either ids (--id IDS) or image PATHS to remove, not both")
    with IndexStore.open(index_dir, writable=True) as store:
        if len(ids) > 0:
            ids = [int(i) for i in ids]
            asked, removed = len(set(ids)), store.remove(ids)
        else:
            asked = len(set(paths))
            removed = store.remove_paths([form for p in paths for form in path_forms(p)])
        sync_derived(store)
    return RemoveReport(asked, removed)


def sync_derived(store: IndexStore) -> None:
    """After removals: a stored DBA follows, the removed images' local features go, a
    stored ASMK inverted file drops them."""
    from lookalike.local.sync import sync_local
    from lookalike.rerank.asmk_stage import sync_asmk
    from lookalike.rerank.dba_stage import sync_dba

    sync_dba(store)
    sync_local(store, compute=False)
    sync_asmk(store)


def relabel_store(
    store: IndexStore, image_dir: str | Path, labels: LabelSource
) -> tuple[int, int, int]:
    """Relabel the indexed images under ``image_dir`` in place (``store`` writable).

    Indexing only asks ``labels`` about new and changed files; this brings the unchanged
    ones in line too. Images of other folders keep their labels.

    Returns:
        ``(labels changed, labelled images, classes)``, the last two over the whole index.
    """
    root = Path(image_dir).expanduser().resolve()
    # apply_labels takes its source as the complete labelling: outside the folder, answer
    # with the label an image already has.
    kept = {
        str(Path(r.fs_path)): label_of(r.metadata)
        for r in store.records("ok")
        if not Path(r.fs_path).is_relative_to(root)
    }

    def scoped(path: Path) -> dict:
        if str(path) not in kept:
            return labels(path)
        label = kept[str(path)]
        return {LABEL_KEY: label} if label is not None else {}

    changed = apply_labels(store, scoped)
    now = [label_of(r.metadata) for r in store.records("ok")]
    named = [label for label in now if label is not None]
    return changed, len(named), len(set(named))
