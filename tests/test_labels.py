"""Label sources (folder, CSV, mapping) and relabelling an index in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import ConfigError, IndexStateError
from lookalike.index import IndexConf, IndexStore, NewImage
from lookalike.labels import (
    LABEL_KEY,
    apply_labels,
    label_of,
    label_source,
    labels_from_csv,
    labels_from_folder,
    labels_from_mapping,
    read_labels_csv,
)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path.resolve()


def test_label_key_and_label_of():
    assert LABEL_KEY == "label"
    assert label_of({"label": "eiffel", "x": 1}) == "eiffel"
    assert label_of({"label": 7}) == "7"
    for empty in (None, {}, {"label": None}, {"label": ""}, {"other": "a"}):
        assert label_of(empty) is None


def test_labels_from_folder(tmp_path):
    root = tmp_path / "photos"
    a = touch(root / "eiffel" / "a.jpg")
    deep = touch(root / "eiffel" / "2019" / "b.jpg")
    c = touch(root / "louvre" / "c.jpg")
    loose = touch(root / "d.jpg")
    outside = touch(tmp_path / "elsewhere" / "e.jpg")
    meta = labels_from_folder(root)
    assert meta(a) == {"label": "eiffel"}
    assert meta(deep) == {"label": "eiffel"}  # the FIRST sub-folder, not the parent
    assert meta(c) == {"label": "louvre"}
    assert meta(loose) == {}  # directly in root: a distractor
    assert meta(outside) == {}
    assert meta(root / "louvre" / ".." / "eiffel" / "a.jpg") == {"label": "eiffel"}


def test_labels_from_folder_not_a_dir(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        labels_from_folder(tmp_path / "missing")


def test_labels_from_csv_resolves_relative_paths(tmp_path):
    a = touch(tmp_path / "imgs" / "a.jpg")
    b = touch(tmp_path / "imgs" / "b.jpg")
    c = touch(tmp_path / "imgs" / "c.jpg")
    elsewhere = touch(tmp_path / "other" / "x.jpg")
    csv_path = tmp_path / "imgs" / "labels.csv"
    csv_path.write_text(
        f"path,label,note\na.jpg,eiffel,n1\n./b.jpg, louvre ,\nc.jpg,,distractor\n"
        f"{elsewhere},eiffel,absolute\na.jpg,eiffel,same label twice is fine\n"
    )
    meta = labels_from_csv(csv_path)  # relative to the CSV's folder
    assert meta(a) == {"label": "eiffel"}
    assert meta(b) == {"label": "louvre"}  # cells are stripped
    assert meta(c) == {}  # empty label: unlabelled
    assert meta(elsewhere) == {"label": "eiffel"}
    assert meta(touch(tmp_path / "imgs" / "unlisted.jpg")) == {}
    table = read_labels_csv(csv_path)
    assert table == {a: "eiffel", b: "louvre", c: None, elsewhere: "eiffel"}


def test_labels_from_csv_with_root(tmp_path):
    a = touch(tmp_path / "imgs" / "sub" / "a.jpg")
    csv_path = tmp_path / "meta" / "labels.csv"
    csv_path.parent.mkdir()
    csv_path.write_text("\ufefflabel,path\nbig ben,sub/a.jpg\n")  # BOM, columns in any order
    assert labels_from_csv(csv_path, root=tmp_path / "imgs")(a) == {"label": "big ben"}
    assert labels_from_csv(csv_path)(a) == {}  # resolved against meta/: another file


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("file,label\na.jpg,x\n", "no 'path' column"),
        ("path\na.jpg\n", "no 'label' column"),
        ("", "no 'path' or 'label' column"),
        ("path,label\na.jpg,x\nb.jpg,y\n./a.jpg,z\n", r"labels\.csv:4: \./a\.jpg is labelled 'z'"),
        ("path,label\n,x\n", "empty path"),
    ],
)
def test_labels_from_csv_errors(tmp_path, text, match):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        labels_from_csv(csv_path)


def test_labels_from_csv_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        labels_from_csv(tmp_path / "nope.csv")


def test_label_source(tmp_path):
    a = touch(tmp_path / "imgs" / "eiffel" / "a.jpg")
    assert label_source("folder", tmp_path / "imgs")(a) == {"label": "eiffel"}
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\neiffel/a.jpg,tower\n")
    # a CSV on the command line: relative paths are relative to the indexed folder
    assert label_source(csv_path, tmp_path / "imgs")(a) == {"label": "tower"}


@pytest.fixture
def store(tmp_path):
    """A 3-image synthetic index; image 2 carries other metadata beside its label."""
    store = IndexStore.create(tmp_path / "index", {"synthetic": True}, 4, IndexConf())
    images = [
        NewImage(path=str(tmp_path / "a.jpg"), metadata={"label": "old"}),
        NewImage(path=str(tmp_path / "b.jpg"), metadata={"label": "x", "source": "flickr"}),
        NewImage(path=str(tmp_path / "c.jpg")),
    ]
    store.add(images, np.eye(3, 4, dtype=np.float32))
    yield store
    store.close()


def labels_in(store: IndexStore) -> dict[str, dict]:
    return {Path(r.path).name: r.metadata for r in store.records()}


def test_apply_labels(store, tmp_path):
    changed = apply_labels(store, {tmp_path / "a.jpg": "new", str(tmp_path / "c.jpg"): "c"})
    # a relabelled, b loses its label (not listed) but keeps its other key, c labelled
    assert changed == 3
    assert labels_in(store) == {
        "a.jpg": {"label": "new"},
        "b.jpg": {"source": "flickr"},
        "c.jpg": {"label": "c"},
    }
    assert apply_labels(store, {tmp_path / "a.jpg": "new", tmp_path / "c.jpg": "c"}) == 0
    # a label source (as for indexing) works the same
    assert apply_labels(store, labels_from_mapping({tmp_path / "b.jpg": "x"})) == 3
    assert labels_in(store)["b.jpg"] == {"label": "x", "source": "flickr"}


def test_apply_labels_empty_index(tmp_path):
    with IndexStore.create(tmp_path / "index", {"synthetic": True}, 4, IndexConf()) as store:
        assert apply_labels(store, {}) == 0


def test_apply_labels_needs_writable(store):
    path = store.path
    store.close()
    with IndexStore.open(path) as ro, pytest.raises(IndexStateError, match="read-only"):
        apply_labels(ro, {})  # a.jpg and b.jpg would lose their labels
