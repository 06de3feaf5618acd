"""``lookalike train DATA --out MODEL --index INDEX`` in one call: train, describe the index's
images again with the new model into a new index beside it, evaluate both on the
validation images, and say which one to use.

The new index keeps the old one's ids, paths, labels and metadata (the old index is only
read). Both are scored by :func:`~lookalike.evaluate.labelled.gallery_metrics` on the same
validation images (the ``--val`` folder, or the images training held out): retrieval (P@1,
mAP, mAP@R) and recognition (the soft vote's accuracy). The new model is **promoted**
(the report says to use the new index) only when neither its mAP nor its P@1 is lower
than the old index's; otherwise it is reported as a regression and the old index stays
the one to use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lookalike.errors import ConfigError
from lookalike.evaluate.labelled import GalleryReport, gallery_metrics
from lookalike.train.conf import TrainConf
from lookalike.train.data import LabelledImages
from lookalike.train.loop import Progress, training_splits
from lookalike.train.loop import train as train_model

logger = logging.getLogger(__name__)

IndexProgress = Callable[[int, int], None]
COMPARED = ("p_at_1", "map")  # what must not fall for the new model to be promoted


@dataclass
class TrainOutcome:
    """What :func:`train_and_index` did."""

    model_dir: Path
    index: Path | None = None  # the old index
    new_index: Path | None = None
    before: GalleryReport | None = None
    after: GalleryReport | None = None
    promoted: bool | None = None  # None: no index was given
    verdict: str = ""

    def to_dict(self) -> dict:
        return {
            "model_dir": str(self.model_dir),
            "index": None if self.index is None else str(self.index),
            "new_index": None if self.new_index is None else str(self.new_index),
            "before": None if self.before is None else self.before.to_dict(),
            "after": None if self.after is None else self.after.to_dict(),
            "promoted": self.promoted,
            "verdict": self.verdict,
        }


def default_new_index(index: Path, model_dir: Path) -> Path:
    """Where the re-described index goes: beside the old one, named after the model."""
    return index.parent / f"{index.name}-{model_dir.name}"


def train_and_index(
    data: str | Path | LabelledImages,
    conf: TrainConf = TrainConf(),
    out_dir: str | Path = "model",
    index: str | Path | None = None,
    *,
    new_index: str | Path | None = None,
    val: str | Path | LabelledImages | None = None,
    labels: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[Progress], None] | None = None,
    index_progress: IndexProgress | None = None,
    eval_progress: IndexProgress | None = None,
) -> TrainOutcome:
    """Train (:func:`lookalike.train.train`); with ``index``, re-index and compare.

    Raises:
        ConfigError: the index has no labels to evaluate with (checked before training),
            the new index would be the old one, or no validation image has a label the
            index holds.
    """
    out = Path(out_dir).expanduser()
    old = None if index is None else Path(index).expanduser()
    target = None
    if old is not None:
        target = Path(new_index).expanduser() if new_index else default_new_index(old, out)
        _check_labelled(old, data, labels)
        if target.resolve() == old.resolve():
            raise ConfigError(f"--new-index must differ from --index ({old})")
    model_dir = train_model(
        data, conf, out, val=val, labels=labels, resume=resume, progress=progress
    )
    outcome = TrainOutcome(model_dir)
    if old is None or target is None:
        return outcome
    from lookalike.indexing.reembed import reembed_index
    from lookalike.train.model_dir import extract_conf

    reembed_index(old, target, extract_conf(model_dir, device=conf.device), progress=index_progress)
    _, val_set = training_splits(data, val, labels, conf)
    if val_set is None or len(val_set) == 0:
        raise ConfigError("no validation images to compare the indexes with")
    queries = [str(p) for p in val_set.paths]
    truth = [val_set.classes[t] for t in val_set.targets]
    outcome.index, outcome.new_index = old, target
    outcome.before = _score(old, queries, truth, eval_progress)
    outcome.after = _score(target, queries, truth, eval_progress)
    if outcome.before.queries == 0:
        raise ConfigError(
            f"no validation image has a label index {old} holds: its labels must be the "
            "training classes (the images' parent folder names, or --labels)"
        )
    fallen = [m for m in COMPARED if getattr(outcome.after, m) < getattr(outcome.before, m) - 1e-12]
    outcome.promoted = not fallen
    if fallen:
        outcome.verdict = (
            f"regression: the new model is worse on {', '.join(fallen)}; keep using {old} "
            f"(the new index {target} is not promoted)"
        )
    else:
        outcome.verdict = f"use {target}: the new model is at least as good on P@1 and mAP"
    return outcome


def _check_labelled(index: Path, data, labels) -> None:
    """Refuse, before training, an index the comparison could not use: one without labels,
    or whose labels are none of the training classes."""
    from lookalike.index import IndexStore
    from lookalike.labels import label_of
    from lookalike.train.data import labelled_images

    with IndexStore.open(index) as store:
        found = {label_of(r.metadata) for r in store.records()} - {None}
    if not found:
        raise ConfigError(
            f"index {index} has no labels, so the new model cannot be compared with the "
            "old one on it: index it with --label-from parent first"
        )
    classes = (
        data.classes if isinstance(data, LabelledImages) else labelled_images(data, labels).classes
    )
    if not found & set(classes):
        raise ConfigError(
            f"index {index} has labels ({', '.join(sorted(found)[:3])}, ...) but none is a "
            f"training class ({', '.join(classes[:3])}, ...): label it as training does, "
            "--label-from parent (the parent folder) or the same --labels CSV"
        )


def _score(index: Path, queries: list[str], truth: list[str], progress) -> GalleryReport:
    from lookalike.search import Searcher

    with Searcher.open(index) as searcher:
        return gallery_metrics(searcher, queries, truth, progress=progress)


__all__ = ["TrainOutcome", "default_new_index", "train_and_index"]
