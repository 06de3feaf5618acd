"""Benchmark loaders: Oxford/Paris, INRIA Holidays and labelled folders, one common structure.

Loaders only read ground truth and list files; no image is opened. Every query carries its
positives, junk and excluded ids as indices into :attr:`RetrievalDataset.images`, ready for
:mod:`lookalike.evaluate.metrics`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.errors import ConfigError
from lookalike.images import IMAGE_EXTENSIONS, list_images

_OXFORD_PREFIX = "oxc1_"


@dataclass(frozen=True)
class Query:
    """One benchmark query."""

    name: str  # query id: gt file stem for Oxford/Paris, image id for Holidays / folders
    image: Path  # query image file
    box: tuple[float, float, float, float] | None  # crop x1, y1, x2, y2 in original px; None
    positives: tuple[int, ...]  # indices into RetrievalDataset.images
    junk: tuple[int, ...]  # removed from the ranking by the metrics (neither right nor wrong)
    exclude: tuple[int, ...]  # dropped from this query's ranking by apply_exclusions


@dataclass(frozen=True)
class RetrievalDataset:
    """A database of images and the queries run against it."""

    name: str
    images: tuple[Path, ...]  # the database, in index order
    queries: tuple[Query, ...]
    labels: tuple[str | None, ...] | None = None  # per database image, when there are classes


def _require_dir(path: Path, expected: str) -> None:
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; expected {expected}")


def _natural_key(name: str) -> tuple[str | int, ...]:
    """Sort key putting ``x_2`` before ``x_10``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _read_names(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(
            f"missing ground-truth file {path}; an Oxford/Paris query needs "
            "<query>_{query,good,ok,junk}.txt in gt_files/"
        )
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def load_oxford(root: str | Path) -> RetrievalDataset:
    """Load Oxford5k / Paris6k (Philbin et al. 2007): ``jpg/`` and ``gt_files/``.

    The database is every ``*.jpg`` under ``jpg/`` (sub-folders included, for the Paris
    layout), sorted by name. Each ``<query>_query.txt`` line ``oxc1_<image> x1 y1 x2 y2`` gives
    the query image and its crop; the ``oxc1_`` prefix is stripped unless an image carries
    it. Positives are good + ok, junk is junk; the query image stays in the database
    (standard protocol), so ``exclude`` is empty.
    """
    root = Path(root)
    layout = "jpg/<image>.jpg and gt_files/<query>_{query,good,ok,junk}.txt (Oxford/Paris)"
    _require_dir(root / "jpg", layout)
    _require_dir(root / "gt_files", layout)
    images = sorted(root.joinpath("jpg").rglob("*.jpg"), key=lambda p: p.stem)
    index = {p.stem: i for i, p in enumerate(images)}
    if len(index) != len(images):
        raise ConfigError(f"two images under {root / 'jpg'} share a name; names must be unique")
    query_files = sorted(
        root.joinpath("gt_files").glob("*_query.txt"), key=lambda p: _natural_key(p.name)
    )
    if not query_files:
        raise ConfigError(f"no *_query.txt in {root / 'gt_files'}; expected {layout}")

    def lookup(name: str, source: Path) -> int:
        if name not in index and name.startswith(_OXFORD_PREFIX):
            name = name[len(_OXFORD_PREFIX) :]
        if name not in index:
            raise ConfigError(f"{source} names image {name!r}, not found in {root / 'jpg'}")
        return index[name]

    queries = []
    for qfile in query_files:
        stem = qfile.name[: -len("_query.txt")]
        fields = qfile.read_text().split()
        if len(fields) != 5:
            raise ConfigError(f"{qfile} must hold one line '<image> x1 y1 x2 y2'")
        try:
            x1, y1, x2, y2 = (float(v) for v in fields[1:])
        except ValueError:
            raise ConfigError(f"{qfile}: the box x1 y1 x2 y2 must be numbers") from None

        found: dict[str, set[int]] = {}
        for kind in ("good", "ok", "junk"):
            path = qfile.with_name(f"{stem}_{kind}.txt")
            found[kind] = {lookup(name, path) for name in _read_names(path)}
        qidx = lookup(fields[0], qfile)
        queries.append(
            Query(
                name=stem,
                image=images[qidx],
                box=(x1, y1, x2, y2),
                positives=tuple(sorted(found["good"] | found["ok"])),
                junk=tuple(sorted(found["junk"])),
                exclude=(),
            )
        )
    return RetrievalDataset(root.resolve().name, tuple(images), tuple(queries))


def load_holidays(root: str | Path) -> RetrievalDataset:
    """Load INRIA Holidays (Jégou et al. 2008) from ``gt.json`` and ``jpg/<id>.jpg``.

    ``gt.json`` is ``{"images": [ids], "queries": [{"query": id, "positives": [ids]}]}``;
    ids are written as strings (``"100000"``), integers are accepted too. The database is
    the ``images`` list in its order; each query excludes its own image from its ranking.
    """
    root = Path(root)
    gt_path = root / "gt.json"
    expected = 'gt.json ({"images": [...], "queries": [...]}) and jpg/<id>.jpg'
    if not gt_path.is_file():
        raise ConfigError(f"missing {gt_path}; expected a Holidays root holding {expected}")
    try:
        gt = json.loads(gt_path.read_text())
        ids = [str(i) for i in gt["images"]]
        raw_queries = [(str(q["query"]), [str(p) for p in q["positives"]]) for q in gt["queries"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{gt_path} is not a Holidays ground truth ({err!r}); expected {expected}"
        ) from err
    index = {name: i for i, name in enumerate(ids)}
    if len(index) != len(ids):
        raise ConfigError(f"{gt_path} lists an image twice in 'images'; ids must be unique")
    images = tuple(root / "jpg" / f"{name}.jpg" for name in ids)
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise ConfigError(
            f"{len(missing)} images of {gt_path} are missing, e.g. {missing[0]}; "
            f"expected {expected}"
        )

    def lookup(name: str) -> int:
        if name not in index:
            raise ConfigError(f"{gt_path}: query/positive {name!r} is not in 'images'")
        return index[name]

    queries = []
    for qname, positives in raw_queries:
        qidx = lookup(qname)
        queries.append(
            Query(
                name=qname,
                image=images[qidx],
                box=None,
                positives=tuple(sorted({lookup(p) for p in positives} - {qidx})),
                junk=(),
                exclude=(qidx,),
            )
        )
    return RetrievalDataset(root.resolve().name, images, tuple(queries))


def load_labelled_folder(root: str | Path) -> RetrievalDataset:
    """Load ``root/<class>/**/<image>``: the class is the immediate sub-folder name.

    Every labelled image is a query against all the others: positives are the other images
    of its class, and it excludes itself. A class of one image gives a query without
    positives, which the metrics skip. Images directly in ``root`` have label ``None``:
    they stay in the database as distractors and are not queries.
    """
    root = Path(root)
    _require_dir(root, "a folder with one sub-folder of images per class")
    images = list_images(root, recursive=True)
    if not images:
        raise ConfigError(
            f"no images in {root}; expected <class>/<image> files with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    labels: list[str | None] = []
    for path in images:
        parts = path.relative_to(root).parts
        labels.append(parts[0] if len(parts) > 1 else None)
    members: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        if label is not None:
            members.setdefault(label, []).append(i)
    queries = tuple(
        Query(
            name=path.relative_to(root).as_posix(),
            image=path,
            box=None,
            positives=tuple(j for j in members[label] if j != i),
            junk=(),
            exclude=(i,),
        )
        for i, (path, label) in enumerate(zip(images, labels, strict=True))
        if label is not None
    )
    return RetrievalDataset(root.resolve().name, tuple(images), queries, tuple(labels))


def apply_exclusions(ranking: np.ndarray, query: Query) -> np.ndarray:
    """Drop ``query.exclude`` from a ``(n,)`` ranking, keeping order (junk is left to the
    metrics)."""
    ranking = np.asarray(ranking)
    if ranking.ndim != 1:
        raise ValueError(f"a ranking must be 1-D, got shape {ranking.shape}")
    if not query.exclude:
        return ranking
    return ranking[~np.isin(ranking, np.asarray(query.exclude, dtype=np.int64))]


@dataclass(frozen=True)
class GroceryClass:
    """One fine class of the Grocery Store dataset (``classes.csv``)."""

    name: str
    id: int
    iconic: Path  # its one clean product image


def grocery_classes(root: str | Path) -> list[GroceryClass]:
    """The Grocery Store dataset's classes (Klasson et al. 2019) from ``root/classes.csv``,
    in class-id order."""
    import csv

    root = Path(root)
    path = root / "classes.csv"
    if not path.is_file():
        raise ConfigError(f"{path} is missing; pass the Grocery Store dataset's folder")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [
        GroceryClass(
            r["Class Name (str)"],
            int(r["Class ID (int)"]),
            (root / r["Iconic Image Path (str)"].lstrip("/")).resolve(),
        )
        for r in rows
    ]
    return sorted(classes, key=lambda c: c.id)


DATASETS: dict[str, Callable[[str | Path], RetrievalDataset]] = {
    "oxford5k": load_oxford,
    "paris6k": load_oxford,
    "holidays": load_holidays,
    "folder": load_labelled_folder,
}


def load_dataset(kind: str, root: str | Path) -> RetrievalDataset:
    """Load a benchmark by kind (a key of :data:`DATASETS`) from ``root``."""
    if kind not in DATASETS:
        raise ConfigError(f"unknown dataset kind {kind!r}; valid: {', '.join(DATASETS)}")
    if not Path(root).is_dir():
        raise ConfigError(f"dataset root {root} is not a directory; pass the {kind} folder")
    return DATASETS[kind](root)
