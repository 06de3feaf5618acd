"""The labelled images training reads: a folder where an image's label is its parent
folder's name (``Fruit/Apple/Granny-Smith/x.jpg`` is ``Granny-Smith``), or a ``path,label``
CSV; and the stratified validation split.

Unreadable images are not looked at here: the loop skips them with their reason when it
decodes them, as indexing does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.errors import ConfigError
from lookalike.images import IMAGE_EXTENSIONS, list_images
from lookalike.labels import read_labels_csv


@dataclass(frozen=True)
class LabelledImages:
    """Image paths and their class indices; ``classes[i]`` names class ``i`` (sorted)."""

    paths: tuple[Path, ...]
    targets: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> list[int]:
        """Images per class, by class index."""
        found = Counter(self.targets)
        return [found.get(i, 0) for i in range(len(self.classes))]

    def subset(self, rows: Sequence[int]) -> LabelledImages:
        """The images at ``rows``, with the same classes (so indices stay comparable)."""
        return LabelledImages(
            tuple(self.paths[r] for r in rows), tuple(self.targets[r] for r in rows), self.classes
        )


def labelled_images(root: str | Path, labels_csv: str | Path | None = None) -> LabelledImages:
    """The labelled images under ``root``.

    Args:
        root: the folder of images (searched recursively).
        labels_csv: a ``path,label`` CSV (relative paths against ``root``); without it an
            image's label is its parent folder's name. Images directly in ``root``, or
            without a label in the CSV, are left out (they have no class).

    Raises:
        ConfigError: no folder, no labelled image, or fewer than two classes.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"training data {root} is not a folder of labelled images")
    images = list_images(root, recursive=True)
    if labels_csv is not None:
        table = read_labels_csv(labels_csv, root)
        pairs = [(p, table.get(p.resolve())) for p in images]
    else:
        pairs = [(p, p.parent.name if p.parent != root else None) for p in images]
    pairs = [(p, label) for p, label in pairs if label]
    if not pairs:
        how = f"labels from {labels_csv}" if labels_csv else "<label>/<image> sub-folders"
        raise ConfigError(
            f"no labelled images in {root}: expected {how} with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    classes = tuple(sorted({label for _, label in pairs}))
    if len(classes) < 2:
        raise ConfigError(f"{root} holds one class ({classes[0]}): training needs two or more")
    index = {name: i for i, name in enumerate(classes)}
    return LabelledImages(
        tuple(p for p, _ in pairs), tuple(index[label] for _, label in pairs), classes
    )


def split_validation(
    data: LabelledImages, fraction: float, seed: int = 0
) -> tuple[LabelledImages, LabelledImages]:
    """``(train, val)``: ``fraction`` of each class's images (rounded, at least one) held out
    for validation, at random with ``seed``; a class of one image only trains, and every
    class keeps at least one training image.

    Written by hand: scikit-learn's stratified splitters refuse classes of one image, which
    user folders have.

    Raises:
        ConfigError: ``fraction`` outside (0, 1).
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"--val-fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    targets = np.asarray(data.targets)
    train, val = [], []
    for c in range(len(data.classes)):
        rows = np.flatnonzero(targets == c)
        if len(rows) == 0:
            continue
        rows = rng.permutation(rows)
        held = 0 if len(rows) == 1 else min(len(rows) - 1, max(1, round(fraction * len(rows))))
        val.extend(rows[:held].tolist())
        train.extend(rows[held:].tolist())
    return data.subset(sorted(train)), data.subset(sorted(val))


__all__ = ["LabelledImages", "labelled_images", "split_validation"]
