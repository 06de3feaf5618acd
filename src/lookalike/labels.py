"""Label sources for recognition: a sub-folder per class, or a CSV of ``path,label``.

Each source is a ``metadata`` callable for :func:`lookalike.indexing.index_folder` /
:func:`~lookalike.indexing.index_files`: it maps an (absolute, resolved) image path to the
user metadata stored with the image, ``{"label": name}`` or ``{}`` for an unlabelled image.
Unlabelled images stay searchable and serve recognition as *distractors*: known images of
nothing in the collection (see :mod:`lookalike.recognize`).

::

    index_folder("photos/", "idx", metadata=labels_from_folder("photos/"))
    with IndexStore.open("idx", writable=True) as store:   # relabel without re-extracting
        apply_labels(store, labels_from_csv("labels.csv"))
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from lookalike.errors import ConfigError
from lookalike.index import IndexStore

logger = logging.getLogger(__name__)

LABEL_KEY = "label"  # metadata key holding an image's label
LabelSource = Callable[[Path], dict]  # image path -> metadata ({LABEL_KEY: name} or {})
CSV_COLUMNS = ("path", "label")


def label_of(metadata: Mapping | None) -> str | None:
    """The label stored in an image's metadata; ``None`` when it has none (or an empty one)."""
    if not metadata:
        return None
    label = metadata.get(LABEL_KEY)
    return str(label) if label not in (None, "") else None


def labels_from_folder(root: str | Path) -> LabelSource:
    """Label every image by the first sub-folder under ``root``.

    ``root/eiffel/2019/a.jpg`` gets ``{"label": "eiffel"}``; images directly in ``root``, or
    outside it, get ``{}`` (unlabelled: distractors).
    """
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise ConfigError(f"label folder {root} is not a directory; pass the indexed image folder")

    def metadata(path: Path) -> dict:
        try:
            parts = Path(path).expanduser().resolve().relative_to(base).parts
        except ValueError:  # not under root
            return {}
        return {LABEL_KEY: parts[0]} if len(parts) > 1 else {}

    return metadata


def read_labels_csv(csv_path: str | Path, root: str | Path | None = None) -> dict[Path, str | None]:
    """Read a ``path,label`` CSV into ``{resolved path: label or None}``.

    Relative paths are resolved against ``root`` (default: the CSV's folder); an empty label
    cell marks an image as unlabelled. Extra columns are ignored.

    Raises:
        ConfigError: missing file, no ``path`` / ``label`` column, an empty path, or one path
            listed twice with different labels.
    """
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise ConfigError(f"label file {csv_path} not found; pass a CSV with header 'path,label'")
    base = Path(root).expanduser() if root is not None else csv_path.parent
    labels: dict[Path, str | None] = {}
    line_of: dict[Path, int] = {}
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [name.strip() for name in reader.fieldnames or []]
        missing = [c for c in CSV_COLUMNS if c not in fields]
        if missing:
            raise ConfigError(
                f"{csv_path} has no {' or '.join(repr(c) for c in missing)} column (header: "
                f"{','.join(fields) or 'empty'}); the first line must be 'path,label'"
            )
        reader.fieldnames = fields
        for row in reader:
            raw = (row.get("path") or "").strip()
            if not raw:
                raise ConfigError(f"{csv_path}:{reader.line_num}: empty path")
            path = Path(raw).expanduser()
            path = (path if path.is_absolute() else base / path).resolve()
            label = (row.get("label") or "").strip() or None
            if path in labels and labels[path] != label:
                raise ConfigError(
                    f"{csv_path}:{reader.line_num}: {raw} is labelled {label!r} but line "
                    f"{line_of[path]} labels it {labels[path]!r}; keep one label per image"
                )
            labels[path] = label
            line_of.setdefault(path, reader.line_num)
    return labels


def labels_from_csv(csv_path: str | Path, root: str | Path | None = None) -> LabelSource:
    """Label images from a CSV with header ``path,label`` (see :func:`read_labels_csv`).

    Images the CSV does not list get ``{}`` (unlabelled).
    """
    labels = read_labels_csv(csv_path, root)
    logger.info(
        "%d labelled images, %d classes in %s",
        sum(v is not None for v in labels.values()),
        len({v for v in labels.values() if v is not None}),
        csv_path,
    )
    return labels_from_mapping(labels)


def labels_from_mapping(labels: Mapping[str | Path, str | None]) -> LabelSource:
    """Label images from ``{path: label}``; paths are resolved, unlisted images unlabelled."""
    table = {Path(p).expanduser().resolve(): label for p, label in labels.items()}

    def metadata(path: Path) -> dict:
        label = table.get(Path(path).expanduser().resolve())
        return {LABEL_KEY: label} if label else {}

    return metadata


def labels_from_parent(root: str | Path) -> LabelSource:
    """Label every image under ``root`` by its parent folder's name, as training does.

    ``root/Fruit/Apple/Granny-Smith/a.jpg`` gets ``{"label": "Granny-Smith"}``; images
    directly in ``root``, or outside it, get ``{}``.
    """
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise ConfigError(f"label folder {root} is not a directory; pass the indexed image folder")

    def metadata(path: Path) -> dict:
        path = Path(path).expanduser().resolve()
        if path.parent == base or not path.is_relative_to(base):
            return {}
        return {LABEL_KEY: path.parent.name}

    return metadata


def label_source(spec: str | Path, image_dir: str | Path) -> LabelSource:
    """The source named on the command line: ``"folder"`` (the first sub-folder),
    ``"parent"`` (the parent folder, what ``lookalike train`` uses) or a CSV file."""
    if str(spec) == "folder":
        return labels_from_folder(image_dir)
    if str(spec) == "parent":
        return labels_from_parent(image_dir)
    return labels_from_csv(spec, root=image_dir)


def apply_labels(store: IndexStore, labels: LabelSource | Mapping[str | Path, str | None]) -> int:
    """(Re)label the images of an index in place, without describing anything again.

    ``labels`` is the complete labelling: every indexed image gets the label it gives, and
    loses its label when it gives none. Other metadata keys are kept.

    Args:
        store: an index opened writable.
        labels: a label source (as for indexing) or a ``{path: label}`` mapping.

    Returns:
        The number of images whose label changed.
    """
    source = labels if callable(labels) else labels_from_mapping(labels)
    changed = 0
    for record in list(store.records(status="ok")):
        new = label_of(source(Path(record.fs_path)))  # as indexing asked it
        if new == label_of(record.metadata):
            continue
        metadata = {k: v for k, v in record.metadata.items() if k != LABEL_KEY}
        if new is not None:
            metadata[LABEL_KEY] = new
        store.set_metadata(record.id, metadata)
        changed += 1
    logger.info("relabelled %d images of %s", changed, store.path)
    return changed
